//! The forwarding budget: queries waiting on an upstream resolver, at most
//! `per_client` per client address and `total` overall. A query that finds
//! either spent is dropped (the client retries), so one client flooding
//! random names holds at most its own share while every other client keeps
//! being forwarded. Local (ServiceEntry) answers never take from it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Which budget a dropped query found spent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    /// This client already has `per_client` queries in flight.
    Client,
    /// All clients together have `total` in flight.
    Total,
}

impl Spent {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Spent::Client => "client_budget",
            Spent::Total => "total_budget",
        }
    }
}

#[derive(Debug)]
pub struct ForwardBudget {
    total: usize,
    per_client: usize,
    /// Short critical sections only (a counter each way); entries leave the
    /// map at zero, so it never holds more than `total` clients.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    clients: HashMap<IpAddr, usize>,
}

/// One forwarded query's share; returned when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<ForwardBudget>,
    client: IpAddr,
}

impl ForwardBudget {
    pub fn new(total: usize, per_client: usize) -> Arc<Self> {
        Arc::new(ForwardBudget {
            total: total.max(1),
            per_client: per_client.max(1),
            state: Mutex::default(),
        })
    }

    pub fn try_take(self: &Arc<Self>, client: IpAddr) -> Result<Permit, Spent> {
        let client = client.to_canonical();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mine = s.clients.get(&client).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(Spent::Client);
        }
        if s.in_flight >= self.total {
            return Err(Spent::Total);
        }
        s.in_flight += 1;
        s.clients.insert(client, mine + 1);
        Ok(Permit {
            budget: self.clone(),
            client,
        })
    }

    /// Queries in flight for `client`.
    #[cfg(test)]
    pub fn in_flight(&self, client: IpAddr) -> usize {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.clients.get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight -= 1;
        if let std::collections::hash_map::Entry::Occupied(mut e) = s.clients.entry(self.client) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_at_its_share_is_refused_while_others_still_get_theirs() {
        let b = ForwardBudget::new(10, 3);
        let held: Vec<_> = (0..3)
            .map(|_| b.try_take(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(b.try_take(ip("10.0.0.1")).unwrap_err(), Spent::Client);
        assert_eq!(
            b.try_take(ip("::ffff:10.0.0.1")).unwrap_err(),
            Spent::Client,
            "an IPv4-mapped source is the same client"
        );
        let other = b.try_take(ip("10.0.0.2")).unwrap();
        drop(held);
        assert_eq!(b.in_flight(ip("10.0.0.1")), 0);
        assert!(b.try_take(ip("10.0.0.1")).is_ok(), "released on drop");
        drop(other);
    }

    #[test]
    fn the_total_caps_all_clients_together() {
        let b = ForwardBudget::new(4, 3);
        let _a: Vec<_> = (0..3)
            .map(|_| b.try_take(ip("10.0.0.1")).unwrap())
            .collect();
        let _b = b.try_take(ip("10.0.0.2")).unwrap();
        assert_eq!(b.try_take(ip("10.0.0.3")).unwrap_err(), Spent::Total);
    }
}

//! Rate-limited logging for hot paths: a line that an attacker (or a full fd
//! table) can trigger per packet or per connection is written at most once
//! per interval, carrying the number of lines suppressed since the last one.
//!
//! ```ignore
//! static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));
//! if let Some(suppressed) = ACCEPT_LOG.allow() {
//!     tracing::warn!(error = %e, suppressed, "accept failed");
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Process-wide time origin: limiter state is a plain `u64` of nanoseconds
/// since it, so that a limiter can be a `static` without a lock.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// One limiter per log call site (typically a `static`).
#[derive(Debug)]
pub struct LogLimit {
    interval_ns: u64,
    /// Earliest time (ns since [`ORIGIN`], plus one so that 0 means "never
    /// written") of the next allowed line.
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        LogLimit {
            interval_ns: interval.as_nanos() as u64,
            next_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed)` when a line may be written now (with the number of
    /// lines dropped since the previous one), `None` when it must be dropped
    /// (and is counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(ORIGIN.elapsed().as_nanos() as u64 + 1)
    }

    /// [`allow`](Self::allow) at `now` (ns since the origin, never 0).
    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ns.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_ns),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn the_first_line_passes_and_the_rest_of_the_interval_is_counted() {
        let l = LogLimit::new(Duration::from_secs(1));
        assert_eq!(l.allow_at(1), Some(0));
        for i in 0..1000 {
            assert_eq!(l.allow_at(2 + i), None);
        }
        assert_eq!(
            l.allow_at(1 + SEC),
            Some(1000),
            "the next line reports what was dropped"
        );
        assert_eq!(l.allow_at(2 + SEC), None);
        assert_eq!(l.allow_at(1 + 3 * SEC), Some(1), "the count restarts");
    }

    #[test]
    fn a_quiet_site_writes_every_line() {
        let l = LogLimit::new(Duration::from_secs(1));
        for i in 0..5 {
            assert_eq!(l.allow_at(1 + i * 2 * SEC), Some(0));
        }
    }

    #[test]
    fn concurrent_callers_write_one_line_per_interval_and_lose_no_count() {
        let l = std::sync::Arc::new(LogLimit::new(Duration::from_secs(3600)));
        let written: u64 = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| l.allow().is_some()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as u64)
            .sum();
        assert_eq!(written, 1);
        assert_eq!(l.suppressed.load(Ordering::Acquire), 80_000 - 1);
    }
}

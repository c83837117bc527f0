//! Reconcile by difference, for every reconciled map (hash maps and the LPM
//! trie alike): make a map equal a desired content while touching only what
//! differs. Unchanged entries are never removed, so a lookup for them can
//! never miss during a reload (no flush-and-refill). Adds and updates go
//! first, removals last; a removal that fails is reported, and its key stays
//! in the mirror so the next pass retries it.
//!
//! The caller keeps a mirror of each map, read once from the pinned state,
//! so a restarted agent changes only what differs. [`plan`] is the pure
//! part (no kernel).

use std::collections::BTreeMap;

use aya::maps::{lpm_trie, HashMap, LpmTrie, MapData, MapError};
use shunt_common::CidrAddr;

use super::{registry::LpmKey, KernelError};
use crate::model::{CowMap, Difference};

/// What one reconcile pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

impl std::ops::Add for Diff {
    type Output = Diff;
    fn add(self, o: Diff) -> Diff {
        Diff {
            added: self.added + o.added,
            updated: self.updated + o.updated,
            removed: self.removed + o.removed,
        }
    }
}

/// The writes that turn `current` into `desired`, in the order to apply.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan<K, V> {
    /// New keys and changed values.
    pub upserts: Vec<(K, V)>,
    /// Keys no longer desired.
    pub removals: Vec<K>,
    /// How many of `upserts` are new keys.
    pub added: usize,
}

/// Compute the difference. Entries equal in both are not in the plan. Both
/// maps are walked once side by side, in key order (no lookups): at
/// 250,000 entries an unchanged map costs a few milliseconds.
pub fn plan<K, V>(current: &BTreeMap<K, V>, desired: &BTreeMap<K, V>) -> Plan<K, V>
where
    K: Ord + Copy,
    V: PartialEq + Copy,
{
    let mut p = Plan {
        upserts: Vec::new(),
        removals: Vec::new(),
        added: 0,
    };
    let mut cur = current.iter().peekable();
    for (k, v) in desired {
        // Current keys before `k` are no longer desired.
        while let Some((ck, _)) = cur.next_if(|(ck, _)| *ck < k) {
            p.removals.push(*ck);
        }
        match cur.next_if(|(ck, _)| *ck == k) {
            Some((_, old)) if old == v => {}
            Some(_) => p.upserts.push((*k, *v)),
            None => {
                p.added += 1;
                p.upserts.push((*k, *v));
            }
        }
    }
    p.removals.extend(cur.map(|(k, _)| *k));
    p
}

/// A mirror of a map's content: what [`reconcile`] plans against and
/// keeps up to date.
pub trait Mirror<K, V>: Sized {
    fn from_entries(entries: BTreeMap<K, V>) -> Self;
    fn plan(&self, desired: &Self) -> Plan<K, V>;
    fn put(&mut self, k: K, v: V);
    fn delete(&mut self, k: &K);
    /// Every write of a plan from `desired` succeeded: the mirror equals
    /// `desired`, and may take its layout (see [`CowMap`]).
    fn settle(&mut self, desired: &Self);
}

impl<K: Ord + Copy, V: PartialEq + Copy> Mirror<K, V> for BTreeMap<K, V> {
    fn from_entries(entries: BTreeMap<K, V>) -> Self {
        entries
    }
    fn plan(&self, desired: &Self) -> Plan<K, V> {
        plan(self, desired)
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
    fn delete(&mut self, k: &K) {
        self.remove(k);
    }
    fn settle(&mut self, _: &Self) {}
}

/// The big map (`services`, 258,000 entries at 100,000 ServiceEntries):
/// the projection patches a clone of the mirror, so the plan skips the
/// chunks they still share, and the mirror then shares the projection's.
impl<K: Ord + Copy, V: PartialEq + Copy> Mirror<K, V> for CowMap<K, V> {
    fn from_entries(entries: BTreeMap<K, V>) -> Self {
        CowMap::from_sorted(entries)
    }
    fn plan(&self, desired: &Self) -> Plan<K, V> {
        let mut p = Plan {
            upserts: Vec::new(),
            removals: Vec::new(),
            added: 0,
        };
        for d in self.differences(desired) {
            match d {
                Difference::Upsert(k, v) => {
                    if !self.contains_key(k) {
                        p.added += 1;
                    }
                    p.upserts.push((*k, *v));
                }
                Difference::Removal(k) => p.removals.push(*k),
            }
        }
        p
    }
    fn put(&mut self, k: K, v: V) {
        self.insert(k, v);
    }
    fn delete(&mut self, k: &K) {
        self.remove(k);
    }
    fn settle(&mut self, desired: &Self) {
        *self = desired.clone();
    }
}

/// A kernel map that can be reconciled.
pub trait Target<K, V> {
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError>;
    fn delete(&mut self, k: &K) -> Result<(), MapError>;
    /// The whole current content (for the mirror).
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError>;
}

impl<K, V> Target<K, V> for HashMap<MapData, K, V>
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    fn put(&mut self, k: &K, v: &V) -> Result<(), MapError> {
        self.insert(k, v, 0)
    }
    fn delete(&mut self, k: &K) -> Result<(), MapError> {
        self.remove(k)
    }
    fn entries(&self) -> Result<BTreeMap<K, V>, MapError> {
        self.iter().collect()
    }
}

impl<V: aya::Pod> Target<LpmKey, V> for LpmTrie<MapData, CidrAddr, V> {
    fn put(&mut self, k: &LpmKey, v: &V) -> Result<(), MapError> {
        self.insert(&k.to_key(), v, 0)
    }
    fn delete(&mut self, k: &LpmKey) -> Result<(), MapError> {
        self.remove(&k.to_key())
    }
    fn entries(&self) -> Result<BTreeMap<LpmKey, V>, MapError> {
        self.iter()
            .map(|r| r.map(|(k, v): (lpm_trie::Key<CidrAddr>, V)| (LpmKey::from(&k), v)))
            .collect()
    }
}

/// A map and the mirror of its content, read from the pinned state.
pub struct Mirrored<T, K, V, M = BTreeMap<K, V>> {
    pub map: T,
    pub current: M,
    name: &'static str,
    _entries: std::marker::PhantomData<(K, V)>,
}

impl<T, K, V, M> Mirrored<T, K, V, M>
where
    T: Target<K, V>,
    K: Ord + Copy,
    V: PartialEq + Copy,
    M: Mirror<K, V>,
{
    pub fn new(map: T, name: &'static str) -> Result<Self, KernelError> {
        let current = map.entries().map_err(KernelError::map(name, "iterate"))?;
        Ok(Self {
            map,
            current: M::from_entries(current),
            name,
            _entries: std::marker::PhantomData,
        })
    }

    /// Make the map equal `desired` (see the module doc).
    pub fn reconcile(&mut self, desired: &M) -> Result<Diff, KernelError> {
        reconcile(&mut self.map, &mut self.current, desired, self.name)
    }
}

/// Make `map` equal `desired`; `current` is the caller's mirror of it.
pub fn reconcile<T, K, V, M>(
    map: &mut T,
    current: &mut M,
    desired: &M,
    name: &'static str,
) -> Result<Diff, KernelError>
where
    T: Target<K, V>,
    K: Ord + Copy,
    V: PartialEq + Copy,
    M: Mirror<K, V>,
{
    let p = current.plan(desired);
    let mut diff = Diff {
        added: p.added,
        updated: p.upserts.len() - p.added,
        removed: 0,
    };
    for (k, v) in &p.upserts {
        map.put(k, v).map_err(KernelError::map(name, "insert"))?;
        current.put(*k, *v);
    }
    let mut failed = 0;
    let mut first = None;
    for k in &p.removals {
        match map.delete(k) {
            Ok(()) => {}
            Err(e) if is_absent(&e) => {}
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
                continue;
            }
        }
        current.delete(k);
        diff.removed += 1;
    }
    match first {
        None => {
            current.settle(desired);
            Ok(diff)
        }
        Some(source) => Err(KernelError::Remove {
            map: name,
            failed,
            source,
        }),
    }
}

/// An entry already gone is as good as removed.
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(u32, u8)]) -> BTreeMap<u32, u8> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn unchanged_entries_are_not_in_the_plan() {
        let p = plan(&m(&[(1, 1), (2, 2)]), &m(&[(1, 1), (2, 2)]));
        assert!(p.upserts.is_empty() && p.removals.is_empty());
    }

    #[test]
    fn the_plan_adds_updates_and_removes_only_what_differs() {
        let p = plan(&m(&[(1, 1), (2, 2), (3, 3)]), &m(&[(1, 1), (2, 9), (4, 4)]));
        assert_eq!(p.upserts, vec![(2, 9), (4, 4)]);
        assert_eq!(p.added, 1);
        assert_eq!(p.removals, vec![3]);
    }

    /// A map in memory whose removals can be made to fail.
    #[derive(Default)]
    struct Fake {
        m: BTreeMap<u32, u8>,
        refuse_removal_of: Option<u32>,
        log: Vec<String>,
    }

    impl Target<u32, u8> for Fake {
        fn put(&mut self, k: &u32, v: &u8) -> Result<(), MapError> {
            self.log.push(format!("put {k}"));
            self.m.insert(*k, *v);
            Ok(())
        }
        fn delete(&mut self, k: &u32) -> Result<(), MapError> {
            self.log.push(format!("delete {k}"));
            if self.refuse_removal_of == Some(*k) {
                return Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_delete_elem",
                    io_error: std::io::Error::from_raw_os_error(libc::EPERM),
                }));
            }
            self.m.remove(k).map(|_| ()).ok_or(MapError::KeyNotFound)
        }
        fn entries(&self) -> Result<BTreeMap<u32, u8>, MapError> {
            Ok(self.m.clone())
        }
    }

    #[test]
    fn adds_and_updates_are_written_before_any_removal() {
        let mut f = Fake {
            m: m(&[(1, 1), (2, 2)]),
            ..Default::default()
        };
        let mut mirror = f.entries().unwrap();
        let d = reconcile(&mut f, &mut mirror, &m(&[(2, 3), (5, 5)]), "t").unwrap();
        assert_eq!(
            d,
            Diff {
                added: 1,
                updated: 1,
                removed: 1
            }
        );
        assert_eq!(f.log, vec!["put 2", "put 5", "delete 1"]);
        assert_eq!(mirror, f.m);
    }

    #[test]
    fn a_failed_removal_is_reported_and_retried_on_the_next_pass() {
        let mut f = Fake {
            m: m(&[(1, 1), (2, 2), (3, 3)]),
            refuse_removal_of: Some(2),
            ..Default::default()
        };
        let mut mirror = f.entries().unwrap();
        let err = reconcile(&mut f, &mut mirror, &m(&[]), "t").unwrap_err();
        assert!(
            matches!(err, KernelError::Remove { failed: 1, .. }),
            "{err}"
        );
        // The others went; the refused key is still mirrored.
        assert_eq!(mirror, m(&[(2, 2)]));
        f.refuse_removal_of = None;
        f.log.clear();
        let d = reconcile(&mut f, &mut mirror, &m(&[]), "t").unwrap();
        assert_eq!(d.removed, 1);
        assert_eq!(f.log, vec!["delete 2"]);
        assert!(f.m.is_empty());
    }

    #[test]
    fn an_entry_already_gone_counts_as_removed() {
        let mut f = Fake::default();
        let mut mirror = m(&[(7, 7)]);
        let d = reconcile(&mut f, &mut mirror, &m(&[]), "t").unwrap();
        assert_eq!(d.removed, 1);
        assert!(mirror.is_empty());
    }

    #[test]
    fn a_mirror_from_pinned_state_changes_nothing_when_equal() {
        let mut f = Fake {
            m: m(&[(1, 1), (2, 2)]),
            ..Default::default()
        };
        let mut mirrored = Mirrored::new(std::mem::take(&mut f), "t").unwrap();
        let d = mirrored.reconcile(&m(&[(1, 1), (2, 2)])).unwrap();
        assert!(d.is_empty());
        assert!(mirrored.map.log.is_empty());
    }
}

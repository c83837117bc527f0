//! [`CowMap`]: an ordered map whose clone is cheap and shares its entries,
//! for the indexes an apply patches (the model's, the DNS table's). A
//! clone copies one pointer per [`CHUNK`] entries; a write copies the one
//! chunk it changes. So a model built from the previous one by patching a
//! few entries costs O(n / CHUNK + changes · CHUNK), and dropping the
//! previous one frees only what it did not share.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Entries per chunk before it splits in two.
const CHUNK: usize = 64;

/// See the module docs. Chunks are sorted, non-empty and disjoint.
#[derive(Clone)]
pub struct CowMap<K, V> {
    chunks: Vec<Arc<Vec<(K, V)>>>,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: PartialEq, V: PartialEq> PartialEq for CowMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}
impl<K: Eq, V: Eq> Eq for CowMap<K, V> {}

impl<K, V> CowMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + Clone {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .map(|(k, v)| (k, v))
    }
    pub fn keys(&self) -> impl Iterator<Item = &K> + Clone {
        self.iter().map(|(k, _)| k)
    }
    pub fn values(&self) -> impl Iterator<Item = &V> + Clone {
        self.iter().map(|(_, v)| v)
    }
}

impl<K: Ord + Clone, V: Clone> CowMap<K, V> {
    /// From entries in strictly increasing key order (unchecked but for
    /// debug builds), in one pass.
    pub fn from_sorted(sorted: impl IntoIterator<Item = (K, V)>) -> Self {
        let mut m = Self::new();
        let mut chunk = Vec::with_capacity(CHUNK);
        for kv in sorted {
            debug_assert!(chunk.last().is_none_or(|l: &(K, V)| l.0 < kv.0));
            chunk.push(kv);
            if chunk.len() == CHUNK {
                m.len += CHUNK;
                m.chunks.push(Arc::new(std::mem::replace(
                    &mut chunk,
                    Vec::with_capacity(CHUNK),
                )));
            }
        }
        if !chunk.is_empty() {
            m.len += chunk.len();
            chunk.shrink_to_fit();
            m.chunks.push(Arc::new(chunk));
        }
        m
    }

    /// The chunk that holds `k` if any chunk does: the first whose last key
    /// is not below `k`.
    fn chunk_of<Q: Ord + ?Sized>(&self, k: &Q) -> usize
    where
        K: Borrow<Q>,
    {
        self.chunks
            .partition_point(|c| c.last().expect("chunks are non-empty").0.borrow() < k)
    }

    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let c = self.chunks.get(self.chunk_of(k))?;
        c.binary_search_by(|(x, _)| x.borrow().cmp(k))
            .ok()
            .map(|i| &c[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(k).is_some()
    }

    /// The value of `k` to change in place (its chunk copied if shared).
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let ci = self.chunk_of(k);
        let c = self.chunks.get(ci)?;
        let i = c.binary_search_by(|(x, _)| x.borrow().cmp(k)).ok()?;
        Some(&mut Arc::make_mut(&mut self.chunks[ci])[i].1)
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        let mut ci = self.chunk_of(&k);
        if ci == self.chunks.len() {
            // Above every key: into the last chunk (or a first one).
            if ci == 0 {
                self.chunks.push(Arc::new(Vec::with_capacity(1)));
            } else {
                ci -= 1;
            }
        }
        let c = Arc::make_mut(&mut self.chunks[ci]);
        match c.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(i) => return Some(std::mem::replace(&mut c[i].1, v)),
            Err(i) => c.insert(i, (k, v)),
        }
        self.len += 1;
        if c.len() > 2 * CHUNK {
            let tail = c.split_off(CHUNK);
            c.shrink_to_fit();
            self.chunks.insert(ci + 1, Arc::new(tail));
        }
        None
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let ci = self.chunk_of(k);
        let i = self
            .chunks
            .get(ci)?
            .binary_search_by(|(x, _)| x.borrow().cmp(k))
            .ok()?;
        let c = Arc::make_mut(&mut self.chunks[ci]);
        let (_, v) = c.remove(i);
        if c.is_empty() {
            self.chunks.remove(ci);
        }
        self.len -= 1;
        Some(v)
    }
}

impl<K: Ord + Clone + Borrow<Q>, Q: Ord + ?Sized, V: Clone> std::ops::Index<&Q> for CowMap<K, V> {
    type Output = V;
    /// The value of `k`; panics if there is none, as a `BTreeMap` does.
    fn index(&self, k: &Q) -> &V {
        self.get(k).expect("no entry for the key in the CowMap")
    }
}

/// One difference between two maps, from [`CowMap::differences`].
#[derive(Debug, PartialEq, Eq)]
pub enum Difference<'a, K, V> {
    /// In the other map only, or with another value there: the other's.
    Upsert(&'a K, &'a V),
    /// In this map only.
    Removal(&'a K),
}

impl<K: Ord, V: PartialEq> CowMap<K, V> {
    /// What turns `self` into `other`, in key order. Chunks the two share
    /// (one was cloned from the other and patched) are skipped whole
    /// without looking at their entries, so the cost is O(n / CHUNK) plus
    /// the entries of the chunks that differ.
    pub fn differences<'a>(&'a self, other: &'a Self) -> Vec<Difference<'a, K, V>> {
        let mut out = Vec::new();
        let (mut a, mut b) = (Cursor::new(&self.chunks), Cursor::new(&other.chunks));
        loop {
            // Both at the start of the same chunk: equal, skip it.
            if let (Some(x), Some(y)) = (a.whole(), b.whole()) {
                if Arc::ptr_eq(x, y) {
                    a.skip_chunk();
                    b.skip_chunk();
                    continue;
                }
            }
            match (a.peek(), b.peek()) {
                (None, None) => return out,
                (Some((k, _)), None) => {
                    out.push(Difference::Removal(k));
                    a.advance();
                }
                (None, Some((k, v))) => {
                    out.push(Difference::Upsert(k, v));
                    b.advance();
                }
                (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                    std::cmp::Ordering::Less => {
                        out.push(Difference::Removal(ka));
                        a.advance();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(Difference::Upsert(kb, vb));
                        b.advance();
                    }
                    std::cmp::Ordering::Equal => {
                        if va != vb {
                            out.push(Difference::Upsert(kb, vb));
                        }
                        a.advance();
                        b.advance();
                    }
                },
            }
        }
    }
}

/// A position in a chunk list.
struct Cursor<'a, K, V> {
    chunks: &'a [Arc<Vec<(K, V)>>],
    chunk: usize,
    at: usize,
}

impl<'a, K, V> Cursor<'a, K, V> {
    fn new(chunks: &'a [Arc<Vec<(K, V)>>]) -> Self {
        Self {
            chunks,
            chunk: 0,
            at: 0,
        }
    }
    /// The current chunk, if the cursor is at its first entry.
    fn whole(&self) -> Option<&'a Arc<Vec<(K, V)>>> {
        (self.at == 0)
            .then(|| self.chunks.get(self.chunk))
            .flatten()
    }
    fn skip_chunk(&mut self) {
        self.chunk += 1;
        self.at = 0;
    }
    fn peek(&self) -> Option<&'a (K, V)> {
        self.chunks.get(self.chunk).map(|c| &c[self.at])
    }
    fn advance(&mut self) {
        self.at += 1;
        if self.at == self.chunks[self.chunk].len() {
            self.skip_chunk();
        }
    }
}

impl<K: Ord + Clone, V: Clone> FromIterator<(K, V)> for CowMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(it: I) -> Self {
        let mut m = Self::new();
        for (k, v) in it {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The differences of a patched clone are exactly the plain diff of
    /// the two maps' contents, whatever chunks were split or copied.
    #[test]
    fn differences_of_a_patched_clone_are_the_plain_diff() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut base: CowMap<u32, u32> = CowMap::from_sorted((0..5000).map(|k| (k * 2, k)));
        for round in 0..50 {
            let mut patched = base.clone();
            for _ in 0..(next() % 200) {
                let k = (next() % 11_000) as u32;
                match next() % 3 {
                    0 => {
                        patched.remove(&k);
                    }
                    1 => {
                        patched.insert(k, round);
                    }
                    _ => {
                        if let Some(v) = patched.get_mut(&k) {
                            *v = v.wrapping_add(0); // copies the chunk, same value
                        }
                    }
                }
            }
            let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = (
                base.iter().map(|(k, v)| (*k, *v)).collect(),
                patched.iter().map(|(k, v)| (*k, *v)).collect(),
            );
            let mut want = Vec::new();
            for (k, v) in &b {
                if a.get(k) != Some(v) {
                    want.push((*k, Some(*v)));
                }
            }
            for k in a.keys().filter(|k| !b.contains_key(k)) {
                want.push((*k, None));
            }
            want.sort();
            let mut got: Vec<_> = base
                .differences(&patched)
                .into_iter()
                .map(|d| match d {
                    Difference::Upsert(k, v) => (*k, Some(*v)),
                    Difference::Removal(k) => (*k, None),
                })
                .collect();
            got.sort();
            assert_eq!(got, want, "round {round}");
            base = patched;
        }
    }

    /// Random inserts and removes against a BTreeMap, with clones kept
    /// along the way unchanged by later writes to the original.
    #[test]
    fn behaves_as_an_ordered_map_and_clones_do_not_see_later_writes() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut m = CowMap::new();
        let mut b = BTreeMap::new();
        let mut snapshots = Vec::new();
        for step in 0..20_000 {
            let k = (next() % 1000) as u32;
            if next() % 3 == 0 {
                assert_eq!(m.remove(&k), b.remove(&k));
            } else {
                assert_eq!(m.insert(k, step), b.insert(k, step));
            }
            if step % 2000 == 0 {
                snapshots.push((m.clone(), b.clone()));
            }
            if let Some(v) = m.get_mut(&(k + 1)) {
                *v += 1;
                *b.get_mut(&(k + 1)).unwrap() += 1;
            }
        }
        assert_eq!(m.len(), b.len());
        assert!(m
            .iter()
            .map(|(k, v)| (*k, *v))
            .eq(b.iter().map(|(k, v)| (*k, *v))));
        for k in 0..1001 {
            assert_eq!(m.get(&k), b.get(&k));
        }
        for (m, b) in snapshots {
            assert!(m.iter().map(|(k, v)| (*k, *v)).eq(b.into_iter()));
        }
    }
}

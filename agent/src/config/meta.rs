//! Kubernetes object metadata, as far as shunt reads it.

use std::borrow::Borrow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Boxed, as `creation_timestamp`: 8 bytes less each in 100,000
    /// ServiceEntries (see [`ServiceEntrySpec`](super::ServiceEntrySpec)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub labels: StringMap,
    #[serde(default, skip_serializing_if = "StringMap::is_empty")]
    pub annotations: StringMap,
    /// RFC 3339; decides VIP collisions (the older entry keeps its address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Box<str>>,
    /// Anything else Kubernetes puts in metadata (uid, resourceVersion, ...).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml_ng::Value>,
}

impl ObjectMeta {
    /// Namespace, defaulting like kubectl does.
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// `metadata.labels` and `annotations`: a sorted list with no spare
/// capacity. Most objects have none or two, and a `BTreeMap` node holds
/// room for eleven (~640 bytes per labelled object; 40,000 of them at
/// 100,000 ServiceEntries); empty, it is 16 bytes against 24 (which puts a
/// ServiceEntry in mimalloc's 448-byte class instead of 512). Reads as a
/// map does: the last of duplicate keys wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StringMap(Box<[(String, String)]>);

impl StringMap {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    // Keys borrowed as a `BTreeMap`'s are, so that callers read the same.
    fn find<Q: Ord + ?Sized>(&self, k: &Q) -> Result<usize, usize>
    where
        String: Borrow<Q>,
    {
        self.0.binary_search_by(|(x, _)| x.borrow().cmp(k))
    }
    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&String>
    where
        String: Borrow<Q>,
    {
        self.find(k).ok().map(|i| &self.0[i].1)
    }
    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        String: Borrow<Q>,
    {
        self.find(k).is_ok()
    }
    /// Sets `k` to `v`, returning the value it replaces.
    pub fn insert(&mut self, k: String, v: String) -> Option<String> {
        match self.find(&k) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                let mut all = std::mem::take(&mut self.0).into_vec();
                all.insert(i, (k, v));
                self.0 = all.into_boxed_slice();
                None
            }
        }
    }
    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<String>
    where
        String: Borrow<Q>,
    {
        let i = self.find(k).ok()?;
        let mut all = std::mem::take(&mut self.0).into_vec();
        let (_, v) = all.remove(i);
        self.0 = all.into_boxed_slice();
        Some(v)
    }
    /// In order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> + Clone {
        self.0.iter().map(|(k, _)| k)
    }
    /// In key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &String)> + Clone {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for StringMap {
    type Output = String;
    /// The value of `k`; panics if there is none, as a `BTreeMap` does.
    fn index(&self, k: &str) -> &String {
        self.get(k).expect("no entry for the key")
    }
}

impl FromIterator<(String, String)> for StringMap {
    /// The last of duplicate keys wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Self {
        let mut all: Vec<(String, String)> = it.into_iter().collect();
        // Stable: equal keys keep their order, and the last one is kept.
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(all.len());
        for kv in all {
            match out.last_mut() {
                Some(last) if last.0 == kv.0 => *last = kv,
                _ => out.push(kv),
            }
        }
        StringMap(out.into_boxed_slice())
    }
}

impl From<BTreeMap<String, String>> for StringMap {
    fn from(m: BTreeMap<String, String>) -> Self {
        StringMap(m.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for StringMap {
    fn from(kv: [(String, String); N]) -> Self {
        kv.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a StringMap {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl Serialize for StringMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<StringMap, A::Error> {
                let mut all = Vec::with_capacity(m.size_hint().unwrap_or(0));
                while let Some(kv) = m.next_entry::<String, String>()? {
                    all.push(kv);
                }
                Ok(all.into_iter().collect())
            }
        }
        d.deserialize_map(V)
    }
}

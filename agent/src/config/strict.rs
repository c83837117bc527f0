//! serde_yaml_ng's streaming deserializer made to decide as its `Value`
//! tree does, for the parse's fast path ([`super::load`]): documents go
//! straight from libyaml's events to typed objects, without building and
//! dropping a tree per document (at 100,000 ServiceEntries the tree was
//! ~40% of the parse).
//!
//! The two differ where the stream is lenient: it hands any scalar to a
//! string field (`name: 123` reads "123"; the tree has a number there and
//! refuses it) and keeps the last of duplicate map keys (the tree refuses
//! them). So every request but an option's and a newtype's goes through
//! `deserialize_any`, the call the tree is built with, and:
//! - strings, identifiers and chars accept only scalars that resolve to a
//!   string;
//! - every mapping refuses a key it has seen (by a 64-bit hash: a collision
//!   only sends the file down the slow path);
//! - what the tree would treat in its own way is refused: enums and tags,
//!   bytes, integers beyond 64 bits (the tree has no place for them), a null
//!   inside an option's `Some` (the tree's `None`). A null where a list or
//!   map is wanted (the tree's empty one) reaches the target visitor as a
//!   unit, which every list and map visitor refuses.
//!
//! A refusal is not a finding: the caller parses the file again through the
//! tree, which reports the problem in its usual words. So the fast path only
//! has to be right when it succeeds, and there it reads what the tree would.

use std::fmt;
use std::hash::BuildHasher;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A deserializer whose every answer the `Value` path would give too.
pub(super) struct Strict<'k, D> {
    de: D,
    /// Set when this deserializes a map key: the key's hash is written here.
    key: Option<&'k mut Option<u64>>,
    /// Inside an option's `Some`: a null here (`!!null "null"`, which the
    /// stream calls present) is the tree's `None`.
    not_null: bool,
}

impl<D> Strict<'static, D> {
    pub(super) fn new(de: D) -> Self {
        Strict {
            de,
            key: None,
            not_null: false,
        }
    }
}

/// Hashes map keys for the duplicate check. Fixed: a crafted collision
/// only sends a file down the slow path.
const KEYS: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x5eed);

/// Why a fast parse gave up (never shown: the slow path then runs).
fn refuse<E: de::Error>(what: &str) -> E {
    E::custom(format_args!("fast path: {what}"))
}

#[derive(Clone, Copy, PartialEq)]
enum Want {
    Any,
    /// A string (str, string, identifier, char): the tree has only
    /// `Value::String` for these.
    Str,
}

macro_rules! through_any {
    ($want:expr => $($m:ident),+ $(,)?) => {$(
        fn $m<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.de.deserialize_any(Wrap {
                v,
                want: $want,
                key: self.key,
                not_null: self.not_null,
            })
        }
    )+};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<'_, D> {
    type Error = D::Error;

    through_any!(Want::Any =>
        deserialize_any, deserialize_bool, deserialize_i8, deserialize_i16,
        deserialize_i32, deserialize_i64, deserialize_i128, deserialize_u8,
        deserialize_u16, deserialize_u32, deserialize_u64, deserialize_u128,
        deserialize_f32, deserialize_f64, deserialize_unit, deserialize_seq,
        deserialize_map, deserialize_ignored_any,
    );
    through_any!(Want::Str =>
        deserialize_char, deserialize_str, deserialize_string, deserialize_identifier,
    );

    fn deserialize_bytes<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(refuse("bytes"))
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
        Err(refuse("bytes"))
    }
    /// The stream's own: its `None` (plain `~`, `null`, empty) is the
    /// tree's `Value::Null`; what it calls present but the tree reads as
    /// null (a quoted scalar tagged `!!null`) is refused inside the `Some`.
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.de.deserialize_option(Wrap {
            v,
            want: Want::Any,
            key: self.key,
            not_null: self.not_null,
        })
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.deserialize_any(v)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.de.deserialize_newtype_struct(
            name,
            Wrap {
                v,
                want: Want::Any,
                key: self.key,
                not_null: self.not_null,
            },
        )
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, D::Error> {
        self.deserialize_any(v)
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.deserialize_any(v)
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.deserialize_any(v)
    }
    /// The tree reads enums from its own `Tagged` and `String` values; no
    /// type shunt parses derives an enum, so there is nothing to match.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, D::Error> {
        Err(refuse("enum"))
    }
    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

/// The caller's visitor, handed only what the tree would hand it.
struct Wrap<'k, V> {
    v: V,
    want: Want,
    key: Option<&'k mut Option<u64>>,
    not_null: bool,
}

impl<V> Wrap<'_, V> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        match self.want {
            Want::Any => Ok(()),
            Want::Str => Err(refuse("not a string")),
        }
    }
    fn null<E: de::Error>(&self) -> Result<(), E> {
        if self.not_null {
            return Err(refuse("a null the tree reads as none"));
        }
        self.scalar()
    }
    fn record(&mut self, s: &str) {
        if let Some(k) = self.key.as_deref_mut() {
            *k = Some(KEYS.hash_one(s));
        }
    }
}

macro_rules! scalar {
    ($($m:ident: $t:ty),+ $(,)?) => {$(
        fn $m<E: de::Error>(self, x: $t) -> Result<V::Value, E> {
            self.scalar()?;
            self.v.$m(x)
        }
    )+};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.v.expecting(f)
    }

    scalar!(
        visit_bool: bool, visit_i8: i8, visit_i16: i16, visit_i32: i32, visit_i64: i64,
        visit_u8: u8, visit_u16: u16, visit_u32: u32, visit_u64: u64,
        visit_f32: f32, visit_f64: f64, visit_char: char,
    );

    /// Beyond 64 bits: the tree refuses the whole file, while a target
    /// that ignores its value (`IgnoredAny`) would take it.
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<V::Value, E> {
        Err(refuse("an integer beyond 64 bits"))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<V::Value, E> {
        Err(refuse("an integer beyond 64 bits"))
    }

    fn visit_str<E: de::Error>(mut self, s: &str) -> Result<V::Value, E> {
        self.record(s);
        self.v.visit_str(s)
    }
    fn visit_borrowed_str<E: de::Error>(mut self, s: &'de str) -> Result<V::Value, E> {
        self.record(s);
        self.v.visit_borrowed_str(s)
    }
    fn visit_string<E: de::Error>(mut self, s: String) -> Result<V::Value, E> {
        self.record(&s);
        self.v.visit_string(s)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<V::Value, E> {
        Err(refuse("bytes"))
    }
    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.null()?;
        self.v.visit_none()
    }
    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.null()?;
        self.v.visit_unit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.scalar()?;
        self.v.visit_some(Strict {
            de: d,
            key: None,
            not_null: true,
        })
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        self.scalar()?;
        self.v.visit_newtype_struct(Strict::new(d))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.scalar()?;
        self.v.visit_seq(StrictSeq(a))
    }
    fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<V::Value, A::Error> {
        self.scalar()?;
        self.v.visit_map(StrictMap {
            map: a,
            seen: Seen::default(),
        })
    }
    /// A tagged value (`!foo x`): the tree keeps it as `Value::Tagged`.
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<V::Value, A::Error> {
        Err(refuse("tag"))
    }
}

struct Seed<'k, T> {
    seed: T,
    key: Option<&'k mut Option<u64>>,
}

impl<'de, T: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, T> {
    type Value = T::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T::Value, D::Error> {
        self.seed.deserialize(Strict {
            de: d,
            key: self.key,
            not_null: false,
        })
    }
}

struct StrictSeq<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for StrictSeq<A> {
    type Error = A::Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed { seed, key: None })
    }
    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

struct StrictMap<A> {
    map: A,
    seen: Seen,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<A> {
    type Error = A::Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut key = None;
        let out = self.map.next_key_seed(Seed {
            seed,
            key: Some(&mut key),
        })?;
        // A key that is not a string (`1:`) is not recorded: string targets
        // refuse it, and a `Value` target checks its own keys.
        match key {
            Some(h) if !self.seen.insert(h) => Err(refuse("duplicate key")),
            _ => Ok(out),
        }
    }
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.map.next_value_seed(Seed { seed, key: None })
    }
    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// Key hashes of one mapping: inline for the usual few keys, hashed beyond
/// (a hostile map of a million keys stays linear).
#[derive(Default)]
struct Seen {
    few: [u64; 16],
    n: usize,
    many: Option<std::collections::HashSet<u64>>,
}

impl Seen {
    /// `false` when `h` was there already.
    fn insert(&mut self, h: u64) -> bool {
        if let Some(m) = &mut self.many {
            return m.insert(h);
        }
        if self.few[..self.n].contains(&h) {
            return false;
        }
        if self.n == self.few.len() {
            let mut m: std::collections::HashSet<u64> = self.few.iter().copied().collect();
            m.insert(h);
            self.many = Some(m);
        } else {
            self.few[self.n] = h;
            self.n += 1;
        }
        true
    }
}

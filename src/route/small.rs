//! A map that keeps its first few entries inline and spills to a heap hash map beyond them.
//!
//! A typical allocation has one or two permissions and channels: a heap hash map each (with its
//! minimum of four buckets and its control bytes) cost more than the allocation's own state. Here the
//! first `N` entries live in the owning struct; the `N + 1`-th insert moves them into a boxed
//! [`HashMap`], so lookups stay O(1) for an allocation with thousands of entries. Inserts (which may
//! spill, and so allocate) happen on the control path only; lookups never allocate.

use core::hash::Hash;

use hashbrown::HashMap;

/// A map with up to `N` entries inline (see the module doc).
#[derive(Debug, Clone)]
pub enum SmallMap<K, V, const N: usize> {
    /// Up to `N` entries, in free slots marked `None`.
    Inline([Option<(K, V)>; N]),
    /// More than `N` entries once (a spilled map stays spilled).
    Spilled(Box<HashMap<K, V>>),
}

impl<K, V, const N: usize> Default for SmallMap<K, V, N> {
    fn default() -> Self {
        SmallMap::Inline([const { None }; N])
    }
}

impl<K: Eq + Hash, V, const N: usize> SmallMap<K, V, N> {
    /// An empty map (nothing on the heap).
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        match self {
            SmallMap::Inline(items) => items
                .iter()
                .flatten()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v),
            SmallMap::Spilled(map) => map.get(key),
        }
    }

    /// The value of `key`, mutably.
    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self {
            SmallMap::Inline(items) => items
                .iter_mut()
                .flatten()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v),
            SmallMap::Spilled(map) => map.get_mut(key),
        }
    }

    /// Whether `key` has a value.
    #[inline]
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// Set `key` to `value`; the previous value, if any. May allocate (the spill): control path only.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(v) = self.get_mut(&key) {
            return Some(core::mem::replace(v, value));
        }
        match self {
            SmallMap::Inline(items) => {
                if let Some(free) = items.iter_mut().find(|e| e.is_none()) {
                    *free = Some((key, value));
                    return None;
                }
                let mut map = HashMap::with_capacity(N + 1);
                map.extend(items.iter_mut().filter_map(Option::take));
                map.insert(key, value);
                *self = SmallMap::Spilled(Box::new(map));
                None
            }
            SmallMap::Spilled(map) => map.insert(key, value),
        }
    }

    /// Remove `key`; its value, if it had one.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            SmallMap::Inline(items) => items
                .iter_mut()
                .find(|e| e.as_ref().is_some_and(|(k, _)| k == key))
                .and_then(Option::take)
                .map(|(_, v)| v),
            SmallMap::Spilled(map) => map.remove(key),
        }
    }

    /// Keep only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        match self {
            SmallMap::Inline(items) => {
                for e in items.iter_mut() {
                    if e.as_mut().is_some_and(|(k, v)| !keep(k, v)) {
                        *e = None;
                    }
                }
            }
            SmallMap::Spilled(map) => map.retain(|k, v| keep(k, v)),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            SmallMap::Inline(items) => items.iter().flatten().count(),
            SmallMap::Spilled(map) => map.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Inline(items) => Iter::Inline(items.iter()),
            SmallMap::Spilled(map) => Iter::Spilled(map.iter()),
        }
    }

    /// Every key, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &K> + '_ {
        self.iter().map(|(k, _)| k)
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }
}

/// Iterator over a [`SmallMap`]'s entries.
#[derive(Debug)]
pub enum Iter<'a, K, V> {
    /// Over the inline slots.
    Inline(core::slice::Iter<'a, Option<(K, V)>>),
    /// Over the spilled map.
    Spilled(hashbrown::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Inline(it) => it.find_map(|e| e.as_ref().map(|(k, v)| (k, v))),
            Iter::Spilled(it) => it.next(),
        }
    }
}

impl<'a, K: Eq + Hash, V, const N: usize> IntoIterator for &'a SmallMap<K, V, N> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// A set with up to `N` members inline.
#[derive(Debug, Clone, Default)]
pub struct SmallSet<T, const N: usize>(SmallMap<T, (), N>);

impl<T: Eq + Hash, const N: usize> SmallSet<T, N> {
    /// An empty set (nothing on the heap).
    pub fn new() -> Self {
        Self(SmallMap::new())
    }

    /// Whether `value` is a member.
    #[inline]
    pub fn contains(&self, value: &T) -> bool {
        self.0.contains_key(value)
    }

    /// Add `value`; true if it was not a member. May allocate (the spill): control path only.
    pub fn insert(&mut self, value: T) -> bool {
        self.0.insert(value, ()).is_none()
    }

    /// Remove `value`; true if it was a member.
    pub fn remove(&mut self, value: &T) -> bool {
        self.0.remove(value).is_some()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every member, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.0.keys()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn spills_past_n_and_keeps_every_entry() {
        let mut m: SmallMap<u32, u32, 2> = SmallMap::new();
        assert!(matches!(m, SmallMap::Inline(_)));
        assert_eq!(m.insert(1, 10), None);
        assert_eq!(m.insert(2, 20), None);
        assert_eq!(m.insert(1, 11), Some(10), "replaces in place");
        assert!(matches!(m, SmallMap::Inline(_)), "two fit inline");
        assert_eq!(m.insert(3, 30), None);
        assert!(matches!(m, SmallMap::Spilled(_)), "the third spills");
        assert_eq!(
            (m.get(&1), m.get(&2), m.get(&3)),
            (Some(&11), Some(&20), Some(&30))
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m.remove(&2), Some(20));
        assert_eq!(m.get(&2), None);
        let mut all: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_unstable();
        assert_eq!(all, vec![(1, 11), (3, 30)]);
    }

    #[test]
    fn inline_slots_are_reused_after_remove() {
        let mut m: SmallMap<u32, (), 1> = SmallMap::new();
        m.insert(1, ());
        assert_eq!(m.remove(&1), Some(()));
        assert!(m.is_empty());
        m.insert(2, ());
        assert!(matches!(m, SmallMap::Inline(_)), "the freed slot took it");
        m.retain(|k, _| *k != 2);
        assert!(m.is_empty());
        let mut s: SmallSet<u8, 1> = SmallSet::new();
        assert!(s.insert(4));
        assert!(!s.insert(4));
        assert!(s.contains(&4));
        assert!(s.remove(&4));
        assert!(!s.contains(&4));
    }
}

//! Keys and members as the native handlers store them: up to [`INLINE`] bytes inside the
//! table slot itself (URL ids, 16-byte members: most keys), longer ones on the heap.
//! Inline, a key costs no allocation of its own, and a lookup compares it without a
//! jump to another cache line. It hashes and compares as its bytes do, so tables are
//! searched with a plain `&[u8]`.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use super::boxed_cost;

/// The longest key kept inline: what fits beside a length byte and the variant's tag in
/// the 24 bytes a boxed slice and its tag take anyway.
pub(crate) const INLINE: usize = 22;

pub(crate) enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Key {
    /// Heap bytes a key of `len` bytes costs beyond its table slot.
    pub(crate) fn heap_cost(len: usize) -> usize {
        if len <= INLINE {
            0
        } else {
            boxed_cost(len)
        }
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        if key.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }
}

impl Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len).min(INLINE)],
            Key::Heap(b) => b,
        }
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self
    }
}

// As `[u8]` hashes and compares, which `Borrow` requires.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn keys_of_every_length_are_found_by_their_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), 24);
        let keys: Vec<Vec<u8>> = (0..40).map(|n| vec![b'k'; n]).collect();
        let map: HashMap<Key, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (Key::from(&k[..]), i))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(&k[..]), Some(&i));
            let stored = map.keys().find(|s| ***s == **k).expect("stored");
            assert_eq!(matches!(stored, Key::Inline { .. }), k.len() <= INLINE);
        }
        assert_eq!(map.get(&b"kk\0"[..]), None);
        assert_eq!(Key::heap_cost(INLINE), 0);
        assert_eq!(Key::heap_cost(INLINE + 1), boxed_cost(INLINE + 1));
    }
}

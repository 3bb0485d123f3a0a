//! RFC 9162 Merkle tree hashing, kept as a frontier: the roots of the perfect subtrees that make
//! up the tree so far, largest first. Appending is O(log n) and the root at any size is at hand.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// `MTH({d})`: SHA-256(0x00 || d).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// One hash per set bit of `size`, from the most significant bit down.
    subtrees: Vec<Hash>,
}

impl Frontier {
    /// Rebuilds a frontier from its parts (a segment header or a tombstone); `None` when the
    /// number of hashes does not match `size`.
    pub fn from_parts(size: u64, subtrees: Vec<Hash>) -> Option<Frontier> {
        (subtrees.len() == size.count_ones() as usize).then_some(Frontier { size, subtrees })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn subtrees(&self) -> &[Hash] {
        &self.subtrees
    }

    pub fn push_leaf(&mut self, data: &[u8]) {
        let mut hash = leaf_hash(data);
        // Merge equal-sized subtrees, as a binary counter carries.
        let mut carried = self.size.trailing_ones();
        while carried > 0 {
            let left = self.subtrees.pop().expect("a subtree per set bit");
            hash = node_hash(&left, &hash);
            carried -= 1;
        }
        self.subtrees.push(hash);
        self.size += 1;
    }

    /// `MTH(D[0:size])`; the empty tree hashes to SHA-256 of nothing.
    pub fn root(&self) -> Hash {
        let mut it = self.subtrees.iter().rev();
        let Some(last) = it.next() else {
            return Sha256::digest([]).into();
        };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9162 §2.1.1, written recursively, as the reference.
    fn mth(leaves: &[Vec<u8>]) -> Hash {
        match leaves.len() {
            0 => Sha256::digest([]).into(),
            1 => leaf_hash(&leaves[0]),
            n => {
                let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    #[test]
    fn frontier_root_matches_the_rfc_definition_at_every_size() {
        let leaves: Vec<Vec<u8>> = (0..70u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), mth(&[]));
        for n in 1..=leaves.len() {
            f.push_leaf(&leaves[n - 1]);
            assert_eq!(f.root(), mth(&leaves[..n]), "size {n}");
            let again = Frontier::from_parts(f.size(), f.subtrees().to_vec()).unwrap();
            assert_eq!(again.root(), f.root());
        }
        assert!(Frontier::from_parts(3, vec![[0; 32]]).is_none());
    }
}

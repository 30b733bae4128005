//! Merkle tree hashing as in RFC 6962 §2.1 / RFC 9162 §2.1: leaves are hashed with a 0x00
//! prefix and interior nodes with 0x01, so a leaf can never be passed off as a node.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly less than `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH over already-hashed leaves.
fn root_of(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root_of(&leaves[..k]), &root_of(&leaves[k..]))
        }
    }
}

/// The Merkle Tree Hash of a list of entries.
pub fn root(entries: &[&[u8]]) -> Hash {
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    root_of(&leaves)
}

/// The audit path for entry `index` (RFC 6962 PATH), leaf side first.
pub fn inclusion_proof(entries: &[&[u8]], index: usize) -> Option<Vec<Hash>> {
    let leaves: Vec<Hash> = entries.iter().map(|e| leaf_hash(e)).collect();
    inclusion_proof_of_leaves(&leaves, index)
}

/// MTH over leaves that are already leaf hashes.
pub fn root_of_leaves(leaves: &[Hash]) -> Hash {
    root_of(leaves)
}

/// The audit path for leaf `index` of a tree whose leaf hashes are given.
pub fn inclusion_proof_of_leaves(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    fn path(leaves: &[Hash], m: usize, out: &mut Vec<Hash>) {
        if leaves.len() <= 1 {
            return;
        }
        let k = split(leaves.len());
        if m < k {
            path(&leaves[..k], m, out);
            out.push(root_of(&leaves[k..]));
        } else {
            path(&leaves[k..], m - k, out);
            out.push(root_of(&leaves[..k]));
        }
    }
    let mut out = Vec::new();
    path(leaves, index, &mut out);
    Some(out)
}

/// Verify an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    entry: &[u8],
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    verify_inclusion_of_leaf(&leaf_hash(entry), index, tree_size, proof, root)
}

/// Verify an inclusion proof for a leaf given by its leaf hash.
pub fn verify_inclusion_of_leaf(
    leaf: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    if index >= tree_size {
        return false;
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// The consistency proof between the tree of the first `m` leaves and the tree of all of them
/// (RFC 6962 §2.1.2 PROOF(m, D[n])).
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m == 0 || m > leaves.len() {
        return None;
    }
    fn sub(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
        let n = leaves.len();
        if m == n {
            if !complete {
                out.push(root_of(leaves));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, &leaves[..k], complete, out);
            out.push(root_of(&leaves[k..]));
        } else {
            sub(m - k, &leaves[k..], false, out);
            out.push(root_of(&leaves[..k]));
        }
    }
    let mut out = Vec::new();
    sub(m, leaves, true, &mut out);
    Some(out)
}

/// Verify that the tree of size `m` with root `first` is a prefix of the tree of size `n` with
/// root `second` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(m: u64, n: u64, first: &Hash, second: &Hash, proof: &[Hash]) -> bool {
    if m == 0 || m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && first == second;
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if m.is_power_of_two() {
        path.insert(0, *first);
    }
    let (mut fn_, mut sn) = (m - 1, n - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &fr == first && &sr == second
}

/// The right edge of a Merkle tree: the roots of the perfect subtrees that cover its leaves,
/// largest first. Appending a leaf and computing the root cost O(log n), and the state is
/// O(log n) hashes, so a replica can track the tree head without keeping every leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.peaks.pop().expect("a peak per set bit of the size");
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.peaks.push(h);
        self.size += 1;
    }

    /// The Merkle Tree Hash of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        match it.next() {
            None => Sha256::digest([]).into(),
            Some(last) => it.fold(*last, |acc, p| node_hash(p, &acc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn empty_and_single_trees_match_the_rfc_definitions() {
        // MTH({}) = SHA-256("")
        assert_eq!(
            hex(&root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // MTH({""}) = SHA-256(0x00)
        assert_eq!(
            hex(&root(&[b""])),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        let two = root(&[b"a", b"b"]);
        assert_eq!(two, node_hash(&leaf_hash(b"a"), &leaf_hash(b"b")));
    }

    #[test]
    fn a_leaf_cannot_pose_as_a_node() {
        let node = node_hash(&leaf_hash(b"a"), &leaf_hash(b"b"));
        let mut forged = vec![0x01];
        forged.extend_from_slice(&leaf_hash(b"a"));
        forged.extend_from_slice(&leaf_hash(b"b"));
        assert_ne!(leaf_hash(&forged[1..]), node);
        assert_ne!(root(&[&forged]), node);
    }

    proptest! {
        #[test]
        fn the_frontier_root_is_the_tree_hash(leaves in proptest::collection::vec(any::<[u8; 32]>(), 0..70)) {
            let mut f = Frontier::default();
            for (i, l) in leaves.iter().enumerate() {
                f.push(*l);
                prop_assert_eq!(f.root(), root_of_leaves(&leaves[..=i]));
            }
            prop_assert_eq!(f.size(), leaves.len() as u64);
        }

        #[test]
        fn consistency_proofs_verify_and_detect_rewritten_history(
            leaves in proptest::collection::vec(any::<[u8; 32]>(), 1..70),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let n = leaves.len();
            let m = 1 + cut.index(n);
            let proof = consistency_proof(&leaves, m).unwrap();
            let (old, new) = (root_of_leaves(&leaves[..m]), root_of_leaves(&leaves));
            prop_assert!(verify_consistency(m as u64, n as u64, &old, &new, &proof));
            // A tree whose first m leaves were changed is not consistent with the old head.
            let mut forked = leaves.clone();
            let j = flip.index(m);
            forked[j][0] ^= 1;
            prop_assert!(!verify_consistency(m as u64, n as u64, &old, &root_of_leaves(&forked), &proof));
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let k = flip.index(bad.len());
                bad[k][31] ^= 1;
                prop_assert!(!verify_consistency(m as u64, n as u64, &old, &new, &bad));
            }
        }

        #[test]
        fn every_proof_verifies_and_any_change_breaks_it(
            entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..8), 1..40),
            pick in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<&[u8]> = entries.iter().map(Vec::as_slice).collect();
            let r = root(&refs);
            let n = refs.len() as u64;
            let i = pick.index(refs.len());
            let proof = inclusion_proof(&refs, i).unwrap();
            prop_assert!(verify_inclusion(refs[i], i as u64, n, &proof, &r));
            // A different entry, index, size or proof does not verify.
            let mut other = refs[i].to_vec();
            other.push(0);
            prop_assert!(!verify_inclusion(&other, i as u64, n, &proof, &r));
            if n > 1 {
                prop_assert!(!verify_inclusion(refs[i], (i as u64 + 1) % n, n, &proof, &r) || refs[i] == refs[((i as u64 + 1) % n) as usize]);
            }
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let j = flip.index(bad.len());
                bad[j][0] ^= 1;
                prop_assert!(!verify_inclusion(refs[i], i as u64, n, &bad, &r));
            }
        }
    }
}

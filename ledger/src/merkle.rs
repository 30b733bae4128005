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
    path(&leaves, index, &mut out);
    Some(out)
}

/// Verify an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(entry: &[u8], index: u64, tree_size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= tree_size {
        return false;
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = leaf_hash(entry);
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
        assert_eq!(hex(&root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        // MTH({""}) = SHA-256(0x00)
        assert_eq!(hex(&root(&[b""])), "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
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

//! Fhirmament on the ledger: what an entry says about FHIR (`entry`), the ledger-derived
//! state every replica keeps beside its records (`BlockInfo`, `RecordRef`), receipts that
//! prove a version against quorum signatures (`receipt`), and starting the embedded replica
//! (`replica`).

pub mod entry;
pub mod peer;
pub mod receipt;
pub mod replica;
pub mod views;

use ledger::core::message::{decode_signed_list, encode_signed_list};
use ledger::core::{Digest, Seq, Signed};

/// What a replica keeps about each executed block, enough to build receipts for its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    pub timestamp: u64,
    pub prev_root: Digest,
    pub root: Digest,
    pub entries: Vec<Vec<u8>>,
    /// 2f+1 signed commits for the block (empty when it was replayed after a crash or
    /// learned by state transfer; a stable checkpoint then proves it).
    pub certificate: Vec<Signed>,
}

/// Readers for the length-prefixed big-endian records this crate stores.
pub(crate) fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

pub(crate) fn take_u32(b: &mut &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(take(b, 4)?.try_into().ok()?))
}

pub(crate) fn take_u64(b: &mut &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(take(b, 8)?.try_into().ok()?))
}

fn take_32(b: &mut &[u8]) -> Option<[u8; 32]> {
    take(b, 32)?.try_into().ok()
}

impl BlockInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&self.timestamp.to_be_bytes());
        v.extend_from_slice(&self.prev_root);
        v.extend_from_slice(&self.root);
        v.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for e in &self.entries {
            v.extend_from_slice(&(e.len() as u32).to_be_bytes());
            v.extend_from_slice(e);
        }
        v.extend_from_slice(&encode_signed_list(&self.certificate));
        v
    }

    pub fn decode(mut b: &[u8]) -> Option<BlockInfo> {
        let b = &mut b;
        let timestamp = take_u64(b)?;
        let prev_root = take_32(b)?;
        let root = take_32(b)?;
        let n = take_u32(b)? as usize;
        let mut entries = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let len = take_u32(b)? as usize;
            entries.push(take(b, len)?.to_vec());
        }
        let certificate = decode_signed_list(b).ok()?;
        Some(BlockInfo {
            timestamp,
            prev_root,
            root,
            entries,
            certificate,
        })
    }
}

/// Where a resource version sits on the ledger and what it committed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    pub seq: Seq,
    pub entry: u32,
    pub record: u32,
    pub holder: u32,
    pub deleted: bool,
    pub commitment: Option<[u8; 32]>,
}

impl RecordRef {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(54);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.entry.to_be_bytes());
        v.extend_from_slice(&self.record.to_be_bytes());
        v.extend_from_slice(&self.holder.to_be_bytes());
        v.push(self.deleted as u8);
        if let Some(c) = &self.commitment {
            v.extend_from_slice(c);
        }
        v
    }

    pub fn decode(mut b: &[u8]) -> Option<RecordRef> {
        let b = &mut b;
        let seq = take_u64(b)?;
        let entry = take_u32(b)?;
        let record = take_u32(b)?;
        let holder = take_u32(b)?;
        let deleted = *take(b, 1)?.first()? != 0;
        let commitment = if b.is_empty() {
            None
        } else {
            Some(take_32(b)?)
        };
        Some(RecordRef {
            seq,
            entry,
            record,
            holder,
            deleted,
            commitment,
        })
    }
}

/// The ledger's view of a resource: its latest version and who holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerHead {
    pub version: u64,
    pub deleted: bool,
    pub holder: u32,
}

impl LedgerHead {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.version.to_be_bytes().to_vec();
        v.push(self.deleted as u8);
        v.extend_from_slice(&self.holder.to_be_bytes());
        v
    }
    pub fn decode(mut b: &[u8]) -> Option<LedgerHead> {
        let b = &mut b;
        Some(LedgerHead {
            version: take_u64(b)?,
            deleted: *take(b, 1)?.first()? != 0,
            holder: take_u32(b)?,
        })
    }
}

/// A stable checkpoint: 2f+1 replicas signed that the ledger's root after `seq` is `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StableCheckpoint {
    pub seq: Seq,
    pub root: Digest,
    pub proof: Vec<Signed>,
}

impl StableCheckpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.seq.to_be_bytes().to_vec();
        v.extend_from_slice(&self.root);
        v.extend_from_slice(&encode_signed_list(&self.proof));
        v
    }
    pub fn decode(mut b: &[u8]) -> Option<StableCheckpoint> {
        let b = &mut b;
        let seq = take_u64(b)?;
        let root = take_32(b)?;
        let proof = decode_signed_list(b).ok()?;
        Some(StableCheckpoint { seq, root, proof })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::core::{test_key, Membership, Payload};

    #[test]
    fn ledger_state_records_round_trip() {
        let key = test_key(1, 0);
        let m = Membership::new("c", vec![key.verifying_key()]);
        let commit = m.sign(
            &key,
            0,
            Payload::Commit {
                view: 0,
                seq: 3,
                digest: [4; 32],
            },
        );
        let b = BlockInfo {
            timestamp: 9,
            prev_root: [1; 32],
            root: [2; 32],
            entries: vec![b"one".to_vec(), vec![], b"three".to_vec()],
            certificate: vec![commit.clone()],
        };
        assert_eq!(BlockInfo::decode(&b.encode()), Some(b));
        for c in [None, Some([5u8; 32])] {
            let r = RecordRef {
                seq: 7,
                entry: 2,
                record: 1,
                holder: 3,
                deleted: c.is_none(),
                commitment: c,
            };
            assert_eq!(RecordRef::decode(&r.encode()), Some(r));
        }
        let h = LedgerHead {
            version: 4,
            deleted: true,
            holder: 1,
        };
        assert_eq!(LedgerHead::decode(&h.encode()), Some(h));
        let s = StableCheckpoint {
            seq: 16,
            root: [6; 32],
            proof: vec![commit],
        };
        assert_eq!(StableCheckpoint::decode(&s.encode()), Some(s));
        assert_eq!(BlockInfo::decode(&[1, 2, 3]), None);
    }
}

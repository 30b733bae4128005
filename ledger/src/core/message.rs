//! PBFT messages (Castro & Liskov), their canonical encoding, and Ed25519 signatures over it.
//!
//! Every signature covers `DOMAIN || chain id || membership hash || encoding(payload)`, so a
//! message signed for one chain, membership or message type never verifies as another.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::merkle;

pub type ReplicaId = u32;
pub type View = u64;
pub type Seq = u64;
pub type Digest = [u8; 32];

const DOMAIN: &[u8] = b"fhirmament-ledger/pbft/v1";

/// An ordered batch of opaque entries, proposed by the primary with its timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub timestamp: u64,
    pub entries: Vec<Vec<u8>>,
}

impl Batch {
    /// The batch a new primary proposes for a sequence number nobody prepared.
    pub fn null() -> Batch {
        Batch {
            timestamp: 0,
            entries: vec![],
        }
    }

    pub fn merkle_root(&self) -> Digest {
        let refs: Vec<&[u8]> = self.entries.iter().map(Vec::as_slice).collect();
        merkle::root(&refs)
    }

    pub fn digest(&self) -> Digest {
        batch_digest(
            self.timestamp,
            self.entries.len() as u64,
            &self.merkle_root(),
        )
    }
}

/// A batch's digest from its header alone, so a verifier holding one entry and its Merkle
/// inclusion proof can recompute what the replicas signed.
pub fn batch_digest(timestamp: u64, entries: u64, merkle_root: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update(b"batch");
    h.update(timestamp.to_be_bytes());
    h.update(entries.to_be_bytes());
    h.update(merkle_root);
    h.finalize().into()
}

/// The leaf a block adds to the ledger's Merkle log: it names the state root before it (so
/// blocks are hash-chained), its sequence number, and its batch (whose digest carries the
/// batch's own Merkle root of entries). The state root after a block is the RFC 6962 tree head
/// over all block leaves so far, so a block (and, through its batch root, an entry) has a
/// logarithmic inclusion proof against any later checkpoint, and two checkpoints have a
/// consistency proof.
pub fn block_leaf(prev_root: &Digest, seq: Seq, batch: &Batch) -> Digest {
    block_leaf_of_digest(prev_root, seq, &batch.digest())
}

/// `block_leaf` from the batch digest alone (for verifiers).
pub fn block_leaf_of_digest(prev_root: &Digest, seq: Seq, batch_digest: &Digest) -> Digest {
    let mut bytes = Vec::with_capacity(5 + 32 + 8 + 32);
    bytes.extend_from_slice(b"block");
    bytes.extend_from_slice(prev_root);
    bytes.extend_from_slice(&seq.to_be_bytes());
    bytes.extend_from_slice(batch_digest);
    merkle::leaf_hash(&bytes)
}

/// A prepared certificate: a pre-prepare and 2f matching prepares from other replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub pre_prepare: Signed,
    pub prepares: Vec<Signed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A request forwarded to the primary by a backup.
    Forward {
        entries: Vec<Vec<u8>>,
    },
    PrePrepare {
        view: View,
        seq: Seq,
        digest: Digest,
        batch: Batch,
    },
    Prepare {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Commit {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Checkpoint {
        seq: Seq,
        root: Digest,
    },
    /// The sender's progress timer ran out in `view`: it suspects that view's primary, but keeps
    /// voting in it. Not binding: a replica commits to a VIEW-CHANGE only once f+1 replicas
    /// suspect the view (so at least one correct one does), and then everyone will.
    Suspect {
        view: View,
    },
    /// The first frame on a peer connection (transport, never given to the core): the sender
    /// opens a session with replica `to`, started at `session` (ms since the epoch, strictly
    /// increasing per sender). A receiver accepts each session once, and only while fresh.
    Hello {
        to: ReplicaId,
        session: u64,
    },
    /// Sent when moving to `view`: the sender's stable checkpoint (with its 2f+1 proof) and
    /// its prepared certificates above it.
    ViewChange {
        view: View,
        stable_seq: Seq,
        stable_root: Digest,
        proof: Vec<Signed>,
        prepared: Vec<Prepared>,
    },
    /// The new primary's 2f+1 view changes and the pre-prepares they imply.
    NewView {
        view: View,
        view_changes: Vec<Signed>,
        pre_prepares: Vec<Signed>,
    },
    /// State transfer: blocks (from_seq, to_seq] please.
    BlockRequest {
        from_seq: Seq,
        to_seq: Seq,
    },
    Blocks {
        first_seq: Seq,
        batches: Vec<Batch>,
    },
    /// Periodic: the sender's view and how far it has executed, so peers ahead can help.
    Status {
        view: View,
        last_executed: Seq,
    },
}

impl Payload {
    pub fn kind(&self) -> &'static str {
        match self {
            Payload::Forward { .. } => "forward",
            Payload::PrePrepare { .. } => "pre-prepare",
            Payload::Prepare { .. } => "prepare",
            Payload::Commit { .. } => "commit",
            Payload::Checkpoint { .. } => "checkpoint",
            Payload::ViewChange { .. } => "view-change",
            Payload::NewView { .. } => "new-view",
            Payload::BlockRequest { .. } => "block-request",
            Payload::Blocks { .. } => "blocks",
            Payload::Status { .. } => "status",
            Payload::Suspect { .. } => "suspect",
            Payload::Hello { .. } => "hello",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub from: ReplicaId,
    pub payload: Payload,
    pub signature: [u8; 64],
}

// ---- canonical encoding ----

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn batch(&mut self, b: &Batch) {
        self.u64(b.timestamp);
        self.u64(b.entries.len() as u64);
        for e in &b.entries {
            self.bytes(e);
        }
    }
    fn signed(&mut self, s: &Signed) {
        self.u64(s.from as u64);
        self.payload(&s.payload);
        self.0.extend_from_slice(&s.signature);
    }
    fn signed_list(&mut self, list: &[Signed]) {
        self.u64(list.len() as u64);
        list.iter().for_each(|s| self.signed(s));
    }
    fn payload(&mut self, p: &Payload) {
        match p {
            Payload::Forward { entries } => {
                self.u8(1);
                self.u64(entries.len() as u64);
                entries.iter().for_each(|e| self.bytes(e));
            }
            Payload::PrePrepare {
                view,
                seq,
                digest,
                batch,
            } => {
                self.u8(2);
                self.u64(*view);
                self.u64(*seq);
                self.0.extend_from_slice(digest);
                self.batch(batch);
            }
            Payload::Prepare { view, seq, digest } => {
                self.u8(3);
                self.u64(*view);
                self.u64(*seq);
                self.0.extend_from_slice(digest);
            }
            Payload::Commit { view, seq, digest } => {
                self.u8(4);
                self.u64(*view);
                self.u64(*seq);
                self.0.extend_from_slice(digest);
            }
            Payload::Checkpoint { seq, root } => {
                self.u8(5);
                self.u64(*seq);
                self.0.extend_from_slice(root);
            }
            Payload::ViewChange {
                view,
                stable_seq,
                stable_root,
                proof,
                prepared,
            } => {
                self.u8(6);
                self.u64(*view);
                self.u64(*stable_seq);
                self.0.extend_from_slice(stable_root);
                self.signed_list(proof);
                self.u64(prepared.len() as u64);
                for p in prepared {
                    self.signed(&p.pre_prepare);
                    self.signed_list(&p.prepares);
                }
            }
            Payload::NewView {
                view,
                view_changes,
                pre_prepares,
            } => {
                self.u8(7);
                self.u64(*view);
                self.signed_list(view_changes);
                self.signed_list(pre_prepares);
            }
            Payload::BlockRequest { from_seq, to_seq } => {
                self.u8(8);
                self.u64(*from_seq);
                self.u64(*to_seq);
            }
            Payload::Blocks { first_seq, batches } => {
                self.u8(9);
                self.u64(*first_seq);
                self.u64(batches.len() as u64);
                batches.iter().for_each(|b| self.batch(b));
            }
            Payload::Status {
                view,
                last_executed,
            } => {
                self.u8(10);
                self.u64(*view);
                self.u64(*last_executed);
            }
            Payload::Suspect { view } => {
                self.u8(11);
                self.u64(*view);
            }
            Payload::Hello { to, session } => {
                self.u8(12);
                self.u64(u64::from(*to));
                self.u64(*session);
            }
        }
    }
}

/// Why bytes did not decode as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("a length of {0} exceeds what the message can hold")]
    TooLong(u64),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn digest(&mut self) -> Result<Digest, DecodeError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    /// A count of items each at least `min_size` bytes: refuse counts the input cannot hold,
    /// so a hostile length never makes us allocate.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u64()?;
        if n > (self.0.len() / min_size.max(1)) as u64 {
            return Err(DecodeError::TooLong(n));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.count(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn batch(&mut self) -> Result<Batch, DecodeError> {
        let timestamp = self.u64()?;
        let n = self.count(8)?;
        let entries = (0..n).map(|_| self.bytes()).collect::<Result<_, _>>()?;
        Ok(Batch { timestamp, entries })
    }
    fn signed(&mut self) -> Result<Signed, DecodeError> {
        let from = self.u64()?;
        if from > u32::MAX as u64 {
            return Err(DecodeError::TooLong(from));
        }
        let payload = self.payload()?;
        let signature = self.take(64)?.try_into().expect("64 bytes");
        Ok(Signed {
            from: from as u32,
            payload,
            signature,
        })
    }
    fn signed_list(&mut self) -> Result<Vec<Signed>, DecodeError> {
        let n = self.count(8 + 1 + 64)?;
        (0..n).map(|_| self.signed()).collect()
    }
    fn payload(&mut self) -> Result<Payload, DecodeError> {
        Ok(match self.u8()? {
            1 => {
                let n = self.count(8)?;
                Payload::Forward {
                    entries: (0..n).map(|_| self.bytes()).collect::<Result<_, _>>()?,
                }
            }
            2 => Payload::PrePrepare {
                view: self.u64()?,
                seq: self.u64()?,
                digest: self.digest()?,
                batch: self.batch()?,
            },
            3 => Payload::Prepare {
                view: self.u64()?,
                seq: self.u64()?,
                digest: self.digest()?,
            },
            4 => Payload::Commit {
                view: self.u64()?,
                seq: self.u64()?,
                digest: self.digest()?,
            },
            5 => Payload::Checkpoint {
                seq: self.u64()?,
                root: self.digest()?,
            },
            6 => {
                let view = self.u64()?;
                let stable_seq = self.u64()?;
                let stable_root = self.digest()?;
                let proof = self.signed_list()?;
                let n = self.count(2 * (8 + 1 + 64))?;
                let prepared = (0..n)
                    .map(|_| {
                        Ok(Prepared {
                            pre_prepare: self.signed()?,
                            prepares: self.signed_list()?,
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                Payload::ViewChange {
                    view,
                    stable_seq,
                    stable_root,
                    proof,
                    prepared,
                }
            }
            7 => Payload::NewView {
                view: self.u64()?,
                view_changes: self.signed_list()?,
                pre_prepares: self.signed_list()?,
            },
            8 => Payload::BlockRequest {
                from_seq: self.u64()?,
                to_seq: self.u64()?,
            },
            9 => {
                let first_seq = self.u64()?;
                let n = self.count(16)?;
                Payload::Blocks {
                    first_seq,
                    batches: (0..n).map(|_| self.batch()).collect::<Result<_, _>>()?,
                }
            }
            10 => Payload::Status {
                view: self.u64()?,
                last_executed: self.u64()?,
            },
            11 => Payload::Suspect { view: self.u64()? },
            12 => Payload::Hello {
                to: {
                    let to = self.u64()?;
                    ReplicaId::try_from(to).map_err(|_| DecodeError::TooLong(to))?
                },
                session: self.u64()?,
            },
            t => return Err(DecodeError::UnknownTag(t)),
        })
    }
}

/// Decode exactly one value: trailing bytes are an error.
fn decode_whole<'a, T>(
    bytes: &'a [u8],
    f: impl FnOnce(&mut Dec<'a>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let mut d = Dec(bytes);
    let v = f(&mut d)?;
    if !d.0.is_empty() {
        return Err(DecodeError::Trailing(d.0.len()));
    }
    Ok(v)
}

/// The canonical bytes of a signed message (what travels and what is stored).
pub fn encode_signed(s: &Signed) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.signed(s);
    e.0
}

pub fn decode_signed(bytes: &[u8]) -> Result<Signed, DecodeError> {
    decode_whole(bytes, |d| d.signed())
}

/// A list of signed messages (a certificate or checkpoint proof), as messages embed them.
pub fn encode_signed_list(list: &[Signed]) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.signed_list(list);
    e.0
}

pub fn decode_signed_list(bytes: &[u8]) -> Result<Vec<Signed>, DecodeError> {
    decode_whole(bytes, |d| d.signed_list())
}

pub fn encode_batch(b: &Batch) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.batch(b);
    e.0
}

pub fn decode_batch(bytes: &[u8]) -> Result<Batch, DecodeError> {
    decode_whole(bytes, |d| d.batch())
}

pub fn encode_payload(p: &Payload) -> Vec<u8> {
    let mut e = Enc(Vec::new());
    e.payload(p);
    e.0
}

/// Size of a signed message on the wire (its canonical encoding).
pub fn encoded_len(s: &Signed) -> usize {
    let mut e = Enc(Vec::new());
    e.signed(s);
    e.0.len()
}

/// Who may sign, and for which chain: the domain every signature is bound to.
#[derive(Debug, Clone)]
pub struct Membership {
    pub chain_id: String,
    pub keys: Vec<VerifyingKey>,
    hash: Digest,
}

impl Membership {
    pub fn new(chain_id: impl Into<String>, keys: Vec<VerifyingKey>) -> Membership {
        let chain_id = chain_id.into();
        let mut h = Sha256::new();
        h.update(b"membership");
        h.update(chain_id.as_bytes());
        for k in &keys {
            h.update(k.as_bytes());
        }
        Membership {
            chain_id,
            keys,
            hash: h.finalize().into(),
        }
    }

    pub fn n(&self) -> usize {
        self.keys.len()
    }

    pub fn hash(&self) -> Digest {
        self.hash
    }

    fn signing_bytes(&self, from: ReplicaId, payload: &Payload) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(128));
        e.bytes(DOMAIN);
        e.bytes(self.chain_id.as_bytes());
        e.0.extend_from_slice(&self.hash);
        e.u64(from as u64);
        e.payload(payload);
        e.0
    }

    pub fn sign(&self, key: &SigningKey, from: ReplicaId, payload: Payload) -> Signed {
        let signature = key.sign(&self.signing_bytes(from, &payload)).to_bytes();
        Signed {
            from,
            payload,
            signature,
        }
    }

    /// Is this signed by the member it names?
    pub fn verify(&self, s: &Signed) -> bool {
        let Some(key) = self.keys.get(s.from as usize) else {
            return false;
        };
        key.verify(
            &self.signing_bytes(s.from, &s.payload),
            &Signature::from_bytes(&s.signature),
        )
        .is_ok()
    }

    /// Verify many signatures at once (ed25519 batch verification); true only if all verify.
    pub fn verify_all(&self, list: &[Signed]) -> bool {
        if list.iter().any(|s| s.from as usize >= self.keys.len()) {
            return false;
        }
        if list.len() < 4 {
            return list.iter().all(|s| self.verify(s));
        }
        let messages: Vec<Vec<u8>> = list
            .iter()
            .map(|s| self.signing_bytes(s.from, &s.payload))
            .collect();
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let sigs: Vec<Signature> = list
            .iter()
            .map(|s| Signature::from_bytes(&s.signature))
            .collect();
        let keys: Vec<VerifyingKey> = list.iter().map(|s| self.keys[s.from as usize]).collect();
        ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok()
    }
}

/// A deterministic key for tests and simulations (never for production keys).
pub fn test_key(seed: u64, id: ReplicaId) -> SigningKey {
    let mut h = Sha256::new();
    h.update(b"test-key");
    h.update(seed.to_be_bytes());
    h.update(id.to_be_bytes());
    SigningKey::from_bytes(&h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(chain: &str) -> (Membership, Vec<SigningKey>) {
        let keys: Vec<SigningKey> = (0..4).map(|i| test_key(1, i)).collect();
        (
            Membership::new(chain, keys.iter().map(|k| k.verifying_key()).collect()),
            keys,
        )
    }

    #[test]
    fn signatures_bind_sender_chain_and_content() {
        let (m, keys) = membership("chain-a");
        let p = Payload::Prepare {
            view: 1,
            seq: 2,
            digest: [7; 32],
        };
        let s = m.sign(&keys[1], 1, p.clone());
        assert!(m.verify(&s));
        // Another sender id, another payload, another chain: no.
        assert!(!m.verify(&Signed {
            from: 2,
            ..s.clone()
        }));
        assert!(!m.verify(&Signed {
            payload: Payload::Commit {
                view: 1,
                seq: 2,
                digest: [7; 32]
            },
            ..s.clone()
        }));
        let (other_chain, _) = membership("chain-b");
        assert!(!other_chain.verify(&s));
        // Not a member.
        assert!(!m.verify(&Signed {
            from: 9,
            ..s.clone()
        }));
        // Batch verification agrees, and fails on one bad signature.
        let many: Vec<Signed> = (0..4)
            .map(|i| m.sign(&keys[i], i as u32, p.clone()))
            .collect();
        assert!(m.verify_all(&many));
        let mut bad = many.clone();
        bad[2].signature[0] ^= 1;
        assert!(!m.verify_all(&bad));
    }

    fn sample_messages() -> Vec<Signed> {
        let (m, keys) = membership("c");
        let batch = Batch {
            timestamp: 9,
            entries: vec![b"a".to_vec(), vec![], b"ccc".to_vec()],
        };
        let pp = m.sign(
            &keys[0],
            0,
            Payload::PrePrepare {
                view: 1,
                seq: 2,
                digest: batch.digest(),
                batch: batch.clone(),
            },
        );
        let prep = m.sign(
            &keys[1],
            1,
            Payload::Prepare {
                view: 1,
                seq: 2,
                digest: batch.digest(),
            },
        );
        let cp = m.sign(
            &keys[2],
            2,
            Payload::Checkpoint {
                seq: 4,
                root: [3; 32],
            },
        );
        let vc = m.sign(
            &keys[3],
            3,
            Payload::ViewChange {
                view: 2,
                stable_seq: 4,
                stable_root: [3; 32],
                proof: vec![cp.clone()],
                prepared: vec![Prepared {
                    pre_prepare: pp.clone(),
                    prepares: vec![prep.clone()],
                }],
            },
        );
        vec![
            m.sign(
                &keys[1],
                1,
                Payload::Forward {
                    entries: vec![b"x".to_vec()],
                },
            ),
            pp.clone(),
            prep,
            m.sign(
                &keys[1],
                1,
                Payload::Commit {
                    view: 1,
                    seq: 2,
                    digest: [1; 32],
                },
            ),
            cp,
            vc.clone(),
            m.sign(
                &keys[2],
                2,
                Payload::NewView {
                    view: 2,
                    view_changes: vec![vc],
                    pre_prepares: vec![pp],
                },
            ),
            m.sign(
                &keys[1],
                1,
                Payload::BlockRequest {
                    from_seq: 1,
                    to_seq: 8,
                },
            ),
            m.sign(
                &keys[1],
                1,
                Payload::Blocks {
                    first_seq: 2,
                    batches: vec![batch.clone(), Batch::null()],
                },
            ),
            m.sign(
                &keys[1],
                1,
                Payload::Status {
                    view: 3,
                    last_executed: 77,
                },
            ),
            m.sign(&keys[2], 2, Payload::Suspect { view: 4 }),
            m.sign(
                &keys[3],
                3,
                Payload::Hello {
                    to: 1,
                    session: 1_700_000_000_000,
                },
            ),
        ]
    }

    #[test]
    fn every_message_kind_round_trips_and_still_verifies() {
        let (m, _) = membership("c");
        for s in sample_messages() {
            let bytes = encode_signed(&s);
            assert_eq!(bytes.len(), encoded_len(&s));
            let list = vec![s.clone(), s.clone()];
            assert_eq!(
                decode_signed_list(&encode_signed_list(&list)).unwrap(),
                list
            );
            let back = decode_signed(&bytes).unwrap();
            assert_eq!(back, s);
            assert!(m.verify(&back), "{}", s.payload.kind());
        }
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics_or_huge_allocations() {
        for s in sample_messages() {
            let bytes = encode_signed(&s);
            for cut in 0..bytes.len() {
                assert!(decode_signed(&bytes[..cut]).is_err());
            }
            let mut extra = bytes.clone();
            extra.push(0);
            assert_eq!(decode_signed(&extra), Err(DecodeError::Trailing(1)));
        }
        // A Forward claiming 2^60 entries.
        let mut evil = vec![0u8; 8];
        evil.push(1);
        evil.extend_from_slice(&(1u64 << 60).to_be_bytes());
        assert!(matches!(decode_signed(&evil), Err(DecodeError::TooLong(_))));
        assert_eq!(
            decode_signed(&[0, 0, 0, 0, 0, 0, 0, 0, 42]),
            Err(DecodeError::UnknownTag(42))
        );
    }

    #[test]
    fn batch_digests_and_the_chain_depend_on_everything() {
        let a = Batch {
            timestamp: 5,
            entries: vec![b"x".to_vec(), b"y".to_vec()],
        };
        let mut b = a.clone();
        b.entries.swap(0, 1);
        assert_ne!(a.digest(), b.digest());
        assert_ne!(
            a.digest(),
            Batch {
                timestamp: 6,
                ..a.clone()
            }
            .digest()
        );
        assert_ne!(block_leaf(&[0; 32], 1, &a), block_leaf(&[0; 32], 2, &a));
        assert_ne!(block_leaf(&[0; 32], 1, &a), block_leaf(&[1; 32], 1, &a));
    }
}

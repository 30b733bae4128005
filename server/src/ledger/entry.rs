//! What Fhirmament writes on the ledger: one `LedgerEntry` per atomic submission, one
//! `VersionRecord` per resource version it creates. The ledger itself orders opaque bytes; this
//! is the only place that gives them a FHIR meaning.
//!
//! A version's commitment is `SHA-256("fhirmament/commitment/v1" 0x00 || salt || canonical)`,
//! where `salt` is 32 random bytes kept off-chain with the version and `canonical` is the
//! version's JSON with object keys sorted, no insignificant whitespace, strings escaped as
//! serde_json does and numbers exactly as the client wrote them. Without the salt, a guess
//! at a small templated resource cannot be checked against the ledger.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// The format every replica decodes; an entry that does not parse is ignored by all of them.
pub const ENTRY_FORMAT: u32 = 1;
const COMMITMENT_DOMAIN: &[u8] = b"fhirmament/commitment/v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerEntry {
    pub format: u32,
    /// Unique per submission (so two identical deletes are two entries).
    pub tx: String,
    /// The replica (organization) whose node accepted the write and holds the bytes.
    pub holder: u32,
    /// The acting client and user, as authenticated (`client-id user`).
    pub client: String,
    /// When the accepting node evaluated the submission (FHIR instant).
    pub at: String,
    pub records: Vec<VersionRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    #[serde(rename = "type")]
    pub rtype: String,
    pub id: String,
    pub version: u64,
    pub deleted: bool,
    /// Hex salted commitment to the version's canonical JSON; absent for a deletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<String>,
    /// The patient compartments the version belongs to (`Patient/<id>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
    /// For a Consent version in force: its policy, which every replica applies at this
    /// entry's ledger position (see `consent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<crate::consent::ConsentPolicy>,
}

impl LedgerEntry {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a ledger entry serializes")
    }

    /// `None` for bytes that are not a ledger entry of a known format.
    pub fn decode(bytes: &[u8]) -> Option<LedgerEntry> {
        serde_json::from_slice::<LedgerEntry>(bytes)
            .ok()
            .filter(|e| e.format == ENTRY_FORMAT)
    }
}

const ENTRY_DOMAIN: &[u8] = b"fhirmament/entry/v1\0";

fn entry_message(chain_id: &str, json: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ENTRY_DOMAIN.len() + chain_id.len() + 1 + json.len());
    m.extend_from_slice(ENTRY_DOMAIN);
    m.extend_from_slice(chain_id.as_bytes());
    m.push(0);
    m.extend_from_slice(json);
    m
}

/// The bytes submitted to the ledger: the holder's Ed25519 signature (64 bytes) over the
/// chain id and the entry's JSON, then the JSON. Every replica checks the signature against
/// the genesis key of the replica the entry names as holder, so no organization can write
/// records in another's name.
pub fn seal(entry: &LedgerEntry, chain_id: &str, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    use ed25519_dalek::Signer;
    let json = entry.encode();
    let sig = key.sign(&entry_message(chain_id, &json));
    let mut out = sig.to_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// The entry in sealed ledger bytes, if it decodes and its holder signed it.
pub fn open_sealed(bytes: &[u8], members: &ledger::core::Membership) -> Option<LedgerEntry> {
    use ed25519_dalek::Verifier;
    let (sig, json) = (bytes.get(..64)?, bytes.get(64..)?);
    let entry = LedgerEntry::decode(json)?;
    let key = members.keys.get(entry.holder as usize)?;
    let sig = ed25519_dalek::Signature::from_slice(sig).ok()?;
    key.verify(&entry_message(&members.chain_id, json), &sig)
        .ok()?;
    Some(entry)
}

/// `open_sealed` for a block's entries at once: the signatures are checked together (Ed25519
/// batch verification), and one by one only when the batch fails, to find the bad ones.
/// Entries for which `trusted(i)` holds (sealed by this node) are decoded without a check.
pub fn open_sealed_all(
    entries: &[Vec<u8>],
    members: &ledger::core::Membership,
    trusted: impl Fn(usize) -> bool,
) -> Vec<Option<LedgerEntry>> {
    let mut out: Vec<Option<LedgerEntry>> = Vec::with_capacity(entries.len());
    let mut checks: Vec<(
        usize,
        Vec<u8>,
        ed25519_dalek::Signature,
        ed25519_dalek::VerifyingKey,
    )> = Vec::new();
    for (i, bytes) in entries.iter().enumerate() {
        let (Some(sig), Some(json)) = (bytes.get(..64), bytes.get(64..)) else {
            out.push(None);
            continue;
        };
        let entry = LedgerEntry::decode(json);
        if !trusted(i) {
            let key = entry
                .as_ref()
                .and_then(|e| members.keys.get(e.holder as usize));
            let sig = ed25519_dalek::Signature::from_slice(sig).ok();
            match (key, sig) {
                (Some(k), Some(s)) => {
                    checks.push((i, entry_message(&members.chain_id, json), s, *k))
                }
                _ => {
                    out.push(None);
                    continue;
                }
            }
        }
        out.push(entry);
    }
    if checks.is_empty() {
        return out;
    }
    let messages: Vec<&[u8]> = checks.iter().map(|c| c.1.as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = checks.iter().map(|c| c.2).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = checks.iter().map(|c| c.3).collect();
    if ed25519_dalek::verify_batch(&messages, &sigs, &keys).is_err() {
        use ed25519_dalek::Verifier;
        for (i, m, s, k) in &checks {
            if k.verify(m, s).is_err() {
                out[*i] = None;
            }
        }
    }
    out
}

/// The canonical form of a JSON value (see the module documentation).
pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<(&String, &Value)> = m.iter().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("a string serializes");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect("a scalar serializes"),
    }
}

pub fn commitment_of_canonical(salt: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(COMMITMENT_DOMAIN);
    h.update(salt);
    h.update(canonical);
    h.finalize().into()
}

/// The commitment to a stored version's JSON bytes.
pub fn commitment_of_stored(salt: &[u8; 32], body: &[u8]) -> Result<[u8; 32]> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Error::Internal(format!("stored JSON does not parse: {e}")))?;
    Ok(commitment_of_canonical(salt, &canonical_json(&v)))
}

pub fn new_salt() -> Result<[u8; 32]> {
    let mut salt = [0u8; 32];
    getrandom::fill(&mut salt)
        .map_err(|e| Error::Internal(format!("no randomness for a salt: {e}")))?;
    Ok(salt)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lower- or upper-case hex; None for odd lengths or other characters.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    unhex(s)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_form_ignores_key_order_and_whitespace_but_keeps_number_text() {
        let a: Value =
            serde_json::from_str(r#"{"b": 1.50, "a": ["x", {"d": true, "c": null}]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":["x",{"c":null,"d":true}],"b":1.50}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":["x",{"c":null,"d":true}],"b":1.50}"#
        );
        let c: Value =
            serde_json::from_str(r#"{"b": 1.5, "a": ["x", {"d": true, "c": null}]}"#).unwrap();
        assert_ne!(
            canonical_json(&a),
            canonical_json(&c),
            "1.50 is not 1.5 in FHIR"
        );
    }

    #[test]
    fn commitments_depend_on_salt_and_every_byte() {
        let body = br#"{"resourceType":"Patient","id":"a","gender":"female"}"#;
        let s1 = [1u8; 32];
        let s2 = [2u8; 32];
        let c1 = commitment_of_stored(&s1, body).unwrap();
        assert_ne!(c1, commitment_of_stored(&s2, body).unwrap());
        let other = br#"{"resourceType":"Patient","id":"a","gender":"male"}"#;
        assert_ne!(c1, commitment_of_stored(&s1, other).unwrap());
        let reordered = br#"{"id":"a","gender":"female","resourceType":"Patient"}"#;
        assert_eq!(c1, commitment_of_stored(&s1, reordered).unwrap());
    }

    #[test]
    fn entries_round_trip_and_foreign_bytes_do_not_decode() {
        let e = LedgerEntry {
            format: ENTRY_FORMAT,
            tx: "t".into(),
            holder: 2,
            client: "anonymous".into(),
            at: "2026-01-01T00:00:00Z".into(),
            records: vec![VersionRecord {
                rtype: "Patient".into(),
                id: "p".into(),
                version: 1,
                deleted: false,
                commitment: Some(hex(&[7u8; 32])),
                patients: vec!["Patient/p".into()],
                consent: None,
            }],
        };
        assert_eq!(LedgerEntry::decode(&e.encode()), Some(e.clone()));
        assert_eq!(LedgerEntry::decode(b"garbage"), None);
        let mut other = e.clone();
        other.format = 99;
        assert_eq!(LedgerEntry::decode(&other.encode()), None);

        let k0 = ledger::core::test_key(3, 0);
        let k1 = ledger::core::test_key(3, 1);
        let m =
            ledger::core::Membership::new("chain", vec![k0.verifying_key(), k1.verifying_key()]);
        let mut by1 = e.clone();
        by1.holder = 1;
        assert_eq!(
            open_sealed(&seal(&by1, "chain", &k1), &m),
            Some(by1.clone())
        );
        // Signed by replica 0 in replica 1's name, for another chain, or altered: refused.
        assert_eq!(open_sealed(&seal(&by1, "chain", &k0), &m), None);
        assert_eq!(open_sealed(&seal(&by1, "other", &k1), &m), None);
        let mut sealed = seal(&by1, "chain", &k1);
        let last = sealed.len() - 3;
        sealed[last] ^= 1;
        assert_eq!(open_sealed(&sealed, &m), None);
        // In a batch, only the forged one is refused; a trusted one is not checked.
        let good = seal(&by1, "chain", &k1);
        let forged = seal(&by1, "chain", &k0);
        let all = open_sealed_all(
            &[good.clone(), forged.clone(), good, b"x".to_vec()],
            &m,
            |_| false,
        );
        assert_eq!(all, vec![Some(by1.clone()), None, Some(by1.clone()), None]);
        let trusted = open_sealed_all(&[forged], &m, |_| true);
        assert_eq!(trusted, vec![Some(by1)]);
    }
}

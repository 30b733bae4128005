//! Receipts: a FHIR `Parameters` resource that proves one resource version against the
//! consortium's signatures, checkable offline with nothing but the genesis public keys.
//!
//! The chain of evidence, each link recomputed by `verify`:
//! resource + salt → commitment named in the ledger entry (signed by its holder) → the entry's
//! RFC 6962 inclusion proof → the batch root → the batch digest → 2f+1 signed COMMITs for that
//! digest at that sequence number, and/or → the block's leaf (chained to the previous root) →
//! its inclusion proof in the ledger tree → a root 2f+1 replicas signed in a CHECKPOINT.

use base64::Engine as _;
use ledger::core::message::{
    batch_digest, block_leaf_of_digest, decode_signed_list, encode_signed_list,
};
use ledger::core::{Membership, Payload, Signed};
use ledger::merkle;
use serde_json::{json, Value};

use super::entry::{self, canonical_json, commitment_of_canonical, hex, unhex32};
use crate::error::{Error, Result};
use crate::fhir::ResourceType;
use crate::store::Store;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn hex_list(hashes: &[[u8; 32]]) -> String {
    hashes.iter().map(|h| hex(h)).collect::<Vec<_>>().join(",")
}

fn param(name: &str, kind: &str, value: Value) -> Value {
    let mut p = json!({ "name": name });
    p[kind] = value;
    p
}

/// The receipt for a stored version (`$verify`): the ledger evidence, and whether the bytes
/// this node stores still match it. Tampered bytes are reported, never included.
pub fn build(
    store: &Store,
    chain_id: &str,
    rtype: ResourceType,
    id: &str,
    version: u64,
) -> Result<Value> {
    let rec = store.ledger_record(rtype, id, version)?.ok_or_else(|| {
        Error::NotFound(format!(
            "{rtype}/{id}/_history/{version} has no ledger record"
        ))
    })?;
    let block = store
        .ledger_block(rec.seq)?
        .ok_or_else(|| Error::Storage(format!("ledger block {} is missing", rec.seq)))?;
    let entry = block.entries.get(rec.entry as usize).ok_or_else(|| {
        Error::Storage(format!(
            "ledger block {} lacks entry {}",
            rec.seq, rec.entry
        ))
    })?;
    let refs: Vec<&[u8]> = block.entries.iter().map(Vec::as_slice).collect();
    let entry_proof = merkle::inclusion_proof(&refs, rec.entry as usize).unwrap_or_default();
    let mut params = vec![
        param("chain", "valueString", json!(chain_id)),
        param("sequence", "valueString", json!(rec.seq.to_string())),
        param("entry", "valueBase64Binary", json!(B64.encode(entry))),
        param("entryIndex", "valueUnsignedInt", json!(rec.entry)),
        param("recordIndex", "valueUnsignedInt", json!(rec.record)),
        param("batchSize", "valueUnsignedInt", json!(block.entries.len())),
        param(
            "batchTimestamp",
            "valueString",
            json!(block.timestamp.to_string()),
        ),
        param("batchRoot", "valueString", json!(hex(&merkle::root(&refs)))),
        param("prevRoot", "valueString", json!(hex(&block.prev_root))),
    ];
    if !entry_proof.is_empty() {
        params.push(param(
            "entryProof",
            "valueString",
            json!(hex_list(&entry_proof)),
        ));
    }
    if !block.certificate.is_empty() {
        params.push(param(
            "commitCertificate",
            "valueBase64Binary",
            json!(B64.encode(encode_signed_list(&block.certificate))),
        ));
    }
    if let Some(cp) = store.stable_checkpoint()?.filter(|cp| cp.seq >= rec.seq) {
        let leaves = store.ledger_leaves(cp.seq)?;
        let proof = merkle::inclusion_proof_of_leaves(&leaves, rec.seq as usize - 1)
            .ok_or_else(|| Error::Storage("ledger leaves are incomplete".into()))?;
        let mut parts = vec![
            param("sequence", "valueString", json!(cp.seq.to_string())),
            param("root", "valueString", json!(hex(&cp.root))),
            param(
                "proof",
                "valueBase64Binary",
                json!(B64.encode(encode_signed_list(&cp.proof))),
            ),
        ];
        if !proof.is_empty() {
            parts.push(param("blockProof", "valueString", json!(hex_list(&proof))));
        }
        params.push(json!({ "name": "checkpoint", "part": parts }));
    }
    let mut result = true;
    let stored = match store.version_unchecked(rtype, id, version) {
        Ok(v) => v,
        Err(Error::Integrity(why)) => {
            result = false;
            params.push(param(
                "issue",
                "valueString",
                json!(format!(
                    "the bytes this node stores do not match the ledger commitment ({why})"
                )),
            ));
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(v) = stored {
        match store.commitment_mismatch(&v)? {
            Some(why) => {
                result = false;
                tracing::error!(
                    target: "fhirmament::integrity",
                    resource = %format!("{rtype}/{id}/_history/{version}"),
                    "ALERT: $verify found stored bytes that do not match the ledger: {why}"
                );
                params.push(param(
                    "issue",
                    "valueString",
                    json!(format!(
                        "the bytes this node stores do not match the ledger commitment ({why})"
                    )),
                ));
            }
            None if !v.deleted => {
                if let Some(salt) = store.salt(rtype, id, version)? {
                    params.push(param("salt", "valueBase64Binary", json!(B64.encode(salt))));
                }
                let resource: Value =
                    serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?;
                params.push(json!({ "name": "resource", "resource": resource }));
            }
            None => {}
        }
    } else if rec.commitment.is_some() && result {
        params.push(param(
            "issue",
            "valueString",
            json!("this node does not hold the version's bytes; ask its holder"),
        ));
    }
    params.insert(0, param("result", "valueBoolean", json!(result)));
    Ok(json!({ "resourceType": "Parameters", "parameter": params }))
}

/// One link of the chain, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

struct Parts<'a>(&'a [Value]);

impl<'a> Parts<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.iter().find(|p| p["name"] == name)
    }
    fn string(&self, name: &str) -> Option<&'a str> {
        let p = self.get(name)?;
        p.get("valueString")
            .or_else(|| p.get("valueBase64Binary"))?
            .as_str()
    }
    fn u64(&self, name: &str) -> Option<u64> {
        let p = self.get(name)?;
        match p.get("valueUnsignedInt") {
            Some(v) => v.as_u64(),
            None => self.string(name)?.parse().ok(),
        }
    }
    fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        B64.decode(self.string(name)?).ok()
    }
    fn hash(&self, name: &str) -> Option<[u8; 32]> {
        unhex32(self.string(name)?)
    }
    fn hashes(&self, name: &str) -> Option<Vec<[u8; 32]>> {
        match self.string(name) {
            None => Some(vec![]),
            Some(s) => s.split(',').map(unhex32).collect(),
        }
    }
}

fn quorum(members: &Membership) -> usize {
    2 * ((members.n() - 1) / 3) + 1
}

/// 2f+1 distinct members signed payloads that `matches` accepts.
fn quorum_signed(
    members: &Membership,
    list: &[Signed],
    matches: impl Fn(&Payload) -> bool,
) -> Result<(), String> {
    let mut from: Vec<u32> = list.iter().map(|s| s.from).collect();
    from.sort_unstable();
    from.dedup();
    if from.len() != list.len() {
        return Err("a replica signed twice".into());
    }
    if list.len() < quorum(members) {
        return Err(format!(
            "{} signatures, {} needed",
            list.len(),
            quorum(members)
        ));
    }
    if !list.iter().all(|s| matches(&s.payload)) {
        return Err("a signed message is about something else".into());
    }
    if !members.verify_all(list) {
        return Err("a signature does not verify against the genesis keys".into());
    }
    Ok(())
}

/// Check a receipt with only the genesis membership. Every link is reported; the receipt
/// holds when all pass and at least one quorum (commits or checkpoint) vouches for the block.
pub fn verify(receipt: &Value, members: &Membership) -> Vec<Check> {
    let mut out = Vec::new();
    let Some(list) = receipt["parameter"]
        .as_array()
        .filter(|_| receipt["resourceType"] == "Parameters")
    else {
        return vec![check("format", false, "not a Parameters resource")];
    };
    let p = Parts(list);
    let chain_ok = p.string("chain") == Some(members.chain_id.as_str());
    out.push(check(
        "chain",
        chain_ok,
        format!(
            "receipt for chain {:?}, genesis is {:?}",
            p.string("chain").unwrap_or(""),
            members.chain_id
        ),
    ));
    let (
        Some(seq),
        Some(entry_bytes),
        Some(index),
        Some(size),
        Some(ts),
        Some(batch_root),
        Some(prev_root),
        Some(entry_proof),
        Some(record_index),
    ) = (
        p.u64("sequence"),
        p.bytes("entry"),
        p.u64("entryIndex"),
        p.u64("batchSize"),
        p.u64("batchTimestamp"),
        p.hash("batchRoot"),
        p.hash("prevRoot"),
        p.hashes("entryProof"),
        p.u64("recordIndex"),
    )
    else {
        out.push(check(
            "format",
            false,
            "a required part is missing or malformed",
        ));
        return out;
    };
    // The entry, signed by the organization that holds the record.
    let entry = entry::open_sealed(&entry_bytes, members);
    out.push(check(
        "entry",
        entry.is_some(),
        "the ledger entry decodes and its holder's signature verifies",
    ));
    let record = entry
        .as_ref()
        .and_then(|e| e.records.get(record_index as usize).cloned());
    // The entry is in the batch.
    let included = merkle::verify_inclusion(&entry_bytes, index, size, &entry_proof, &batch_root);
    out.push(check(
        "inclusion",
        included,
        format!("entry {index} of {size} is in the batch root"),
    ));
    let digest = batch_digest(ts, size, &batch_root);
    // A quorum vouches for the batch: commits at its sequence number...
    let mut vouched = false;
    if let Some(cert) = p.bytes("commitCertificate") {
        let r = decode_signed_list(&cert).map_err(|e| e.to_string()).and_then(|cert| {
            let view = cert.first().and_then(|c| match c.payload {
                Payload::Commit { view, .. } => Some(view),
                _ => None,
            });
            quorum_signed(members, &cert, |pl| {
                matches!(pl, Payload::Commit { view: v, seq: s, digest: d } if Some(*v) == view && *s == seq && *d == digest)
            })
        });
        vouched |= r.is_ok();
        out.push(check(
            "commits",
            r.is_ok(),
            r.err()
                .unwrap_or_else(|| format!("2f+1 replicas committed block {seq}")),
        ));
    }
    // ...or a stable checkpoint whose tree contains the block.
    if let Some(cp) = p.get("checkpoint").and_then(|c| c["part"].as_array()) {
        let cp = Parts(cp);
        let r = (|| -> Result<u64, String> {
            let cp_seq = cp.u64("sequence").ok_or("checkpoint sequence")?;
            let cp_root = cp.hash("root").ok_or("checkpoint root")?;
            let proof = decode_signed_list(&cp.bytes("proof").ok_or("checkpoint proof")?)
                .map_err(|e| e.to_string())?;
            let block_proof = cp.hashes("blockProof").ok_or("block proof")?;
            if seq == 0 || seq > cp_seq {
                return Err("the checkpoint precedes the block".into());
            }
            let leaf = block_leaf_of_digest(&prev_root, seq, &digest);
            if !merkle::verify_inclusion_of_leaf(&leaf, seq - 1, cp_seq, &block_proof, &cp_root) {
                return Err("the block is not in the checkpointed tree".into());
            }
            quorum_signed(
                members,
                &proof,
                |pl| matches!(pl, Payload::Checkpoint { seq: s, root } if *s == cp_seq && *root == cp_root),
            )?;
            Ok(cp_seq)
        })();
        vouched |= r.is_ok();
        out.push(check(
            "checkpoint",
            r.is_ok(),
            match r {
                Ok(s) => {
                    format!("block {seq} is in the tree 2f+1 replicas signed at checkpoint {s}")
                }
                Err(e) => e,
            },
        ));
    }
    out.push(check(
        "quorum",
        vouched,
        "a 2f+1 quorum of the genesis replicas vouches for the block",
    ));
    // The resource matches the record's commitment.
    if let Some(res) = p.get("resource").map(|r| &r["resource"]) {
        let ok = (|| {
            let rec = record.as_ref()?;
            let salt: [u8; 32] = p.bytes("salt")?.try_into().ok()?;
            let same = res["resourceType"] == rec.rtype.as_str()
                && res["id"] == rec.id.as_str()
                && res["meta"]["versionId"] == rec.version.to_string().as_str();
            let c = commitment_of_canonical(&salt, &canonical_json(res));
            Some(same && rec.commitment.as_deref() == Some(hex(&c).as_str()))
        })()
        .unwrap_or(false);
        out.push(check(
            "resource",
            ok,
            "the resource and salt reproduce the committed version",
        ));
    }
    if p.get("issue").is_some()
        || p.get("result").and_then(|r| r["valueBoolean"].as_bool()) == Some(false)
    {
        out.push(check(
            "stored",
            false,
            p.string("issue")
                .unwrap_or("the server reported a mismatch")
                .to_string(),
        ));
    }
    out
}

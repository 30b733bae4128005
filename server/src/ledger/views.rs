//! Read-only views of the ledger as this replica applied it: the head (`GET [base]/_ledger`)
//! and one block with its decoded entries (`GET [base]/_ledger/blocks/{seq}`).

use ledger::core::Payload;
use serde_json::{json, Value};

use super::entry::{hex, open_sealed};
use crate::error::{Error, Result};
use crate::Service;

fn signers(list: &[ledger::core::Signed]) -> Value {
    json!(list.iter().map(|s| s.from).collect::<Vec<_>>())
}

pub fn head(svc: &Service) -> Result<Value> {
    let (seq, root) = svc.store.applied()?;
    let members = &svc.replica.membership;
    let mut v = json!({
        "chain": members.chain_id,
        "replica": svc.replica.id,
        "replicas": members.n(),
        "faultsTolerated": (members.n() - 1) / 3,
        "appliedSequence": seq,
        "root": hex(&root),
    });
    // What this replica caught its peers doing (bad signatures, equivocation, replayed
    // sessions…), since it started.
    v["faultsObserved"] = json!(svc
        .health
        .node
        .faults()
        .into_iter()
        .map(|(replica, kind, count)| json!({
            "replica": replica,
            "kind": format!("{kind:?}"),
            "count": count,
        }))
        .collect::<Vec<_>>());
    if let Some(cp) = svc.store.stable_checkpoint()? {
        v["stableCheckpoint"] = json!({
            "sequence": cp.seq,
            "root": hex(&cp.root),
            "signers": signers(&cp.proof),
        });
    }
    Ok(v)
}

pub fn block(svc: &Service, seq: u64) -> Result<Value> {
    let b = svc
        .store
        .ledger_block(seq)?
        .ok_or_else(|| Error::NotFound(format!("ledger block {seq} is not applied here")))?;
    let entries: Vec<Value> = b
        .entries
        .iter()
        .map(|e| match open_sealed(e, &svc.replica.membership) {
            Some(entry) => serde_json::to_value(entry).unwrap_or(Value::Null),
            None => json!({"undecodable": true}),
        })
        .collect();
    let view = b.certificate.iter().find_map(|c| match c.payload {
        Payload::Commit { view, .. } => Some(view),
        _ => None,
    });
    Ok(json!({
        "sequence": seq,
        "timestamp": b.timestamp,
        "prevRoot": hex(&b.prev_root),
        "root": hex(&b.root),
        "view": view,
        "commitSigners": signers(&b.certificate),
        "entries": entries,
    }))
}

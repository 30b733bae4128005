//! Liveness and readiness, as the ledger sees them (for Kubernetes probes and operators).
//!
//! - live: the commit thread and the ledger replica's driver both ran within `STALL_MS`.
//! - ready: live, the replica is in an active view (not changing views), and no write has
//!   waited for the ledger longer than `STALL_MS`: this node can take writes now.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use ledger::node::NodeStatus;
use serde_json::{json, Value};

use crate::fhir::now_ms;

const STALL_MS: i64 = 10_000;

#[derive(Debug)]
pub struct Health {
    pub node: Arc<NodeStatus>,
    /// Wall-clock ms of the commit thread's last loop.
    pub commit_heartbeat_ms: AtomicI64,
    /// When the oldest write still waiting for the ledger was submitted (0: none waiting).
    pub oldest_waiting_ms: AtomicI64,
    /// The KEK in use, and the one an online rotation is moving away from.
    pub kek: std::sync::Mutex<(String, Option<String>)>,
}

impl Health {
    pub fn new(node: Arc<NodeStatus>) -> Health {
        Health {
            node,
            commit_heartbeat_ms: AtomicI64::new(now_ms()),
            oldest_waiting_ms: AtomicI64::new(0),
            kek: Default::default(),
        }
    }

    /// (live, ready, details).
    pub fn report(&self) -> (bool, bool, Value) {
        let now = now_ms();
        let commit_age = now - self.commit_heartbeat_ms.load(Ordering::Relaxed);
        let replica_age = now - self.node.heartbeat_ms.load(Ordering::Relaxed) as i64;
        let oldest = self.oldest_waiting_ms.load(Ordering::Relaxed);
        let waiting_ms = if oldest == 0 { 0 } else { now - oldest };
        let view_active = self.node.view_active.load(Ordering::Relaxed);
        let live = commit_age < STALL_MS && replica_age < STALL_MS;
        let (kek, rotating_from) = self.kek.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let ready = live && view_active && waiting_ms < STALL_MS;
        (
            live,
            ready,
            json!({
                "live": live,
                "ready": ready,
                "view": self.node.view.load(Ordering::Relaxed),
                "viewActive": view_active,
                "lastExecuted": self.node.last_executed.load(Ordering::Relaxed),
                "oldestWriteWaitingMs": waiting_ms,
                "commitThreadAgeMs": commit_age,
                "replicaAgeMs": replica_age,
                "kek": {"kid": kek, "rotatingFrom": rotating_from},
            }),
        )
    }
}

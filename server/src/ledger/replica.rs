//! Which replica of which consortium this server is, and starting it inside the process.
//!
//! With no genesis configured the node is a consortium of one: on first start it writes a
//! genesis and an Ed25519 key under `<data-dir>/ledger/` (n = 1 commits on its own). A
//! consortium member is given `--genesis`, `--replica-id` and `--ledger-key`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ledger::core::{Membership, Seq};
use ledger::node::genesis::{read_key, Genesis};
use ledger::node::{Embedded, Event, NodeConfig};

use crate::config::Config;
use crate::error::{Error, Result};

/// How long a primary with peers gathers entries before cutting a block.
const BATCH_DELAY_MS: u64 = 20;
/// With peers, how long an idle primary waits after proposing a block before the next, per
/// 1000 entries of that block (at most `BATCH_DELAY_MS`): 0.5 ms per entry. A block costs
/// each replica a fixed amount of CPU whatever it carries (2n signature checks, synced
/// writes, messages), so under load larger blocks save CPU; but the wait also bounds how
/// often blocks go out. Ramps on 4 replicas sharing 2 cores (most creates/s within p99 100
/// ms): 1 ms per entry 1,686/s, its blocks full but the cores a third idle at 16-64 clients;
/// 0.5 ms 1,677-2,152/s; 0.25 ms 1,805/s; none 1,562/s, the cores busy with small blocks.
const SPACING_PER_1000_ENTRIES_MS: u64 = 500;

pub struct ReplicaSetup {
    pub genesis: Genesis,
    pub membership: Membership,
    pub id: u32,
    pub key: SigningKey,
    /// The replica's own RocksDB (consensus log and blocks).
    pub dir: PathBuf,
    /// Where to accept peer connections instead of the genesis address.
    pub peer_listen: Option<String>,
}

fn startup(msg: String) -> Error {
    Error::Startup(msg)
}

impl ReplicaSetup {
    pub fn resolve(config: &Config) -> Result<ReplicaSetup> {
        let ledger_dir = config.data_dir.join("ledger");
        let (genesis, id, key) = match &config.genesis {
            None => return ReplicaSetup::single(&ledger_dir),
            Some(path) => {
                let g = Genesis::load(path).map_err(|e| startup(e.to_string()))?;
                let id = config
                    .replica_id
                    .ok_or_else(|| startup("--replica-id is required with --genesis".into()))?;
                let key_path = config
                    .ledger_key
                    .as_ref()
                    .ok_or_else(|| startup("--ledger-key is required with --genesis".into()))?;
                let key = read_key(key_path).map_err(|e| startup(e.to_string()))?;
                (g, id, key)
            }
        };
        let mut setup = ReplicaSetup::new(genesis, id, key, &ledger_dir)?;
        setup.peer_listen = config.peer_listen.clone();
        Ok(setup)
    }

    /// A consortium of one under `ledger_dir`, created on first use.
    pub fn single(ledger_dir: &Path) -> Result<ReplicaSetup> {
        let path = ledger_dir.join("genesis.json");
        if !path.exists() {
            let chain = format!("fhirmament-local-{}", uuid::Uuid::new_v4());
            Genesis::generate(&chain, 1, 0, ledger_dir).map_err(|e| startup(e.to_string()))?;
        }
        let g = Genesis::load(&path).map_err(|e| startup(e.to_string()))?;
        let key =
            read_key(&ledger_dir.join("replica-0.key")).map_err(|e| startup(e.to_string()))?;
        ReplicaSetup::new(g, 0, key, ledger_dir)
    }

    fn new(genesis: Genesis, id: u32, key: SigningKey, ledger_dir: &Path) -> Result<ReplicaSetup> {
        let membership = genesis.membership().map_err(startup)?;
        let mine = membership.keys.get(id as usize).ok_or_else(|| {
            startup(format!(
                "replica id {id} is not in the genesis ({} replicas)",
                membership.n()
            ))
        })?;
        if *mine != key.verifying_key() {
            return Err(startup(format!(
                "the ledger key does not belong to replica {id} of the genesis"
            )));
        }
        Ok(ReplicaSetup {
            genesis,
            membership,
            id,
            key,
            dir: ledger_dir.join(format!("replica-{id}")),
            peer_listen: None,
        })
    }

    /// Start the replica; blocks after `applied` are replayed, then executions follow.
    pub fn start(
        &self,
        applied: Seq,
        on_event: impl FnMut(Event) + Send + 'static,
    ) -> Result<Embedded> {
        let consensus = ledger::node::consensus(500, 512);
        ledger::node::embed(
            NodeConfig {
                id: self.id,
                listen: self.peer_listen.clone(),
                genesis: self.genesis.clone(),
                key: self.key.clone(),
                data_dir: self.dir.clone(),
                consensus: if self.membership.n() > 1 {
                    // With peers, every block costs each replica about 2n signature checks:
                    // let the primary gather entries while it is busy. Alone, a block costs
                    // nothing to agree on.
                    ledger::core::Config {
                        batch_delay: BATCH_DELAY_MS,
                        spacing_per_1000_entries: SPACING_PER_1000_ENTRIES_MS,
                        ..consensus
                    }
                } else {
                    consensus
                },
                // Timers only (batch deadline, retransmission, view change): inputs wake the
                // driver at once, and an idle primary proposes without waiting for a tick.
                tick: Duration::from_millis(5),
            },
            applied,
            on_event,
        )
        .map_err(|e| startup(format!("ledger replica: {e}")))
    }
}

//! A deterministic simulator of a PBFT cluster: seeded virtual time and network, injected
//! faults, and safety invariants checked after every event. The same seed gives the same run.
//!
//! Faults: message drop, duplication, reordering and delay; symmetric and asymmetric
//! partitions; a slow replica; crashes at any point of a step (the rest of the step, including
//! unsent messages, is lost) and restarts from persisted records; and one Byzantine replica
//! (equivocating primary, double votes, wrong digests, forged and replayed messages, view-change
//! floods, silence).

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest as _, Sha256};

use crate::core::{
    test_key, Action, Batch, Config, Digest, FaultKind, Membership, Payload, Record, Replica,
    ReplicaId, Seq, Signed, View,
};

/// SplitMix64: small, seedable, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Byzantine {
    /// As primary, sends different batches for the same (view, seq) to different replicas.
    Equivocate,
    /// Sends a second, conflicting prepare/commit to some replicas.
    DoubleVote,
    /// Pre-prepares whose digest does not match their batch.
    WrongDigest,
    /// Injects messages with forged senders and signatures, and replays old messages.
    ForgeAndReplay,
    /// Floods view changes for ever higher views.
    ViewChangeFlood,
    /// Floods checkpoints for far-future sequence numbers with made-up roots.
    CheckpointFlood,
    /// Sends nothing at all (a primary that stops proposing, when it is the primary).
    Silent,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub n: usize,
    pub seed: u64,
    /// Virtual milliseconds with faults, then a healing phase of the same length.
    pub fault_ms: u64,
    pub requests: usize,
    pub drop_per_mille: u64,
    pub dup_per_mille: u64,
    pub max_delay_ms: u64,
    pub crash_per_mille: u64,
    pub partition_per_mille: u64,
    pub byzantine: Option<(ReplicaId, Byzantine)>,
    pub slow: Option<ReplicaId>,
    /// A link that loses everything sent over it (from, to) while faults last.
    pub cut: Option<(ReplicaId, ReplicaId)>,
    pub config: Config,
}

impl Scenario {
    /// A scenario whose faults are chosen by the seed.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut r = Rng::new(seed ^ 0x5EED);
        let byzantine = match r.below(9) {
            0 => Some(Byzantine::Equivocate),
            1 => Some(Byzantine::DoubleVote),
            2 => Some(Byzantine::WrongDigest),
            3 => Some(Byzantine::ForgeAndReplay),
            4 => Some(Byzantine::ViewChangeFlood),
            5 => Some(Byzantine::Silent),
            6 => Some(Byzantine::CheckpointFlood),
            _ => None,
        };
        let config = Config {
            checkpoint_interval: 4,
            window: 16,
            pipeline: 4,
            max_batch_entries: 4,
            batch_delay: 2,
            // Three seeds in four space proposals out (0.5 to 1.5 ticks per entry), as the
            // server's replicas do.
            spacing_per_1000_entries: (seed & 3) * 500,
            view_change_timeout: 150,
            retransmit_interval: 40,
            ..Config::default()
        };
        Scenario {
            n: 4,
            seed,
            fault_ms: 1500 + r.below(1500),
            requests: 20 + r.below(40) as usize,
            drop_per_mille: r.below(80),
            dup_per_mille: r.below(50),
            max_delay_ms: 1 + r.below(30),
            crash_per_mille: if byzantine.is_none() { r.below(3) } else { 0 },
            partition_per_mille: r.below(3),
            byzantine: byzantine.map(|b| (r.below(4) as ReplicaId, b)),
            slow: if r.chance(300) {
                Some(r.below(4) as ReplicaId)
            } else {
                None
            },
            cut: None,
            config,
        }
    }
}

struct Node {
    replica: Option<Replica>,
    /// Records that were made durable.
    disk: Vec<Record>,
    /// Records written but not yet synced: peers' messages taken in by steps that acted on
    /// nothing (as the shell writes them). The next step that acts syncs them; a crash keeps
    /// only a prefix of them.
    unsynced: Vec<Record>,
    /// Executed (seq, root) as this node saw them, across restarts.
    executed: BTreeMap<Seq, Digest>,
    down_until: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: u64,
    order: u64,
    to: ReplicaId,
    from: ReplicaId,
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub trace_hash: Digest,
    pub committed: Seq,
    pub views: View,
    /// Each replica's view at the end, and whether it was active (not changing views).
    pub final_views: Vec<(View, bool)>,
    pub faults_reported: BTreeMap<FaultKind, usize>,
    pub max_log_len: usize,
    pub messages: u64,
    /// What each replica persisted, for checks after the run.
    pub records: Vec<Vec<Record>>,
    pub membership: Membership,
}

pub struct Sim {
    sc: Scenario,
    rng: Rng,
    now: u64,
    members: Membership,
    keys: Vec<ed25519_dalek::SigningKey>,
    nodes: Vec<Node>,
    queue: BTreeMap<InFlight, Signed>,
    order: u64,
    /// Side A of a partition (messages between sides are dropped), until a time; `one_way`
    /// drops only A -> B.
    partition: Option<(BTreeSet<ReplicaId>, u64, bool)>,
    /// The agreed root at each sequence number, from the first correct replica to execute it.
    agreed: BTreeMap<Seq, Digest>,
    /// Every vote a correct replica ever signed: (replica, kind, view, seq) -> digest.
    votes: BTreeMap<(ReplicaId, u8, View, Seq), Digest>,
    submitted: Vec<Vec<u8>>,
    /// Entries some correct replica executed.
    done: BTreeSet<Vec<u8>>,
    trace: Sha256,
    faults: BTreeMap<FaultKind, usize>,
    max_log_len: usize,
    messages: u64,
    old_messages: Vec<Signed>,
    /// LEDGER_SIM_TRACE=1: print the network's load every 250 virtual ms.
    trace_progress: bool,
}

fn violation(seed: u64, what: String) -> String {
    format!("seed {seed}: {what}\nreplay: LEDGER_SIM_SEED={seed} cargo test -p ledger --test simulation replay_one_seed -- --nocapture")
}

impl Sim {
    pub fn new(sc: Scenario) -> Sim {
        let keys: Vec<_> = (0..sc.n as u32).map(|i| test_key(sc.seed, i)).collect();
        let members = Membership::new(
            format!("sim-{}", sc.seed),
            keys.iter().map(|k| k.verifying_key()).collect(),
        );
        let nodes = (0..sc.n as u32)
            .map(|i| Node {
                replica: Some(Replica::new(
                    i,
                    sc.config.clone(),
                    keys[i as usize].clone(),
                    members.clone(),
                )),
                disk: vec![],
                unsynced: vec![],
                executed: BTreeMap::new(),
                down_until: 0,
            })
            .collect();
        Sim {
            rng: Rng::new(sc.seed),
            sc,
            now: 0,
            members,
            keys,
            nodes,
            queue: BTreeMap::new(),
            order: 0,
            partition: None,
            agreed: BTreeMap::new(),
            votes: BTreeMap::new(),
            submitted: vec![],
            done: BTreeSet::new(),
            trace: Sha256::new(),
            faults: BTreeMap::new(),
            max_log_len: 0,
            messages: 0,
            old_messages: vec![],
            trace_progress: std::env::var_os("LEDGER_SIM_TRACE").is_some(),
        }
    }

    fn is_byzantine(&self, id: ReplicaId) -> bool {
        self.sc.byzantine.is_some_and(|(b, _)| b == id)
    }

    fn send(&mut self, from: ReplicaId, to: ReplicaId, m: Signed, faulty_network: bool) {
        if from == to {
            return;
        }
        if faulty_network {
            if self.sc.cut == Some((from, to)) {
                return;
            }
            if let Some((side, until, one_way)) = &self.partition {
                if self.now < *until
                    && (side.contains(&from) != side.contains(&to))
                    && (!*one_way || side.contains(&from))
                {
                    return;
                }
            }
            if self.rng.chance(self.sc.drop_per_mille) {
                return;
            }
        }
        let copies = if faulty_network && self.rng.chance(self.sc.dup_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = 1 + if faulty_network {
                self.rng.below(self.sc.max_delay_ms)
            } else {
                self.rng.below(3)
            };
            if self.sc.slow == Some(to) || self.sc.slow == Some(from) {
                delay += 20;
            }
            self.order += 1;
            self.queue.insert(
                InFlight {
                    at: self.now + delay,
                    order: self.order,
                    to,
                    from,
                },
                m.clone(),
            );
        }
    }

    /// Carry out a node's step; with a crash, stop part way and lose the rest.
    fn run_step(
        &mut self,
        id: ReplicaId,
        actions: Vec<Action>,
        faults: Vec<crate::core::Fault>,
        faulty: bool,
    ) -> Result<(), String> {
        for f in faults {
            *self.faults.entry(f.kind).or_default() += 1;
        }
        let crash_at =
            if faulty && !self.is_byzantine(id) && self.rng.chance(self.sc.crash_per_mille) {
                Some(self.rng.below(actions.len() as u64 + 1) as usize)
            } else {
                None
            };
        let acts = Action::any_acts(&actions);
        if acts {
            let node = &mut self.nodes[id as usize];
            let synced = std::mem::take(&mut node.unsynced);
            node.disk.extend(synced);
        }
        for (i, action) in actions.into_iter().enumerate() {
            if crash_at == Some(i) {
                return self.crash(id);
            }
            match action {
                Action::Persist(r) if acts => self.nodes[id as usize].disk.push(r),
                Action::Persist(r) => self.nodes[id as usize].unsynced.push(r),
                Action::Broadcast(m) => {
                    self.record_vote(id, &m)?;
                    for to in 0..self.sc.n as u32 {
                        let out = self.byzantine_rewrite(id, to, m.clone());
                        for o in out {
                            self.send(id, to, o, faulty);
                        }
                    }
                }
                Action::Send { to, message } => {
                    self.record_vote(id, &message)?;
                    for o in self.byzantine_rewrite(id, to, message) {
                        self.send(id, to, o, faulty);
                    }
                }
                Action::Execute {
                    seq, root, batch, ..
                } => {
                    if !self.is_byzantine(id) {
                        self.done.extend(batch.entries.iter().cloned());
                    }
                    self.executed(id, seq, root, &batch)?
                }
                Action::ServeBlocks {
                    to,
                    from_seq,
                    to_seq,
                } => {
                    let batches: Vec<Batch> = self.nodes[id as usize]
                        .disk
                        .iter()
                        .filter_map(|r| match r {
                            Record::Block { seq, batch, .. }
                                if *seq > from_seq && *seq <= to_seq =>
                            {
                                Some(batch.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    if let Some(rep) = &self.nodes[id as usize].replica {
                        let mut m = rep.sign(Payload::Blocks {
                            first_seq: from_seq + 1,
                            batches,
                        });
                        if self.sc.byzantine == Some((id, Byzantine::ForgeAndReplay)) {
                            // A Byzantine peer serves corrupted blocks.
                            if let Payload::Blocks { batches, .. } = &mut m.payload {
                                if let Some(b) = batches.first_mut() {
                                    b.entries.push(b"corrupt".to_vec());
                                }
                            }
                            m = self.members.sign(&self.keys[id as usize], id, m.payload);
                        }
                        self.send(id, to, m, faulty);
                    }
                }
            }
        }
        if crash_at.is_some() {
            return self.crash(id);
        }
        Ok(())
    }

    fn crash(&mut self, id: ReplicaId) -> Result<(), String> {
        let kept = self
            .rng
            .below(self.nodes[id as usize].unsynced.len() as u64 + 1) as usize;
        let node = &mut self.nodes[id as usize];
        let written = std::mem::take(&mut node.unsynced);
        node.disk.extend(written.into_iter().take(kept));
        node.replica = None;
        node.down_until = self.now + 50 + self.rng.below(400);
        self.trace.update(format!("crash {id} at {}", self.now));
        Ok(())
    }

    fn restart_due(&mut self) -> Result<(), String> {
        for id in 0..self.sc.n as u32 {
            let node = &self.nodes[id as usize];
            if node.replica.is_none() && self.now >= node.down_until {
                let r = Replica::restore(
                    id,
                    self.sc.config.clone(),
                    self.keys[id as usize].clone(),
                    self.members.clone(),
                    &node.disk,
                );
                // Committed entries survive the restart.
                if let Some(root) = node.executed.get(&r.last_executed()) {
                    if *root != r.head() {
                        return Err(violation(
                            self.sc.seed,
                            format!(
                                "replica {id} restarted with a different state root at {}",
                                r.last_executed()
                            ),
                        ));
                    }
                }
                // As a shell does on restart: deliver durable blocks the application has not seen
                // (a crash can fall between persisting a block and executing it).
                let undelivered: Vec<(Seq, Digest, Batch)> = self.nodes[id as usize]
                    .disk
                    .iter()
                    .filter_map(|rec| match rec {
                        Record::Block { seq, batch, root } => Some((*seq, *root, batch.clone())),
                        _ => None,
                    })
                    .filter(|(seq, _, _)| !self.nodes[id as usize].executed.contains_key(seq))
                    .collect();
                for (seq, root, batch) in undelivered {
                    if !self.is_byzantine(id) {
                        self.done.extend(batch.entries.iter().cloned());
                    }
                    self.executed(id, seq, root, &batch)?;
                }
                self.nodes[id as usize].replica = Some(r);
                self.trace.update(format!("restart {id} at {}", self.now));
            }
        }
        Ok(())
    }

    fn record_vote(&mut self, id: ReplicaId, m: &Signed) -> Result<(), String> {
        if self.is_byzantine(id) || m.from != id {
            return Ok(());
        }
        let (kind, view, seq, digest) = match &m.payload {
            Payload::PrePrepare {
                view, seq, digest, ..
            } => (0, *view, *seq, *digest),
            Payload::Prepare { view, seq, digest } => (1, *view, *seq, *digest),
            Payload::Commit { view, seq, digest } => (2, *view, *seq, *digest),
            _ => return Ok(()),
        };
        // A prepare and a pre-prepare are the same vote; a commit follows a prepare.
        for k in [0u8, 1, 2] {
            if let Some(d) = self.votes.get(&(id, k, view, seq)) {
                if *d != digest {
                    return Err(violation(
                        self.sc.seed,
                        format!("replica {id} signed conflicting votes for {view}/{seq}"),
                    ));
                }
            }
        }
        self.votes.insert((id, kind, view, seq), digest);
        Ok(())
    }

    fn executed(
        &mut self,
        id: ReplicaId,
        seq: Seq,
        root: Digest,
        _batch: &Batch,
    ) -> Result<(), String> {
        self.trace.update(format!("exec {id} {seq}"));
        self.trace.update(root);
        if self.is_byzantine(id) {
            return Ok(());
        }
        let node = &mut self.nodes[id as usize];
        if let Some((last, _)) = node.executed.iter().next_back() {
            if seq != last + 1 && !node.executed.contains_key(&seq) {
                return Err(violation(
                    self.sc.seed,
                    format!("replica {id} executed {seq} after {last}: a gap"),
                ));
            }
        }
        node.executed.insert(seq, root);
        match self.agreed.get(&seq) {
            Some(r) if *r != root => Err(violation(
                self.sc.seed,
                format!("agreement broken at seq {seq}: replica {id} differs"),
            )),
            Some(_) => Ok(()),
            None => {
                self.agreed.insert(seq, root);
                Ok(())
            }
        }
    }

    /// What a Byzantine replica actually sends in place of `m`.
    fn byzantine_rewrite(&mut self, id: ReplicaId, to: ReplicaId, m: Signed) -> Vec<Signed> {
        let Some((b, kind)) = self.sc.byzantine else {
            return vec![m];
        };
        if b != id {
            return vec![m];
        }
        let key = self.keys[id as usize].clone();
        match (kind, &m.payload) {
            (Byzantine::Silent, _) => vec![],
            (
                Byzantine::Equivocate,
                Payload::PrePrepare {
                    view, seq, batch, ..
                },
            ) if to % 2 == 0 => {
                let mut other = batch.clone();
                other
                    .entries
                    .push(format!("equivocation-{seq}").into_bytes());
                vec![self.members.sign(
                    &key,
                    id,
                    Payload::PrePrepare {
                        view: *view,
                        seq: *seq,
                        digest: other.digest(),
                        batch: other,
                    },
                )]
            }
            (
                Byzantine::WrongDigest,
                Payload::PrePrepare {
                    view, seq, batch, ..
                },
            ) => {
                vec![self.members.sign(
                    &key,
                    id,
                    Payload::PrePrepare {
                        view: *view,
                        seq: *seq,
                        digest: [0xAB; 32],
                        batch: batch.clone(),
                    },
                )]
            }
            (Byzantine::DoubleVote, Payload::Prepare { view, seq, .. }) => {
                vec![
                    m.clone(),
                    self.members.sign(
                        &key,
                        id,
                        Payload::Prepare {
                            view: *view,
                            seq: *seq,
                            digest: [to as u8; 32],
                        },
                    ),
                ]
            }
            (Byzantine::DoubleVote, Payload::Commit { view, seq, .. }) => {
                vec![
                    m.clone(),
                    self.members.sign(
                        &key,
                        id,
                        Payload::Commit {
                            view: *view,
                            seq: *seq,
                            digest: [to as u8; 32],
                        },
                    ),
                ]
            }
            (Byzantine::ForgeAndReplay, _) => {
                let mut out = vec![m.clone()];
                // A message claiming to come from someone else, signed with our key.
                let victim = (id + 1) % self.sc.n as u32;
                let mut forged = self.members.sign(&key, id, m.payload.clone());
                forged.from = victim;
                out.push(forged);
                // A non-member.
                let mut alien = m.clone();
                alien.from = 77;
                out.push(alien);
                // Replay something old.
                if !self.old_messages.is_empty() {
                    let i = self.rng.below(self.old_messages.len() as u64) as usize;
                    out.push(self.old_messages[i].clone());
                }
                if self.old_messages.len() < 64 {
                    self.old_messages.push(m);
                }
                out
            }
            (Byzantine::CheckpointFlood, _) => {
                let mut out = vec![m];
                for _ in 0..4 {
                    let seq = self.sc.config.checkpoint_interval * (1 + self.rng.below(1 << 20));
                    let mut root = [0u8; 32];
                    root[..8].copy_from_slice(&self.rng.next().to_be_bytes());
                    out.push(
                        self.members
                            .sign(&key, id, Payload::Checkpoint { seq, root }),
                    );
                }
                out
            }
            (Byzantine::ViewChangeFlood, _) => {
                let mut out = vec![m];
                let view = 1 + self.now / 10;
                out.push(self.members.sign(
                    &key,
                    id,
                    Payload::ViewChange {
                        view,
                        stable_seq: 0,
                        stable_root: [0; 32],
                        proof: vec![],
                        prepared: vec![],
                    },
                ));
                // And suspicions of every view up to it: alone, they must move nobody.
                for v in view.saturating_sub(3)..=view {
                    out.push(self.members.sign(&key, id, Payload::Suspect { view: v }));
                }
                out
            }
            _ => vec![m],
        }
    }

    fn submit(&mut self, faulty: bool) -> Result<(), String> {
        let i = self.submitted.len();
        let entry = format!("entry-{}-{i}", self.sc.seed).into_bytes();
        self.submitted.push(entry.clone());
        self.send_request(entry, faulty)
    }

    /// Clients retry, as PBFT's do: an entry not executed yet goes to a live replica again.
    fn retry_requests(&mut self, faulty: bool) -> Result<(), String> {
        let missing: Vec<Vec<u8>> = self
            .submitted
            .iter()
            .filter(|e| !self.done.contains(*e))
            .cloned()
            .collect();
        for e in missing {
            self.send_request(e, faulty)?;
        }
        Ok(())
    }

    fn send_request(&mut self, entry: Vec<u8>, faulty: bool) -> Result<(), String> {
        // Clients talk to correct, live replicas.
        let candidates: Vec<ReplicaId> = (0..self.sc.n as u32)
            .filter(|r| !self.is_byzantine(*r) && self.nodes[*r as usize].replica.is_some())
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let to = candidates[self.rng.below(candidates.len() as u64) as usize];
        let now = self.now;
        let step = self.nodes[to as usize]
            .replica
            .as_mut()
            .expect("live")
            .handle_request(now, entry);
        self.run_step(to, step.actions, step.faults, faulty)
    }

    fn tick(&mut self, faulty: bool) -> Result<(), String> {
        self.restart_due()?;
        if self.trace_progress && self.now % 250 == 0 {
            let kinds: BTreeMap<&str, usize> =
                self.queue.values().fold(BTreeMap::new(), |mut acc, m| {
                    *acc.entry(m.payload.kind()).or_default() += 1;
                    acc
                });
            eprintln!(
                "t={} in flight {} delivered {} {:?}",
                self.now,
                self.queue.len(),
                self.messages,
                kinds
            );
        }
        // Deliver everything due.
        while let Some((k, _)) = self.queue.first_key_value() {
            if k.at > self.now {
                break;
            }
            let (k, m) = self.queue.pop_first().expect("non-empty");
            self.messages += 1;
            let Some(rep) = self.nodes[k.to as usize].replica.as_mut() else {
                continue;
            };
            self.trace.update([k.to as u8, k.from as u8]);
            self.trace.update(m.signature);
            let now = self.now;
            let step = rep.handle_message(now, m);
            self.run_step(k.to, step.actions, step.faults, faulty)?;
        }
        for id in 0..self.sc.n as u32 {
            let now = self.now;
            let Some(rep) = self.nodes[id as usize].replica.as_mut() else {
                continue;
            };
            let step = rep.handle_tick(now);
            let log = rep.log_len();
            if !self.is_byzantine(id) {
                self.max_log_len = self.max_log_len.max(log);
                let bound = 8 * (self.sc.config.window as usize) + 64;
                if log > bound {
                    return Err(violation(
                        self.sc.seed,
                        format!("replica {id} holds {log} log entries (bound {bound})"),
                    ));
                }
            }
            self.run_step(id, step.actions, step.faults, faulty)?;
            // As the shell does after each round of inputs.
            if let Some(rep) = self.nodes[id as usize].replica.as_mut() {
                let step = rep.handle_inputs_drained(now);
                self.run_step(id, step.actions, step.faults, faulty)?;
            }
        }
        Ok(())
    }

    pub fn run(mut self) -> Result<Report, String> {
        let total = self.sc.fault_ms;
        let mut next_request = 0u64;
        // Phase 1: faults.
        while self.now < total {
            if self.submitted.len() < self.sc.requests && self.now >= next_request {
                self.submit(true)?;
                next_request = self.now + 1 + self.rng.below(total / self.sc.requests as u64 + 1);
            }
            if self.partition.as_ref().map_or(true, |p| self.now >= p.1)
                && self.rng.chance(self.sc.partition_per_mille)
            {
                let side: BTreeSet<ReplicaId> = (0..self.sc.n as u32)
                    .filter(|_| self.rng.chance(500))
                    .collect();
                let until = self.now + 100 + self.rng.below(400);
                let one_way = self.rng.chance(300);
                self.partition = Some((side, until, one_way));
            }
            self.tick(true)?;
            self.now += 1;
            if self.now % (4 * self.sc.config.view_change_timeout) == 0 {
                self.retry_requests(true)?;
            }
        }
        // Phase 2: heal. Everyone restarts, the network is reliable; all requests must commit.
        self.partition = None;
        for n in &mut self.nodes {
            n.down_until = n.down_until.min(self.now);
        }
        while self.submitted.len() < self.sc.requests {
            self.submit(false)?;
        }
        let deadline = self.now + 3 * total + 20 * self.sc.config.view_change_timeout;
        while self.now < deadline {
            self.tick(false)?;
            self.now += 1;
            if self.now % (4 * self.sc.config.view_change_timeout) == 0 {
                self.retry_requests(false)?;
            }
            if self.now % 50 == 0 && self.all_done() {
                break;
            }
        }
        if !self.all_done() {
            let state: Vec<String> = self
                .nodes
                .iter()
                .map(|n| n.replica.as_ref().map_or("down".into(), Replica::describe))
                .collect();
            return Err(violation(
                self.sc.seed,
                format!(
                    "not live after healing: {} requests, replicas {state:?}",
                    self.sc.requests
                ),
            ));
        }
        let committed = self.agreed.keys().next_back().copied().unwrap_or(0);
        let views = self
            .nodes
            .iter()
            .filter_map(|n| n.replica.as_ref().map(Replica::view))
            .max()
            .unwrap_or(0);
        let final_views = self
            .nodes
            .iter()
            .filter_map(|n| n.replica.as_ref())
            .map(|r| (r.view(), r.is_view_active()))
            .collect();
        Ok(Report {
            seed: self.sc.seed,
            trace_hash: self.trace.finalize().into(),
            committed,
            views,
            final_views,
            faults_reported: self.faults,
            max_log_len: self.max_log_len,
            messages: self.messages,
            records: self.nodes.into_iter().map(|n| n.disk).collect(),
            membership: self.members,
        })
    }

    /// Every submitted entry executed by every correct replica, all at the same height.
    fn all_done(&self) -> bool {
        let correct: Vec<&Node> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.is_byzantine(*i as u32))
            .map(|(_, n)| n)
            .collect();
        let heights: BTreeSet<Seq> = correct
            .iter()
            .map(|n| n.replica.as_ref().map_or(0, Replica::last_executed))
            .collect();
        if heights.len() != 1 {
            return false;
        }
        let height = *heights.iter().next().expect("one");
        // The entries executed: rebuild from any correct node's disk (blocks it executed or fetched).
        let mut seen = BTreeSet::new();
        for n in &correct {
            for r in &n.disk {
                if let Record::Block { seq, batch, .. } = r {
                    if *seq <= height {
                        seen.extend(batch.entries.iter().cloned());
                    }
                }
            }
        }
        self.submitted.iter().all(|e| seen.contains(e))
    }
}

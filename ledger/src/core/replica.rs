//! One PBFT replica as a pure state machine: inputs are client entries, signed peer
//! messages and clock ticks; each call returns a `Step` of actions for the shell to carry out
//! in order (persist before the sends that follow it) and faults observed. No I/O, no clock,
//! no randomness: a run is a function of its inputs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ed25519_dalek::SigningKey;

use crate::merkle::Frontier;

use super::message::{
    block_leaf, encoded_len, Batch, Digest, Membership, Payload, Prepared, ReplicaId, Seq, Signed,
    View,
};

#[derive(Debug, Clone)]
pub struct Config {
    /// Checkpoint every K sequence numbers.
    pub checkpoint_interval: u64,
    /// High watermark = low + window (a multiple of the checkpoint interval).
    pub window: u64,
    /// Most batches proposed and not yet executed.
    pub pipeline: u64,
    pub max_batch_entries: usize,
    /// Most ticks a queued entry waits for company while earlier batches are agreed on.
    pub batch_delay: u64,
    /// Ticks a primary with nothing in flight leaves between two proposals, per 1000 entries
    /// of the batch it proposed last (rounded down, at most `batch_delay`). Under light load
    /// every entry is proposed as it arrives; under heavy load batches fill, and each block's
    /// fixed cost (its signatures, synced writes and messages on every replica) is shared by
    /// more entries. Per 1000 so that a fraction of a tick per entry can be set.
    pub spacing_per_1000_entries: u64,
    /// Ticks without progress before a view change; doubles on each failed attempt.
    pub view_change_timeout: u64,
    pub retransmit_interval: u64,
    pub max_message_bytes: usize,
    /// How far ahead of a backup's clock a primary's batch timestamp may be.
    pub max_clock_skew: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            checkpoint_interval: 16,
            window: 64,
            pipeline: 8,
            max_batch_entries: 256,
            batch_delay: 2,
            spacing_per_1000_entries: 0,
            view_change_timeout: 400,
            retransmit_interval: 100,
            max_message_bytes: 8 << 20,
            max_clock_skew: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A message this replica signed; durable before it is sent.
    Sent(Signed),
    /// A peer message accepted into the log.
    Accepted(Signed),
    /// An executed block.
    Block {
        seq: Seq,
        batch: Batch,
        root: Digest,
    },
    /// A checkpoint became stable; everything at or below `seq` may be garbage collected.
    Stable {
        seq: Seq,
        root: Digest,
        proof: Vec<Signed>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Make this durable before carrying out any later action of the step.
    Persist(Record),
    Send {
        to: ReplicaId,
        message: Signed,
    },
    Broadcast(Signed),
    /// Committed, strictly in sequence order. `certificate` is 2f+1 commits (or the checkpoint
    /// proof the block was verified against after a state transfer).
    Execute {
        seq: Seq,
        batch: Batch,
        root: Digest,
        certificate: Vec<Signed>,
    },
    /// Send blocks (from_seq, to_seq] from the store to a replica that is catching up.
    ServeBlocks {
        to: ReplicaId,
        from_seq: Seq,
        to_seq: Seq,
    },
}

impl Action {
    /// Whether a step with these actions acts on what it took in: anything but recording
    /// peers' messages (a send, an execution, a record of its own). Before it does, every
    /// record so far must be durable; records of peers' messages alone may wait for that, as
    /// losing them in a crash is like losing them in the network.
    pub fn any_acts(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|a| !matches!(a, Action::Persist(Record::Accepted(_))))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    BadSignature,
    NotMember,
    Oversized,
    OutsideWatermarks,
    NotFromPrimary,
    WrongDigest,
    Equivocation,
    DoubleVote,
    BadViewChange,
    BadNewView,
    BadCheckpoint,
    BadBlocks,
    BadTimestamp,
    /// A transport session opened again, or one too old: a replayed connection.
    Replay,
    /// Peer messages on a connection that did not open a session first.
    Unauthenticated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub from: ReplicaId,
    pub kind: FaultKind,
    pub detail: String,
}

#[must_use = "a Step carries messages and commits that must be executed"]
#[derive(Debug, Default)]
pub struct Step {
    pub actions: Vec<Action>,
    pub faults: Vec<Fault>,
}

#[derive(Debug, Default, Clone)]
struct Slot {
    view: View,
    digest: Option<Digest>,
    batch: Option<Batch>,
    /// Hashes of the batch's entries.
    hashes: BTreeSet<Digest>,
    pre_prepare: Option<Signed>,
    prepares: BTreeMap<ReplicaId, Signed>,
    commits: BTreeMap<ReplicaId, Signed>,
    prepared: bool,
    committed: bool,
}

pub struct Replica {
    id: ReplicaId,
    cfg: Config,
    /// Most bytes of entries in one batch (see `batch_budget`).
    batch_bytes: usize,
    key: SigningKey,
    members: Membership,
    f: usize,
    view: View,
    view_active: bool,
    /// Stable checkpoint: low watermark.
    low: Seq,
    stable_root: Digest,
    stable_proof: Vec<Signed>,
    last_exec: Seq,
    /// The Merkle log of executed blocks, and its head (the state root).
    frontier: Frontier,
    head: Digest,
    last_timestamp: u64,
    next_seq: Seq,
    slots: BTreeMap<Seq, Slot>,
    prepared_certs: BTreeMap<Seq, Prepared>,
    /// Own votes: (view, seq) -> digest. Never sign a different digest for the same key.
    voted: BTreeMap<(View, Seq), Digest>,
    own_checkpoints: BTreeMap<Seq, Signed>,
    checkpoint_votes: BTreeMap<Seq, BTreeMap<ReplicaId, Signed>>,
    view_changes: BTreeMap<View, BTreeMap<ReplicaId, Signed>>,
    /// SUSPECTs by the view they suspect (ours included), for views at or above ours.
    suspects: BTreeMap<View, BTreeMap<ReplicaId, Signed>>,
    /// The suspicions this replica joined a view change on, relayed with its VIEW-CHANGE so
    /// every correct replica can join too (a Byzantine replica may have sent its own to us only).
    join_evidence: Vec<Signed>,
    /// Our progress timer ran out in this view and nothing has executed since.
    suspecting: bool,
    /// Digests of the batches executed above the stable checkpoint.
    executed: BTreeMap<Seq, Digest>,
    /// Our commits, in the current view, for sequence numbers we had executed before it: a
    /// replica that has not executed them yet may need them to complete its certificate.
    decided_votes: BTreeMap<Seq, Signed>,
    /// Our recent VIEW-CHANGEs by view, retransmitted while changing views: a replica still
    /// gathering a quorum for an older view may have lost ours.
    own_view_changes: BTreeMap<View, Signed>,
    new_view: Option<Signed>,
    /// Entries waiting to be proposed (at the primary) or forwarded (elsewhere), in arrival
    /// order; `queued` says which are still current (the deque is cleaned lazily).
    pending: VecDeque<Vec<u8>>,
    queued: BTreeSet<Digest>,
    /// Entries clients gave this replica, kept until executed: if a view change drops the
    /// batch that carried one, it is proposed again (the replica acts as PBFT's retrying client).
    waiting: BTreeMap<Digest, Vec<u8>>,
    /// Entries clients gave this backup in the current round, not yet passed on.
    to_forward: Vec<Vec<u8>>,
    /// Entry -> the sequence number whose batch carries it (checked against the slot).
    in_flight: BTreeMap<Digest, Seq>,
    /// Recently executed entries, so a late retransmission is not proposed twice.
    recent: VecDeque<Digest>,
    recent_set: BTreeSet<Digest>,
    batch_deadline: Option<u64>,
    /// When this replica last proposed a batch, and how many entries it carried.
    last_proposal: (u64, usize),
    progress_deadline: Option<u64>,
    view_change_attempt: u32,
    next_retransmit: u64,
    /// Learning without voting (while changing views, or about an older view): batches seen in
    /// valid pre-prepares, and commits by (seq, view, digest).
    learned_batches: BTreeMap<Seq, BTreeMap<Digest, Batch>>,
    learned_commits: BTreeMap<(Seq, View, Digest), BTreeMap<ReplicaId, Signed>>,
    /// Catching up to a certified checkpoint: (seq, root, proof, peer asked last).
    fetching: Option<(Seq, Digest, Vec<Signed>, ReplicaId)>,
    /// Blocks after `last_exec` fetched so far; applied only once all of them up to the
    /// target verify against its certified root.
    fetched: Vec<Batch>,
    replaying: bool,
    step: Step,
}

/// The state root before any block: the hash of the empty tree.
fn genesis_root() -> Digest {
    Frontier::default().root()
}
/// Most blocks one state-transfer reply carries (keeps replies far below the message limit).
const MAX_BLOCKS_PER_REPLY: u64 = 32;
/// Most entries a replica queues to propose or forward; beyond it clients are refused and retry.
const MAX_QUEUED: usize = 200_000;
/// Executed entries remembered, so a late retransmission is not proposed again.
const RECENT_ENTRIES: usize = 200_000;

fn entry_hash(e: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(e).into()
}

/// A batch's size as `batch_budget` counts it: its header (timestamp, entry count) and, per
/// entry, a length prefix and the entry.
const BATCH_HEADER_BYTES: usize = 16;
const ENTRY_PREFIX_BYTES: usize = 8;

fn batch_size_with(bytes: usize, entry: &[u8]) -> usize {
    bytes + ENTRY_PREFIX_BYTES + entry.len()
}

/// Most bytes of entries one batch may carry. A NEW-VIEW holds the 2f+1 VIEW-CHANGEs it was
/// built from, each with up to `window` prepared certificates carrying their batches, and its
/// own pre-prepares for as many slots again: with batches this small even the largest NEW-VIEW
/// stays within the message limit, so no view change can fail for its size.
fn batch_budget(cfg: &Config, quorum: usize) -> usize {
    let copies = (quorum + 1) * cfg.window as usize;
    // Per copy: the pre-prepare's header and signature, 2f prepares, encoding lengths; and
    // for the whole message the view changes' checkpoint proofs and headers.
    let per_copy = 256 + quorum * 160;
    let reserve = (quorum + 1) * (quorum * 200 + 512);
    (cfg.max_message_bytes.saturating_sub(reserve) / copies).saturating_sub(per_copy)
}

/// Bound memory per kind of view message: only the few lowest views (those just above ours)
/// are kept, so a flood of messages for far-off views displaces only itself.
fn keep_lowest_views<T>(by_view: &mut BTreeMap<View, T>) {
    while by_view.len() > 8 {
        by_view.pop_last();
    }
}

/// View-change timeouts double per failed attempt, up to 2^3 times the base: unbounded
/// backoff leaves correct replicas in different views waiting far longer than the network
/// needs to heal.
const MAX_BACKOFF_DOUBLINGS: u32 = 3;

impl Replica {
    pub fn new(id: ReplicaId, cfg: Config, key: SigningKey, members: Membership) -> Replica {
        assert!(members.n() >= 1, "a membership has members");
        assert!(
            cfg.window % cfg.checkpoint_interval == 0 && cfg.window >= 2 * cfg.checkpoint_interval,
            "window is a multiple (>= 2) of the checkpoint interval"
        );
        assert_eq!(
            members.keys[id as usize],
            key.verifying_key(),
            "the key belongs to this replica"
        );
        let f = (members.n() - 1) / 3;
        let batch_bytes = batch_budget(&cfg, 2 * f + 1);
        assert!(
            batch_bytes >= 1024,
            "the message limit leaves room for batches of {batch_bytes} bytes only"
        );
        Replica {
            id,
            batch_bytes,
            cfg,
            key,
            members,
            f,
            view: 0,
            view_active: true,
            low: 0,
            stable_root: genesis_root(),
            stable_proof: vec![],
            last_exec: 0,
            frontier: Frontier::default(),
            head: genesis_root(),
            last_timestamp: 0,
            next_seq: 0,
            slots: BTreeMap::new(),
            prepared_certs: BTreeMap::new(),
            voted: BTreeMap::new(),
            own_checkpoints: BTreeMap::new(),
            checkpoint_votes: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            suspects: BTreeMap::new(),
            join_evidence: Vec::new(),
            suspecting: false,
            executed: BTreeMap::new(),
            decided_votes: BTreeMap::new(),
            own_view_changes: BTreeMap::new(),
            new_view: None,
            pending: VecDeque::new(),
            queued: BTreeSet::new(),
            waiting: BTreeMap::new(),
            to_forward: Vec::new(),
            in_flight: BTreeMap::new(),
            recent: VecDeque::new(),
            recent_set: BTreeSet::new(),
            batch_deadline: None,
            last_proposal: (0, 0),
            progress_deadline: None,
            view_change_attempt: 0,
            next_retransmit: 0,
            learned_batches: BTreeMap::new(),
            learned_commits: BTreeMap::new(),
            fetching: None,
            fetched: Vec::new(),
            replaying: false,
            step: Step::default(),
        }
    }

    /// Rebuild a replica from what it persisted before a crash. Blocks that the replayed log
    /// shows committed but that were not yet executed come out with the next `Step`.
    pub fn restore(
        id: ReplicaId,
        cfg: Config,
        key: SigningKey,
        members: Membership,
        records: &[Record],
    ) -> Replica {
        let mut r = Replica::new(id, cfg, key, members);
        r.replaying = true;
        for rec in records {
            match rec {
                Record::Block { seq, batch, root } => {
                    if *seq == r.last_exec + 1 {
                        r.frontier.push(block_leaf(&r.head, *seq, batch));
                        r.head = r.frontier.root();
                        debug_assert_eq!(
                            r.head, *root,
                            "a persisted block's root does not follow from the blocks before it"
                        );
                        r.last_exec = *seq;
                        r.last_timestamp = r.last_timestamp.max(batch.timestamp);
                        r.executed.insert(*seq, batch.digest());
                    }
                }
                Record::Stable { seq, root, proof } => {
                    if *seq > r.low {
                        r.low = *seq;
                        r.stable_root = *root;
                        r.stable_proof = proof.clone();
                    }
                }
                Record::Sent(m) => r.replay_own(m),
                Record::Accepted(m) => {
                    let _ = r.handle_message(0, m.clone());
                }
            }
        }
        r.next_seq = r.next_seq.max(r.last_exec);
        r.gc();
        r.replaying = false;
        r.step = Step::default();
        r.settle_fetch();
        // Decisions completed by the replayed messages execute now, for real: their blocks are
        // persisted and delivered with the first step after the restart.
        r.execute_ready();
        r
    }

    fn replay_own(&mut self, m: &Signed) {
        match &m.payload {
            Payload::PrePrepare {
                view, seq, digest, ..
            }
            | Payload::Prepare { view, seq, digest }
            | Payload::Commit { view, seq, digest } => {
                self.voted.insert((*view, *seq), *digest);
                if matches!(m.payload, Payload::PrePrepare { .. }) {
                    self.next_seq = self.next_seq.max(*seq);
                }
                let _ = self.handle_message(0, m.clone());
            }
            Payload::ViewChange { view, .. } => {
                if *view > self.view || (*view == self.view && self.view_active) {
                    self.view = *view;
                    self.view_active = false;
                }
                self.remember_own_view_change(*view, m.clone());
                self.view_changes
                    .entry(*view)
                    .or_default()
                    .insert(self.id, m.clone());
            }
            Payload::NewView { .. } | Payload::Checkpoint { .. } => {
                let _ = self.handle_message(0, m.clone());
            }
            _ => {}
        }
    }

    // ---- accessors ----

    pub fn id(&self) -> ReplicaId {
        self.id
    }
    pub fn view(&self) -> View {
        self.view
    }
    pub fn is_view_active(&self) -> bool {
        self.view_active
    }
    pub fn last_executed(&self) -> Seq {
        self.last_exec
    }
    pub fn head(&self) -> Digest {
        self.head
    }
    pub fn low_watermark(&self) -> Seq {
        self.low
    }
    pub fn stable_root(&self) -> Digest {
        self.stable_root
    }
    /// The largest entry this replica accepts: one that fills a batch on its own.
    pub fn max_entry_bytes(&self) -> usize {
        self.batch_bytes - BATCH_HEADER_BYTES - ENTRY_PREFIX_BYTES
    }

    pub fn primary_of(&self, view: View) -> ReplicaId {
        (view % self.members.n() as u64) as ReplicaId
    }
    pub fn is_primary(&self) -> bool {
        self.primary_of(self.view) == self.id
    }
    /// Entries held in the consensus log (for boundedness checks).
    pub fn log_len(&self) -> usize {
        self.slots.len()
            + self.in_flight.len() / 1024
            + self.prepared_certs.len()
            + self.checkpoint_votes.len()
            + self.view_changes.len()
            + self.own_view_changes.len()
            + self.voted.len()
            + self.learned_batches.len()
            + self.learned_commits.len()
    }
    /// A short status line for operators' logs.
    pub fn status(&self) -> String {
        format!(
            "replica {} view {}{} executed {} stable {} queued {} waiting {} slots {} fetching {:?}",
            self.id,
            self.view,
            if self.view_active { "" } else { " (changing)" },
            self.last_exec,
            self.low,
            self.queued.len(),
            self.waiting.len(),
            self.slots.len(),
            self.fetching.as_ref().map(|f| f.0)
        )
    }

    /// A one-line summary of the log, for diagnosing simulation failures.
    pub fn describe(&self) -> String {
        let slots: Vec<String> = self
            .slots
            .iter()
            .map(|(s, x)| {
                format!(
                    "{s}:v{}{}{}p{}c{}{}",
                    x.view,
                    if x.batch.is_some() { "B" } else { "-" },
                    if x.prepared { "P" } else { "" },
                    x.prepares.len(),
                    x.commits.len(),
                    if x.committed { "C" } else { "" }
                )
            })
            .collect();
        format!(
            "view {} active {} exec {} low {} fetching {:?} slots [{}] learned {:?} view-changes {:?} suspects {:?} deadline {:?}",
            self.view,
            self.view_active,
            self.last_exec,
            self.low,
            self.fetching.as_ref().map(|f| f.0),
            slots.join(" "),
            self.learned_commits
                .iter()
                .map(|((s, v, _), m)| (*s, *v, m.len()))
                .collect::<Vec<_>>(),
            self.view_changes
                .iter()
                .map(|(v, m)| (*v, m.keys().copied().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            self.suspects
                .iter()
                .map(|(v, m)| (*v, m.keys().copied().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            self.progress_deadline,
        )
    }

    fn quorum(&self) -> usize {
        2 * self.f + 1
    }
    pub fn sign(&self, payload: Payload) -> Signed {
        self.members.sign(&self.key, self.id, payload)
    }

    // ---- inputs ----

    /// A client entry submitted at this replica.
    pub fn handle_request(&mut self, now: u64, entry: Vec<u8>) -> Step {
        let h = entry_hash(&entry);
        // Too large for any batch: refused (the shell tells its client, see `max_entry_bytes`).
        if entry.len() > self.max_entry_bytes() || self.in_flight_or_done(&h) {
            return self.take_step();
        }
        self.waiting.insert(h, entry.clone());
        if self.is_primary() && self.view_active {
            self.enqueue(entry);
            if self.batch_deadline.is_none() {
                self.batch_deadline = Some(now + self.cfg.batch_delay);
            }
            self.propose(now);
        } else {
            // Passed on to the primary with the rest of this round's (`flush_forwards`): one
            // signature for all of them.
            self.enqueue(entry.clone());
            self.to_forward.push(entry);
        }
        self.arm_progress_timer(now);
        self.take_step()
    }

    /// Pass the entries clients gave this backup in the round on to the primary, in as few
    /// FORWARDs as fit a batch each.
    fn flush_forwards(&mut self) {
        let entries = std::mem::take(&mut self.to_forward);
        let to = self.primary_of(self.view);
        if entries.is_empty() || to == self.id {
            // A replica that became primary meanwhile proposes them from its own queue.
            return;
        }
        let mut chunk: Vec<Vec<u8>> = Vec::new();
        let mut bytes = BATCH_HEADER_BYTES;
        for e in entries {
            if !chunk.is_empty() && batch_size_with(bytes, &e) > self.batch_bytes {
                let fwd = self.sign(Payload::Forward {
                    entries: std::mem::take(&mut chunk),
                });
                self.emit(Action::Send { to, message: fwd });
                bytes = BATCH_HEADER_BYTES;
            }
            bytes = batch_size_with(bytes, &e);
            chunk.push(e);
        }
        let fwd = self.sign(Payload::Forward { entries: chunk });
        self.emit(Action::Send { to, message: fwd });
    }

    pub fn handle_tick(&mut self, now: u64) -> Step {
        self.settle_fetch();
        // Whatever event last touched it, the primary is suspected whenever work is pending,
        // and a view change that 2f+1 replicas joined is timed until its new view arrives.
        self.arm_progress_timer(now);
        self.arm_view_change_timer(now);
        if self.batch_deadline.is_some_and(|d| now >= d) {
            self.batch_deadline = None;
            self.propose_now(now, true);
        }
        if self.progress_deadline.is_some_and(|d| now >= d) {
            self.progress_deadline = None;
            self.suspect(now);
        }
        if now >= self.next_retransmit {
            self.next_retransmit = now + self.cfg.retransmit_interval;
            self.retransmit();
        }
        self.take_step()
    }

    pub fn handle_message(&mut self, now: u64, m: Signed) -> Step {
        if m.from as usize >= self.members.n() {
            self.fault(
                m.from,
                FaultKind::NotMember,
                "sender is not a member".into(),
            );
            return self.take_step();
        }
        if encoded_len(&m) > self.cfg.max_message_bytes {
            self.fault(
                m.from,
                FaultKind::Oversized,
                format!("{} message over the size limit", m.payload.kind()),
            );
            return self.take_step();
        }
        if self.is_spent_vote(&m) {
            return self.take_step();
        }
        if !self.members.verify(&m) {
            self.fault(
                m.from,
                FaultKind::BadSignature,
                format!("{} with a bad signature", m.payload.kind()),
            );
            return self.take_step();
        }
        // Our own messages can come back relayed inside certificates help: each handler dedups
        // by sender, so they are processed like any other.
        match m.payload.clone() {
            Payload::Forward { entries } => {
                let fresh: Vec<Vec<u8>> = entries
                    .into_iter()
                    .filter(|e| self.enqueue(e.clone()))
                    .collect();
                if fresh.is_empty() {
                    return self.take_step();
                }
                if self.is_primary() && self.view_active {
                    if self.batch_deadline.is_none() {
                        self.batch_deadline = Some(now + self.cfg.batch_delay);
                    }
                    self.propose(now);
                } else if self.view_active
                    && m.from != self.primary_of(self.view)
                    && !self.replaying
                {
                    // As in PBFT, a backup passes a request on to its primary and starts its own
                    // timer: if the primary ignores it, this backup will ask for a view change too.
                    let to = self.primary_of(self.view);
                    let fwd = self.sign(Payload::Forward { entries: fresh });
                    self.emit(Action::Send { to, message: fwd });
                }
                self.arm_progress_timer(now);
            }
            Payload::PrePrepare {
                view,
                seq,
                digest,
                batch,
            } => self.on_pre_prepare(now, m, view, seq, digest, batch),
            Payload::Prepare { view, seq, digest } => {
                self.on_vote(now, m, view, seq, digest, false)
            }
            Payload::Commit { view, seq, digest } => self.on_vote(now, m, view, seq, digest, true),
            Payload::Checkpoint { seq, root } => self.on_checkpoint(m, seq, root),
            Payload::ViewChange { view, .. } => self.on_view_change(now, m, view),
            Payload::Suspect { view } => self.on_suspect(now, m, view),
            // The transport's business; a peer that sends it as a message gains nothing.
            Payload::Hello { .. } => {}
            Payload::NewView { view, .. } => self.on_new_view(now, m, view),
            Payload::BlockRequest { from_seq, to_seq } => {
                let to_seq = to_seq
                    .min(self.last_exec)
                    .min(from_seq.saturating_add(MAX_BLOCKS_PER_REPLY));
                if to_seq > from_seq && !self.replaying {
                    self.emit(Action::ServeBlocks {
                        to: m.from,
                        from_seq,
                        to_seq,
                    });
                }
            }
            Payload::Blocks { first_seq, batches } => {
                self.on_blocks(now, m.from, first_seq, batches)
            }
            Payload::Status {
                view,
                last_executed,
            } => {
                if last_executed < self.last_exec {
                    self.send_decided(m.from, last_executed);
                }
                // It missed the new view we are in: the NEW-VIEW proves it (it verifies it).
                if view < self.view && self.view_active && !self.replaying {
                    if let Some(nv) = self.new_view.clone() {
                        self.emit(Action::Send {
                            to: m.from,
                            message: nv,
                        });
                    }
                }
            }
        }
        self.take_step()
    }

    /// A vote that can no longer change anything here, so checking its signature would be
    /// wasted: a COMMIT for a sequence number this replica executed (`on_vote` ignores it),
    /// or a backup's PREPARE for a slot already prepared with that view and digest (its
    /// certificate is complete). With n = 4 each replica gets one of each per block: a third
    /// of the signature checks of the normal case.
    fn is_spent_vote(&self, m: &Signed) -> bool {
        match m.payload {
            Payload::Commit { seq, .. } => seq <= self.last_exec,
            Payload::Prepare { view, seq, digest } => {
                seq > self.last_exec
                    && m.from != self.primary_of(view)
                    && self.slots.get(&seq).is_some_and(|slot| {
                        slot.prepared && slot.view == view && slot.digest == Some(digest)
                    })
            }
            _ => false,
        }
    }

    // ---- normal case ----

    fn propose(&mut self, now: u64) {
        let full = self.queued.len() >= self.cfg.max_batch_entries;
        self.propose_now(now, full);
    }

    /// The shell took in everything that had arrived (it calls this after every round, one
    /// with only a tick included): a backup passes the round's client entries on to the
    /// primary (`flush_forwards`), and an idle primary proposes what it has
    /// queued rather than wait out the batch delay, which only pays off while earlier batches
    /// are still being agreed on (the next batch then gathers what arrives meanwhile) — at
    /// once, unless its last batch was large enough that proposals are spaced out (see
    /// `Config::spacing_per_1000_entries`).
    pub fn handle_inputs_drained(&mut self, now: u64) -> Step {
        self.flush_forwards();
        if self.next_seq <= self.last_exec && !self.queued.is_empty() {
            let (at, entries) = self.last_proposal;
            let spacing = ((entries as u64).saturating_mul(self.cfg.spacing_per_1000_entries)
                / 1000)
                .min(self.cfg.batch_delay);
            let due = at.saturating_add(spacing);
            if now >= due {
                self.batch_deadline = None;
                self.propose_now(now, true);
            } else {
                self.batch_deadline = Some(self.batch_deadline.map_or(due, |d| d.min(due)));
            }
        }
        self.take_step()
    }

    fn propose_now(&mut self, now: u64, cut: bool) {
        if !cut || !self.is_primary() || !self.view_active {
            return;
        }
        while !self.queued.is_empty()
            && self.next_seq < self.low + self.cfg.window
            && self.next_seq < self.last_exec + self.cfg.pipeline
        {
            let mut entries = Vec::new();
            let mut bytes = BATCH_HEADER_BYTES;
            while entries.len() < self.cfg.max_batch_entries {
                let Some(e) = self.pending.pop_front() else {
                    break;
                };
                let h = entry_hash(&e);
                if !self.queued.contains(&h) {
                    continue;
                }
                if batch_size_with(bytes, &e) > self.batch_bytes {
                    // The next batch starts with it (`enqueue` admits no entry that fills
                    // more than a batch on its own, so one always fits an empty batch).
                    assert!(
                        !entries.is_empty(),
                        "an entry larger than any batch was queued"
                    );
                    self.pending.push_front(e);
                    break;
                }
                self.queued.remove(&h);
                if !self.in_flight_or_done(&h) {
                    bytes = batch_size_with(bytes, &e);
                    entries.push(e);
                }
            }
            if entries.is_empty() {
                continue;
            }
            let timestamp = now.max(self.last_timestamp);
            self.last_timestamp = timestamp;
            self.last_proposal = (now, entries.len());
            let batch = Batch { timestamp, entries };
            self.next_seq += 1;
            let (view, seq, digest) = (self.view, self.next_seq, batch.digest());
            if self.voted.get(&(view, seq)).is_some_and(|d| *d != digest) {
                // Never propose two batches for one (view, seq), even after a restart.
                for e in batch.entries {
                    self.enqueue(e);
                }
                return;
            }
            self.voted.insert((view, seq), digest);
            let pp = self.sign(Payload::PrePrepare {
                view,
                seq,
                digest,
                batch: batch.clone(),
            });
            self.emit(Action::Persist(Record::Sent(pp.clone())));
            self.emit(Action::Broadcast(pp.clone()));
            let slot = self.slots.entry(seq).or_default();
            *slot = Slot {
                view,
                digest: Some(digest),
                pre_prepare: Some(pp),
                ..Slot::default()
            };
            self.set_batch(seq, batch);
            // With n = 1 (f = 0) the primary's own proposal is already prepared.
            self.check_prepared(seq);
        }
        if !self.queued.is_empty() {
            self.batch_deadline = Some(now + self.cfg.batch_delay);
        }
    }

    /// Is this entry in a batch proposed and not yet executed, or executed recently?
    fn in_flight_or_done(&self, h: &Digest) -> bool {
        self.recent_set.contains(h)
            || self.in_flight.get(h).is_some_and(|s| {
                *s > self.last_exec
                    && self
                        .slots
                        .get(s)
                        .is_some_and(|slot| slot.hashes.contains(h))
            })
    }

    /// Queue an entry to propose or forward, unless it is queued, in flight or done. Returns
    /// whether it was queued. The queue is bounded: beyond it, entries are refused (clients
    /// retry).
    fn enqueue(&mut self, e: Vec<u8>) -> bool {
        let h = entry_hash(&e);
        if self.queued.contains(&h)
            || self.in_flight_or_done(&h)
            || self.queued.len() >= MAX_QUEUED
            || e.len() > self.max_entry_bytes()
        {
            return false;
        }
        self.queued.insert(h);
        self.pending.push_back(e);
        if self.pending.len() > 2 * self.queued.len() + 1024 {
            let queued = &self.queued;
            self.pending.retain(|e| queued.contains(&entry_hash(e)));
        }
        true
    }

    /// The entries still queued, in order.
    fn queued_entries(&self) -> Vec<Vec<u8>> {
        self.pending
            .iter()
            .filter(|e| self.queued.contains(&entry_hash(e)))
            .cloned()
            .collect()
    }

    /// Give a slot its batch, indexing its entries as in flight.
    fn set_batch(&mut self, seq: Seq, batch: Batch) {
        let hashes: BTreeSet<Digest> = batch.entries.iter().map(|e| entry_hash(e)).collect();
        for h in &hashes {
            self.in_flight.insert(*h, seq);
        }
        let slot = self.slots.entry(seq).or_default();
        slot.hashes = hashes;
        slot.batch = Some(batch);
    }

    fn in_window(&self, seq: Seq) -> bool {
        seq > self.low && seq <= self.low + self.cfg.window
    }

    #[allow(clippy::too_many_arguments)]
    fn on_pre_prepare(
        &mut self,
        now: u64,
        m: Signed,
        view: View,
        seq: Seq,
        digest: Digest,
        batch: Batch,
    ) {
        if view != self.view || !self.view_active {
            // Not voting in that view (an older one, or one we have not installed), but its batch
            // may be decided: keep it to learn.
            if m.from == self.primary_of(view)
                && seq > self.last_exec
                && self.in_window(seq)
                && batch.digest() == digest
            {
                self.learned_batches
                    .entry(seq)
                    .or_default()
                    .insert(digest, batch);
                self.try_learn(seq);
            }
            return;
        }
        if m.from != self.primary_of(view) {
            self.fault(
                m.from,
                FaultKind::NotFromPrimary,
                format!("pre-prepare for view {view} from a backup"),
            );
            return;
        }
        if seq <= self.last_exec {
            // Already decided and executed here.
            return;
        }
        if !self.in_window(seq) {
            if seq > self.low + self.cfg.window {
                self.fault(
                    m.from,
                    FaultKind::OutsideWatermarks,
                    format!("pre-prepare seq {seq} above the high watermark"),
                );
            }
            return;
        }
        if batch.digest() != digest {
            self.fault(
                m.from,
                FaultKind::WrongDigest,
                format!("pre-prepare {view}/{seq} digest does not match its batch"),
            );
            return;
        }
        if !self.replaying
            && batch.timestamp > now + self.cfg.max_clock_skew
            && batch.timestamp != 0
        {
            self.fault(
                m.from,
                FaultKind::BadTimestamp,
                format!("batch timestamp {} is ahead of the clock", batch.timestamp),
            );
            return;
        }
        self.accept_pre_prepare(now, m, view, seq, digest, batch);
    }

    fn accept_pre_prepare(
        &mut self,
        now: u64,
        m: Signed,
        view: View,
        seq: Seq,
        digest: Digest,
        batch: Batch,
    ) {
        let existing = self
            .slots
            .get(&seq)
            .filter(|s| s.view == view)
            .and_then(|s| s.digest);
        if let Some(d) = existing {
            if d != digest {
                self.fault(
                    m.from,
                    FaultKind::Equivocation,
                    format!("two pre-prepares for {view}/{seq}"),
                );
                // Both batches are signed by the primary; a commit certificate will say which one
                // was decided, so keep this one to learn it if need be.
                self.learned_batches
                    .entry(seq)
                    .or_default()
                    .insert(digest, batch);
                self.try_learn(seq);
            }
            return;
        }
        if !self.replaying {
            self.emit(Action::Persist(Record::Accepted(m.clone())));
        }
        let slot = self.slots.entry(seq).or_default();
        if slot.view != view {
            // Votes from an older view do not count towards this one.
            *slot = Slot {
                view,
                ..Slot::default()
            };
        }
        slot.digest = Some(digest);
        slot.pre_prepare = Some(m);
        // Votes that arrived before the pre-prepare stay if they match it.
        slot.prepares
            .retain(|_, p| matches!(p.payload, Payload::Prepare { digest: d, .. } if d == digest));
        slot.commits
            .retain(|_, p| matches!(p.payload, Payload::Commit { digest: d, .. } if d == digest));
        self.set_batch(seq, batch);
        if self.primary_of(view) != self.id {
            self.vote(view, seq, digest, false);
        }
        self.arm_progress_timer(now);
        self.check_prepared(seq);
    }

    /// Sign and send a prepare or commit, unless it would conflict with an earlier vote.
    fn vote(&mut self, view: View, seq: Seq, digest: Digest, commit: bool) {
        match self.voted.get(&(view, seq)) {
            Some(d) if *d != digest => return,
            _ => {}
        }
        self.voted.insert((view, seq), digest);
        let payload = if commit {
            Payload::Commit { view, seq, digest }
        } else {
            Payload::Prepare { view, seq, digest }
        };
        let msg = self.sign(payload);
        if let Some(slot) = self.slots.get_mut(&seq) {
            if commit {
                slot.commits.insert(self.id, msg.clone());
            } else {
                slot.prepares.insert(self.id, msg.clone());
            }
        }
        if !self.replaying {
            self.emit(Action::Persist(Record::Sent(msg.clone())));
            self.emit(Action::Broadcast(msg));
        }
    }

    /// A new view re-proposes a sequence number we already executed, with the batch we executed
    /// (as it must: that batch was committed). As in PBFT, we run the protocol for it again in
    /// the new view without executing it again: replicas that had not executed it may need our
    /// votes for a certificate, since those from older views can be lost to crashes.
    fn vote_decided(&mut self, view: View, seq: Seq, digest: Digest) {
        if self.voted.get(&(view, seq)).is_some_and(|d| *d != digest) {
            return;
        }
        self.voted.insert((view, seq), digest);
        let mut votes = vec![];
        if self.primary_of(view) != self.id {
            votes.push(self.sign(Payload::Prepare { view, seq, digest }));
        }
        let commit = self.sign(Payload::Commit { view, seq, digest });
        self.decided_votes.insert(seq, commit.clone());
        votes.push(commit);
        if !self.replaying {
            for msg in votes {
                self.emit(Action::Persist(Record::Sent(msg.clone())));
                self.emit(Action::Broadcast(msg));
            }
        }
    }

    fn on_vote(&mut self, now: u64, m: Signed, view: View, seq: Seq, digest: Digest, commit: bool) {
        // Decisions do not depend on views: commits for a view we do not vote in (older, newer,
        // or one we are leaving) still add up to a certificate we can execute.
        if commit
            && seq > self.last_exec
            && self.in_window(seq)
            && (view != self.view || !self.view_active)
        {
            self.learn_commit(m, view, seq, digest);
            return;
        }
        if view != self.view || !self.in_window(seq) {
            if seq > self.low + self.cfg.window {
                self.fault(
                    m.from,
                    FaultKind::OutsideWatermarks,
                    format!("vote for seq {seq} above the high watermark"),
                );
            }
            return;
        }
        if seq <= self.last_exec {
            // Decided and executed here; the slot keeps the certificate it was decided with. A
            // replica still preparing it in this view may have lost our vote: send it again
            // (in answer to prepares only: answering commits, two replicas that both executed
            // it would answer each other forever).
            if let Some(c) = self.decided_votes.get(&seq).filter(|_| !commit) {
                if !self.replaying && m.from != self.id {
                    let message = c.clone();
                    self.emit(Action::Send {
                        to: m.from,
                        message,
                    });
                }
            }
            return;
        }
        if !commit && m.from == self.primary_of(view) {
            self.fault(
                m.from,
                FaultKind::NotFromPrimary,
                "the primary sent a prepare".into(),
            );
            return;
        }
        let slot = self.slots.entry(seq).or_default();
        if slot.view != view {
            if slot.view > view {
                return;
            }
            *slot = Slot {
                view,
                ..Slot::default()
            };
        }
        if slot.digest.is_some_and(|d| d != digest) {
            // A vote for another digest than the pre-prepare we accepted: the primary may have
            // equivocated. Prepares for it are ignored; commits may add up to a certificate
            // that proves the other batch was decided.
            if commit {
                self.learn_commit(m, view, seq, digest);
            }
            return;
        }
        let map = if commit {
            &mut slot.commits
        } else {
            &mut slot.prepares
        };
        if let Some(prev) = map.get(&m.from) {
            if prev.payload != m.payload {
                self.fault(
                    m.from,
                    FaultKind::DoubleVote,
                    format!(
                        "two {} votes for {view}/{seq}",
                        if commit { "commit" } else { "prepare" }
                    ),
                );
            }
            return;
        }
        map.insert(m.from, m.clone());
        if !self.replaying {
            self.emit(Action::Persist(Record::Accepted(m)));
        }
        let _ = now;
        self.check_prepared(seq);
    }

    /// 2f+1 commits for (view, seq, digest) from distinct replicas: at least f+1 correct
    /// replicas prepared it, so it is the decision at `seq` whatever view comes next. A replica
    /// that no longer votes in `view` may still execute it.
    fn learn_commit(&mut self, m: Signed, view: View, seq: Seq, digest: Digest) {
        let votes = self.learned_commits.entry((seq, view, digest)).or_default();
        votes.insert(m.from, m);
        self.try_learn(seq);
    }

    fn try_learn(&mut self, seq: Seq) {
        let quorum = self.quorum();
        let decided: Option<(Digest, Vec<Signed>)> = self
            .learned_commits
            .range((seq, 0, [0; 32])..=(seq, View::MAX, [0xff; 32]))
            .find(|(_, v)| v.len() >= quorum)
            .map(|((_, _, d), v)| (*d, v.values().cloned().collect()));
        let Some((digest, cert)) = decided else {
            return;
        };
        let batch = self
            .learned_batches
            .get(&seq)
            .and_then(|b| b.get(&digest).cloned())
            .or_else(|| {
                self.slots
                    .get(&seq)
                    .filter(|s| s.digest == Some(digest))
                    .and_then(|s| s.batch.clone())
            });
        let Some(batch) = batch else { return };
        self.set_batch(seq, batch);
        let slot = self.slots.entry(seq).or_default();
        slot.digest = Some(digest);
        slot.prepared = true;
        slot.committed = true;
        slot.commits = cert.into_iter().map(|c| (c.from, c)).collect();
        self.execute_ready();
    }

    fn check_prepared(&mut self, seq: Seq) {
        let need = 2 * self.f;
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        let (Some(digest), Some(pp)) = (slot.digest, slot.pre_prepare.clone()) else {
            return;
        };
        let view = slot.view;
        if !slot.prepared {
            let primary = self.primary_of(view);
            let prepares: Vec<Signed> = slot
                .prepares
                .iter()
                .filter(|(r, _)| **r != primary)
                .map(|(_, p)| p.clone())
                .collect();
            if prepares.len() >= need {
                let slot = self.slots.get_mut(&seq).expect("slot");
                slot.prepared = true;
                let better =
                    self.prepared_certs
                        .get(&seq)
                        .map_or(true, |c| match c.pre_prepare.payload {
                            Payload::PrePrepare { view: v, .. } => v <= view,
                            _ => true,
                        });
                if better {
                    self.prepared_certs.insert(
                        seq,
                        Prepared {
                            pre_prepare: pp,
                            prepares: prepares.into_iter().take(need).collect(),
                        },
                    );
                }
                self.vote(view, seq, digest, true);
            }
        }
        self.check_committed(seq);
    }

    /// Committed: 2f+1 matching commits from distinct replicas. (Correct replicas commit only
    /// what they prepared, so such a certificate means f+1 correct replicas prepared it; this
    /// replica need not have prepared it itself to execute it.)
    fn check_committed(&mut self, seq: Seq) {
        let quorum = self.quorum();
        let Some(slot) = self.slots.get_mut(&seq) else {
            return;
        };
        if !slot.committed && slot.batch.is_some() && slot.commits.len() >= quorum {
            slot.committed = true;
            self.execute_ready();
        }
    }

    fn execute_ready(&mut self) {
        if self.replaying {
            return;
        }
        while let Some(slot) = self.slots.get(&(self.last_exec + 1)) {
            if !slot.committed {
                break;
            }
            let seq = self.last_exec + 1;
            let batch = slot.batch.clone().expect("committed slots have batches");
            let certificate: Vec<Signed> =
                slot.commits.values().take(self.quorum()).cloned().collect();
            self.apply_block(seq, batch, certificate);
        }
    }

    fn apply_block(&mut self, seq: Seq, batch: Batch, certificate: Vec<Signed>) {
        debug_assert_eq!(seq, self.last_exec + 1, "blocks execute in order");
        self.frontier.push(block_leaf(&self.head, seq, &batch));
        let root = self.frontier.root();
        self.head = root;
        self.last_exec = seq;
        self.last_timestamp = self.last_timestamp.max(batch.timestamp);
        self.executed.insert(seq, batch.digest());
        for e in &batch.entries {
            let h = entry_hash(e);
            self.queued.remove(&h);
            self.waiting.remove(&h);
            self.in_flight.remove(&h);
            if self.recent_set.insert(h) {
                self.recent.push_back(h);
            }
        }
        while self.recent.len() > RECENT_ENTRIES {
            if let Some(old) = self.recent.pop_front() {
                self.recent_set.remove(&old);
            }
        }
        if !self.replaying {
            self.emit(Action::Persist(Record::Block {
                seq,
                batch: batch.clone(),
                root,
            }));
            self.emit(Action::Execute {
                seq,
                batch,
                root,
                certificate,
            });
        }
        if self.fetching.as_ref().is_some_and(|f| f.0 <= seq) {
            self.fetching = None;
            self.fetched.clear();
        }
        self.learned_batches.remove(&seq);
        self.learned_commits = self.learned_commits.split_off(&(seq + 1, 0, [0; 32]));
        // Progress: the view works; reset the view-change backoff.
        self.view_change_attempt = 0;
        self.suspecting = false;
        self.progress_deadline = None;
        if seq % self.cfg.checkpoint_interval == 0 {
            let cp = self.sign(Payload::Checkpoint { seq, root });
            self.own_checkpoints.insert(seq, cp.clone());
            self.checkpoint_votes
                .entry(seq)
                .or_default()
                .insert(self.id, cp.clone());
            if !self.replaying {
                self.emit(Action::Persist(Record::Sent(cp.clone())));
                self.emit(Action::Broadcast(cp));
            }
            self.check_stable(seq);
        }
    }

    // ---- checkpoints ----

    fn on_checkpoint(&mut self, m: Signed, seq: Seq, _root: Digest) {
        if seq <= self.low || seq % self.cfg.checkpoint_interval != 0 {
            return;
        }
        let from = m.from;
        let votes = self.checkpoint_votes.entry(seq).or_default();
        if votes.contains_key(&from) {
            return;
        }
        votes.insert(from, m.clone());
        if !self.replaying {
            self.emit(Action::Persist(Record::Accepted(m)));
        }
        // Memory stays bounded per sender: each replica's latest few checkpoint votes are kept,
        // its oldest dropped first. A Byzantine flood of checkpoints displaces only its own.
        let keep = (self.cfg.window / self.cfg.checkpoint_interval) as usize + 2;
        let mine: Vec<Seq> = self
            .checkpoint_votes
            .iter()
            .filter(|(_, v)| v.contains_key(&from))
            .map(|(s, _)| *s)
            .collect();
        for old in mine.iter().take(mine.len().saturating_sub(keep)) {
            if let Some(v) = self.checkpoint_votes.get_mut(old) {
                v.remove(&from);
                if v.is_empty() {
                    self.checkpoint_votes.remove(old);
                }
            }
        }
        self.check_stable(seq);
    }

    fn check_stable(&mut self, seq: Seq) {
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let mut by_root: BTreeMap<Digest, Vec<Signed>> = BTreeMap::new();
        for v in votes.values() {
            if let Payload::Checkpoint { root, .. } = v.payload {
                by_root.entry(root).or_default().push(v.clone());
            }
        }
        let Some((root, proof)) = by_root.into_iter().find(|(_, v)| v.len() >= self.quorum())
        else {
            return;
        };
        if seq <= self.low {
            return;
        }
        if self.last_exec >= seq {
            let own = self
                .own_checkpoints
                .get(&seq)
                .and_then(|c| match c.payload {
                    Payload::Checkpoint { root, .. } => Some(root),
                    _ => None,
                });
            debug_assert!(
                own.is_none() || own == Some(root),
                "a correct replica's state root differs from a certified checkpoint"
            );
        }
        self.make_stable(seq, root, proof);
    }

    fn make_stable(&mut self, seq: Seq, root: Digest, proof: Vec<Signed>) {
        self.low = seq;
        self.stable_root = root;
        self.stable_proof = proof.clone();
        if !self.replaying {
            self.emit(Action::Persist(Record::Stable {
                seq,
                root,
                proof: proof.clone(),
            }));
        }
        self.gc();
        if self.next_seq < seq {
            self.next_seq = seq;
        }
        if self.last_exec < seq {
            self.start_fetch(seq, root, proof);
        }
    }

    /// Drop everything at or below the stable checkpoint: the log stays bounded.
    fn gc(&mut self) {
        let low = self.low;
        self.slots = self.slots.split_off(&(low + 1));
        self.prepared_certs = self.prepared_certs.split_off(&(low + 1));
        self.checkpoint_votes = self.checkpoint_votes.split_off(&(low + 1));
        let exec = self.last_exec;
        self.learned_batches = self.learned_batches.split_off(&(exec + 1));
        self.learned_commits = self.learned_commits.split_off(&(exec + 1, 0, [0; 32]));
        self.own_checkpoints = self.own_checkpoints.split_off(&low);
        self.voted.retain(|(_, s), _| *s > low);
        self.executed = self.executed.split_off(&(low + 1));
        self.decided_votes = self.decided_votes.split_off(&(low + 1));
        let exec = self.last_exec;
        self.in_flight.retain(|_, s| *s > exec);
        let view = self.view;
        self.view_changes = self.view_changes.split_off(&view);
    }

    // ---- state transfer ----

    fn start_fetch(&mut self, seq: Seq, root: Digest, proof: Vec<Signed>) {
        // A newer certified checkpoint extends a transfer in progress: the blocks fetched so far
        // are checked, with the rest, against the newest root when they are all there.
        if let Some(f) = self.fetching.as_mut() {
            if seq > f.0 {
                f.0 = seq;
                f.1 = root;
                f.2 = proof;
            }
            return;
        }
        let peer = proof
            .iter()
            .map(|p| p.from)
            .find(|r| *r != self.id)
            .unwrap_or((self.id + 1) % self.members.n() as u32);
        self.fetched.clear();
        self.fetching = Some((seq, root, proof, peer));
        self.request_blocks();
    }

    /// A state transfer whose target execution already reached is over.
    fn settle_fetch(&mut self) {
        if self
            .fetching
            .as_ref()
            .is_some_and(|f| f.0 <= self.last_exec)
        {
            self.fetching = None;
            self.fetched.clear();
        }
    }

    fn request_blocks(&mut self) {
        let Some((seq, _, _, peer)) = &self.fetching else {
            return;
        };
        if self.replaying {
            return;
        }
        let from_seq = self.last_exec + self.fetched.len() as u64;
        let req = self.sign(Payload::BlockRequest {
            from_seq,
            to_seq: (*seq).min(from_seq + MAX_BLOCKS_PER_REPLY),
        });
        let to = *peer;
        self.emit(Action::Send { to, message: req });
    }

    fn on_blocks(&mut self, _now: u64, from: ReplicaId, first_seq: Seq, batches: Vec<Batch>) {
        let Some((target, root, proof, _)) = self.fetching.clone() else {
            return;
        };
        if first_seq != self.last_exec + self.fetched.len() as u64 + 1 || batches.is_empty() {
            return;
        }
        let room = (target - self.last_exec) as usize - self.fetched.len();
        self.fetched.extend(batches.into_iter().take(room));
        if ((self.fetched.len() as u64) + self.last_exec) < target {
            // More to fetch; keep asking the same peer.
            self.request_blocks();
            return;
        }
        // Verify the whole run against the certified root before applying any of it.
        let mut frontier = self.frontier.clone();
        let mut h = self.head;
        for (i, b) in self.fetched.iter().enumerate() {
            frontier.push(block_leaf(&h, self.last_exec + 1 + i as u64, b));
            h = frontier.root();
        }
        if h != root {
            self.fault(
                from,
                FaultKind::BadBlocks,
                format!("blocks up to {target} do not match the certified checkpoint"),
            );
            self.fetched.clear();
            // Ask someone else.
            let next = (from + 1) % self.members.n() as u32;
            let next = if next == self.id {
                (next + 1) % self.members.n() as u32
            } else {
                next
            };
            if let Some(f) = self.fetching.as_mut() {
                f.3 = next;
            }
            self.request_blocks();
            return;
        }
        let blocks = std::mem::take(&mut self.fetched);
        for b in blocks {
            let seq = self.last_exec + 1;
            self.apply_block(seq, b, proof.clone());
        }
        self.fetching = None;
        self.execute_ready();
    }

    // ---- view change ----

    /// The timer that suspects the primary. It runs only in an active view (while changing
    /// views, `arm_view_change_timer` follows PBFT's 2f+1 rule) and not during a state transfer
    /// (a replica fetching blocks is waiting on itself, not on the primary).
    fn arm_progress_timer(&mut self, now: u64) {
        if !self.view_active || self.fetching.is_some() {
            return;
        }
        let waiting = !self.queued.is_empty()
            || !self.waiting.is_empty()
            || self.slots.range(self.last_exec + 1..).any(|(_, s)| {
                s.digest.is_some() && s.batch.as_ref().is_some_and(|b| !b.entries.is_empty())
            });
        if waiting && self.progress_deadline.is_none() {
            let backoff = 1u64 << self.view_change_attempt.min(MAX_BACKOFF_DOUBLINGS);
            self.progress_deadline = Some(now + self.cfg.view_change_timeout * backoff);
        }
    }

    fn start_view_change(&mut self, now: u64, view: View) {
        if view <= self.view && !self.view_active {
            return;
        }
        if view < self.view {
            return;
        }
        self.view = view;
        self.view_active = false;
        self.view_change_attempt += 1;
        self.suspects = self.suspects.split_off(&view);
        let prepared: Vec<Prepared> = self
            .prepared_certs
            .range(self.low + 1..)
            .map(|(_, c)| c.clone())
            .collect();
        let vc = self.sign(Payload::ViewChange {
            view,
            stable_seq: self.low,
            stable_root: self.stable_root,
            proof: self.stable_proof.clone(),
            prepared,
        });
        self.remember_own_view_change(view, vc.clone());
        self.view_changes
            .entry(view)
            .or_default()
            .insert(self.id, vc.clone());
        self.emit(Action::Persist(Record::Sent(vc.clone())));
        self.emit(Action::Broadcast(vc));
        // PBFT's liveness rule: the timer to give up on this view starts only once 2f+1 replicas
        // asked for it, so no correct replica races ahead into views the others never reach.
        self.progress_deadline = None;
        self.arm_view_change_timer(now);
        self.gc();
        self.try_new_view(now, view);
    }

    fn arm_view_change_timer(&mut self, now: u64) {
        if self.view_active || self.progress_deadline.is_some() {
            return;
        }
        if self.view_changes.get(&self.view).map_or(0, BTreeMap::len) >= self.quorum() {
            let backoff = 1u64 << self.view_change_attempt.min(MAX_BACKOFF_DOUBLINGS);
            self.progress_deadline = Some(now + self.cfg.view_change_timeout * backoff);
        }
    }

    /// Check a view change's checkpoint proof and prepared certificates.
    fn valid_view_change(&self, m: &Signed) -> Result<(), String> {
        let Payload::ViewChange {
            view,
            stable_seq,
            stable_root,
            proof,
            prepared,
        } = &m.payload
        else {
            return Err("not a view change".into());
        };
        if *stable_seq > 0 {
            if *stable_seq % self.cfg.checkpoint_interval != 0 {
                return Err("stable checkpoint not on an interval".into());
            }
            let signers: BTreeSet<ReplicaId> = proof
                .iter()
                .filter(|c| matches!(c.payload, Payload::Checkpoint { seq, root } if seq == *stable_seq && root == *stable_root))
                .map(|c| c.from)
                .collect();
            if signers.len() < self.quorum() || !self.members.verify_all(proof) {
                return Err("checkpoint proof lacks 2f+1 valid signatures".into());
            }
        } else if *stable_root != genesis_root() {
            return Err("genesis checkpoint with a non-genesis root".into());
        }
        for p in prepared {
            let Payload::PrePrepare {
                view: pv,
                seq,
                digest,
                batch,
            } = &p.pre_prepare.payload
            else {
                return Err("prepared certificate without a pre-prepare".into());
            };
            if *pv >= *view || *seq <= *stable_seq || *seq > stable_seq + self.cfg.window {
                return Err(format!("prepared certificate {pv}/{seq} out of range"));
            }
            if p.pre_prepare.from != self.primary_of(*pv) || batch.digest() != *digest {
                return Err(format!(
                    "prepared certificate {pv}/{seq} has a bad pre-prepare"
                ));
            }
            let signers: BTreeSet<ReplicaId> = p
                .prepares
                .iter()
                .filter(|x| x.from != self.primary_of(*pv) && matches!(x.payload, Payload::Prepare { view: v, seq: s, digest: d } if v == *pv && s == *seq && d == *digest))
                .map(|x| x.from)
                .collect();
            if signers.len() < 2 * self.f {
                return Err(format!("prepared certificate {pv}/{seq} lacks 2f prepares"));
            }
            let mut all = p.prepares.clone();
            all.push(p.pre_prepare.clone());
            if !self.members.verify_all(&all) {
                return Err(format!(
                    "prepared certificate {pv}/{seq} has a bad signature"
                ));
            }
        }
        Ok(())
    }

    /// Help a replica that has executed only up to `after`: send it what was decided above that
    /// (pre-prepares and commit certificates, from which it can learn without voting), or, if those
    /// slots are garbage collected, the stable checkpoint proof it can state-transfer against.
    fn send_decided(&mut self, to: ReplicaId, after: Seq) {
        if self.replaying {
            return;
        }
        let mut out = Vec::new();
        if after < self.low {
            out.extend(self.stable_proof.iter().cloned());
        }
        let from = after.max(self.low) + 1;
        let decided = if from <= self.last_exec {
            self.slots.range(from..=self.last_exec).collect::<Vec<_>>()
        } else {
            vec![]
        };
        for (_, slot) in decided {
            if let Some(pp) = &slot.pre_prepare {
                out.push(pp.clone());
            }
            // The whole certificate: each commit is signed by its own sender.
            out.extend(slot.commits.values().cloned());
        }
        for message in out {
            self.emit(Action::Send { to, message });
        }
    }

    fn remember_own_view_change(&mut self, view: View, vc: Signed) {
        self.own_view_changes.insert(view, vc);
        while self.own_view_changes.len() > 4 {
            let first = *self.own_view_changes.keys().next().expect("non-empty");
            self.own_view_changes.remove(&first);
        }
    }

    fn on_view_change(&mut self, now: u64, m: Signed, view: View) {
        if view < self.view || (view == self.view && self.view_active) {
            // A replica behind us: help it with the new view we installed.
            if view <= self.view && self.view_active && self.is_primary() && !self.replaying {
                if let Some(nv) = self.new_view.clone() {
                    self.emit(Action::Send {
                        to: m.from,
                        message: nv,
                    });
                }
            }
            return;
        }
        if let Err(e) = self.valid_view_change(&m) {
            self.fault(m.from, FaultKind::BadViewChange, e);
            return;
        }
        let entry = self.view_changes.entry(view).or_default();
        if entry.contains_key(&m.from) {
            return;
        }
        entry.insert(m.from, m.clone());
        if !self.replaying {
            self.emit(Action::Persist(Record::Accepted(m)));
        }
        keep_lowest_views(&mut self.view_changes);
        self.join_if_suspected(now);
        self.arm_view_change_timer(now);
        self.try_new_view(now, view);
    }

    /// Our progress timer ran out: suspect the view we are in (active or still being installed).
    /// Unlike a VIEW-CHANGE this binds us to nothing, so we keep voting in it: a replica that
    /// alone is slow, or alone cut off from the primary, never leaves a view the others are
    /// still committing in. Re-sent on every expiry and retransmission while unresolved.
    fn suspect(&mut self, now: u64) {
        let view = self.view;
        self.suspecting = true;
        let m = self
            .suspects
            .get(&view)
            .and_then(|s| s.get(&self.id))
            .cloned()
            .unwrap_or_else(|| self.sign(Payload::Suspect { view }));
        self.suspects
            .entry(view)
            .or_default()
            .insert(self.id, m.clone());
        self.emit(Action::Broadcast(m));
        // As PBFT's clients do on a timeout, give the requests we hold to every replica: the
        // others start their own timers on them, and suspect the primary too if it is at fault.
        let entries = self.held_entries();
        if !entries.is_empty() && !self.replaying {
            let fwd = self.sign(Payload::Forward { entries });
            self.emit(Action::Broadcast(fwd));
        }
        self.join_if_suspected(now);
    }

    /// Entries this replica holds for clients and has not seen executed, as many as one
    /// message may carry (the rest go with later retransmissions, once these are executed).
    fn held_entries(&self) -> Vec<Vec<u8>> {
        let budget = self.cfg.max_message_bytes / 2;
        let mut size = 0;
        self.queued_entries()
            .into_iter()
            .chain(
                self.waiting
                    .iter()
                    .filter(|(h, _)| !self.queued.contains(*h))
                    .map(|(_, e)| e.clone()),
            )
            .take_while(|e| {
                size += e.len() + 8;
                size <= budget
            })
            .collect()
    }

    fn on_suspect(&mut self, now: u64, m: Signed, view: View) {
        if view < self.view {
            return;
        }
        let senders = self.suspects.entry(view).or_default();
        if senders.contains_key(&m.from) {
            return;
        }
        senders.insert(m.from, m);
        keep_lowest_views(&mut self.suspects);
        self.join_if_suspected(now);
    }

    /// PBFT's join rule, with suspicions counted beside VIEW-CHANGEs: once f+1 replicas (so at
    /// least one correct one) suspect our view or ask for a later one, move to the lowest view
    /// they point at, and relay their messages so that every correct replica follows.
    fn join_if_suspected(&mut self, now: u64) {
        let mut above: BTreeMap<ReplicaId, (View, &Signed)> = BTreeMap::new();
        let wants = self
            .view_changes
            .range(self.view + 1..)
            .flat_map(|(v, senders)| senders.iter().map(move |(r, m)| (*r, *v, m)))
            .chain(
                self.suspects
                    .range(self.view..)
                    .flat_map(|(v, senders)| senders.iter().map(move |(r, m)| (*r, v + 1, m))),
            );
        for (r, v, m) in wants {
            let e = above.entry(r).or_insert((v, m));
            if v < e.0 {
                *e = (v, m);
            }
        }
        if above.len() <= self.f {
            return;
        }
        let target = above.values().map(|(v, _)| *v).min().expect("non-empty");
        if target > self.view || (target == self.view && self.view_active) {
            let evidence: Vec<Signed> = above
                .values()
                .filter(|(_, m)| m.from != self.id)
                .map(|(_, m)| (*m).clone())
                .collect();
            if !self.replaying {
                for m in &evidence {
                    self.emit(Action::Broadcast(m.clone()));
                }
            }
            // Only the small SUSPECTs are relayed again later; VIEW-CHANGEs their senders resend.
            self.join_evidence = evidence
                .into_iter()
                .filter(|m| matches!(m.payload, Payload::Suspect { .. }))
                .collect();
            self.start_view_change(now, target);
        }
    }

    /// The pre-prepares a new view must carry, computed from a set of view changes (PBFT's O).
    fn new_view_plan(&self, vcs: &[Signed]) -> (Seq, Digest, Vec<Signed>, Vec<(Seq, Batch)>) {
        let mut min_s = 0;
        let mut min_root = genesis_root();
        let mut min_proof = vec![];
        let mut best: BTreeMap<Seq, (View, Batch)> = BTreeMap::new();
        for vc in vcs {
            if let Payload::ViewChange {
                stable_seq,
                stable_root,
                proof,
                prepared,
                ..
            } = &vc.payload
            {
                if *stable_seq > min_s {
                    min_s = *stable_seq;
                    min_root = *stable_root;
                    min_proof = proof.clone();
                }
                for p in prepared {
                    if let Payload::PrePrepare {
                        view, seq, batch, ..
                    } = &p.pre_prepare.payload
                    {
                        if best.get(seq).map_or(true, |(v, _)| view > v) {
                            best.insert(*seq, (*view, batch.clone()));
                        }
                    }
                }
            }
        }
        let max_s = best.keys().next_back().copied().unwrap_or(min_s).max(min_s);
        let plan = (min_s + 1..=max_s)
            .map(|s| {
                (
                    s,
                    best.get(&s)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_else(Batch::null),
                )
            })
            .collect();
        (min_s, min_root, min_proof, plan)
    }

    fn try_new_view(&mut self, now: u64, view: View) {
        if self.primary_of(view) != self.id || self.view != view || self.view_active {
            return;
        }
        let Some(vcs) = self.view_changes.get(&view) else {
            return;
        };
        if vcs.len() < self.quorum() {
            return;
        }
        let vcs: Vec<Signed> = vcs.values().take(self.quorum()).cloned().collect();
        let (_, _, _, plan) = self.new_view_plan(&vcs);
        let pre_prepares: Vec<Signed> = plan
            .iter()
            .map(|(seq, batch)| {
                self.sign(Payload::PrePrepare {
                    view,
                    seq: *seq,
                    digest: batch.digest(),
                    batch: batch.clone(),
                })
            })
            .collect();
        let nv = self.sign(Payload::NewView {
            view,
            view_changes: vcs,
            pre_prepares,
        });
        self.emit(Action::Persist(Record::Sent(nv.clone())));
        self.emit(Action::Broadcast(nv.clone()));
        self.install_new_view(now, nv);
    }

    fn on_new_view(&mut self, now: u64, m: Signed, view: View) {
        if view < self.view || (view == self.view && self.view_active) {
            return;
        }
        if m.from != self.primary_of(view) {
            self.fault(
                m.from,
                FaultKind::NotFromPrimary,
                format!("new-view for {view} from a backup"),
            );
            return;
        }
        let Payload::NewView {
            view_changes,
            pre_prepares,
            ..
        } = &m.payload
        else {
            return;
        };
        let senders: BTreeSet<ReplicaId> = view_changes.iter().map(|v| v.from).collect();
        if senders.len() < self.quorum() || senders.len() != view_changes.len() {
            self.fault(
                m.from,
                FaultKind::BadNewView,
                "new-view without 2f+1 distinct view changes".into(),
            );
            return;
        }
        for vc in view_changes {
            if !matches!(vc.payload, Payload::ViewChange { view: v, .. } if v == view)
                || !self.members.verify(vc)
            {
                self.fault(
                    m.from,
                    FaultKind::BadNewView,
                    "new-view carries an invalid view change".into(),
                );
                return;
            }
            if let Err(e) = self.valid_view_change(vc) {
                self.fault(
                    m.from,
                    FaultKind::BadNewView,
                    format!("new-view carries a bad view change: {e}"),
                );
                return;
            }
        }
        let (_, _, _, plan) = self.new_view_plan(view_changes);
        let matches = plan.len() == pre_prepares.len()
            && plan.iter().zip(pre_prepares).all(|((seq, batch), pp)| {
                pp.from == m.from && matches!(&pp.payload, Payload::PrePrepare { view: v, seq: s, digest: d, .. } if *v == view && s == seq && *d == batch.digest())
            })
            && self.members.verify_all(pre_prepares);
        if !matches {
            self.fault(
                m.from,
                FaultKind::BadNewView,
                "new-view pre-prepares do not follow from its view changes".into(),
            );
            return;
        }
        if !self.replaying {
            self.emit(Action::Persist(Record::Accepted(m.clone())));
        }
        self.install_new_view(now, m);
    }

    fn install_new_view(&mut self, now: u64, nv: Signed) {
        let Payload::NewView {
            view,
            view_changes,
            pre_prepares,
        } = nv.payload.clone()
        else {
            return;
        };
        let (min_s, min_root, min_proof, _) = self.new_view_plan(&view_changes);
        self.view = view;
        self.view_active = true;
        self.new_view = Some(nv);
        self.suspects = self.suspects.split_off(&view);
        self.join_evidence.clear();
        self.decided_votes.clear();
        self.progress_deadline = None;
        if min_s > self.low {
            self.make_stable(min_s, min_root, min_proof);
        }
        // Slots above what we executed restart in the new view from the carried pre-prepares;
        // executed ones keep their certificates until a checkpoint collects them (others may
        // still need them to catch up).
        let keep = self.low.max(self.last_exec);
        self.slots.retain(|s, _| *s <= keep);
        let mut max_seq = self.low.max(self.last_exec);
        for pp in pre_prepares {
            if let Payload::PrePrepare {
                view: v,
                seq,
                digest,
                batch,
            } = pp.payload.clone()
            {
                max_seq = max_seq.max(seq);
                if seq > self.low && seq > self.last_exec {
                    self.accept_pre_prepare(now, pp, v, seq, digest, batch);
                } else if seq > self.low && self.executed.get(&seq) == Some(&digest) {
                    self.vote_decided(v, seq, digest);
                }
            }
        }
        self.next_seq = max_seq;
        self.gc();
        // Requests still waiting go to the new primary.
        if !self.queued.is_empty() {
            if self.is_primary() {
                self.batch_deadline = Some(now);
            } else if !self.replaying {
                let fwd = self.sign(Payload::Forward {
                    entries: self.queued_entries(),
                });
                let to = self.primary_of(view);
                self.emit(Action::Send { to, message: fwd });
            }
        }
        self.arm_progress_timer(now);
    }

    // ---- retransmission ----

    /// Messages may be lost; resend what others may still need.
    fn retransmit(&mut self) {
        if self.replaying {
            return;
        }
        let status = self.sign(Payload::Status {
            view: self.view,
            last_executed: self.last_exec,
        });
        self.emit(Action::Broadcast(status));
        // A state transfer in progress is retried whatever the view state.
        if self.fetching.is_some() {
            self.request_blocks();
        }
        // An unresolved suspicion of this view, and the suspicions we joined a view change on.
        let mut suspicions: Vec<Signed> = self
            .suspects
            .get(&self.view)
            .and_then(|s| s.get(&self.id))
            .filter(|_| self.suspecting)
            .into_iter()
            .cloned()
            .collect();
        if !self.view_active {
            suspicions.extend(self.join_evidence.iter().cloned());
        }
        for m in suspicions {
            self.emit(Action::Broadcast(m));
        }
        if !self.view_active {
            // Our last few VIEW-CHANGEs, not just the newest: others may still be gathering a
            // quorum for a view we moved past and have lost ours. (Never sent in reply to a
            // VIEW-CHANGE: replies to replies would ping-pong.)
            let ours: Vec<Signed> = self.own_view_changes.values().cloned().collect();
            for vc in ours {
                self.emit(Action::Broadcast(vc));
            }
            // Requests held here reach whoever is primary through the others.
            let entries = self.held_entries();
            if !entries.is_empty() {
                let fwd = self.sign(Payload::Forward { entries });
                self.emit(Action::Broadcast(fwd));
            }
            return;
        }
        if let Some(nv) = self.new_view.clone().filter(|_| self.is_primary()) {
            if self.slots.range(self.last_exec + 1..).next().is_some() {
                self.emit(Action::Broadcast(nv));
            }
        }
        let mut resend = Vec::new();
        for (_, slot) in self.slots.range(self.last_exec + 1..) {
            if let Some(pp) = &slot.pre_prepare {
                if pp.from == self.id {
                    resend.push(pp.clone());
                }
            }
            if let Some(p) = slot.prepares.get(&self.id) {
                resend.push(p.clone());
            }
            if let Some(c) = slot.commits.get(&self.id) {
                resend.push(c.clone());
            }
        }
        if let Some((_, cp)) = self.own_checkpoints.iter().next_back() {
            resend.push(cp.clone());
        }
        // Entries this replica was given that are neither proposed nor executed go (again) to
        // the primary, or into the primary's own queue.
        let lost: Vec<Vec<u8>> = self
            .waiting
            .iter()
            .filter(|(h, _)| !self.queued.contains(*h) && !self.in_flight_or_done(h))
            .map(|(_, e)| e.clone())
            .collect();
        if self.is_primary() {
            for e in lost {
                self.enqueue(e);
            }
            if !self.queued.is_empty() && self.batch_deadline.is_none() {
                self.batch_deadline = Some(0);
            }
        } else {
            let mut entries = self.queued_entries();
            entries.extend(lost);
            if !entries.is_empty() {
                resend.push(self.sign(Payload::Forward { entries }));
            }
        }
        for m in resend {
            if matches!(m.payload, Payload::Forward { .. }) {
                let to = self.primary_of(self.view);
                self.emit(Action::Send { to, message: m });
            } else {
                self.emit(Action::Broadcast(m));
            }
        }
    }

    // ---- plumbing ----

    fn emit(&mut self, a: Action) {
        if !self.replaying {
            self.step.actions.push(a);
        }
    }

    fn fault(&mut self, from: ReplicaId, kind: FaultKind, detail: String) {
        if !self.replaying {
            self.step.faults.push(Fault { from, kind, detail });
        }
    }

    fn take_step(&mut self) -> Step {
        std::mem::take(&mut self.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::message::test_key;

    fn members(n: u32) -> Membership {
        Membership::new(
            "budget",
            (0..n).map(|i| test_key(5, i).verifying_key()).collect(),
        )
    }

    /// The largest NEW-VIEW the protocol can build: 2f+1 VIEW-CHANGEs, each with a stable
    /// checkpoint proof and a prepared certificate for every slot of the window carrying a full
    /// batch, and pre-prepares for all of them. It must fit the message limit.
    #[test]
    fn the_largest_new_view_fits_the_message_limit() {
        for (n, cfg) in [
            (4, Config::default()),
            (4, crate::node::consensus(500, 512)),
            (7, crate::node::consensus(500, 512)),
        ] {
            let m = members(n);
            let quorum = 2 * ((n as usize - 1) / 3) + 1;
            let r = Replica::new(0, cfg.clone(), test_key(5, 0), m.clone());
            // One entry filling the batch.
            let batch = Batch {
                timestamp: u64::MAX,
                entries: vec![vec![7u8; r.max_entry_bytes()]],
            };
            let digest = batch.digest();
            let stable = u64::MAX / 2;
            let proof: Vec<Signed> = (0..quorum as u32)
                .map(|i| {
                    m.sign(
                        &test_key(5, i),
                        i,
                        Payload::Checkpoint {
                            seq: stable,
                            root: [1; 32],
                        },
                    )
                })
                .collect();
            let pre_prepare = |seq| {
                m.sign(
                    &test_key(5, 0),
                    0,
                    Payload::PrePrepare {
                        view: u64::MAX,
                        seq,
                        digest,
                        batch: batch.clone(),
                    },
                )
            };
            let prepared: Vec<Prepared> = (1..=cfg.window)
                .map(|k| Prepared {
                    pre_prepare: pre_prepare(stable + k),
                    prepares: (1..quorum as u32)
                        .map(|i| {
                            m.sign(
                                &test_key(5, i),
                                i,
                                Payload::Prepare {
                                    view: u64::MAX,
                                    seq: stable + k,
                                    digest,
                                },
                            )
                        })
                        .collect(),
                })
                .collect();
            let view_changes: Vec<Signed> = (0..quorum as u32)
                .map(|i| {
                    m.sign(
                        &test_key(5, i),
                        i,
                        Payload::ViewChange {
                            view: u64::MAX,
                            stable_seq: stable,
                            stable_root: [1; 32],
                            proof: proof.clone(),
                            prepared: prepared.clone(),
                        },
                    )
                })
                .collect();
            let nv = m.sign(
                &test_key(5, 0),
                0,
                Payload::NewView {
                    view: u64::MAX,
                    view_changes,
                    pre_prepares: (1..=cfg.window).map(|k| pre_prepare(stable + k)).collect(),
                },
            );
            assert!(
                encoded_len(&nv) <= cfg.max_message_bytes,
                "n = {n}: a NEW-VIEW of {} bytes exceeds the limit of {}",
                encoded_len(&nv),
                cfg.max_message_bytes
            );
            // And the budget is not needlessly small: within 10% of the limit.
            assert!(
                encoded_len(&nv) * 10 >= cfg.max_message_bytes * 9,
                "n = {n}: {} bytes",
                encoded_len(&nv)
            );
        }
    }

    fn proposed(step: &Step) -> Vec<Seq> {
        step.actions
            .iter()
            .filter_map(|a| match a {
                Action::Broadcast(Signed {
                    payload: Payload::PrePrepare { seq, .. },
                    ..
                }) => Some(*seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_idle_primary_proposes_at_once_and_a_busy_one_gathers_a_batch() {
        let cfg = Config {
            batch_delay: 10,
            ..Config::default()
        };
        let mut r = Replica::new(0, cfg, test_key(5, 0), members(4));
        // Nothing in flight: what arrived in this round of inputs goes out now.
        assert!(proposed(&r.handle_request(0, vec![1])).is_empty());
        assert!(proposed(&r.handle_request(0, vec![2])).is_empty());
        assert_eq!(proposed(&r.handle_inputs_drained(0)), vec![1]);
        // Batch 1 is still being agreed on: the next entries wait for the batch delay.
        let _ = r.handle_request(1, vec![3]);
        let _ = r.handle_request(2, vec![4]);
        // (Ticks also retransmit batch 1.)
        assert!(!proposed(&r.handle_inputs_drained(2)).contains(&2));
        assert!(!proposed(&r.handle_tick(9)).contains(&2));
        assert!(proposed(&r.handle_tick(11)).contains(&2));
    }

    #[test]
    fn an_idle_primary_spaces_proposals_by_the_size_of_its_last_batch() {
        let cfg = Config {
            batch_delay: 10,
            spacing_per_1000_entries: 2000,
            ..Config::default()
        };
        // Alone (n = 1) a proposal executes at once, so the primary is idle after each one.
        let mut r = Replica::new(0, cfg, test_key(5, 0), members(1));
        let _ = r.handle_request(0, vec![1]);
        assert_eq!(proposed(&r.handle_inputs_drained(0)), vec![1]);
        assert_eq!(r.last_executed(), 1);
        // The last batch held one entry: the next waits 2 ticks after it.
        for e in 2..=4 {
            let _ = r.handle_request(1, vec![e]);
        }
        assert!(proposed(&r.handle_inputs_drained(1)).is_empty());
        assert_eq!(proposed(&r.handle_tick(2)), vec![2]);
        assert_eq!(r.last_executed(), 2);
        // Three entries: 6 ticks.
        let _ = r.handle_request(3, vec![5]);
        assert!(proposed(&r.handle_inputs_drained(3)).is_empty());
        assert!(proposed(&r.handle_tick(7)).is_empty());
        assert_eq!(proposed(&r.handle_tick(8)), vec![3]);
        // Light load again: long after the last proposal, an entry goes out as it arrives.
        let _ = r.handle_request(50, vec![6]);
        assert_eq!(proposed(&r.handle_inputs_drained(50)), vec![4]);
        // However large the last batch, no entry waits longer than the batch delay.
        for e in 7..20 {
            let _ = r.handle_request(60, vec![e]);
        }
        assert_eq!(proposed(&r.handle_inputs_drained(60)), vec![5]);
        let _ = r.handle_request(61, vec![20]);
        assert!(proposed(&r.handle_inputs_drained(61)).is_empty());
        assert!(proposed(&r.handle_tick(69)).is_empty());
        assert_eq!(proposed(&r.handle_tick(70)), vec![6]);
    }

    #[test]
    fn proposal_spacing_can_be_a_fraction_of_a_tick_per_entry() {
        let cfg = Config {
            batch_delay: 10,
            spacing_per_1000_entries: 500,
            ..Config::default()
        };
        let mut r = Replica::new(0, cfg, test_key(5, 0), members(1));
        // Half a tick per entry: after a lone entry (0 ticks) the next goes out at once.
        let _ = r.handle_request(0, vec![1]);
        assert_eq!(proposed(&r.handle_inputs_drained(0)), vec![1]);
        let _ = r.handle_request(0, vec![2]);
        let _ = r.handle_request(0, vec![3]);
        let _ = r.handle_request(0, vec![4]);
        assert_eq!(proposed(&r.handle_inputs_drained(0)), vec![2]);
        // Three entries: 1.5 ticks, rounded down to 1.
        let _ = r.handle_request(0, vec![5]);
        assert!(proposed(&r.handle_inputs_drained(0)).is_empty());
        assert_eq!(proposed(&r.handle_tick(1)), vec![3]);
    }

    #[test]
    fn a_backup_passes_a_rounds_entries_to_the_primary_in_one_forward() {
        let forwards = |step: &Step| -> Vec<(ReplicaId, Vec<Vec<u8>>)> {
            step.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Send {
                        to,
                        message:
                            Signed {
                                payload: Payload::Forward { entries },
                                ..
                            },
                    } => Some((*to, entries.clone())),
                    _ => None,
                })
                .collect()
        };
        let mut r = Replica::new(2, Config::default(), test_key(5, 2), members(4));
        for e in 1..=3u8 {
            assert!(forwards(&r.handle_request(0, vec![e])).is_empty());
        }
        assert_eq!(
            forwards(&r.handle_inputs_drained(0)),
            vec![(0, vec![vec![1], vec![2], vec![3]])]
        );
        // Passed on once: the next round has nothing to forward.
        assert!(forwards(&r.handle_inputs_drained(1)).is_empty());
        // More than fits one batch goes in several FORWARDs, none over the batch budget.
        let big = r.max_entry_bytes() / 2 + 1;
        for e in 0..3u8 {
            let _ = r.handle_request(2, vec![e; big]);
        }
        let sent = forwards(&r.handle_inputs_drained(2));
        assert_eq!(sent.len(), 3, "each entry fills more than half a batch");
        assert!(sent
            .iter()
            .all(|(to, entries)| *to == 0 && entries.len() == 1));
    }

    #[test]
    fn votes_that_can_change_nothing_are_dropped_before_their_signature_is_checked() {
        let m = members(4);
        let mut r = Replica::new(1, Config::default(), test_key(5, 1), m.clone());
        let batch = Batch {
            timestamp: 1,
            entries: vec![vec![1]],
        };
        let digest = batch.digest();
        let signed = |by: u32, from: u32, payload: Payload| m.sign(&test_key(5, by), from, payload);
        let prepare = |seq| Payload::Prepare {
            view: 0,
            seq,
            digest,
        };
        let commit = |seq| Payload::Commit {
            view: 0,
            seq,
            digest,
        };
        let bad_signatures = |step: Step| {
            step.faults
                .iter()
                .filter(|f| f.kind == FaultKind::BadSignature)
                .count()
        };
        let pp = Payload::PrePrepare {
            view: 0,
            seq: 1,
            digest,
            batch,
        };
        let _ = r.handle_message(0, signed(0, 0, pp));
        // A forged prepare while the slot is still preparing is caught…
        assert_eq!(
            bad_signatures(r.handle_message(0, signed(2, 3, prepare(1)))),
            1
        );
        let _ = r.handle_message(0, signed(2, 2, prepare(1)));
        assert!(r.slots[&1].prepared);
        // …but once prepared, a third prepare cannot matter and is not checked.
        assert_eq!(
            bad_signatures(r.handle_message(0, signed(2, 3, prepare(1)))),
            0
        );
        let _ = r.handle_message(0, signed(0, 0, commit(1)));
        let _ = r.handle_message(0, signed(2, 2, commit(1)));
        assert_eq!(r.last_exec, 1, "own commit and two others execute block 1");
        // A commit for an executed block is dropped unchecked; one for the next block is not.
        assert_eq!(
            bad_signatures(r.handle_message(0, signed(2, 3, commit(1)))),
            0
        );
        assert_eq!(
            bad_signatures(r.handle_message(0, signed(2, 3, commit(2)))),
            1
        );
    }

    #[test]
    fn a_primary_cuts_batches_by_bytes_and_refuses_entries_larger_than_a_batch() {
        let cfg = Config {
            max_message_bytes: 1 << 20,
            ..Config::default()
        };
        let mut r = Replica::new(0, cfg.clone(), test_key(5, 0), members(4));
        let big = r.max_entry_bytes();
        let refused = r.handle_request(0, vec![1u8; big + 1]);
        assert!(
            refused.actions.is_empty(),
            "an oversized entry is not proposed"
        );
        // Proposals by sequence number (retransmissions repeat them).
        let mut batches = BTreeMap::new();
        let mut steps = Vec::new();
        for i in 0..10u8 {
            steps.push(r.handle_request(u64::from(i), vec![i; big / 3]));
        }
        for t in 10..20 {
            steps.push(r.handle_tick(t * cfg.batch_delay));
        }
        for step in steps {
            for a in step.actions {
                if let Action::Broadcast(Signed {
                    payload: Payload::PrePrepare { seq, batch, .. },
                    ..
                }) = a
                {
                    batches.insert(seq, batch);
                }
            }
        }
        assert!(
            batches.len() >= 4,
            "10 entries of a third of a batch need at least 4 batches: {}",
            batches.len()
        );
        for b in batches.values() {
            let bytes = b
                .entries
                .iter()
                .fold(BATCH_HEADER_BYTES, |n, e| batch_size_with(n, e));
            assert!(
                bytes <= r.batch_bytes,
                "a batch of {bytes} bytes over the budget {}",
                r.batch_bytes
            );
        }
        assert_eq!(batches.values().map(|b| b.entries.len()).sum::<usize>(), 10);
    }
}

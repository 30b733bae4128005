//! The transaction log: the one narrow interface every change passes through.
//!
//! `TxLog::submit` takes an atomic list of `Change`s and answers once they are committed on
//! the ledger and durable here. A single commit thread evaluates submissions in one serial
//! order (preconditions, If-Match, conditional operations) against this node's state, seals
//! each successful one into a signed ledger entry (`crate::ledger::entry`) with a salted
//! commitment per new version, makes its pending writes durable, and submits the entries to
//! the embedded PBFT replica. Executed blocks come back in ledger order — this node's entries
//! and every other organization's — and are applied one synced WriteBatch per block; only then
//! are clients answered. Whatever arrived while the ledger worked forms the next group, so
//! many writers share each round trip and each fsync.

use std::collections::{BTreeMap, HashMap, VecDeque};

use indexmap::IndexMap;
use rustc_hash::FxBuildHasher;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::core::{block_leaf, Batch};
use ledger::node::{Embedded, Event};
use sha2::{Digest as _, Sha256};

use rocksdb::{WriteBatch, WriteOptions};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::objects::{object_name, ObjectName};
use super::{ledger_key, resource_key, version_key, Current, Method, Store, Version};
use super::{
    CF_CURRENT, CF_HISTORY, CF_INDEX, CF_KEYS, CF_LEDGER, CF_META, CF_OBJECTS, CF_TYPE_HISTORY,
    CF_VALUES, CF_VERSIONS, COLUMN_FAMILIES, META_APPLIED_SEQ, META_LAST_TS, META_LAST_TX,
    META_LEDGER_ROOT,
};
use crate::consent::ConsentPolicy;
use crate::error::{Error, Result};
use crate::fhir::{format_instant, new_id, now_ms, ResourceType};
use crate::health::Health;
use crate::ledger::entry::{self, LedgerEntry, VersionRecord};
use crate::ledger::replica::ReplicaSetup;
use crate::ledger::{BlockInfo, LedgerHead, RecordRef, StableCheckpoint};
use crate::search::keys::{index_entries, values_keys, ValueRecord};
use crate::search::query::SearchQuery;
use crate::search::value::IndexValue;
use crate::search::{exec, Registry};

/// How many submissions one group commit takes at most.
const MAX_GROUP: usize = 512;
/// How often applied state is synced so the replica can drop the sidecars kept for replay.
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// How many submissions may wait for the ledger at once (across groups).
const MAX_IN_FLIGHT: usize = 4096;

/// One change to one resource. A list of them is applied all-or-nothing.
#[derive(Debug, Clone)]
pub enum Change {
    /// Create with a server-assigned id; with `if_none_exist`, only when nothing matches.
    Create {
        rtype: ResourceType,
        id: String,
        resource: Value,
        if_none_exist: Option<SearchQuery>,
        on_match: OnMatch,
    },
    /// Update, or create with the client's id.
    Update {
        rtype: ResourceType,
        id: String,
        resource: Value,
        if_match: Option<u64>,
        method: Method,
    },
    /// Update the single resource the query matches (create when none does).
    ConditionalUpdate {
        rtype: ResourceType,
        query: SearchQuery,
        resource: Value,
        if_match: Option<u64>,
    },
    Delete {
        rtype: ResourceType,
        id: String,
        if_match: Option<u64>,
    },
    /// Delete the single resource the query matches.
    ConditionalDelete {
        rtype: ResourceType,
        query: SearchQuery,
    },
}

impl Change {
    fn needs_search(&self) -> bool {
        matches!(
            self,
            Change::Create {
                if_none_exist: Some(_),
                ..
            } | Change::ConditionalUpdate { .. }
                | Change::ConditionalDelete { .. }
        )
    }
}

/// What a conditional create does when its condition matches at commit time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMatch {
    /// Answer with the existing resource (a plain conditional create).
    ReturnExisting,
    /// Fail: a transaction already resolved the condition to "no match" and its other entries
    /// refer to the new id.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Deleted,
    /// A conditional create found a match; nothing was written.
    Existing,
    /// A delete found nothing to delete; nothing was written.
    NoOp,
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub outcome: Outcome,
    /// The stored JSON (None for deletes and no-ops).
    pub body: Option<Arc<[u8]>>,
    /// The salted commitment to the stored JSON (None for deletes and no-ops).
    pub commitment: Option<[u8; 32]>,
    /// The patient compartments the new version belongs to.
    pub patients: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Committed {
    /// Position in the log; 0 when nothing was written.
    pub tx: u64,
    pub applied: Vec<Applied>,
    /// The AuditEvent committed in the same ledger entry, if the submission carried one.
    pub audit: Option<Applied>,
}

/// What one client asks to commit, all or nothing, as one ledger entry.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub changes: Vec<Change>,
    /// Who acts (client id and user), recorded in the ledger entry.
    pub actor: String,
    /// An AuditEvent to commit in the same entry as the changes. The commit thread adds an
    /// entity for each version written (which is known only there) before storing it.
    pub audit: Option<Value>,
}

impl Submission {
    pub fn new(changes: Vec<Change>, actor: impl Into<String>) -> Submission {
        Submission {
            changes,
            actor: actor.into(),
            audit: None,
        }
    }
}

pub trait TxLog: Send + Sync {
    fn submit(&self, submission: Submission) -> oneshot::Receiver<Result<Committed>>;
    /// Start re-wrapping every data key under `kek`, online (see `Rotation`). Returns once the
    /// rotation has started; `Health` reports when it is complete.
    fn rotate_kek(&self, kek: super::envelope::Kek) -> oneshot::Receiver<Result<()>>;
}

struct Job {
    submission: Submission,
    reply: oneshot::Sender<Result<Committed>>,
}

enum Input {
    Job(Job),
    Ledger(Event),
    RotateKek(super::envelope::Kek, oneshot::Sender<Result<()>>),
}

/// A KEK rotation in a running node, driven by the commit thread (the only writer of data
/// keys), so writes go on throughout:
///
/// 1. the envelope wraps new data keys under the new KEK from now on; keys under the old one
///    still open;
/// 2. each round re-wraps a slice of the `keys` family (applied entries' new keys are re-wrapped
///    as they are applied, so a key sealed before the switch never lands under the old KEK);
/// 3. once the scan is done and every entry sealed before the switch has been applied, the store
///    is synced and those entries' sidecars released (a replay can no longer bring an old-KEK
///    key back); a last scan finds no key under the old KEK; the check record is sealed under
///    the new KEK, and the old one is no longer needed.
///
/// A crash before the end is finished at the next start with both KEKs (`--previous-kek-file`).
struct Rotation {
    /// Entries sealed before the switch, not yet applied.
    before: std::collections::HashSet<[u8; 32]>,
    /// Where the next slice of the scan starts; None once the scan is done.
    cursor: Option<Vec<u8>>,
}

/// Data keys re-wrapped per round during an online rotation.
const REWRAP_PER_ROUND: usize = 2_000;

/// How long a write waits for the ledger, by default, before its client is told the outcome
/// is unknown.
pub const LEDGER_TIMEOUT: Duration = Duration::from_secs(30);

/// The TxLog of a ledger replica: the commit thread evaluates submissions serially against
/// this node's state, seals each into a signed ledger entry, and applies it only when the
/// ledger executes it (after 2f+1 replicas committed it), in ledger order, with every other
/// organization's entries. Nothing is acknowledged before that.
pub struct LedgerTxLog {
    sender: std::sync::Mutex<mpsc::Sender<Input>>,
    pub health: Arc<Health>,
}

impl LedgerTxLog {
    pub fn start(
        store: Arc<Store>,
        registry: Arc<Registry>,
        base: String,
        replica: &ReplicaSetup,
        timeout: Duration,
    ) -> Result<LedgerTxLog> {
        let (sender, receiver) = mpsc::channel::<Input>();
        let (applied, _) = store.applied()?;
        let events = sender.clone();
        let embedded = replica.start(applied, move |ev| {
            let _ = events.send(Input::Ledger(ev));
        })?;
        let health = Arc::new(Health::new(embedded.status.clone()));
        let mut committer =
            Committer::new(store, registry, base, replica, embedded, health.clone())?;
        committer.timeout = timeout;
        std::thread::Builder::new()
            .name("fhirmament-commit".into())
            .spawn(move || committer.run(receiver))
            .map_err(|e| Error::Internal(format!("cannot start the commit thread: {e}")))?;
        Ok(LedgerTxLog {
            sender: std::sync::Mutex::new(sender),
            health,
        })
    }
}

impl TxLog for LedgerTxLog {
    fn rotate_kek(&self, kek: super::envelope::Kek) -> oneshot::Receiver<Result<()>> {
        let (reply, rx) = oneshot::channel();
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(Input::RotateKek(_, reply))) =
            sender.send(Input::RotateKek(kek, reply))
        {
            let _ = reply.send(Err(Error::Storage("the commit thread has stopped".into())));
        }
        rx
    }

    fn submit(&self, submission: Submission) -> oneshot::Receiver<Result<Committed>> {
        let (reply, rx) = oneshot::channel();
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(Input::Job(job))) =
            sender.send(Input::Job(Job { submission, reply }))
        {
            let _ = job
                .reply
                .send(Err(Error::Storage("the commit thread has stopped".into())));
        }
        rx
    }
}

/// A pending write's value, shared (not copied) between the overlays, the unapplied map and
/// the round's batch that all hold it until it is written.
type Shared = Option<Arc<Vec<u8>>>;

/// A pending write's key: its column family and key bytes.
type WriteKey = (&'static str, Vec<u8>);

/// Pending writes in the order first written, found by key without copying it (`KeyRef`).
type Writes<V> = IndexMap<WriteKey, V, FxBuildHasher>;

/// A `WriteKey` borrowed, to look one up: hashes and compares as the owned key does.
#[derive(Hash, PartialEq, Eq)]
struct KeyRef<'a>(&'static str, &'a [u8]);

impl indexmap::Equivalent<WriteKey> for KeyRef<'_> {
    fn equivalent(&self, key: &WriteKey) -> bool {
        self.0 == key.0 && self.1 == key.1.as_slice()
    }
}

/// Pending writes of one group, readable before they are durable, in the order they were
/// first made (a later write of a key replaces the value, not the position).
#[derive(Default, Clone)]
struct Overlay {
    writes: Writes<Shared>,
}

impl Overlay {
    fn put(&mut self, cf: &'static str, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.put_shared(cf, key, value.map(Arc::new));
    }
    fn put_shared(&mut self, cf: &'static str, key: Vec<u8>, value: Shared) {
        self.writes.insert((cf, key), value);
    }
    fn get(&self, cf: &'static str, key: &[u8]) -> Option<&Shared> {
        self.writes.get(&KeyRef(cf, key))
    }
    fn merge(&mut self, other: &Overlay) {
        for ((cf, key), v) in &other.writes {
            self.put_shared(cf, key.clone(), v.clone());
        }
    }
    /// `tx(8) ts(8)` then, per write: family index(1), key length(4), key, present(1),
    /// value length(4), value.
    fn encode(&self, tx: u64, ts: i64) -> Vec<u8> {
        let mut out = tx.to_be_bytes().to_vec();
        out.extend_from_slice(&ts.to_be_bytes());
        for (k, v) in &self.writes {
            let cf = COLUMN_FAMILIES
                .iter()
                .position(|c| *c == k.0)
                .expect("declared family");
            out.push(cf as u8);
            out.extend_from_slice(&(k.1.len() as u32).to_be_bytes());
            out.extend_from_slice(&k.1);
            match v {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Option<(u64, i64, Overlay)> {
        use crate::ledger::{take, take_u32, take_u64};
        let mut b = b;
        let b = &mut b;
        let tx = take_u64(b)?;
        let ts = take_u64(b)? as i64;
        let mut o = Overlay::default();
        while !b.is_empty() {
            let cf = *COLUMN_FAMILIES.get(take(b, 1)?[0] as usize)?;
            let klen = take_u32(b)? as usize;
            let key = take(b, klen)?.to_vec();
            let value = match take(b, 1)?[0] {
                0 => None,
                _ => {
                    let vlen = take_u32(b)? as usize;
                    Some(take(b, vlen)?.to_vec())
                }
            };
            o.put(cf, key, value);
        }
        Some((tx, ts, o))
    }
}

/// A round's writes, kept sorted by column family and key: RocksDB inserts a batch into its
/// memtable skiplists far faster in key order (each insert starts from the previous one's
/// position) than in the order the writes were produced. A later write of a key replaces an
/// earlier one, as in a WriteBatch.
#[derive(Default)]
struct SortedBatch {
    /// Column family -> key -> value (None deletes); a key is found by its bytes alone.
    writes: BTreeMap<&'static str, BTreeMap<Vec<u8>, Shared>>,
}

impl SortedBatch {
    fn put(&mut self, cf: &'static str, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.set(cf, key.as_ref(), Some(Arc::new(value.as_ref().to_vec())));
    }
    fn put_shared(&mut self, cf: &'static str, key: &[u8], value: Arc<Vec<u8>>) {
        self.set(cf, key, Some(value));
    }
    fn delete(&mut self, cf: &'static str, key: impl AsRef<[u8]>) {
        self.set(cf, key.as_ref(), None);
    }
    fn set(&mut self, cf: &'static str, key: &[u8], value: Shared) {
        self.writes
            .entry(cf)
            .or_default()
            .insert(key.to_vec(), value);
    }
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
    /// A write of this round to the key: Some(None) for a delete, None when it has none.
    fn get(&self, cf: &'static str, key: &[u8]) -> Option<Option<&Vec<u8>>> {
        self.writes.get(cf)?.get(key).map(Option::as_deref)
    }
    /// This round's new objects (for an object store of their own).
    fn objects(&self) -> Vec<(ObjectName, Vec<u8>)> {
        self.writes
            .get(CF_OBJECTS)
            .into_iter()
            .flatten()
            .filter_map(|(name, bytes)| {
                Some((name.as_slice().try_into().ok()?, bytes.as_deref()?.clone()))
            })
            .collect()
    }
    /// The RocksDB batch, without the objects when they are kept elsewhere.
    fn write_batch(&self, store: &Store, with_objects: bool) -> WriteBatch {
        let mut wb = WriteBatch::default();
        for (cf, family) in &self.writes {
            if *cf == CF_OBJECTS && !with_objects {
                continue;
            }
            let handle = store.cf(cf);
            for (key, value) in family {
                match value {
                    Some(v) => wb.put_cf(handle, key, &***v),
                    None => wb.delete_cf(handle, key),
                }
            }
        }
        wb
    }
}

/// A round's batch on its way to the store, with the answers that wait for it.
struct RoundWrite {
    batch: Arc<SortedBatch>,
    replies: Vec<(oneshot::Sender<Result<Committed>>, Result<Committed>)>,
}

/// How many round batches the writer has written, for the commit thread to wait on.
#[derive(Default)]
struct Written {
    rounds: std::sync::Mutex<u64>,
    cond: std::sync::Condvar,
}

/// The store writer: writes the commit thread's round batches in order, then answers the
/// clients whose entries each one applied. Inserting a round's writes into the memtables is
/// a large share of a write's cost; on a thread of its own it overlaps with the commit thread
/// evaluating the next group, which reads through the batches not yet written (`unwritten`).
fn write_rounds(store: Arc<Store>, rounds: mpsc::Receiver<RoundWrite>, written: Arc<Written>) {
    let embedded = store.objects().is_embedded();
    for RoundWrite { batch, replies } in rounds {
        #[cfg(test)]
        std::thread::sleep(Duration::from_millis(
            tests::SLOW_WRITER_MS.load(std::sync::atomic::Ordering::Relaxed),
        ));
        // An object store of its own holds the sealed versions before any entry names them
        // (a failure here is like a failed batch: the sidecars replay them).
        if !embedded {
            let objects = batch.objects();
            if !objects.is_empty() {
                if let Err(e) = store.put_objects(objects) {
                    tracing::error!(error = %e, "cannot store sealed versions; stopping");
                    std::process::exit(70);
                }
            }
        }
        // Not synced: the ledger's store already holds these blocks and the sidecars of this
        // node's entries durably, and replays them after a crash.
        if let Err(e) = store.db().write(batch.write_batch(&store, embedded)) {
            // Committed blocks this node cannot record: stop rather than diverge. On restart
            // they are replayed from the replica's store.
            tracing::error!(error = %e, "cannot persist applied ledger blocks; stopping");
            std::process::exit(70);
        }
        drop(batch);
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        *written.rounds.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        written.cond.notify_all();
    }
}

/// What one round of the commit thread makes durable together.
#[derive(Default)]
struct Round {
    batch: SortedBatch,
    /// Ledger heads changed by this round's blocks (not in the store until the batch is).
    heads: HashMap<Vec<u8>, LedgerHead>,
    /// This node's entries applied (true) or refused (false), with their writes.
    verdicts: Vec<([u8; 32], bool, Option<Overlay>)>,
    /// The last block applied in the round and the root after it.
    applied: Option<(u64, [u8; 32])>,
}

/// A sealed submission: entry hash, entry bytes, its waiting client, tx, timestamp, writes.
type Sealed = ([u8; 32], Vec<u8>, InFlight, u64, i64, Overlay);

/// A submission sealed into a ledger entry and waiting for the ledger to execute it.
struct InFlight {
    reply: oneshot::Sender<Result<Committed>>,
    committed: Committed,
    since: Instant,
}

struct Committer {
    store: Arc<Store>,
    registry: Arc<Registry>,
    base: String,
    last_tx: u64,
    last_ts: i64,
    /// This replica: the holder of what it accepts.
    me: u32,
    chain_id: String,
    key: ed25519_dalek::SigningKey,
    members: ledger::core::Membership,
    replica: Embedded,
    /// By sha256 of the sealed entry.
    inflight: HashMap<[u8; 32], InFlight>,
    /// Pending writes of entries this node submitted, by the same hash (also durable under
    /// `p` in the ledger family, for entries that execute after a restart).
    pending: HashMap<[u8; 32], (u64, i64, Overlay)>,
    queued: VecDeque<Job>,
    /// This node's entries applied since the store was last synced: their sidecars in the
    /// replica's store are still needed for replay.
    unreleased: Vec<[u8; 32]>,
    last_sync: Instant,
    /// Writes of submitted entries not yet applied, with the entry that wrote each last:
    /// later submissions are evaluated on top of them (pipelining).
    unapplied: Writes<(Shared, [u8; 32])>,
    applied_seq: u64,
    ledger_root: [u8; 32],
    /// Round batches handed to the writer and not yet written, oldest first: (round number,
    /// batch, this node's entries it applied). Reads go through them, newest first, before
    /// the store.
    unwritten: VecDeque<(u64, Arc<SortedBatch>, Vec<[u8; 32]>)>,
    /// Rounds handed to the writer so far.
    handed: u64,
    writer: mpsc::SyncSender<RoundWrite>,
    written: Arc<Written>,
    health: Arc<Health>,
    timeout: Duration,
    rotation: Option<Rotation>,
}

fn read_counter(store: &Store, key: &[u8]) -> Result<u64> {
    Ok(store
        .db()
        .get_cf(store.cf(CF_META), key)?
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

impl Committer {
    fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        base: String,
        replica: &ReplicaSetup,
        embedded: Embedded,
        health: Arc<Health>,
    ) -> Result<Committer> {
        let last_tx = read_counter(&store, META_LAST_TX)?;
        let last_ts = read_counter(&store, META_LAST_TS)? as i64;
        let (applied_seq, ledger_root) = store.applied()?;
        let written = Arc::new(Written::default());
        // A few rounds may wait to be written; beyond that the commit thread waits too.
        let (writer, rounds) = mpsc::sync_channel(4);
        {
            let (store, written) = (store.clone(), written.clone());
            std::thread::Builder::new()
                .name("fhirmament-write".into())
                .spawn(move || write_rounds(store, rounds, written))
                .map_err(|e| Error::Internal(format!("cannot start the store writer: {e}")))?;
        }
        Ok(Committer {
            store,
            registry,
            base,
            last_tx,
            last_ts,
            me: replica.id,
            chain_id: replica.membership.chain_id.clone(),
            key: replica.key.clone(),
            members: replica.membership.clone(),
            replica: embedded,
            inflight: HashMap::new(),
            pending: HashMap::new(),
            queued: VecDeque::new(),
            unapplied: Writes::default(),
            unreleased: Vec::new(),
            last_sync: Instant::now(),
            applied_seq,
            ledger_root,
            unwritten: VecDeque::new(),
            handed: 0,
            writer,
            written,
            health,
            timeout: LEDGER_TIMEOUT,
            rotation: None,
        })
    }

    /// One round: take what arrived, apply the executed blocks, evaluate and seal the queued
    /// submissions, make all of it durable with one synced WriteBatch, then answer the clients
    /// whose entries were applied and hand the new entries to the replica.
    fn run(&mut self, receiver: mpsc::Receiver<Input>) {
        self.report_kek();
        loop {
            self.report_health();
            let first = if !self.can_submit() {
                let wait = if self.inflight.is_empty() { 1000 } else { 100 };
                match receiver.recv_timeout(Duration::from_millis(wait)) {
                    Ok(i) => Some(i),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let mut inputs: Vec<Input> = first.into_iter().collect();
            while inputs.len() < 4 * MAX_GROUP {
                match receiver.try_recv() {
                    Ok(i) => inputs.push(i),
                    Err(_) => break,
                }
            }
            let mut round = Round::default();
            for input in inputs {
                match input {
                    Input::Job(j) => self.queued.push_back(j),
                    Input::Ledger(ev) => self.on_ledger_event(&mut round, ev),
                    Input::RotateKek(kek, reply) => {
                        let _ = reply.send(self.begin_rotation(kek));
                    }
                }
            }
            self.expire();
            let sealed = if self.can_submit() {
                self.submit_group()
            } else {
                Vec::new()
            };
            self.finish(round, sealed);
            self.drain_written(false);
            self.release_durable();
            if let Err(e) = self.advance_rotation() {
                tracing::error!(error = %e, "the key-encryption key rotation could not proceed; it is retried");
            }
        }
    }

    fn begin_rotation(&mut self, kek: super::envelope::Kek) -> Result<()> {
        let envelope = self.store.envelope();
        envelope
            .begin_rotation(kek)
            .map_err(Error::VersionConflict)?;
        self.rotation = Some(Rotation {
            before: self.pending.keys().copied().collect(),
            cursor: Some(Vec::new()),
        });
        self.report_kek();
        tracing::info!(
            kek = %envelope.kek().kid,
            previous = %envelope.previous().map(|k| k.kid).unwrap_or_default(),
            "key-encryption key rotation started: re-wrapping every data key while serving"
        );
        Ok(())
    }

    fn report_kek(&self) {
        let envelope = self.store.envelope();
        *self.health.kek.lock().unwrap_or_else(|p| p.into_inner()) =
            (envelope.kek().kid, envelope.previous().map(|k| k.kid));
    }

    /// One step of an online rotation (see `Rotation`), after this round's batch was written.
    fn advance_rotation(&mut self) -> Result<()> {
        let Some(rotation) = &mut self.rotation else {
            return Ok(());
        };
        let store = self.store.clone();
        let envelope = store.envelope();
        if let Some(from) = rotation.cursor.take() {
            let mut batch = WriteBatch::default();
            let mut seen = 0;
            let mut next = None;
            for item in store.db().iterator_cf(
                store.cf(CF_KEYS),
                rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
            ) {
                let (scope, wrapped) = item?;
                if seen == REWRAP_PER_ROUND {
                    next = Some(scope.to_vec());
                    break;
                }
                seen += 1;
                if let Some(new) = envelope.rewrap(&wrapped)? {
                    batch.put_cf(store.cf(CF_KEYS), scope, new);
                }
            }
            // A re-wrapped key opens exactly as before, so its write needs no ordering with
            // the round's own (which only ever add keys for new scopes).
            store.db().write(batch)?;
            rotation.cursor = next;
            return Ok(());
        }
        rotation.before.retain(|h| self.pending.contains_key(h));
        if !rotation.before.is_empty() {
            return Ok(());
        }
        // Everything sealed before the switch is applied: make it durable and let its sidecars
        // go, so no replay can bring back a key wrapped under the old KEK.
        self.drain_written(true);
        store.db().flush_wal(true)?;
        self.last_sync = Instant::now();
        self.replica.release(std::mem::take(&mut self.unreleased));
        let mut left = 0;
        for item in store
            .db()
            .iterator_cf(store.cf(CF_KEYS), rocksdb::IteratorMode::Start)
        {
            let (_, wrapped) = item?;
            if envelope.rewrap(&wrapped)?.is_some() {
                left += 1;
            }
        }
        if left > 0 {
            tracing::warn!(
                left,
                "data keys still under the previous KEK; scanning again"
            );
            if let Some(rotation) = &mut self.rotation {
                rotation.cursor = Some(Vec::new());
            }
            return Ok(());
        }
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        store.db().put_cf_opt(
            store.cf(CF_META),
            super::META_KEK_CHECK,
            envelope.kek().check_record()?,
            &sync,
        )?;
        let previous = envelope.previous().map(|k| k.kid).unwrap_or_default();
        envelope.finish_rotation();
        self.rotation = None;
        self.report_kek();
        tracing::info!(
            kek = %envelope.kek().kid,
            previous = %previous,
            "key-encryption key rotated online: every data key is wrapped under it; the previous KEK can be retired"
        );
        Ok(())
    }

    /// Forget the round batches the writer has written (their entries' sidecars may be
    /// released at the next sync); with `all`, first wait until it has written every one.
    fn drain_written(&mut self, all: bool) {
        let mut rounds = self
            .written
            .rounds
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while all && *rounds < self.handed {
            rounds = self
                .written
                .cond
                .wait(rounds)
                .unwrap_or_else(|p| p.into_inner());
        }
        let done = *rounds;
        drop(rounds);
        while self.unwritten.front().is_some_and(|(n, _, _)| *n <= done) {
            let (_, _, applied) = self.unwritten.pop_front().expect("front exists");
            self.unreleased.extend(applied);
        }
    }

    /// A stored value as the commit thread must see it: the latest round batch not yet
    /// written that has the key, else the store.
    fn stored(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        for (_, batch, _) in self.unwritten.iter().rev() {
            if let Some(v) = batch.get(cf, key) {
                return Ok(v.cloned());
            }
        }
        Ok(self.store.db().get_cf(self.store.cf(cf), key)?)
    }

    /// `Store::ledger_head`, read through the batches not yet written.
    fn ledger_head(&self, rtype: ResourceType, id: &str) -> Result<Option<LedgerHead>> {
        Ok(self
            .stored(CF_LEDGER, &ledger_key(b'c', &resource_key(rtype, id)))?
            .and_then(|b| LedgerHead::decode(&b)))
    }

    /// Every so often make the applied state durable, then let the replica drop the sidecars
    /// it kept for replay.
    fn release_durable(&mut self) {
        if self.unreleased.is_empty()
            || (self.last_sync.elapsed() < SYNC_EVERY && self.unreleased.len() < 4096)
        {
            return;
        }
        match self.store.db().flush_wal(true) {
            Ok(()) => {
                self.last_sync = Instant::now();
                self.replica.release(std::mem::take(&mut self.unreleased));
            }
            Err(e) => tracing::warn!(error = %e, "syncing the store failed; sidecars are kept"),
        }
    }

    /// Whether queued submissions can be evaluated now: room in the pipeline, and a
    /// conditional operation (which searches applied state) waits until nothing is pending.
    fn can_submit(&self) -> bool {
        match self.queued.front() {
            None => false,
            Some(job) => {
                self.inflight.len() < MAX_IN_FLIGHT
                    && (self.unapplied.is_empty()
                        || !job.submission.changes.iter().any(Change::needs_search))
            }
        }
    }

    /// Forget an entry's unapplied writes once it was applied (or refused): reads then go to
    /// the store, or to a later entry that wrote the same key.
    fn settle(&mut self, hash: &[u8; 32], own: &Overlay) {
        for (cf, key) in own.writes.keys() {
            let k = KeyRef(cf, key);
            if self.unapplied.get(&k).is_some_and(|(_, w)| w == hash) {
                self.unapplied.swap_remove(&k);
            }
        }
    }

    fn report_health(&self) {
        use std::sync::atomic::Ordering;
        let now = crate::fhir::now_ms();
        self.health
            .commit_heartbeat_ms
            .store(now, Ordering::Relaxed);
        let oldest = self
            .inflight
            .values()
            .map(|f| now - f.since.elapsed().as_millis() as i64)
            .min()
            .unwrap_or(0);
        self.health
            .oldest_waiting_ms
            .store(oldest, Ordering::Relaxed);
    }

    fn on_ledger_event(&mut self, round: &mut Round, ev: Event) {
        let result = match ev {
            Event::Executed {
                seq,
                batch,
                root,
                certificate,
                sidecars,
            } => self.apply_block(round, seq, batch, root, certificate, sidecars),
            Event::Stable { seq, root, proof } => self.record_checkpoint(seq, root, proof),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot apply a committed ledger block; stopping");
            std::process::exit(70);
        }
    }

    fn record_checkpoint(
        &mut self,
        seq: u64,
        root: [u8; 32],
        proof: Vec<ledger::core::Signed>,
    ) -> Result<()> {
        let newer = self.store.stable_checkpoint()?.is_none_or(|s| s.seq < seq);
        if newer {
            let cp = StableCheckpoint { seq, root, proof };
            self.store
                .db()
                .put_cf(self.store.cf(CF_LEDGER), b"k", cp.encode())?;
        }
        Ok(())
    }

    /// Answer submissions the ledger has not executed in time. Their pending writes stay
    /// durable: if the entry does execute later, it is applied like any other.
    fn expire(&mut self) {
        let now = Instant::now();
        let late: Vec<[u8; 32]> = self
            .inflight
            .iter()
            .filter(|(_, f)| now.duration_since(f.since) > self.timeout)
            .map(|(h, _)| *h)
            .collect();
        for h in late {
            if let Some(f) = self.inflight.remove(&h) {
                let _ = f.reply.send(Err(Error::LedgerUnavailable(format!(
                    "the ledger did not commit this write within {} s; it may still commit later — read the resource before retrying",
                    self.timeout.as_secs()
                ))));
            }
        }
    }

    /// Evaluate queued submissions in order, seal the successful ones into ledger entries,
    /// make their pending writes durable and hand the entries to the replica.
    fn submit_group(&mut self) -> Vec<Sealed> {
        let mut group = Overlay::default();
        let mut sealed: Vec<Sealed> = Vec::new();
        while let Some(job) = self.queued.front() {
            // A conditional operation searches applied state: it starts a group of its own.
            if job.submission.changes.iter().any(Change::needs_search)
                && (!sealed.is_empty() || !self.unapplied.is_empty())
            {
                break;
            }
            if sealed.len() >= MAX_GROUP || self.inflight.len() + sealed.len() >= MAX_IN_FLIGHT {
                break;
            }
            let job = self.queued.pop_front().expect("front exists");
            if job.submission.changes.iter().any(Change::needs_search) {
                // Its search reads the store: everything applied must be written first.
                self.drain_written(true);
            }
            let mut own = Overlay::default();
            let (tx_before, ts_before) = (self.last_tx, self.last_ts);
            let Submission {
                changes,
                actor,
                audit,
            } = job.submission;
            let result = self
                .apply(&group, &mut own, changes, audit)
                .and_then(|c| Ok((self.seal(&c, &actor)?, c)));
            let result = result.and_then(|(bytes, c)| match bytes {
                Some(b) if b.len() > self.replica.max_entry_bytes => {
                    Err(Error::LedgerEntryTooLarge {
                        versions: c.applied.len() + usize::from(c.audit.is_some()),
                        bytes: b.len(),
                        limit: self.replica.max_entry_bytes,
                    })
                }
                bytes => Ok((bytes, c)),
            });
            match result {
                Ok((Some(bytes), c)) => {
                    group.merge(&own);
                    let hash: [u8; 32] = Sha256::digest(&bytes).into();
                    let f = InFlight {
                        reply: job.reply,
                        committed: c,
                        since: Instant::now(),
                    };
                    sealed.push((hash, bytes, f, self.last_tx, self.last_ts, own));
                }
                Ok((None, c)) => {
                    let _ = job.reply.send(Ok(c));
                }
                Err(e) => {
                    (self.last_tx, self.last_ts) = (tx_before, ts_before);
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        sealed
    }

    /// After the round's batch is durable: answer for the applied entries, forget their
    /// unapplied writes, and submit the newly sealed entries to the replica.
    fn finish(&mut self, round: Round, sealed: Vec<Sealed>) {
        if let Some((seq, root)) = round.applied {
            self.applied_seq = seq;
            self.ledger_root = root;
        }
        let mut replies = Vec::new();
        let mut applied = Vec::new();
        for (hash, accepted, own) in round.verdicts {
            if let Some(own) = own {
                self.settle(&hash, &own);
            }
            applied.push(hash);
            if let Some(f) = self.inflight.remove(&hash) {
                replies.push((
                    f.reply,
                    if accepted {
                        Ok(f.committed)
                    } else {
                        Err(Error::VersionConflict(
                            "a concurrent change to the same resource committed first on the ledger; retry".into(),
                        ))
                    },
                ));
            }
        }
        if round.batch.is_empty() {
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            self.unreleased.extend(applied);
        } else {
            // Settled writes stay readable through the batch until the writer wrote it.
            let batch = Arc::new(round.batch);
            self.handed += 1;
            self.unwritten
                .push_back((self.handed, batch.clone(), applied));
            if self.writer.send(RoundWrite { batch, replies }).is_err() {
                tracing::error!("the store writer has stopped; stopping");
                std::process::exit(70);
            }
        }
        for (hash, bytes, f, tx, ts, own) in sealed {
            let sidecar = own.encode(tx, ts);
            match self.replica.submit(bytes, sidecar) {
                Ok(()) => {
                    for (k, v) in &own.writes {
                        self.unapplied.insert(k.clone(), (v.clone(), hash));
                    }
                    self.pending.insert(hash, (tx, ts, own));
                    self.inflight.insert(hash, f);
                }
                Err(e) => {
                    let _ = f.reply.send(Err(Error::LedgerUnavailable(e.to_string())));
                }
            }
        }
    }

    /// The sealed ledger entry for a successful submission; None when it wrote nothing.
    fn seal(&self, c: &Committed, actor: &str) -> Result<Option<Vec<u8>>> {
        let records: Vec<VersionRecord> = c
            .applied
            .iter()
            .chain(c.audit.iter())
            .filter(|a| {
                matches!(
                    a.outcome,
                    Outcome::Created | Outcome::Updated | Outcome::Deleted
                )
            })
            .map(|a| VersionRecord {
                rtype: a.rtype.to_string(),
                id: a.id.clone(),
                version: a.version,
                deleted: a.outcome == Outcome::Deleted,
                commitment: a.commitment.map(|c| entry::hex(&c)),
                patients: a.patients.clone(),
                consent: match (a.rtype, &a.body) {
                    (ResourceType::Consent, Some(body)) => serde_json::from_slice(body)
                        .ok()
                        .and_then(|v| ConsentPolicy::from_resource(&v, &self.base)),
                    _ => None,
                },
            })
            .collect();
        if records.is_empty() {
            return Ok(None);
        }
        let e = LedgerEntry {
            format: entry::ENTRY_FORMAT,
            tx: new_id(),
            holder: self.me,
            client: actor.to_string(),
            at: format_instant(c.applied.first().map_or(self.last_ts, |a| a.last_updated)),
            records,
        };
        Ok(Some(entry::seal(&e, &self.chain_id, &self.key)))
    }

    /// Apply an executed block, in ledger order: check each entry against the ledger state
    /// (every replica reaches the same verdict), record it, and apply the pending writes of
    /// the entries this node holds. One synced WriteBatch per block; then answer the clients.
    fn apply_block(
        &mut self,
        round: &mut Round,
        seq: u64,
        batch: Batch,
        root: [u8; 32],
        certificate: Vec<ledger::core::Signed>,
        mut sidecars: Vec<Option<Vec<u8>>>,
    ) -> Result<()> {
        let (last_seq, last_root) = round
            .applied
            .unwrap_or((self.applied_seq, self.ledger_root));
        if seq <= last_seq {
            return Ok(());
        }
        if seq != last_seq + 1 {
            return Err(Error::Storage(format!(
                "ledger block {seq} arrived after block {last_seq}"
            )));
        }
        let leaf = block_leaf(&last_root, seq, &batch);
        let (mut max_tx, mut max_ts) = (0u64, 0i64);
        let hashes: Vec<[u8; 32]> = batch
            .entries
            .iter()
            .map(|b| Sha256::digest(b).into())
            .collect();
        // This node's own entries were sealed here; anyone else's must carry the signature of
        // the holder they name.
        let opened = entry::open_sealed_all(&batch.entries, &self.members, |i| {
            self.pending.contains_key(&hashes[i])
        });
        for (i, e) in opened.into_iter().enumerate() {
            let hash = hashes[i];
            let Some(e) = e else {
                tracing::warn!(
                    seq,
                    entry = i,
                    "ignoring a ledger entry that is not a sealed Fhirmament entry"
                );
                continue;
            };
            let accepted =
                self.record_entry(&e, seq, i as u32, &mut round.heads, &mut round.batch)?;
            if e.holder != self.me {
                continue;
            }
            let wb = &mut round.batch;
            let pending = match self.pending.remove(&hash) {
                Some(p) => Some(p),
                None => sidecars
                    .get_mut(i)
                    .and_then(Option::take)
                    .and_then(|b| Overlay::decode(&b)),
            };
            match (accepted, &pending) {
                (true, Some((tx, ts, own))) => {
                    for ((cf, key), v) in &own.writes {
                        match v {
                            // A data key sealed before a KEK rotation lands re-wrapped.
                            Some(v) if *cf == CF_KEYS => {
                                match self.store.envelope().rewrap(v) {
                                    Ok(Some(new)) => wb.put(cf, key, new),
                                    Ok(None) => wb.put_shared(cf, key, v.clone()),
                                    Err(e) => {
                                        tracing::error!(error = %e, "ALERT: a data key to apply does not unwrap");
                                        wb.put_shared(cf, key, v.clone())
                                    }
                                }
                            }
                            Some(v) => wb.put_shared(cf, key, v.clone()),
                            None => wb.delete(cf, key),
                        }
                    }
                    max_tx = max_tx.max(*tx);
                    max_ts = max_ts.max(*ts);
                }
                (true, None) => tracing::error!(
                    seq,
                    entry = i,
                    "ALERT: the ledger committed a version this node holds but its bytes are missing"
                ),
                (false, _) => {}
            }
            round.verdicts.push((hash, accepted, pending.map(|p| p.2)));
        }
        let wb = &mut round.batch;
        let info = BlockInfo {
            timestamp: batch.timestamp,
            prev_root: last_root,
            root,
            entries: batch.entries,
            certificate,
        };
        let seq_key = seq.to_be_bytes();
        wb.put(CF_LEDGER, ledger_key(b'b', &seq_key), info.encode());
        wb.put(CF_LEDGER, ledger_key(b'l', &seq_key), leaf);
        wb.put(CF_META, META_APPLIED_SEQ, seq_key);
        wb.put(CF_META, META_LEDGER_ROOT, root);
        if max_tx > 0 {
            self.last_tx = self.last_tx.max(max_tx);
            self.last_ts = self.last_ts.max(max_ts);
            wb.put(CF_META, META_LAST_TX, self.last_tx.to_be_bytes());
            wb.put(CF_META, META_LAST_TS, (self.last_ts as u64).to_be_bytes());
        }
        round.applied = Some((seq, root));
        Ok(())
    }

    /// Another organization now holds the latest version of a resource this node held:
    /// take the resource out of this node's current view and search indexes (its own
    /// versions stay in its history).
    fn drop_local_copy(&self, key: &[u8], wb: &mut SortedBatch) -> Result<()> {
        let Some(cut) = key.iter().position(|b| *b == 0) else {
            return Ok(());
        };
        let Ok(rtype) = std::str::from_utf8(&key[..cut])
            .unwrap_or("")
            .parse::<ResourceType>()
        else {
            return Ok(());
        };
        let id = std::str::from_utf8(&key[cut + 1..]).unwrap_or("");
        if self
            .stored(CF_CURRENT, key)?
            .and_then(|b| Current::decode(&b))
            .is_none()
        {
            return Ok(());
        }
        let keys = values_keys(rtype, id);
        let blinding = self.store.blinding();
        let old = match self.stored(CF_VALUES, &keys[1])? {
            Some(sealed) => ValueRecord::open(blinding, &keys[1], &sealed)?,
            None => ValueRecord::default(),
        };
        for (prefix, values) in old.lists(rtype) {
            for (k, _) in index_entries(blinding, &prefix, id, &values, &self.base) {
                wb.delete(CF_INDEX, k);
            }
        }
        let [presence, lists] = keys;
        wb.delete(CF_VALUES, presence);
        wb.delete(CF_VALUES, lists);
        wb.delete(CF_CURRENT, key);
        Ok(())
    }

    /// Check an entry against the ledger state (each record must be the next version of its
    /// resource) and, when it holds, record it. Returns whether the entry was accepted.
    fn record_entry(
        &self,
        e: &LedgerEntry,
        seq: u64,
        index: u32,
        heads: &mut HashMap<Vec<u8>, LedgerHead>,
        wb: &mut SortedBatch,
    ) -> Result<bool> {
        let mut staged: Vec<(Vec<u8>, LedgerHead, Option<[u8; 32]>)> = Vec::new();
        for r in &e.records {
            let Ok(rt) = r.rtype.parse::<ResourceType>() else {
                return Ok(false);
            };
            let key = resource_key(rt, &r.id);
            let cur = match staged.iter().rev().find(|s| s.0 == key) {
                Some(s) => Some(s.1),
                None => match heads.get(&key) {
                    Some(h) => Some(*h),
                    None => self.ledger_head(rt, &r.id)?,
                },
            };
            if r.version != cur.map_or(0, |h| h.version) + 1 {
                return Ok(false);
            }
            let commitment = match (&r.commitment, r.deleted) {
                (None, true) => None,
                (Some(c), false) => match entry::unhex32(c) {
                    Some(c) => Some(c),
                    None => return Ok(false),
                },
                _ => return Ok(false),
            };
            let head = LedgerHead {
                version: r.version,
                deleted: r.deleted,
                holder: e.holder,
            };
            staged.push((key, head, commitment));
        }
        for r in &e.records {
            if let Ok(rt) = r.rtype.parse::<ResourceType>() {
                for p in &r.patients {
                    let k = ledger_key(b'x', &super::compartment_key(p, rt, &r.id));
                    wb.put(CF_LEDGER, k, []);
                }
            }
        }
        for (r, (key, head, _)) in e.records.iter().zip(&staged) {
            if !head.deleted {
                wb.put(CF_LEDGER, ledger_key(b'y', key), r.patients.join("\n"));
            }
            if r.rtype == "Consent" {
                self.record_consent(r, seq, wb)?;
            }
        }
        for (i, (key, head, commitment)) in staged.into_iter().enumerate() {
            let mut vk = key.clone();
            vk.push(0);
            vk.extend_from_slice(&head.version.to_be_bytes());
            let rec = RecordRef {
                seq,
                entry: index,
                record: i as u32,
                holder: head.holder,
                deleted: head.deleted,
                commitment,
            };
            wb.put(CF_LEDGER, ledger_key(b'r', &vk), rec.encode());
            wb.put(CF_LEDGER, ledger_key(b'c', &key), head.encode());
            if head.holder != self.me {
                self.drop_local_copy(&key, wb)?;
            }
            heads.insert(key, head);
        }
        Ok(true)
    }

    /// File the policy of a Consent version under its patient, replacing the one its previous
    /// version filed (a Consent no longer in force files none).
    fn record_consent(&self, r: &VersionRecord, seq: u64, wb: &mut SortedBatch) -> Result<()> {
        let filed = ledger_key(b'q', r.id.as_bytes());
        let previous = match wb.get(CF_LEDGER, &filed) {
            Some(v) => v.cloned(),
            None => self.stored(CF_LEDGER, &filed)?,
        };
        let policy_key = |patient: &[u8]| {
            let mut k = ledger_key(b'p', patient);
            k.push(0);
            k.extend_from_slice(r.id.as_bytes());
            k
        };
        if let Some(patient) = previous {
            wb.delete(CF_LEDGER, policy_key(&patient));
            wb.delete(CF_LEDGER, &filed);
        }
        let in_force = r
            .consent
            .as_ref()
            .filter(|p| !r.deleted && p.consent == format!("Consent/{}", r.id));
        if let Some(policy) = in_force {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(&serde_json::to_vec(policy).expect("a policy serializes"));
            wb.put(CF_LEDGER, policy_key(policy.patient.as_bytes()), value);
            wb.put(CF_LEDGER, &filed, policy.patient.as_bytes());
        }
        Ok(())
    }

    fn get(
        &self,
        group: &Overlay,
        own: &Overlay,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        if let Some(v) = own.get(cf, key) {
            return Ok(v.as_deref().cloned());
        }
        if let Some(v) = group.get(cf, key) {
            return Ok(v.as_deref().cloned());
        }
        if let Some((v, _)) = self.unapplied.get(&KeyRef(cf, key)) {
            return Ok(v.as_deref().cloned());
        }
        self.stored(cf, key)
    }

    /// A resource's latest version as this node must build on it: its own (possibly
    /// pending) version, or a later one another organization committed on the ledger.
    fn current(
        &self,
        group: &Overlay,
        own: &Overlay,
        rtype: ResourceType,
        id: &str,
    ) -> Result<Option<Current>> {
        let local = self
            .get(group, own, CF_CURRENT, &resource_key(rtype, id))?
            .and_then(|b| Current::decode(&b));
        match self.ledger_head(rtype, id)? {
            Some(h) if h.holder != self.me && local.is_none_or(|c| c.version < h.version) => {
                Ok(Some(Current {
                    version: h.version,
                    deleted: h.deleted,
                    tx: 0,
                    last_updated: 0,
                }))
            }
            _ => Ok(local),
        }
    }

    fn search_one(&self, query: &SearchQuery) -> Result<Vec<String>> {
        let mut ids = exec::matching_ids(&self.store, &self.base, query)?;
        ids.truncate(2);
        Ok(ids)
    }

    fn apply(
        &mut self,
        group: &Overlay,
        own: &mut Overlay,
        changes: Vec<Change>,
        audit: Option<Value>,
    ) -> Result<Committed> {
        let tx = self.last_tx + 1;
        let ts = now_ms().max(self.last_ts);
        let mut applied = Vec::with_capacity(changes.len());
        let mut wrote = false;
        for (entry, change) in changes.into_iter().enumerate() {
            let a = self
                .apply_one(group, own, tx, ts, entry as u32, change)
                .map_err(|e| Error::TransactionEntry {
                    index: entry,
                    source: Box::new(e),
                })?;
            wrote |= matches!(
                a.outcome,
                Outcome::Created | Outcome::Updated | Outcome::Deleted
            );
            applied.push(a);
        }
        let audit = match audit {
            Some(mut event) => {
                crate::audit::add_written(&mut event, &applied);
                let change = Change::Create {
                    rtype: ResourceType::AuditEvent,
                    id: new_id(),
                    resource: event,
                    if_none_exist: None,
                    on_match: OnMatch::ReturnExisting,
                };
                let a = self.apply_one(group, own, tx, ts, applied.len() as u32, change)?;
                wrote = true;
                Some(a)
            }
            None => None,
        };
        if wrote {
            self.last_tx = tx;
            self.last_ts = ts;
        }
        Ok(Committed {
            tx: if wrote { tx } else { 0 },
            applied,
            audit,
        })
    }

    fn apply_one(
        &mut self,
        group: &Overlay,
        own: &mut Overlay,
        tx: u64,
        ts: i64,
        entry: u32,
        change: Change,
    ) -> Result<Applied> {
        match change {
            Change::Create {
                rtype,
                id,
                resource,
                if_none_exist,
                on_match,
            } => {
                if let Some(q) = if_none_exist {
                    let found = self.search_one(&q)?;
                    match found.len() {
                        0 => {}
                        _ if on_match == OnMatch::Fail => {
                            return Err(Error::VersionConflict(format!("a matching {rtype} was created concurrently; retry the transaction")))
                        }
                        1 => {
                            let v = self.store.read(rtype, &found[0])?;
                            return Ok(Applied { rtype, id: v.id, version: v.version, last_updated: v.last_updated, outcome: Outcome::Existing, body: Some(v.body), commitment: None, patients: vec![] });
                        }
                        _ => return Err(Error::MultipleMatches(format!("If-None-Exist matches more than one {rtype}"))),
                    }
                }
                if self.current(group, own, rtype, &id)?.is_some() {
                    return Err(Error::VersionConflict(format!(
                        "{rtype}/{id} already exists"
                    )));
                }
                self.write_version(
                    group,
                    own,
                    tx,
                    ts,
                    entry,
                    rtype,
                    &id,
                    Some(resource),
                    Method::Post,
                    None,
                )
            }
            Change::Update {
                rtype,
                id,
                resource,
                if_match,
                method,
            } => {
                let cur = self.current(group, own, rtype, &id)?;
                check_if_match(rtype, &id, cur, if_match)?;
                self.write_version(
                    group,
                    own,
                    tx,
                    ts,
                    entry,
                    rtype,
                    &id,
                    Some(resource),
                    method,
                    cur,
                )
            }
            Change::ConditionalUpdate {
                rtype,
                query,
                resource,
                if_match,
            } => {
                let found = self.search_one(&query)?;
                let body_id = resource
                    .get("id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let id = match found.len() {
                    0 => body_id.unwrap_or_else(new_id),
                    1 => {
                        if body_id.as_deref().is_some_and(|b| b != found[0]) {
                            return Err(Error::bad_request("invalid", format!("the resource id does not match the {rtype} the condition selected")));
                        }
                        found[0].clone()
                    }
                    _ => {
                        return Err(Error::MultipleMatches(format!(
                            "the condition matches more than one {rtype}"
                        )))
                    }
                };
                let cur = self.current(group, own, rtype, &id)?;
                check_if_match(rtype, &id, cur, if_match)?;
                self.write_version(
                    group,
                    own,
                    tx,
                    ts,
                    entry,
                    rtype,
                    &id,
                    Some(resource),
                    Method::Put,
                    cur,
                )
            }
            Change::Delete {
                rtype,
                id,
                if_match,
            } => {
                let cur = self.current(group, own, rtype, &id)?;
                check_if_match(rtype, &id, cur, if_match)?;
                match cur {
                    Some(c) if !c.deleted => self.write_version(
                        group,
                        own,
                        tx,
                        ts,
                        entry,
                        rtype,
                        &id,
                        None,
                        Method::Delete,
                        cur,
                    ),
                    _ => Ok(Applied {
                        rtype,
                        id,
                        version: cur.map_or(0, |c| c.version),
                        last_updated: ts,
                        outcome: Outcome::NoOp,
                        body: None,
                        commitment: None,
                        patients: vec![],
                    }),
                }
            }
            Change::ConditionalDelete { rtype, query } => {
                let found = self.search_one(&query)?;
                match found.len() {
                    0 => Ok(Applied { rtype, id: String::new(), version: 0, last_updated: ts, outcome: Outcome::NoOp, body: None, commitment: None, patients: vec![] }),
                    1 => {
                        let cur = self.current(group, own, rtype, &found[0])?;
                        self.write_version(group, own, tx, ts, entry, rtype, &found[0], None, Method::Delete, cur)
                    }
                    _ => Err(Error::MultipleMatches(format!("the condition matches more than one {rtype}; conditional delete removes one"))),
                }
            }
        }
    }

    /// Write a new version (a resource, or a deletion when `resource` is None), its history
    /// entries and its search index entries.
    #[allow(clippy::too_many_arguments)]
    fn write_version(
        &mut self,
        group: &Overlay,
        own: &mut Overlay,
        tx: u64,
        ts: i64,
        entry: u32,
        rtype: ResourceType,
        id: &str,
        resource: Option<Value>,
        method: Method,
        cur: Option<Current>,
    ) -> Result<Applied> {
        let version = cur.map_or(1, |c| c.version + 1);
        let deleted = resource.is_none();
        let mut commitment = None;
        let mut patients = Vec::new();
        let body: Option<Vec<u8>> = match resource {
            Some(mut r) => {
                set_id_and_meta(&mut r, id, version, ts);
                let salt = entry::new_salt()?;
                commitment = Some(entry::commitment_of_canonical(
                    &salt,
                    &entry::canonical_json(&r),
                ));
                own.put(
                    CF_LEDGER,
                    ledger_key(b's', &version_key(rtype, id, version)),
                    Some(salt.to_vec()),
                );
                patients = self.patients_of(rtype, id, &r);
                // Index from the stored form, so reindexing from stored bytes is identical.
                let values = self.registry.value_record(rtype, &r);
                self.reindex_resource(group, own, rtype, id, values, cur.is_none())?;
                Some(serde_json::to_vec(&r).map_err(|e| Error::Internal(e.to_string()))?)
            }
            None => {
                self.reindex_resource(group, own, rtype, id, ValueRecord::default(), false)?;
                None
            }
        };
        // At rest, the version is sealed under its patient's data key (or its own).
        let sealed = match &body {
            Some(plain) => {
                let scope = patients
                    .first()
                    .cloned()
                    .unwrap_or_else(|| format!("{rtype}/{id}"));
                let dek = self.data_key(group, own, &scope)?;
                self.store.envelope().seal(&scope, &dek, plain)?
            }
            None => Vec::new(),
        };
        // The entry names the sealed bytes; they are an object of their own (`objects`).
        let name: Vec<u8> = if sealed.is_empty() {
            Vec::new()
        } else {
            let name = object_name(&sealed);
            own.put(CF_OBJECTS, name.to_vec(), Some(sealed));
            name.to_vec()
        };
        own.put(
            CF_VERSIONS,
            version_key(rtype, id, version),
            Some(Version::encode_value(tx, ts, deleted, method, &name)),
        );
        own.put(
            CF_CURRENT,
            resource_key(rtype, id),
            Some(
                Current {
                    version,
                    deleted,
                    tx,
                    last_updated: ts,
                }
                .encode(),
            ),
        );
        let mut pos = tx.to_be_bytes().to_vec();
        pos.extend_from_slice(&entry.to_be_bytes());
        let mut sys = resource_key(rtype, id);
        sys.push(0);
        sys.extend_from_slice(&version.to_be_bytes());
        own.put(CF_HISTORY, pos.clone(), Some(sys));
        let mut type_key = resource_key(rtype, "");
        type_key.extend_from_slice(&pos);
        let mut type_val = version.to_be_bytes().to_vec();
        type_val.extend_from_slice(id.as_bytes());
        own.put(CF_TYPE_HISTORY, type_key, Some(type_val));
        let outcome = match (deleted, cur) {
            (true, _) => Outcome::Deleted,
            (false, Some(c)) if !c.deleted => Outcome::Updated,
            (false, _) => Outcome::Created,
        };
        Ok(Applied {
            rtype,
            id: id.to_string(),
            version,
            last_updated: ts,
            outcome,
            body: body.map(Arc::from),
            commitment,
            patients,
        })
    }

    /// The data key of a scope (a patient compartment, or a resource of its own), created and
    /// written with the version when the scope has none yet.
    fn data_key(
        &self,
        group: &Overlay,
        own: &mut Overlay,
        scope: &str,
    ) -> Result<Arc<super::envelope::Dek>> {
        match self.get(group, own, CF_KEYS, scope.as_bytes())? {
            Some(wrapped) => self.store.envelope().dek(&wrapped),
            None => {
                let (dek, wrapped) = self.store.envelope().new_dek()?;
                own.put(CF_KEYS, scope.as_bytes().to_vec(), Some(wrapped));
                Ok(dek)
            }
        }
    }

    /// Replace a resource's index entries: remove those derived from its previous values,
    /// add those of the new ones, and store its new value record. A resource that never
    /// existed has no previous values; one without values (deleted) keeps no record.
    fn reindex_resource(
        &self,
        group: &Overlay,
        own: &mut Overlay,
        rtype: ResourceType,
        id: &str,
        new: ValueRecord,
        is_new: bool,
    ) -> Result<()> {
        let blinding = self.store.blinding();
        let keys = values_keys(rtype, id);
        let old = if is_new {
            ValueRecord::default()
        } else {
            match self.get(group, own, CF_VALUES, &keys[1])? {
                Some(sealed) => ValueRecord::open(blinding, &keys[1], &sealed)?,
                None => ValueRecord::default(),
            }
        };
        if old == new {
            return Ok(());
        }
        for (prefix, values) in old.lists(rtype) {
            for (k, _) in index_entries(blinding, &prefix, id, &values, &self.base) {
                own.put(CF_INDEX, k, None);
            }
        }
        for (prefix, values) in new.lists(rtype) {
            self.record_date_widths(own, &prefix, &values);
            for (k, v) in index_entries(blinding, &prefix, id, &values, &self.base) {
                own.put(CF_INDEX, k, Some(v));
            }
        }
        if new.is_empty() {
            for k in keys {
                own.put(CF_VALUES, k, None);
            }
        } else {
            let entries = new.seal(blinding, &keys);
            for (k, v) in keys.into_iter().zip(entries) {
                own.put(CF_VALUES, k, Some(v));
            }
        }
        Ok(())
    }
}

impl Committer {
    fn patients_of(&self, rtype: ResourceType, id: &str, r: &Value) -> Vec<String> {
        self.registry.patients_of(rtype, id, r, &self.base)
    }

    /// Widen the recorded date width before the entries become visible, so a concurrent search
    /// never uses a window narrower than the data.
    fn record_date_widths(&self, own: &mut Overlay, prefix: &[u8], values: &[IndexValue]) {
        for v in values {
            if let IndexValue::Date { lo, hi } = v {
                if let Some((k, w)) = self.store.widen_date(prefix, hi.saturating_sub(*lo)) {
                    own.put(CF_META, k, Some(w));
                }
            }
        }
    }
}

fn check_if_match(
    rtype: ResourceType,
    id: &str,
    cur: Option<Current>,
    if_match: Option<u64>,
) -> Result<()> {
    match (if_match, cur) {
        (None, _) => Ok(()),
        (Some(v), Some(c)) if c.version == v && !c.deleted => Ok(()),
        (Some(v), Some(c)) => Err(Error::PreconditionFailed(format!(
            "If-Match version {v} is stale: {rtype}/{id} is at version {}{}",
            c.version,
            if c.deleted { " (deleted)" } else { "" }
        ))),
        (Some(v), None) => Err(Error::PreconditionFailed(format!(
            "If-Match version {v}: {rtype}/{id} does not exist"
        ))),
    }
}

/// Set `id`, `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta` and the
/// element order of everything else.
pub fn set_id_and_meta(resource: &mut Value, id: &str, version: u64, ts: i64) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let mut out = Map::new();
    out.insert(
        "resourceType".into(),
        obj.shift_remove("resourceType").unwrap_or(Value::Null),
    );
    obj.shift_remove("id");
    out.insert("id".into(), Value::String(id.to_string()));
    let mut meta = match obj.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(format_instant(ts)));
    out.insert("meta".into(), Value::Object(meta));
    for (k, v) in std::mem::take(obj) {
        out.insert(k, v);
    }
    *obj = out;
}

/// Rebuild the derived families (`index`, `values`) from the stored current versions.
pub fn reindex(store: &Store, registry: &Registry, base: &str) -> Result<usize> {
    for cf in super::DERIVED_FAMILIES {
        let mut batch = WriteBatch::default();
        for (k, _) in store.dump(cf)? {
            batch.delete_cf(store.cf(cf), k);
        }
        store.db().write(batch)?;
    }
    let mut count = 0;
    for rtype in ResourceType::ALL {
        let mut ids = Vec::new();
        store.scan_ids(rtype, |id| {
            ids.push(id.to_string());
            true
        })?;
        for chunk in ids.chunks(1000) {
            let mut batch = WriteBatch::default();
            for id in chunk {
                let v = store.read(rtype, id)?;
                let resource: Value = serde_json::from_slice(&v.body).map_err(|e| {
                    Error::Internal(format!("stored {rtype}/{id} is not JSON: {e}"))
                })?;
                let record = registry.value_record(rtype, &resource);
                for (prefix, values) in record.lists(rtype) {
                    for v in &values {
                        if let IndexValue::Date { lo, hi } = v {
                            if let Some((k, w)) = store.widen_date(&prefix, hi.saturating_sub(*lo))
                            {
                                batch.put_cf(store.cf(CF_META), k, w);
                            }
                        }
                    }
                    for (k, val) in index_entries(store.blinding(), &prefix, id, &values, base) {
                        batch.put_cf(store.cf(CF_INDEX), k, val);
                    }
                }
                if !record.is_empty() {
                    let keys = values_keys(rtype, id);
                    let entries = record.seal(store.blinding(), &keys);
                    for (k, v) in keys.iter().zip(entries) {
                        batch.put_cf(store.cf(CF_VALUES), k, v);
                    }
                }
                count += 1;
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            store.db().write_opt(batch, &wo)?;
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    let mut done = WriteBatch::default();
    done.put_cf(
        store.cf(CF_META),
        super::META_DERIVED_LAYOUT,
        super::DERIVED_LAYOUT,
    );
    done.delete_cf(store.cf(CF_META), super::META_INDEX_STALE);
    store.db().write_opt(done, &wo)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::Profiles;
    use crate::store::DERIVED_FAMILIES;
    use serde_json::json;

    /// Milliseconds the store writer waits before each round (to widen, in a test, the window
    /// in which the commit thread must read through the batches not yet written).
    pub(super) static SLOW_WRITER_MS: std::sync::atomic::AtomicU64 =
        std::sync::atomic::AtomicU64::new(0);

    /// A new store under a new KEK in its own directory, and the embedded profiles' registry.
    fn fresh_store() -> (tempfile::TempDir, Arc<Store>, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let kek = crate::store::envelope::Kek::generate().unwrap().0;
        let store = Arc::new(Store::open(dir.path(), kek).unwrap());
        let registry = Arc::new(Registry::from_profiles(&Profiles::embedded().unwrap()));
        (dir, store, registry)
    }

    /// A commit thread over a consortium of one in its own directory.
    fn start_log(
        store: Arc<Store>,
        registry: Arc<Registry>,
        base: String,
    ) -> (LedgerTxLog, tempfile::TempDir, ReplicaSetup) {
        let ledger_dir = tempfile::tempdir().unwrap();
        let replica = ReplicaSetup::single(ledger_dir.path()).unwrap();
        let log = LedgerTxLog::start(store, registry, base, &replica, LEDGER_TIMEOUT).unwrap();
        (log, ledger_dir, replica)
    }

    fn submit(log: &LedgerTxLog, changes: Vec<Change>) -> Result<Committed> {
        log.submit(Submission::new(changes, "test"))
            .blocking_recv()
            .expect("commit thread answers")
    }

    #[test]
    fn reindex_rebuilds_the_derived_families_byte_for_byte() {
        let (_dir, store, registry) = fresh_store();
        let base = "http://localhost/fhir".to_string();
        let (log, _ledger, _) = start_log(store.clone(), registry.clone(), base.clone());
        for i in 0..30 {
            let p = json!({"resourceType":"Patient","name":[{"family":format!("F{i}"),"given":["G"]}],"birthDate":format!("19{:02}-01-01", i + 10),
                "identifier":[{"system":"urn:x","value":i.to_string()}],"managingOrganization":{"reference":"Organization/o"}});
            submit(
                &log,
                vec![Change::Create {
                    rtype: ResourceType::Patient,
                    id: format!("p{i}"),
                    resource: p,
                    if_none_exist: None,
                    on_match: OnMatch::ReturnExisting,
                }],
            )
            .unwrap();
        }
        // Updates and deletes leave no stale entries behind.
        let changed = json!({"resourceType":"Patient","id":"p3","name":[{"family":"Changed"}]});
        submit(
            &log,
            vec![Change::Update {
                rtype: ResourceType::Patient,
                id: "p3".into(),
                resource: changed,
                if_match: Some(1),
                method: Method::Put,
            }],
        )
        .unwrap();
        submit(
            &log,
            vec![Change::Delete {
                rtype: ResourceType::Patient,
                id: "p4".into(),
                if_match: None,
            }],
        )
        .unwrap();
        let before: Vec<_> = DERIVED_FAMILIES
            .iter()
            .map(|cf| store.dump(cf).unwrap())
            .collect();
        assert!(!before[0].is_empty());
        assert_eq!(reindex(&store, &registry, &base).unwrap(), 29);
        let after: Vec<_> = DERIVED_FAMILIES
            .iter()
            .map(|cf| store.dump(cf).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn an_index_made_in_clear_by_an_earlier_version_is_rebuilt_blind() {
        let dir = tempfile::tempdir().unwrap();
        let kek = crate::store::envelope::Kek::generate().unwrap().0;
        {
            let store = Store::open(dir.path(), kek.clone()).unwrap();
            assert!(!store.index_is_stale().unwrap());
            // What an earlier version left: a clear term and value, and no blinding key.
            let db = store.db();
            db.put_cf(store.cf(CF_INDEX), b"\x01abcdeSchalmers\0p1", b"")
                .unwrap();
            db.put_cf(store.cf(CF_VALUES), b"\x01abcdep1", b"s\0\0\0\x08Chalmers")
                .unwrap();
            db.delete_cf(store.cf(CF_KEYS), b"index").unwrap();
        }
        let store = Store::open(dir.path(), kek.clone()).unwrap();
        assert!(store.index_is_stale().unwrap());
        let registry = Registry::from_profiles(&Profiles::embedded().unwrap());
        assert_eq!(
            reindex(&store, &registry, "http://localhost/fhir").unwrap(),
            0
        );
        assert!(!store.index_is_stale().unwrap());
        for cf in DERIVED_FAMILIES {
            assert!(
                store.dump(cf).unwrap().is_empty(),
                "{cf} holds nothing in clear"
            );
        }
        drop(store);
        assert!(!Store::open(dir.path(), kek)
            .unwrap()
            .index_is_stale()
            .unwrap());
    }

    #[test]
    fn value_lists_stored_per_parameter_by_an_earlier_version_are_rebuilt_as_records() {
        let (_dir, store, registry) = fresh_store();
        let base = "http://localhost/fhir".to_string();
        let (log, _ledger, _) = start_log(store.clone(), registry.clone(), base.clone());
        let p = json!({"resourceType":"Patient","name":[{"family":"Chalmers"}],"gender":"male"});
        submit(
            &log,
            vec![Change::Create {
                rtype: ResourceType::Patient,
                id: "p1".into(),
                resource: p,
                if_none_exist: None,
                on_match: OnMatch::ReturnExisting,
            }],
        )
        .unwrap();
        // The store writer applies the batch after the answer: wait until it is in the store.
        let deadline = Instant::now() + Duration::from_secs(20);
        while store
            .current(ResourceType::Patient, "p1")
            .unwrap()
            .is_none()
        {
            assert!(Instant::now() < deadline, "the create reached the store");
            std::thread::sleep(Duration::from_millis(10));
        }
        let written: Vec<_> = DERIVED_FAMILIES
            .iter()
            .map(|cf| store.dump(cf).unwrap())
            .collect();
        assert_eq!(
            written[1].len(),
            2,
            "one value record for the resource: presence and lists"
        );
        // A copy of the store as an earlier version would have left it: a value list per
        // (resource, parameter), and no layout mark.
        let copy = tempfile::tempdir().unwrap();
        let copy_path = copy.path().join("store");
        rocksdb::checkpoint::Checkpoint::new(store.db())
            .unwrap()
            .create_checkpoint(&copy_path)
            .unwrap();
        let kek = store.envelope().kek();
        {
            let old = Store::open(&copy_path, kek.clone()).unwrap();
            let db = old.db();
            for (k, _) in old.dump(CF_VALUES).unwrap() {
                db.delete_cf(old.cf(CF_VALUES), k).unwrap();
            }
            let mut old_key = crate::search::keys::param_prefix(ResourceType::Patient, "family");
            old_key.extend_from_slice(b"p1");
            let sealed = old.blinding().seal_values(&old_key, b"s\0\0\0\x08chalmers");
            db.put_cf(old.cf(CF_VALUES), old_key, sealed).unwrap();
            db.delete_cf(old.cf(CF_META), crate::store::META_DERIVED_LAYOUT)
                .unwrap();
        }
        let copied = Store::open(&copy_path, kek.clone()).unwrap();
        assert!(copied.index_is_stale().unwrap());
        assert_eq!(reindex(&copied, &registry, &base).unwrap(), 1);
        assert!(!copied.index_is_stale().unwrap());
        let rebuilt: Vec<_> = DERIVED_FAMILIES
            .iter()
            .map(|cf| copied.dump(cf).unwrap())
            .collect();
        assert_eq!(
            rebuilt, written,
            "the same entries and records the commit path writes"
        );
        drop(copied);
        let copied = Store::open(&copy_path, kek).unwrap();
        assert!(!copied.index_is_stale().unwrap(), "the layout mark stays");
        let values = copied
            .values(
                ResourceType::Patient,
                &["family", "gender", "birthdate"],
                &["p1"],
            )
            .unwrap();
        assert_eq!(values[0][0], vec![IndexValue::Str("Chalmers".into())]);
        assert_eq!(values[1][0].len(), 1);
        assert!(values[2][0].is_empty());
        let having = |code: &str| {
            let mut ids = Vec::new();
            let prefix = crate::search::keys::param_prefix(ResourceType::Patient, code);
            copied
                .scan_with_values(ResourceType::Patient, &prefix, |id| {
                    ids.push(id.to_string());
                    true
                })
                .unwrap();
            ids
        };
        assert_eq!(having("gender"), vec!["p1".to_string()]);
        assert!(having("birthdate").is_empty());
    }

    /// Writers of one resource and one patient compartment, each waiting for its answer, while
    /// the store writer is slow: a submission evaluated after an entry was applied but before
    /// its batch was written must still build on it (the next version number, the patient's
    /// data key). Reading the store alone would number versions twice (refused as conflicts)
    /// or seal under a second data key (earlier versions then no longer open).
    #[test]
    fn submissions_build_on_applied_entries_whose_batch_is_not_yet_written() {
        let (_dir, store, registry) = fresh_store();
        let (log, _ledger, _) = start_log(store.clone(), registry, "http://x/fhir".into());
        let log = Arc::new(log);
        SLOW_WRITER_MS.store(15, std::sync::atomic::Ordering::Relaxed);
        let doc = |n: usize| {
            json!({"resourceType":"DocumentReference","status":"current",
                "subject":{"reference":"Patient/p"},"description":format!("note {n}"),
                "content":[{"attachment":{"contentType":"text/plain"}}]})
        };
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..12 {
                        let change = if i % 2 == 0 {
                            Change::Update {
                                rtype: ResourceType::DocumentReference,
                                id: "shared".into(),
                                resource: doc(w * 100 + i),
                                if_match: None,
                                method: Method::Put,
                            }
                        } else {
                            Change::Create {
                                rtype: ResourceType::DocumentReference,
                                id: format!("w{w}-{i}"),
                                resource: doc(w * 100 + i),
                                if_none_exist: None,
                                on_match: OnMatch::ReturnExisting,
                            }
                        };
                        submit(&log, vec![change]).expect("every write commits");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        SLOW_WRITER_MS.store(0, std::sync::atomic::Ordering::Relaxed);
        let t = ResourceType::DocumentReference;
        let cur = store.current(t, "shared").unwrap().expect("written");
        assert_eq!(
            cur.version, 24,
            "4 writers x 6 updates, each the next version"
        );
        for v in 1..=24 {
            store
                .version(t, "shared", v)
                .unwrap()
                .unwrap_or_else(|| panic!("version {v} opens"));
        }
        for w in 0..4 {
            for i in (1..12).step_by(2) {
                store
                    .version(t, &format!("w{w}-{i}"), 1)
                    .unwrap()
                    .expect("each created version opens");
            }
        }
    }

    #[test]
    fn an_atomic_submission_with_a_failing_change_writes_nothing() {
        let (_dir, store, registry) = fresh_store();
        let (log, _ledger, _) = start_log(store.clone(), registry, "http://x/fhir".into());
        let p = json!({"resourceType":"Patient"});
        let err = submit(
            &log,
            vec![
                Change::Create {
                    rtype: ResourceType::Patient,
                    id: "a".into(),
                    resource: p.clone(),
                    if_none_exist: None,
                    on_match: OnMatch::ReturnExisting,
                },
                Change::Update {
                    rtype: ResourceType::Patient,
                    id: "b".into(),
                    resource: p,
                    if_match: Some(3),
                    method: Method::Put,
                },
            ],
        )
        .unwrap_err();
        assert!(matches!(err, Error::TransactionEntry { index: 1, .. }));
        assert!(store.current(ResourceType::Patient, "a").unwrap().is_none());
        assert!(store.dump(crate::store::CF_HISTORY).unwrap().is_empty());
    }
    #[test]
    fn meta_is_set_and_everything_else_kept_in_order() {
        // Parsed from text, as requests are: decimals keep their digits (arbitrary_precision).
        let mut r: Value = serde_json::from_str(r#"{"resourceType":"Patient","id":"old","meta":{"tag":[{"code":"x"}],"versionId":"9"},"name":[{"family":"A"}],"weight":72.50}"#).unwrap();
        set_id_and_meta(&mut r, "new", 3, 0);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"resourceType":"Patient","id":"new","meta":{"tag":[{"code":"x"}],"versionId":"3","lastUpdated":"1970-01-01T00:00:00.000Z"},"name":[{"family":"A"}],"weight":72.50}"#
        );
    }

    fn create(log: &LedgerTxLog, id: &str, family: &str) -> Committed {
        submit(
            log,
            vec![Change::Update {
                rtype: ResourceType::Patient,
                id: id.into(),
                resource: json!({"resourceType":"Patient","name":[{"family":family}]}),
                if_match: None,
                method: Method::Put,
            }],
        )
        .unwrap()
    }

    fn receipt_holds(checks: &[crate::ledger::receipt::Check]) -> bool {
        checks.iter().all(|c| c.ok)
    }

    #[test]
    fn every_version_is_on_the_ledger_and_its_receipt_verifies_offline() {
        let (_dir, store, registry) = fresh_store();
        let (log, _ledger, replica) = start_log(store.clone(), registry, "http://x/fhir".into());
        // Enough blocks for a stable checkpoint (every 16) to cover the first ones.
        for i in 0..40 {
            create(&log, &format!("p{i}"), &format!("F{i}"));
        }
        create(&log, "p0", "Changed");
        let members = &replica.membership;
        let chain = &members.chain_id;
        for (id, version) in [("p0", 1), ("p0", 2), ("p39", 1)] {
            let rec = store
                .ledger_record(ResourceType::Patient, id, version)
                .unwrap()
                .unwrap();
            assert_eq!(rec.holder, 0);
            let r =
                crate::ledger::receipt::build(&store, chain, ResourceType::Patient, id, version)
                    .unwrap();
            let checks = crate::ledger::receipt::verify(&r, members);
            assert!(receipt_holds(&checks), "{id}/{version}: {checks:?}");
            assert!(checks.iter().any(|c| c.name == "resource" && c.ok));
        }
        let early =
            crate::ledger::receipt::build(&store, chain, ResourceType::Patient, "p0", 1).unwrap();
        let checks = crate::ledger::receipt::verify(&early, members);
        assert!(
            checks.iter().any(|c| c.name == "checkpoint" && c.ok),
            "{checks:?}"
        );

        // Any flipped bit in any part breaks the chain.
        let text = serde_json::to_string(&early).unwrap();
        let fields = [
            "entry",
            "batchRoot",
            "prevRoot",
            "salt",
            "commitCertificate",
            "sequence",
        ];
        for f in fields {
            let mut r = early.clone();
            let p = r["parameter"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|p| p["name"] == f)
                .unwrap();
            let key = ["valueString", "valueBase64Binary"]
                .into_iter()
                .find(|k| p.get(*k).is_some())
                .unwrap();
            let v = p[key].as_str().unwrap().to_string();
            let flipped: String = if key == "valueBase64Binary" {
                use base64::Engine as _;
                let mut b = base64::engine::general_purpose::STANDARD
                    .decode(&v)
                    .unwrap();
                let mid = b.len() / 2;
                b[mid] ^= 0x10;
                base64::engine::general_purpose::STANDARD.encode(b)
            } else if f == "sequence" {
                (v.parse::<u64>().unwrap() + 1).to_string()
            } else {
                let mut c: Vec<char> = v.chars().collect();
                c[3] = if c[3] == '0' { '1' } else { '0' };
                c.into_iter().collect()
            };
            p[key] = json!(flipped);
            assert!(
                !receipt_holds(&crate::ledger::receipt::verify(&r, members)),
                "flipping {f} went unnoticed"
            );
        }
        let mut r: Value = serde_json::from_str(&text).unwrap();
        let res = r["parameter"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["name"] == "resource")
            .unwrap();
        res["resource"]["name"][0]["family"] = json!("Forged");
        assert!(!receipt_holds(&crate::ledger::receipt::verify(&r, members)));
        // Another consortium's genesis does not vouch for it.
        let other = ledger::core::Membership::new(
            chain.clone(),
            vec![ledger::core::test_key(9, 0).verifying_key()],
        );
        assert!(!receipt_holds(&crate::ledger::receipt::verify(
            &early, &other
        )));
    }

    #[test]
    fn bytes_changed_behind_the_servers_back_are_never_served() {
        let (_dir, store, registry) = fresh_store();
        let (log, _ledger, replica) = start_log(store.clone(), registry, "http://x/fhir".into());
        create(&log, "t", "Original");
        assert!(store.read(ResourceType::Patient, "t").is_ok());
        let key = version_key(ResourceType::Patient, "t", 1);
        let raw = store
            .db()
            .get_cf(store.cf(CF_VERSIONS), &key)
            .unwrap()
            .unwrap();
        let name: ObjectName = raw[17..].try_into().expect("the entry names an object");
        let object = store.object(&name).unwrap().expect("the sealed version");
        assert!(
            object.windows(8).all(|w| w != b"Original"),
            "nothing in clear at rest"
        );
        // One flipped ciphertext byte: the object no longer matches its name, and the version
        // is not served.
        let mut flipped = object.clone();
        let last = flipped.len() - 5;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        store.overwrite_object_for_test(&name, flipped).unwrap();
        let err = store.read(ResourceType::Patient, "t").unwrap_err();
        assert!(matches!(err, Error::Integrity(_)), "{err:?}");
        let r = crate::ledger::receipt::build(
            &store,
            &replica.membership.chain_id,
            ResourceType::Patient,
            "t",
            1,
        )
        .unwrap();
        assert_eq!(r["parameter"][0]["valueBoolean"], false);
        store
            .overwrite_object_for_test(&name, object.clone())
            .unwrap();
        // Someone holding the data key re-seals different content as a new object and points
        // the version at it: it decrypts, but does not match the ledger commitment, and is not
        // served either.
        let scope = crate::store::envelope::Envelope::scope_of(&object).unwrap();
        let wrapped = store
            .db()
            .get_cf(store.cf(CF_KEYS), scope.as_bytes())
            .unwrap()
            .unwrap();
        let dek = store.envelope().dek(&wrapped).unwrap();
        let plain = store.read_unchecked_for_test(&raw);
        let tampered = String::from_utf8(plain)
            .unwrap()
            .replace("Original", "Tampered");
        let sealed = store
            .envelope()
            .seal(&scope, &dek, tampered.as_bytes())
            .unwrap();
        let forged_name = object_name(&sealed);
        store.put_objects(vec![(forged_name, sealed)]).unwrap();
        let mut forged = raw[..17].to_vec();
        forged.extend_from_slice(&forged_name);
        store
            .db()
            .put_cf(store.cf(CF_VERSIONS), &key, &forged)
            .unwrap();
        let err = store.read(ResourceType::Patient, "t").unwrap_err();
        assert!(matches!(err, Error::Integrity(_)), "{err:?}");
        assert!(store
            .instance_history(ResourceType::Patient, "t", None, None, 10)
            .is_err());
        let r = crate::ledger::receipt::build(
            &store,
            &replica.membership.chain_id,
            ResourceType::Patient,
            "t",
            1,
        )
        .unwrap();
        assert_eq!(r["parameter"][0]["valueBoolean"], false);
        assert!(
            !r.to_string().contains("Tampered"),
            "tampered bytes are reported, not served"
        );
        let checks = crate::ledger::receipt::verify(&r, &replica.membership);
        assert!(checks.iter().any(|c| c.name == "stored" && !c.ok));
    }

    #[test]
    fn pending_writes_survive_their_sidecar_encoding() {
        let mut o = Overlay::default();
        o.put(
            CF_VERSIONS,
            b"Patient\0a\0\0\0\0\0\0\0\0\x01".to_vec(),
            Some(b"{}".to_vec()),
        );
        o.put(CF_INDEX, b"k1".to_vec(), None);
        o.put(CF_LEDGER, b"s".to_vec(), Some(vec![7; 32]));
        let (tx, ts, back) = Overlay::decode(&o.encode(42, 1_700_000_000_000)).unwrap();
        assert_eq!((tx, ts), (42, 1_700_000_000_000));
        assert!(
            back.writes.iter().eq(o.writes.iter()),
            "same writes in the same order"
        );
        assert!(
            Overlay::decode(&o.encode(1, 2)[..20]).is_none(),
            "a truncated sidecar is refused"
        );
    }
}

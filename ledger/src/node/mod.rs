//! The I/O shell around the pure core: a replica process. One driver thread owns the
//! `Replica` and the `LedgerStore` and is the only place that reads the clock; a small tokio
//! runtime carries TCP traffic. Queues are bounded: when the driver falls behind, peer messages
//! are dropped (PBFT retransmits) and clients are told `busy`.
//!
//! Wire frames: `u32 length | u8 kind | body`. Kinds: 0 a signed peer message; 1 a client
//! submission (body: the entry); 2 a commit reply (sha256(entry) | seq | state root | the
//! certificate it was executed on: 2f+1 commits, or a checkpoint proof after a state transfer);
//! 3 busy (sha256(entry)); 4 hello (a signed `Payload::Hello`). A peer connection opens with a
//! hello: the receiver checks its signature, that it is addressed to this replica, that its
//! session started within a minute of the receiver's clock and after every session that
//! sender opened before. A replayed connection is refused and reported as a `Replay` fault,
//! peer messages without a session as `Unauthenticated`; client submissions need none.

pub mod client;
pub mod cluster;
pub mod genesis;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc as amp;

use crate::core::message::{decode_signed, encode_signed};
use crate::core::{
    Action, Batch, Config, Digest, Fault, FaultKind, Membership, Payload, Record, Replica,
    ReplicaId, Seq, Signed, Step,
};
use crate::store::{LedgerStore, StoreError};
use genesis::Genesis;

pub const FRAME_PEER: u8 = 0;
pub const FRAME_SUBMIT: u8 = 1;
pub const FRAME_COMMITTED: u8 = 2;
pub const FRAME_BUSY: u8 = 3;
pub const FRAME_HELLO: u8 = 4;
/// How far a peer's session start may be from this replica's clock.
const SESSION_SKEW_MS: u64 = 60_000;
/// Largest frame accepted from the network (above the core's message limit).
pub const MAX_FRAME_BYTES: usize = 64 << 20;
const INPUT_QUEUE: usize = 65_536;
const PEER_QUEUE: usize = 16_384;
const INPUTS_PER_ROUND: usize = 256;

/// Messages dropped because a queue was full: inbound (driver behind) and outbound (peer slow).
static DROPPED_IN: AtomicU64 = AtomicU64::new(0);
static DROPPED_OUT: AtomicU64 = AtomicU64::new(0);

/// Buffer of a peer connection's reader.
const READ_BUFFER_BYTES: usize = 64 << 10;

fn send_or_count(q: &amp::Sender<Vec<u8>>, f: Vec<u8>) {
    if q.try_send(f).is_err() {
        DROPPED_OUT.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("genesis: {0}")]
    Genesis(String),
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
}

/// Consensus settings for replica processes (ticks are milliseconds).
pub fn consensus(view_change_timeout_ms: u64, max_batch_entries: usize) -> Config {
    Config {
        view_change_timeout: view_change_timeout_ms,
        max_batch_entries,
        batch_delay: 1,
        retransmit_interval: 100,
        // View changes carry prepared certificates (with their batches) for the window above
        // the stable checkpoint; the core sizes batches so the largest NEW-VIEW fits the
        // message limit, and a smaller window allows larger batches (and entries: ~260 KB).
        checkpoint_interval: 16,
        window: 32,
        pipeline: 16,
        max_message_bytes: 32 << 20,
        ..Config::default()
    }
}

pub struct NodeConfig {
    pub id: ReplicaId,
    /// Where to accept peer connections, when not at the genesis address (e.g. `0.0.0.0:7000`
    /// in a container whose genesis address is a DNS name).
    pub listen: Option<String>,
    pub genesis: Genesis,
    pub key: SigningKey,
    pub data_dir: PathBuf,
    pub consensus: Config,
    pub tick: Duration,
}

enum Input {
    Peer(crate::core::Signed),
    Submit {
        entry: Vec<u8>,
        reply: amp::Sender<Vec<u8>>,
    },
    /// From the application embedding this replica: its executions arrive as `Event`s.
    Local {
        entry: Vec<u8>,
        sidecar: Vec<u8>,
    },
    /// The application no longer needs these sidecars.
    Release(Vec<Digest>),
}

/// What an embedding application learns from its replica, in ledger order.
#[derive(Debug, Clone)]
pub enum Event {
    /// A block was executed (or, at start-up, replayed from the store with no certificate).
    /// `sidecars[i]` is the sidecar stored with entry i, if it was submitted here and is not in
    /// the application's memory (after a restart).
    Executed {
        seq: Seq,
        batch: Batch,
        root: Digest,
        certificate: Vec<Signed>,
        sidecars: Vec<Option<Vec<u8>>>,
    },
    /// A checkpoint became stable: 2f+1 signed (seq, root).
    Stable {
        seq: Seq,
        root: Digest,
        proof: Vec<Signed>,
    },
}

/// The submission side of a replica embedded in an application.
pub struct Embedded {
    inputs: SyncSender<Input>,
    pub status: std::sync::Arc<NodeStatus>,
    /// The largest entry the replica orders (`Replica::max_entry_bytes`).
    pub max_entry_bytes: usize,
}

/// What the driver last saw, for health probes: updated every round (at least every tick).
#[derive(Debug, Default)]
pub struct NodeStatus {
    pub view: AtomicU64,
    pub view_active: std::sync::atomic::AtomicBool,
    pub last_executed: AtomicU64,
    /// Wall-clock ms of the driver's last round.
    pub heartbeat_ms: AtomicU64,
    /// Faults observed (by the core, and by the transport), by culprit and kind.
    faults: Mutex<BTreeMap<(ReplicaId, FaultKind), u64>>,
}

impl NodeStatus {
    /// Count a fault, and log it the 1st, 2nd, 4th, 8th… time that culprit commits that kind
    /// (a flood stays visible without flooding the log).
    pub fn record_fault(&self, f: &Fault) {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let n = faults.entry((f.from, f.kind)).or_default();
        *n += 1;
        if n.is_power_of_two() {
            eprintln!(
                "ledger: fault from replica {} ({:?}, {} so far): {}",
                f.from, f.kind, n, f.detail
            );
        }
    }

    /// Faults observed since start: (culprit, kind, count).
    pub fn faults(&self) -> Vec<(ReplicaId, FaultKind, u64)> {
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        faults.iter().map(|((r, k), n)| (*r, *k, *n)).collect()
    }
}

/// Peer sessions: which hellos this replica accepts.
struct PeerSessions {
    me: ReplicaId,
    members: Membership,
    /// The latest session accepted from each peer.
    latest: Mutex<HashMap<ReplicaId, u64>>,
}

impl PeerSessions {
    /// The peer a hello opens a session for, or the fault it is.
    fn accept(&self, m: &Signed, now: u64) -> Result<ReplicaId, Fault> {
        let fault = |kind, detail: String| Fault {
            from: m.from,
            kind,
            detail,
        };
        if m.from as usize >= self.members.n() || m.from == self.me {
            return Err(fault(
                FaultKind::NotMember,
                "hello from a non-member".into(),
            ));
        }
        if !self.members.verify(m) {
            return Err(fault(
                FaultKind::BadSignature,
                "hello with a bad signature".into(),
            ));
        }
        let Payload::Hello { to, session } = m.payload else {
            return Err(fault(
                FaultKind::Unauthenticated,
                format!("a {} where a hello was due", m.payload.kind()),
            ));
        };
        if to != self.me {
            return Err(fault(
                FaultKind::Unauthenticated,
                format!("hello addressed to replica {to}"),
            ));
        }
        if session.abs_diff(now) > SESSION_SKEW_MS {
            return Err(fault(
                FaultKind::Replay,
                format!(
                    "hello for a session started {} ms from now",
                    session.abs_diff(now)
                ),
            ));
        }
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let last = latest.entry(m.from).or_default();
        if session <= *last {
            return Err(fault(
                FaultKind::Replay,
                format!("hello for session {session}, not after session {last}"),
            ));
        }
        *last = session;
        Ok(m.from)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the ledger replica is overloaded")]
    Busy,
    #[error("the ledger replica has stopped")]
    Stopped,
    #[error("an entry of {bytes} bytes is larger than the {limit} bytes the ledger orders")]
    TooLarge { bytes: usize, limit: usize },
}

impl Embedded {
    /// Hand an entry to the replica for ordering; its execution arrives as an `Event`. The
    /// sidecar (bytes the application needs to apply the entry, e.g. its off-chain record) is
    /// durable before the entry leaves this replica — in the same synced write as the round's
    /// consensus records, so it costs no extra fsync — and is kept until released.
    pub fn submit(&self, entry: Vec<u8>, sidecar: Vec<u8>) -> Result<(), SubmitError> {
        if entry.len() > self.max_entry_bytes {
            return Err(SubmitError::TooLarge {
                bytes: entry.len(),
                limit: self.max_entry_bytes,
            });
        }
        self.inputs
            .try_send(Input::Local { entry, sidecar })
            .map_err(|e| match e {
                TrySendError::Full(_) => SubmitError::Busy,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            })
    }

    /// The application has made these entries' effects durable: drop their sidecars.
    pub fn release(&self, entry_hashes: Vec<Digest>) {
        if !entry_hashes.is_empty() {
            // Blocking: a release must not be lost, and the queue drains every round.
            let _ = self.inputs.send(Input::Release(entry_hashes));
        }
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    f.push(kind);
    f.extend_from_slice(body);
    f
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serve one inbound connection: peer messages (after a hello) and client submissions.
async fn serve_connection(
    stream: TcpStream,
    inputs: SyncSender<Input>,
    sessions: Arc<PeerSessions>,
    status: Arc<NodeStatus>,
) {
    let mut peer: Option<ReplicaId> = None;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    // Frames are small and come in bursts: one read takes in several.
    let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let (reply_tx, mut reply_rx) = amp::channel::<Vec<u8>>(PEER_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(f) = reply_rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                break;
            }
        }
    });
    loop {
        let mut len = [0u8; 4];
        if rd.read_exact(&mut len).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_BYTES {
            break;
        }
        let mut body = vec![0u8; len];
        if rd.read_exact(&mut body).await.is_err() {
            break;
        }
        let kind = body.remove(0);
        match kind {
            FRAME_HELLO => match decode_signed(&body) {
                Err(_) => break,
                Ok(m) => match sessions.accept(&m, now_ms()) {
                    Ok(from) => peer = Some(from),
                    Err(fault) => {
                        status.record_fault(&fault);
                        break;
                    }
                },
            },
            FRAME_PEER => match decode_signed(&body) {
                // Undecodable bytes are not even a message: drop the connection.
                Err(_) => break,
                Ok(m) if peer.is_none() => {
                    status.record_fault(&Fault {
                        from: m.from,
                        kind: FaultKind::Unauthenticated,
                        detail: format!("a {} on a connection without a session", m.payload.kind()),
                    });
                    break;
                }
                Ok(m) => {
                    if inputs.try_send(Input::Peer(m)).is_err() {
                        DROPPED_IN.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            FRAME_SUBMIT => {
                let hash: [u8; 32] = Sha256::digest(&body).into();
                if let Err(TrySendError::Full(_)) = inputs.try_send(Input::Submit {
                    entry: body,
                    reply: reply_tx.clone(),
                }) {
                    let _ = reply_tx.try_send(frame(FRAME_BUSY, &hash));
                }
            }
            _ => break,
        }
    }
    writer.abort();
}

/// Keep a connection to one peer and write its queued frames; reconnect on failure.
async fn peer_writer(
    addr: String,
    mut queue: amp::Receiver<Vec<u8>>,
    hello: impl Fn() -> Vec<u8> + Send + 'static,
) {
    let mut conn: Option<TcpStream> = None;
    while let Some(f) = queue.recv().await {
        if conn.is_none() {
            match TcpStream::connect(addr.as_str()).await {
                Ok(mut s) => {
                    let _ = s.set_nodelay(true);
                    if s.write_all(&hello()).await.is_err() {
                        continue;
                    }
                    conn = Some(s);
                }
                // Peer down: this frame is lost; PBFT retransmits what matters.
                Err(_) => continue,
            }
        }
        if let Some(s) = conn.as_mut() {
            if s.write_all(&f).await.is_err() {
                conn = None;
            }
        }
    }
}

/// Start a replica process's services and run its driver on this thread until the process ends.
pub fn run(cfg: NodeConfig) -> Result<(), NodeError> {
    let mut node = start(cfg)?;
    let n = &mut node;
    drive(
        &mut n.replica,
        &mut n.store,
        &n.inputs,
        &n.peers,
        n.tick,
        None,
        &n.status,
    )
}

/// Start a replica inside an application: its driver runs on its own thread; blocks executed
/// after `applied` (the last sequence number the application has applied) are first replayed
/// from the store, then every execution and stable checkpoint is sent to `events` in order.
pub fn embed(
    cfg: NodeConfig,
    applied: Seq,
    mut on_event: impl FnMut(Event) + Send + 'static,
) -> Result<Embedded, NodeError> {
    let mut node = start(cfg)?;
    let last = node.replica.last_executed();
    if applied < last {
        let blocks = node.store.blocks_with_roots(applied, last)?;
        for (i, (root, batch)) in blocks.into_iter().enumerate() {
            let sidecars = batch
                .entries
                .iter()
                .map(|e| node.store.sidecar(&Sha256::digest(e).into()))
                .collect::<Result<_, _>>()?;
            on_event(Event::Executed {
                seq: applied + 1 + i as u64,
                batch,
                root,
                certificate: vec![],
                sidecars,
            });
        }
    }
    let inputs = node.inputs_tx.clone();
    let status = node.status.clone();
    let max_entry_bytes = node.replica.max_entry_bytes();
    std::thread::Builder::new()
        .name("ledger-replica".into())
        .spawn(move || {
            let n = &mut node;
            let r = drive(
                &mut n.replica,
                &mut n.store,
                &n.inputs,
                &n.peers,
                n.tick,
                Some(&mut on_event),
                &n.status,
            );
            if let Err(e) = r {
                eprintln!("ledger replica stopped: {e}");
            }
        })?;
    Ok(Embedded {
        inputs,
        status,
        max_entry_bytes,
    })
}

struct Started {
    replica: Replica,
    store: LedgerStore,
    inputs: Receiver<Input>,
    inputs_tx: SyncSender<Input>,
    peers: HashMap<ReplicaId, amp::Sender<Vec<u8>>>,
    tick: Duration,
    status: Arc<NodeStatus>,
    _rt: tokio::runtime::Runtime,
}

fn start(cfg: NodeConfig) -> Result<Started, NodeError> {
    let members = cfg.genesis.membership().map_err(NodeError::Genesis)?;
    let me = cfg
        .genesis
        .replicas
        .get(cfg.id as usize)
        .ok_or_else(|| NodeError::Genesis(format!("no replica {} in the genesis", cfg.id)))?;
    if members.keys[cfg.id as usize] != cfg.key.verifying_key() {
        return Err(NodeError::Genesis(format!(
            "the key does not belong to replica {}",
            cfg.id
        )));
    }
    let (store, records) = LedgerStore::open(&cfg.data_dir)?;
    let replica = Replica::restore(
        cfg.id,
        cfg.consensus.clone(),
        cfg.key.clone(),
        members.clone(),
        &records,
    );
    let status = Arc::new(NodeStatus::default());
    let sessions = Arc::new(PeerSessions {
        me: cfg.id,
        members: members.clone(),
        latest: Mutex::new(HashMap::new()),
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (inputs_tx, inputs) = mpsc::sync_channel::<Input>(INPUT_QUEUE);
    let listen = cfg.listen.clone().unwrap_or_else(|| me.address.clone());
    let listener = rt.block_on(TcpListener::bind(listen.as_str()))?;
    let accept_inputs = inputs_tx.clone();
    let accept_status = status.clone();
    rt.spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve_connection(
                s,
                accept_inputs.clone(),
                sessions.clone(),
                accept_status.clone(),
            ));
        }
    });
    let mut peers: HashMap<ReplicaId, amp::Sender<Vec<u8>>> = HashMap::new();
    for r in &cfg.genesis.replicas {
        if r.id != cfg.id {
            let (tx, rx) = amp::channel(PEER_QUEUE);
            let (key, members, me, to) = (cfg.key.clone(), members.clone(), cfg.id, r.id);
            let last = AtomicU64::new(0);
            // Each connection opens a new session, later than any before it.
            let hello = move || {
                let session = now_ms().max(last.load(Ordering::Relaxed) + 1);
                last.store(session, Ordering::Relaxed);
                let m = members.sign(&key, me, Payload::Hello { to, session });
                frame(FRAME_HELLO, &encode_signed(&m))
            };
            rt.spawn(peer_writer(r.address.clone(), rx, hello));
            peers.insert(r.id, tx);
        }
    }
    Ok(Started {
        replica,
        store,
        inputs,
        inputs_tx,
        peers,
        tick: cfg.tick,
        status,
        _rt: rt,
    })
}

fn drive(
    replica: &mut Replica,
    store: &mut LedgerStore,
    inputs: &Receiver<Input>,
    peers: &HashMap<ReplicaId, amp::Sender<Vec<u8>>>,
    tick: Duration,
    mut events: Option<&mut dyn FnMut(Event)>,
    status: &NodeStatus,
) -> Result<(), NodeError> {
    // Clients waiting for their entries, by entry hash.
    let mut waiting: HashMap<[u8; 32], Vec<amp::Sender<Vec<u8>>>> = HashMap::new();
    // Entries the application submitted in this process (it holds their sidecars in memory).
    let mut local: std::collections::HashSet<[u8; 32]> = Default::default();
    let mut next_tick = std::time::Instant::now();
    // FHIRMAMENT_LEDGER_STATUS=1 prints a status line every second (for operators and tests).
    let report_status = std::env::var_os("FHIRMAMENT_LEDGER_STATUS").is_some();
    let mut next_status = std::time::Instant::now();
    loop {
        if report_status && std::time::Instant::now() >= next_status {
            eprintln!(
                "{} dropped in {} out {} faults {:?}",
                replica.status(),
                DROPPED_IN.load(Ordering::Relaxed),
                DROPPED_OUT.load(Ordering::Relaxed),
                status.faults()
            );
            next_status = std::time::Instant::now() + Duration::from_secs(1);
        }
        let mut steps: Vec<Step> = Vec::new();
        let mut sidecars: Vec<(Digest, Vec<u8>)> = Vec::new();
        let mut release: Vec<Digest> = Vec::new();
        let timeout = next_tick.saturating_duration_since(std::time::Instant::now());
        let first = match inputs.recv_timeout(timeout) {
            Ok(i) => Some(i),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let now = now_ms();
        status.view.store(replica.view(), Ordering::Relaxed);
        status
            .view_active
            .store(replica.is_view_active(), Ordering::Relaxed);
        status
            .last_executed
            .store(replica.last_executed(), Ordering::Relaxed);
        status.heartbeat_ms.store(now, Ordering::Relaxed);
        let mut batch: Vec<Input> = first.into_iter().collect();
        while batch.len() < INPUTS_PER_ROUND {
            match inputs.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        for input in batch {
            match input {
                Input::Peer(m) => steps.push(replica.handle_message(now, m)),
                Input::Submit { entry, reply } => {
                    waiting
                        .entry(Sha256::digest(&entry).into())
                        .or_default()
                        .push(reply);
                    steps.push(replica.handle_request(now, entry));
                }
                Input::Local { entry, sidecar } => {
                    let h: Digest = Sha256::digest(&entry).into();
                    local.insert(h);
                    sidecars.push((h, sidecar));
                    steps.push(replica.handle_request(now, entry));
                }
                Input::Release(hashes) => release.extend(hashes),
            }
        }
        if std::time::Instant::now() >= next_tick {
            steps.push(replica.handle_tick(now));
            next_tick = std::time::Instant::now() + tick;
        }
        steps.push(replica.handle_inputs_drained(now));
        // Every record of the round is durable before any of its messages leave.
        for fault in steps.iter().flat_map(|s| &s.faults) {
            status.record_fault(fault);
        }
        let actions: Vec<Action> = steps.into_iter().flat_map(|s| s.actions).collect();
        let records: Vec<Record> = actions
            .iter()
            .filter_map(|a| {
                if let Action::Persist(r) = a {
                    Some(r.clone())
                } else {
                    None
                }
            })
            .collect();
        // What must be durable is whatever this replica already acted on: messages it sent,
        // blocks it executed, the entries (sidecars) it let go. Peers' messages it only took
        // in, with nothing sent on them yet, may be lost in a crash like messages lost in the
        // network, so a round of nothing else is written without a sync; the next round that
        // acts syncs them with its own (sync before any send, as before).
        store.append_with(&records, &sidecars, &release, Action::any_acts(&actions))?;
        for a in actions {
            match a {
                Action::Persist(Record::Stable { seq, root, proof }) => {
                    if let Some(ev) = events.as_mut() {
                        ev(Event::Stable { seq, root, proof });
                    }
                }
                Action::Persist(_) => {}
                Action::Send { to, message } => {
                    if let Some(q) = peers.get(&to) {
                        send_or_count(q, frame(FRAME_PEER, &encode_signed(&message)));
                    }
                }
                Action::Broadcast(message) => {
                    let f = frame(FRAME_PEER, &encode_signed(&message));
                    for q in peers.values() {
                        send_or_count(q, f.clone());
                    }
                }
                Action::Execute {
                    seq,
                    batch,
                    root,
                    certificate,
                } => {
                    let cert = crate::core::message::encode_signed_list(&certificate);
                    if let Some(ev) = events.as_mut() {
                        let mut found = Vec::with_capacity(batch.entries.len());
                        for e in &batch.entries {
                            let h: Digest = Sha256::digest(e).into();
                            found.push(if local.remove(&h) {
                                None
                            } else {
                                store.sidecar(&h)?
                            });
                        }
                        ev(Event::Executed {
                            seq,
                            batch: batch.clone(),
                            root,
                            certificate,
                            sidecars: found,
                        });
                    }
                    for e in &batch.entries {
                        let hash: [u8; 32] = Sha256::digest(e).into();
                        if let Some(clients) = waiting.remove(&hash) {
                            let mut body = hash.to_vec();
                            body.extend_from_slice(&seq.to_be_bytes());
                            body.extend_from_slice(&root);
                            body.extend_from_slice(&cert);
                            let f = frame(FRAME_COMMITTED, &body);
                            for c in clients {
                                let _ = c.try_send(f.clone());
                            }
                        }
                    }
                }
                Action::ServeBlocks {
                    to,
                    from_seq,
                    to_seq,
                } => {
                    let batches = store.blocks(from_seq, to_seq)?;
                    let m = replica.sign(Payload::Blocks {
                        first_seq: from_seq + 1,
                        batches,
                    });
                    if let Some(q) = peers.get(&to) {
                        send_or_count(q, frame(FRAME_PEER, &encode_signed(&m)));
                    }
                }
            }
        }
        // Forget clients whose connections went away.
        waiting.retain(|_, v| {
            v.retain(|c| !c.is_closed());
            !v.is_empty()
        });
    }
}

/// A frame on a blocking socket (for clients).
pub(crate) fn client_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    frame(kind, body)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    use super::genesis::{public_key_hex, GenesisReplica};
    use super::*;
    use crate::core::message::test_key;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Replica 0 of a 4-replica genesis, its transport listening (no driver: what reaches it
    /// waits in its input queue).
    fn replica_zero(dir: &std::path::Path) -> (Started, String, Membership) {
        let replicas: Vec<GenesisReplica> = (0..4u32)
            .map(|id| GenesisReplica {
                id,
                public_key: public_key_hex(&test_key(9, id)),
                address: format!("127.0.0.1:{}", free_port()),
                api: None,
            })
            .collect();
        let genesis = Genesis {
            chain_id: "sessions".into(),
            replicas,
        };
        let members = genesis.membership().unwrap();
        let address = genesis.replicas[0].address.clone();
        let node = start(NodeConfig {
            id: 0,
            listen: None,
            genesis,
            key: test_key(9, 0),
            data_dir: dir.to_path_buf(),
            consensus: consensus(300, 64),
            tick: Duration::from_millis(10),
        })
        .unwrap();
        (node, address, members)
    }

    fn hello(members: &Membership, signer: ReplicaId, from: ReplicaId, session: u64) -> Vec<u8> {
        let mut m = members.sign(
            &test_key(9, signer),
            from,
            Payload::Hello { to: 0, session },
        );
        m.from = from;
        frame(FRAME_HELLO, &encode_signed(&m))
    }

    fn status_message(members: &Membership) -> Vec<u8> {
        let m = members.sign(
            &test_key(9, 1),
            1,
            Payload::Status {
                view: 0,
                last_executed: 0,
            },
        );
        frame(FRAME_PEER, &encode_signed(&m))
    }

    /// Send frames on a new connection; true if the replica then closed it.
    fn closed_after(address: &str, frames: &[Vec<u8>]) -> bool {
        let mut s = StdStream::connect(address).unwrap();
        for f in frames {
            s.write_all(f).unwrap();
        }
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match s.read(&mut [0u8; 16]) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }

    fn count(node: &Started, from: ReplicaId, kind: FaultKind) -> u64 {
        node.status
            .faults()
            .into_iter()
            .find(|(r, k, _)| *r == from && *k == kind)
            .map_or(0, |(_, _, n)| n)
    }

    fn peer_inputs(node: &Started) -> usize {
        std::iter::from_fn(|| node.inputs.try_recv().ok())
            .filter(|i| matches!(i, Input::Peer(_)))
            .count()
    }

    #[test]
    fn peer_messages_need_a_fresh_session_and_replayed_sessions_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (node, address, members) = replica_zero(dir.path());

        // Peer messages without a hello: refused, reported, the connection closed.
        assert!(closed_after(&address, &[status_message(&members)]));
        assert_eq!(count(&node, 1, FaultKind::Unauthenticated), 1);
        assert_eq!(peer_inputs(&node), 0);

        // A fresh session: its messages reach the replica.
        let session = now_ms();
        let opened = hello(&members, 1, 1, session);
        let mut s = StdStream::connect(&address).unwrap();
        s.write_all(&opened).unwrap();
        s.write_all(&status_message(&members)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(peer_inputs(&node), 1);

        // The same connection replayed: refused and reported as a replay.
        assert!(closed_after(
            &address,
            &[opened.clone(), status_message(&members)]
        ));
        assert_eq!(count(&node, 1, FaultKind::Replay), 1);
        // So is a session from long ago, and one older than the last.
        assert!(closed_after(
            &address,
            &[hello(&members, 1, 1, session - 10 * 60_000)]
        ));
        assert!(closed_after(
            &address,
            &[hello(&members, 1, 1, session - 1)]
        ));
        assert_eq!(count(&node, 1, FaultKind::Replay), 3);
        // A hello signed by someone else, or by a non-member.
        assert!(closed_after(&address, &[hello(&members, 2, 1, now_ms())]));
        assert_eq!(count(&node, 1, FaultKind::BadSignature), 1);
        assert!(closed_after(&address, &[hello(&members, 2, 7, now_ms())]));
        assert_eq!(count(&node, 7, FaultKind::NotMember), 1);
        assert_eq!(peer_inputs(&node), 0);

        // A newer session from the same peer is accepted.
        let mut s2 = StdStream::connect(&address).unwrap();
        s2.write_all(&hello(&members, 1, 1, now_ms() + 1)).unwrap();
        s2.write_all(&status_message(&members)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(peer_inputs(&node), 1);
        drop(s);
    }
}

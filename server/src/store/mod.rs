//! Durable, versioned storage of FHIR resources in RocksDB.
//!
//! Column families (declared here and nowhere else):
//!
//! | family        | key                                   | value                                  |
//! |---------------|---------------------------------------|----------------------------------------|
//! | `versions`    | type \0 id \0 version(8)              | tx(8) lastUpdated(8) flags(1) object(32)|
//! | `objects`     | SHA-256 of the bytes (32)             | a sealed version: compact JWE (embedded)|
//! | `current`     | type \0 id                            | version(8) deleted(1) tx(8) lastUpd(8) |
//! | `history`     | tx(8) entry(4)                        | type \0 id \0 version(8)               |
//! | `type_history`| type \0 tx(8) entry(4)                | version(8) id                          |
//! | `index`       | see `search::keys`                    | date bounds or empty                   |
//! | `values`      | param prefix(5) id                    | `IndexValue` list, sealed (`blind`)    |
//! | `meta`        | name                                  | counters (last tx, last timestamp)     |
//! | `keys`        | scope (`Patient/id`, `Type/id`)       | its data key, wrapped under the KEK    |
//! |               | `index`                               | the blinding key, wrapped under the KEK|
//! | `ledger`      | `b` seq(8)                            | `BlockInfo`: header, entries, commits  |
//! |               | `l` seq(8)                            | the block's leaf in the ledger's tree  |
//! |               | `c` type \0 id                        | `LedgerHead`: version, deleted, holder |
//! |               | `r` type \0 id \0 version(8)          | `RecordRef`: position, commitment      |
//! |               | `s` type \0 id \0 version(8)          | the version's salt (held versions only)|
//! |               | `k`                                   | the latest `StableCheckpoint`          |
//! |               | `x` Patient/id \0 type \0 id          | compartment membership (ever)          |
//! |               | `y` type \0 id                        | the current version's patients (\n)    |
//! |               | `p` Patient/id \0 consent id          | `ConsentPolicy` in force, seq(8) first |
//! |               | `q` consent id                        | the patient its policy is filed under  |
//!
//! `ledger` is what this replica derived from executed blocks, in ledger order (the same on
//! every replica, except `s`, which belongs to the holder). A submitted entry's pending writes
//! are not here: they ride as a sidecar in the replica's own store until applied.
//! `versions`, `current` and both histories are the record; `index` and `values` are derived
//! from the stored versions alone and `fhirmament reindex` rebuilds them byte for byte.
//! Every change is written by the commit thread in `txlog`, one WriteBatch per round of applied
//! ledger blocks (durability comes from the ledger replica's store; see ARCHITECTURE.md).

pub mod envelope;
pub mod objects;
pub mod txlog;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, DB};

use crate::error::{Error, Result};
use crate::fhir::ResourceType;
use crate::search::blind::BlindingKey;
use crate::search::keys::ValueRecord;
use crate::search::value::{decode_values, IndexValue};
use objects::ObjectName;

pub const CF_VERSIONS: &str = "versions";
pub const CF_CURRENT: &str = "current";
pub const CF_HISTORY: &str = "history";
pub const CF_TYPE_HISTORY: &str = "type_history";
pub const CF_INDEX: &str = "index";
pub const CF_VALUES: &str = "values";
pub const CF_META: &str = "meta";
pub const CF_LEDGER: &str = "ledger";
pub const CF_KEYS: &str = "keys";
pub const CF_OBJECTS: &str = "objects";
/// Families are named by their position here in sidecars: append only.
pub const COLUMN_FAMILIES: [&str; 10] = [
    CF_VERSIONS,
    CF_CURRENT,
    CF_HISTORY,
    CF_TYPE_HISTORY,
    CF_INDEX,
    CF_VALUES,
    CF_META,
    CF_LEDGER,
    CF_KEYS,
    CF_OBJECTS,
];
/// The blinding key's scope in `keys` (no resource scope lacks a '/').
const KEYS_BLINDING: &[u8] = b"index";
/// Present (in `meta`) while the derived families need a `reindex` to be blind and whole.
pub const META_INDEX_STALE: &[u8] = b"index-stale";
/// The proof (in `meta`) that this store was sealed under the configured KEK.
pub(crate) const META_KEK_CHECK: &[u8] = b"kek-check";
/// The derived families that `reindex` rebuilds.
pub const DERIVED_FAMILIES: [&str; 2] = [CF_INDEX, CF_VALUES];
/// The layout (in `meta`) of what the derived families hold. A store whose derived families
/// were written in another layout is marked stale on open, and rebuilt before it is served.
pub const META_DERIVED_LAYOUT: &[u8] = b"derived-layout";
/// 4: a `ValueRecord`'s presence and lists in two entries. 3: resource ids in index and
/// value keys in `IdBytes` form (UUIDs in 16 bytes). 2: one `ValueRecord` per resource in
/// `values`, in one entry. (1, never written: one value list per resource
/// and parameter, ids as text.)
pub const DERIVED_LAYOUT: [u8; 1] = [4];

/// Sorted runs (memtable flushes, earlier merges) a family gathers before they are merged.
/// Compaction is universal (size-tiered), not leveled: keys land all over the key space
/// (blinded terms, random ids, content hashes), so leveled compaction rewrote most of the next
/// level for every few flushes pushed into it, a cost that grew with the store (4% of all CPU
/// on a fresh store, 14% after 60,000 creates). Universal merges runs of similar size, so a
/// byte is rewritten about once per doubling of the store; point lookups skip most runs by
/// their Bloom filters. It needs free disk for a family's largest merge (up to the family's
/// size). A store written with leveled compaction opens as it is: each level is one run.
/// Measured on 4 replicas sharing 2 cores, 64 clients, 60 s: 1,993 creates/s at 0.74 ms of
/// CPU each (p99 70 ms), against 1,908 at 0.79 ms (p99 81 ms) leveled; one node: creates
/// 2,782/s against 2,500, reads and searches alike (4,261 and 1,639/s against 4,215 and
/// 1,643). Eight runs rather than RocksDB's 4 halve merging per byte written, as they did for
/// leveled compaction.
const RUNS_PER_COMPACTION: i32 = 8;

/// Families whose values or keys are ciphertext or MACs.
const INCOMPRESSIBLE_FAMILIES: [&str; 4] = [CF_OBJECTS, CF_VALUES, CF_KEYS, CF_INDEX];

/// Memtable size per column family.
const MEMTABLE_BYTES: usize = 8 << 20;

pub const META_LAST_TX: &[u8] = b"last_tx";
pub const META_LAST_TS: &[u8] = b"last_timestamp";
/// The last ledger sequence number applied, and the ledger root after it.
pub const META_APPLIED_SEQ: &[u8] = b"applied_seq";
pub const META_LEDGER_ROOT: &[u8] = b"ledger_root";
/// `date_width` + param prefix -> the widest date range (ms) ever indexed for that parameter.
pub const META_DATE_WIDTH: &[u8] = b"date_width";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
    Delete,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
        }
    }
    fn code(self) -> u8 {
        match self {
            Method::Post => 0,
            Method::Put => 1,
            Method::Delete => 2,
            Method::Patch => 3,
        }
    }
    fn from_code(c: u8) -> Method {
        match c & 3 {
            0 => Method::Post,
            1 => Method::Put,
            2 => Method::Delete,
            _ => Method::Patch,
        }
    }
}

/// The head of a resource: its latest version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    pub version: u64,
    pub deleted: bool,
    pub tx: u64,
    pub last_updated: i64,
}

impl Current {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(25);
        v.extend_from_slice(&self.version.to_be_bytes());
        v.push(self.deleted as u8);
        v.extend_from_slice(&self.tx.to_be_bytes());
        v.extend_from_slice(&self.last_updated.to_be_bytes());
        v
    }
    pub fn decode(b: &[u8]) -> Option<Current> {
        Some(Current {
            version: u64::from_be_bytes(b.get(0..8)?.try_into().ok()?),
            deleted: *b.get(8)? != 0,
            tx: u64::from_be_bytes(b.get(9..17)?.try_into().ok()?),
            last_updated: i64::from_be_bytes(b.get(17..25)?.try_into().ok()?),
        })
    }
}

/// One stored version of a resource.
#[derive(Debug, Clone)]
pub struct Version {
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub tx: u64,
    pub last_updated: i64,
    pub deleted: bool,
    pub method: Method,
    /// The resource JSON exactly as stored (with id and meta set); empty when deleted.
    pub body: Arc<[u8]>,
}

impl Version {
    pub fn encode_value(
        tx: u64,
        last_updated: i64,
        deleted: bool,
        method: Method,
        body: &[u8],
    ) -> Vec<u8> {
        let mut v = Vec::with_capacity(17 + body.len());
        v.extend_from_slice(&tx.to_be_bytes());
        v.extend_from_slice(&last_updated.to_be_bytes());
        v.push(method.code() | if deleted { 0x80 } else { 0 });
        v.extend_from_slice(body);
        v
    }
    fn decode(rtype: ResourceType, id: &str, version: u64, b: &[u8]) -> Option<Version> {
        let flags = *b.get(16)?;
        Some(Version {
            rtype,
            id: id.to_string(),
            version,
            tx: u64::from_be_bytes(b.get(0..8)?.try_into().ok()?),
            last_updated: i64::from_be_bytes(b.get(8..16)?.try_into().ok()?),
            deleted: flags & 0x80 != 0,
            method: Method::from_code(flags),
            body: Arc::from(&b[17..]),
        })
    }
}

pub fn resource_key(rtype: ResourceType, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(rtype.as_str().len() + 1 + id.len());
    k.extend_from_slice(rtype.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn version_key(rtype: ResourceType, id: &str, version: u64) -> Vec<u8> {
    let mut k = resource_key(rtype, id);
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// `Patient/<id> \0 type \0 id`: the ledger's patient-compartment index.
pub fn compartment_key(patient: &str, rtype: ResourceType, id: &str) -> Vec<u8> {
    let mut k = patient.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&resource_key(rtype, id));
    k
}

pub fn ledger_key(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

/// Position in the system history: (transaction, entry within it).
pub type HistoryCursor = (u64, u32);

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub versions: Vec<Version>,
    /// Where the next (older) page starts, if there is one.
    pub next: Option<HistoryCursor>,
}

pub struct Store {
    db: DB,
    /// The KEK and the data keys: every stored version is sealed (see `envelope`).
    envelope: envelope::Envelope,
    /// Blinds index terms and seals stored index values (see `search::blind`).
    blinding: BlindingKey,
    /// Where sealed versions live (see `objects`).
    objects: objects::Objects,
    /// Widest indexed date range per parameter prefix. Only ever grows (deletions do not
    /// shrink it), so a scan window derived from it never misses a value.
    date_widths: std::sync::RwLock<std::collections::HashMap<Vec<u8>, i64>>,
    /// Versions whose bytes this process has checked against the ledger commitment, with the
    /// plain SHA-256 of those bytes: a later read of identical bytes needs no canonical form.
    verified: VerifiedVersions,
}

/// Sharded, bounded memo of verified versions (version key -> SHA-256 of the stored bytes).
struct VerifiedVersions {
    shards: Vec<std::sync::Mutex<std::collections::HashMap<Vec<u8>, [u8; 32]>>>,
}

const VERIFIED_SHARDS: usize = 16;
/// Per shard; a full shard is cleared (the next reads verify again).
const VERIFIED_PER_SHARD: usize = 1 << 16;

impl VerifiedVersions {
    fn new() -> VerifiedVersions {
        VerifiedVersions {
            shards: (0..VERIFIED_SHARDS).map(|_| Default::default()).collect(),
        }
    }
    fn shard(&self, key: &[u8]) -> &std::sync::Mutex<std::collections::HashMap<Vec<u8>, [u8; 32]>> {
        let h = key
            .iter()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize));
        &self.shards[h % VERIFIED_SHARDS]
    }
    fn holds(&self, key: &[u8], digest: &[u8; 32]) -> bool {
        self.shard(key)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .is_some_and(|d| d == digest)
    }
    fn remember(&self, key: Vec<u8>, digest: [u8; 32]) {
        let mut m = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= VERIFIED_PER_SHARD {
            m.clear();
        }
        m.insert(key, digest);
    }
}

fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Refuse a KEK that did not seal this store; seal a new (empty) store under it.
fn check_kek(db: &DB, envelope: &envelope::Envelope, path: &Path) -> Result<()> {
    let kek = envelope.kek();
    match db.get_cf(cf(db, CF_META), META_KEK_CHECK)? {
        Some(record) => {
            let current = kek.opens(&record);
            let previous = envelope.previous().map(|p| p.opens(&record));
            match (current, previous) {
                (Ok(()), None) => Ok(()),
                (Ok(()), Some(_)) | (Err(_), Some(Ok(()))) => rotate_kek(db, envelope),
                (Err(why), _) => Err(Error::Startup(format!(
                    "the key-encryption key {} does not open the store at {}: {why}; nothing was read or written",
                    kek.kid,
                    path.display()
                ))),
            }
        }
        None => {
            let has_records = db
                .iterator_cf(cf(db, CF_VERSIONS), IteratorMode::Start)
                .next()
                .is_some();
            if has_records {
                return Err(Error::Startup(format!(
                    "the store at {} holds records but no key-encryption key check; it was not written by this version",
                    path.display()
                )));
            }
            db.put_cf(cf(db, CF_META), META_KEK_CHECK, kek.check_record()?)?;
            db.flush_wal(true)?;
            Ok(())
        }
    }
}

/// Re-wrap every data key still under the previous KEK, then seal the check record under
/// the current one. Idempotent: a rotation interrupted by a crash resumes at the next start.
fn rotate_kek(db: &DB, envelope: &envelope::Envelope) -> Result<()> {
    let mut batch = rocksdb::WriteBatch::default();
    let (mut rewrapped, mut total) = (0usize, 0usize);
    for item in db.iterator_cf(cf(db, CF_KEYS), IteratorMode::Start) {
        let (scope, wrapped) = item?;
        total += 1;
        if let Some(new) = envelope.rewrap(&wrapped)? {
            batch.put_cf(cf(db, CF_KEYS), scope, new);
            rewrapped += 1;
        }
    }
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)?;
    db.put_cf_opt(
        cf(db, CF_META),
        META_KEK_CHECK,
        envelope.kek().check_record()?,
        &sync,
    )?;
    tracing::info!(
        kek = %envelope.kek().kid,
        rewrapped,
        total,
        "key-encryption key rotated: every data key is wrapped under it; the previous KEK can be retired"
    );
    Ok(())
}

/// The store's blinding key: unwrapped from the `keys` family, or made (and stored wrapped
/// under the KEK) for a store that has none. A store that already has index entries without
/// a blinding key was indexed in clear by an earlier version: it is marked stale
/// (`META_INDEX_STALE`), and opening the service rebuilds the index blind before serving.
fn blinding_key(db: &DB, envelope: &envelope::Envelope) -> Result<BlindingKey> {
    if let Some(wrapped) = db.get_cf(cf(db, CF_KEYS), KEYS_BLINDING)? {
        let key = envelope.dek(&wrapped)?;
        return Ok(BlindingKey::derive(key.bytes()));
    }
    let indexed_in_clear = holds_derived(db);
    let (key, wrapped) = envelope.new_dek()?;
    let mut batch = rocksdb::WriteBatch::default();
    batch.put_cf(cf(db, CF_KEYS), KEYS_BLINDING, wrapped);
    if indexed_in_clear {
        batch.put_cf(cf(db, CF_META), META_INDEX_STALE, b"");
    }
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)?;
    Ok(BlindingKey::derive(key.bytes()))
}

/// Options of one column family.
fn family_options(name: &str) -> Options {
    let mut cf = Options::default();
    // Smaller memtables keep skiplist inserts in cache (the commit thread's main cost).
    cf.set_write_buffer_size(MEMTABLE_BYTES);
    // Most lookups are for keys that do not exist yet (a new resource's current
    // version and ledger head, a new patient's data key): a Bloom filter answers them
    // without reading each level's blocks.
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    cf.set_block_based_table_factory(&table);
    // Sealed versions and values, wrapped keys and blinded terms are random bytes:
    // compressing them in every compaction costs CPU and saves nothing.
    if INCOMPRESSIBLE_FAMILIES.contains(&name) {
        cf.set_compression_type(rocksdb::DBCompressionType::None);
    }
    cf.set_compaction_style(rocksdb::DBCompactionStyle::Universal);
    cf.set_level_zero_file_num_compaction_trigger(RUNS_PER_COMPACTION);
    cf
}

/// Does any derived family hold an entry?
fn holds_derived(db: &DB) -> bool {
    DERIVED_FAMILIES.iter().any(|family| {
        db.iterator_cf(cf(db, family), IteratorMode::Start)
            .next()
            .is_some()
    })
}

/// Mark the derived families stale when they hold another layout than `DERIVED_LAYOUT`; a
/// store with nothing derived yet is written in this one from the start.
fn check_derived_layout(db: &DB) -> Result<()> {
    if db.get_cf(cf(db, CF_META), META_DERIVED_LAYOUT)?.as_deref() == Some(&DERIVED_LAYOUT[..]) {
        return Ok(());
    }
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    if holds_derived(db) {
        tracing::warn!(
            "the search index was written in an earlier layout: it is rebuilt before serving"
        );
        db.put_cf_opt(cf(db, CF_META), META_INDEX_STALE, b"", &sync)?;
    } else {
        db.put_cf_opt(cf(db, CF_META), META_DERIVED_LAYOUT, DERIVED_LAYOUT, &sync)?;
    }
    Ok(())
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("declared column family")
}

impl Store {
    /// Open (or create) the store sealed under `kek`. A store sealed under another KEK is
    /// refused before anything is read or written.
    pub fn open(path: &Path, kek: envelope::Kek) -> Result<Store> {
        Store::open_rotating(path, kek, None)
    }

    /// `open`, completing a KEK rotation when the store is (still, or partly) sealed under
    /// `previous`: every data key is re-wrapped under `kek`, then the check record.
    pub fn open_rotating(
        path: &Path,
        kek: envelope::Kek,
        previous: Option<envelope::Kek>,
    ) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        // One thread writes: let a batch's memtable inserts reuse their skiplist position.
        opts.set_allow_concurrent_memtable_write(false);
        let cfs = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, family_options(name)));
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|e| Error::Storage(format!("opening {}: {e}", path.display())))?;
        let envelope = envelope::Envelope::rotating(kek, previous);
        check_kek(&db, &envelope, path)?;
        let blinding = blinding_key(&db, &envelope)?;
        check_derived_layout(&db)?;
        let store = Store {
            db,
            envelope,
            blinding,
            objects: objects::Objects::Embedded,
            date_widths: Default::default(),
            verified: VerifiedVersions::new(),
        };
        let mut widths = std::collections::HashMap::new();
        for item in store.db.iterator_cf(
            store.cf(CF_META),
            IteratorMode::From(META_DATE_WIDTH, Direction::Forward),
        ) {
            let (k, v) = item?;
            let Some(prefix) = k.strip_prefix(META_DATE_WIDTH) else {
                break;
            };
            if let Ok(b) = <[u8; 8]>::try_from(&v[..]) {
                widths.insert(prefix.to_vec(), i64::from_be_bytes(b));
            }
        }
        *store.date_widths.write().unwrap_or_else(|p| p.into_inner()) = widths;
        Ok(store)
    }

    /// The widest date range indexed so far for a parameter, if any date was indexed.
    pub fn date_width(&self, prefix: &[u8]) -> Option<i64> {
        self.date_widths
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(prefix)
            .copied()
    }

    /// Record that a date range of `width` ms is about to be indexed under `prefix`; returns the
    /// meta key and value to persist when the recorded width grew.
    pub(crate) fn widen_date(&self, prefix: &[u8], width: i64) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut widths = self.date_widths.write().unwrap_or_else(|p| p.into_inner());
        let w = widths.entry(prefix.to_vec()).or_insert(i64::MIN);
        if width <= *w {
            return None;
        }
        *w = width;
        let mut key = META_DATE_WIDTH.to_vec();
        key.extend_from_slice(prefix);
        Some((key, width.to_be_bytes().to_vec()))
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family declared in COLUMN_FAMILIES")
    }

    pub fn current(&self, rtype: ResourceType, id: &str) -> Result<Option<Current>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_CURRENT), resource_key(rtype, id))?
            .and_then(|b| Current::decode(&b)))
    }

    /// A stored version, checked against the ledger's commitment: bytes that do not match
    /// what the ledger committed to are never returned.
    pub fn version(&self, rtype: ResourceType, id: &str, version: u64) -> Result<Option<Version>> {
        match self.version_unchecked(rtype, id, version)? {
            Some(v) => self.check_commitment(v).map(Some),
            None => Ok(None),
        }
    }

    /// A stored version as it is on disk, for `$verify` to report on.
    pub fn version_unchecked(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> Result<Option<Version>> {
        let raw = self
            .db
            .get_pinned_cf(self.cf(CF_VERSIONS), version_key(rtype, id, version))?;
        match raw {
            Some(b) => self.unseal(rtype, id, version, &b),
            None => Ok(None),
        }
    }

    /// A stored version, decrypted with its data key. A version that does not decrypt (a
    /// changed byte, a missing or foreign key) is refused: integrity failure, with an alert.
    fn unseal(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
        raw: &[u8],
    ) -> Result<Option<Version>> {
        let Some(mut v) = Version::decode(rtype, id, version, raw) else {
            return Ok(None);
        };
        if v.deleted {
            return Ok(Some(v));
        }
        let refuse = |why: String| {
            tracing::error!(
                target: "fhirmament::integrity",
                resource = %format!("{rtype}/{id}/_history/{version}"),
                "ALERT: a stored record does not decrypt: {why}"
            );
            Error::Integrity(format!(
                "{rtype}/{id}/_history/{version} does not decrypt: {why}"
            ))
        };
        // The entry names its sealed bytes (earlier stores kept them inline).
        let sealed: Vec<u8> = match <ObjectName>::try_from(&v.body[..]) {
            Ok(name) => {
                let bytes = self.raw_object(&name)?.ok_or_else(|| {
                    refuse("its sealed bytes are missing from the object store".into())
                })?;
                if objects::object_name(&bytes) != name {
                    return Err(refuse(
                        "its sealed bytes do not match their SHA-256 name: they were changed"
                            .into(),
                    ));
                }
                bytes
            }
            Err(_) => v.body.to_vec(),
        };
        let scope = envelope::Envelope::scope_of(&sealed)
            .ok_or_else(|| refuse("it is not a JWE naming its data key".into()))?;
        let wrapped = self
            .db
            .get_pinned_cf(self.cf(CF_KEYS), scope.as_bytes())?
            .ok_or_else(|| refuse(format!("no data key for {scope}")))?;
        let dek = self.envelope.dek(&wrapped)?;
        let plain = self.envelope.open(&dek, &sealed).map_err(refuse)?;
        v.body = plain.into();
        Ok(Some(v))
    }

    fn raw_object(&self, name: &ObjectName) -> Result<Option<Vec<u8>>> {
        match &self.objects {
            objects::Objects::Embedded => Ok(self.db.get_cf(self.cf(CF_OBJECTS), name)?),
            objects::Objects::S3(s3) => s3.get(name),
        }
    }

    /// Replace an object's bytes behind the store's back (tests of tamper detection only).
    pub fn overwrite_object_for_test(&self, name: &ObjectName, bytes: Vec<u8>) -> Result<()> {
        match &self.objects {
            objects::Objects::Embedded => Ok(self.db.put_cf(self.cf(CF_OBJECTS), name, bytes)?),
            objects::Objects::S3(s3) => s3.overwrite_for_test(name, bytes),
        }
    }

    /// Keep sealed versions in `objects` from now on (set before the store is shared).
    pub fn set_objects(&mut self, objects: objects::Objects) {
        self.objects = objects;
    }

    pub fn objects(&self) -> &objects::Objects {
        &self.objects
    }

    /// Store objects durably, each under its name.
    pub fn put_objects(&self, objects: Vec<(ObjectName, Vec<u8>)>) -> Result<()> {
        match &self.objects {
            objects::Objects::Embedded => {
                let mut batch = rocksdb::WriteBatch::default();
                for (name, bytes) in objects {
                    batch.put_cf(self.cf(CF_OBJECTS), name, bytes);
                }
                let mut sync = rocksdb::WriteOptions::default();
                sync.set_sync(true);
                Ok(self.db.write_opt(batch, &sync)?)
            }
            objects::Objects::S3(s3) => s3.put(objects),
        }
    }

    /// An object's bytes, checked against its name: bytes that do not hash to their name are
    /// refused (integrity failure, with an alert), wherever they are kept.
    pub fn object(&self, name: &ObjectName) -> Result<Option<Vec<u8>>> {
        match self.raw_object(name)? {
            Some(b) if objects::object_name(&b) != *name => {
                let name = crate::ledger::entry::hex(name);
                tracing::error!(
                    target: "fhirmament::integrity",
                    object = %name,
                    store = %self.objects.describe(),
                    "ALERT: a stored object does not match its name"
                );
                Err(Error::Integrity(format!(
                    "the stored object {name} does not match its name: its bytes were changed"
                )))
            }
            other => Ok(other),
        }
    }

    pub fn envelope(&self) -> &envelope::Envelope {
        &self.envelope
    }

    /// Does the search index need a `reindex` (it was made before blind indexing)?
    pub fn index_is_stale(&self) -> Result<bool> {
        Ok(self
            .db
            .get_cf(self.cf(CF_META), META_INDEX_STALE)?
            .is_some())
    }

    /// The key that blinds this store's index terms and seals its index values.
    pub fn blinding(&self) -> &BlindingKey {
        &self.blinding
    }

    /// The plaintext of a raw `versions` value (tests that play the attacker).
    #[cfg(test)]
    pub fn read_unchecked_for_test(&self, raw: &[u8]) -> Vec<u8> {
        let v = self
            .unseal(ResourceType::Patient, "", 0, raw)
            .unwrap()
            .unwrap();
        v.body.to_vec()
    }

    /// Compare a stored version with its ledger record; alert and fail closed on a mismatch.
    pub fn check_commitment(&self, v: Version) -> Result<Version> {
        use sha2::Digest as _;
        let key = version_key(v.rtype, &v.id, v.version);
        let digest: [u8; 32] = sha2::Sha256::digest(&v.body).into();
        if self.verified.holds(&key, &digest) {
            return Ok(v);
        }
        match self.commitment_mismatch(&v)? {
            None => {
                self.verified.remember(key, digest);
                Ok(v)
            }
            Some(why) => {
                tracing::error!(
                    target: "fhirmament::integrity",
                    resource = %format!("{}/{}/_history/{}", v.rtype, v.id, v.version),
                    "ALERT: stored record does not match the ledger: {why}"
                );
                Err(Error::Integrity(format!(
                    "{}/{}/_history/{} does not match its ledger commitment",
                    v.rtype, v.id, v.version
                )))
            }
        }
    }

    /// Why a stored version does not match the ledger, or None when it does.
    pub fn commitment_mismatch(&self, v: &Version) -> Result<Option<String>> {
        let vk = version_key(v.rtype, &v.id, v.version);
        let Some(rec) = self.ledger_record_at(&vk)? else {
            return Ok(Some("the ledger has no record of this version".into()));
        };
        if rec.deleted != v.deleted {
            return Ok(Some("the deletion flag differs from the ledger".into()));
        }
        let Some(expected) = rec.commitment else {
            return Ok(None);
        };
        let Some(salt) = self.salt_at(&vk)? else {
            return Ok(Some("the version's salt is missing".into()));
        };
        match crate::ledger::entry::commitment_of_stored(&salt, &v.body) {
            Ok(c) if c == expected => Ok(None),
            Ok(_) => Ok(Some("the commitment of the stored bytes differs".into())),
            Err(_) => Ok(Some("the stored bytes are not JSON".into())),
        }
    }

    fn ledger_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_LEDGER), key)?)
    }

    fn ledger_record_at(&self, vk: &[u8]) -> Result<Option<crate::ledger::RecordRef>> {
        Ok(self
            .ledger_get(&ledger_key(b'r', vk))?
            .and_then(|b| crate::ledger::RecordRef::decode(&b)))
    }

    fn salt_at(&self, vk: &[u8]) -> Result<Option<[u8; 32]>> {
        Ok(self
            .ledger_get(&ledger_key(b's', vk))?
            .and_then(|b| <[u8; 32]>::try_from(&b[..]).ok()))
    }

    pub fn ledger_record(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> Result<Option<crate::ledger::RecordRef>> {
        self.ledger_record_at(&version_key(rtype, id, version))
    }

    /// Ids of the given type the ledger has ever placed in a patient's compartment (callers
    /// check the current version: a resource may have left it since).
    pub fn ledger_compartment(&self, patient_id: &str, rtype: ResourceType) -> Result<Vec<String>> {
        let prefix = ledger_key(
            b'x',
            &compartment_key(&format!("Patient/{patient_id}"), rtype, ""),
        );
        let mut out = Vec::new();
        self.scan_ledger(&prefix, |id, _| {
            out.push(String::from_utf8_lossy(id).into_owned());
            Ok(true)
        })?;
        Ok(out)
    }

    /// The patient compartments of a resource's current version, as the ledger records them.
    pub fn ledger_patients(&self, rtype: ResourceType, id: &str) -> Result<Vec<String>> {
        Ok(self
            .ledger_get(&ledger_key(b'y', &resource_key(rtype, id)))?
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\n')
                    .filter(|p| !p.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The Consents in force for a patient (`Patient/<id>`), with the ledger position at
    /// which each took effect.
    pub fn consent_policies(
        &self,
        patient: &str,
    ) -> Result<Vec<(u64, crate::consent::ConsentPolicy)>> {
        let mut prefix = ledger_key(b'p', patient.as_bytes());
        prefix.push(0);
        let mut out = Vec::new();
        self.scan_ledger(&prefix, |_, v| {
            let (seq, json) = v
                .split_at_checked(8)
                .ok_or_else(|| Error::Storage("corrupt consent record".into()))?;
            let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
            let policy = serde_json::from_slice(json)
                .map_err(|e| Error::Storage(format!("corrupt consent record: {e}")))?;
            out.push((seq, policy));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Is any Consent in force for any patient?
    pub fn any_consent(&self) -> Result<bool> {
        let mut any = false;
        self.scan_ledger(b"p", |_, _| {
            any = true;
            Ok(false)
        })?;
        Ok(any)
    }

    /// Every version the ledger records for a resource, newest first.
    pub fn ledger_versions(
        &self,
        rtype: ResourceType,
        id: &str,
    ) -> Result<Vec<(u64, crate::ledger::RecordRef)>> {
        let mut prefix = ledger_key(b'r', &resource_key(rtype, id));
        prefix.push(0);
        let mut out = Vec::new();
        self.scan_ledger(&prefix, |ver, v| {
            let ver = ver
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Storage("corrupt ledger record key".into()))?;
            if let Some(r) = crate::ledger::RecordRef::decode(v) {
                out.push((ver, r));
            }
            Ok(true)
        })?;
        out.reverse();
        Ok(out)
    }

    /// Visit the `ledger` family's keys under `prefix` in order, with the rest of each key and
    /// its value, while `f` answers true.
    fn scan_ledger(
        &self,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            ro.set_iterate_upper_bound(end);
        }
        for item in self.db.iterator_cf_opt(
            self.cf(CF_LEDGER),
            ro,
            IteratorMode::From(prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !f(&k[prefix.len()..], &v)? {
                break;
            }
        }
        Ok(())
    }

    pub fn salt(&self, rtype: ResourceType, id: &str, version: u64) -> Result<Option<[u8; 32]>> {
        self.salt_at(&version_key(rtype, id, version))
    }

    pub fn ledger_head(
        &self,
        rtype: ResourceType,
        id: &str,
    ) -> Result<Option<crate::ledger::LedgerHead>> {
        Ok(self
            .ledger_get(&ledger_key(b'c', &resource_key(rtype, id)))?
            .and_then(|b| crate::ledger::LedgerHead::decode(&b)))
    }

    pub fn ledger_block(&self, seq: u64) -> Result<Option<crate::ledger::BlockInfo>> {
        Ok(self
            .ledger_get(&ledger_key(b'b', &seq.to_be_bytes()))?
            .and_then(|b| crate::ledger::BlockInfo::decode(&b)))
    }

    pub fn stable_checkpoint(&self) -> Result<Option<crate::ledger::StableCheckpoint>> {
        Ok(self
            .ledger_get(b"k")?
            .and_then(|b| crate::ledger::StableCheckpoint::decode(&b)))
    }

    /// The ledger tree's leaves for blocks 1..=seq.
    pub fn ledger_leaves(&self, seq: u64) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::with_capacity(seq as usize);
        self.scan_ledger(b"l", |_, v| {
            if out.len() as u64 >= seq {
                return Ok(false);
            }
            out.push(
                <[u8; 32]>::try_from(v)
                    .map_err(|_| Error::Storage("corrupt ledger leaf".into()))?,
            );
            Ok(true)
        })?;
        Ok(out)
    }

    /// The last applied ledger position and the root after it.
    pub fn applied(&self) -> Result<(u64, [u8; 32])> {
        let meta = |k: &[u8]| self.db.get_cf(self.cf(CF_META), k);
        let seq = meta(META_APPLIED_SEQ)?
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let root = meta(META_LEDGER_ROOT)?
            .and_then(|b| b.try_into().ok())
            .unwrap_or_else(|| ledger::merkle::Frontier::default().root());
        Ok((seq, root))
    }

    /// The current version, or 404 / 410.
    pub fn read(&self, rtype: ResourceType, id: &str) -> Result<Version> {
        let cur = self
            .current(rtype, id)?
            .ok_or_else(|| Error::NotFound(format!("{rtype}/{id} is not known")))?;
        if cur.deleted {
            return Err(Error::Gone {
                rtype: rtype.to_string(),
                id: id.to_string(),
                version: cur.version,
            });
        }
        self.version(rtype, id, cur.version)?
            .ok_or_else(|| Error::Internal(format!("{rtype}/{id} current version missing")))
    }

    /// Live (not deleted) resources of a type, in id order, from `after` on.
    pub fn scan_ids(&self, rtype: ResourceType, mut f: impl FnMut(&str) -> bool) -> Result<()> {
        let prefix = resource_key(rtype, "");
        for item in self.db.iterator_cf(
            self.cf(CF_CURRENT),
            IteratorMode::From(&prefix, Direction::Forward),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if Current::decode(&v).is_some_and(|c| !c.deleted) {
                let Ok(id) = std::str::from_utf8(&k[prefix.len()..]) else {
                    continue;
                };
                if !f(id) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Visit index entries with keys in [start, end) in order; `f` returns false to stop.
    pub fn scan_index(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let mut ro = ReadOptions::default();
        if let Some(e) = end {
            ro.set_iterate_upper_bound(e.to_vec());
        }
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_INDEX),
            ro,
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    pub fn scan_index_prefix(
        &self,
        prefix: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let end = prefix_end(prefix);
        self.scan_index(prefix, end.as_deref(), f)
    }

    /// Ids of the resources of a type that have a value for a parameter (`param_prefix` is its
    /// index-key prefix), from the presence entries of their value records.
    pub fn scan_with_values(
        &self,
        rtype: ResourceType,
        param_prefix: &[u8],
        mut f: impl FnMut(&str) -> bool,
    ) -> Result<()> {
        let prefix = crate::search::keys::presence_prefix(rtype);
        // A parameter's index prefix is its type byte and its 4 code bytes.
        let code_bytes = &param_prefix[1..crate::search::keys::PARAM_PREFIX_LEN];
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(&prefix) {
            ro.set_iterate_upper_bound(end);
        }
        // Only the presence entries are read, lent in place by a raw iterator.
        let mut records = self.db.raw_iterator_cf_opt(self.cf(CF_VALUES), ro);
        records.seek(prefix);
        while let (Some(k), Some(presence)) = (records.key(), records.value()) {
            if ValueRecord::names(presence, code_bytes) {
                if let Some((_, id)) = crate::search::keys::IdBytes::at_end(&k[prefix.len()..]) {
                    if !f(&id) {
                        break;
                    }
                }
            }
            records.next();
        }
        records.status()?;
        Ok(())
    }

    /// The stored index values of some parameters for many resources, `[parameter][resource]`;
    /// each resource's record is read and opened once.
    pub fn values(
        &self,
        rtype: ResourceType,
        codes: &[&str],
        ids: &[&str],
    ) -> Result<Vec<Vec<Vec<IndexValue>>>> {
        let cf = self.cf(CF_VALUES);
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| crate::search::keys::lists_key(rtype, id))
            .collect();
        // Batched lookups: RocksDB looks many keys up level by level (a search that rechecks
        // every resource of a type asks for all of them).
        let lists = self.db.batched_multi_get_cf(cf, &keys, false);
        let mut out = vec![Vec::with_capacity(ids.len()); codes.len()];
        for (key, lists) in keys.iter().zip(lists) {
            let record = match lists? {
                Some(sealed) => ValueRecord::open(&self.blinding, key, &sealed)?,
                None => ValueRecord::default(),
            };
            for (column, code) in out.iter_mut().zip(codes) {
                column.push(decode_values(record.get(code)).unwrap_or_default());
            }
        }
        Ok(out)
    }

    /// All versions of one resource, newest first.
    pub fn instance_history(
        &self,
        rtype: ResourceType,
        id: &str,
        since: Option<i64>,
        before_version: Option<u64>,
        count: usize,
    ) -> Result<HistoryPage> {
        let prefix = {
            let mut p = resource_key(rtype, id);
            p.push(0);
            p
        };
        let start = match before_version {
            Some(v) => version_key(rtype, id, v),
            None => prefix_end(&prefix).expect("prefix ends below 0xff"),
        };
        let mut versions = Vec::new();
        let mut next = None;
        for item in self.db.iterator_cf(
            self.cf(CF_VERSIONS),
            IteratorMode::From(&start, Direction::Reverse),
        ) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let ver = u64::from_be_bytes(
                k[prefix.len()..]
                    .try_into()
                    .map_err(|_| Error::Internal("bad version key".into()))?,
            );
            if before_version.is_some_and(|b| ver >= b) {
                continue;
            }
            let Some(version) = self.unseal(rtype, id, ver, &v)? else {
                continue;
            };
            if since.is_some_and(|s| version.last_updated < s) {
                break;
            }
            if versions.len() == count {
                next = Some((ver + 1, 0));
                break;
            }
            versions.push(self.check_commitment(version)?);
        }
        Ok(HistoryPage { versions, next })
    }

    /// Type-level (`rtype = Some`) or system-level history, newest first, from `before`.
    pub fn history(
        &self,
        rtype: Option<ResourceType>,
        since: Option<i64>,
        before: Option<HistoryCursor>,
        count: usize,
    ) -> Result<HistoryPage> {
        let (cf, prefix) = match rtype {
            Some(t) => (self.cf(CF_TYPE_HISTORY), resource_key(t, "")),
            None => (self.cf(CF_HISTORY), Vec::new()),
        };
        let start = match before {
            Some((tx, entry)) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&tx.to_be_bytes());
                k.extend_from_slice(&entry.to_be_bytes());
                k
            }
            None => prefix_end(&prefix).unwrap_or_else(|| vec![0xff; 13]),
        };
        let mut versions = Vec::new();
        let mut next = None;
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, Direction::Reverse))
        {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 12 {
                break;
            }
            let pos = &k[prefix.len()..];
            let cursor = (
                u64::from_be_bytes(pos[..8].try_into().expect("8")),
                u32::from_be_bytes(pos[8..].try_into().expect("4")),
            );
            if before.is_some_and(|b| cursor >= b) {
                continue;
            }
            let (t, id, ver) = match rtype {
                Some(t) => {
                    let ver = u64::from_be_bytes(
                        v[..8]
                            .try_into()
                            .map_err(|_| Error::Internal("bad history".into()))?,
                    );
                    (t, String::from_utf8_lossy(&v[8..]).into_owned(), ver)
                }
                None => {
                    let mut parts = v.splitn(3, |b| *b == 0);
                    let t: ResourceType = std::str::from_utf8(parts.next().unwrap_or_default())
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| Error::Internal("bad history type".into()))?;
                    let id = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                    let ver = parts
                        .next()
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    (t, id, ver)
                }
            };
            let Some(version) = self.version(t, &id, ver)? else {
                continue;
            };
            if since.is_some_and(|s| version.last_updated < s) {
                break;
            }
            if versions.len() == count {
                next = Some((cursor.0, cursor.1 + 1));
                break;
            }
            versions.push(version);
        }
        Ok(HistoryPage { versions, next })
    }

    /// Every key and value of a column family, for `reindex` checks and tests.
    pub fn dump(&self, cf: &str) -> Result<Vec<(Box<[u8]>, Box<[u8]>)>> {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::Start)
            .map(|r| r.map_err(Error::from))
            .collect()
    }

    pub fn approximate_disk_bytes(&self) -> u64 {
        COLUMN_FAMILIES
            .iter()
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(self.cf(cf), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_written_with_leveled_compaction_opens_and_reads_whole() {
        let dir = tempfile::tempdir().unwrap();
        let kek = envelope::Kek::generate().unwrap().0;
        drop(Store::open(dir.path(), kek.clone()).unwrap());
        // What an earlier version wrote: leveled families with their data below level 0.
        let keys: Vec<Vec<u8>> = (0..20_000u32)
            .map(|i| {
                use sha2::Digest;
                sha2::Sha256::digest(i.to_be_bytes()).to_vec()
            })
            .collect();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let cfs = COLUMN_FAMILIES.iter().map(|name| {
                let mut cf = family_options(name);
                cf.set_compaction_style(rocksdb::DBCompactionStyle::Level);
                cf.set_write_buffer_size(64 << 10);
                ColumnFamilyDescriptor::new(*name, cf)
            });
            let db = DB::open_cf_descriptors(&opts, dir.path(), cfs).unwrap();
            for k in &keys {
                db.put_cf(cf(&db, CF_INDEX), k, b"").unwrap();
            }
            db.compact_range_cf(cf(&db, CF_INDEX), None::<&[u8]>, None::<&[u8]>);
            let below_l0: u64 = (1..7)
                .map(|l| {
                    db.property_int_value_cf(
                        cf(&db, CF_INDEX),
                        &format!("rocksdb.num-files-at-level{l}"),
                    )
                    .unwrap()
                    .unwrap_or(0)
                })
                .sum();
            assert!(below_l0 > 0, "the leveled store has files below level 0");
        }
        let store = Store::open(dir.path(), kek).unwrap();
        let mut found = 0;
        store
            .scan_index(&[], None, |_, _| {
                found += 1;
                true
            })
            .unwrap();
        assert_eq!(found, keys.len());
        for k in keys.iter().step_by(997) {
            assert!(store.db.get_cf(store.cf(CF_INDEX), k).unwrap().is_some());
        }
        // And it takes writes and merges them under universal compaction.
        for k in &keys {
            let mut k = k.clone();
            k.push(1);
            store.db.put_cf(store.cf(CF_INDEX), k, b"").unwrap();
        }
        store
            .db
            .compact_range_cf(store.cf(CF_INDEX), None::<&[u8]>, None::<&[u8]>);
        assert_eq!(store.dump(CF_INDEX).unwrap().len(), 2 * keys.len());
    }

    #[test]
    fn record_layouts_round_trip() {
        let c = Current {
            version: 7,
            deleted: true,
            tx: 99,
            last_updated: -3,
        };
        assert_eq!(Current::decode(&c.encode()), Some(c));
        let raw = Version::encode_value(5, 1234, false, Method::Patch, b"{}");
        let v = Version::decode(ResourceType::Consent, "a", 2, &raw).unwrap();
        assert_eq!(
            (v.tx, v.last_updated, v.deleted, v.method, &*v.body),
            (5, 1234, false, Method::Patch, &b"{}"[..])
        );
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
    }
}

//! The transaction log: the one narrow interface every change passes through.
//!
//! `TxLog::submit` takes an atomic list of `Change`s and answers, once they are durable,
//! with the position they were committed at. The local implementation here applies changes
//! on a single commit thread (so preconditions, If-Match and conditional operations are
//! evaluated in one serial order) and groups whatever arrived together into one synced
//! RocksDB WriteBatch (group commit): many writers share each fsync. The PBFT ledger will
//! take this place: it orders the same `Change` lists and every replica applies them with the
//! same `apply` code.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Arc;

use rocksdb::{WriteBatch, WriteOptions};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::{resource_key, version_key, Current, Method, Store, Version};
use super::{
    CF_CURRENT, CF_HISTORY, CF_INDEX, CF_META, CF_TYPE_HISTORY, CF_VALUES, CF_VERSIONS,
    META_LAST_TS, META_LAST_TX,
};
use crate::error::{Error, Result};
use crate::fhir::{format_instant, new_id, now_ms, ResourceType};
use crate::search::keys::{index_entries, param_prefix, values_key};
use crate::search::query::SearchQuery;
use crate::search::value::{decode_values, encode_values, IndexValue};
use crate::search::{exec, extract, Registry};

/// How many submissions one group commit takes at most.
const MAX_GROUP: usize = 512;

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
}

#[derive(Debug, Clone)]
pub struct Committed {
    /// Position in the log; 0 when nothing was written.
    pub tx: u64,
    pub applied: Vec<Applied>,
}

pub trait TxLog: Send + Sync {
    fn submit(&self, changes: Vec<Change>) -> oneshot::Receiver<Result<Committed>>;
}

struct Job {
    changes: Vec<Change>,
    reply: oneshot::Sender<Result<Committed>>,
}

/// The single-node TxLog: a commit thread over the local RocksDB store.
pub struct LocalTxLog {
    sender: std::sync::Mutex<mpsc::Sender<Job>>,
}

impl LocalTxLog {
    pub fn start(store: Arc<Store>, registry: Arc<Registry>, base: String) -> Result<LocalTxLog> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let mut committer = Committer::new(store, registry, base)?;
        std::thread::Builder::new()
            .name("fhirmament-commit".into())
            .spawn(move || committer.run(receiver))
            .map_err(|e| Error::Internal(format!("cannot start the commit thread: {e}")))?;
        Ok(LocalTxLog {
            sender: std::sync::Mutex::new(sender),
        })
    }
}

impl TxLog for LocalTxLog {
    fn submit(&self, changes: Vec<Change>) -> oneshot::Receiver<Result<Committed>> {
        let (reply, rx) = oneshot::channel();
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(job)) = sender.send(Job { changes, reply }) {
            let _ = job
                .reply
                .send(Err(Error::Storage("the commit thread has stopped".into())));
        }
        rx
    }
}

/// Pending writes of one group, readable before they are durable.
#[derive(Default)]
struct Overlay {
    writes: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
    order: Vec<(&'static str, Vec<u8>)>,
}

impl Overlay {
    fn put(&mut self, cf: &'static str, key: Vec<u8>, value: Option<Vec<u8>>) {
        if self.writes.insert((cf, key.clone()), value).is_none() {
            self.order.push((cf, key));
        }
    }
    fn merge(&mut self, other: Overlay) {
        for k in other.order {
            let v = other.writes.get(&k).cloned().expect("ordered key present");
            self.put(k.0, k.1, v);
        }
    }
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

struct Committer {
    store: Arc<Store>,
    registry: Arc<Registry>,
    base: String,
    last_tx: u64,
    last_ts: i64,
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
    fn new(store: Arc<Store>, registry: Arc<Registry>, base: String) -> Result<Committer> {
        let last_tx = read_counter(&store, META_LAST_TX)?;
        let last_ts = read_counter(&store, META_LAST_TS)? as i64;
        Ok(Committer {
            store,
            registry,
            base,
            last_tx,
            last_ts,
        })
    }

    fn run(&mut self, receiver: mpsc::Receiver<Job>) {
        while let Ok(first) = receiver.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut group = Overlay::default();
            let mut replies: Vec<(oneshot::Sender<Result<Committed>>, Result<Committed>)> =
                Vec::new();
            let (mut saved_tx, mut saved_ts) = (self.last_tx, self.last_ts);
            for job in jobs {
                // A conditional operation searches committed state: make the group durable first.
                if job.changes.iter().any(Change::needs_search) && !group.is_empty() {
                    self.flush(std::mem::take(&mut group), &mut replies, saved_tx, saved_ts);
                    (saved_tx, saved_ts) = (self.last_tx, self.last_ts);
                }
                let mut own = Overlay::default();
                let (tx_before, ts_before) = (self.last_tx, self.last_ts);
                let result = self.apply(&group, &mut own, job.changes);
                match &result {
                    Ok(c) if c.tx != 0 => group.merge(own),
                    _ => (self.last_tx, self.last_ts) = (tx_before, ts_before),
                }
                replies.push((job.reply, result));
            }
            self.flush(group, &mut replies, saved_tx, saved_ts);
        }
    }

    /// Make the group durable with one synced WriteBatch, then answer everyone waiting on it.
    fn flush(
        &mut self,
        group: Overlay,
        replies: &mut Vec<(oneshot::Sender<Result<Committed>>, Result<Committed>)>,
        saved_tx: u64,
        saved_ts: i64,
    ) {
        if !group.is_empty() {
            let mut batch = WriteBatch::default();
            for (cf, key) in &group.order {
                match group
                    .writes
                    .get(&(*cf, key.clone()))
                    .expect("ordered key present")
                {
                    Some(v) => batch.put_cf(self.store.cf(cf), key, v),
                    None => batch.delete_cf(self.store.cf(cf), key),
                }
            }
            batch.put_cf(
                self.store.cf(CF_META),
                META_LAST_TX,
                self.last_tx.to_be_bytes(),
            );
            batch.put_cf(
                self.store.cf(CF_META),
                META_LAST_TS,
                (self.last_ts as u64).to_be_bytes(),
            );
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            if let Err(e) = self.store.db().write_opt(batch, &wo) {
                tracing::error!(error = %e, "group commit failed; nothing in the group was acknowledged");
                (self.last_tx, self.last_ts) = (saved_tx, saved_ts);
                for (_, r) in replies.iter_mut() {
                    if r.is_ok() {
                        *r = Err(Error::Storage(e.to_string()));
                    }
                }
            }
        }
        for (reply, result) in replies.drain(..) {
            let _ = reply.send(result);
        }
    }

    fn get(
        &self,
        group: &Overlay,
        own: &Overlay,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        let k = (cf, key.to_vec());
        if let Some(v) = own.writes.get(&k) {
            return Ok(v.clone());
        }
        if let Some(v) = group.writes.get(&k) {
            return Ok(v.clone());
        }
        Ok(self.store.db().get_cf(self.store.cf(cf), key)?)
    }

    fn current(
        &self,
        group: &Overlay,
        own: &Overlay,
        rtype: ResourceType,
        id: &str,
    ) -> Result<Option<Current>> {
        Ok(self
            .get(group, own, CF_CURRENT, &resource_key(rtype, id))?
            .and_then(|b| Current::decode(&b)))
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
        if wrote {
            self.last_tx = tx;
            self.last_ts = ts;
        }
        Ok(Committed {
            tx: if wrote { tx } else { 0 },
            applied,
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
                            return Ok(Applied { rtype, id: v.id, version: v.version, last_updated: v.last_updated, outcome: Outcome::Existing, body: Some(v.body) });
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
                    }),
                }
            }
            Change::ConditionalDelete { rtype, query } => {
                let found = self.search_one(&query)?;
                match found.len() {
                    0 => Ok(Applied { rtype, id: String::new(), version: 0, last_updated: ts, outcome: Outcome::NoOp, body: None }),
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
        let body: Option<Vec<u8>> = match resource {
            Some(mut r) => {
                set_id_and_meta(&mut r, id, version, ts);
                // Index from the stored form, so reindexing from stored bytes is identical.
                let new_values: Vec<(String, Vec<u8>)> = self
                    .registry
                    .params(rtype)
                    .map(|p| (p.code.clone(), encode_values(&extract(p, rtype, &r))))
                    .collect();
                self.reindex_resource(group, own, rtype, id, &new_values, cur.is_none())?;
                Some(serde_json::to_vec(&r).map_err(|e| Error::Internal(e.to_string()))?)
            }
            None => {
                let empty: Vec<(String, Vec<u8>)> = self
                    .registry
                    .params(rtype)
                    .map(|p| (p.code.clone(), Vec::new()))
                    .collect();
                self.reindex_resource(group, own, rtype, id, &empty, false)?;
                None
            }
        };
        own.put(
            CF_VERSIONS,
            version_key(rtype, id, version),
            Some(Version::encode_value(
                tx,
                ts,
                deleted,
                method,
                body.as_deref().unwrap_or_default(),
            )),
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
        })
    }

    /// Replace a resource's index entries: remove those derived from its previous values,
    /// add those of the new ones. A resource that never existed has no previous values.
    fn reindex_resource(
        &self,
        group: &Overlay,
        own: &mut Overlay,
        rtype: ResourceType,
        id: &str,
        new_values: &[(String, Vec<u8>)],
        is_new: bool,
    ) -> Result<()> {
        for (code, encoded) in new_values {
            let vkey = values_key(rtype, code, id);
            let old = if is_new {
                Vec::new()
            } else {
                self.get(group, own, CF_VALUES, &vkey)?.unwrap_or_default()
            };
            if old == *encoded {
                continue;
            }
            let prefix = param_prefix(rtype, code);
            for (k, _) in index_entries(
                &prefix,
                id,
                &decode_values(&old).unwrap_or_default(),
                &self.base,
            ) {
                own.put(CF_INDEX, k, None);
            }
            let new = decode_values(encoded).unwrap_or_default();
            self.record_date_widths(own, &prefix, &new);
            for (k, v) in index_entries(&prefix, id, &new, &self.base) {
                own.put(CF_INDEX, k, Some(v));
            }
            own.put(
                CF_VALUES,
                vkey,
                if encoded.is_empty() {
                    None
                } else {
                    Some(encoded.clone())
                },
            );
        }
        Ok(())
    }
}

impl Committer {
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
                for p in registry.params(rtype) {
                    let values = extract(p, rtype, &resource);
                    if values.is_empty() {
                        continue;
                    }
                    let prefix = param_prefix(rtype, &p.code);
                    for v in &values {
                        if let IndexValue::Date { lo, hi } = v {
                            if let Some((k, w)) = store.widen_date(&prefix, hi.saturating_sub(*lo))
                            {
                                batch.put_cf(store.cf(CF_META), k, w);
                            }
                        }
                    }
                    for (k, val) in index_entries(&prefix, id, &values, base) {
                        batch.put_cf(store.cf(CF_INDEX), k, val);
                    }
                    batch.put_cf(
                        store.cf(CF_VALUES),
                        values_key(rtype, &p.code, id),
                        encode_values(&values),
                    );
                }
                count += 1;
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            store.db().write_opt(batch, &wo)?;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::Profiles;
    use crate::store::DERIVED_FAMILIES;
    use serde_json::json;

    fn submit(log: &LocalTxLog, changes: Vec<Change>) -> Result<Committed> {
        log.submit(changes)
            .blocking_recv()
            .expect("commit thread answers")
    }

    #[test]
    fn reindex_rebuilds_the_derived_families_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = Arc::new(Registry::from_profiles(&Profiles::embedded().unwrap()));
        let base = "http://localhost/fhir".to_string();
        let log = LocalTxLog::start(store.clone(), registry.clone(), base.clone()).unwrap();
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
    fn an_atomic_submission_with_a_failing_change_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let registry = Arc::new(Registry::from_profiles(&Profiles::embedded().unwrap()));
        let log = LocalTxLog::start(store.clone(), registry, "http://x/fhir".into()).unwrap();
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
}

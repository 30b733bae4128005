//! Durable storage for a replica: what the core asks to persist (`Record`s), and the blocks of
//! the ledger. The core's contract is that a `Persist` is durable before any later action of
//! its step, so `append` writes one synced WriteBatch.
//!
//! Column families: `blocks` (seq -> root, batch), kept forever — they are the ledger; `log`
//! (index -> record), the consensus log, garbage-collected below the stable checkpoint;
//! `meta` (the latest stable checkpoint and the next log index); `sidecars` (entry hash -> bytes
//! an embedding application made durable with the round that first sent the entry, until it
//! releases them).

use std::path::Path;

use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use crate::core::message::{
    decode_batch, decode_signed, decode_signed_list, encode_batch, encode_signed,
    encode_signed_list, DecodeError,
};
use crate::core::{Batch, Digest, Payload, Record, Seq, Signed};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ledger storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("ledger storage holds a corrupt record: {0}")]
    Corrupt(String),
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

const CF_BLOCKS: &str = "blocks";
const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SIDECARS: &str = "sidecars";
const META_STABLE: &[u8] = b"stable";
const META_NEXT: &[u8] = b"next_log_index";

pub struct LedgerStore {
    db: DB,
    next: u64,
    /// The consensus log's keys by the sequence number their message is about, so a stable
    /// checkpoint collects what it made obsolete without reading (and decoding) the log back.
    log_keys: std::collections::BTreeMap<Seq, Vec<u64>>,
    /// Whether the last write was not synced (see `append_with`).
    unsynced: bool,
}

/// The sequence number a logged message is about, for garbage collection.
fn seq_of(m: &Signed) -> Option<Seq> {
    match &m.payload {
        Payload::PrePrepare { seq, .. }
        | Payload::Prepare { seq, .. }
        | Payload::Commit { seq, .. }
        | Payload::Checkpoint { seq, .. } => Some(*seq),
        Payload::ViewChange { stable_seq, .. } => Some(*stable_seq),
        _ => None,
    }
}

impl LedgerStore {
    /// Open (or create) the store, with everything a restarting replica needs, in the order
    /// it was written.
    pub fn open(path: &Path) -> Result<(LedgerStore, Vec<Record>), StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [CF_BLOCKS, CF_LOG, CF_META, CF_SIDECARS]
            .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let next = db
            .get_cf(db.cf_handle(CF_META).expect("meta"), META_NEXT)?
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let mut store = LedgerStore {
            db,
            next,
            log_keys: Default::default(),
            unsynced: false,
        };
        let records = store.load()?;
        Ok((store, records))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("declared column family")
    }

    /// Make records durable (one synced write). Blocks go to the ledger; a stable checkpoint
    /// also removes the consensus log it makes obsolete.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.append_with(records, &[], &[], true)
    }

    /// `append`, plus sidecars stored (and released ones deleted) in the same write. With
    /// `sync`, this write and every earlier one are durable when it returns (the write-ahead
    /// log is one sequence: syncing it covers what came before, so with nothing to write it
    /// only syncs what an earlier unsynced write left). Without, the write waits for the next
    /// synced one.
    pub fn append_with(
        &mut self,
        records: &[Record],
        sidecars: &[(Digest, Vec<u8>)],
        release: &[Digest],
        sync: bool,
    ) -> Result<(), StoreError> {
        if records.is_empty() && sidecars.is_empty() && release.is_empty() {
            if sync && self.unsynced {
                self.db.flush_wal(true)?;
                self.unsynced = false;
            }
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (h, bytes) in sidecars {
            batch.put_cf(self.cf(CF_SIDECARS), h, bytes);
        }
        for h in release {
            batch.delete_cf(self.cf(CF_SIDECARS), h);
        }
        let mut stable = None;
        for r in records {
            match r {
                Record::Block {
                    seq,
                    batch: b,
                    root,
                } => {
                    let mut v = root.to_vec();
                    v.extend_from_slice(&encode_batch(b));
                    batch.put_cf(self.cf(CF_BLOCKS), seq.to_be_bytes(), v);
                }
                Record::Sent(m) | Record::Accepted(m) => {
                    let mut v = vec![if matches!(r, Record::Sent(_)) { 1 } else { 2 }];
                    v.extend_from_slice(&encode_signed(m));
                    batch.put_cf(self.cf(CF_LOG), self.next.to_be_bytes(), v);
                    if let Some(seq) = seq_of(m) {
                        self.log_keys.entry(seq).or_default().push(self.next);
                    }
                    self.next += 1;
                }
                Record::Stable { seq, root, proof } => {
                    let mut v = seq.to_be_bytes().to_vec();
                    v.extend_from_slice(root);
                    v.extend_from_slice(&encode_signed_list(proof));
                    batch.put_cf(self.cf(CF_META), META_STABLE, v);
                    stable = Some(*seq);
                }
            }
        }
        batch.put_cf(self.cf(CF_META), META_NEXT, self.next.to_be_bytes());
        if let Some(low) = stable {
            self.collect_log(low, &mut batch);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        self.unsynced = !sync;
        Ok(())
    }

    /// Delete logged messages about sequence numbers at or below the stable checkpoint.
    fn collect_log(&mut self, low: Seq, batch: &mut WriteBatch) {
        let above = self.log_keys.split_off(&(low + 1));
        let obsolete = std::mem::replace(&mut self.log_keys, above);
        for key in obsolete.into_values().flatten() {
            batch.delete_cf(self.cf(CF_LOG), key.to_be_bytes());
        }
    }

    /// Everything a restarting replica needs, in the order it was written; indexes the log's
    /// keys (`log_keys`) on the way, so the log is read once.
    fn load(&mut self) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("block key".into()))?,
            );
            let root: Digest = v
                .get(..32)
                .ok_or_else(|| StoreError::Corrupt("block root".into()))?
                .try_into()
                .expect("32");
            out.push(Record::Block {
                seq,
                root,
                batch: decode_batch(&v[32..])?,
            });
        }
        if let Some(v) = self.db.get_cf(self.cf(CF_META), META_STABLE)? {
            let seq = u64::from_be_bytes(
                v.get(..8)
                    .ok_or_else(|| StoreError::Corrupt("stable".into()))?
                    .try_into()
                    .expect("8"),
            );
            let root: Digest = v
                .get(8..40)
                .ok_or_else(|| StoreError::Corrupt("stable".into()))?
                .try_into()
                .expect("32");
            out.push(Record::Stable {
                seq,
                root,
                proof: decode_signed_list(&v[40..])?,
            });
        }
        for item in self.db.iterator_cf(self.cf(CF_LOG), IteratorMode::Start) {
            let (k, v) = item?;
            let key = k
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("log key".into()))?;
            let m = decode_signed(v.get(1..).unwrap_or_default())?;
            if let Some(seq) = seq_of(&m) {
                self.log_keys.entry(seq).or_default().push(key);
            }
            out.push(if v.first() == Some(&1) {
                Record::Sent(m)
            } else {
                Record::Accepted(m)
            });
        }
        Ok(out)
    }

    /// Blocks (from_seq, to_seq], for a replica catching up.
    pub fn blocks(&self, from_seq: Seq, to_seq: Seq) -> Result<Vec<Batch>, StoreError> {
        Ok(self
            .blocks_with_roots(from_seq, to_seq)?
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// Blocks (from_seq, to_seq] with the state root after each, for an application replaying
    /// what it has not applied yet.
    pub fn blocks_with_roots(
        &self,
        from_seq: Seq,
        to_seq: Seq,
    ) -> Result<Vec<(Digest, Batch)>, StoreError> {
        let mut out = Vec::new();
        let start = (from_seq + 1).to_be_bytes();
        for item in self.db.iterator_cf(
            self.cf(CF_BLOCKS),
            IteratorMode::From(&start, Direction::Forward),
        ) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("block key".into()))?,
            );
            if seq > to_seq {
                break;
            }
            let root: Digest = v
                .get(..32)
                .and_then(|r| r.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("block root".into()))?;
            out.push((root, decode_batch(&v[32..])?));
        }
        Ok(out)
    }

    pub fn sidecar(&self, entry_hash: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(CF_SIDECARS), entry_hash)?)
    }

    /// Number of consensus-log records held (bounded by the checkpoint window).
    pub fn log_len(&self) -> usize {
        self.db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::Start)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{test_key, Config, Membership, Replica};

    /// Drive one replica (n = 1 commits on its own) through a real store, restart it from what
    /// was stored, and check it resumes where it stopped.
    #[test]
    fn a_replica_restarts_from_its_store_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let key = test_key(5, 0);
        let members = Membership::new("store-test", vec![key.verifying_key()]);
        let cfg = Config {
            checkpoint_interval: 4,
            window: 8,
            max_batch_entries: 2,
            ..Config::default()
        };
        let mut executed = Vec::new();
        {
            let (mut store, _) = LedgerStore::open(dir.path()).unwrap();
            let mut r = Replica::new(0, cfg.clone(), key.clone(), members.clone());
            let mut carry_out = |step: crate::core::Step, store: &mut LedgerStore| {
                let mut persist = Vec::new();
                for a in step.actions {
                    match a {
                        crate::core::Action::Persist(rec) => persist.push(rec),
                        crate::core::Action::Execute { seq, root, .. } => {
                            executed.push((seq, root))
                        }
                        _ => {}
                    }
                }
                store.append(&persist).unwrap();
            };
            for i in 0..21u32 {
                let step = r.handle_request(i as u64, i.to_be_bytes().to_vec());
                carry_out(step, &mut store);
            }
            let step = r.handle_tick(1000);
            carry_out(step, &mut store);
            assert_eq!(r.last_executed(), 11, "21 entries in batches of 2");
            // Garbage collection keeps the consensus log within the window.
            assert!(
                store.log_len() <= 3 * cfg.window as usize,
                "{}",
                store.log_len()
            );
        }
        let (store, records) = LedgerStore::open(dir.path()).unwrap();
        let r = Replica::restore(0, cfg, key, members, &records);
        let (last_seq, last_root) = *executed.last().unwrap();
        assert_eq!(r.last_executed(), last_seq);
        assert_eq!(r.head(), last_root);
        assert_eq!(store.blocks(0, last_seq).unwrap().len() as u64, last_seq);
        assert!(r.low_watermark() >= 8);
    }
}

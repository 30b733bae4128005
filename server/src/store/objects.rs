//! Where sealed versions live: immutable objects named by the SHA-256 of their bytes.
//!
//! A version's entry in `versions` names its sealed bytes (a compact JWE) by their SHA-256;
//! the bytes are an object in one of two stores behind one interface:
//!
//! - **embedded** (the default): the `objects` column family of the node's RocksDB, written in
//!   the same batch as the version that names it;
//! - **S3**: any S3-compatible object store (`--object-store s3://bucket`, endpoint and
//!   credentials from the standard `AWS_*` environment), through the `object_store` crate, for
//!   deployments that outgrow one disk. The commit thread uploads a round's objects before it
//!   writes the batch that names them, so no version ever names a missing object; an object
//!   whose batch never lands is unreferenced garbage, never a wrong answer.
//!
//! Names are content hashes, so objects are immutable and deduplicated, and a read checks the
//! bytes against their name before it decrypts them: changed bytes fail closed either way.
//! Immutability also makes caching trivially safe: the S3 store keeps recently read objects in
//! memory.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The SHA-256 of an object's bytes.
pub type ObjectName = [u8; 32];

pub fn object_name(bytes: &[u8]) -> ObjectName {
    Sha256::digest(bytes).into()
}

/// An S3-compatible bucket, driven from its own small runtime so that both the commit thread
/// and the HTTP workers (already inside a runtime) can wait on it.
pub struct S3Objects {
    bucket: Arc<dyn object_store::ObjectStore>,
    runtime: tokio::runtime::Runtime,
    describe: String,
    /// Objects never change, so recently read ones are kept in memory (sealed, as stored): a
    /// cached object is exactly the one its name promises.
    cache: std::sync::Mutex<ObjectCache>,
}

/// Bytes of sealed objects kept in memory; a full cache starts over.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Default)]
struct ObjectCache {
    objects: std::collections::HashMap<ObjectName, Arc<Vec<u8>>>,
    bytes: usize,
}

impl ObjectCache {
    fn insert(&mut self, name: ObjectName, bytes: Arc<Vec<u8>>) {
        if self.bytes + bytes.len() > CACHE_BYTES {
            self.objects.clear();
            self.bytes = 0;
        }
        self.bytes += bytes.len();
        if let Some(old) = self.objects.insert(name, bytes) {
            self.bytes -= old.len();
        }
    }
}

fn s3_error(e: impl std::fmt::Display) -> Error {
    Error::Storage(format!("object store: {e}"))
}

fn path_of(name: &ObjectName) -> object_store::path::Path {
    object_store::path::Path::from(format!("versions/{}", crate::ledger::entry::hex(name)))
}

impl S3Objects {
    /// The bucket at `url` (`s3://bucket[/prefix]`); endpoint, region and credentials come from
    /// the standard environment (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`). Checks at once that the bucket answers.
    pub fn open(url: &str) -> Result<S3Objects> {
        S3Objects::open_with(url, &[])
    }

    /// `open`, with settings (`aws_endpoint`, `aws_access_key_id`, …) over the environment's.
    pub fn open_with(url: &str, settings: &[(&str, &str)]) -> Result<S3Objects> {
        let startup = |e: String| Error::Startup(format!("object store {url}: {e}"));
        let parsed = url::Url::parse(url).map_err(|e| startup(e.to_string()))?;
        if parsed.scheme() != "s3" {
            return Err(startup("only s3:// object stores are supported".into()));
        }
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
        for (key, value) in settings {
            let key: object_store::aws::AmazonS3ConfigKey = key
                .parse()
                .map_err(|e: object_store::Error| startup(e.to_string()))?;
            builder = builder.with_config(key, *value);
        }
        let bucket = builder.build().map_err(|e| startup(e.to_string()))?;
        let prefix = object_store::path::Path::from(parsed.path().trim_matches('/'));
        let bucket: Arc<dyn object_store::ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::new(bucket)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(bucket, prefix))
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store")
            .enable_all()
            .build()
            .map_err(|e| startup(e.to_string()))?;
        let objects = S3Objects {
            bucket,
            runtime,
            describe: url.to_string(),
            cache: Default::default(),
        };
        // Fail at start, not at the first write: the bucket must exist and let us write and
        // read (a read alone cannot tell a missing bucket from a missing object). The probe
        // lives beside the `versions/` objects, never among them.
        let bucket = objects.bucket.clone();
        let probe = objects
            .wait(async move {
                let path = object_store::path::Path::from("probe");
                bucket.put(&path, b"fhirmament".to_vec().into()).await?;
                bucket.get(&path).await?.bytes().await
            })?
            .map_err(|e| startup(e.to_string()))?;
        if &probe[..] != b"fhirmament" {
            return Err(startup("an object written was not read back".into()));
        }
        Ok(objects)
    }

    /// Run a future on this store's runtime and wait for it from any thread.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Storage("object store: the request was dropped".into()))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ObjectCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Written objects are not cached: most are AuditEvents, rarely read back.
    pub(super) fn put(&self, objects: Vec<(ObjectName, Vec<u8>)>) -> Result<()> {
        let bucket = self.bucket.clone();
        let results = self.wait(async move {
            let puts: Vec<_> = objects
                .into_iter()
                .map(|(name, bytes)| {
                    let bucket = bucket.clone();
                    tokio::spawn(async move { bucket.put(&path_of(&name), bytes.into()).await })
                })
                .collect();
            let mut results = Vec::with_capacity(puts.len());
            for put in puts {
                results.push(match put.await {
                    Ok(r) => r.map(|_| ()).map_err(s3_error),
                    Err(e) => Err(s3_error(e)),
                });
            }
            results
        })?;
        results.into_iter().collect()
    }

    pub(super) fn get(&self, name: &ObjectName) -> Result<Option<Vec<u8>>> {
        if let Some(b) = self.cache().objects.get(name) {
            return Ok(Some(b.to_vec()));
        }
        let bucket = self.bucket.clone();
        let path = path_of(name);
        let fetched = self
            .wait(async move {
                match bucket.get(&path).await {
                    Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })?
            .map_err(s3_error)?;
        // Only bytes that are what their name says are worth keeping.
        if let Some(b) = fetched.as_ref().filter(|b| object_name(b) == *name) {
            self.cache().insert(*name, Arc::new(b.clone()));
        }
        Ok(fetched)
    }

    /// The names of every object in the bucket (under this store's prefix).
    pub fn names(&self) -> Result<Vec<ObjectName>> {
        use futures_util::StreamExt as _;
        let bucket = self.bucket.clone();
        let listed = self.wait(async move {
            let mut names = Vec::new();
            let mut list = bucket.list(Some(&object_store::path::Path::from("versions")));
            while let Some(item) = list.next().await {
                names.push(item.map(|m| m.location.filename().unwrap_or("").to_string()));
            }
            names
        })?;
        listed
            .into_iter()
            .map(|n| {
                let n = n.map_err(s3_error)?;
                crate::ledger::entry::unhex(&n)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::Storage(format!("object store: a stray object {n}")))
            })
            .collect()
    }

    /// Replace an object's bytes behind the server's back (tests of tamper detection only).
    pub fn overwrite_for_test(&self, name: &ObjectName, bytes: Vec<u8>) -> Result<()> {
        let mut cache = self.cache();
        if let Some(old) = cache.objects.remove(name) {
            cache.bytes -= old.len();
        }
        drop(cache);
        let bucket = self.bucket.clone();
        let path = path_of(name);
        self.wait(async move { bucket.put(&path, bytes.into()).await })?
            .map(|_| ())
            .map_err(s3_error)
    }
}

/// Which store holds this node's objects.
pub enum Objects {
    Embedded,
    S3(S3Objects),
}

impl Objects {
    /// `rocksdb` (or nothing): embedded; `s3://bucket[/prefix]`: an S3-compatible store.
    pub fn open(url: Option<&str>) -> Result<Objects> {
        match url {
            None | Some("rocksdb") | Some("") => Ok(Objects::Embedded),
            Some(u) => S3Objects::open(u).map(Objects::S3),
        }
    }

    pub fn describe(&self) -> &str {
        match self {
            Objects::Embedded => "rocksdb",
            Objects::S3(s) => &s.describe,
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Objects::Embedded)
    }
}

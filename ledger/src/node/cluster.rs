//! A local cluster of replica processes on loopback, each with its own keys and RocksDB
//! directory: what the process tests and the benchmark start. `binary` is the
//! `fhirmament-ledger` executable.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::client::{entry_hash, Client, Reply};
use super::genesis::Genesis;
use crate::core::Record;
use crate::store::LedgerStore;

pub struct Cluster {
    pub dir: PathBuf,
    _temp: Option<tempfile_dir::TempDir>,
    pub addrs: Vec<SocketAddr>,
    binary: PathBuf,
    procs: Vec<Option<Child>>,
    extra_args: Vec<String>,
    membership: Option<crate::core::Membership>,
}

/// 2f+1 distinct members validly signed the certificate.
fn certificate_proves(m: &crate::core::Membership, cert: &[crate::core::Signed]) -> bool {
    let signers: std::collections::BTreeSet<u32> = cert.iter().map(|s| s.from).collect();
    let f = (m.n() - 1) / 3;
    signers.len() >= 2 * f + 1 && signers.len() == cert.len() && m.verify_all(cert)
}

/// A minimal self-deleting directory, so the library needs no test-only dependency.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<TempDir> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p)?;
            Ok(TempDir(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Cluster {
    /// Keys, a genesis on free loopback ports, and `n` running replicas in a temporary directory.
    pub fn start(binary: &Path, n: usize, extra_args: &[&str]) -> std::io::Result<Cluster> {
        let temp = tempfile_dir::TempDir::new("fhirmament-ledger-cluster")?;
        let dir = temp.path().to_path_buf();
        let mut g =
            Genesis::generate("local-cluster", n, 0, &dir).map_err(std::io::Error::other)?;
        for r in &mut g.replicas {
            r.address = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        }
        g.save(&dir.join("genesis.json"))
            .map_err(std::io::Error::other)?;
        let addrs = g
            .replicas
            .iter()
            .map(|r| r.address.parse().expect("loopback address"))
            .collect();
        let membership = g.membership().ok();
        let mut c = Cluster {
            dir,
            _temp: Some(temp),
            addrs,
            binary: binary.to_path_buf(),
            procs: (0..n).map(|_| None).collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            membership,
        };
        for i in 0..n {
            c.launch(i)?;
        }
        Ok(c)
    }

    pub fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("data-{i}"))
    }

    pub fn launch(&mut self, i: usize) -> std::io::Result<()> {
        let child = Command::new(&self.binary)
            .arg("run")
            .arg("--genesis")
            .arg(self.dir.join("genesis.json"))
            .args(["--id", &i.to_string()])
            .arg("--key")
            .arg(self.dir.join(format!("replica-{i}.key")))
            .arg("--data-dir")
            .arg(self.data(i))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        self.procs[i] = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Submit `count` entries through replica `via`, one after another, each acknowledged as
    /// committed; returns the (seq, root) replies. Reconnects and resubmits as a client would.
    pub fn commit(
        &self,
        via: usize,
        tag: &str,
        count: usize,
        within: Duration,
    ) -> Result<Vec<(u64, [u8; 32])>, String> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        let mut client: Option<Client> = None;
        let mut i = 0;
        while i < count {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{tag}: only {i} of {count} entries committed within {within:?}"
                ));
            }
            let entry = format!("{tag}-{i}").into_bytes();
            if client.is_none() {
                client = Client::connect(self.addrs[via], Duration::from_secs(5)).ok();
                if client.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            let c = client.as_mut().expect("connected");
            if c.submit(&entry).is_err() {
                client = None;
                continue;
            }
            match c.recv() {
                Ok(Reply::Committed {
                    entry_hash: h,
                    seq,
                    root,
                    certificate,
                }) if h == entry_hash(&entry) => {
                    if let Some(m) = &self.membership {
                        if !certificate_proves(m, &certificate) {
                            return Err(format!("{tag}: the commit reply for seq {seq} carries no valid 2f+1 certificate"));
                        }
                    }
                    out.push((seq, root));
                    i += 1;
                }
                Ok(Reply::Busy { .. }) => std::thread::sleep(Duration::from_millis(10)),
                Ok(_) => {}
                // A timeout or a closed connection: resubmit (a duplicate is harmless here).
                Err(_) => client = None,
            }
        }
        Ok(out)
    }

    /// The (seq, root) of every block replica `i` stored. Stop it first.
    pub fn block_roots(&self, i: usize) -> Result<Vec<(u64, [u8; 32])>, String> {
        let (_, records) = LedgerStore::open(&self.data(i)).map_err(|e| e.to_string())?;
        Ok(records
            .into_iter()
            .filter_map(|r| {
                if let Record::Block { seq, root, .. } = r {
                    Some((seq, root))
                } else {
                    None
                }
            })
            .collect())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill9(i);
        }
    }
}

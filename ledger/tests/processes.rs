//! Four replica processes on loopback with RocksDB on disk: commits flow, the cluster survives
//! kill -9 of its primary and of a backup, and restarted replicas catch up (by state transfer
//! when they were down past garbage collection). Agreement is checked on the stores afterwards.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ledger::core::Record;
use ledger::node::client::{entry_hash, Client, Reply};
use ledger::node::genesis::Genesis;
use ledger::store::LedgerStore;

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    procs: Vec<Option<Child>>,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Genesis::generate("process-test", n, 0, dir.path()).unwrap();
        for r in &mut g.replicas {
            r.address = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        }
        g.save(&dir.path().join("genesis.json")).unwrap();
        let addrs = g.replicas.iter().map(|r| r.address).collect();
        let mut c = Cluster { dir, addrs, procs: (0..n).map(|_| None).collect() };
        for i in 0..n {
            c.launch(i);
        }
        c
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data-{i}"))
    }

    fn launch(&mut self, i: usize) {
        let child = Command::new(env!("CARGO_BIN_EXE_fhirmament-ledger"))
            .arg("run")
            .arg("--genesis")
            .arg(self.dir.path().join("genesis.json"))
            .args(["--id", &i.to_string()])
            .arg("--key")
            .arg(self.dir.path().join(format!("replica-{i}.key")))
            .arg("--data-dir")
            .arg(self.data(i))
            .args(["--view-change-timeout-ms", "300"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.procs[i] = Some(child);
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Submit `count` entries through replica `via`, one after another, each acknowledged as
    /// committed; returns the (seq, root) replies. Retries through reconnects and `busy`.
    fn commit(&self, via: usize, tag: &str, count: usize) -> Vec<(u64, [u8; 32])> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = Vec::new();
        let mut client: Option<Client> = None;
        let mut i = 0;
        while i < count {
            assert!(Instant::now() < deadline, "{tag}: only {i} of {count} entries committed within 60 s");
            let entry = format!("{tag}-{i}").into_bytes();
            if client.is_none() {
                client = Client::connect(self.addrs[via], Duration::from_secs(5)).ok();
                if client.is_none() {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            let c = client.as_mut().unwrap();
            if c.submit(&entry).is_err() {
                client = None;
                continue;
            }
            match c.recv() {
                Ok(Reply::Committed { entry_hash: h, seq, root }) if h == entry_hash(&entry) => {
                    out.push((seq, root));
                    i += 1;
                }
                Ok(Reply::Busy { .. }) => std::thread::sleep(Duration::from_millis(10)),
                Ok(_) => {}
                // A timeout: resubmit the same entry (a duplicate commit is harmless here).
                Err(_) => client = None,
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill9(i);
        }
    }
}

fn block_roots(path: &Path) -> Vec<(u64, [u8; 32])> {
    LedgerStore::open(path)
        .unwrap()
        .load()
        .unwrap()
        .into_iter()
        .filter_map(|r| if let Record::Block { seq, root, .. } = r { Some((seq, root)) } else { None })
        .collect()
}

#[test]
fn four_processes_survive_kill_9_of_primary_and_backup_and_agree() {
    let mut c = Cluster::start(4);
    // Normal case, submitting through a backup.
    let first = c.commit(1, "warmup", 50);
    assert_eq!(first.len(), 50);

    // The primary (replica 0 in view 0) dies: the others change view and keep committing.
    c.kill9(0);
    let after_primary = c.commit(2, "no-primary", 30);
    assert!(after_primary.iter().all(|(s, _)| *s > first.last().unwrap().0));

    // It comes back and catches up.
    c.launch(0);
    std::thread::sleep(Duration::from_millis(300));

    // A backup dies for several checkpoints (interval 64): it will need state transfer.
    c.kill9(3);
    let long_run = c.commit(1, "while-3-is-down", 260);
    c.launch(3);
    // Everyone, including both restarted replicas, keeps committing with the others.
    let last = c.commit(3, "after-restart", 10);
    let top = last.last().unwrap().0;
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..4 {
        c.kill9(i);
    }

    let roots: Vec<Vec<(u64, [u8; 32])>> = (0..4).map(|i| block_roots(&c.data(i))).collect();
    for (i, r) in roots.iter().enumerate() {
        assert!(r.last().map_or(0, |x| x.0) >= top.min(r.len() as u64), "replica {i}");
        // No gaps.
        for (k, (seq, _)) in r.iter().enumerate() {
            assert_eq!(*seq, k as u64 + 1, "replica {i} has a gap");
        }
    }
    // Agreement: every replica's blocks are a prefix of the longest, with identical roots.
    let longest = roots.iter().max_by_key(|r| r.len()).unwrap();
    for (i, r) in roots.iter().enumerate() {
        assert_eq!(&longest[..r.len()], &r[..], "replica {i} disagrees");
    }
    // The restarted backup caught up past the garbage-collected window.
    assert!(roots[3].len() as u64 >= long_run.last().unwrap().0, "replica 3 did not catch up");
    assert!(roots[0].len() as u64 >= long_run.last().unwrap().0, "replica 0 did not catch up");
}

//! Four replica processes on loopback with RocksDB on disk: commits flow, the cluster survives
//! kill -9 of its primary and of a backup, and restarted replicas catch up (by state transfer
//! when they were down past garbage collection). Agreement is checked on the stores afterwards.

use std::path::Path;
use std::time::Duration;

use ledger::node::cluster::Cluster;

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn four_processes_survive_kill_9_of_primary_and_backup_and_agree() {
    let mut c = Cluster::start(
        Path::new(env!("CARGO_BIN_EXE_fhirmament-ledger")),
        4,
        &["--view-change-timeout-ms", "300"],
    )
    .unwrap();
    // Normal case, submitting through a backup.
    let first = c.commit(1, "warmup", 50, MINUTE).unwrap();
    assert_eq!(first.len(), 50);

    // The primary (replica 0 in view 0) dies: the others change view and keep committing.
    c.kill9(0);
    let after_primary = c.commit(2, "no-primary", 30, MINUTE).unwrap();
    assert!(after_primary
        .iter()
        .all(|(s, _)| *s > first.last().unwrap().0));

    // It comes back and catches up.
    c.launch(0).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // A backup dies for several checkpoints (interval 64): it will need state transfer.
    c.kill9(3);
    let long_run = c.commit(1, "while-3-is-down", 260, MINUTE).unwrap();
    c.launch(3).unwrap();
    // Everyone, including both restarted replicas, keeps committing with the others.
    let last = c.commit(3, "after-restart", 10, MINUTE).unwrap();
    let top = last.last().unwrap().0;
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..4 {
        c.kill9(i);
    }

    let roots: Vec<Vec<(u64, [u8; 32])>> = (0..4).map(|i| c.block_roots(i).unwrap()).collect();
    for (i, r) in roots.iter().enumerate() {
        assert!(
            r.last().map_or(0, |x| x.0) >= top.min(r.len() as u64),
            "replica {i}"
        );
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
    assert!(
        roots[3].len() as u64 >= long_run.last().unwrap().0,
        "replica 3 did not catch up"
    );
    assert!(
        roots[0].len() as u64 >= long_run.last().unwrap().0,
        "replica 0 did not catch up"
    );
}

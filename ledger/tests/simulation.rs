//! Deterministic simulation of a 4-replica cluster under injected faults. Safety invariants
//! are checked after every event (agreement, no gaps, committed entries survive restarts, no
//! conflicting votes from a correct replica, bounded log); liveness is required once the
//! faults stop. A failure prints the one-line command that replays its seed.

use ledger::core::{block_leaf, Config, FaultKind, Payload, Record};
use ledger::merkle;
use ledger::sim::{Byzantine, Scenario, Sim};

fn run(sc: Scenario) -> ledger::sim::Report {
    match Sim::new(sc).run() {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

fn quiet(seed: u64) -> Scenario {
    let mut sc = Scenario::from_seed(seed);
    sc.drop_per_mille = 0;
    sc.dup_per_mille = 0;
    sc.crash_per_mille = 0;
    sc.partition_per_mille = 0;
    sc.byzantine = None;
    sc.slow = None;
    sc
}

#[test]
fn many_seeds() {
    let count: u64 = std::env::var("LEDGER_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let first: u64 = std::env::var("LEDGER_SIM_FIRST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut committed = 0;
    let mut view_changes = 0;
    let mut slowest = (0, std::time::Duration::ZERO);
    let start = std::time::Instant::now();
    for seed in first..first + count {
        let t0 = std::time::Instant::now();
        let r = run(Scenario::from_seed(seed));
        if t0.elapsed() > slowest.1 {
            slowest = (seed, t0.elapsed());
        }
        committed += r.committed;
        view_changes += r.views;
        if (seed - first + 1) % 100 == 0 {
            println!(
                "{} seeds in {:.0?} (slowest so far: seed {} in {:.1?})",
                seed - first + 1,
                start.elapsed(),
                slowest.0,
                slowest.1
            );
        }
    }
    println!("{count} seeds: {committed} blocks committed, {view_changes} views advanced; slowest seed {} took {:.1?}", slowest.0, slowest.1);
}

#[test]
fn replay_one_seed() {
    let seed: u64 = std::env::var("LEDGER_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let sc = Scenario::from_seed(seed);
    println!("{sc:?}");
    let r = run(sc);
    println!("{r:?}");
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    for seed in [3, 11, 12345] {
        let a = run(Scenario::from_seed(seed));
        let b = run(Scenario::from_seed(seed));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(a.messages, b.messages);
    }
    assert_ne!(
        run(Scenario::from_seed(3)).trace_hash,
        run(Scenario::from_seed(4)).trace_hash
    );
}

#[test]
fn fault_free_runs_commit_everything_in_view_zero() {
    let r = run(quiet(1));
    assert!(r.committed > 0);
    assert_eq!(r.views, 0, "no view change without faults");
    assert!(r.faults_reported.is_empty(), "{:?}", r.faults_reported);
}

#[test]
fn a_silent_primary_is_replaced() {
    let mut sc = quiet(2);
    sc.byzantine = Some((0, Byzantine::Silent));
    let r = run(sc);
    assert!(r.views >= 1, "view changed away from the silent primary");
}

#[test]
fn byzantine_primaries_and_voters_are_detected_and_survived() {
    // Replica 0 is the first primary; replica 2 a backup (which sends no pre-prepares).
    for (kind, culprit, expected) in [
        (Byzantine::Equivocate, 0, None),
        (Byzantine::WrongDigest, 0, Some(FaultKind::WrongDigest)),
        (Byzantine::DoubleVote, 2, Some(FaultKind::DoubleVote)),
        (Byzantine::DoubleVote, 0, None),
        (Byzantine::ForgeAndReplay, 0, Some(FaultKind::BadSignature)),
        (Byzantine::ForgeAndReplay, 2, Some(FaultKind::NotMember)),
    ] {
        let mut sc = quiet(40 + culprit as u64);
        sc.byzantine = Some((culprit, kind));
        let r = run(sc);
        if let Some(k) = expected {
            assert!(
                r.faults_reported.contains_key(&k),
                "{kind:?} by {culprit}: {:?}",
                r.faults_reported
            );
        }
    }
}

/// A backup that hears nothing from the primary times out alone. It suspects the view but
/// keeps voting in it (learning what it missed from the others' certificates), so it neither
/// forces a view change on the others nor sits in a view change of its own while they commit.
#[test]
fn a_backup_cut_off_from_the_primary_is_never_left_changing_views_alone() {
    for seed in [7, 8, 9] {
        let mut sc = quiet(seed);
        sc.requests = 60;
        sc.cut = Some((0, 2));
        let r = run(sc);
        assert!(r.committed > 0);
        assert_eq!(
            r.views, 0,
            "seed {seed}: one suspicious backup moved the view"
        );
        assert!(
            r.final_views.iter().all(|v| *v == (0, true)),
            "seed {seed}: every replica ends voting in view 0: {:?}",
            r.final_views
        );
    }
}

#[test]
fn a_view_change_flood_from_one_replica_does_not_move_the_others() {
    let mut sc = quiet(5);
    sc.byzantine = Some((3, Byzantine::ViewChangeFlood));
    let r = run(sc);
    assert_eq!(r.views, 0, "f view changes must not force a view change");
}

#[test]
fn a_checkpoint_flood_neither_stalls_the_cluster_nor_grows_memory() {
    for culprit in [0, 3] {
        let mut sc = quiet(60 + culprit as u64);
        sc.byzantine = Some((culprit, Byzantine::CheckpointFlood));
        sc.requests = 60;
        let r = run(sc);
        assert!(r.committed > 10);
        assert!(r.max_log_len < 200, "log stayed bounded: {}", r.max_log_len);
    }
}

#[test]
fn crashes_and_partitions_with_checkpoints_and_state_transfer() {
    for seed in 100..110 {
        let mut sc = quiet(seed);
        sc.crash_per_mille = 4;
        sc.partition_per_mille = 3;
        sc.drop_per_mille = 30;
        sc.requests = 60;
        sc.config = Config {
            checkpoint_interval: 2,
            window: 8,
            ..sc.config.clone()
        };
        let r = run(sc);
        assert!(r.max_log_len < 200, "log stayed bounded: {}", r.max_log_len);
    }
}

#[test]
fn entries_have_inclusion_proofs_against_quorum_signed_checkpoints() {
    let mut sc = quiet(9);
    sc.requests = 60;
    let r = run(sc);
    // Replica 1's persisted blocks and stable checkpoints; the verifier below uses only the
    // membership's public keys.
    let records = &r.records[1];
    let mut leaves = Vec::new();
    let mut blocks = Vec::new();
    let mut prev = merkle::Frontier::default().root();
    for rec in records {
        if let Record::Block { seq, batch, root } = rec {
            assert_eq!(*seq as usize, leaves.len() + 1);
            leaves.push(block_leaf(&prev, *seq, batch));
            assert_eq!(merkle::root_of_leaves(&leaves), *root);
            prev = *root;
            blocks.push(batch.clone());
        }
    }
    let checkpoints: Vec<(u64, [u8; 32], Vec<ledger::core::Signed>)> = records
        .iter()
        .filter_map(|rec| match rec {
            Record::Stable { seq, root, proof } => Some((*seq, *root, proof.clone())),
            _ => None,
        })
        .collect();
    assert!(checkpoints.len() >= 2, "need two stable checkpoints");
    for (seq, root, proof) in &checkpoints {
        // The checkpoint is signed by 2f+1 distinct members over this very root.
        let signers: std::collections::BTreeSet<u32> = proof
            .iter()
            .filter(|c| matches!(c.payload, Payload::Checkpoint { seq: s, root: x } if s == *seq && x == *root))
            .map(|c| c.from)
            .collect();
        assert!(signers.len() >= 3 && r.membership.verify_all(proof));
        // Every entry of every block up to it is provably included.
        for (i, batch) in blocks.iter().enumerate().take(*seq as usize) {
            let entries: Vec<&[u8]> = batch.entries.iter().map(Vec::as_slice).collect();
            for (j, entry) in entries.iter().enumerate() {
                let in_batch = merkle::inclusion_proof(&entries, j).unwrap();
                assert!(merkle::verify_inclusion(
                    entry,
                    j as u64,
                    entries.len() as u64,
                    &in_batch,
                    &batch.merkle_root()
                ));
            }
            let in_log = merkle::inclusion_proof_of_leaves(&leaves[..*seq as usize], i).unwrap();
            assert!(merkle::verify_inclusion_of_leaf(
                &leaves[i], i as u64, *seq, &in_log, root
            ));
            // A tampered batch no longer matches its leaf.
            if let Some(first) = batch.entries.first() {
                let mut forged = batch.clone();
                forged.entries[0] = [first.as_slice(), b"!"].concat();
                let prev_root = if i == 0 {
                    merkle::Frontier::default().root()
                } else {
                    merkle::root_of_leaves(&leaves[..i])
                };
                assert_ne!(block_leaf(&prev_root, i as u64 + 1, &forged), leaves[i]);
            }
        }
    }
    // Any two checkpoints are consistent: the later extends the earlier.
    let (a, b) = (&checkpoints[0], &checkpoints[checkpoints.len() - 1]);
    let proof = merkle::consistency_proof(&leaves[..b.0 as usize], a.0 as usize).unwrap();
    assert!(merkle::verify_consistency(a.0, b.0, &a.1, &b.1, &proof));
}

#[test]
fn a_single_replica_commits_alone() {
    // n = 1 (f = 0): the development configuration of a single organization.
    let mut sc = quiet(6);
    sc.n = 1;
    let r = run(sc);
    assert!(r.committed > 0);
    assert_eq!(r.views, 0);
}

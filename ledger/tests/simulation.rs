//! Deterministic simulation of a 4-replica cluster under injected faults. Safety invariants
//! are checked after every event (agreement, no gaps, committed entries survive restarts, no
//! conflicting votes from a correct replica, bounded log); liveness is required once the
//! faults stop. A failure prints the one-line command that replays its seed.

use ledger::core::{Config, FaultKind};
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
    let count: u64 = std::env::var("LEDGER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let first: u64 = std::env::var("LEDGER_SIM_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut committed = 0;
    let mut view_changes = 0;
    for seed in first..first + count {
        let r = run(Scenario::from_seed(seed));
        committed += r.committed;
        view_changes += r.views;
    }
    println!("{count} seeds: {committed} blocks committed, {view_changes} views advanced");
}

#[test]
fn replay_one_seed() {
    let seed: u64 = std::env::var("LEDGER_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
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
    assert_ne!(run(Scenario::from_seed(3)).trace_hash, run(Scenario::from_seed(4)).trace_hash);
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
            assert!(r.faults_reported.contains_key(&k), "{kind:?} by {culprit}: {:?}", r.faults_reported);
        }
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
fn crashes_and_partitions_with_checkpoints_and_state_transfer() {
    for seed in 100..110 {
        let mut sc = quiet(seed);
        sc.crash_per_mille = 4;
        sc.partition_per_mille = 3;
        sc.drop_per_mille = 30;
        sc.requests = 60;
        sc.config = Config { checkpoint_interval: 2, window: 8, ..sc.config.clone() };
        let r = run(sc);
        assert!(r.max_log_len < 200, "log stayed bounded: {}", r.max_log_len);
    }
}

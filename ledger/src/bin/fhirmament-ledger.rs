//! fhirmament-ledger: key generation, genesis files, and running a PBFT replica process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ledger::node::genesis::{self, Genesis};
use ledger::node::{self, NodeConfig};

/// The Fhirmament consortium ledger (PBFT).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an Ed25519 key: writes the secret key (hex, mode 0600) and prints the public key.
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate keys and a genesis file for N replicas on loopback (for development clusters).
    Genesis {
        /// Number of replicas (n = 3f + 1 tolerates f faulty).
        #[arg(long, default_value_t = 4)]
        replicas: usize,
        /// Peer port of replica 0; replica i listens on base-port + i.
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
        /// Chain id, bound into every signature.
        #[arg(long, default_value = "fhirmament-dev")]
        chain_id: String,
        /// Directory for genesis.json and replica-<i>.key.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Benchmark a local cluster of replica processes (RocksDB, synced writes): throughput and
    /// submit-to-commit latency fault-free and with a backup down, and recovery after the
    /// primary is killed.
    Bench {
        #[arg(long, default_value_t = 4)]
        replicas: usize,
        /// Seconds per measured phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent client connections under load.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Entries each client keeps in flight.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Bytes per entry (a FHIR commitment entry is about 150).
        #[arg(long, default_value_t = 150)]
        entry_bytes: usize,
    },
    /// Run replica ID of the chain described by GENESIS.
    Run {
        #[arg(long)]
        genesis: PathBuf,
        #[arg(long)]
        id: u32,
        /// This replica's secret key file.
        #[arg(long)]
        key: PathBuf,
        /// RocksDB directory for this replica's log and blocks.
        #[arg(long)]
        data_dir: PathBuf,
        /// Milliseconds without progress before a view change.
        #[arg(long, default_value_t = 500)]
        view_change_timeout_ms: u64,
        /// Most entries per block.
        #[arg(long, default_value_t = 512)]
        max_batch_entries: usize,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirmament-ledger: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Keygen { out } => {
            let key = genesis::generate_key().map_err(|e| e.to_string())?;
            genesis::write_key(&out, &key).map_err(|e| e.to_string())?;
            println!("{}", genesis::public_key_hex(&key));
            Ok(())
        }
        Command::Genesis {
            replicas,
            base_port,
            chain_id,
            dir,
        } => {
            if replicas == 0 {
                return Err("--replicas must be at least 1".into());
            }
            Genesis::generate(&chain_id, replicas, base_port, &dir).map_err(|e| e.to_string())?;
            println!(
                "wrote {} and {replicas} keys",
                dir.join("genesis.json").display()
            );
            Ok(())
        }
        Command::Bench {
            replicas,
            seconds,
            clients,
            window,
            entry_bytes,
        } => bench::run(replicas, seconds, clients, window, entry_bytes),
        Command::Run {
            genesis,
            id,
            key,
            data_dir,
            view_change_timeout_ms,
            max_batch_entries,
        } => {
            let genesis = Genesis::load(&genesis).map_err(|e| e.to_string())?;
            let key = genesis::read_key(&key).map_err(|e| e.to_string())?;
            let consensus = node::consensus(view_change_timeout_ms, max_batch_entries);
            node::run(NodeConfig {
                id,
                listen: None,
                genesis,
                key,
                data_dir,
                consensus,
                tick: Duration::from_millis(1),
            })
            .map_err(|e| e.to_string())
        }
    }
}

mod bench {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use ledger::node::client::{entry_hash, Client, Reply};
    use ledger::node::cluster::Cluster;

    struct Load<'a> {
        stop: &'a AtomicBool,
        committed: &'a AtomicU64,
        latencies: &'a Mutex<Vec<u32>>,
    }

    fn entry(tag: &str, client: usize, i: u64, bytes: usize) -> Vec<u8> {
        let mut e = format!("{tag}-{client}-{i}-").into_bytes();
        e.resize(bytes.max(e.len()), b'x');
        e
    }

    /// One client connection keeping `window` entries in flight until told to stop.
    fn client(
        addr: std::net::SocketAddr,
        id: usize,
        tag: &str,
        window: usize,
        bytes: usize,
        load: &Load,
    ) {
        let mut next = 0u64;
        let mut in_flight: std::collections::HashMap<[u8; 32], (Vec<u8>, Instant)> =
            Default::default();
        while !load.stop.load(Ordering::Relaxed) {
            let Ok(mut c) = Client::connect(addr, Duration::from_secs(10)) else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            // After a reconnect, what was in flight is submitted again.
            let mut ok = in_flight.values().all(|(e, _)| c.submit(e).is_ok());
            while ok && !load.stop.load(Ordering::Relaxed) {
                while in_flight.len() < window {
                    let e = entry(tag, id, next, bytes);
                    next += 1;
                    if c.submit(&e).is_err() {
                        ok = false;
                        break;
                    }
                    in_flight.insert(entry_hash(&e), (e, Instant::now()));
                }
                match c.recv() {
                    Ok(Reply::Committed { entry_hash: h, .. }) => {
                        if let Some((_, t0)) = in_flight.remove(&h) {
                            load.committed.fetch_add(1, Ordering::Relaxed);
                            load.latencies
                                .lock()
                                .unwrap()
                                .push(t0.elapsed().as_micros() as u32);
                        }
                    }
                    Ok(Reply::Busy { entry_hash: h }) => {
                        std::thread::sleep(Duration::from_millis(1));
                        if let Some((e, _)) = in_flight.get(&h) {
                            ok = c.submit(e).is_ok();
                        }
                    }
                    Err(_) => ok = false,
                }
            }
        }
    }

    fn percentile(sorted: &[u32], p: f64) -> f64 {
        sorted
            .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    }

    /// Run a load for `seconds`; `during` is called every 100 ms with the elapsed time and may
    /// inject faults. Returns (entries/s, p50 ms, p99 ms, commits per 100 ms).
    fn phase(
        cluster: &mut Cluster,
        tag: &str,
        clients: usize,
        window: usize,
        bytes: usize,
        seconds: u64,
        vias: &[usize],
        mut during: impl FnMut(&mut Cluster, Duration),
    ) -> (f64, f64, f64, Vec<u64>) {
        let stop = AtomicBool::new(false);
        let committed = AtomicU64::new(0);
        let latencies = Mutex::new(Vec::new());
        let load = Load {
            stop: &stop,
            committed: &committed,
            latencies: &latencies,
        };
        let mut buckets = Vec::new();
        let start = Instant::now();
        // Clients get the addresses, not the cluster: `during` may kill and restart processes.
        let addrs = cluster.addrs.clone();
        std::thread::scope(|s| {
            for id in 0..clients {
                let addr = addrs[vias[id % vias.len()]];
                let load = &load;
                s.spawn(move || client(addr, id, tag, window, bytes, load));
            }
            let mut last = 0;
            while start.elapsed() < Duration::from_secs(seconds) {
                std::thread::sleep(Duration::from_millis(100));
                let now = committed.load(Ordering::Relaxed);
                buckets.push(now - last);
                last = now;
                during(cluster, start.elapsed());
            }
            stop.store(true, Ordering::Relaxed);
        });
        let elapsed = start.elapsed().as_secs_f64();
        let mut l = latencies.into_inner().unwrap();
        l.sort_unstable();
        (
            committed.load(Ordering::Relaxed) as f64 / elapsed,
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            buckets,
        )
    }

    pub fn run(
        replicas: usize,
        seconds: u64,
        clients: usize,
        window: usize,
        bytes: usize,
    ) -> Result<(), String> {
        if replicas < 4 {
            return Err("the benchmark needs at least 4 replicas (it kills two)".into());
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cluster = Cluster::start(&exe, replicas, &["--view-change-timeout-ms", "500"])
            .map_err(|e| e.to_string())?;
        cluster.commit(1, "warmup", 20, Duration::from_secs(60))?;
        println!("fhirmament-ledger bench: {replicas} replica processes on loopback, RocksDB with synced writes, {bytes}-byte entries");
        let backups: Vec<usize> = (1..replicas).collect();

        let (tput, p50, p99, _) = phase(
            &mut cluster,
            "light",
            1,
            1,
            bytes,
            seconds.min(5),
            &backups,
            |_, _| {},
        );
        println!("light load (1 client, 1 in flight)      {tput:>9.0} entries/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
        let (tput, p50, p99, _) = phase(
            &mut cluster,
            "load",
            clients,
            window,
            bytes,
            seconds,
            &backups,
            |_, _| {},
        );
        println!("fault-free ({clients} clients x {window} in flight) {tput:>9.0} entries/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
        let baseline = tput;

        cluster.kill9(replicas - 1);
        let vias: Vec<usize> = (1..replicas - 1).collect();
        let (tput, p50, p99, _) = phase(
            &mut cluster,
            "backup-down",
            clients,
            window,
            bytes,
            seconds,
            &vias,
            |_, _| {},
        );
        println!("one backup down                          {tput:>9.0} entries/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms");
        cluster.launch(replicas - 1).map_err(|e| e.to_string())?;
        cluster.commit(1, "rejoin", 10, Duration::from_secs(60))?;

        let kill_at = Duration::from_secs(seconds / 2);
        let mut killed = false;
        let (_, _, _, buckets) = phase(
            &mut cluster,
            "primary-kill",
            clients,
            window,
            bytes,
            seconds,
            &backups,
            |c, t| {
                if !killed && t >= kill_at {
                    c.kill9(0);
                    killed = true;
                }
            },
        );
        let kill_bucket = (kill_at.as_millis() / 100) as usize;
        let series: Vec<String> = buckets
            .chunks(5)
            .map(|c| format!("{:.0}", c.iter().sum::<u64>() as f64 * 2.0))
            .collect();
        println!(
            "entries/s per 500 ms around the kill at {:.1} s: {}",
            kill_at.as_secs_f64(),
            series.join(" ")
        );
        let before: Vec<u64> = buckets[kill_bucket.saturating_sub(20)..kill_bucket].to_vec();
        let pre = before.iter().sum::<u64>() as f64 / before.len().max(1) as f64 * 10.0;
        // Recovered: the first 500 ms window after the kill averaging >= 90% of the rate before it.
        let recovered = (kill_bucket..buckets.len().saturating_sub(4))
            .find(|&i| buckets[i..i + 5].iter().sum::<u64>() as f64 * 2.0 >= 0.9 * pre);
        match recovered {
            Some(i) => println!(
                "primary killed: back to 90% of {pre:.0} entries/s within {:.1} s",
                (i - kill_bucket) as f64 / 10.0 + 0.5
            ),
            None => println!(
                "primary killed: did not reach 90% of {pre:.0} entries/s within {:.1} s",
                (buckets.len() - kill_bucket) as f64 / 10.0
            ),
        }
        println!("(fault-free baseline for comparison: {baseline:.0} entries/s)");
        Ok(())
    }
}

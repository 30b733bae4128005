//! fhirmament-ledger: key generation, genesis files, and running a PBFT replica process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ledger::core::Config;
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
        Command::Genesis { replicas, base_port, chain_id, dir } => {
            if replicas == 0 {
                return Err("--replicas must be at least 1".into());
            }
            Genesis::generate(&chain_id, replicas, base_port, &dir).map_err(|e| e.to_string())?;
            println!("wrote {} and {replicas} keys", dir.join("genesis.json").display());
            Ok(())
        }
        Command::Run { genesis, id, key, data_dir, view_change_timeout_ms, max_batch_entries } => {
            let genesis = Genesis::load(&genesis).map_err(|e| e.to_string())?;
            let key = genesis::read_key(&key).map_err(|e| e.to_string())?;
            let consensus = Config {
                view_change_timeout: view_change_timeout_ms,
                max_batch_entries,
                batch_delay: 1,
                retransmit_interval: 100,
                checkpoint_interval: 64,
                window: 256,
                pipeline: 16,
                ..Config::default()
            };
            node::run(NodeConfig { id, genesis, key, data_dir, consensus, tick: Duration::from_millis(1) }).map_err(|e| e.to_string())
        }
    }
}

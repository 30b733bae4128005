use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhirmament::config::{Config, ServeArgs};
use fhirmament::Service;

/// Fhirmament: a FHIR R4 (4.0.1) server for Patient, Consent, DocumentReference and AuditEvent.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the FHIR server (defaults: 127.0.0.1:8080, data in ./data, base http://127.0.0.1:8080/fhir).
    ///
    /// There is no authentication yet (SMART on FHIR is the next milestone): keep the listen
    /// address on loopback.
    Serve(ServeArgs),
    /// Rebuild the search indexes from the stored resources. Run it with the server stopped.
    Reindex(ServeArgs),
    /// Check a `$verify` receipt offline, with only the consortium's genesis public keys.
    /// Exits 0 when every link of the proof holds, 1 otherwise.
    Verify {
        /// The receipt: the Parameters resource `$verify` returned (a file, or - for stdin).
        receipt: std::path::PathBuf,
        /// The consortium's genesis file (a single node's is <data-dir>/ledger/genesis.json).
        #[arg(long)]
        genesis: std::path::PathBuf,
    },
    /// Create a consortium's genesis and replica keys (peers reached by name, e.g. on Kubernetes).
    Genesis(fhirmament::cluster::GenesisArgs),
    /// A local consortium: one process per replica on loopback.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start n replicas (creating the genesis and keys on first use) and wait until all answer.
    Up(fhirmament::cluster::ClusterArgs),
    /// Stop the replicas started by `up`; their data stays for the next `up`.
    Down(fhirmament::cluster::ClusterArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FHIRMAMENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(&args),
        Command::Reindex(args) => run_reindex(&args),
        Command::Verify { receipt, genesis } => run_verify(&receipt, &genesis),
        Command::Genesis(args) => fhirmament::cluster::genesis(&args),
        Command::Cluster(ClusterCommand::Up(args)) => fhirmament::cluster::up(&args),
        Command::Cluster(ClusterCommand::Down(args)) => fhirmament::cluster::down(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fhirmament: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_serve(args: &ServeArgs) -> Result<(), String> {
    let config = Config::resolve(args).map_err(|e| e.to_string())?;
    let svc = Service::open(config).map_err(|e| e.to_string())?;
    let runtime = actix_web::rt::System::new();
    runtime
        .block_on(fhirmament::serve(svc))
        .map_err(|e| format!("server failed: {e}"))
}

fn run_reindex(args: &ServeArgs) -> Result<(), String> {
    let config = Config::resolve(args).map_err(|e| e.to_string())?;
    let profiles = fhirmament::load_profiles(&config).map_err(|e| e.to_string())?;
    let registry = fhirmament::search::Registry::from_profiles(&profiles);
    let store = fhirmament::store::Store::open(&config.data_dir).map_err(|e| e.to_string())?;
    let n = fhirmament::store::txlog::reindex(&store, &registry, &config.base_url)
        .map_err(|e| e.to_string())?;
    println!("reindexed {n} resources");
    Ok(())
}

fn run_verify(receipt: &std::path::Path, genesis: &std::path::Path) -> Result<(), String> {
    let text = if receipt.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| e.to_string())?;
        s
    } else {
        std::fs::read_to_string(receipt).map_err(|e| format!("{}: {e}", receipt.display()))?
    };
    let receipt: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("the receipt is not JSON: {e}"))?;
    let genesis = ledger::node::genesis::Genesis::load(genesis).map_err(|e| e.to_string())?;
    let members = genesis.membership()?;
    let checks = fhirmament::ledger::receipt::verify(&receipt, &members);
    for c in &checks {
        println!("{:<5} {:<11} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
    }
    if checks.iter().all(|c| c.ok) {
        println!("receipt verified against {} ({} replicas)", members.chain_id, members.n());
        Ok(())
    } else {
        Err("the receipt does not verify".into())
    }
}

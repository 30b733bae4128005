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

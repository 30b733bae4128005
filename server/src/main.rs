use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhirmament::config::{Config, ServeArgs};
use fhirmament::Service;

/// The commit thread allocates and frees many small buffers per write; mimalloc keeps that
/// off glibc's slow paths (measured in the benchmark, not assumed).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// There is no TLS in the process: keep the listen address on loopback, behind a
    /// TLS-terminating proxy.
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
    /// Registered users of the SMART authorization server.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Registered SMART client applications.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// The key-encryption key that seals stored records.
    #[command(subcommand)]
    Kek(KekCommand),
    /// Mint an access token signed by this server's key (for operators and scripts); it is
    /// checked like any other. Prints the token.
    Token {
        #[command(flatten)]
        config: ServeArgs,
        /// Space-separated scopes, e.g. "system/*.rs".
        #[arg(long)]
        scope: String,
        /// The subject named in the token and the audit trail.
        #[arg(long, default_value = "operator")]
        sub: String,
        #[arg(long = "client-id", default_value = "fhirmament-cli")]
        client_id: String,
        /// The patient in context (for patient/ scopes).
        #[arg(long)]
        patient: Option<String>,
        /// The user's FHIR identity (`Practitioner/<id>`, `Patient/<id>`): who Consents name.
        #[arg(long = "fhir-user")]
        fhir_user: Option<String>,
        #[arg(long = "ttl-seconds", default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// A local consortium: one process per replica on loopback.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add (or replace) a user. The password comes from FHIRMAMENT_PASSWORD or --password.
    Add {
        #[command(flatten)]
        config: ServeArgs,
        #[arg(long)]
        username: String,
        #[arg(long, env = "FHIRMAMENT_PASSWORD", hide_env_values = true)]
        password: String,
        /// patient, practitioner or admin.
        #[arg(long)]
        role: String,
        /// The user's FHIR resource, e.g. Patient/123 or Practitioner/9.
        #[arg(long = "fhir-user")]
        fhir_user: Option<String>,
        /// Narrower scopes than the role allows (e.g. pharmacy staff: "user/DocumentReference.rs").
        #[arg(long)]
        scope: Option<String>,
        /// Require a TOTP one-time code at login; prints the secret and its otpauth:// URI.
        #[arg(long)]
        totp: bool,
    },
}

#[derive(Subcommand)]
enum ClientsCommand {
    /// Register (or replace) a client. Exactly one of --public, --secret, --jwks.
    Add {
        #[command(flatten)]
        config: ServeArgs,
        #[arg(long = "client-id")]
        client_id: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Exact redirect URI (repeat for several).
        #[arg(long = "redirect-uri")]
        redirect_uri: Vec<String>,
        /// The scopes the client may be granted.
        #[arg(long)]
        scope: String,
        /// A public client (PKCE, no secret).
        #[arg(long)]
        public: bool,
        /// A confidential client authenticating with client_secret_basic.
        #[arg(long, env = "FHIRMAMENT_CLIENT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// A JWKS file: the client authenticates with private_key_jwt (RS384/ES384).
        #[arg(long)]
        jwks: Option<std::path::PathBuf>,
        /// Where the client publishes its JWKS (https, or http on loopback): private_key_jwt
        /// with keys fetched from there, so the client can rotate them.
        #[arg(long = "jwks-uri")]
        jwks_uri: Option<String>,
        /// A JWKS file with the public key(s) responses are encrypted to when the client asks
        /// for `application/jose` (RSA for RSA-OAEP-256, EC or X25519 for ECDH-ES+A256KW).
        #[arg(long = "encryption-jwks")]
        encryption_jwks: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum KekCommand {
    /// Write a new key-encryption key (a symmetric JWK) to a file that does not exist yet.
    Generate {
        #[arg(long)]
        out: std::path::PathBuf,
    },
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
        Command::Kek(KekCommand::Generate { out }) => generate_kek(&out),
        Command::Verify { receipt, genesis } => run_verify(&receipt, &genesis),
        Command::Genesis(args) => fhirmament::cluster::genesis(&args),
        Command::Users(UsersCommand::Add {
            config,
            username,
            password,
            role,
            fhir_user,
            scope,
            totp,
        }) => add_user(&config, username, &password, &role, fhir_user, scope, totp),
        Command::Clients(ClientsCommand::Add {
            config,
            client_id,
            name,
            redirect_uri,
            scope,
            public,
            secret,
            jwks,
            jwks_uri,
            encryption_jwks,
        }) => add_client(
            &config,
            client_id,
            name,
            redirect_uri,
            scope,
            public,
            secret,
            jwks,
            jwks_uri,
            encryption_jwks,
        ),
        Command::Token {
            config,
            scope,
            sub,
            client_id,
            patient,
            fhir_user,
            ttl_seconds,
        } => mint_token(
            &config,
            &scope,
            &sub,
            &client_id,
            patient,
            fhir_user,
            ttl_seconds,
        ),
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
    let kek = config.kek().map_err(|e| e.to_string())?;
    let mut store =
        fhirmament::store::Store::open(&config.data_dir, kek).map_err(|e| e.to_string())?;
    store.set_objects(
        fhirmament::store::objects::Objects::open(config.object_store.as_deref())
            .map_err(|e| e.to_string())?,
    );
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
        println!(
            "{:<5} {:<11} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if checks.iter().all(|c| c.ok) {
        println!(
            "receipt verified against {} ({} replicas)",
            members.chain_id,
            members.n()
        );
        Ok(())
    } else {
        Err("the receipt does not verify".into())
    }
}

fn auth_directory(
    args: &ServeArgs,
) -> Result<(Config, fhirmament::auth::directory::Directory), String> {
    let config = Config::resolve(args).map_err(|e| e.to_string())?;
    let dir = fhirmament::auth::directory::Directory::new(&config.data_dir.join("auth"));
    Ok((config, dir))
}

fn add_user(
    args: &ServeArgs,
    username: String,
    password: &str,
    role: &str,
    fhir_user: Option<String>,
    scope: Option<String>,
    totp: bool,
) -> Result<(), String> {
    use fhirmament::auth::directory::{hash_secret, new_totp, Role, User};
    let role = match role {
        "patient" => Role::Patient,
        "practitioner" => Role::Practitioner,
        "admin" => Role::Admin,
        other => {
            return Err(format!(
                "--role must be patient, practitioner or admin, not {other}"
            ))
        }
    };
    if password.len() < 8 {
        return Err("the password must have at least 8 characters".into());
    }
    if role == Role::Patient
        && !fhir_user
            .as_deref()
            .is_some_and(|f| f.starts_with("Patient/"))
    {
        return Err("a patient user needs --fhir-user Patient/<id>".into());
    }
    let (_, dir) = auth_directory(args)?;
    let hash = hash_secret(password).map_err(|e| e.to_string())?;
    let totp_secret = if totp {
        let (secret, uri) = new_totp(&username).map_err(|e| e.to_string())?;
        println!("totp secret {secret}");
        println!("{uri}");
        Some(secret)
    } else {
        None
    };
    dir.put_user(User {
        username: username.clone(),
        password_hash: hash,
        role,
        fhir_user,
        scope,
        totp_secret,
    })
    .map_err(|e| e.to_string())?;
    println!("user {username} saved");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn add_client(
    args: &ServeArgs,
    client_id: String,
    name: String,
    redirect_uris: Vec<String>,
    scope: String,
    public: bool,
    secret: Option<String>,
    jwks: Option<std::path::PathBuf>,
    jwks_uri: Option<String>,
    encryption_jwks: Option<std::path::PathBuf>,
) -> Result<(), String> {
    use fhirmament::auth::directory::{hash_secret, Client, ClientAuth};
    let read_jwks = |path: &std::path::Path| -> Result<serde_json::Value, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let jwks: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if !jwks["keys"].as_array().is_some_and(|k| !k.is_empty()) {
            return Err(format!("{}: the JWKS has no keys", path.display()));
        }
        Ok(jwks)
    };
    let encryption_jwks = encryption_jwks.as_deref().map(read_jwks).transpose()?;
    if let Some(uri) = &jwks_uri {
        if !fhirmament::auth::jwks_url::allowed(uri) {
            return Err(format!(
                "--jwks-uri {uri} must be https (or http on loopback)"
            ));
        }
    }
    let auth = match (public, secret, jwks, &jwks_uri) {
        (true, None, None, None) => ClientAuth::Public,
        (false, Some(s), None, None) => ClientAuth::Symmetric {
            secret_hash: hash_secret(&s).map_err(|e| e.to_string())?,
        },
        (false, None, Some(path), _) => ClientAuth::Asymmetric {
            jwks: read_jwks(&path)?,
        },
        (false, None, None, Some(_)) => ClientAuth::Asymmetric {
            jwks: serde_json::json!({"keys": []}),
        },
        _ => return Err("give exactly one of --public, --secret, --jwks (or --jwks-uri)".into()),
    };
    if redirect_uris.is_empty() && !matches!(auth, ClientAuth::Asymmetric { .. }) {
        return Err("an app that users launch needs at least one --redirect-uri".into());
    }
    for s in scope.split_whitespace() {
        if !fhirmament::auth::scopes::is_known(s) {
            return Err(format!("unknown scope {s}"));
        }
    }
    let (_, dir) = auth_directory(args)?;
    dir.put_client(Client {
        client_id: client_id.clone(),
        name,
        auth,
        redirect_uris,
        scope,
        encryption_jwks,
        jwks_uri,
    })
    .map_err(|e| e.to_string())?;
    println!("client {client_id} saved");
    Ok(())
}

fn generate_kek(out: &std::path::Path) -> Result<(), String> {
    let (kek, text) = fhirmament::store::envelope::Kek::generate().map_err(|e| e.to_string())?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("wrote key-encryption key {} to {}", kek.kid, out.display());
    Ok(())
}

fn mint_token(
    args: &ServeArgs,
    scope: &str,
    sub: &str,
    client_id: &str,
    patient: Option<String>,
    fhir_user: Option<String>,
    ttl: u64,
) -> Result<(), String> {
    let config = Config::resolve(args).map_err(|e| e.to_string())?;
    for s in scope.split_whitespace() {
        if !fhirmament::auth::scopes::is_known(s) {
            return Err(format!("unknown scope {s}"));
        }
    }
    let key = fhirmament::auth::keys::SigningKey::load_or_create(&config.data_dir.join("auth"))
        .map_err(|e| e.to_string())?;
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), config.base_url.clone().into());
    claims.insert("aud".into(), config.base_url.clone().into());
    claims.insert("sub".into(), sub.into());
    claims.insert("client_id".into(), client_id.into());
    claims.insert("scope".into(), scope.into());
    claims.insert(
        "jti".into(),
        fhirmament::auth::random_token()
            .map_err(|e| e.to_string())?
            .into(),
    );
    if let Some(p) = patient {
        claims.insert("patient".into(), p.into());
    }
    if let Some(f) = fhir_user {
        claims.insert("fhirUser".into(), format!("{}/{f}", config.base_url).into());
    }
    let t = key
        .sign(&claims, std::time::Duration::from_secs(ttl))
        .map_err(|e| e.to_string())?;
    println!("{t}");
    Ok(())
}

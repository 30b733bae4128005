//! `fhirmament cluster up|down`: a local consortium of n replicas as n processes on loopback,
//! each with its own data directory, Ed25519 key and FHIR endpoint. For development and the
//! end-to-end tests; production runs one `fhirmament serve` per organization (see `k8s/`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ledger::node::genesis::Genesis;

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Directory holding the genesis, keys, data directories, logs and pids.
    #[arg(long, default_value = "./cluster")]
    pub dir: PathBuf,
    /// Number of replicas (organizations); 4 tolerates one Byzantine replica.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// FHIR port of replica 0; replica i listens on this + i.
    #[arg(long = "http-port", default_value_t = 8081)]
    pub http_port: u16,
    /// Ledger peer port of replica 0; replica i uses this + i.
    #[arg(long = "peer-port", default_value_t = 7001)]
    pub peer_port: u16,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenesisArgs {
    /// Directory to write genesis.json and replica-<i>.key into (must not hold a genesis yet).
    #[arg(long)]
    pub dir: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// Peer address of replica i, with {i} for its id, e.g.
    /// fhirmament-{i}.fhirmament-peers.fhirmament.svc.cluster.local:7000
    #[arg(long)]
    pub peer: String,
    /// FHIR base URL of replica i, with {i} for its id, e.g.
    /// http://fhirmament-{i}.fhirmament-peers.fhirmament.svc.cluster.local:8080/fhir
    #[arg(long)]
    pub api: String,
    /// The chain id [default: fhirmament-<random uuid>].
    #[arg(long = "chain-id")]
    pub chain_id: Option<String>,
}

/// Keys and a genesis for a consortium whose replicas are reached by name (e.g. on
/// Kubernetes). Each secret key goes to its organization; the genesis goes to all of them.
pub fn genesis(args: &GenesisArgs) -> Result<(), String> {
    let path = args.dir.join("genesis.json");
    if path.exists() {
        return Err(format!(
            "{} exists; refusing to replace a consortium's keys",
            path.display()
        ));
    }
    if args.replicas == 0 {
        return Err("--replicas must be at least 1".into());
    }
    let chain = args
        .chain_id
        .clone()
        .unwrap_or_else(|| format!("fhirmament-{}", uuid::Uuid::new_v4()));
    let mut g =
        Genesis::generate(&chain, args.replicas, 0, &args.dir).map_err(|e| e.to_string())?;
    for r in &mut g.replicas {
        r.address = args.peer.replace("{i}", &r.id.to_string());
        r.api = Some(args.api.replace("{i}", &r.id.to_string()));
    }
    g.membership()?;
    g.save(&path).map_err(|e| e.to_string())?;
    println!(
        "wrote {} and {} keys (replica-<i>.key) for chain {chain}",
        path.display(),
        args.replicas
    );
    Ok(())
}

fn pids_path(dir: &Path) -> PathBuf {
    dir.join("pids")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn listen_of(api: &str) -> Option<String> {
    let rest = api.strip_prefix("http://")?;
    Some(rest.split('/').next()?.to_string())
}

/// Start the consortium (creating its genesis and keys on first use) and wait until every
/// replica answers on its FHIR endpoint. Replicas already running are left alone, so `up`
/// also restarts the ones that stopped.
pub fn up(args: &ClusterArgs) -> Result<(), String> {
    let dir = &args.dir;
    let running: Vec<u32> = std::fs::read_to_string(pids_path(dir))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    let genesis_path = dir.join("genesis.json");
    let genesis = if genesis_path.exists() {
        Genesis::load(&genesis_path).map_err(|e| e.to_string())?
    } else {
        if args.replicas == 0 {
            return Err("--replicas must be at least 1".into());
        }
        let chain = format!("fhirmament-cluster-{}", uuid::Uuid::new_v4());
        let mut g = Genesis::generate(&chain, args.replicas, args.peer_port, dir)
            .map_err(|e| e.to_string())?;
        for r in &mut g.replicas {
            r.api = Some(format!(
                "http://127.0.0.1:{}/fhir",
                args.http_port + r.id as u16
            ));
        }
        g.save(&genesis_path).map_err(|e| e.to_string())?;
        g
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut pids = Vec::new();
    let mut endpoints = Vec::new();
    for r in &genesis.replicas {
        let api = r
            .api
            .clone()
            .ok_or_else(|| format!("replica {} has no api URL in the genesis", r.id))?;
        if let Some(&pid) = running.get(r.id as usize).filter(|p| alive(**p)) {
            pids.push(pid);
            endpoints.push(api);
            continue;
        }
        let listen = listen_of(&api).ok_or_else(|| format!("cannot listen at {api}"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("node-{}.log", r.id)))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--base-url")
            .arg(&api)
            .arg("--data-dir")
            .arg(dir.join(format!("node-{}", r.id)))
            .arg("--genesis")
            .arg(&genesis_path)
            .arg("--replica-id")
            .arg(r.id.to_string())
            .arg("--ledger-key")
            .arg(dir.join(format!("replica-{}.key", r.id)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: a Ctrl-C in the terminal that ran `up` does not stop it.
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting replica {}: {e}", r.id))?;
        pids.push(child.id());
        endpoints.push(api);
    }
    std::fs::write(
        pids_path(dir),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )
    .map_err(|e| e.to_string())?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, api) in endpoints.iter().enumerate() {
        loop {
            if client
                .get(format!("{api}/metadata"))
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if !alive(pids[i]) || Instant::now() > deadline {
                let log = dir.join(format!("node-{i}.log"));
                let tail: String = std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(format!(
                    "replica {i} did not come up; see {}:\n{tail}",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("consortium {} is up:", genesis.chain_id);
    for (i, api) in endpoints.iter().enumerate() {
        println!("  replica {i}  pid {:>7}  {api}", pids[i]);
    }
    Ok(())
}

/// Stop every replica started by `up` (SIGTERM, then SIGKILL after 10 s). Data is kept.
pub fn down(args: &ClusterArgs) -> Result<(), String> {
    let text = std::fs::read_to_string(pids_path(&args.dir))
        .map_err(|_| format!("no cluster is running from {}", args.dir.display()))?;
    let pids: Vec<u32> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let signal = |sig: &str, pid: u32| {
        let _ = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    };
    for &p in &pids {
        if alive(p) {
            signal("-TERM", p);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &p in &pids {
        if alive(p) {
            signal("-KILL", p);
        }
    }
    let _ = std::fs::remove_file(pids_path(&args.dir));
    println!("stopped {} replicas", pids.len());
    Ok(())
}

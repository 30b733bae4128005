//! Load benchmark: starts the fhirmament binary of the same profile on a temporary data
//! directory, loads N Patients, then measures each workload at a fixed concurrency and prints
//! req/s, p50 and p99, the server's RSS and bytes on disk per stored resource.
//!
//! cargo run --release -p fhirmament-e2e --bin bench -- --patients 100000 --concurrency 32 --seconds 10
//!
//! `--s3` keeps sealed versions in a local Garage (S3) instead of RocksDB.
//! `--replicas 4` runs the same workloads against a local 4-replica consortium (`fhirmament
//! cluster up`): every write is committed by PBFT across the four processes before it is
//! acknowledged. Requests go to replica 0, or round-robin over all replicas with `--spread`.
//! CPU figures then add up all replicas.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use fhirmament_e2e::*;

const FAMILIES: usize = 2000;

#[derive(Clone)]
struct Args {
    patients: usize,
    concurrency: usize,
    seconds: u64,
    replicas: usize,
    spread: bool,
    /// Keep sealed versions in a local Garage (S3) instead of RocksDB.
    s3: bool,
    /// Find the most creates/s whose p99 stays within this many milliseconds, by raising
    /// the concurrency step by step.
    p99_target_ms: Option<f64>,
}

fn args() -> Args {
    let mut a = Args {
        patients: 100_000,
        concurrency: 32,
        seconds: 10,
        replicas: 1,
        spread: false,
        s3: false,
        p99_target_ms: None,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).and_then(|s| s.parse().ok());
        match v[i].as_str() {
            "--patients" => a.patients = next.expect("--patients N") as usize,
            "--concurrency" => a.concurrency = next.expect("--concurrency N") as usize,
            "--seconds" => a.seconds = next.expect("--seconds N"),
            "--replicas" => a.replicas = next.expect("--replicas N") as usize,
            "--p99-target" => a.p99_target_ms = Some(next.expect("--p99-target MS") as f64),
            "--spread" => {
                a.spread = true;
                i += 1;
                continue;
            }
            "--s3" => {
                a.s3 = true;
                i += 1;
                continue;
            }
            other => {
                panic!("unknown argument {other}; use --patients N --concurrency N --seconds N --replicas N --spread --s3 --p99-target MS")
            }
        }
        i += 2;
    }
    a
}

/// A deterministic pseudo-random stream (xorshift), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn family(n: usize) -> String {
    format!("Fam{:04}x", n % FAMILIES)
}

fn synthetic_patient(rng: &mut Rng) -> Value {
    let f = rng.below(FAMILIES);
    let year = 1930 + rng.below(90);
    let month = 1 + rng.below(12);
    let day = 1 + rng.below(28);
    json!({"resourceType": "Patient",
        "identifier": [{"system": "urn:bench", "value": format!("{}", rng.next())}],
        "name": [{"family": family(f), "given": ["Bench", "Mark"]}],
        "gender": if rng.below(2) == 0 { "female" } else { "male" },
        "birthDate": format!("{year:04}-{month:02}-{day:02}"),
        "address": [{"city": "Testville", "postalCode": format!("{:05}", rng.below(99999))}]})
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| {
                    if e.path().is_dir() {
                        dir_bytes(&e.path())
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One request of a workload: method, URL and body.
type Request = (reqwest::Method, String, Option<Vec<u8>>, u16);

/// Issue requests from `concurrency` tasks on a single-threaded async client for `seconds`;
/// print throughput, latency percentiles and how the CPU was shared.
fn measure(
    name: &str,
    a: &Args,
    server_pids: &[u32],
    tokens: &[(String, String)],
    make: impl Fn(&mut Rng) -> Request + Sync,
) -> Measured {
    let bearer = |url: &str| {
        tokens
            .iter()
            .find(|(b, _)| url.starts_with(b.as_str()))
            .map(|(_, t)| format!("Bearer {t}"))
            .unwrap_or_default()
    };
    let servers_cpu = || server_pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(a.concurrency)
        .build()
        .unwrap();
    // Build every request body before the clock starts.
    let per_task: Vec<Vec<(Request, String)>> = (0..a.concurrency)
        .map(|t| {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1) * 0x1000_0001);
            (0..500)
                .map(|_| {
                    let r = make(&mut rng);
                    let auth = bearer(&r.1);
                    (r, auth)
                })
                .collect()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let (server_cpu0, own_cpu0) = (servers_cpu(), cpu_seconds(std::process::id()));
    let start = Instant::now();
    let results: Vec<(Vec<u32>, u64)> = rt.block_on(async {
        let tasks: Vec<_> = per_task
            .into_iter()
            .map(|requests| {
                let client = client.clone();
                async move {
                    let mut lat = Vec::with_capacity(1 << 16);
                    let mut errors = 0u64;
                    for ((method, url, body, expect), auth) in requests.iter().cycle() {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        let mut req = client
                            .request(method.clone(), url)
                            .header("Authorization", auth);
                        if let Some(b) = body {
                            req = req.header("Content-Type", FHIR_JSON).body(b.clone());
                        }
                        let ok = match req.send().await {
                            Ok(r) => r.status().as_u16() == *expect && r.bytes().await.is_ok(),
                            Err(_) => false,
                        };
                        if !ok {
                            errors += 1;
                        }
                        lat.push(t0.elapsed().as_micros() as u32);
                    }
                    (lat, errors)
                }
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks.into_iter().map(tokio::spawn).collect::<Vec<_>>() {
            out.push(t.await.unwrap());
        }
        out
    });
    let elapsed = start.elapsed().as_secs_f64();
    let server_cpu = servers_cpu() - server_cpu0;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu0;
    let errors: u64 = results.iter().map(|r| r.1).sum();
    let mut l: Vec<u32> = results.into_iter().flat_map(|r| r.0).collect();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let m = Measured {
        ok: l.len() as u64 - errors,
        rate: l.len() as f64 / elapsed,
        p99_ms: pct(0.99),
        errors,
    };
    println!(
        "{name:<26} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ({} req, {} errors; CPU: server {:.0}% = {:.2} ms per request, load generator {:.0}%)",
        m.rate,
        pct(0.50),
        m.p99_ms,
        l.len(),
        errors,
        100.0 * server_cpu / elapsed,
        1000.0 * server_cpu / (l.len().max(1) as f64),
        100.0 * own_cpu / elapsed
    );
    m
}

/// What one workload run measured.
struct Measured {
    ok: u64,
    rate: f64,
    p99_ms: f64,
    errors: u64,
}

fn main() {
    let a = args();
    let garage = a.s3.then(Garage::start);
    let (single, cluster) = if a.replicas > 1 {
        assert!(garage.is_none(), "--s3 runs one node");
        (None, Some(Consortium::up(a.replicas)))
    } else if let Some(g) = &garage {
        let url = format!("s3://{}/bench", g.bucket);
        let env = g.env();
        (
            Some(TestServer::start_with_env(&["--object-store", &url], &env)),
            None,
        )
    } else {
        (Some(TestServer::start()), None)
    };
    if garage.is_some() {
        println!("sealed versions in S3 (a local Garage), not in RocksDB");
    }
    let (bases, pids, data): (Vec<String>, Vec<u32>, Vec<std::path::PathBuf>) =
        match (&single, &cluster) {
            (Some(s), _) => (
                vec![s.base.clone()],
                vec![s.pid().expect("server pid")],
                vec![s.data.clone()],
            ),
            (_, Some(c)) => (
                (0..c.n)
                    .map(|i| c.url(i, "").trim_end_matches('/').to_string())
                    .collect(),
                c.pids(),
                (0..c.n)
                    .map(|i| c.dir.path().join(format!("node-{i}")))
                    .collect(),
            ),
            _ => unreachable!(),
        };
    let targets = if a.spread { bases.len() } else { 1 };
    let tokens: Vec<(String, String)> = match (&single, &cluster) {
        (Some(s), _) => vec![(s.base.clone(), s.token.clone())],
        (_, Some(c)) => bases
            .iter()
            .cloned()
            .zip(c.tokens.iter().cloned())
            .collect(),
        _ => unreachable!(),
    };
    let tokens = &tokens[..];
    let pid = &pids[..];
    let loader = Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    println!(
        "fhirmament bench: {} patients, concurrency {}, {} s per workload, {} replica(s){}, server pids {pids:?}",
        a.patients, a.concurrency, a.seconds, bases.len(),
        if targets > 1 { " (requests spread over all)" } else { "" }
    );

    // Load with 100-entry transactions from 4 threads.
    let t0 = Instant::now();
    let ids = Mutex::new(Vec::<String>::with_capacity(a.patients));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (loader, base, ids, a, token) = (&loader, &bases[0], &ids, &a, &tokens[0].1);
            scope.spawn(move || {
                let mut rng = Rng(42 + t as u64);
                let mut made = 0;
                while made < a.patients / 4 {
                    let n = 100.min(a.patients / 4 - made);
                    let entries: Vec<Value> = (0..n).map(|_| json!({"resource": synthetic_patient(&mut rng), "request": {"method": "POST", "url": "Patient"}})).collect();
                    let r: Value = loader.post(format!("{base}/")).header("Authorization", format!("Bearer {token}")).header("Content-Type", FHIR_JSON).body(serde_json::to_vec(&json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})).unwrap()).send().expect("load").json().expect("load transaction");
                    let new: Vec<String> = r["entry"].as_array().expect("entries").iter().map(|e| e["resource"]["id"].as_str().unwrap().to_string()).collect();
                    ids.lock().unwrap().extend(new);
                    made += n;
                }
            });
        }
    });
    let ids = ids.into_inner().unwrap();
    println!(
        "loaded {} patients in {:.1} s",
        ids.len(),
        t0.elapsed().as_secs_f64()
    );

    // A replica applies a block moments after the one that answered; let reads elsewhere see it.
    std::thread::sleep(Duration::from_millis(500));
    let base_of = |rng: &mut Rng| bases[rng.below(targets)].clone();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || name.contains(only.as_str());
    use reqwest::Method;
    if run("read") {
        measure("read Patient/{id}", &a, pid, tokens, |rng| {
            (
                Method::GET,
                format!("{}/Patient/{}", base_of(rng), ids[rng.below(ids.len())]),
                None,
                200,
            )
        });
    }
    if run("family") {
        measure("search family=", &a, pid, tokens, |rng| {
            (
                Method::GET,
                format!(
                    "{}/Patient?family={}&_count=10",
                    base_of(rng),
                    family(rng.below(FAMILIES))
                ),
                None,
                200,
            )
        });
    }
    if run("birthdate") {
        measure("search birthdate month", &a, pid, tokens, |rng| {
            let (y, m) = (1930 + rng.below(90), 1 + rng.below(12));
            (Method::GET, format!("{}/Patient?birthdate=ge{y:04}-{m:02}-01&birthdate=le{y:04}-{m:02}-28&_count=10", base_of(rng)), None, 200)
        });
    }
    // Searches that read what every Patient has stored for a parameter (a substring; whether
    // it has one at all): not in the default run; BENCH_ONLY=scan runs them.
    let asked = |name: &str| !only.is_empty() && name.contains(only.as_str());
    if asked("scan name:contains") {
        measure("scan name:contains", &a, pid, tokens, |rng| {
            let f = family(rng.below(FAMILIES));
            (
                Method::GET,
                format!(
                    "{}/Patient?name:contains={}&_count=10",
                    base_of(rng),
                    &f[2..6]
                ),
                None,
                200,
            )
        });
    }
    if asked("scan gender:missing") {
        measure("scan gender:missing", &a, pid, tokens, |rng| {
            (
                Method::GET,
                format!("{}/Patient?gender:missing=false&_count=10", base_of(rng)),
                None,
                200,
            )
        });
    }
    // How many ledger blocks the primary cut for a write workload: each block costs every
    // replica about 2n signature checks and a few fsyncs, whatever it carries.
    let applied_seq = || -> u64 {
        let v: Value = loader
            .get(format!("{}/_ledger", bases[0]))
            .header("Authorization", format!("Bearer {}", tokens[0].1))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["appliedSequence"].as_u64().unwrap_or(0)
    };
    let create = |a: &Args, name: &str| -> Measured {
        let before = applied_seq();
        let m = measure(name, a, pid, tokens, |rng| {
            (
                Method::POST,
                format!("{}/Patient", base_of(rng)),
                Some(serde_json::to_vec(&synthetic_patient(rng)).unwrap()),
                201,
            )
        });
        let blocks = applied_seq().saturating_sub(before).max(1);
        println!(
            "  ledger: {blocks} blocks for {} creates ({:.1} entries per block)",
            m.ok,
            m.ok as f64 / blocks as f64
        );
        m
    };
    if run("create") {
        match a.p99_target_ms {
            None => {
                create(&a, "create Patient");
            }
            Some(target) => {
                // Capacity at a latency objective: raise the clients until p99 exceeds it.
                let mut best: Option<(usize, Measured)> = None;
                for clients in [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256] {
                    let step = Args {
                        concurrency: clients,
                        ..a.clone()
                    };
                    let m = create(&step, &format!("create Patient, {clients} clients"));
                    if m.p99_ms > target || m.errors > 0 {
                        break;
                    }
                    if best.as_ref().is_none_or(|(_, b)| m.rate > b.rate) {
                        best = Some((clients, m));
                    }
                }
                match best {
                    Some((clients, b)) => println!(
                        "most creates/s with p99 <= {target} ms: {:.0} ({clients} clients, p99 {:.1} ms)",
                        b.rate, b.p99_ms
                    ),
                    None => println!("no concurrency kept creates within p99 {target} ms"),
                }
            }
        }
    }
    if run("transaction") {
        measure("transaction (10 entries)", &a, pid, tokens, |rng| {
            let entries: Vec<Value> = (0..10).map(|_| json!({"resource": synthetic_patient(rng), "request": {"method": "POST", "url": "Patient"}})).collect();
            let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            (
                Method::POST,
                format!("{}/", base_of(rng)),
                Some(serde_json::to_vec(&b).unwrap()),
                200,
            )
        });
    }

    let stored: u64 = bases
        .iter()
        .zip(tokens)
        .map(|(b, (_, t))| {
            let v: Value = loader
                .get(format!("{b}/Patient?_summary=count"))
                .header("Authorization", format!("Bearer {t}"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            v["total"].as_u64().unwrap_or(0)
        })
        .sum::<u64>()
        .max(1);
    std::thread::sleep(Duration::from_secs(1));
    let disk: u64 = data.iter().map(|d| dir_bytes(d)).sum();
    let rss: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    println!("server RSS {:.1} MiB (all replicas); {} resources stored (held, summed over organizations); {:.0} bytes on disk per resource (all replicas: ledger, WAL and memtables included)", rss as f64 / 1024.0, stored, disk as f64 / stored as f64);
}

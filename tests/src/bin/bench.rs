//! Load benchmark: starts the fhirmament binary of the same profile on a temporary data
//! directory, loads N Patients, then measures each workload at a fixed concurrency and prints
//! req/s, p50 and p99, the server's RSS and bytes on disk per stored resource.
//!
//! cargo run --release -p fhirmament-e2e --bin bench -- --patients 100000 --concurrency 32 --seconds 10

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fhirmament_e2e::*;

const FAMILIES: usize = 2000;

struct Args {
    patients: usize,
    concurrency: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args { patients: 100_000, concurrency: 32, seconds: 10 };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        let next = v.get(i + 1).and_then(|s| s.parse().ok());
        match v[i].as_str() {
            "--patients" => a.patients = next.expect("--patients N") as usize,
            "--concurrency" => a.concurrency = next.expect("--concurrency N") as usize,
            "--seconds" => a.seconds = next.expect("--seconds N"),
            other => panic!("unknown argument {other}; use --patients N --concurrency N --seconds N"),
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
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok())))
        .unwrap_or(0)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(Result::ok).map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum())
        .unwrap_or(0)
}

/// Run `op` from `concurrency` threads for `seconds`; print throughput and latency percentiles.
fn measure(name: &str, a: &Args, op: impl Fn(&Client, &mut Rng) -> bool + Sync) {
    let stop = AtomicBool::new(false);
    let errors = AtomicU64::new(0);
    let latencies = Mutex::new(Vec::<u32>::new());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..a.concurrency {
            let (stop, errors, latencies, op) = (&stop, &errors, &latencies, &op);
            scope.spawn(move || {
                let client = Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(1).build().unwrap();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1) * 0x1000_0001);
                let mut mine = Vec::with_capacity(100_000);
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    if !op(&client, &mut rng) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    mine.push(t0.elapsed().as_micros() as u32);
                }
                latencies.lock().unwrap().extend(mine);
            });
        }
        std::thread::sleep(Duration::from_secs(a.seconds));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = latencies.into_inner().unwrap();
    l.sort_unstable();
    let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "{name:<28} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} requests, {} errors)",
        l.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        l.len(),
        errors.load(Ordering::Relaxed)
    );
}

fn main() {
    let a = args();
    let s = TestServer::start();
    let pid = s.pid().expect("server pid");
    println!("fhirmament bench: {} patients, concurrency {}, {} s per workload, server pid {pid}", a.patients, a.concurrency, a.seconds);

    // Load with 100-entry transactions from 4 threads.
    let t0 = Instant::now();
    let ids = Mutex::new(Vec::<String>::with_capacity(a.patients));
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (s, ids, a) = (&s, &ids, &a);
            scope.spawn(move || {
                let mut rng = Rng(42 + t as u64);
                let mut made = 0;
                while made < a.patients / 4 {
                    let n = 100.min(a.patients / 4 - made);
                    let entries: Vec<Value> = (0..n).map(|_| json!({"resource": synthetic_patient(&mut rng), "request": {"method": "POST", "url": "Patient"}})).collect();
                    let r: Value = s.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})).json().expect("load transaction");
                    let new: Vec<String> = r["entry"].as_array().expect("entries").iter().map(|e| e["resource"]["id"].as_str().unwrap().to_string()).collect();
                    ids.lock().unwrap().extend(new);
                    made += n;
                }
            });
        }
    });
    let ids = ids.into_inner().unwrap();
    println!("loaded {} patients in {:.1} s", ids.len(), t0.elapsed().as_secs_f64());

    let base = s.base.clone();
    let body = |v: &Value| serde_json::to_vec(v).unwrap();
    measure("read Patient/{id}", &a, |c, rng| {
        let id = &ids[rng.below(ids.len())];
        c.get(format!("{base}/Patient/{id}")).send().map(|r| r.status() == 200 && r.bytes().is_ok()).unwrap_or(false)
    });
    measure("search family=", &a, |c, rng| {
        c.get(format!("{base}/Patient?family={}&_count=10", family(rng.below(FAMILIES)))).send().map(|r| r.status() == 200 && r.bytes().is_ok()).unwrap_or(false)
    });
    measure("search birthdate month", &a, |c, rng| {
        let (y, m) = (1930 + rng.below(90), 1 + rng.below(12));
        c.get(format!("{base}/Patient?birthdate=ge{y:04}-{m:02}-01&birthdate=le{y:04}-{m:02}-28&_count=10")).send().map(|r| r.status() == 200 && r.bytes().is_ok()).unwrap_or(false)
    });
    measure("create Patient", &a, |c, rng| {
        c.post(format!("{base}/Patient")).header("Content-Type", FHIR_JSON).body(body(&synthetic_patient(rng))).send().map(|r| r.status() == 201 && r.bytes().is_ok()).unwrap_or(false)
    });
    measure("transaction (10 entries)", &a, |c, rng| {
        let entries: Vec<Value> = (0..10).map(|_| json!({"resource": synthetic_patient(rng), "request": {"method": "POST", "url": "Patient"}})).collect();
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        c.post(format!("{base}/")).header("Content-Type", FHIR_JSON).body(body(&b)).send().map(|r| r.status() == 200 && r.bytes().is_ok()).unwrap_or(false)
    });

    let (_, count) = s.get_json("Patient?_summary=count");
    let stored = count["total"].as_u64().unwrap_or(1).max(1);
    std::thread::sleep(Duration::from_secs(1));
    let disk = dir_bytes(&s.data);
    println!("server RSS {:.1} MiB; {} resources stored; {:.0} bytes on disk per resource (WAL and memtables included)", rss_kib(pid) as f64 / 1024.0, stored, disk as f64 / stored as f64);
}

//! Harness for end-to-end tests: start the real `fhirmament` binary on a free loopback port
//! with its own data directory, and talk HTTP to it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use reqwest::blocking::{Client, Response};
pub use serde_json::{json, Value};

pub const FHIR_JSON: &str = "application/fhir+json";

/// Path of the `fhirmament` binary, built (incrementally, usually a no-op) once per test process;
/// `FHIRMAMENT_BIN` names a binary to use as it is instead (to compare two builds with `bench`).
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("FHIRMAMENT_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.exists(),
                "FHIRMAMENT_BIN: no binary at {}",
                bin.display()
            );
            return bin;
        }
        // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/fhirmament
        let exe = std::env::current_exe().expect("test executable path");
        let mut profile_dir = exe.parent().expect("exe dir");
        if profile_dir.ends_with("deps") {
            profile_dir = profile_dir.parent().expect("target/<profile>");
        }
        let target_dir = profile_dir.parent().expect("target dir");
        let mut args = vec![
            "build",
            "--quiet",
            "-p",
            "fhirmament",
            "--bin",
            "fhirmament",
        ];
        if profile_dir.ends_with("release") {
            args.push("--release");
        }
        // Build into the target directory this test binary came from, whatever the environment says.
        let status = Command::new(env!("CARGO"))
            .args(&args)
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the fhirmament binary failed");
        let bin = profile_dir.join("fhirmament");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Mint an access token with the server's own key (`fhirmament token`), as an operator would.
pub fn mint_token(data: &Path, base: &str, scope: &str, extra: &[&str]) -> String {
    stdout_of(
        Command::new(binary())
            .arg("token")
            .arg("--data-dir")
            .arg(data)
            .args(["--base-url", base, "--scope", scope])
            .args(extra),
    )
}

/// Run `python3` with these arguments; its trimmed stdout (the test fails if it fails).
pub fn python3(args: &[&str]) -> String {
    stdout_of(Command::new("python3").args(args))
}

/// Run a command that must succeed; its trimmed stdout.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Run a short Python snippet with arguments; its trimmed stdout.
pub fn python(code: &str, args: &[&str]) -> String {
    python3(&[&["-c", code], args].concat())
}

/// A blocking HTTP client that sends this bearer token with every request.
pub fn client_with_token(token: &str) -> Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .expect("client")
}

pub struct TestServer {
    pub base: String,
    /// A `system/*.cruds` token for this server (what `client` sends).
    pub token: String,
    pub port: u16,
    pub data: PathBuf,
    child: std::sync::Mutex<Option<Child>>,
    _dir: Option<tempfile::TempDir>,
    pub client: Client,
    extra_args: Vec<String>,
    /// Environment the process gets beyond the test's own.
    envs: Vec<(String, String)>,
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> TestServer {
        Self::start_with_env(extra_args, &[])
    }

    pub fn start_with_env(extra_args: &[&str], envs: &[(&str, String)]) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let mut s = TestServer {
            base: String::new(),
            token: String::new(),
            port: 0,
            data,
            child: std::sync::Mutex::new(None),
            _dir: Some(dir),
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        s.launch();
        s
    }

    /// Another server process over `other`'s data directory (stopped first), with other flags.
    pub fn start_over(other: &TestServer, extra_args: &[&str]) -> TestServer {
        other.kill9();
        let mut s = TestServer {
            base: String::new(),
            token: String::new(),
            port: 0,
            data: other.data.clone(),
            child: std::sync::Mutex::new(None),
            _dir: None,
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            envs: other.envs.clone(),
        };
        s.launch();
        s
    }

    /// (Re)start the process on a new port over the same data directory.
    pub fn launch(&mut self) {
        self.port = free_port();
        self.base = format!("http://127.0.0.1:{}/fhir", self.port);
        let child = Command::new(binary())
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.extra_args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("FHIRMAMENT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn fhirmament");
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = self.client.get(format!("{}/metadata", self.base)).send() {
                if r.status().is_success() {
                    self.token = mint_token(&self.data, &self.base, "system/*.cruds", &[]);
                    self.client = client_with_token(&self.token);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("fhirmament did not answer /metadata within 30 s");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().expect("GET")
    }

    pub fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.get(path);
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Response {
        let mut req = self
            .client
            .request(method.parse().expect("method"), self.url(path))
            .header("Content-Type", FHIR_JSON)
            .body(serde_json::to_vec(body).expect("json"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().expect("request")
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.send("POST", path, body, &[])
    }

    pub fn put(&self, path: &str, body: &Value) -> Response {
        self.send("PUT", path, body, &[])
    }

    /// Create and return the stored resource.
    pub fn create(&self, body: &Value) -> Value {
        let t = body["resourceType"].as_str().expect("resourceType");
        let r = self.post(t, body);
        assert_eq!(r.status().as_u16(), 201, "create {t}");
        r.json().expect("json")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Every entry's resource in a Bundle.
pub fn resources(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|x| x.get("resource").cloned())
                .collect()
        })
        .unwrap_or_default()
}

/// Ids of the `match` entries in a searchset.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["search"]["mode"] == "match")
                .filter_map(|x| x["resource"]["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

pub fn patient(family: &str, given: &str, birth: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": birth})
}

/// Assert an OperationOutcome body with at least one error issue.
pub fn assert_outcome(r: Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with(FHIR_JSON), "content type {ct}");
    let body: Value = r.json().expect("json body");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert!(
        body["issue"].as_array().is_some_and(|i| !i.is_empty()),
        "{body}"
    );
    body
}

/// `n` free consecutive loopback ports. Runs handed out in this process never overlap (tests
/// run in parallel threads), each is checked free when handed out, and all lie below the
/// ephemeral range so no outgoing connection can take one before its replica binds it.
pub fn free_port_run(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        // Below Linux's ephemeral range (32768+), where outgoing connections take their ports.
        20_000 + (std::process::id() % 1_000) as u16 * 10,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(n, Ordering::SeqCst);
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// A local consortium started with the documented `fhirmament cluster up`, stopped with
/// `cluster down` when dropped.
pub struct Consortium {
    /// A `system/*.cruds` token per replica (each organization signs its own).
    pub tokens: Vec<String>,
    pub dir: tempfile::TempDir,
    pub n: usize,
    pub http_port: u16,
    pub peer_port: u16,
    pub client: Client,
    /// `FHIRMAMENT_*` settings every replica starts with.
    env: Vec<(String, String)>,
}

impl Consortium {
    pub fn up(n: usize) -> Consortium {
        Self::up_with_env(n, &[])
    }

    /// A consortium whose replicas start with these `FHIRMAMENT_*` settings.
    pub fn up_with_env(n: usize, env: &[(&str, &str)]) -> Consortium {
        let dir = tempfile::tempdir().expect("tempdir");
        let http_port = free_port_run(n as u16);
        let peer_port = free_port_run(n as u16);
        let mut c = Consortium {
            tokens: Vec::new(),
            dir,
            n,
            http_port,
            peer_port,
            client: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        c.cluster("up");
        c.tokens = (0..n)
            .map(|i| {
                let data = c.dir.path().join(format!("node-{i}"));
                mint_token(
                    &data,
                    c.url(i, "").trim_end_matches('/'),
                    "system/*.cruds",
                    &[],
                )
            })
            .collect();
        c
    }

    /// `Authorization` header value for replica i.
    pub fn auth(&self, replica: usize) -> String {
        format!("Bearer {}", self.tokens[replica])
    }

    /// Run `fhirmament cluster <cmd>` for this consortium.
    pub fn cluster(&self, cmd: &str) -> std::process::Output {
        let out = Command::new(binary())
            .args(["cluster", cmd, "--replicas", &self.n.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--http-port", &self.http_port.to_string()])
            .args(["--peer-port", &self.peer_port.to_string()])
            .env("FHIRMAMENT_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run fhirmament cluster");
        assert!(
            out.status.success(),
            "cluster {cmd}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn url(&self, replica: usize, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/fhir/{}",
            self.http_port as usize + replica,
            path.trim_start_matches('/')
        )
    }

    pub fn get_json(&self, replica: usize, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(self.url(replica, path))
            .header("Authorization", self.auth(replica))
            .send()
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn send(&self, replica: usize, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .request(method.parse().expect("method"), self.url(replica, path))
            .header("Authorization", self.auth(replica))
            .header("Content-Type", FHIR_JSON)
            .body(serde_json::to_vec(body).expect("json"))
            .send()
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// GET until `done` holds (a replica applies a block a few milliseconds after the one that
    /// acknowledged the write); the last answer after 10 s otherwise.
    pub fn get_when(
        &self,
        replica: usize,
        path: &str,
        done: impl Fn(u16, &Value) -> bool,
    ) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, v) = self.get_json(replica, path);
            if done(s, &v) || Instant::now() > deadline {
                return (s, v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The replicas' process ids, in replica order.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.path().join("pids"))
            .expect("pids file")
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect()
    }

    pub fn signal(&self, replica: usize, sig: &str) {
        let pid = self.pids()[replica];
        let ok = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Replica i's data directory (`fhirmament token --data-dir` mints tokens for it).
    pub fn data(&self, replica: usize) -> PathBuf {
        self.dir.path().join(format!("node-{replica}"))
    }

    pub fn genesis(&self) -> PathBuf {
        self.dir.path().join("genesis.json")
    }
}

impl Drop for Consortium {
    fn drop(&mut self) {
        let _ = Command::new(binary())
            .args(["cluster", "down"])
            .arg("--dir")
            .arg(self.dir.path())
            .output();
    }
}

/// A single-node Garage (an S3-compatible object store) on free loopback ports, with one
/// bucket and one access key; stopped when dropped. The binary comes from `GARAGE_BIN`, else
/// `$HOME/.cache/garage/bin/garage` (where `.ci/run` installs it).
pub struct Garage {
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    pub data: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Garage {
    pub fn binary() -> PathBuf {
        std::env::var_os("GARAGE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/garage/bin/garage")
            })
    }

    pub fn start() -> Garage {
        let bin = Self::binary();
        assert!(
            bin.exists(),
            "no Garage at {} (set GARAGE_BIN, or run .ci/run once to install it)",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (s3, rpc) = (free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let secret: String = (0..64)
            .map(|i| char::from_digit((i * 7 % 16) as u32, 16).unwrap())
            .collect();
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = dir.path().join("meta").display(),
                data = dir.path().join("blocks").display(),
            ),
        )
        .expect("write garage.toml");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn garage");
        let cli = |args: &[&str]| -> String {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let out = Command::new(&bin)
                    .arg("-c")
                    .arg(&config)
                    .args(args)
                    .output()
                    .expect("run garage");
                if out.status.success() {
                    return String::from_utf8_lossy(&out.stdout).into_owned();
                }
                assert!(
                    Instant::now() < deadline,
                    "garage {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let node = cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().expect("node id").to_string();
        cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        cli(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = (
            "GK0123456789abcdef01234567".to_string(),
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".to_string(),
        );
        cli(&[
            "key",
            "import",
            "--yes",
            "-n",
            "fhirmament",
            &key_id,
            &secret,
        ]);
        cli(&["bucket", "create", "fhirmament"]);
        cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            "fhirmament",
            "--key",
            "fhirmament",
        ]);
        Garage {
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "fhirmament".into(),
            key_id,
            secret,
            data: dir.path().to_path_buf(),
            child,
            _dir: dir,
        }
    }

    /// The environment `--object-store s3://…` reads its endpoint and credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", "garage".into()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The Kubernetes manifests in `k8s/`: valid against the Kubernetes 1.31 schemas (PyPI
//! `kubernetes-validate`, strict), and every command, flag and probe path they use exists in
//! the binary they run.

use std::path::PathBuf;
use std::process::Command;

use fhirmament_e2e::*;

fn k8s(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../k8s")
        .join(file)
}

const MANIFESTS: [&str; 4] = [
    "namespace.yaml",
    "services.yaml",
    "policy.yaml",
    "replicas.yaml",
];

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.31.0"])
        .args(MANIFESTS.map(k8s))
        .output()
        .expect("python3");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubernetes-validate (install: pip install kubernetes-validate):\n{text}"
    );
    // Every resource was checked: 1 namespace, 2 services, PDB + NetworkPolicy, 4 StatefulSets.
    assert_eq!(text.matches(" passed for resource ").count(), 9, "{text}");
}

/// The list items under each `args:` key of a manifest.
fn container_args(yaml: &str) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "args:" {
            continue;
        }
        let mut args = Vec::new();
        while let Some(next) = lines.peek() {
            let t = next.trim();
            let Some(item) = t.strip_prefix("- ") else {
                break;
            };
            args.push(item.trim_matches('"').to_string());
            lines.next();
        }
        all.push(args);
    }
    all
}

fn help(args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .arg("--help")
        .output()
        .expect("run fhirmament");
    assert!(out.status.success(), "fhirmament {args:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_commands_flags_and_probes_the_manifests_use_exist() {
    let yaml = std::fs::read_to_string(k8s("replicas.yaml")).unwrap();
    let sets = container_args(&yaml);
    assert_eq!(sets.len(), 4, "one container per organization");
    let serve_help = help(&["serve"]);
    for args in &sets {
        assert_eq!(args[0], "serve");
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                serve_help.contains(&format!("{flag} ")),
                "fhirmament serve has no {flag}"
            );
        }
    }
    assert!(yaml.contains("command: [\"fhirmament\"]"));
    let bootstrap = std::fs::read_to_string(k8s("bootstrap.sh")).unwrap();
    let genesis_help = help(&["genesis"]);
    let line = bootstrap
        .lines()
        .skip_while(|l| !l.starts_with("fhirmament genesis"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    for flag in line.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(
            genesis_help.contains(&format!("{flag} ")),
            "fhirmament genesis has no {flag}"
        );
    }
    // The probe paths answer on a running server.
    let s = TestServer::start();
    for path in ["/health/live", "/health/ready"] {
        assert!(yaml.contains(&format!("path: {path}")));
        let r = s
            .client
            .get(format!("http://127.0.0.1:{}{path}", s.port))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
}

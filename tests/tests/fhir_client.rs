//! The server driven by a FHIR client nobody here wrote: SMART's Python `fhirclient` 4.x with
//! its R4 models (`.ci/run` installs it from PyPI).

use fhirmament_e2e::*;

#[test]
fn python_fhirclient_creates_reads_updates_searches_and_deletes() {
    let s = TestServer::start();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fhirclient_roundtrip.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&s.base)
        .env("FHIRMAMENT_TOKEN", &s.token)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fhirclient script failed (is `pip install fhirclient` done?):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("fhirclient round trip: ok"), "{stdout}");
}

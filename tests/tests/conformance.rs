//! The conformance suite (`conformance/`, Inferno's SMART, (g)(10) and US Core checks plus our
//! own) against a freshly started server, and the suite's own tests against non-conformant
//! fakes. The JUnit report goes to `<target dir>/conformance-junit.xml`.

use std::process::Command;

use fhirmament_e2e::binary;

fn conformance_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("conformance")
}

#[test]
fn the_conformance_suite_passes_against_a_fresh_server() {
    let bin = binary();
    let junit = bin
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("conformance-junit.xml");
    let out = Command::new(conformance_dir().join("run-local.sh"))
        .arg(bin)
        .arg(&junit)
        .output()
        .expect("run conformance/run-local.sh");
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "conformance checks failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains(" 0 failed, 0 skipped"), "{report}");
    let xml = std::fs::read_to_string(&junit).expect("JUnit report");
    assert!(xml.contains("smart_stu2-smart_token_exchange_stu2"));
}

/// Through a proxy that breaks seven behaviours (plain PKCE offered and accepted, no
/// `Pragma: no-cache` on token responses, `aud` ignored, revocation answered without revoking,
/// resource-type scopes widened, `$verify` receipts changed after the proof), exactly the checks
/// about those behaviours fail, and every other check still passes.
#[test]
fn exactly_the_checks_about_a_broken_behaviour_fail() {
    let out = Command::new(conformance_dir().join("run-local.sh"))
        .arg(binary())
        .env(
            "CONFORMANCE_MUTATE",
            "plain,pragma,plain-pkce,aud,revoke,scopes,receipt",
        )
        .env(
            "CONFORMANCE_EXPECT_FAIL",
            [
                "smart_stu2-well_known_capabilities_stu2",
                "smart_stu2-smart_token_response_headers",
                "g10-plain_pkce_refused",
                "g10-invalid_aud",
                "g10-token_revocation",
                "g10-restricted_resource_type_access",
                "fhirmament-ledger_verify",
            ]
            .join(","),
        )
        .output()
        .expect("run conformance/run-local.sh");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_suites_checks_fail_against_non_conformant_fakes() {
    let out = Command::new("python3")
        .arg("test_suite.py")
        .current_dir(conformance_dir())
        .output()
        .expect("run conformance/test_suite.py");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

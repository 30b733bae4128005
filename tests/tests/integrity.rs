//! Tamper detection end to end: bytes changed in the data directory behind the server's back
//! are never served, and `$verify` says so; receipts of intact records verify offline.

use fhirmament_e2e::*;

fn param<'a>(receipt: &'a Value, name: &str) -> &'a Value {
    receipt["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Replace `from` by `to` (same length) in the stored bytes of one version, with the server
/// stopped, as an attacker with access to the disk would.
fn tamper(data: &std::path::Path, rtype: &str, id: &str, version: u64, from: &str, to: &str) {
    use rocksdb::{ColumnFamilyDescriptor, Options, DB};
    let cfs = fhirmament::store::COLUMN_FAMILIES
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    let db = DB::open_cf_descriptors(&Options::default(), data, cfs).expect("open the store");
    let cf = db.cf_handle(fhirmament::store::CF_VERSIONS).unwrap();
    let key = {
        let mut k = format!("{rtype}\0{id}\0").into_bytes();
        k.extend_from_slice(&version.to_be_bytes());
        k
    };
    let mut raw = db.get_cf(cf, &key).unwrap().expect("stored version");
    let at = raw
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("text in the stored bytes");
    raw[at..at + to.len()].copy_from_slice(to.as_bytes());
    db.put_cf(cf, &key, &raw).unwrap();
    db.flush_wal(true).unwrap();
}

#[test]
fn a_tampered_record_fails_closed_and_verify_reports_it() {
    let mut s = TestServer::start();
    let p = s.create(&patient("Original", "Ada", "1960-06-06"));
    let id = p["id"].as_str().unwrap().to_string();
    let other = s.create(&patient("Untouched", "Bob", "1961-07-07"));
    let (status, receipt) = s.get_json(&format!("Patient/{id}/_history/1/$verify"));
    assert_eq!(status, 200);
    assert_eq!(param(&receipt, "result")["valueBoolean"], true);
    assert_eq!(param(&receipt, "resource")["resource"], p);

    s.kill9();
    tamper(&s.data, "Patient", &id, 1, "Original", "Tampered");
    s.launch();

    for path in [
        format!("Patient/{id}"),
        format!("Patient/{id}/_history/1"),
        format!("Patient/{id}/_history"),
    ] {
        let r = s.get(&path);
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        assert_eq!(status, 500, "{path}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
        assert!(
            body.to_string()
                .contains("does not match its ledger commitment"),
            "{body}"
        );
        assert!(
            !body.to_string().contains("Tampered"),
            "the tampered bytes are not served: {body}"
        );
    }
    let (status, report) = s.get_json(&format!("Patient/{id}/_history/1/$verify"));
    assert_eq!(status, 200);
    assert_eq!(param(&report, "result")["valueBoolean"], false, "{report}");
    assert!(param(&report, "resource").is_null());
    assert!(!report.to_string().contains("Tampered"));
    // The rest of the store is unaffected.
    let (status, intact) = s.get_json(&format!("Patient/{}", other["id"].as_str().unwrap()));
    assert_eq!((status, intact), (200, other));
}

#[test]
fn receipts_verify_offline_and_fail_on_any_flipped_bit() {
    let s = TestServer::start();
    let p = s.create(&patient("Receipt", "Cy", "1970-01-01"));
    let id = p["id"].as_str().unwrap();
    let (_, receipt) = s.get_json(&format!("Patient/{id}/$verify"));
    let genesis = s.data.join("ledger/genesis.json");
    let dir = tempfile::tempdir().unwrap();
    let check = |r: &Value| {
        let path = dir.path().join("r.json");
        std::fs::write(&path, serde_json::to_vec(r).unwrap()).unwrap();
        std::process::Command::new(binary())
            .arg("verify")
            .arg(&path)
            .arg("--genesis")
            .arg(&genesis)
            .output()
            .unwrap()
    };
    let ok = check(&receipt);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("receipt verified"));
    // Flip one bit in each base64 part: the chain breaks every time.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    for name in ["entry", "salt", "commitCertificate"] {
        let mut r = receipt.clone();
        let p = r["parameter"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["name"] == name)
            .unwrap();
        let mut bytes = b64
            .decode(p["valueBase64Binary"].as_str().unwrap())
            .unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        p["valueBase64Binary"] = json!(b64.encode(bytes));
        let out = check(&r);
        assert!(
            !out.status.success(),
            "a flipped bit in {name} went unnoticed"
        );
    }
    let mut r = receipt.clone();
    let res = r["parameter"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == "resource")
        .unwrap();
    res["resource"]["birthDate"] = json!("1970-01-02");
    assert!(
        !check(&r).status.success(),
        "a changed resource went unnoticed"
    );
}

//! Tamper detection end to end: bytes changed in the data directory behind the server's back
//! are never served, and `$verify` says so; receipts of intact records verify offline; records
//! are sealed at rest under a key-encryption key kept outside the data directory.

use base64::Engine as _;
use fhirmament_e2e::*;

fn param<'a>(receipt: &'a Value, name: &str) -> &'a Value {
    receipt["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn open_store(data: &std::path::Path) -> rocksdb::DB {
    use rocksdb::{ColumnFamilyDescriptor, Options, DB};
    let cfs = fhirmament::store::COLUMN_FAMILIES
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    DB::open_cf_descriptors(&Options::default(), data, cfs).expect("open the store")
}

/// The name (SHA-256) of the object holding a version's sealed bytes.
fn object_of(db: &rocksdb::DB, rtype: &str, id: &str, version: u64) -> Vec<u8> {
    let cf = db.cf_handle(fhirmament::store::CF_VERSIONS).unwrap();
    let mut key = format!("{rtype}\0{id}\0").into_bytes();
    key.extend_from_slice(&version.to_be_bytes());
    let entry = db.get_cf(cf, &key).unwrap().expect("stored version");
    assert_eq!(entry.len(), 17 + 32, "the entry names its sealed bytes");
    entry[17..].to_vec()
}

/// Flip one byte of the stored (encrypted) bytes of a version, with the server stopped, as an
/// attacker with access to the disk would. Checks first that the text `clear` is not there.
fn tamper(data: &std::path::Path, rtype: &str, id: &str, version: u64, clear: &str) {
    let db = open_store(data);
    let name = object_of(&db, rtype, id, version);
    let cf = db.cf_handle(fhirmament::store::CF_OBJECTS).unwrap();
    let mut raw = db.get_cf(cf, &name).unwrap().expect("stored object");
    assert!(
        !raw.windows(clear.len()).any(|w| w == clear.as_bytes()),
        "the record is sealed at rest"
    );
    let at = raw.len() - 4;
    raw[at] = if raw[at] == b'A' { b'B' } else { b'A' };
    db.put_cf(cf, &name, &raw).unwrap();
    db.flush_wal(true).unwrap();
}

/// The `kid` of the KEK each stored data key (and the blinding key) is wrapped under.
fn data_key_kids(data: &std::path::Path) -> Vec<String> {
    let db = open_store(data);
    let keys = db.cf_handle(fhirmament::store::CF_KEYS).unwrap();
    db.iterator_cf(keys, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (_, v) = item.unwrap();
            let text = String::from_utf8(v.to_vec()).unwrap();
            let header: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(text.split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            header["kid"].as_str().unwrap().to_string()
        })
        .collect()
}

/// A new KEK from `fhirmament kek generate`, written to `path`; its `kid`.
fn generate_kek(path: &std::path::Path) -> String {
    let out = std::process::Command::new(binary())
        .args(["kek", "generate", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let jwk: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jwk["kid"].as_str().unwrap().to_string()
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
    tamper(&s.data, "Patient", &id, 1, "Original");
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
        assert!(body.to_string().contains("does not decrypt"), "{body}");
        assert!(
            !body.to_string().contains("Original"),
            "nothing of the record is served: {body}"
        );
    }
    let (status, report) = s.get_json(&format!("Patient/{id}/_history/1/$verify"));
    assert_eq!(status, 200);
    assert_eq!(param(&report, "result")["valueBoolean"], false, "{report}");
    assert!(param(&report, "resource").is_null());
    assert!(!report.to_string().contains("Original"));
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

/// Start the binary expecting it to refuse: its exit status and what it said.
fn refused_start(data: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(binary())
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("FHIRMAMENT_LOG", "warn")
        .output()
        .expect("run fhirmament");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn records_are_sealed_at_rest_and_a_wrong_or_missing_kek_is_refused() {
    let mut s = TestServer::start();
    let mut p = patient("Zyxwvutsr", "Quentin", "1950-05-05");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "MRN-998877"}]);
    p["telecom"] = json!([{"system": "phone", "value": "+1-555-0199"}]);
    let id = s.create(&p)["id"].as_str().unwrap().to_string();
    s.kill9();

    // Every stored version is an object named by its SHA-256: a JWE naming only its data
    // key; no name, identifier or phone number of the record is in it, and the data keys are
    // wrapped.
    {
        let db = open_store(&s.data);
        let named = object_of(&db, "Patient", &id, 1);
        let cf = db.cf_handle(fhirmament::store::CF_OBJECTS).unwrap();
        let mut count = 0;
        for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (name, v) = item.unwrap();
            use sha2::Digest as _;
            assert_eq!(
                &name[..],
                &sha2::Sha256::digest(&v)[..],
                "named by its hash"
            );
            let text = String::from_utf8(v.to_vec()).unwrap();
            assert_eq!(text.split('.').count(), 5, "a compact JWE");
            for clear in [
                "Zyxwvutsr",
                "Quentin",
                "MRN-998877",
                "555-0199",
                "1950-05-05",
            ] {
                assert!(!text.contains(clear), "{clear} in clear at rest");
            }
            count += 1;
        }
        assert!(count >= 2, "the Patient and the AuditEvent of its create");
        assert!(db.get_cf(cf, &named).unwrap().is_some());
        let keys = db.cf_handle(fhirmament::store::CF_KEYS).unwrap();
        let wrapped = db.get_cf(keys, format!("Patient/{id}")).unwrap().unwrap();
        let header = String::from_utf8(wrapped).unwrap();
        let header = header.split('.').next().unwrap().to_string();
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "A256KW");
        assert_eq!(header["enc"], "A256GCM");
    }
    // The KEK lives beside the data directory, never in it.
    let kek = s.data.with_extension("kek");
    assert!(kek.exists());
    assert!(!std::fs::read_dir(&s.data).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("kek")));

    // A wrong KEK: a clear refusal, nothing touched.
    let other = s.data.parent().unwrap().join("other.kek");
    generate_kek(&other);
    let (ok, said) = refused_start(&s.data, &["--kek-file", other.to_str().unwrap()]);
    assert!(!ok);
    assert!(said.contains("does not open the store"), "{said}");
    // No KEK at all: refused too.
    let moved = s.data.parent().unwrap().join("moved.kek");
    std::fs::rename(&kek, &moved).unwrap();
    let (ok, said) = refused_start(&s.data, &[]);
    assert!(!ok);
    assert!(said.contains("no key-encryption key"), "{said}");
    // With its own KEK back, the store is intact.
    std::fs::rename(&moved, &kek).unwrap();
    s.launch();
    let (status, back) = s.get_json(&format!("Patient/{id}"));
    assert_eq!(status, 200);
    assert_eq!(back["name"][0]["family"], "Zyxwvutsr");
}

#[test]
fn rotating_the_kek_rewraps_the_data_keys_and_retires_the_old_one() {
    let s = TestServer::start();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            s.create(&patient(&format!("Rot{i}"), "Kek", "1970-01-01"))["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    s.kill9();
    let old = s.data.with_extension("kek");
    let new = s.data.parent().unwrap().join("new.kek");
    let new_kid = generate_kek(&new);
    let kid = |path: &std::path::Path| -> String {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["kid"].as_str().unwrap().to_string()
    };
    assert_eq!(kid(&new), new_kid);
    let wrapped_under = data_key_kids;
    let before = wrapped_under(&s.data);
    assert!(before.len() >= 5 && before.iter().all(|k| *k == kid(&old)));

    // Start with the new KEK and the previous one: the data keys are re-wrapped (bulk data is
    // not touched), and every record reads as before, including new writes.
    let versions_before = {
        let db = open_store(&s.data);
        let cf = db.cf_handle(fhirmament::store::CF_VERSIONS).unwrap();
        db.iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|i| i.unwrap().1.to_vec())
            .collect::<Vec<_>>()
    };
    let rotating = TestServer::start_over(
        &s,
        &[
            "--kek-file",
            new.to_str().unwrap(),
            "--previous-kek-file",
            old.to_str().unwrap(),
        ],
    );
    for id in &ids {
        assert_eq!(rotating.get_json(&format!("Patient/{id}")).0, 200);
    }
    rotating.create(&patient("After", "Rotation", "1980-01-01"));
    rotating.kill9();
    let after = wrapped_under(&s.data);
    assert!(after.iter().all(|k| *k == kid(&new)), "{after:?}");
    {
        let db = open_store(&s.data);
        let cf = db.cf_handle(fhirmament::store::CF_VERSIONS).unwrap();
        let now: Vec<Vec<u8>> = db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .map(|i| i.unwrap().1.to_vec())
            .collect();
        assert!(
            versions_before.iter().all(|v| now.contains(v)),
            "bulk data is not re-encrypted"
        );
    }
    // The old KEK is retired: the new one alone opens the store; the old one alone does not.
    let (ok, said) = refused_start(&s.data, &["--kek-file", old.to_str().unwrap()]);
    assert!(!ok);
    assert!(said.contains("does not open the store"), "{said}");
    let only_new = TestServer::start_over(&s, &["--kek-file", new.to_str().unwrap()]);
    for id in &ids {
        assert_eq!(only_new.get_json(&format!("Patient/{id}")).0, 200);
    }
}

/// Every RocksDB under `dir` (the record store, the ledger, the authorization server), read
/// through RocksDB so compressed blocks are searched decompressed, plus the raw bytes of every
/// file (write-ahead logs, manifests): the first of `needles` found, and where.
fn find_in_data_dir(dir: &std::path::Path, needles: &[&str]) -> Option<String> {
    let hit = |bytes: &[u8]| -> Option<&str> {
        let lower = bytes.to_ascii_lowercase();
        needles.iter().copied().find(|n| {
            let n = n.to_ascii_lowercase();
            lower.windows(n.len()).any(|w| w == n.as_bytes())
        })
    };
    let mut found = None;
    let mut stack = vec![dir.to_path_buf()];
    let mut databases = 0;
    while let Some(d) = stack.pop() {
        if d.join("CURRENT").exists() {
            databases += 1;
            let opts = rocksdb::Options::default();
            let cfs = rocksdb::DB::list_cf(&opts, &d).unwrap();
            let db = rocksdb::DB::open_cf_for_read_only(&opts, &d, &cfs, false).unwrap();
            for name in &cfs {
                let cf = db.cf_handle(name).unwrap();
                for item in db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
                    let (k, v) = item.unwrap();
                    for part in [&k[..], &v[..]] {
                        if let Some(n) = hit(part) {
                            found.get_or_insert(format!("{n} in {} family {name}", d.display()));
                        }
                    }
                }
            }
        }
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(n) = hit(&std::fs::read(&path).unwrap()) {
                found.get_or_insert(format!("{n} in the file {}", path.display()));
            }
        }
    }
    assert!(databases >= 2, "the record store and the ledger store");
    found
}

#[test]
fn no_name_identifier_telecom_or_address_is_readable_in_the_data_dir_and_search_still_works() {
    let mut s = TestServer::start();
    let mut p = patient("Quixotically", "Wolfgangina", "1951-03-04");
    p["name"][0]["given"] = json!(["Wolfgangina", "Bartholomewsky"]);
    p["identifier"] = json!([{"system": "urn:mrn", "value": "MRN-55501234"}]);
    p["telecom"] = json!([
        {"system": "phone", "value": "+1-555-867-5309"},
        {"system": "email", "value": "wolfgangina@example.org"}
    ]);
    p["address"] = json!([{"line": ["742 Evergreenterrace"], "city": "Springfieldia",
                           "postalCode": "49007"}]);
    let id = s.create(&p)["id"].as_str().unwrap().to_string();
    let other = s.create(&patient("Quixote", "Wolf", "1960-01-01"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    fn search(s: &TestServer, q: &str) -> Vec<String> {
        let (status, bundle) = s.get_json(&format!("Patient?{q}"));
        assert_eq!(status, 200, "{q}: {bundle}");
        let mut v = match_ids(&bundle);
        v.sort();
        v
    }
    let ids = |q: &str| search(&s, q);
    let both = {
        let mut v = vec![id.clone(), other.clone()];
        v.sort();
        v
    };
    // Search answers exactly as before through the blinded terms: prefixes of every length
    // (indexed or not, longer than the longest indexed prefix), case and accents folded.
    assert_eq!(ids("family=Q"), both);
    assert_eq!(ids("family=quixot"), both);
    assert_eq!(ids("family=QUIXOTI"), vec![id.clone()]);
    assert_eq!(ids("family=Quixotically"), vec![id.clone()]);
    assert_eq!(ids("family=Quixoticallyy"), Vec::<String>::new());
    assert_eq!(ids("given=bartholomewsk"), vec![id.clone()]);
    assert_eq!(ids("name=Bartholomewsky"), vec![id.clone()]);
    assert_eq!(ids("family:exact=Quixote"), vec![other.clone()]);
    assert_eq!(ids("family:exact=quixote"), Vec::<String>::new());
    assert_eq!(ids("family:contains=xotic"), vec![id.clone()]);
    assert_eq!(ids("family:contains=xot"), both);
    assert_eq!(ids("address-city=springf"), vec![id.clone()]);
    assert_eq!(ids("address=742%20evergreen"), vec![id.clone()]);
    assert_eq!(
        ids("address=evergreen"),
        Vec::<String>::new(),
        "starts-with, not any word"
    );
    assert_eq!(ids("address-postalcode=49007"), vec![id.clone()]);
    assert_eq!(ids("identifier=MRN-55501234"), vec![id.clone()]);
    assert_eq!(ids("identifier=urn:mrn|MRN-55501234"), vec![id.clone()]);
    assert_eq!(
        ids("identifier=urn:other|MRN-55501234"),
        Vec::<String>::new()
    );
    assert_eq!(ids("identifier=MRN-5550123"), Vec::<String>::new());
    assert_eq!(ids("phone=%2B1-555-867-5309"), vec![id.clone()]);
    assert_eq!(ids("email=wolfgangina@example.org"), vec![id.clone()]);
    assert_eq!(ids("telecom=phone|%2B1-555-867-5309"), vec![id.clone()]);
    assert_eq!(ids("telecom=email|%2B1-555-867-5309"), Vec::<String>::new());
    assert_eq!(ids("family:missing=false&given=wolf"), both);
    assert_eq!(
        ids("identifier:not=urn:mrn|MRN-55501234&given=wolf"),
        vec![other.clone()]
    );
    let (_, sorted) = s.get_json("Patient?given=wolf&_sort=-family");
    let order: Vec<Value> = resources(&sorted).iter().map(|r| r["id"].clone()).collect();
    assert_eq!(
        order,
        [json!(id), json!(other)],
        "Quixotically before Quixote"
    );

    // An update moves its entries: the old family name finds nothing, the new one finds it.
    let mut renamed = s.get_json(&format!("Patient/{id}")).1;
    renamed["name"][0]["family"] = json!("Zanzibarian");
    let r = s.put(&format!("Patient/{id}"), &renamed);
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(ids("family=quixoti"), Vec::<String>::new());
    assert_eq!(ids("family=zanzibar"), vec![id.clone()]);

    s.kill9();
    let needles = [
        "Quixotically",
        "Zanzibarian",
        "Wolfgangina",
        "Bartholomewsky",
        "MRN-55501234",
        "867-5309",
        "wolfgangina@example",
        "Evergreenterrace",
        "Springfieldia",
    ];
    assert_eq!(find_in_data_dir(&s.data, &needles), None);
    // And the same search has the same answers after a restart.
    s.launch();
    assert_eq!(search(&s, "family=zanzibar"), vec![id.clone()]);
    assert_eq!(search(&s, "identifier=urn:mrn|MRN-55501234"), vec![id]);
}

#[test]
fn the_kek_rotates_online_under_concurrent_writes_and_nothing_is_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut s = TestServer::start();
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let (client, url) = (s.client.clone(), s.url("Patient"));
            let (stop, acknowledged, failures) =
                (stop.clone(), acknowledged.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let family = format!("Rotation{t}x{n}");
                    let r = client
                        .post(&url)
                        .header("Content-Type", FHIR_JSON)
                        .json(&patient(&family, "Online", "1980-01-01"))
                        .send();
                    match r {
                        Ok(r) if r.status().as_u16() == 201 => {
                            let id = r.json::<Value>().unwrap()["id"]
                                .as_str()
                                .unwrap()
                                .to_string();
                            acknowledged.lock().unwrap().push((id, family));
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("{}", r.status())),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));

    // The operator puts a new KEK where the server reads it and sends SIGHUP.
    let kek_path = s.data.with_extension("kek");
    let old_kek = std::fs::read_to_string(&kek_path).unwrap();
    let staged = s.data.parent().unwrap().join("staged.kek");
    let new_kid = generate_kek(&staged);
    std::fs::rename(&staged, &kek_path).unwrap();
    let before_rotation = acknowledged.lock().unwrap().len();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &s.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let health = format!("http://127.0.0.1:{}/health/live", s.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let report: Value = s.client.get(&health).send().unwrap().json().unwrap();
        if report["kek"]["kid"] == new_kid.as_str() && report["kek"]["rotatingFrom"].is_null() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rotation did not complete: {report}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "writes went on"
    );
    assert!(
        before_rotation >= 5 && acknowledged.len() > before_rotation + 5,
        "writes before ({before_rotation}) and during/after ({}) the rotation",
        acknowledged.len()
    );

    // The old KEK is retired: every data key is under the new one, and the old KEK no longer
    // opens the store.
    s.kill9();
    let kids = data_key_kids(&s.data);
    assert!(kids.iter().all(|k| *k == new_kid), "{kids:?}");
    assert!(
        kids.len() > acknowledged.len(),
        "a data key per patient, and the blinding key"
    );
    let old_file = s.data.parent().unwrap().join("old.kek");
    std::fs::write(&old_file, old_kek).unwrap();
    let (ok, said) = refused_start(&s.data, &["--kek-file", old_file.to_str().unwrap()]);
    assert!(!ok);
    assert!(said.contains("does not open the store"), "{said}");
    std::fs::remove_file(&old_file).unwrap();

    // With the new KEK alone, every acknowledged write reads back.
    s.launch();
    for (id, family) in &acknowledged {
        let (status, p) = s.get_json(&format!("Patient/{id}"));
        assert_eq!(status, 200, "{id}");
        assert_eq!(p["name"][0]["family"], family.as_str());
    }
    let (_, found) = s.get_json("Patient?family=rotation0x1&_count=1");
    assert!(!match_ids(&found).is_empty(), "the blind index opens too");
}

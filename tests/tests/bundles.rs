//! Batch and transaction Bundles, the official R4 examples, and durability under kill -9.

use base64::Engine;
use fhirmament_e2e::*;

fn consent_for(patient_ref: &str) -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_ref}})
}

#[test]
fn transaction_rewrites_urn_uuid_references_and_commits_atomically() {
    let s = TestServer::start();
    let mut p = patient("Tx", "Tina", "1985-05-05");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "TX1"}]);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": p,
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|TX1"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059", "resource": consent_for("urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"),
         "request": {"method": "POST", "url": "Consent"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:mrn|TX1"}}
    ]});
    let r = s.post("", &bundle);
    assert_eq!(r.status(), 200);
    let resp: Value = r.json().unwrap();
    assert_eq!(resp["type"], "transaction-response");
    let entries = resp["entry"].as_array().unwrap();
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[1]["response"]["status"], "201 Created");
    let pid = entries[0]["resource"]["id"].as_str().unwrap();
    assert_eq!(
        entries[1]["resource"]["patient"]["reference"],
        format!("Patient/{pid}")
    );
    assert!(entries[0]["response"]["location"]
        .as_str()
        .unwrap()
        .contains(&format!("Patient/{pid}/_history/1")));
    // The read in the same transaction sees the commit.
    assert_eq!(entries[2]["resource"]["total"], 1);
    // Both entries were written in one position of the log, with the transaction's AuditEvent.
    let (_, hist) = s.get_json("_history");
    let entries = hist["entry"].as_array().unwrap();
    let time_of = |t: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == t)
            .map(|e| e["resource"]["meta"]["lastUpdated"].as_str().unwrap())
            .collect()
    };
    let (patients, consents) = (time_of("Patient"), time_of("Consent"));
    assert_eq!((patients.len(), consents.len()), (1, 1));
    assert_eq!(patients[0], consents[0]);
    let transaction_audit: Vec<&Value> = entries
        .iter()
        .filter(|e| e["resource"]["subtype"][0]["code"] == "transaction")
        .collect();
    assert_eq!(transaction_audit.len(), 1);
    assert_eq!(
        transaction_audit[0]["resource"]["meta"]["lastUpdated"],
        patients[0]
    );

    // The same transaction again: the conditional create matches, the consent is new, and
    // its reference points at the existing patient.
    let r: Value = s.post("", &bundle).json().unwrap();
    assert_eq!(r["entry"][0]["response"]["status"], "200 OK");
    assert_eq!(
        r["entry"][1]["resource"]["patient"]["reference"],
        format!("Patient/{pid}")
    );
}

#[test]
fn a_failing_transaction_stores_nothing() {
    let s = TestServer::start();
    let existing = s.create(&patient("Keep", "K", "1970-01-01"));
    let id = existing["id"].as_str().unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:a1", "resource": patient("New", "N", "1999-09-09"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": id, "gender": "other"}, "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"7\""}}
    ]});
    let oo = assert_outcome(s.post("", &bundle), 412);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("entry[1]"),
        "{oo}"
    );
    assert_eq!(s.get_json("Patient?family=New").1["total"], 0);
    assert_eq!(
        s.get_json(&format!("Patient/{id}")).1["meta"]["versionId"],
        "1"
    );
    // An invalid resource anywhere fails the whole transaction, naming the entry and element.
    let bad = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("New", "N", "1999-09-09"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}}
    ]});
    let oo = assert_outcome(s.post("", &bad), 422);
    assert_eq!(
        oo["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.Patient.gender"
    );
    // Broken references in a Bundle: a conditional reference that matches nothing.
    let dangling = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": consent_for("Patient?identifier=urn:none|0"), "request": {"method": "POST", "url": "Consent"}}
    ]});
    assert_outcome(s.post("", &dangling), 412);
    // A urn:uuid reference that no entry declares.
    let unknown = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": consent_for("urn:uuid:0b1d3a4e-0000-4000-8000-000000000000"), "request": {"method": "POST", "url": "Consent"}}
    ]});
    let oo = assert_outcome(s.post("", &unknown), 400);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("urn:uuid:0b1d3a4e"),
        "{oo}"
    );
    // Malformed entries.
    for broken in [
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient("X", "X", "2000-01-01")}]}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "FETCH", "url": "Patient"}}]}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Observation"}, "resource": {"resourceType": "Observation"}}]}),
        json!({"resourceType": "Bundle", "type": "collection"}),
        json!({"resourceType": "Patient"}),
    ] {
        let r = s.post("", &broken);
        assert!(r.status().is_client_error(), "{broken}: {}", r.status());
    }
    assert_eq!(s.get_json("Patient").1["total"], 1);
}

/// A transaction whose ledger entry would not fit in a batch (so could not travel in a view
/// change) is refused whole with a 413, stores nothing, and leaves the server writing.
#[test]
fn a_transaction_too_large_for_one_ledger_entry_is_refused_whole() {
    let s = TestServer::start();
    let bundle = |n: usize, family: &str| {
        let entries: Vec<Value> = (0..n)
            .map(|i| {
                json!({"resource": patient(family, &format!("G{i}"), "1980-01-01"),
                "request": {"method": "POST", "url": "Patient"}})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    };
    let oo = assert_outcome(s.post("", &bundle(2500, "Huge")), 413);
    let diagnostics = oo["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("split the transaction"), "{oo}");
    assert_eq!(oo["issue"][0]["code"], "too-long");
    assert_eq!(
        s.get_json("Patient?family=Huge&_summary=count").1["total"],
        0
    );
    // A large transaction that fits still commits, atomically.
    let r = s.post("", &bundle(300, "Large"));
    assert_eq!(r.status(), 200);
    assert_eq!(
        s.get_json("Patient?family=Large&_summary=count").1["total"],
        300
    );
}

#[test]
fn batch_entries_succeed_or_fail_independently() {
    let s = TestServer::start();
    let p = s.create(&patient("Batch", "B", "1970-01-01"));
    let id = p["id"].as_str().unwrap();
    let patch = base64::engine::general_purpose::STANDARD
        .encode(r#"[{"op":"add","path":"/active","value":true}]"#);
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("Other", "O", "1971-01-01"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"resource": {"resourceType": "Patient", "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch}, "request": {"method": "PATCH", "url": format!("Patient/{id}")}},
        {"request": {"method": "DELETE", "url": format!("Patient/{id}")}},
    ]});
    let r: Value = s.post("", &bundle).json().unwrap();
    assert_eq!(r["type"], "batch-response");
    let statuses: Vec<&str> = r["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec![
            "201 Created",
            "404 Not Found",
            "422 Unprocessable Entity",
            "200 OK",
            "200 OK"
        ]
    );
    assert_eq!(
        r["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(r["entry"][3]["resource"]["active"], true);
    assert_eq!(s.get(&format!("Patient/{id}")).status(), 410);
}

#[test]
fn official_r4_examples_round_trip_unchanged_apart_from_meta() {
    let s = TestServer::start();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        let t = original["resourceType"].as_str().unwrap();
        let r = s.post(t, &original);
        assert_eq!(
            r.status(),
            201,
            "{}: {}",
            path.display(),
            r.text().unwrap_or_default()
        );
        let id = r.json::<Value>().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        // Compare the raw text returned by a read: numbers keep their digits, elements their order.
        let back: Value =
            serde_json::from_str(&s.get(&format!("{t}/{id}")).text().unwrap()).unwrap();
        let strip = |mut v: Value| {
            let o = v.as_object_mut().unwrap();
            o.shift_remove("id");
            if let Some(Value::Object(m)) = o.get_mut("meta") {
                m.shift_remove("versionId");
                m.shift_remove("lastUpdated");
                if m.is_empty() {
                    o.shift_remove("meta");
                }
            }
            serde_json::to_string(&v).unwrap()
        };
        assert_eq!(strip(back), strip(original), "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} examples");
}

#[test]
fn every_acknowledged_write_survives_kill_9() {
    let mut s = TestServer::start();
    let acknowledged = std::sync::Mutex::new(Vec::<(String, String)>::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for w in 0..8 {
            let s = &s;
            let acknowledged = &acknowledged;
            let stop = &stop;
            scope.spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let result = if n % 3 == 0 {
                        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                            {"fullUrl": "urn:uuid:p", "resource": patient(&format!("K{w}x{n}"), "T", "2000-01-01"), "request": {"method": "POST", "url": "Patient"}},
                            {"resource": consent_for("urn:uuid:p"), "request": {"method": "POST", "url": "Consent"}}
                        ]});
                        s.client.post(s.url("")).header("Content-Type", FHIR_JSON).body(bundle.to_string()).send().ok().filter(|r| r.status() == 200).and_then(|r| r.json::<Value>().ok()).map(|b| {
                            b["entry"].as_array().unwrap().iter().map(|e| (e["resource"]["resourceType"].as_str().unwrap().to_string(), e["resource"]["id"].as_str().unwrap().to_string())).collect::<Vec<_>>()
                        })
                    } else {
                        s.client.post(s.url("Patient")).header("Content-Type", FHIR_JSON).body(patient(&format!("K{w}x{n}"), "S", "2000-01-01").to_string()).send().ok().filter(|r| r.status() == 201).and_then(|r| r.json::<Value>().ok()).map(|b| vec![("Patient".to_string(), b["id"].as_str().unwrap().to_string())])
                    };
                    if let Some(written) = result {
                        acknowledged.lock().unwrap().extend(written);
                    }
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
        s.kill9();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(
        acknowledged.len() > 50,
        "only {} writes acknowledged before the kill",
        acknowledged.len()
    );
    s.launch();
    for (t, id) in &acknowledged {
        assert_eq!(
            s.get(&format!("{t}/{id}")).status(),
            200,
            "acknowledged {t}/{id} lost"
        );
    }
    // No partial transaction: every transaction patient ("T") has exactly its consent.
    let (_, pats) = s.get_json("Patient?given=T&_count=1000");
    let (_, cons) = s.get_json("Consent?_count=1000");
    assert_eq!(
        pats["total"], cons["total"],
        "a transaction was half-applied"
    );
}

//! The REST interactions of R4 http.html against the real binary: happy and error paths.

use fhirmament_e2e::*;

#[test]
fn create_read_vread_update_delete_history() {
    let s = TestServer::start();
    let created = s.create(&patient("Chalmers", "Peter", "1974-12-25"));
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(created["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    let r = s.get(&format!("Patient/{id}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    assert_eq!(r.json::<Value>().unwrap(), created);

    let mut changed = created.clone();
    changed["gender"] = json!("male");
    let r = s.send(
        "PUT",
        &format!("Patient/{id}"),
        &changed,
        &[("If-Match", "W/\"1\"")],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .ends_with(&format!("Patient/{id}/_history/2")));

    // A stale If-Match is refused and nothing changes.
    assert_outcome(
        s.send(
            "PUT",
            &format!("Patient/{id}"),
            &created,
            &[("If-Match", "W/\"1\"")],
        ),
        412,
    );
    assert_eq!(s.get_json(&format!("Patient/{id}")).1["gender"], "male");

    let (st, v1) = s.get_json(&format!("Patient/{id}/_history/1"));
    assert_eq!(st, 200);
    assert_eq!(v1["gender"], "female");

    let r = s
        .client
        .delete(s.url(&format!("Patient/{id}")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_outcome(s.get(&format!("Patient/{id}")), 410);
    assert_outcome(s.get(&format!("Patient/{id}/_history/3")), 410);
    assert_eq!(
        s.get_json(&format!("Patient/{id}/_history/2")).1["gender"],
        "male"
    );
    assert_outcome(s.get(&format!("Patient/{id}/_history/9")), 404);

    let (_, h) = s.get_json(&format!("Patient/{id}/_history"));
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 3);
    let methods: Vec<&str> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, vec!["DELETE", "PUT", "POST"]);
    assert!(h["entry"][0].get("resource").is_none());

    // Update of a deleted resource brings it back as a new version.
    let r = s.put(&format!("Patient/{id}"), &changed);
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"4\"");
}

#[test]
fn update_as_create_with_a_client_id_and_id_rules() {
    let s = TestServer::start();
    let mut p = patient("Doe", "Jane", "1980-01-01");
    p["id"] = json!("client-chosen-1");
    let r = s.put("Patient/client-chosen-1", &p);
    assert_eq!(r.status(), 201);
    assert_eq!(s.get_json("Patient/client-chosen-1").0, 200);
    // Body id must match the URL; missing id is an error.
    assert_outcome(s.put("Patient/other", &p), 400);
    assert_outcome(
        s.put(
            "Patient/client-chosen-1",
            &patient("Doe", "Jane", "1980-01-01"),
        ),
        400,
    );
    assert_outcome(s.get("Patient/not valid!"), 400);
    // A create ignores a client id and assigns its own.
    let created = s.create(&p);
    assert_ne!(created["id"], "client-chosen-1");
}

#[test]
fn prefer_return() {
    let s = TestServer::start();
    let p = patient("Pref", "Ann", "1990-02-02");
    let r = s.send("POST", "Patient", &p, &[("Prefer", "return=minimal")]);
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("location"));
    assert!(r.text().unwrap().is_empty());
    let r = s.send(
        "POST",
        "Patient",
        &p,
        &[("Prefer", "return=OperationOutcome")],
    );
    assert_eq!(r.status(), 201);
    assert_eq!(
        r.json::<Value>().unwrap()["resourceType"],
        "OperationOutcome"
    );
}

#[test]
fn conditional_create_update_delete() {
    let s = TestServer::start();
    let mut p = patient("Cond", "Carl", "1950-05-05");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "A1"}]);
    let hdr = [("If-None-Exist", "identifier=urn:mrn|A1")];
    let r = s.send("POST", "Patient", &p, &hdr);
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Same condition: the existing resource comes back, nothing new is created.
    let r = s.send("POST", "Patient", &p, &hdr);
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["id"], id.as_str());
    assert_eq!(s.get_json("Patient?identifier=urn:mrn|A1").1["total"], 1);

    // Conditional update: one match updates it; no match creates.
    let mut changed = p.clone();
    changed["gender"] = json!("male");
    let r = s.put("Patient?identifier=urn:mrn|A1", &changed);
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["id"], id.as_str());
    let mut other = patient("Cond", "Dora", "1951-05-05");
    other["identifier"] = json!([{"system": "urn:mrn", "value": "B2"}]);
    assert_eq!(s.put("Patient?identifier=urn:mrn|B2", &other).status(), 201);
    // Two matches: 412.
    assert_outcome(s.put("Patient?family=Cond", &other), 412);
    assert_outcome(
        s.send("POST", "Patient", &p, &[("If-None-Exist", "family=Cond")]),
        412,
    );

    // Conditional delete: more than one match is refused; a single match is deleted.
    assert_outcome(
        s.client
            .delete(s.url("Patient?family=Cond,Nobody"))
            .send()
            .unwrap(),
        412,
    );
    let r = s
        .client
        .delete(s.url("Patient?identifier=urn:mrn|A1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_outcome(s.get(&format!("Patient/{id}")), 410);
}

#[test]
fn json_patch() {
    let s = TestServer::start();
    let created = s.create(&patient("Patchy", "Pat", "1960-06-06"));
    let id = created["id"].as_str().unwrap();
    let patch = json!([{"op": "replace", "path": "/gender", "value": "other"}, {"op": "add", "path": "/active", "value": true}]);
    let r = s
        .client
        .patch(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/json-patch+json")
        .header("If-Match", "W/\"1\"")
        .body(patch.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(
        (
            body["gender"].as_str(),
            body["active"].as_bool(),
            body["meta"]["versionId"].as_str()
        ),
        (Some("other"), Some(true), Some("2"))
    );
    // A patch that produces an invalid resource is refused.
    let bad = json!([{"op": "replace", "path": "/gender", "value": "robot"}]);
    let r = s
        .client
        .patch(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/json-patch+json")
        .body(bad.to_string())
        .send()
        .unwrap();
    assert_outcome(r, 422);
    // Stale If-Match.
    let r = s
        .client
        .patch(s.url(&format!("Patient/{id}")))
        .header("Content-Type", "application/json-patch+json")
        .header("If-Match", "W/\"1\"")
        .body(patch.to_string())
        .send()
        .unwrap();
    assert_outcome(r, 412);
    // Wrong media type.
    let r = s
        .client
        .patch(s.url(&format!("Patient/{id}")))
        .header("Content-Type", FHIR_JSON)
        .body(patch.to_string())
        .send()
        .unwrap();
    assert_outcome(r, 415);
}

#[test]
fn bad_input_gets_a_clear_4xx_operation_outcome_and_stores_nothing() {
    let s = TestServer::start_with(&["--max-body-bytes", "4096"]);
    let raw = |method: &str, path: &str, ct: &str, body: &str| {
        s.client
            .request(method.parse().unwrap(), s.url(path))
            .header("Content-Type", ct)
            .body(body.to_string())
            .send()
            .unwrap()
    };
    assert_outcome(raw("POST", "Patient", FHIR_JSON, "{not json"), 400);
    assert_outcome(raw("POST", "Patient", FHIR_JSON, "[1,2]"), 400);
    assert_outcome(
        raw(
            "POST",
            "Patient",
            FHIR_JSON,
            r#"{"resourceType":"Consent"}"#,
        ),
        400,
    );
    assert_outcome(raw("POST", "Patient", FHIR_JSON, r#"{"name":[]}"#), 400);
    let oo = assert_outcome(
        raw(
            "POST",
            "Patient",
            FHIR_JSON,
            r#"{"resourceType":"Patient","gender":"robot"}"#,
        ),
        422,
    );
    assert_eq!(oo["issue"][0]["expression"][0], "Patient.gender");
    let oo = assert_outcome(
        raw(
            "POST",
            "Consent",
            FHIR_JSON,
            r#"{"resourceType":"Consent","scope":{"text":"x"},"category":[{"text":"y"}]}"#,
        ),
        422,
    );
    assert_eq!(oo["issue"][0]["expression"][0], "Consent.status");
    assert_outcome(raw("POST", "Patient", "application/xml", "<Patient/>"), 415);
    assert_outcome(
        raw(
            "POST",
            "Patient",
            FHIR_JSON,
            &format!(
                r#"{{"resourceType":"Patient","text":{{"status":"generated","div":"{}"}}}}"#,
                "x".repeat(5000)
            ),
        ),
        413,
    );
    assert_outcome(
        raw(
            "POST",
            "Observation",
            FHIR_JSON,
            r#"{"resourceType":"Observation"}"#,
        ),
        404,
    );
    assert_outcome(
        s.client
            .get(s.url("Patient"))
            .header("Accept", "application/fhir+xml")
            .send()
            .unwrap(),
        406,
    );
    assert_outcome(s.get("Patient?_format=xml"), 406);
    assert_outcome(s.get("Patient?birthdate=notadate"), 400);
    assert_outcome(s.get("Patient?_count=lots"), 400);
    assert_outcome(s.get("Patient/1/_history/abc"), 400);
    assert_outcome(raw("POST", "Patient/1", FHIR_JSON, "{}"), 405);
    // None of that stored anything but the AuditEvents recording the failures.
    let (_, all) = s.get_json("Patient");
    assert_eq!(all["total"], 0);
    for t in ["Patient", "Consent", "DocumentReference"] {
        let (_, hist) = s.get_json(&format!("{t}/_history"));
        assert!(hist.get("entry").is_none(), "{hist}");
    }
    let (_, failures) = s.get_json("AuditEvent?outcome=4&_summary=count");
    assert!(failures["total"].as_u64().unwrap() >= 10, "{failures}");
    // Outside the base: still an OperationOutcome.
    let r = s
        .client
        .get(format!("http://127.0.0.1:{}/elsewhere", s.port))
        .send()
        .unwrap();
    assert_outcome(r, 404);
}

#[test]
fn formats_pretty_gzip_and_if_none_match() {
    let s = TestServer::start();
    let created = s.create(&patient("Fmt", "Fay", "1970-07-07"));
    let id = created["id"].as_str().unwrap();
    let r = s.get(&format!("Patient/{id}?_pretty=true"));
    let text = r.text().unwrap();
    assert!(text.contains("\n  \"resourceType\""));
    let r = s
        .client
        .get(s.url(&format!("Patient/{id}")))
        .header("Accept", "application/json")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url(&format!("Patient/{id}")))
        .header("If-None-Match", "W/\"1\"")
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);
    // gzip is negotiated (a client that does not decompress sees the encoding).
    let raw = Client::builder().no_gzip().build().unwrap();
    let r = raw
        .get(s.url("metadata"))
        .header("Accept-Encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(
        r.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    // A small resource is not worth compressing, and says nothing about encoding.
    let r = raw
        .get(s.url(&format!("Patient/{id}")))
        .header("Authorization", format!("Bearer {}", s.token))
        .header("Accept-Encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(r.headers().get("content-encoding"), None);
    assert_eq!(r.json::<Value>().unwrap()["id"], id);
}

#[test]
fn history_at_type_and_system_level_with_since_and_paging() {
    let s = TestServer::start();
    for i in 0..5 {
        s.create(&patient(&format!("Hist{i}"), "H", "2000-01-01"));
    }
    let cut = {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (_, last) = s.get_json("Patient/_history?_count=1");
        last["entry"][0]["response"]["lastModified"]
            .as_str()
            .unwrap()
            .to_string()
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.create(&json!({"resourceType": "Consent", "status": "active", "scope": {"text": "x"}, "category": [{"text": "y"}]}));
    // The system history also holds every interaction's AuditEvent.
    let records = |b: &Value| -> Vec<Value> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["resource"]["resourceType"] != "AuditEvent")
            .cloned()
            .collect()
    };
    let (_, sys) = s.get_json("_history?_count=500");
    assert_eq!(records(&sys).len(), 6);
    assert_eq!(records(&sys)[0]["resource"]["resourceType"], "Consent");
    let (_, typ) = s.get_json("Patient/_history");
    assert_eq!(typ["entry"].as_array().unwrap().len(), 5);
    let (_, since) = s.get_json(&format!(
        "_history?_count=500&_since={}",
        cut.replace('+', "%2B")
    ));
    assert_eq!(records(&since).len(), 2, "{since}");
    // Paging: follow next links until the end; every entry exactly once.
    let mut seen = Vec::new();
    let mut url = s.url("Patient/_history?_count=2");
    loop {
        let b: Value = s.client.get(&url).send().unwrap().json().unwrap();
        for e in b["entry"].as_array().unwrap() {
            seen.push(e["fullUrl"].as_str().unwrap().to_string());
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);
    assert_outcome(s.get("_history?_since=yesterday"), 400);
}

#[test]
fn capability_statement_tells_the_truth() {
    let s = TestServer::start();
    let (st, cs) = s.get_json("metadata");
    assert_eq!(st, 200);
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let types: Vec<&str> = resources
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec!["Patient", "Consent", "DocumentReference", "AuditEvent"]
    );
    // Every advertised search parameter is accepted by the server.
    for r in resources {
        let t = r["type"].as_str().unwrap();
        for p in r["searchParam"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let value = match p["type"].as_str().unwrap() {
                "date" => "2020",
                "reference" => "Patient/x",
                _ => "x",
            };
            let r = s.get(&format!("{t}?{name}={value}"));
            assert_eq!(r.status(), 200, "{t}?{name} is advertised but refused");
        }
    }
}

#[test]
fn validate_operation_reports_issues_without_storing() {
    let s = TestServer::start();
    let (st, oo) = {
        let r = s.post("Patient/$validate", &patient("Val", "V", "1990-01-01"));
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(st, 200);
    assert_eq!(oo["issue"][0]["severity"], "information");
    let r = s.post("Patient/$validate", &json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "gender": "robot"}}]}));
    assert_eq!(r.status(), 200);
    let oo: Value = r.json().unwrap();
    assert_eq!(oo["issue"][0]["severity"], "error");
    assert_eq!(oo["issue"][0]["expression"][0], "Patient.gender");
    let r = s.post(
        "Patient/abc/$validate",
        &json!({"resourceType": "Patient", "id": "xyz"}),
    );
    assert!(r.json::<Value>().unwrap()["issue"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["expression"][0] == "id"));
    assert_eq!(s.get_json("Patient").1["total"], 0);
}

#[test]
fn reindex_command_rebuilds_search_after_restart() {
    let mut s = TestServer::start();
    let id = s.create(&patient("Reidx", "R", "1960-03-03"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.kill9();
    let out = std::process::Command::new(binary())
        .arg("reindex")
        .arg("--data-dir")
        .arg(&s.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reindexed 2 resources",
        "the Patient and the AuditEvent of its create"
    );
    s.launch();
    let (_, b) = s.get_json("Patient?family=reidx&birthdate=1960-03-03");
    assert_eq!(match_ids(&b), vec![id]);
}

#[test]
fn a_bad_config_file_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listen = 12\n").unwrap();
    let out = std::process::Command::new(binary())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml"));
}

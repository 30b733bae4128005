//! A 4-organization consortium started with `fhirmament cluster up`: writes are committed by
//! the PBFT ledger, records stay with the organization that accepted them, and every replica
//! serves them verified against the ledger.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhirmament_e2e::*;

fn param<'a>(receipt: &'a Value, name: &str) -> &'a Value {
    receipt["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn verify_cli(receipt: &Value, genesis: &std::path::Path) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("receipt.json");
    std::fs::write(&path, serde_json::to_vec(receipt).unwrap()).unwrap();
    std::process::Command::new(binary())
        .arg("verify")
        .arg(&path)
        .arg("--genesis")
        .arg(genesis)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn a_record_written_at_one_organization_is_served_identically_and_verifiably_by_another() {
    let c = Consortium::up(4);
    for replica in 0..4 {
        let r = c
            .client
            .get(format!(
                "http://127.0.0.1:{}/health/ready",
                c.http_port as usize + replica
            ))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "replica {replica} ready");
        let h: Value = r.json().unwrap();
        assert_eq!(
            (h["live"].as_bool(), h["viewActive"].as_bool()),
            (Some(true), Some(true)),
            "{h}"
        );
    }
    let (s, p) = c.send(
        0,
        "POST",
        "Patient",
        &patient("Consortium", "Ada", "1970-01-01"),
    );
    assert_eq!(s, 201, "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    let doc = json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{pid}")},
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]});
    let (s, d) = c.send(0, "POST", "DocumentReference", &doc);
    assert_eq!(s, 201, "{d}");
    let did = d["id"].as_str().unwrap().to_string();

    // Replica 2 holds none of these bytes: it fetches them from replica 0 and checks them.
    c.get_when(2, &format!("DocumentReference/{did}"), |s, _| s == 200);
    let (s, read) = c.get_json(2, &format!("Patient/{pid}"));
    assert_eq!(s, 200, "{read}");
    assert_eq!(read, p, "identical content at another organization");
    let (s, vread) = c.get_when(3, &format!("Patient/{pid}/_history/1"), |s, _| s == 200);
    assert_eq!((s, &vread), (200, &p));
    let (s, compartment) = c.get_json(2, &format!("Patient/{pid}/DocumentReference"));
    assert_eq!(s, 200, "{compartment}");
    assert_eq!(match_ids(&compartment), vec![did.clone()]);
    assert_eq!(compartment["total"], 1);
    let (_, none) = c.get_json(
        2,
        &format!("Patient/{pid}/DocumentReference?status=superseded"),
    );
    assert!(
        match_ids(&none).is_empty(),
        "the query still filters: {none}"
    );

    // The same ledger record (entry, commitment) at the holder and at another replica.
    let (s, at_holder) = c.get_json(0, &format!("Patient/{pid}/_history/1/$verify"));
    assert_eq!(s, 200, "{at_holder}");
    let (s, elsewhere) = c.get_json(2, &format!("Patient/{pid}/_history/1/$verify"));
    assert_eq!(s, 200, "{elsewhere}");
    assert_eq!(param(&at_holder, "entry"), param(&elsewhere, "entry"));
    assert_eq!(param(&at_holder, "result")["valueBoolean"], true);
    assert!(
        verify_cli(&at_holder, &c.genesis()),
        "the receipt verifies offline"
    );

    // An update through replica 3 builds on replica 0's version and moves the record there.
    let mut changed = p.clone();
    changed["name"][0]["family"] = json!("Moved");
    let (s, v2) = c.send(3, "PUT", &format!("Patient/{pid}"), &changed);
    assert_eq!(s, 200, "{v2}");
    assert_eq!(v2["meta"]["versionId"], "2");
    for replica in 0..4 {
        let (s, now) = c.get_when(replica, &format!("Patient/{pid}"), |_, v| {
            v["meta"]["versionId"] == "2"
        });
        assert_eq!(
            (s, &now["name"][0]["family"]),
            (200, &json!("Moved")),
            "replica {replica}"
        );
        let (_, h) = c.get_json(replica, &format!("Patient/{pid}/_history"));
        let versions: Vec<String> = resources(&h)
            .iter()
            .map(|r| r["meta"]["versionId"].as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(versions, ["2", "1"], "replica {replica}: {h}");
    }
    // A stale If-Match loses, at any replica.
    let r = c
        .client
        .put(c.url(1, &format!("Patient/{pid}")))
        .header("Authorization", c.auth(1))
        .header("Content-Type", FHIR_JSON)
        .header("If-Match", "W/\"1\"")
        .body(serde_json::to_vec(&changed).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 412);
}

#[test]
fn a_holder_that_does_not_answer_makes_its_records_unavailable_never_stale() {
    let c = Consortium::up(4);
    let (s, p) = c.send(1, "POST", "Patient", &patient("Held", "By", "1980-02-02"));
    assert_eq!(s, 201);
    let pid = p["id"].as_str().unwrap().to_string();
    let (s, _) = c.get_when(2, &format!("Patient/{pid}"), |s, _| s == 200);
    assert_eq!(s, 200);
    // Freeze replica 1's process: its store no longer answers.
    c.signal(1, "-STOP");
    let r = c
        .client
        .get(c.url(2, &format!("Patient/{pid}")))
        .header("Authorization", c.auth(2))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().unwrap_or(Value::Null);
    c.signal(1, "-CONT");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(body.to_string().contains("held by replica 1"), "{body}");
    let (s, again) = c.get_json(2, &format!("Patient/{pid}"));
    assert_eq!(
        (s, again),
        (200, p),
        "available again once the holder answers"
    );
}

#[test]
fn killing_the_primary_loses_no_acknowledged_write_and_it_catches_up_after_restart() {
    let c = Arc::new(Consortium::up(4));
    let acked: Arc<Mutex<Vec<(usize, String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (c, acked, stop, failures) =
                (c.clone(), acked.clone(), stop.clone(), failures.clone());
            std::thread::spawn(move || {
                // Writers use the replicas that stay up; replica 0 is the primary of view 0.
                let replica = 1 + w % 3;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (s, body) = c.send(
                        replica,
                        "POST",
                        "Patient",
                        &patient(&format!("W{w}x{i}"), "K", "1990-01-01"),
                    );
                    if s == 201 {
                        let id = body["id"].as_str().unwrap().to_string();
                        acked.lock().unwrap().push((replica, id, Instant::now()));
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    c.signal(0, "-KILL");
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let after = acked
        .iter()
        .filter(|(_, _, t)| *t > killed_at + Duration::from_secs(1))
        .count();
    assert!(
        acked.len() > 20,
        "writes were acknowledged before the kill: {}",
        acked.len()
    );
    assert!(
        after > 0,
        "writes resumed after the view change ({} acked, {} failed)",
        acked.len(),
        failures.load(Ordering::Relaxed)
    );
    // Every acknowledged write is readable, through a replica other than its holder.
    for (replica, id, _) in &acked {
        let reader = if *replica == 3 { 2 } else { 3 };
        let (s, body) = c.get_when(reader, &format!("Patient/{id}"), |s, _| s == 200);
        assert_eq!(
            s, 200,
            "acknowledged Patient/{id} (held by {replica}) is lost: {body}"
        );
    }
    // Restart the killed replica: `cluster up` starts only what is not running.
    c.cluster("up");
    let (_, head3) = c.get_json(3, "_ledger");
    let target = head3["appliedSequence"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, head0) = c.get_json(0, "_ledger");
        if head0["appliedSequence"].as_u64().unwrap_or(0) >= target {
            assert_eq!(head0["chain"], head3["chain"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replica 0 did not catch up to {target}: {head0}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Once caught up, it serves what was written while it was down.
    let (_, id, _) = acked.last().unwrap();
    let (s, _) = c.get_when(0, &format!("Patient/{id}"), |s, _| s == 200);
    assert_eq!(s, 200);
}

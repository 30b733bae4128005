//! Patient consent and the audit trail, end to end: Consents decide what practitioners may
//! read, search and `_include`; revocation takes effect at once on every replica; break-the-
//! glass is labelled and flagged; every interaction leaves exactly the AuditEvents expected,
//! and an interaction whose AuditEvent cannot commit fails.

use fhirmament_e2e::*;

const REVIEW: &str = "https://fhirmament.dev/fhir/CodeSystem/audit-review|review-required";

fn practitioner(data: &std::path::Path, base: &str, who: &str) -> Client {
    client_with_token(&mint_token(
        data,
        base,
        "user/*.rs",
        &[
            "--fhir-user",
            &format!("Practitioner/{who}"),
            "--sub",
            who,
            "--client-id",
            "ehr-app",
        ],
    ))
}

fn consent(patient: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "provision": provision})
}

fn actor(who: &str) -> Value {
    json!([{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
        "reference": {"reference": who}}])
}

fn document(patient: &str, title: &str) -> Value {
    json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{patient}")},
        "content": [{"attachment": {"contentType": "text/plain", "title": title}}]})
}

fn get(c: &Client, url: String, purpose: Option<&str>) -> (u16, Value) {
    let mut r = c.get(url);
    if let Some(p) = purpose {
        r = r.header("X-Purpose-Of-Use", p);
    }
    let r = r.send().expect("GET");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn total(s: &TestServer, query: &str) -> u64 {
    let (status, b) = s.get_json(&format!("AuditEvent?{query}&_summary=count"));
    assert_eq!(status, 200, "{b}");
    b["total"].as_u64().expect("total")
}

fn audits(s: &TestServer, query: &str) -> Vec<Value> {
    let (status, b) = s.get_json(&format!("AuditEvent?{query}&_count=500"));
    assert_eq!(status, 200, "{b}");
    resources(&b)
}

fn decision(ev: &Value) -> Value {
    ev["extension"][0]["extension"]
        .as_array()
        .and_then(|e| e.iter().find(|x| x["url"] == "decision"))
        .map(|x| x["valueCode"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn consents_decide_reads_searches_and_includes_and_every_access_is_audited() {
    let s = TestServer::start_with(&["--break-glass", "true"]);
    let pid = s.create(&patient("Doe", "Jane", "1980-01-01"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = s.create(&document(&pid, "psychiatry"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let open = s.create(&document(&pid, "x-ray"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d1 = practitioner(&s.data, &s.base, "d1");
    let d2 = practitioner(&s.data, &s.base, "d2");
    let patient_url = s.url(&format!("Patient/{pid}"));

    // Opt-out deployment, no Consent yet: a practitioner reads.
    assert_eq!(get(&d2, patient_url.clone(), None).0, 200);

    // The patient shares everything except one document, nothing with Dr. d2, and nothing
    // for research.
    let c = s.create(&consent(
        &pid,
        json!({"type": "permit", "provision": [
            {"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": format!("DocumentReference/{secret}")}}]},
            {"type": "deny", "actor": actor("Practitioner/d2")},
            {"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}
        ]}),
    ));
    let cid = c["id"].as_str().unwrap();

    let d1_before = total(&s, "agent=Practitioner/d1");

    // Search: the denied document is not matched, and not counted.
    let (status, b) = get(
        &d1,
        s.url(&format!(
            "DocumentReference?subject=Patient/{pid}&_total=accurate"
        )),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(b["total"], 1, "{b}");
    assert_eq!(match_ids(&b), vec![open.clone()]);
    // _revinclude (and _include) leave it out too.
    let (_, b) = get(
        &d1,
        s.url(&format!(
            "Patient?_id={pid}&_revinclude=DocumentReference:subject"
        )),
        None,
    );
    let included: Vec<String> = resources(&b)
        .iter()
        .filter(|r| r["resourceType"] == "DocumentReference")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(included, vec![open.clone()]);
    let (_, b) = get(
        &d1,
        s.url(&format!(
            "DocumentReference?_id={secret},{open}&_include=DocumentReference:subject"
        )),
        None,
    );
    assert_eq!(match_ids(&b), vec![open.clone()]);
    // Read, vread and history of the denied document: 403, naming the Consent.
    let (status, oo) = get(&d1, s.url(&format!("DocumentReference/{secret}")), None);
    assert_eq!(status, 403);
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(oo.to_string().contains(&format!("Consent/{cid}")), "{oo}");
    assert_eq!(
        get(
            &d1,
            s.url(&format!("DocumentReference/{secret}/_history/1")),
            None
        )
        .0,
        403
    );
    assert_eq!(
        get(
            &d1,
            s.url(&format!("DocumentReference/{secret}/_history")),
            None
        )
        .0,
        403
    );
    assert_eq!(
        get(&d1, s.url(&format!("DocumentReference/{open}")), None).0,
        200
    );

    // Purpose of use: research is denied, treatment is not.
    assert_eq!(get(&d1, patient_url.clone(), Some("HRESCH")).0, 403);
    assert_eq!(get(&d1, patient_url.clone(), Some("TREAT")).0, 200);

    // Dr. d2 sees nothing of this patient: 403 on read, an empty (and correctly counted) search.
    assert_eq!(get(&d2, patient_url.clone(), None).0, 403);
    let (_, b) = get(
        &d2,
        s.url(&format!("Patient?_id={pid}&_total=accurate")),
        None,
    );
    assert_eq!(b["total"], 0, "{b}");
    assert!(b.get("entry").is_none());

    // Each of Dr. d1's 9 requests left exactly one AuditEvent.
    assert_eq!(total(&s, "agent=Practitioner/d1"), d1_before + 9);
    let search = audits(
        &s,
        &format!("agent=Practitioner/d1&subtype=search-type&patient={pid}"),
    );
    assert_eq!(search.len(), 3, "{search:?}");
    assert!(search.iter().all(|e| e["outcome"] == "0"));
    let denied = audits(
        &s,
        &format!("agent=Practitioner/d1&outcome=4&subtype=read&entity=DocumentReference/{secret}"),
    );
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(decision(&denied[0]), "deny");
    assert_eq!(denied[0]["subtype"][0]["code"], "read");
    assert!(denied[0]["entity"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["what"]["reference"] == format!("Patient/{pid}")));
    let research = audits(&s, "agent=Practitioner/d1&outcome=4&subtype=read")
        .into_iter()
        .filter(|e| e["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH")
        .count();
    assert_eq!(research, 1);
    assert_eq!(total(&s, "agent=Practitioner/d2&outcome=4"), 1);

    // Break-the-glass: an emergency overrides the deny; the data comes labelled and the
    // access is flagged for review.
    assert_eq!(total(&s, &format!("_tag={REVIEW}")), 0);
    let (status, doc) = get(
        &d1,
        s.url(&format!("DocumentReference/{secret}")),
        Some("ETREAT"),
    );
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["meta"]["security"][0]["code"], "BTG");
    let flagged = audits(&s, &format!("_tag={REVIEW}"));
    assert_eq!(flagged.len(), 1);
    assert_eq!(decision(&flagged[0]), "break-glass");
    assert_eq!(
        flagged[0]["purposeOfEvent"][0]["coding"][0]["code"],
        "ETREAT"
    );
    assert!(flagged[0].to_string().contains(&format!("Consent/{cid}")));
    // Break-the-glass is for practitioners in an emergency only: a search for research still
    // withholds, and ETREAT by a backend client does not override.
    let (_, b) = get(
        &d1,
        s.url(&format!(
            "DocumentReference?subject=Patient/{pid}&_total=accurate"
        )),
        Some("HRESCH"),
    );
    assert_eq!(b["total"], 0);

    // The patient sees who accessed their data; a clinician's user/ scopes do not reach
    // AuditEvents; nobody can change or delete one.
    let me = client_with_token(&mint_token(
        &s.data,
        &s.base,
        "patient/*.rs",
        &[
            "--patient",
            &pid,
            "--fhir-user",
            &format!("Patient/{pid}"),
            "--sub",
            "jane",
        ],
    ));
    let (status, mine) = get(
        &me,
        s.url(&format!(
            "AuditEvent?patient={pid}&agent=Practitioner/d2&date=ge2020-01-01&_total=accurate"
        )),
        None,
    );
    assert_eq!(status, 200, "{mine}");
    assert_eq!(
        mine["total"], 2,
        "d2's read before and after the Consent: {mine}"
    );
    let (_, all_mine) = get(&me, s.url("AuditEvent?_total=accurate"), None);
    let (_, everyone) = s.get_json("AuditEvent?_total=accurate");
    assert!(all_mine["total"].as_u64().unwrap() < everyone["total"].as_u64().unwrap());
    for e in resources(&all_mine) {
        assert!(e.to_string().contains(&format!("Patient/{pid}")), "{e}");
    }
    assert_eq!(get(&d1, s.url("AuditEvent"), None).0, 403);
    let any = resources(&s.get_json("AuditEvent?_count=1").1)[0].clone();
    let aid = any["id"].as_str().unwrap();
    assert_outcome(s.put(&format!("AuditEvent/{aid}"), &any), 405);
    assert_outcome(
        s.client
            .delete(s.url(&format!("AuditEvent/{aid}")))
            .send()
            .unwrap(),
        405,
    );
    assert_eq!(s.get_json(&format!("AuditEvent/{aid}")).1, any);
}

#[test]
fn a_write_and_its_audit_event_commit_in_the_same_ledger_entry() {
    let s = TestServer::start();
    let pid = s.create(&patient("Same", "Block", "1990-01-01"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let doc = s.create(&document(&pid, "note"));
    let did = doc["id"].as_str().unwrap();
    let created =
        audits(&s, "subtype=create")
            .into_iter()
            .find(|e| {
                e["entity"].as_array().unwrap().iter().any(|x| {
                    x["what"]["reference"] == format!("DocumentReference/{did}/_history/1")
                })
            })
            .expect("the create's AuditEvent");
    assert_eq!(created["outcome"], "0");
    assert_eq!(created["action"], "C");
    let position = |path: String| {
        let (status, receipt) = s.get_json(&path);
        assert_eq!(status, 200, "{receipt}");
        let param = |name: &str| {
            receipt["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .cloned()
                .unwrap()
        };
        (param("sequence"), param("entryIndex"))
    };
    assert_eq!(
        position(format!("DocumentReference/{did}/$verify")),
        position(format!(
            "AuditEvent/{}/$verify",
            created["id"].as_str().unwrap()
        ))
    );
    // A refused write commits nothing but its AuditEvent.
    let before = total(&s, "outcome=4&subtype=update");
    let mut stale = doc.clone();
    stale["status"] = json!("superseded");
    let r = s.send(
        "PUT",
        &format!("DocumentReference/{did}"),
        &stale,
        &[("If-Match", "W/\"7\"")],
    );
    assert_outcome(r, 412);
    assert_eq!(total(&s, "outcome=4&subtype=update"), before + 1);
    assert_eq!(
        s.get_json(&format!("DocumentReference/{did}")).1["meta"]["versionId"],
        "1"
    );
    // Token issuance is audited, refusals included.
    let r = s
        .client
        .post(s.url("auth/token"))
        .form(&[("grant_type", "authorization_code"), ("code", "forged")])
        .send()
        .unwrap();
    assert!(r.status().is_client_error());
    let logins = audits(
        &s,
        "type=http://dicom.nema.org/resources/ontology/DCM|110114",
    );
    assert_eq!(logins.len(), 1, "{logins:?}");
    assert_eq!(logins[0]["outcome"], "4");
}

#[test]
fn revocation_takes_effect_at_once_on_every_replica_and_an_unauditable_read_fails() {
    let c = Consortium::up_with_env(
        4,
        &[
            ("FHIRMAMENT_CONSENT_BASE", "opt-in"),
            ("FHIRMAMENT_COMMIT_TIMEOUT_SECS", "3"),
        ],
    );
    let (status, p) = c.send(1, "POST", "Patient", &patient("Opt", "In", "1970-07-07"));
    assert_eq!(status, 201, "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    let (status, _) = c.send(1, "POST", "DocumentReference", &document(&pid, "note"));
    assert_eq!(status, 201);
    let base = |i: usize| c.url(i, "").trim_end_matches('/').to_string();
    let d1: Vec<Client> = (0..4)
        .map(|i| practitioner(&c.data(i), &base(i), "d1"))
        .collect();
    let read = |i: usize| get(&d1[i], c.url(i, &format!("Patient/{pid}")), None);
    // A patient's compartment spans the consortium (the document is held by replica 1).
    let search = |i: usize| {
        get(
            &d1[i],
            c.url(
                i,
                &format!("Patient/{pid}/DocumentReference?_total=accurate"),
            ),
            None,
        )
        .1["total"]
            .clone()
    };
    let until = |i: usize, want: u16| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let (s, _) = read(i);
            if s == want || std::time::Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    // Opt-in: nothing is shared before the patient agrees.
    assert_eq!(read(0).0, 403);
    assert_eq!(search(0), 0);

    // Grant at replica 2: it holds there at once, and everywhere once applied.
    let mut grant = consent(
        &pid,
        json!({"type": "deny", "provision": [{"type": "permit", "actor": actor("Practitioner/d1")}]}),
    );
    let (status, created) = c.send(2, "POST", "Consent", &grant);
    assert_eq!(status, 201, "{created}");
    assert_eq!(read(2).0, 200);
    for i in 0..4 {
        assert_eq!(until(i, 200), 200, "replica {i} after the grant");
        assert_eq!(search(i), 1);
    }

    // Revoke at replica 3 (another organization than the one that recorded the grant): the
    // same tokens are refused at once there, and on every replica.
    let cid = created["id"].as_str().unwrap();
    grant["id"] = json!(cid);
    grant["status"] = json!("inactive");
    let (status, revoked) = c.send(3, "PUT", &format!("Consent/{cid}"), &grant);
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(read(3).0, 403);
    assert_eq!(search(3), 0);
    for i in 0..4 {
        assert_eq!(until(i, 403), 403, "replica {i} after the revocation");
        assert_eq!(search(i), 0);
    }

    // Two of four replicas stopped: no quorum, so no AuditEvent can commit, so nothing is
    // released — the read fails with an OperationOutcome instead.
    c.signal(2, "-STOP");
    c.signal(3, "-STOP");
    let query = format!("Consent?patient={pid}");
    let r = c
        .client
        .get(c.url(0, &query))
        .header("Authorization", c.auth(0))
        .send()
        .unwrap();
    let oo = assert_outcome(r, 503);
    assert!(oo.to_string().contains("audit"), "{oo}");
    c.signal(2, "-CONT");
    c.signal(3, "-CONT");
    let (status, _) = c.get_when(0, &query, |s, _| s == 200);
    assert_eq!(status, 200);
}

/// The holder decides what leaves it: a node asking for a version names the user it acts for
/// (under its signature), and the holder checks the patient's Consents for that user and the
/// asking organization before it releases anything.
#[test]
fn the_holder_releases_a_version_only_as_the_patients_consent_permits() {
    use fhirmament::ledger::peer::{
        open_release, sign_request, Acting, ACTING_HEADER, NODE_HEADER,
    };
    let c = Consortium::up(4);
    let (status, p) = c.send(1, "POST", "Patient", &patient("Held", "Here", "1960-06-06"));
    assert_eq!(status, 201, "{p}");
    let pid = p["id"].as_str().unwrap().to_string();
    let (status, _) = c.send(
        1,
        "POST",
        "Consent",
        &consent(
            &pid,
            json!({"type": "permit", "provision": [{"type": "deny", "actor": actor("Practitioner/d2")}]}),
        ),
    );
    assert_eq!(status, 201);

    // Replica 0's credentials, as its node would sign them (and replica 2's, a bystander).
    let data = tempfile::tempdir().unwrap();
    let setup = |i: u32| {
        let config = fhirmament::config::Config::resolve(&fhirmament::config::ServeArgs {
            data_dir: Some(data.path().join(i.to_string())),
            genesis: Some(c.genesis()),
            replica_id: Some(i),
            ledger_key: Some(c.dir.path().join(format!("replica-{i}.key"))),
            ..Default::default()
        })
        .unwrap();
        fhirmament::ledger::replica::ReplicaSetup::resolve(&config).unwrap()
    };
    let (node0, node2) = (setup(0), setup(2));
    let path = format!("Patient/{pid}/_history/1");
    let ask = |signed_for: &str, sent_for: &str| {
        let acting = |who: &str| Acting {
            client: "ehr-app".into(),
            user: Some(format!("Practitioner/{who}")),
            purpose: Some("TREAT".into()),
            after: 0,
        };
        let creds = sign_request(
            &node0,
            &path,
            fhirmament::fhir::now_ms(),
            &acting(signed_for).encode(),
        );
        let r = c
            .client
            .get(c.url(1, &format!("_node/{path}")))
            .header(NODE_HEADER, creds)
            .header(ACTING_HEADER, acting(sent_for).encode())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let jose = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/jose");
        let body = r.text().unwrap();
        let value = if jose {
            // Released versions cross the consortium encrypted to the asking replica.
            assert!(!body.contains("Held"), "{body}");
            let plain = open_release(&node0, &body).expect("encrypted to replica 0");
            assert!(
                open_release(&node2, &body).is_err(),
                "only replica 0 opens it"
            );
            serde_json::from_slice(&plain).unwrap()
        } else {
            serde_json::from_str(&body).unwrap_or(Value::Null)
        };
        (status, value)
    };
    let (status, released) = ask("d1", "d1");
    assert_eq!(status, 200, "{released}");
    assert_eq!(released["parameter"][1]["resource"]["id"], pid.as_str());
    assert_eq!(
        released["parameter"][1]["resource"]["name"][0]["family"],
        "Held"
    );
    let (status, refused) = ask("d2", "d2");
    assert_eq!(status, 403, "{refused}");
    assert!(refused.to_string().contains("consent"), "{refused}");
    // The acting user is covered by the signature: naming another one is refused.
    let (status, forged) = ask("d1", "d2");
    assert_eq!(status, 403);
    assert!(forged.to_string().contains("signature"), "{forged}");

    // Through the API, replica 0 reaches the same verdicts.
    let d = |who: &str| practitioner(&c.data(0), c.url(0, "").trim_end_matches('/'), who);
    let read = |who: &str| get(&d(who), c.url(0, &format!("Patient/{pid}")), None).0;
    assert_eq!(read("d1"), 200);
    assert_eq!(read("d2"), 403);
}

/// `$everything` releases the patient's compartment as scopes and Consents allow: a withheld
/// document is not in it, and the access is audited.
#[test]
fn everything_returns_the_compartment_without_what_consent_withholds() {
    let s = TestServer::start();
    let pid = s.create(&patient("Every", "Thing", "1991-01-01"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let open = s.create(&document(&pid, "open"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = s.create(&document(&pid, "secret"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = s.create(&patient("Other", "Person", "1992-02-02"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.create(&document(&other, "not theirs"));
    s.create(&consent(
        &pid,
        json!({"type": "permit", "provision": [{"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": format!("DocumentReference/{secret}")}}]}]}),
    ));
    let d1 = practitioner(&s.data, &s.base, "d1");
    let (status, b) = get(&d1, s.url(&format!("Patient/{pid}/$everything")), None);
    assert_eq!(status, 200, "{b}");
    let mut got: Vec<String> = resources(&b)
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        format!("Patient/{pid}"),
        format!("DocumentReference/{open}"),
    ];
    want.extend(
        resources(&s.get_json(&format!("Consent?patient={pid}")).1)
            .iter()
            .map(|c| format!("Consent/{}", c["id"].as_str().unwrap())),
    );
    want.sort();
    assert_eq!(got, want);
    assert_eq!(b["total"], want.len());
    // _type narrows; AuditEvents only when asked for, and only for patient/ or system/ scopes.
    let (_, docs) = get(
        &d1,
        s.url(&format!(
            "Patient/{pid}/$everything?_type=DocumentReference"
        )),
        None,
    );
    assert_eq!(match_ids(&docs).len(), 2, "the patient and one document");
    let (_, with_audit) = s.get_json(&format!("Patient/{pid}/$everything?_type=AuditEvent"));
    assert!(resources(&with_audit)
        .iter()
        .any(|r| r["resourceType"] == "AuditEvent"));
    let (status, _) = get(
        &d1,
        s.url(&format!("Patient/{pid}/$everything?_cursor=1")),
        None,
    );
    assert_eq!(status, 400);
    // The access left its AuditEvent, naming the patient.
    let events = audits(
        &s,
        &format!("agent=Practitioner/d1&subtype=operation&patient={pid}"),
    );
    assert!(!events.is_empty());
    let (_, cap) = s.get_json("metadata");
    assert!(cap.to_string().contains("Patient-everything"));
}

//! Search against the real binary: parameter types, prefixes, modifiers, OR/AND, sorting,
//! paging, totals, summaries, compartments and includes.

use fhirmament_e2e::*;

fn ids(s: &TestServer, q: &str) -> Vec<String> {
    let (st, b) = s.get_json(q);
    assert_eq!(st, 200, "{q}: {b}");
    match_ids(&b)
}

struct Seeded {
    s: TestServer,
    peter: String,
    eve: String,
    zoe: String,
    doc: String,
}

fn seed() -> Seeded {
    let s = TestServer::start();
    let mut p = patient("Chalmers", "Peter", "1974-12-25");
    p["identifier"] = json!([{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345", "type": {"text": "Medical record number"}}]);
    p["telecom"] = json!([{"system": "phone", "value": "(03) 5555 6473"}, {"system": "email", "value": "peter@example.org"}]);
    p["address"] = json!([{"city": "PleasantVille", "postalCode": "3999"}]);
    p["active"] = json!(true);
    p["gender"] = json!("male");
    let peter = s.create(&p)["id"].as_str().unwrap().to_string();
    let mut e = patient("Ångström", "Eve", "1980-06-15");
    e["deceasedDateTime"] = json!("2020-03-01T10:00:00Z");
    let eve = s.create(&e)["id"].as_str().unwrap().to_string();
    let zoe = s.create(&patient("Zed", "Zoe", "1980"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let doc = s.create(&json!({
        "resourceType": "DocumentReference", "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "34133-9", "display": "Summary of episode note"}]},
        "subject": {"reference": format!("Patient/{peter}")},
        "date": "2021-04-01T12:00:00Z",
        "content": [{"attachment": {"contentType": "text/plain", "url": "http://example.org/doc/1"}}]
    }))["id"].as_str().unwrap().to_string();
    s.create(&json!({
        "resourceType": "DocumentReference", "status": "superseded",
        "subject": {"reference": format!("Patient/{eve}")},
        "content": [{"attachment": {"contentType": "application/pdf"}}]
    }));
    Seeded {
        s,
        peter,
        eve,
        zoe,
        doc,
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn string_token_date_reference_and_uri_parameters() {
    let Seeded {
        s,
        peter,
        eve,
        zoe,
        doc,
    } = seed();
    // string: starts-with, case- and accent-insensitive; :exact; :contains
    assert_eq!(ids(&s, "Patient?family=chal"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?family=angst"), vec![eve.clone()]);
    assert_eq!(
        ids(&s, "Patient?family:exact=Chalmers"),
        vec![peter.clone()]
    );
    assert!(ids(&s, "Patient?family:exact=chalmers").is_empty());
    assert_eq!(ids(&s, "Patient?name:contains=lmer"), vec![peter.clone()]);
    assert_eq!(
        ids(&s, "Patient?address-city=pleasant"),
        vec![peter.clone()]
    );
    assert_eq!(ids(&s, "Patient?phonetic=Chalmurs"), vec![peter.clone()]);
    // OR with commas, AND with repetition
    assert_eq!(
        ids(&s, "Patient?family=Chal,Zed"),
        sorted(vec![peter.clone(), zoe.clone()])
    );
    assert_eq!(
        ids(&s, "Patient?family=Chal,Zed&given=Zoe"),
        vec![zoe.clone()]
    );
    // token: code, system|code, |code, system|, :text, :not
    assert_eq!(ids(&s, "Patient?identifier=12345"), vec![peter.clone()]);
    assert_eq!(
        ids(
            &s,
            "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|12345"
        ),
        vec![peter.clone()]
    );
    assert!(ids(&s, "Patient?identifier=urn:other|12345").is_empty());
    assert!(ids(&s, "Patient?identifier=|12345").is_empty());
    assert_eq!(
        ids(&s, "Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|"),
        vec![peter.clone()]
    );
    assert_eq!(
        ids(&s, "Patient?identifier:text=medical"),
        vec![peter.clone()]
    );
    assert_eq!(ids(&s, "Patient?gender=male"), vec![peter.clone()]);
    assert_eq!(
        ids(&s, "Patient?gender:not=male"),
        sorted(vec![eve.clone(), zoe.clone()])
    );
    assert_eq!(
        ids(&s, "Patient?email=peter@example.org"),
        vec![peter.clone()]
    );
    assert_eq!(ids(&s, "Patient?phone=(03) 5555 6473"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?active=true"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?deceased=true"), vec![eve.clone()]);
    assert_eq!(ids(&s, &format!("Patient?_id={zoe}")), vec![zoe.clone()]);
    assert_eq!(
        ids(&s, "DocumentReference?type=http://loinc.org|34133-9"),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(&s, "DocumentReference?type:text=summary"),
        vec![doc.clone()]
    );
    // :missing
    assert_eq!(
        ids(&s, "Patient?active:missing=true"),
        sorted(vec![eve.clone(), zoe.clone()])
    );
    assert_eq!(ids(&s, "Patient?active:missing=false"), vec![peter.clone()]);
    // reference: Type/id, bare id, absolute URL, :Type
    assert_eq!(
        ids(&s, &format!("DocumentReference?subject=Patient/{peter}")),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(&s, &format!("DocumentReference?subject={peter}")),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(
            &s,
            &format!(
                "DocumentReference?subject={}",
                s.url(&format!("Patient/{peter}"))
            )
        ),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(&s, &format!("DocumentReference?subject:Patient={peter}")),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(&s, &format!("DocumentReference?patient={peter}")),
        vec![doc.clone()]
    );
    // :identifier matches Reference.identifier
    let by_identifier = s.create(&json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"identifier": {"system": "urn:mrn", "value": "M-77"}}, "content": [{"attachment": {"contentType": "text/plain"}}]}))["id"]
        .as_str().unwrap().to_string();
    assert_eq!(
        ids(&s, "DocumentReference?subject:identifier=urn:mrn|M-77"),
        vec![by_identifier.clone()]
    );
    assert_eq!(
        ids(&s, "DocumentReference?subject:identifier=M-77"),
        vec![by_identifier]
    );
    assert!(ids(&s, "DocumentReference?subject:identifier=urn:other|M-77").is_empty());
    // uri
    assert_eq!(
        ids(&s, "DocumentReference?location=http://example.org/doc/1"),
        vec![doc.clone()]
    );
    assert_eq!(
        ids(&s, "DocumentReference?location:below=http://example.org/"),
        vec![doc.clone()]
    );
}

#[test]
fn date_prefixes_and_precision() {
    let Seeded {
        s, peter, eve, zoe, ..
    } = seed();
    // zoe's birthDate is "1980" (the whole year); eve's is 1980-06-15.
    assert_eq!(ids(&s, "Patient?birthdate=1974-12-25"), vec![peter.clone()]);
    assert_eq!(
        ids(&s, "Patient?birthdate=1980"),
        sorted(vec![eve.clone(), zoe.clone()])
    );
    assert_eq!(ids(&s, "Patient?birthdate=1980-06"), vec![eve.clone()]);
    assert_eq!(ids(&s, "Patient?birthdate=lt1975"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?birthdate=gt1980-06-15"), vec![zoe.clone()]);
    assert_eq!(
        ids(&s, "Patient?birthdate=ge1980-01-01&birthdate=le1980-12-31"),
        sorted(vec![eve.clone(), zoe.clone()])
    );
    assert_eq!(
        ids(&s, "Patient?birthdate=sa1975"),
        sorted(vec![eve.clone(), zoe.clone()])
    );
    assert_eq!(ids(&s, "Patient?birthdate=eb1975"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?birthdate=ne1980"), vec![peter.clone()]);
    // ap: within 10% of the distance from now (about five years here).
    assert_eq!(ids(&s, "Patient?birthdate=ap1972"), vec![peter.clone()]);
    assert_eq!(ids(&s, "Patient?birthdate=ap1976").len(), 3);
    assert_eq!(
        ids(&s, "Patient?death-date=2020-03-01T10:00:00Z"),
        vec![eve.clone()]
    );
    assert_eq!(
        ids(&s, "Patient?death-date=ge2020-03-01T11:00:00%2B02:00"),
        vec![eve.clone()]
    );
    assert!(ids(&s, "Patient?death-date=gt2020-03-01T10:00:01Z").is_empty());
    // _lastUpdated covers everything just written.
    assert_eq!(ids(&s, "Patient?_lastUpdated=gt2000-01-01").len(), 3);
}

#[test]
fn sort_count_paging_total_summary_elements() {
    let Seeded {
        s, peter, eve, zoe, ..
    } = seed();
    let order = |q: &str| -> Vec<String> {
        let (_, b) = s.get_json(q);
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        order("Patient?_sort=birthdate"),
        vec![peter.clone(), zoe.clone(), eve.clone()]
    );
    assert_eq!(
        order("Patient?_sort=-birthdate"),
        vec![zoe.clone(), eve.clone(), peter.clone()]
    );
    assert_eq!(
        order("Patient?_sort=family"),
        vec![eve.clone(), peter.clone(), zoe.clone()]
    );
    // Paging: _count, next/previous links, every match exactly once, stable order.
    let (_, first) = s.get_json("Patient?_sort=birthdate&_count=2");
    assert_eq!(first["total"], 3);
    assert_eq!(first["entry"].as_array().unwrap().len(), 2);
    let next = first["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let second: Value = s.client.get(&next).send().unwrap().json().unwrap();
    assert_eq!(second["entry"].as_array().unwrap().len(), 1);
    assert_eq!(second["entry"][0]["resource"]["id"], eve.as_str());
    assert!(second["link"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["relation"] == "previous"));
    assert!(!second["link"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["relation"] == "next"));
    // _total=none, _summary=count
    assert!(s.get_json("Patient?_total=none").1.get("total").is_none());
    let (_, count) = s.get_json("Patient?_summary=count");
    assert_eq!(count["total"], 3);
    assert!(count.get("entry").is_none());
    // _summary=true keeps summary elements only; _elements keeps what is asked.
    let (_, summary) = s.get_json(&format!("Patient?_id={peter}&_summary=true"));
    let r = &summary["entry"][0]["resource"];
    assert!(r.get("name").is_some() && r.get("telecom").is_some());
    assert!(r["meta"]["tag"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["code"] == "SUBSETTED"));
    let (_, el) = s.get_json(&format!("Patient?_id={peter}&_elements=birthDate"));
    let r = &el["entry"][0]["resource"];
    assert_eq!(r["birthDate"], "1974-12-25");
    assert!(r.get("name").is_none() && r.get("telecom").is_none());
}

#[test]
fn compartments_includes_post_search_and_lenient_handling() {
    let Seeded { s, peter, doc, .. } = seed();
    let (_, b) = s.get_json(&format!("Patient/{peter}/DocumentReference"));
    assert_eq!(match_ids(&b), vec![doc.clone()]);
    let (_, b) = s.get_json(&format!(
        "Patient/{peter}/DocumentReference?status=superseded"
    ));
    assert_eq!(b["total"], 0);
    // _include pulls the subject; _revinclude pulls documents about a patient.
    let (_, b) = s.get_json(&format!(
        "DocumentReference?_id={doc}&_include=DocumentReference:subject"
    ));
    let modes: Vec<(String, String)> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["search"]["mode"].as_str().unwrap().to_string(),
                e["resource"]["resourceType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        vec![
            ("match".into(), "DocumentReference".into()),
            ("include".into(), "Patient".into())
        ]
    );
    let (_, b) = s.get_json(&format!(
        "Patient?_id={peter}&_revinclude=DocumentReference:subject"
    ));
    assert_eq!(b["entry"].as_array().unwrap().len(), 2);
    assert_eq!(b["total"], 1);
    // POST _search takes a form body.
    let r = s
        .client
        .post(s.url("Patient/_search"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("family=chal")
        .send()
        .unwrap();
    assert_eq!(match_ids(&r.json().unwrap()), vec![peter.clone()]);
    // Unknown parameters: 400 by default; ignored (and said so) when lenient.
    assert_outcome(s.get("Patient?family=chal&shoe-size=42"), 400);
    let r = s
        .client
        .get(s.url("Patient?family=chal&shoe-size=42"))
        .header("Prefer", "handling=lenient")
        .send()
        .unwrap();
    let b: Value = r.json().unwrap();
    assert_eq!(match_ids(&b), vec![peter.clone()]);
    let outcome = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert!(outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("shoe-size"));
    // A deleted resource leaves search at once.
    s.client
        .delete(s.url(&format!("DocumentReference/{doc}")))
        .send()
        .unwrap();
    assert!(ids(&s, &format!("DocumentReference?subject=Patient/{peter}")).is_empty());
}

#[test]
fn updates_move_index_entries() {
    let s = TestServer::start();
    let mut p = s.create(&patient("Before", "B", "1990-01-01"));
    let id = p["id"].as_str().unwrap().to_string();
    p["name"][0]["family"] = json!("After");
    assert_eq!(s.put(&format!("Patient/{id}"), &p).status(), 200);
    assert!(ids(&s, "Patient?family=Before").is_empty());
    assert_eq!(ids(&s, "Patient?family=After"), vec![id]);
}

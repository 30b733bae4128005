//! Sealed versions as objects: one storage contract, held by the embedded RocksDB store and by
//! an S3-compatible store (a real Garage server); and a server that keeps its records in S3.

use fhirmament::error::Error;
use fhirmament::store::envelope::Kek;
use fhirmament::store::objects::{object_name, ObjectName, Objects, S3Objects};
use fhirmament::store::Store;
use fhirmament_e2e::*;

/// A bucket opened with the server's S3 environment, as `object_store` settings.
fn try_open_s3(g: &Garage, url: &str) -> Result<S3Objects, Error> {
    let settings: Vec<(String, String)> = g
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_lowercase(), v))
        .collect();
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    S3Objects::open_with(url, &settings)
}

fn open_s3(g: &Garage, url: &str) -> S3Objects {
    try_open_s3(g, url).expect("the bucket answers")
}

/// What every object store must do, whoever implements it. `tamper` replaces an object's bytes
/// behind the store's back.
fn storage_contract(store: &Store, tamper: &dyn Fn(&ObjectName, Vec<u8>)) {
    let objects: Vec<Vec<u8>> = vec![
        b"eyJhbGciOiJkaXIifQ..iv.ciphertext.tag".to_vec(),
        vec![7u8; 1 << 20],
        (0..=255u8).cycle().take(70_001).collect(),
    ];
    let named: Vec<(ObjectName, Vec<u8>)> = objects
        .iter()
        .map(|o| (object_name(o), o.clone()))
        .collect();
    assert_eq!(store.object(&named[0].0).unwrap(), None, "not there yet");
    store.put_objects(named.clone()).unwrap();
    for (name, bytes) in &named {
        assert_eq!(store.object(name).unwrap().as_ref(), Some(bytes));
    }
    // Content-addressed: storing the same object again changes nothing.
    store.put_objects(vec![named[2].clone()]).unwrap();
    assert_eq!(store.object(&named[2].0).unwrap(), Some(objects[2].clone()));
    assert_eq!(store.object(&object_name(b"never stored")).unwrap(), None);
    // Bytes changed behind the store's back no longer match their name: refused.
    let mut changed = objects[0].clone();
    changed[3] ^= 1;
    tamper(&named[0].0, changed);
    match store.object(&named[0].0) {
        Err(Error::Integrity(m)) => assert!(m.contains("does not match its name"), "{m}"),
        other => panic!("tampered bytes were not refused: {other:?}"),
    }
    assert_eq!(store.object(&named[1].0).unwrap(), Some(objects[1].clone()));
}

#[test]
fn rocksdb_and_s3_hold_the_same_storage_contract() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = Store::open(&dir.path().join("rocks"), Kek::generate().unwrap().0).unwrap();
    assert!(embedded.objects().is_embedded());
    storage_contract(&embedded, &|name, bytes| {
        embedded.overwrite_object_for_test(name, bytes).unwrap()
    });

    let garage = Garage::start();
    let url = format!("s3://{}/contract", garage.bucket);
    let mut s3 = Store::open(&dir.path().join("s3"), Kek::generate().unwrap().0).unwrap();
    s3.set_objects(Objects::S3(open_s3(&garage, &url)));
    let raw = open_s3(&garage, &url);
    storage_contract(&s3, &|name, bytes| {
        s3.overwrite_object_for_test(name, bytes).unwrap()
    });
    assert_eq!(raw.names().unwrap().len(), 3, "every object, once");
    assert!(
        s3.dump(fhirmament::store::CF_OBJECTS).unwrap().is_empty(),
        "nothing went to the local families"
    );

    // A bucket that does not exist is a clear startup error.
    match try_open_s3(&garage, "s3://no-such-bucket") {
        Err(Error::Startup(m)) => assert!(m.contains("no-such-bucket"), "{m}"),
        Err(e) => panic!("not a startup error: {e:?}"),
        Ok(_) => panic!("a missing bucket was accepted"),
    }
}

#[test]
fn a_server_keeps_its_sealed_records_in_s3() {
    let garage = Garage::start();
    let url = format!("s3://{}/node-0", garage.bucket);
    let env = garage.env();
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    let mut s = TestServer::start_with_env(&["--object-store", &url], &env);

    let mut p = patient("Objectstorsson", "Gudrun", "1944-04-04");
    p["identifier"] = json!([{"system": "urn:mrn", "value": "MRN-S3-0042"}]);
    let created = s.create(&p);
    let id = created["id"].as_str().unwrap().to_string();
    let mut v2 = created.clone();
    v2["name"][0]["given"] = json!(["Gudrun", "Maria"]);
    assert_eq!(s.put(&format!("Patient/{id}"), &v2).status().as_u16(), 200);
    let (status, read) = s.get_json(&format!("Patient/{id}"));
    assert_eq!(status, 200);
    assert_eq!(read["name"][0]["given"][1], "Maria");
    let (_, found) = s.get_json("Patient?family=objectstors");
    assert_eq!(match_ids(&found), vec![id.clone()]);
    let (_, history) = s.get_json(&format!("Patient/{id}/_history"));
    assert_eq!(resources(&history).len(), 2);

    // Restarted, the node reads its records back from the bucket.
    s.kill9();
    s.launch();
    let (status, v1) = s.get_json(&format!("Patient/{id}/_history/1"));
    assert_eq!(status, 200);
    assert_eq!(v1["name"][0]["given"], json!(["Gudrun"]));

    // The objects are in the bucket (both versions and the AuditEvents), none on local disk;
    // none of them holds the record in clear.
    s.kill9();
    let bucket = open_s3(&garage, &url);
    let names = bucket.names().unwrap();
    assert!(names.len() >= 4, "{} objects", names.len());
    let mut store = Store::open(&s.data, kek_of(&s)).unwrap();
    store.set_objects(Objects::S3(open_s3(&garage, &url)));
    for name in &names {
        let bytes = store.object(name).unwrap().expect("listed, so there");
        let text = String::from_utf8_lossy(&bytes);
        for clear in ["Objectstorsson", "Gudrun", "MRN-S3-0042"] {
            assert!(!text.contains(clear), "{clear} in clear in the bucket");
        }
    }
    assert!(
        store
            .dump(fhirmament::store::CF_OBJECTS)
            .unwrap()
            .is_empty(),
        "no sealed version on local disk"
    );
    let mut key = format!("Patient\0{id}\0").into_bytes();
    key.extend_from_slice(&1u64.to_be_bytes());
    let (_, entry) = store
        .dump(fhirmament::store::CF_VERSIONS)
        .unwrap()
        .into_iter()
        .find(|(k, _)| **k == key[..])
        .expect("version 1");
    let version_1 = <ObjectName>::try_from(&entry[17..]).unwrap();
    assert!(names.contains(&version_1));

    // One flipped byte in the bucket: that version fails closed, the current one still reads.
    let mut bytes = store.object(&version_1).unwrap().unwrap();
    drop(store);
    let at = bytes.len() - 4;
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    bucket.overwrite_for_test(&version_1, bytes).unwrap();
    drop(bucket);
    s.launch();
    let r = s.get(&format!("Patient/{id}/_history/1"));
    assert_eq!(r.status().as_u16(), 500);
    let outcome: Value = r.json().unwrap();
    assert!(
        outcome.to_string().contains("does not decrypt"),
        "{outcome}"
    );
    assert!(!outcome.to_string().contains("Gudrun"));
    let (status, current) = s.get_json(&format!("Patient/{id}"));
    assert_eq!(status, 200);
    assert_eq!(current["name"][0]["given"][1], "Maria");

    // Without the bucket's credentials the node refuses to start, and says why.
    s.kill9();
    let out = std::process::Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--object-store", &url])
        .arg("--data-dir")
        .arg(&s.data)
        .env("AWS_ENDPOINT", &garage.endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "garage")
        .env("AWS_ACCESS_KEY_ID", "GK00000000000000000000dead")
        .env("AWS_SECRET_ACCESS_KEY", "0".repeat(64))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("object store"), "{said}");
}

/// The KEK a test server created beside its data directory.
fn kek_of(s: &TestServer) -> Kek {
    Kek::from_jwk(&std::fs::read_to_string(s.data.with_extension("kek")).unwrap()).unwrap()
}

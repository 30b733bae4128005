//! SMART App Launch 2.x end to end, the way a browser and an app drive it: discovery, the
//! authorize → login → approve pages, PKCE, tokens, refresh, introspection, revocation, EHR
//! launch and backend services — and the attacks a server must refuse.

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use fhirmament_e2e::*;
use sha2::{Digest, Sha256};

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const PASSWORD: &str = "correct horse battery";

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn cli(s: &TestServer, args: &[&str]) {
    let out = Command::new(binary())
        .args(args)
        .arg("--data-dir")
        .arg(&s.data)
        .env("FHIRMAMENT_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct World {
    s: TestServer,
    a: String,
    b: String,
    doc_a: String,
    doc_b: String,
    browser: Client,
}

/// A server with two patients, a document each, a patient user for A, a practitioner, a
/// public app and a confidential app.
fn world() -> World {
    let s = TestServer::start();
    let a = s.create(&patient("Alpha", "Ann", "1980-01-01"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = s.create(&patient("Beta", "Bob", "1981-02-02"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let doc = |p: &str| {
        json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{p}")},
        "content": [{"attachment": {"contentType": "text/plain", "data": "aGVsbG8="}}]})
    };
    let doc_a = s.create(&doc(&a))["id"].as_str().unwrap().to_string();
    let doc_b = s.create(&doc(&b))["id"].as_str().unwrap().to_string();
    cli(
        &s,
        &[
            "users",
            "add",
            "--username",
            "ann",
            "--role",
            "patient",
            "--fhir-user",
            &format!("Patient/{a}"),
        ],
    );
    cli(
        &s,
        &[
            "users",
            "add",
            "--username",
            "drx",
            "--role",
            "practitioner",
            "--fhir-user",
            "Practitioner/p1",
        ],
    );
    cli(&s, &["clients", "add", "--client-id", "app", "--public", "--redirect-uri", REDIRECT,
        "--scope", "launch launch/patient openid fhirUser offline_access patient/*.rs patient/Consent.cruds user/*.rs"]);
    cli(
        &s,
        &[
            "clients",
            "add",
            "--client-id",
            "conf",
            "--secret",
            "s3cret-s3cret",
            "--redirect-uri",
            REDIRECT,
            "--scope",
            "launch/patient openid fhirUser offline_access patient/*.rs",
        ],
    );
    let browser = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    World {
        s,
        a,
        b,
        doc_a,
        doc_b,
        browser,
    }
}

fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    Some(html[start..].split('"').next()?.to_string())
}

fn query_param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce() -> Pkce {
    let verifier = b64url(&Sha256::digest(
        format!("{:?}", std::time::Instant::now()).as_bytes(),
    )) + "-padding-to-be-long-enough";
    let challenge = b64url(&Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

impl World {
    fn url(&self, path: &str) -> String {
        self.s.url(path)
    }

    /// Open the authorize URL; answer the login and approval pages. Returns the final redirect.
    fn launch(
        &self,
        client: &str,
        user: &str,
        scope: &str,
        challenge: &str,
        extra: &[(&str, &str)],
        patient: Option<&str>,
    ) -> String {
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", client),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "st-123 &x"),
            ("aud", self.s.base.as_str()),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ];
        params.extend_from_slice(extra);
        let r = self
            .browser
            .get(self.url("auth/authorize"))
            .query(&params)
            .send()
            .unwrap();
        if r.status().as_u16() == 302 {
            return r.headers()["location"].to_str().unwrap().to_string();
        }
        assert_eq!(r.status().as_u16(), 200, "the login page");
        let html = r.text().unwrap();
        let txn = hidden(&html, "txn").expect("txn on the login page");
        let r = self
            .browser
            .post(self.url("auth/login"))
            .form(&[
                ("txn", txn.as_str()),
                ("username", user),
                ("password", PASSWORD),
            ])
            .send()
            .unwrap();
        let html = r.text().unwrap();
        assert!(html.contains("Approve"), "approval page: {html}");
        let txn = hidden(&html, "txn").unwrap();
        let mut form: Vec<(&str, String)> = vec![("txn", txn), ("decision", "approve".into())];
        for s in scope.split_whitespace() {
            if html.contains(&format!("value=\"{s}\"")) {
                form.push(("scope", s.to_string()));
            }
        }
        if let Some(p) = patient {
            form.push(("patient", p.to_string()));
        }
        let r = self
            .browser
            .post(self.url("auth/approve"))
            .form(&form)
            .send()
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            302,
            "approval redirects back to the app"
        );
        r.headers()["location"].to_str().unwrap().to_string()
    }

    fn token(&self, form: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = self
            .browser
            .post(self.url("auth/token"))
            .form(form)
            .send()
            .unwrap();
        let (s, h) = (r.status().as_u16(), r.headers().clone());
        (s, h, r.json().unwrap_or(Value::Null))
    }

    fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self
            .browser
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap_or(Value::Null))
    }

    /// A full standalone launch of the public app by `user`; the token response.
    fn login(&self, user: &str, scope: &str, patient: Option<&str>) -> Value {
        let p = pkce();
        let back = self.launch("app", user, scope, &p.challenge, &[], patient);
        let code = query_param(&back, "code").unwrap_or_else(|| panic!("no code in {back}"));
        let (s, _, body) = self.token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", "app"),
            ("code_verifier", &p.verifier),
        ]);
        assert_eq!(s, 200, "{body}");
        body
    }
}

#[test]
fn discovery_and_the_capability_statement_are_public_and_complete() {
    let w = world();
    let anon = Client::new();
    let r = anon
        .get(w.url(".well-known/smart-configuration"))
        .header("Accept", "application/fhir+json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let c: Value = r.json().unwrap();
    for f in [
        "authorization_endpoint",
        "token_endpoint",
        "introspection_endpoint",
        "revocation_endpoint",
        "jwks_uri",
        "issuer",
    ] {
        assert!(
            c[f].as_str()
                .is_some_and(|u| u.starts_with("http://127.0.0.1")),
            "{f}: {c}"
        );
    }
    assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
    for cap in [
        "launch-standalone",
        "launch-ehr",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "context-standalone-patient",
        "context-ehr-patient",
        "permission-offline",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
        "authorize-post",
    ] {
        assert!(
            c["capabilities"].as_array().unwrap().contains(&json!(cap)),
            "{cap}"
        );
    }
    assert!(c["grant_types_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("authorization_code")));
    let oidc: Value = anon
        .get(w.url(".well-known/openid-configuration"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(oidc["issuer"], c["issuer"]);
    assert!(oidc["id_token_signing_alg_values_supported"]
        .as_array()
        .unwrap()
        .contains(&json!("RS256")));
    let jwks: Value = anon
        .get(c["jwks_uri"].as_str().unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "RSA");
    assert!(jwks["keys"][0].get("d").is_none(), "no private parts");
    let (s, cs) = {
        let r = anon.get(w.url("metadata")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(s, 200);
    let sec = &cs["rest"][0]["security"];
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &sec["extension"][0]["extension"];
    assert_eq!(uris[0]["valueUri"], c["authorization_endpoint"]);
    assert_eq!(uris[1]["valueUri"], c["token_endpoint"]);
}

#[test]
fn a_patient_launch_with_pkce_sees_only_that_patients_records() {
    let w = world();
    let t = w.login(
        "ann",
        "launch/patient openid fhirUser offline_access patient/*.rs",
        None,
    );
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["patient"], json!(w.a));
    assert!(t["expires_in"].as_u64().unwrap() > 0);
    assert_eq!(
        t["scope"],
        "launch/patient openid fhirUser offline_access patient/*.rs"
    );
    assert!(t["refresh_token"].is_string() && t["id_token"].is_string());
    let id_claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t["id_token"].as_str().unwrap().split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(id_claims["aud"], "app");
    assert!(id_claims["fhirUser"]
        .as_str()
        .unwrap()
        .ends_with(&format!("Patient/{}", w.a)));
    let at = t["access_token"].as_str().unwrap();
    let (a, b) = (&w.a, &w.b);

    assert_eq!(w.get_as(at, &format!("Patient/{a}")).0, 200);
    assert_eq!(
        w.get_as(at, &format!("DocumentReference/{}", w.doc_a)).0,
        200
    );
    for path in [
        format!("Patient/{b}"),
        format!("Patient/{b}/_history/1"),
        format!("Patient/{b}/_history"),
        format!("DocumentReference/{}", w.doc_b),
    ] {
        let (s, body) = w.get_as(at, &path);
        assert_eq!(s, 403, "{path}: {body}");
        assert_eq!(body["resourceType"], "OperationOutcome");
    }
    // Searches are narrowed in the query: totals count only what the token may see.
    let (s, all) = w.get_as(at, "Patient?_total=accurate");
    assert_eq!(s, 200);
    assert_eq!(
        (match_ids(&all), all["total"].clone()),
        (vec![a.clone()], json!(1))
    );
    let (_, docs) = w.get_as(
        at,
        "DocumentReference?_include=DocumentReference:subject&_total=accurate",
    );
    assert_eq!(docs["total"], 1);
    let ids: Vec<String> = resources(&docs)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&w.doc_a) && ids.contains(a) && !ids.contains(b) && !ids.contains(&w.doc_b),
        "{docs}"
    );
    let (_, rev) = w.get_as(
        at,
        &format!("Patient?_id={a},{b}&_revinclude=DocumentReference:subject"),
    );
    let ids: Vec<String> = resources(&rev)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.contains(b) && !ids.contains(&w.doc_b), "{rev}");
    // Another patient's compartment is empty; writes need write scopes.
    let (_, other) = w.get_as(at, &format!("Patient/{b}/DocumentReference"));
    assert!(match_ids(&other).is_empty(), "{other}");
    let r = w.browser.post(w.url("Consent")).bearer_auth(at).header("Content-Type", FHIR_JSON)
        .body(json!({"resourceType": "Consent", "status": "active", "scope": {"coding": [{"code": "patient-privacy"}]},
            "category": [{"text": "x"}], "patient": {"reference": format!("Patient/{a}")}}).to_string()).send().unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Each entry of a batch is checked on its own; a transaction fails as a whole.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{a}")}},
        {"request": {"method": "GET", "url": format!("Patient/{b}")}}]});
    let r = w
        .browser
        .post(w.url(""))
        .bearer_auth(at)
        .header("Content-Type", FHIR_JSON)
        .body(batch.to_string())
        .send()
        .unwrap();
    let out: Value = r.json().unwrap();
    assert_eq!(out["entry"][0]["response"]["status"], "200 OK");
    assert!(
        out["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("403"),
        "{out}"
    );
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": b, "name": [{"family": "Hijacked"}]},
         "request": {"method": "PUT", "url": format!("Patient/{b}")}}]});
    let r = w
        .browser
        .post(w.url(""))
        .bearer_auth(at)
        .header("Content-Type", FHIR_JSON)
        .body(tx.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(
        w.s.get_json(&format!("Patient/{b}")).1["name"][0]["family"],
        "Beta"
    );

    // Introspection, refresh (narrowing only, single use), revocation.
    let r = w
        .browser
        .post(w.url("auth/introspect"))
        .bearer_auth(at)
        .form(&[("token", at)])
        .send()
        .unwrap();
    let info: Value = r.json().unwrap();
    assert_eq!(
        (
            info["active"].as_bool(),
            info["patient"].as_str(),
            info["client_id"].as_str()
        ),
        (Some(true), Some(a.as_str()), Some("app"))
    );
    let r = w
        .browser
        .post(w.url("auth/introspect"))
        .bearer_auth(at)
        .form(&[("token", "not-a-token")])
        .send()
        .unwrap();
    assert_eq!(r.json::<Value>().unwrap(), json!({"active": false}));
    let rt = t["refresh_token"].as_str().unwrap();
    let (s, _, err) = w.token(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("client_id", "app"),
        ("scope", "patient/*.rs user/*.rs"),
    ]);
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_scope")),
        "no escalation on refresh"
    );
    let (s, h, t2) = w.token(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("client_id", "app"),
        ("scope", "patient/Patient.rs"),
    ]);
    // The escalation attempt spent nothing; a narrowing refresh works.
    assert_eq!(s, 200, "{t2}");
    assert_eq!(t2["scope"], "patient/Patient.rs");
    assert!(
        h["cache-control"].to_str().unwrap().contains("no-store")
            && h["pragma"].to_str().unwrap().contains("no-cache")
    );
    let narrow = t2["access_token"].as_str().unwrap();
    assert_eq!(
        w.get_as(narrow, &format!("DocumentReference/{}", w.doc_a))
            .0,
        403
    );
    let (s, _, err) = w.token(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("client_id", "app"),
    ]);
    assert_eq!(
        (s, err["error"].as_str()),
        (400, Some("invalid_grant")),
        "a spent refresh token is refused"
    );
    let r = w
        .browser
        .post(w.url("auth/revoke"))
        .form(&[("token", at), ("client_id", "app")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, _) = w.get_as(at, &format!("Patient/{a}"));
    assert_eq!(s, 401, "a revoked token no longer works");
}

#[test]
fn the_authorize_and_token_endpoints_refuse_what_smart_forbids() {
    let w = world();
    let p = pkce();
    let scope = "launch/patient patient/*.rs";
    // State comes back unchanged.
    let back = w.launch("app", "ann", scope, &p.challenge, &[], None);
    assert_eq!(query_param(&back, "state").as_deref(), Some("st-123 &x"));
    let code = query_param(&back, "code").unwrap();
    let tok = |code: &str, verifier: Option<&str>| {
        let mut f = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", "app"),
        ];
        if let Some(v) = verifier {
            f.push(("code_verifier", v));
        }
        w.token(&f)
    };
    // PKCE: missing, empty, wrong, and the challenge itself ("plain" downgrade): each code dies.
    for v in [
        None,
        Some(""),
        Some("wrong-verifier-wrong-verifier-wrong-verifier-x"),
        Some(p.challenge.as_str()),
    ] {
        let p2 = pkce();
        let code = query_param(
            &w.launch("app", "ann", scope, &p2.challenge, &[], None),
            "code",
        )
        .unwrap();
        let (s, _, e) = tok(&code, v);
        assert_eq!(
            (s, e["error"].as_str()),
            (400, Some("invalid_grant")),
            "verifier {v:?}"
        );
    }
    let (s, _, _) = tok(&code, Some(&p.verifier));
    assert_eq!(s, 200);
    let (s, _, e) = tok(&code, Some(&p.verifier));
    assert_eq!(
        (s, e["error"].as_str()),
        (400, Some("invalid_grant")),
        "a code works once"
    );
    let (s, _, _) = tok("BAD_CODE", Some(&p.verifier));
    assert_eq!(s, 400);
    let (s, _, e) = w.token(&[
        ("grant_type", "authorization_code"),
        ("code", "x"),
        ("redirect_uri", REDIRECT),
        ("client_id", "BAD_CLIENT_ID"),
        ("code_verifier", &p.verifier),
    ]);
    assert!(s == 400 || s == 401, "{e}");
    // A confidential client must authenticate; a wrong secret is refused.
    let (s, _, _) = w.token(&[
        ("grant_type", "authorization_code"),
        ("code", "x"),
        ("redirect_uri", REDIRECT),
        ("client_id", "conf"),
        ("code_verifier", &p.verifier),
    ]);
    assert_eq!(s, 401);
    let r = w
        .browser
        .post(w.url("auth/token"))
        .basic_auth("conf", Some("wrong"))
        .form(&[("grant_type", "authorization_code"), ("code", "x")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // plain PKCE, no PKCE, foreign aud: an error goes back to the app and no code is issued.
    for extra in [
        vec![("code_challenge_method", "plain")],
        vec![("code_challenge", "")],
        vec![("aud", "https://evil.example/fhir")],
    ] {
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "s1"),
            ("aud", w.s.base.as_str()),
            ("code_challenge", p.challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        for (k, v) in &extra {
            params.retain(|(n, _)| n != k);
            params.push((k, v));
        }
        let r = w
            .browser
            .get(w.url("auth/authorize"))
            .query(&params)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 302, "{extra:?}");
        let loc = r.headers()["location"].to_str().unwrap();
        assert!(
            loc.starts_with(REDIRECT)
                && query_param(loc, "error").is_some()
                && query_param(loc, "code").is_none(),
            "{loc}"
        );
        assert_eq!(query_param(loc, "state").as_deref(), Some("s1"));
    }
    // A foreign redirect_uri is never redirected to.
    let r = w
        .browser
        .get(w.url("auth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", "https://evil.example/cb"),
            ("scope", scope),
            ("aud", w.s.base.as_str()),
            ("code_challenge", p.challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.headers().get("location").is_none());
    // Unknown grant types.
    let (s, _, e) = w.token(&[("grant_type", "not_a_grant_type"), ("client_id", "app")]);
    assert_eq!(
        (s, e["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    // Repeated wrong passwords lock the account, even for the right one afterwards.
    let r = w
        .browser
        .get(w.url("auth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("aud", w.s.base.as_str()),
            ("code_challenge", p.challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .unwrap();
    let txn = hidden(&r.text().unwrap(), "txn").unwrap();
    for _ in 0..5 {
        let html = w
            .browser
            .post(w.url("auth/login"))
            .form(&[
                ("txn", txn.as_str()),
                ("username", "drx"),
                ("password", "nope"),
            ])
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(!html.contains("Approve"));
    }
    let html = w
        .browser
        .post(w.url("auth/login"))
        .form(&[
            ("txn", txn.as_str()),
            ("username", "drx"),
            ("password", PASSWORD),
        ])
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(html.contains("too many failed attempts"), "{html}");
}

/// The backend-services client tool (`python/client_assertion.py`: keygen, sign); stdout.
fn client_assertion(args: &[&str]) -> String {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/client_assertion.py");
    python3(&[&[script.to_str().expect("utf-8 path")], args].concat())
}

#[test]
fn forged_expired_misdirected_and_missing_tokens_get_401() {
    let w = world();
    let path = format!("Patient/{}", w.a);
    let r = Client::new().get(w.url(&path)).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer realm=\"fhirmament\""
    );
    let mut refused = vec![];
    // Expired.
    let expired = mint_token(&w.s.data, &w.s.base, "system/*.rs", &["--ttl-seconds", "1"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused.push(("expired", expired));
    // Another audience (a token minted for a different server URL).
    refused.push((
        "wrong aud",
        mint_token(&w.s.data, "http://127.0.0.1:1/fhir", "system/*.rs", &[]),
    ));
    let good = mint_token(&w.s.data, &w.s.base, "system/*.rs", &[]);
    let parts: Vec<&str> = good.split('.').collect();
    // alg none.
    refused.push((
        "alg none",
        format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), parts[1]),
    ));
    // A changed payload under the original signature.
    let mut claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    claims["scope"] = json!("system/*.cruds");
    refused.push((
        "bad signature",
        format!(
            "{}.{}.{}",
            parts[0],
            b64url(claims.to_string().as_bytes()),
            parts[2]
        ),
    ));
    // HS256 keyed with the server's public key (RSA/HMAC confusion), from the published JWKS.
    let jwks = Client::new()
        .get(w.url("auth/jwks"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let hs = python(
        r#"
import sys, json, hmac, hashlib, base64
from jwt.algorithms import RSAAlgorithm
from cryptography.hazmat.primitives import serialization
key = RSAAlgorithm.from_jwk(json.dumps(json.loads(sys.argv[1])["keys"][0]))
pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = sys.argv[2]
sig = b(hmac.new(pem, (h + "." + p).encode(), hashlib.sha256).digest())
print(h + "." + p + "." + sig)
"#,
        &[&jwks, parts[1]],
    );
    refused.push(("HS256 with the public key", hs));
    refused.push(("garbage", "not.a.jwt".to_string()));
    for (what, token) in refused {
        let r = Client::new()
            .get(w.url(&path))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{what}");
        let challenge = r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.contains("invalid_token"), "{what}: {challenge}");
        let body: Value = r.json().unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{what}");
    }
    assert_eq!(w.get_as(&good, &path).0, 200);
    // A read-only token cannot write.
    let r = w
        .browser
        .delete(w.url(&path))
        .bearer_auth(&good)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

#[test]
fn backend_services_authenticate_with_a_signed_jwt_and_get_system_scopes_only() {
    let w = world();
    let keys = tempfile::tempdir().unwrap();
    let run = client_assertion;
    let dir = keys.path().to_str().unwrap();
    run(&["keygen", dir, "ES384"]);
    cli(
        &w.s,
        &[
            "clients",
            "add",
            "--client-id",
            "bulk",
            "--jwks",
            &format!("{dir}/jwks.json"),
            "--scope",
            "system/*.rs",
        ],
    );
    let token_url = w.url("auth/token");
    let assertion = |extra: &[&str]| {
        let mut a = vec!["sign", dir, "bulk", token_url.as_str()];
        a.extend_from_slice(extra);
        run(&a)
    };
    let grant = |assertion: &str, scope: &str| {
        w.token(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ])
    };
    let a1 = assertion(&[]);
    let (s, h, t) = grant(&a1, "system/*.rs");
    assert_eq!(s, 200, "{t}");
    assert!(h["cache-control"].to_str().unwrap().contains("no-store"));
    assert_eq!(t["scope"], "system/*.rs");
    assert!(
        t["refresh_token"].is_null(),
        "no refresh token for backend services"
    );
    assert!(t["expires_in"].as_u64().unwrap() <= 300);
    let at = t["access_token"].as_str().unwrap();
    let (s, all) = w.get_as(at, "Patient?_total=accurate");
    assert_eq!((s, all["total"].as_u64()), (200, Some(2)));
    let r = w
        .browser
        .delete(w.url(&format!("Patient/{}", w.a)))
        .bearer_auth(at)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "read-only system scope");
    // Replayed jti, expired, wrong audience, wrong key: invalid_client.
    let (s, _, e) = grant(&a1, "system/*.rs");
    assert_eq!(
        (s, e["error"].as_str()),
        (401, Some("invalid_client")),
        "replayed jti"
    );
    let (s, _, _) = grant(&assertion(&["--exp-in", "-10"]), "system/*.rs");
    assert_eq!(s, 401, "expired assertion");
    let (s, _, _) = grant(
        &run(&["sign", dir, "bulk", "https://elsewhere.example/token"]),
        "system/*.rs",
    );
    assert_eq!(s, 401, "assertion for another token endpoint");
    let other = tempfile::tempdir().unwrap();
    run(&["keygen", other.path().to_str().unwrap(), "ES384"]);
    let (s, _, _) = grant(
        &run(&["sign", other.path().to_str().unwrap(), "bulk", &token_url]),
        "system/*.rs",
    );
    assert_eq!(s, 401, "signed with a key the client did not register");
    // Scopes beyond the registration are not granted.
    let (s, _, e) = grant(&assertion(&[]), "system/*.cruds");
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_scope")));
    let (s, _, _) = w.token(&[
        ("grant_type", "client_credentials"),
        ("scope", "system/*.rs"),
        ("client_assertion_type", "not_an_assertion_type"),
        ("client_assertion", &assertion(&[])),
    ]);
    assert!(s == 400 || s == 401);
}

#[test]
fn an_ehr_launch_binds_the_patient_the_ehr_chose() {
    let w = world();
    let r = w
        .browser
        .post(w.url("auth/launch"))
        .bearer_auth(&w.s.token)
        .form(&[("patient", w.b.as_str())])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let launch: Value = r.json().unwrap();
    let l = launch["launch"].as_str().unwrap().to_string();
    let p = pkce();
    let back = w.launch(
        "app",
        "drx",
        "launch openid fhirUser patient/*.rs",
        &p.challenge,
        &[("launch", l.as_str())],
        None,
    );
    let code = query_param(&back, "code").unwrap_or_else(|| panic!("{back}"));
    let (s, _, t) = w.token(&[
        ("grant_type", "authorization_code"),
        ("code", &code),
        ("redirect_uri", REDIRECT),
        ("client_id", "app"),
        ("code_verifier", &p.verifier),
    ]);
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["patient"], json!(w.b));
    let at = t["access_token"].as_str().unwrap();
    assert_eq!(w.get_as(at, &format!("Patient/{}", w.b)).0, 200);
    assert_eq!(w.get_as(at, &format!("Patient/{}", w.a)).0, 403);
    // A launch value works once.
    let back = w.launch(
        "app",
        "drx",
        "launch patient/*.rs",
        &p.challenge,
        &[("launch", l.as_str())],
        None,
    );
    assert!(query_param(&back, "error").is_some(), "{back}");
    // A practitioner's standalone launch picks an existing patient.
    let t = w.login("drx", "launch/patient patient/*.rs", Some(&w.a));
    assert_eq!(t["patient"], json!(w.a));
}

#[test]
fn smarts_python_fhirclient_drives_a_standalone_launch_unmodified() {
    let w = world();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/smart_launch.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            w.s.base.as_str(),
            REDIRECT,
            "ann",
            PASSWORD,
            w.a.as_str(),
            w.b.as_str(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("smart launch: ok"), "{stdout}");
}

#[test]
fn dynamic_registration_needs_the_initial_access_token_and_yields_a_working_client() {
    let s = TestServer::start_with(&["--registration-token", "let-me-register"]);
    let c = Client::new();
    let url = s.url("auth/register");
    let meta = json!({"client_name": "Registered", "redirect_uris": [REDIRECT],
        "token_endpoint_auth_method": "client_secret_basic", "scope": "launch/patient openid patient/*.rs"});
    let post = |token: Option<&str>, body: &Value| {
        let mut r = c
            .post(&url)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    assert_eq!(post(None, &meta).0, 401);
    assert_eq!(post(Some("guess"), &meta).0, 401);
    let (st, reg) = post(Some("let-me-register"), &meta);
    assert_eq!(st, 201, "{reg}");
    let (id, secret) = (
        reg["client_id"].as_str().unwrap(),
        reg["client_secret"].as_str().unwrap(),
    );
    // The new client authenticates with its secret at the token endpoint (a bad code is then
    // the only problem: 400, not 401).
    let r = c
        .post(s.url("auth/token"))
        .basic_auth(id, Some(secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "nope"),
            ("redirect_uri", REDIRECT),
            ("code_verifier", "x"),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c
        .post(s.url("auth/token"))
        .basic_auth(id, Some("wrong"))
        .form(&[("grant_type", "authorization_code"), ("code", "nope")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // What registration refuses.
    let mut evil = meta.clone();
    evil["redirect_uris"] = json!(["http://evil.example/cb"]);
    assert_eq!(
        post(Some("let-me-register"), &evil).1["error"],
        "invalid_redirect_uri"
    );
    let mut system = meta.clone();
    system["scope"] = json!("system/*.rs");
    assert_eq!(
        post(Some("let-me-register"), &system).1["error"],
        "invalid_client_metadata"
    );
    // Without a configured initial access token, registration is off.
    let plain = TestServer::start();
    let r = c
        .post(plain.url("auth/register"))
        .bearer_auth("let-me-register")
        .body(meta.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

/// RFC 6238 (SHA-1, 6 digits, 30 s) with Python's standard library: an authenticator app.
const TOTP_PY: &str = r#"
import base64, hashlib, hmac, struct, sys, time
key = base64.b32decode(sys.argv[1] + "=" * (-len(sys.argv[1]) % 8))
counter = int(time.time()) // 30
mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
o = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7fffffff) % 1000000))
"#;

#[test]
fn a_user_with_a_second_factor_needs_the_current_one_time_code() {
    let w = world();
    let out = Command::new(binary())
        .args([
            "users",
            "add",
            "--username",
            "tina",
            "--role",
            "practitioner",
            "--totp",
            "--data-dir",
        ])
        .arg(&w.s.data)
        .env("FHIRMAMENT_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains("otpauth://totp/Fhirmament:tina?secret="),
        "{stdout}"
    );
    let secret = stdout
        .lines()
        .find_map(|l| l.strip_prefix("totp secret "))
        .unwrap()
        .trim()
        .to_string();
    let p = pkce();
    let r = w
        .browser
        .get(w.url("auth/authorize"))
        .query(&[
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", REDIRECT),
            ("scope", "user/*.rs"),
            ("aud", w.s.base.as_str()),
            ("code_challenge", p.challenge.as_str()),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .unwrap();
    let txn = hidden(&r.text().unwrap(), "txn").unwrap();
    let attempt = |otp: &str| {
        w.browser
            .post(w.url("auth/login"))
            .form(&[
                ("txn", txn.as_str()),
                ("username", "tina"),
                ("password", PASSWORD),
                ("otp", otp),
            ])
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    assert!(
        attempt("").contains("one-time code"),
        "the password alone is not enough"
    );
    assert!(attempt("000000").contains("one-time code"));
    let code = python(TOTP_PY, &[&secret]);
    let html = attempt(&code);
    assert!(html.contains("Approve"), "{html}");
}

#[test]
fn patient_write_scopes_stay_in_the_patients_compartment() {
    let w = world();
    let consent = |p: &str| {
        json!({"resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{p}")}, "policyRule": {"text": "opt-in"}})
    };
    let theirs = w.s.create(&consent(&w.b));
    let t = w.login("ann", "launch/patient patient/Consent.cruds", None);
    let at = t["access_token"].as_str().unwrap();
    let post = |path: &str, body: &Value, extra: Option<(&str, &str)>| {
        let mut r = w
            .browser
            .post(w.url(path))
            .bearer_auth(at)
            .header("Content-Type", FHIR_JSON)
            .body(body.to_string());
        if let Some((k, v)) = extra {
            r = r.header(k, v);
        }
        let r = r.send().unwrap();
        (
            r.status().as_u16(),
            r.json::<Value>().unwrap_or(Value::Null),
        )
    };
    assert_eq!(
        post("Consent", &consent(&w.a), None).0,
        201,
        "her own consent"
    );
    assert_eq!(
        post("Consent", &consent(&w.b), None).0,
        403,
        "not someone else's"
    );
    // A conditional create that matches another patient's Consent does not hand it over.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": consent(&w.a),
        "request": {"method": "POST", "url": "Consent", "ifNoneExist": format!("patient=Patient/{}", w.b)}}]});
    let (s, body) = post("", &tx, None);
    assert_eq!(s, 403, "{body}");
    assert!(!body.to_string().contains(theirs["id"].as_str().unwrap()));
    let (s, body) = post(
        "Consent",
        &consent(&w.a),
        Some(("If-None-Exist", &format!("patient=Patient/{}", w.b))),
    );
    assert_eq!(s, 403, "{body}");
    // Deleting or rewriting another patient's Consent is refused.
    let r = w
        .browser
        .delete(w.url(&format!("Consent/{}", theirs["id"].as_str().unwrap())))
        .bearer_auth(at)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

#[test]
fn browser_apps_get_cors_on_discovery_metadata_token_and_the_api() {
    let w = world();
    let c = Client::new();
    let origin = "https://app.example";
    let r = c
        .request(reqwest::Method::OPTIONS, w.url("Patient"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(r.headers()["access-control-allow-origin"], origin);
    assert!(r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Authorization"));
    for path in [".well-known/smart-configuration", "metadata"] {
        let r = c.get(w.url(path)).header("Origin", origin).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["access-control-allow-origin"], origin, "{path}");
    }
    let r = c
        .get(w.url(&format!("Patient/{}", w.a)))
        .bearer_auth(&w.s.token)
        .header("Origin", origin)
        .send()
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], origin);
    assert!(r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("ETag"));
    let r = c
        .post(w.url("auth/token"))
        .header("Origin", origin)
        .form(&[("grant_type", "nope")])
        .send()
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], origin);
}

/// A backend client that publishes its keys at a JWKS URL: the server fetches them, and fetches
/// again when the client rotates to a key id it has not seen; a URL that is not https (or
/// loopback) is refused at registration.
#[test]
fn backend_services_keys_come_from_the_clients_jwks_url_and_can_rotate() {
    let w = world();
    let keys = tempfile::tempdir().unwrap();
    let dir = keys.path().to_str().unwrap().to_string();
    let run = client_assertion;
    run(&["keygen", &dir, "ES384", "k1"]);
    // The client's own web server, publishing its JWKS.
    let port = free_port();
    let mut web = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let jwks_url = format!("http://127.0.0.1:{port}/jwks.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while Client::new().get(&jwks_url).send().is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cli(
        &w.s,
        &[
            "clients",
            "add",
            "--client-id",
            "remote-keys",
            "--jwks-uri",
            &jwks_url,
            "--scope",
            "system/*.rs",
        ],
    );
    let token_url = w.url("auth/token");
    let grant = |assertion: &str| {
        w.token(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/*.rs"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ])
    };
    let (s, _, t) = grant(&run(&["sign", &dir, "remote-keys", &token_url]));
    assert_eq!(s, 200, "{t}");
    // The client rotates: a new key under a new kid, published at the same URL.
    run(&["keygen", &dir, "ES384", "k2"]);
    let (s, _, t) = grant(&run(&["sign", &dir, "remote-keys", &token_url]));
    assert_eq!(s, 200, "the rotated key is fetched: {t}");
    // Its web server down and a kid it never published: refused, with the reason.
    let _ = web.kill();
    let _ = web.wait();
    run(&["keygen", &dir, "ES384", "k3"]);
    let (s, _, t) = grant(&run(&["sign", &dir, "remote-keys", &token_url]));
    assert_eq!(s, 401, "{t}");
    assert!(t.to_string().contains("could not be fetched"), "{t}");
    let out = Command::new(binary())
        .args([
            "clients",
            "add",
            "--client-id",
            "plain-http",
            "--jwks-uri",
            "http://app.example/jwks.json",
            "--scope",
            "system/*.rs",
        ])
        .arg("--data-dir")
        .arg(&w.s.data)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

//! An external OpenID Connect provider nobody here wrote (npm `oidc-provider`, started by the
//! test): its JWT access tokens are accepted with their scopes and fhirUser, and forged,
//! misdirected or unsigned ones are not.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

use fhirmament_e2e::*;

struct OidcProvider {
    issuer: String,
    child: Child,
}

impl OidcProvider {
    fn start() -> OidcProvider {
        let dir = std::env::var_os("OIDC_PROVIDER_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/oidc-provider")
            });
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "no oidc-provider under {} (set OIDC_PROVIDER_DIR, or run .ci/run once)",
            dir.display()
        );
        let port = free_port();
        let mut child = Command::new("node")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/oidc/provider.mjs"))
            .env("OIDC_PROVIDER_DIR", &dir)
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node");
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(
            lines.next().map(|l| l.unwrap()).as_deref(),
            Some("ready"),
            "oidc-provider did not start"
        );
        OidcProvider {
            issuer: format!("http://127.0.0.1:{port}"),
            child,
        }
    }

    /// A client-credentials access token for `resource`, as the provider's clients get them.
    fn token(&self, client: &str, scope: &str, resource: &str) -> String {
        let r: Value = Client::new()
            .post(format!("{}/token", self.issuer))
            .basic_auth(client, Some(format!("{client}-secret")))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("resource", resource),
            ])
            .send()
            .unwrap()
            .json()
            .unwrap();
        r["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token: {r}"))
            .to_string()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(s: &TestServer, token: &str, method: &str, path: &str, body: Option<&Value>) -> u16 {
    let c = Client::new();
    let url = s.url(path);
    let req = match method {
        "GET" => c.get(url),
        _ => c
            .post(url)
            .header("Content-Type", FHIR_JSON)
            .json(body.unwrap()),
    };
    req.bearer_auth(token).send().unwrap().status().as_u16()
}

#[test]
fn tokens_of_an_external_openid_connect_provider_are_accepted_and_checked() {
    let idp = OidcProvider::start();
    let s = TestServer::start_with(&["--oidc-issuer", &idp.issuer]);
    let id = s.create(&patient("Federated", "Fiona", "1970-07-07"))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A backend system's token: reads, but its read-only scope writes nothing.
    let reader = idp.token("ehr-backend", "system/Patient.rs", &s.base);
    assert_eq!(
        status(&s, &reader, "GET", &format!("Patient/{id}"), None),
        200
    );
    assert_eq!(
        status(&s, &reader, "GET", "Patient?family=federated", None),
        200
    );
    let new = patient("Written", "Wanda", "1971-01-01");
    assert_eq!(status(&s, &reader, "POST", "Patient", Some(&new)), 403);
    let writer = idp.token("ehr-backend", "system/Patient.cruds", &s.base);
    assert_eq!(status(&s, &writer, "POST", "Patient", Some(&new)), 201);
    // Scopes are enforced as granted: no DocumentReference for a Patient-only token.
    assert_eq!(status(&s, &reader, "GET", "DocumentReference", None), 403);

    // A clinician's token carries fhirUser: the AuditEvent of the read names that user.
    let clinician = idp.token("clinician-portal", "user/Patient.rs", &s.base);
    assert_eq!(
        status(&s, &clinician, "GET", &format!("Patient/{id}"), None),
        200
    );
    let (_, audit) = s.get_json("AuditEvent?agent=Practitioner/ext-dr-1");
    assert!(
        !match_ids(&audit).is_empty(),
        "the external user is in the audit trail: {audit}"
    );

    // Refused: a token for another server, a changed signature, an unsigned token.
    let elsewhere = idp.token(
        "ehr-backend",
        "system/Patient.rs",
        "http://other.example/fhir",
    );
    assert_eq!(
        status(&s, &elsewhere, "GET", &format!("Patient/{id}"), None),
        401
    );
    let mut forged = reader.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        status(&s, &forged, "GET", &format!("Patient/{id}"), None),
        401
    );
    let claims = reader.split('.').nth(1).unwrap();
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    assert_eq!(
        status(&s, &unsigned, "GET", &format!("Patient/{id}"), None),
        401
    );
    // The embedded authorization server's tokens still work beside them.
    assert_eq!(s.get(&format!("Patient/{id}")).status().as_u16(), 200);

    // An issuer that does not answer is a clear startup error.
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(s.data.parent().unwrap().join("other"))
        .args([
            "--oidc-issuer",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("OpenID Connect issuer"), "{said}");
}

//! Encrypted release: a client that registered a public key gets responses as a JWE that only
//! its private key opens, checked with an independent JOSE library (Python `jwcrypto`).

use std::process::Command;

use fhirmament_e2e::*;

/// A new key pair: the private JWK goes to `private`, the public JWKS is returned.
const GENERATE: &str = r#"
import json, sys
from jwcrypto import jwk
kty, private = sys.argv[1], sys.argv[2]
k = jwk.JWK.generate(kty='RSA', size=2048, kid='rsa-1') if kty == 'RSA' else jwk.JWK.generate(kty='EC', crv='P-256', kid='ec-1')
open(private, 'w').write(k.export_private())
pub = json.loads(k.export_public())
pub['use'] = 'enc'
print(json.dumps({'keys': [pub]}))
"#;

/// Decrypt a compact JWE with the private JWK; print the protected header and the plaintext.
const DECRYPT: &str = r#"
import json, sys
from jwcrypto import jwk, jwe
key = jwk.JWK.from_json(open(sys.argv[1]).read())
token = jwe.JWE()
token.deserialize(open(sys.argv[2]).read(), key=key)
print(json.dumps({'header': json.loads(token.objects['protected']), 'plaintext': json.loads(token.payload)}))
"#;

#[test]
fn a_client_with_a_registered_key_gets_responses_only_it_can_decrypt() {
    let s = TestServer::start();
    let pid = s.create(&patient("Cipher", "Carla", "1977-07-07"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    for (kty, alg) in [("RSA", "RSA-OAEP-256"), ("EC", "ECDH-ES+A256KW")] {
        let private = dir.path().join(format!("{kty}.private.json"));
        let public = python(GENERATE, &[kty, private.to_str().unwrap()]);
        let jwks = dir.path().join(format!("{kty}.jwks.json"));
        std::fs::write(&jwks, &public).unwrap();
        let client_id = format!("app-{kty}");
        let out = Command::new(binary())
            .args(["clients", "add", "--client-id", &client_id, "--public"])
            .args([
                "--redirect-uri",
                "http://localhost/cb",
                "--scope",
                "patient/*.rs",
            ])
            .arg("--data-dir")
            .arg(&s.data)
            .arg("--encryption-jwks")
            .arg(&jwks)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = mint_token(
            &s.data,
            &s.base,
            "system/*.rs",
            &["--client-id", &client_id],
        );
        let app = client_with_token(&token);
        for path in [format!("Patient/{pid}"), format!("Patient?_id={pid}")] {
            let r = app
                .get(s.url(&path))
                .header("Accept", "application/jose")
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], "application/jose");
            let body = r.text().unwrap();
            assert_eq!(body.split('.').count(), 5, "compact JWE");
            assert!(!body.contains("Cipher"));
            let file = dir.path().join("response.jwe");
            std::fs::write(&file, &body).unwrap();
            let opened: Value = serde_json::from_str(&python(
                DECRYPT,
                &[private.to_str().unwrap(), file.to_str().unwrap()],
            ))
            .unwrap();
            assert_eq!(opened["header"]["alg"], alg);
            assert_eq!(opened["header"]["enc"], "A256GCM");
            assert_eq!(opened["header"]["cty"], "application/fhir+json");
            let plain: Value = app.get(s.url(&path)).send().unwrap().json().unwrap();
            if plain["resourceType"] == "Bundle" {
                assert_eq!(opened["plaintext"]["entry"], plain["entry"]);
            } else {
                assert_eq!(opened["plaintext"], plain);
            }
        }
    }
    // Another key cannot open it; a client without a key is told why.
    let stranger = dir.path().join("stranger.json");
    python(GENERATE, &["RSA", stranger.to_str().unwrap()]);
    let r = client_with_token(&mint_token(
        &s.data,
        &s.base,
        "system/*.rs",
        &["--client-id", "app-RSA"],
    ))
    .get(s.url(&format!("Patient/{pid}")))
    .header("Accept", "application/jose")
    .send()
    .unwrap();
    let file = dir.path().join("again.jwe");
    std::fs::write(&file, r.text().unwrap()).unwrap();
    let failed = Command::new("python3")
        .arg("-c")
        .arg(DECRYPT)
        .arg(&stranger)
        .arg(&file)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let r = s
        .client
        .get(s.url(&format!("Patient/{pid}")))
        .header("Accept", "application/jose")
        .send()
        .unwrap();
    let oo = assert_outcome(r, 406);
    assert!(oo.to_string().contains("encryption key"), "{oo}");
}

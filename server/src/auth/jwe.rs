//! Encrypted release: a response encrypted to the requesting client's registered public key,
//! as a JWE in compact serialization (RFC 7516) — RSA-OAEP-256 for RSA keys, ECDH-ES+A256KW
//! for EC (P-256/P-384/P-521) and X25519 keys; content always A256GCM. The plaintext is the
//! ordinary FHIR JSON response (`cty` says so); only the holder of the private key reads it.

use serde_json::Value;

use super::directory::{Client, ClientAuth};
use crate::error::{Error, Result};

pub const JOSE: &str = "application/jose";

/// The client's first public key meant for encryption (`use: enc`, or a key whose `alg` is a
/// key-management algorithm this server speaks), among its registered keys and those its JWKS
/// URL published (`published`).
pub fn encryption_key(client: &Client, published: Option<&Value>) -> Option<Value> {
    let sets = client
        .encryption_jwks
        .iter()
        .chain(match &client.auth {
            ClientAuth::Asymmetric { jwks } => Some(jwks),
            _ => None,
        })
        .chain(published);
    for set in sets {
        for k in set["keys"].as_array().into_iter().flatten() {
            let for_enc = k["use"] == "enc"
                || matches!(k["alg"].as_str(), Some("RSA-OAEP-256" | "ECDH-ES+A256KW"));
            if for_enc && k.get("d").is_none() {
                return Some(k.clone());
            }
        }
    }
    None
}

/// Encrypt `plaintext` (FHIR JSON) to a public JWK.
pub fn encrypt_to_jwk(key: &Value, plaintext: &[u8]) -> Result<String> {
    use josekit::jwe::{self, JweHeader, ECDH_ES_A256KW, RSA_OAEP_256};
    let bad_key = |e: josekit::JoseError| {
        Error::NotAcceptable(format!("the client's encryption key cannot be used: {e}"))
    };
    let map = key
        .as_object()
        .cloned()
        .ok_or_else(|| Error::NotAcceptable("the client's encryption key is not a JWK".into()))?;
    let jwk = josekit::jwk::Jwk::from_map(map).map_err(bad_key)?;
    let mut header = JweHeader::new();
    header.set_content_encryption("A256GCM");
    header.set_content_type("application/fhir+json");
    if let Some(kid) = jwk.key_id() {
        header.set_key_id(kid);
    }
    let out = match jwk.key_type() {
        "RSA" => {
            let enc = RSA_OAEP_256.encrypter_from_jwk(&jwk).map_err(bad_key)?;
            jwe::serialize_compact(plaintext, &header, &enc)
        }
        "EC" | "OKP" => {
            let enc = ECDH_ES_A256KW.encrypter_from_jwk(&jwk).map_err(bad_key)?;
            jwe::serialize_compact(plaintext, &header, &enc)
        }
        other => {
            return Err(Error::NotAcceptable(format!(
            "the client's encryption key has type {other}; RSA, EC or OKP (X25519) are supported"
        )))
        }
    };
    out.map_err(|e| Error::Internal(format!("JWE encryption failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use josekit::jwe::{ECDH_ES_A256KW, RSA_OAEP_256};
    use josekit::jwk::Jwk;

    fn client_with(key: &Jwk) -> Client {
        let public: serde_json::Map<String, Value> = key.to_public_key().unwrap().into();
        let mut public = Value::Object(public);
        public["use"] = serde_json::json!("enc");
        Client {
            client_id: "app".into(),
            name: String::new(),
            auth: ClientAuth::Public,
            redirect_uris: vec![],
            scope: String::new(),
            encryption_jwks: Some(serde_json::json!({"keys": [public]})),
            jwks_uri: None,
        }
    }

    #[test]
    fn only_the_private_key_holder_reads_the_response() {
        let plaintext = br#"{"resourceType":"Patient","id":"p1"}"#;
        for private in [
            Jwk::generate_rsa_key(2048).unwrap(),
            Jwk::generate_ec_key(josekit::jwk::alg::ec::EcCurve::P256).unwrap(),
        ] {
            let c = client_with(&private);
            let token = encrypt_to_jwk(&encryption_key(&c, None).unwrap(), plaintext).unwrap();
            assert_eq!(token.split('.').count(), 5);
            let decrypted = if private.key_type() == "RSA" {
                let d = RSA_OAEP_256.decrypter_from_jwk(&private).unwrap();
                josekit::jwe::deserialize_compact(&token, &d).unwrap()
            } else {
                let d = ECDH_ES_A256KW.decrypter_from_jwk(&private).unwrap();
                josekit::jwe::deserialize_compact(&token, &d).unwrap()
            };
            assert_eq!(decrypted.0, plaintext);
            assert_eq!(decrypted.1.content_encryption(), Some("A256GCM"));
            let other = Jwk::generate_rsa_key(2048).unwrap();
            let d = RSA_OAEP_256.decrypter_from_jwk(&other).unwrap();
            assert!(josekit::jwe::deserialize_compact(&token, &d).is_err());
        }
    }

    #[test]
    fn a_client_without_an_encryption_key_is_not_acceptable() {
        let c = Client {
            client_id: "app".into(),
            name: String::new(),
            auth: ClientAuth::Public,
            redirect_uris: vec![],
            scope: String::new(),
            encryption_jwks: None,
            jwks_uri: None,
        };
        assert!(encryption_key(&c, None).is_none());
        assert!(matches!(
            encrypt_to_jwk(&serde_json::json!({"kty": "oct", "k": "AAAA"}), b"{}"),
            Err(Error::NotAcceptable(_))
        ));
    }
}

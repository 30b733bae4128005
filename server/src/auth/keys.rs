//! The authorization server's signing key (RSA 2048, RS256 — what SMART's OpenID Connect
//! requires for id_tokens; access tokens use it too), the JWKS it publishes, and issuing and
//! verifying its JWTs with josekit.
//!
//! Verification pins the algorithm: a token whose header says `none`, `HS256` (an HMAC keyed
//! with our public key) or anything but RS256 does not verify.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use josekit::jwk::alg::rsa::RsaKeyPair;
use josekit::jwk::KeyPair;
use josekit::jws::alg::rsassa::{RsassaJwsSigner, RsassaJwsVerifier};
use josekit::jws::{JwsHeader, RS256};
use josekit::jwt::{self, JwtPayload};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

pub struct SigningKey {
    signer: RsassaJwsSigner,
    verifier: RsassaJwsVerifier,
    public_jwk: Value,
    pub kid: String,
}

fn startup(e: impl std::fmt::Display) -> Error {
    Error::Startup(format!("authorization signing key: {e}"))
}

impl SigningKey {
    /// Load `<dir>/signing-key.pem`, creating it (mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<SigningKey> {
        let path = dir.join("signing-key.pem");
        if !path.exists() {
            std::fs::create_dir_all(dir).map_err(startup)?;
            let pair = RsaKeyPair::generate(2048).map_err(startup)?;
            std::fs::write(&path, pair.to_pem_private_key()).map_err(startup)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(startup)?;
            }
        }
        let pem = std::fs::read(&path).map_err(startup)?;
        let pair = RsaKeyPair::from_pem(&pem).map_err(startup)?;
        let public_der = pair.to_der_public_key();
        let kid = super::b64url(&Sha256::digest(&public_der)[..12]);
        let mut signer = RS256.signer_from_pem(&pem).map_err(startup)?;
        signer.set_key_id(kid.clone());
        let verifier = RS256
            .verifier_from_pem(pair.to_pem_public_key())
            .map_err(startup)?;
        let mut jwk: Map<String, Value> = pair.to_jwk_public_key().as_ref().clone();
        jwk.insert("kid".into(), json!(kid));
        jwk.insert("alg".into(), json!("RS256"));
        jwk.insert("use".into(), json!("sig"));
        Ok(SigningKey {
            signer,
            verifier,
            public_jwk: Value::Object(jwk),
            kid,
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk] })
    }

    /// Sign `claims` (plus iat and exp `ttl` from now) as a JWT.
    pub fn sign(&self, claims: &Map<String, Value>, ttl: Duration) -> Result<String> {
        let mut payload = JwtPayload::new();
        for (k, v) in claims {
            payload
                .set_claim(k, Some(v.clone()))
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        // Whole seconds: NumericDate claims come out as integers.
        let now = UNIX_EPOCH + Duration::from_secs(unix_now() as u64);
        payload.set_issued_at(&now);
        payload.set_expires_at(&(now + Duration::from_secs(ttl.as_secs().max(1))));
        let mut header = JwsHeader::new();
        header.set_token_type("JWT");
        header.set_key_id(self.kid.clone());
        jwt::encode_with_signer(&payload, &header, &self.signer)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The claims of a JWT this server signed, if the signature holds (RS256 only) and it has
    /// not expired. Issuer and audience are the caller's to check.
    pub fn verify(&self, token: &str) -> std::result::Result<Map<String, Value>, String> {
        let (payload, header) = jwt::decode_with_verifier(token, &self.verifier)
            .map_err(|_| "the token's signature does not verify".to_string())?;
        if header.algorithm() != Some("RS256") {
            return Err("unexpected signing algorithm".into());
        }
        let now = SystemTime::now();
        match payload.expires_at() {
            Some(exp) if exp > now => {}
            Some(_) => return Err("the token has expired".into()),
            None => return Err("the token has no expiry".into()),
        }
        if payload
            .not_before()
            .is_some_and(|nbf| nbf > now + Duration::from_secs(60))
        {
            return Err("the token is not valid yet".into());
        }
        Ok(payload.claims_set().clone())
    }
}

/// The claims of a JWT signed by one of `keys` (JWKs), with its `alg` in `allowed` (never
/// `none`, never an HMAC). The key is chosen by `kid` when the token names one. Expiry and the
/// rest are the caller's to check.
pub fn verify_with_keys(
    token: &str,
    keys: &[Value],
    allowed: &[&str],
) -> std::result::Result<Map<String, Value>, String> {
    let header = jwt::decode_header(token).map_err(|_| "not a JWT".to_string())?;
    let alg = header.claim("alg").and_then(Value::as_str).unwrap_or("");
    if !allowed.contains(&alg) {
        return Err(format!("alg must be one of {}", allowed.join(", ")));
    }
    let kid = header.claim("kid").and_then(Value::as_str);
    for k in keys
        .iter()
        .filter(|k| kid.is_none() || k["kid"].as_str() == kid)
    {
        let Ok(jwk) = josekit::jwk::Jwk::from_map(k.as_object().cloned().unwrap_or_default())
        else {
            continue;
        };
        // The verifier types differ per algorithm family; the decoding does not.
        fn decode<V: josekit::jws::JwsVerifier>(
            token: &str,
            verifier: std::result::Result<V, josekit::JoseError>,
        ) -> Option<(JwtPayload, JwsHeader)> {
            jwt::decode_with_verifier(token, &verifier.ok()?).ok()
        }
        let verified = match alg {
            "RS256" => decode(token, josekit::jws::RS256.verifier_from_jwk(&jwk)),
            "RS384" => decode(token, josekit::jws::RS384.verifier_from_jwk(&jwk)),
            "ES256" => decode(token, josekit::jws::ES256.verifier_from_jwk(&jwk)),
            "ES384" => decode(token, josekit::jws::ES384.verifier_from_jwk(&jwk)),
            _ => None,
        };
        if let Some((payload, _)) = verified {
            return Ok(payload.claims_set().clone());
        }
    }
    Err("the signature does not verify with the issuer's keys".into())
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_forgeries_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(dir.path()).unwrap();
        let again = SigningKey::load_or_create(dir.path()).unwrap();
        assert_eq!(key.kid, again.kid, "the key persists");
        let mut claims = Map::new();
        claims.insert("sub".into(), json!("alice"));
        let t = key.sign(&claims, Duration::from_secs(60)).unwrap();
        assert_eq!(key.verify(&t).unwrap()["sub"], "alice");
        // alg none: header and payload, no signature.
        let parts: Vec<&str> = t.split('.').collect();
        let none_header = super::super::b64url(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(key.verify(&format!("{none_header}.{}.", parts[1])).is_err());
        // HS256 keyed with the public key (algorithm confusion).
        let public_pem = std::fs::read(dir.path().join("signing-key.pem")).unwrap();
        let hs = josekit::jws::HS256.signer_from_bytes(&public_pem).unwrap();
        let mut p = JwtPayload::new();
        p.set_claim("sub", Some(json!("mallory"))).unwrap();
        p.set_expires_at(&(SystemTime::now() + Duration::from_secs(60)));
        let forged = jwt::encode_with_signer(&p, &JwsHeader::new(), &hs).unwrap();
        assert!(key.verify(&forged).is_err());
        // A changed payload.
        let other = super::super::b64url(br#"{"sub":"mallory","exp":99999999999}"#);
        assert!(key
            .verify(&format!("{}.{other}.{}", parts[0], parts[2]))
            .is_err());
        // Expired.
        let mut c = Map::new();
        c.insert("sub".into(), json!("alice"));
        let mut p = JwtPayload::new();
        p.set_claim("sub", Some(json!("alice"))).unwrap();
        p.set_expires_at(&(SystemTime::now() - Duration::from_secs(5)));
        let mut h = JwsHeader::new();
        h.set_key_id(key.kid.clone());
        let expired = jwt::encode_with_signer(&p, &h, &key.signer).unwrap();
        assert!(key.verify(&expired).unwrap_err().contains("expired"));
    }
}

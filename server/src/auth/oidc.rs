//! An external OpenID Connect provider whose access tokens the FHIR API accepts beside the
//! embedded authorization server's (`--oidc-issuer`): a hospital's existing identity provider.
//!
//! At start the issuer is discovered (openidconnect crate: its metadata must name exactly the
//! configured issuer) and its JWKS fetched; a token naming a `kid` the cached set lacks makes
//! the HTTP layer fetch the set again first (key rotation at the provider). A token of this
//! issuer is accepted when it is a JWT (RFC 9068 style) signed with one of its keys (RS256,
//! RS384, ES256 or ES384 only), unexpired, and meant for this server (`aud` is the FHIR base).
//! Its claims map to a grant: `scope` (or `scp`) as SMART scopes, the configured claim
//! (default `fhirUser`) as the user, `patient` as the patient in context, `client_id` (or
//! `azp`) as the client. The provider is trusted for what it grants, exactly as the embedded
//! server is; every request is then checked the same way (scopes, consent, audit).

use serde_json::{Map, Value};

use super::keys::{unix_now, verify_with_keys};
use super::Grant;
use crate::error::{Error, Result};

/// Signing algorithms accepted from an external issuer.
const ALGORITHMS: [&str; 4] = ["RS256", "RS384", "ES256", "ES384"];

#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    pub issuer: String,
    pub jwks_uri: String,
    /// The claim that names the user as a FHIR reference.
    pub fhir_user_claim: String,
}

impl ExternalIssuer {
    /// Discover `issuer` (blocking; at start) and fetch its keys. Returns the issuer and its
    /// key set.
    pub fn discover(issuer: &str, fhir_user_claim: &str) -> Result<(ExternalIssuer, Value)> {
        use openidconnect::core::CoreProviderMetadata;
        let startup = |e: String| Error::Startup(format!("OpenID Connect issuer {issuer}: {e}"));
        let url = openidconnect::IssuerUrl::new(issuer.to_string())
            .map_err(|e| startup(e.to_string()))?;
        // No redirects: discovery must not be steered elsewhere.
        let http = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| startup(e.to_string()))?;
        let metadata =
            CoreProviderMetadata::discover(&url, &http).map_err(|e| startup(e.to_string()))?;
        let jwks_uri = metadata.jwks_uri().url().to_string();
        if !super::jwks_url::allowed(&jwks_uri) {
            return Err(startup(format!(
                "jwks_uri {jwks_uri} is not https (or http on loopback)"
            )));
        }
        let keys = serde_json::to_value(metadata.jwks()).map_err(|e| startup(e.to_string()))?;
        Ok((
            ExternalIssuer {
                issuer: issuer.to_string(),
                jwks_uri,
                fhir_user_claim: fhir_user_claim.to_string(),
            },
            keys,
        ))
    }

    /// The grant of a token this issuer signed with one of `keys`, and its expiry; or why not.
    pub fn verify(
        &self,
        token: &str,
        keys: &Value,
        base: &str,
    ) -> std::result::Result<(Grant, i64), String> {
        let keys = keys["keys"].as_array().cloned().unwrap_or_default();
        let claims = verify_with_keys(token, &keys, &ALGORITHMS)?;
        let s = |k: &str| claims.get(k).and_then(Value::as_str);
        if s("iss") != Some(self.issuer.as_str()) {
            return Err("the token was issued by someone else".into());
        }
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or("the token has no expiry")?;
        let now = unix_now();
        if exp <= now {
            return Err("the token has expired".into());
        }
        if claims
            .get("nbf")
            .and_then(Value::as_i64)
            .is_some_and(|nbf| nbf > now + 60)
        {
            return Err("the token is not valid yet".into());
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == base,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(base)),
            _ => false,
        };
        if !aud_ok {
            return Err("the token is not meant for this server (aud)".into());
        }
        let scope = scope_of(&claims);
        let fhir_user = s(&self.fhir_user_claim)
            .map(|f| f.strip_prefix(&format!("{base}/")).unwrap_or(f).to_string());
        // Revocation and the token cache key on jti: a token without one gets its digest.
        let jti = match s("jti") {
            Some(j) => format!("{}#{j}", self.issuer),
            None => super::flows::sha_hex(token),
        };
        let grant = Grant::new(
            s("client_id").or(s("azp")).unwrap_or(""),
            s("sub").unwrap_or(""),
            &scope,
            s("patient").map(str::to_string),
            fhir_user,
            &jti,
        );
        Ok((grant, exp))
    }
}

/// `scope` as a space-separated string, or `scp` as an array (both are in use).
fn scope_of(claims: &Map<String, Value>) -> String {
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => s.clone(),
        (_, Some(Value::Array(a))) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        (_, Some(Value::String(s))) => s.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scopes_come_from_scope_or_scp() {
        let m = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(scope_of(&m(json!({"scope": "a b"}))), "a b");
        assert_eq!(scope_of(&m(json!({"scp": ["a", "b"]}))), "a b");
        assert_eq!(scope_of(&m(json!({}))), "");
    }
}

//! SMART App Launch 2.x: the embedded authorization server and the grants its tokens carry.
//!
//! - `scopes`: SMART v1/v2 scope syntax.
//! - `keys`: the RS256 signing key, JWKS, issuing and verifying JWTs (josekit).
//! - `directory`: registered clients and users.
//! - `flows`: authorize (login, approval), token (authorization code with PKCE S256, refresh,
//!   client credentials with private_key_jwt), introspection, revocation.
//! - `access`: the one place scopes are enforced on FHIR interactions.
//! - `jwe`: responses encrypted to the client's registered key (`Accept: application/jose`).
//! - `jwks_url`: client keys published at a JWKS URL, fetched and cached.

pub mod access;
pub mod directory;
pub mod flows;
pub mod jwe;
pub mod jwks_url;
pub mod keys;
pub mod oidc;
pub mod scopes;

use base64::Engine as _;

pub use flows::AuthServer;
use scopes::ResourceScope;

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A form or query parameter's value (the first, if repeated).
pub fn form_value<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A random URL-safe token of 32 bytes.
pub fn random_token() -> crate::error::Result<String> {
    Ok(b64url(&crate::ledger::entry::new_salt()?))
}

/// What a verified access token allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub client_id: String,
    pub sub: String,
    /// Granted scopes as text.
    pub scope: String,
    pub scopes: Vec<ResourceScope>,
    /// The patient in context (`launch/patient`, or a patient user).
    pub patient: Option<String>,
    pub fhir_user: Option<String>,
    pub jti: String,
}

impl Grant {
    pub fn new(
        client_id: &str,
        sub: &str,
        scope: &str,
        patient: Option<String>,
        fhir_user: Option<String>,
        jti: &str,
    ) -> Grant {
        Grant {
            client_id: client_id.to_string(),
            sub: sub.to_string(),
            scope: scope.to_string(),
            scopes: scope
                .split_whitespace()
                .filter_map(scopes::parse_resource_scope)
                .collect(),
            patient,
            fhir_user,
            jti: jti.to_string(),
        }
    }
}

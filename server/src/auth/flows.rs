//! The authorization server's flows, free of HTTP: `http/oauth.rs` turns their results into
//! redirects, pages and JSON.
//!
//! State: pending authorizations, codes, EHR launches, client-assertion `jti`s and failed
//! logins live in memory (minutes); refresh tokens and revoked access tokens are persisted
//! under `<data-dir>/auth/` so a restart neither revives a revoked token nor loses a session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use super::directory::{verify_secret, Client, ClientAuth, Directory, Role, User};
use super::keys::{unix_now, SigningKey};
use super::scopes::{self, covered, split};
use super::{b64url, form_value, random_token, Grant};
use crate::error::{Error, Result};

pub const ACCESS_TTL: Duration = Duration::from_secs(3600);
pub const BACKEND_TTL: Duration = Duration::from_secs(300);
const CODE_TTL: i64 = 60;
const PENDING_TTL: i64 = 600;
const REFRESH_TTL: i64 = 30 * 24 * 3600;
/// `online_access`: a refresh token lives while the user is "online" — used at least once an
/// hour, and never past the end of the session that the login started.
const ONLINE_IDLE: i64 = 3600;
const ONLINE_SESSION: i64 = 12 * 3600;
const MAX_FAILURES: u32 = 5;
const LOCKOUT_SECS: i64 = 15 * 60;
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An OAuth error (RFC 6749 §4.1.2.1 / §5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

fn oauth(error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        error,
        description: description.into(),
    }
}

impl From<Error> for OAuthError {
    fn from(e: Error) -> Self {
        tracing::error!(error = %e, "authorization server failure");
        oauth("server_error", "the authorization server failed")
    }
}

/// An authorization request, between the authorize endpoint and the user's approval.
#[derive(Debug, Clone)]
pub struct Pending {
    pub client: Client,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub scopes: Vec<String>,
    pub code_challenge: String,
    pub nonce: Option<String>,
    /// From an EHR launch.
    pub launch_patient: Option<String>,
    pub user: Option<User>,
    created: i64,
}

/// What the authorize endpoint asks the browser to do next.
#[derive(Debug)]
pub enum Authorize {
    /// Show the login page for this pending request.
    Login { txn: String, client: String },
    /// The request is bad and cannot be redirected (unknown client or redirect URI).
    Refuse(OAuthError),
    /// Send the browser back to the client with this error.
    RedirectError {
        redirect_uri: String,
        state: Option<String>,
        error: OAuthError,
    },
}

/// What the login form leads to.
#[derive(Debug)]
pub enum Login {
    Approve {
        txn: String,
        client: String,
        offered: Vec<String>,
        pick_patient: bool,
    },
    Retry {
        txn: String,
        client: String,
        message: String,
    },
    Expired,
}

#[derive(Debug, Clone)]
struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    sub: String,
    fhir_user: Option<String>,
    patient: Option<String>,
    nonce: Option<String>,
    expires: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Refresh {
    client_id: String,
    sub: String,
    scope: String,
    fhir_user: Option<String>,
    patient: Option<String>,
    /// All refresh tokens descended from one authorization share a family: reusing a spent
    /// one revokes the family.
    family: String,
    expires: i64,
    spent: bool,
    /// For `online_access` (without `offline_access`): when the login session that started the
    /// family ends; 0 for offline access.
    #[serde(default)]
    session_ends: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    /// sha256(refresh token) hex -> record.
    refresh: HashMap<String, Refresh>,
    /// Revoked access-token jti -> its expiry.
    revoked: HashMap<String, i64>,
    /// Revoked refresh families.
    revoked_families: Vec<String>,
}

/// A successful token response.
#[derive(Debug, Clone)]
pub struct TokenResponse(pub Value);

pub struct AuthServer {
    pub key: SigningKey,
    pub directory: Directory,
    /// The FHIR base URL: the tokens' issuer and audience.
    pub base: String,
    state_path: PathBuf,
    pending: Mutex<HashMap<String, Pending>>,
    codes: Mutex<HashMap<String, Code>>,
    launches: Mutex<HashMap<String, (String, i64)>>,
    assertion_jtis: Mutex<HashMap<String, i64>>,
    failures: Mutex<HashMap<String, (u32, i64)>>,
    persisted: std::sync::RwLock<Persisted>,
    /// sha256 of the initial access token for dynamic registration (None: disabled).
    registration: Option<String>,
    /// Access tokens whose signature, issuer and audience were checked, by their SHA-256:
    /// (grant, expiry). Expiry and revocation are still checked on every use.
    verified: std::sync::RwLock<VerifiedTokens>,
    /// Key sets of clients that publish them at a JWKS URL.
    pub jwks_urls: super::jwks_url::JwksCache,
    /// An external OpenID Connect provider whose access tokens are accepted too.
    external: Option<super::oidc::ExternalIssuer>,
}

/// SHA-256 of an access token -> its grant and expiry.
type VerifiedTokens = HashMap<[u8; 32], (std::sync::Arc<Grant>, i64)>;

/// How many verified access tokens are remembered (the map is cleared when full).
const VERIFIED_TOKENS: usize = 16_384;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A JWT's claims, read without checking anything: only to find which keys will check it.
fn unverified_claims(jwt: &str) -> Option<Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub(super) fn sha_hex(s: &str) -> String {
    crate::ledger::entry::hex(&Sha256::digest(s.as_bytes()))
}

impl AuthServer {
    pub fn open(auth_dir: &Path, base: &str) -> Result<AuthServer> {
        let key = SigningKey::load_or_create(auth_dir)?;
        let state_path = auth_dir.join("tokens.json");
        let persisted = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Startup(format!("{}: {e}", state_path.display())))?,
            Err(_) => Persisted::default(),
        };
        Ok(AuthServer {
            key,
            directory: Directory::new(auth_dir),
            base: base.trim_end_matches('/').to_string(),
            state_path,
            pending: Default::default(),
            codes: Default::default(),
            launches: Default::default(),
            assertion_jtis: Default::default(),
            failures: Default::default(),
            persisted: std::sync::RwLock::new(persisted),
            registration: None,
            verified: Default::default(),
            jwks_urls: Default::default(),
            external: None,
        })
    }

    /// Accept the access tokens of an external OpenID Connect provider too (see `oidc`).
    pub fn with_external_issuer(
        mut self,
        issuer: super::oidc::ExternalIssuer,
        keys: Value,
    ) -> AuthServer {
        self.jwks_urls.seed(&issuer.jwks_uri, keys);
        self.external = Some(issuer);
        self
    }

    /// The external issuer a token claims to come from, if it is the configured one.
    fn external_issuer_of(&self, token: &str) -> Option<&super::oidc::ExternalIssuer> {
        let ext = self.external.as_ref()?;
        let claims = unverified_claims(token)?;
        (claims["iss"].as_str() == Some(ext.issuer.as_str())).then_some(ext)
    }

    /// Before `grant`: when a token of the external issuer names a key not yet fetched (or the
    /// fetched set is stale), fetch the issuer's keys again.
    pub async fn refresh_issuer_keys(&self, http: &reqwest::Client, token: &str) {
        let Some(ext) = self.external_issuer_of(token) else {
            return;
        };
        let kid = josekit::jwt::decode_header(token)
            .ok()
            .and_then(|h| h.claim("kid").and_then(Value::as_str).map(str::to_string));
        if let Err(e) = self
            .jwks_urls
            .refresh(http, &ext.jwks_uri, kid.as_deref())
            .await
        {
            tracing::warn!(issuer = %ext.issuer, error = %e, "the external issuer's keys could not be fetched");
        }
    }

    pub fn with_registration_token(mut self, token: Option<String>) -> AuthServer {
        self.registration = token.filter(|t| !t.is_empty()).map(|t| sha_hex(&t));
        self
    }

    /// RFC 7591 dynamic registration, for holders of the initial access token. Answers the
    /// client information response (201) or an RFC 7591 error.
    pub fn register(
        &self,
        initial: Option<&str>,
        meta: &Value,
    ) -> std::result::Result<Value, (u16, OAuthError)> {
        let Some(expected) = &self.registration else {
            return Err((
                403,
                oauth(
                    "access_denied",
                    "dynamic registration is disabled on this server",
                ),
            ));
        };
        if initial.map(sha_hex).as_deref() != Some(expected.as_str()) {
            return Err((
                401,
                oauth("invalid_token", "a valid initial access token is required"),
            ));
        }
        let bad = |m: &str| (400, oauth("invalid_client_metadata", m));
        let server = |e: Error| (500, OAuthError::from(e));
        let method = meta["token_endpoint_auth_method"]
            .as_str()
            .unwrap_or("client_secret_basic");
        let redirect_uris: Vec<String> = meta["redirect_uris"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for u in &redirect_uris {
            let local = u.starts_with("http://localhost") || u.starts_with("http://127.0.0.1");
            if !(u.starts_with("https://") || local) || u.contains('#') {
                return Err((
                    400,
                    oauth(
                        "invalid_redirect_uri",
                        format!("{u} must be an https URL (or loopback http) without a fragment"),
                    ),
                ));
            }
        }
        let scope = meta["scope"]
            .as_str()
            .unwrap_or("launch/patient openid fhirUser patient/*.rs")
            .to_string();
        for s in scope.split_whitespace() {
            if !scopes::is_known(s) {
                return Err(bad(&format!("unknown scope {s}")));
            }
            if s.starts_with("system/") && method != "private_key_jwt" {
                return Err(bad("system/ scopes are for private_key_jwt clients"));
            }
        }
        let mut secret = None;
        let auth = match method {
            "none" => ClientAuth::Public,
            "client_secret_basic" => {
                let s = random_token().map_err(server)?;
                let hash = super::directory::hash_secret(&s).map_err(server)?;
                secret = Some(s);
                ClientAuth::Symmetric { secret_hash: hash }
            }
            "private_key_jwt" => {
                let jwks = meta["jwks"].clone();
                let by_url = meta["jwks_uri"]
                    .as_str()
                    .is_some_and(super::jwks_url::allowed);
                if jwks["keys"].as_array().is_none_or(|k| k.is_empty()) && !by_url {
                    return Err(bad(
                        "private_key_jwt needs jwks with at least one key, or an https jwks_uri",
                    ));
                }
                ClientAuth::Asymmetric {
                    jwks: if jwks.is_object() {
                        jwks
                    } else {
                        json!({"keys": []})
                    },
                }
            }
            other => {
                return Err(bad(&format!(
                    "token_endpoint_auth_method {other} is not supported"
                )))
            }
        };
        if redirect_uris.is_empty() && !matches!(auth, ClientAuth::Asymmetric { .. }) {
            return Err((
                400,
                oauth("invalid_redirect_uri", "redirect_uris are required"),
            ));
        }
        let client_id = random_token().map_err(server)?;
        let name = meta["client_name"].as_str().unwrap_or("").to_string();
        self.directory
            .put_client(Client {
                client_id: client_id.clone(),
                name: name.clone(),
                auth,
                redirect_uris: redirect_uris.clone(),
                scope: scope.clone(),
                jwks_uri: meta["jwks_uri"]
                    .as_str()
                    .filter(|u| super::jwks_url::allowed(u))
                    .map(str::to_string),
                encryption_jwks: meta
                    .get("jwks")
                    .filter(|j| {
                        j["keys"]
                            .as_array()
                            .is_some_and(|ks| ks.iter().any(|k| k["use"] == "enc"))
                    })
                    .cloned(),
            })
            .map_err(server)?;
        let mut out = json!({
            "client_id": client_id,
            "client_id_issued_at": unix_now(),
            "client_name": name,
            "redirect_uris": redirect_uris,
            "token_endpoint_auth_method": method,
            "scope": scope,
            "grant_types": if method == "private_key_jwt" && meta["redirect_uris"].is_null() {
                json!(["client_credentials"])
            } else {
                json!(["authorization_code", "refresh_token"])
            },
        });
        if let Some(s) = secret {
            out["client_secret"] = json!(s);
            out["client_secret_expires_at"] = json!(0);
        }
        Ok(out)
    }

    fn save(&self, p: &Persisted) -> Result<()> {
        let tmp = self.state_path.with_extension("tmp");
        let bytes = serde_json::to_vec(p).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&tmp, bytes).map_err(|e| Error::Storage(e.to_string()))?;
        std::fs::rename(&tmp, &self.state_path).map_err(|e| Error::Storage(e.to_string()))
    }

    pub fn endpoint(&self, name: &str) -> String {
        format!("{}/auth/{name}", self.base)
    }

    // ---- discovery ----

    pub fn smart_configuration(&self) -> Value {
        json!({
            "issuer": self.base,
            "jwks_uri": self.endpoint("jwks"),
            "authorization_endpoint": self.endpoint("authorize"),
            "token_endpoint": self.endpoint("token"),
            "introspection_endpoint": self.endpoint("introspect"),
            "revocation_endpoint": self.endpoint("revoke"),
            "registration_endpoint": self.endpoint("register"),
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": [
                "openid", "fhirUser", "launch", "launch/patient", "offline_access", "online_access",
                "patient/*.rs", "patient/*.cruds", "user/*.rs", "user/*.cruds", "system/*.rs", "system/*.cruds",
                "patient/Patient.rs", "patient/DocumentReference.rs", "patient/Consent.cruds", "patient/AuditEvent.rs"
            ],
            "capabilities": [
                "launch-ehr", "launch-standalone", "authorize-post",
                "client-public", "client-confidential-symmetric", "client-confidential-asymmetric",
                "sso-openid-connect", "context-ehr-patient", "context-standalone-patient",
                "permission-offline", "permission-online", "permission-patient", "permission-user",
                "permission-v1", "permission-v2"
            ]
        })
    }

    pub fn openid_configuration(&self) -> Value {
        json!({
            "issuer": self.base,
            "authorization_endpoint": self.endpoint("authorize"),
            "token_endpoint": self.endpoint("token"),
            "jwks_uri": self.endpoint("jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "fhirUser", "profile"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "fhirUser", "nonce"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "code_challenge_methods_supported": ["S256"]
        })
    }

    // ---- authorize ----

    pub fn authorize(&self, params: &[(String, String)]) -> Result<Authorize> {
        let get = |k: &str| form_value(params, k).map(str::to_string);
        let Some(client) = get("client_id")
            .map(|id| self.directory.client(&id))
            .transpose()?
            .flatten()
        else {
            return Ok(Authorize::Refuse(oauth(
                "invalid_request",
                "unknown client_id",
            )));
        };
        let Some(redirect_uri) = get("redirect_uri").filter(|r| client.redirect_uris.contains(r))
        else {
            return Ok(Authorize::Refuse(oauth(
                "invalid_request",
                "redirect_uri is missing or not registered for this client",
            )));
        };
        let state = get("state");
        let fail = |e: OAuthError| {
            Ok(Authorize::RedirectError {
                redirect_uri: redirect_uri.clone(),
                state: state.clone(),
                error: e,
            })
        };
        if get("response_type").as_deref() != Some("code") {
            return fail(oauth(
                "unsupported_response_type",
                "response_type must be code",
            ));
        }
        if get("aud").map(|a| a.trim_end_matches('/').to_string()) != Some(self.base.clone()) {
            return fail(oauth(
                "invalid_request",
                format!("aud must be this FHIR server: {}", self.base),
            ));
        }
        let challenge = get("code_challenge").filter(|c| !c.is_empty());
        match (challenge.as_ref(), get("code_challenge_method").as_deref()) {
            (Some(_), Some("S256")) => {}
            (Some(_), _) => {
                return fail(oauth(
                    "invalid_request",
                    "code_challenge_method must be S256 (plain is refused)",
                ))
            }
            (None, _) => {
                return fail(oauth(
                    "invalid_request",
                    "PKCE is required: send code_challenge with S256",
                ))
            }
        }
        if matches!(client.auth, ClientAuth::Asymmetric { .. }) && client.redirect_uris.is_empty() {
            return fail(oauth(
                "unauthorized_client",
                "this client is registered for backend services only",
            ));
        }
        let allowed = split(&client.scope);
        let requested = split(&get("scope").unwrap_or_default());
        let scopes: Vec<String> = requested
            .into_iter()
            .filter(|s| covered(s, &allowed) && !s.starts_with("system/"))
            .collect();
        if scopes.is_empty() {
            return fail(oauth(
                "invalid_scope",
                "none of the requested scopes may be granted to this client",
            ));
        }
        let launch_patient = match get("launch") {
            None => None,
            Some(l) => {
                let mut launches = lock(&self.launches);
                match launches.remove(&l) {
                    Some((patient, exp)) if exp > unix_now() => Some(patient),
                    _ => return fail(oauth("invalid_request", "unknown or expired launch")),
                }
            }
        };
        let txn = random_token()?;
        let mut pending = lock(&self.pending);
        let now = unix_now();
        pending.retain(|_, p| now - p.created < PENDING_TTL);
        pending.insert(
            txn.clone(),
            Pending {
                client: client.clone(),
                redirect_uri,
                state,
                scopes,
                code_challenge: challenge.unwrap_or_default(),
                nonce: get("nonce"),
                launch_patient,
                user: None,
                created: now,
            },
        );
        Ok(Authorize::Login {
            txn,
            client: if client.name.is_empty() {
                client.client_id
            } else {
                client.name
            },
        })
    }

    /// The scopes a user's role (and the user's own limit) allows.
    fn user_allows(user: &User, scope: &str) -> bool {
        if let Some(limit) = &user.scope {
            if !covered(scope, &split(limit)) && !scopes::OTHER_SCOPES.contains(&scope) {
                return false;
            }
        }
        match user.role {
            Role::Admin => true,
            Role::Practitioner => !scope.starts_with("system/"),
            Role::Patient => {
                !scope.starts_with("user/") && !scope.starts_with("system/") && scope != "launch"
            }
        }
    }

    pub fn login(&self, txn: &str, username: &str, password: &str, otp: &str) -> Result<Login> {
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(txn) else {
            return Ok(Login::Expired);
        };
        let client = p.client.name.clone();
        let now = unix_now();
        {
            let failures = lock(&self.failures);
            if let Some((_, until)) = failures
                .get(username)
                .filter(|(n, u)| *n >= MAX_FAILURES && *u > now)
            {
                return Ok(Login::Retry {
                    txn: txn.into(),
                    client,
                    message: format!(
                        "too many failed attempts; try again in {} minutes",
                        (until - now) / 60 + 1
                    ),
                });
            }
        }
        let user = self.directory.user(username)?;
        let ok = user.as_ref().is_some_and(|u| {
            verify_secret(password, &u.password_hash)
                && u.totp_secret
                    .as_deref()
                    .is_none_or(|s| super::directory::verify_totp(s, otp))
        });
        if !ok {
            let mut failures = lock(&self.failures);
            // Bounded: a spray of made-up user names cannot grow this without limit.
            if failures.len() >= 100_000 {
                failures.retain(|_, (_, until)| *until > now);
                if failures.len() >= 100_000 {
                    failures.clear();
                }
            }
            let f = failures.entry(username.to_string()).or_insert((0, 0));
            f.0 += 1;
            if f.0 >= MAX_FAILURES {
                f.1 = now + LOCKOUT_SECS;
                tracing::warn!(username, "login locked after repeated failures");
            }
            return Ok(Login::Retry {
                txn: txn.into(),
                client,
                message: "unknown user, wrong password or wrong one-time code".into(),
            });
        }
        lock(&self.failures).remove(username);
        let user = user.expect("checked");
        let offered: Vec<String> = p
            .scopes
            .iter()
            .filter(|s| Self::user_allows(&user, s))
            .cloned()
            .collect();
        let pick_patient = user.role != Role::Patient
            && p.launch_patient.is_none()
            && offered
                .iter()
                .any(|s| s == "launch/patient" || s.starts_with("patient/"));
        p.user = Some(user);
        Ok(Login::Approve {
            txn: txn.into(),
            client,
            offered,
            pick_patient,
        })
    }

    /// The user approved `chosen` (a subset of what was offered); returns the redirect URL.
    pub fn approve(
        &self,
        txn: &str,
        chosen: &[String],
        picked_patient: Option<&str>,
        patient_exists: impl Fn(&str) -> bool,
    ) -> Result<std::result::Result<String, OAuthError>> {
        let Some(p) = lock(&self.pending).remove(txn) else {
            return Ok(Err(oauth(
                "invalid_request",
                "this authorization request has expired; start again",
            )));
        };
        let Some(user) = p.user.clone() else {
            return Ok(Err(oauth("access_denied", "not logged in")));
        };
        let redirect = |params: Vec<(&str, String)>| {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in params {
                ser.append_pair(k, &v);
            }
            if let Some(s) = &p.state {
                ser.append_pair("state", s);
            }
            let sep = if p.redirect_uri.contains('?') {
                '&'
            } else {
                '?'
            };
            format!("{}{sep}{}", p.redirect_uri, ser.finish())
        };
        let granted: Vec<String> = chosen
            .iter()
            .filter(|s| p.scopes.contains(s) && Self::user_allows(&user, s))
            .cloned()
            .collect();
        if granted.is_empty() {
            return Ok(Ok(redirect(vec![
                ("error", "access_denied".into()),
                ("error_description", "no scope was approved".into()),
            ])));
        }
        let wants_patient = granted
            .iter()
            .any(|s| s == "launch/patient" || s.starts_with("patient/"));
        let patient = match (user.role, &p.launch_patient) {
            (Role::Patient, _) => user.patient_id().map(str::to_string),
            (_, Some(l)) => Some(l.clone()),
            _ if wants_patient => match picked_patient.filter(|id| !id.is_empty()) {
                Some(id) if patient_exists(id) => Some(id.to_string()),
                _ => {
                    return Ok(Ok(redirect(vec![
                        ("error", "access_denied".into()),
                        (
                            "error_description",
                            "no (existing) patient was selected".into(),
                        ),
                    ])))
                }
            },
            _ => None,
        };
        if wants_patient && patient.is_none() {
            return Ok(Ok(redirect(vec![
                ("error", "access_denied".into()),
                (
                    "error_description",
                    "this user has no patient record".into(),
                ),
            ])));
        }
        let code = random_token()?;
        let now = unix_now();
        let mut codes = lock(&self.codes);
        codes.retain(|_, c| c.expires > now);
        codes.insert(
            code.clone(),
            Code {
                client_id: p.client.client_id.clone(),
                redirect_uri: p.redirect_uri.clone(),
                challenge: p.code_challenge.clone(),
                scope: granted.join(" "),
                sub: user.username.clone(),
                fhir_user: user.fhir_user.clone(),
                patient,
                nonce: p.nonce.clone(),
                expires: now + CODE_TTL,
            },
        );
        Ok(Ok(redirect(vec![("code", code)])))
    }

    /// An EHR launch: a short-lived `launch` value bound to a patient.
    pub fn create_launch(&self, patient: &str) -> Result<String> {
        let id = random_token()?;
        let now = unix_now();
        let mut launches = lock(&self.launches);
        launches.retain(|_, (_, exp)| *exp > now);
        launches.insert(id.clone(), (patient.to_string(), now + 600));
        Ok(id)
    }

    // ---- token ----

    /// Authenticate the client of a token-endpoint request.
    fn client_auth(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<Client, OAuthError> {
        let get = |k: &str| form_value(form, k);
        if let Some(assertion_type) = get("client_assertion_type") {
            if assertion_type != ASSERTION_TYPE {
                return Err(oauth(
                    "invalid_client",
                    "client_assertion_type must be jwt-bearer",
                ));
            }
            let assertion = get("client_assertion")
                .ok_or_else(|| oauth("invalid_client", "client_assertion is missing"))?;
            return self.verify_assertion(assertion);
        }
        if let Some((id, secret)) = basic {
            let c = self
                .directory
                .client(&id)?
                .ok_or_else(|| oauth("invalid_client", "unknown client"))?;
            return match &c.auth {
                ClientAuth::Symmetric { secret_hash } if verify_secret(&secret, secret_hash) => {
                    Ok(c)
                }
                _ => Err(oauth("invalid_client", "client authentication failed")),
            };
        }
        let id = get("client_id").ok_or_else(|| oauth("invalid_client", "client_id is missing"))?;
        let c = self
            .directory
            .client(id)?
            .ok_or_else(|| oauth("invalid_client", "unknown client"))?;
        match c.auth {
            ClientAuth::Public => Ok(c),
            _ => Err(oauth("invalid_client", "this client must authenticate")),
        }
    }

    /// `private_key_jwt`: RS384 or ES384, iss = sub = client_id, aud = token endpoint, exp in
    /// the next five minutes, a jti never seen before.
    fn verify_assertion(&self, assertion: &str) -> std::result::Result<Client, OAuthError> {
        let bad = |m: &str| oauth("invalid_client", format!("client assertion: {m}"));
        // Read iss only to find the client's keys; nothing is trusted before the signature.
        let unverified = unverified_claims(assertion).ok_or_else(|| bad("unreadable claims"))?;
        let client_id = unverified["iss"]
            .as_str()
            .ok_or_else(|| bad("no iss"))?
            .to_string();
        let client = self
            .directory
            .client(&client_id)?
            .ok_or_else(|| bad("unknown client"))?;
        let keys = self.client_keys(&client);
        if !matches!(client.auth, ClientAuth::Asymmetric { .. }) || keys.is_empty() {
            return Err(bad("this client has no registered keys"));
        }
        let claims = super::keys::verify_with_keys(assertion, &keys, &["RS384", "ES384"])
            .map_err(|e| bad(&e))?;
        if claims.get("sub").and_then(Value::as_str) != Some(client_id.as_str()) {
            return Err(bad("sub must equal iss (the client_id)"));
        }
        let token_url = self.endpoint("token");
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == token_url,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(token_url.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(bad("aud must be the token endpoint"));
        }
        let now = unix_now();
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("no exp"))?;
        if exp <= now {
            return Err(bad("expired"));
        }
        if exp > now + 300 + 60 {
            return Err(bad("exp is more than five minutes ahead"));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no jti"))?;
        let mut seen = lock(&self.assertion_jtis);
        seen.retain(|_, e| *e > now);
        let key = format!("{client_id}\0{jti}");
        if seen.contains_key(&key) {
            return Err(bad("jti was already used"));
        }
        seen.insert(key, exp);
        Ok(client)
    }

    /// A client's public keys: registered inline, and fetched from its JWKS URL (as cached).
    pub fn client_keys(&self, client: &Client) -> Vec<Value> {
        let mut keys = match &client.auth {
            ClientAuth::Asymmetric { jwks } => jwks["keys"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        if let Some(set) = client
            .jwks_uri
            .as_deref()
            .and_then(|u| self.jwks_urls.get(u))
        {
            keys.extend(set["keys"].as_array().cloned().unwrap_or_default());
        }
        keys
    }

    /// The client a client assertion claims to come from, and the key id it names (unverified:
    /// only to know which keys to fetch before the signature is checked).
    pub fn assertion_client(&self, assertion: &str) -> Option<(Client, Option<String>)> {
        let header = josekit::jwt::decode_header(assertion).ok()?;
        let kid = header
            .claim("kid")
            .and_then(Value::as_str)
            .map(str::to_string);
        let claims = unverified_claims(assertion)?;
        let client = self.directory.client(claims["iss"].as_str()?).ok()??;
        Some((client, kid))
    }

    pub fn token(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<TokenResponse, OAuthError> {
        let get = |k: &str| form_value(form, k);
        match get("grant_type") {
            Some("authorization_code") => self.exchange_code(form, basic),
            Some("refresh_token") => self.refresh(form, basic),
            Some("client_credentials") => self.client_credentials(form, basic),
            Some(other) => Err(oauth(
                "unsupported_grant_type",
                format!("grant_type {other} is not supported"),
            )),
            None => Err(oauth("invalid_request", "grant_type is missing")),
        }
    }

    fn exchange_code(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<TokenResponse, OAuthError> {
        let get = |k: &str| form_value(form, k);
        let client = self.client_auth(form, basic)?;
        let code = get("code").ok_or_else(|| oauth("invalid_request", "code is missing"))?;
        let Some(c) = lock(&self.codes).remove(code) else {
            return Err(oauth(
                "invalid_grant",
                "the code is unknown, used or expired",
            ));
        };
        if c.expires <= unix_now() || c.client_id != client.client_id {
            return Err(oauth(
                "invalid_grant",
                "the code is unknown, used or expired",
            ));
        }
        if get("redirect_uri") != Some(c.redirect_uri.as_str()) {
            return Err(oauth(
                "invalid_grant",
                "redirect_uri differs from the authorization request",
            ));
        }
        let verifier = get("code_verifier").unwrap_or("");
        let valid_len = (43..=128).contains(&verifier.len());
        if !valid_len || b64url(&Sha256::digest(verifier.as_bytes())) != c.challenge {
            return Err(oauth("invalid_grant", "PKCE verification failed"));
        }
        self.issue(
            &client,
            &c.sub,
            &c.scope,
            c.patient,
            c.fhir_user,
            c.nonce,
            None,
        )
    }

    fn refresh(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<TokenResponse, OAuthError> {
        let get = |k: &str| form_value(form, k);
        let client = self.client_auth(form, basic)?;
        let token = get("refresh_token")
            .ok_or_else(|| oauth("invalid_request", "refresh_token is missing"))?;
        let id = sha_hex(token);
        let r = {
            let mut p = self.persisted.write().unwrap_or_else(|e| e.into_inner());
            let Some(r) = p.refresh.get(&id).cloned() else {
                return Err(oauth("invalid_grant", "unknown refresh token"));
            };
            if r.client_id != client.client_id {
                return Err(oauth(
                    "invalid_grant",
                    "the refresh token belongs to another client",
                ));
            }
            if r.spent || p.revoked_families.contains(&r.family) || r.expires <= unix_now() {
                if r.spent && !p.revoked_families.contains(&r.family) {
                    // A spent token came back: someone holds a copy. Revoke the whole family.
                    tracing::warn!(client = %r.client_id, "refresh token reuse; revoking its family");
                    p.revoked_families.push(r.family.clone());
                    self.save(&p)?;
                }
                return Err(oauth(
                    "invalid_grant",
                    "the refresh token was used, revoked or has expired",
                ));
            }
            // A refused request spends nothing: check the scope before rotating.
            let scope = match get("scope") {
                None => r.scope.clone(),
                Some(s) => {
                    let original = split(&r.scope);
                    let asked = split(s);
                    if asked.is_empty() || asked.iter().any(|a| !covered(a, &original)) {
                        return Err(oauth(
                            "invalid_scope",
                            "a refresh may only narrow the granted scope",
                        ));
                    }
                    asked.join(" ")
                }
            };
            p.refresh.get_mut(&id).expect("present").spent = true;
            self.save(&p)?;
            (r, scope)
        };
        let (r, scope) = r;
        self.issue(
            &client,
            &r.sub,
            &scope,
            r.patient,
            r.fhir_user,
            None,
            Some((r.family, r.session_ends)),
        )
    }

    fn client_credentials(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<TokenResponse, OAuthError> {
        let get = |k: &str| form_value(form, k);
        if get("client_assertion_type").is_none() {
            return Err(oauth(
                "invalid_client",
                "backend services authenticate with private_key_jwt",
            ));
        }
        let client = self.client_auth(form, basic)?;
        let allowed = split(&client.scope);
        let asked = split(get("scope").unwrap_or(""));
        let granted: Vec<String> = asked
            .into_iter()
            .filter(|s| s.starts_with("system/") && covered(s, &allowed))
            .collect();
        if granted.is_empty() {
            return Err(oauth(
                "invalid_scope",
                "ask for system/ scopes this client is registered for",
            ));
        }
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.base));
        claims.insert("aud".into(), json!(self.base));
        claims.insert("sub".into(), json!(client.client_id));
        claims.insert("client_id".into(), json!(client.client_id));
        claims.insert("scope".into(), json!(granted.join(" ")));
        claims.insert("jti".into(), json!(random_token()?));
        let access = self.key.sign(&claims, BACKEND_TTL)?;
        Ok(TokenResponse(json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": BACKEND_TTL.as_secs(),
            "scope": granted.join(" "),
        })))
    }

    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        client: &Client,
        sub: &str,
        scope: &str,
        patient: Option<String>,
        fhir_user: Option<String>,
        nonce: Option<String>,
        family: Option<(String, i64)>,
    ) -> std::result::Result<TokenResponse, OAuthError> {
        let granted = split(scope);
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.base));
        claims.insert("aud".into(), json!(self.base));
        claims.insert("sub".into(), json!(sub));
        claims.insert("client_id".into(), json!(client.client_id));
        claims.insert("scope".into(), json!(scope));
        claims.insert("jti".into(), json!(random_token()?));
        if let Some(p) = &patient {
            claims.insert("patient".into(), json!(p));
        }
        if let Some(f) = &fhir_user {
            claims.insert("fhirUser".into(), json!(format!("{}/{f}", self.base)));
        }
        let access = self.key.sign(&claims, ACCESS_TTL)?;
        let mut body = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_TTL.as_secs(),
            "scope": scope,
        });
        if let Some(p) = &patient {
            body["patient"] = json!(p);
            body["need_patient_banner"] = json!(true);
        }
        let offline = granted.iter().any(|s| s == "offline_access");
        let online = !offline && granted.iter().any(|s| s == "online_access");
        if offline || online {
            let token = random_token()?;
            let mut p = self.persisted.write().unwrap_or_else(|e| e.into_inner());
            let now = unix_now();
            let (family, inherited_end) = match family {
                Some((f, end)) => (f, end),
                None => (random_token()?, 0),
            };
            let session_ends = match (online, inherited_end) {
                (false, _) => 0,
                (true, 0) => now + ONLINE_SESSION,
                (true, end) => end,
            };
            let expires = if online {
                (now + ONLINE_IDLE).min(session_ends)
            } else {
                now + REFRESH_TTL
            };
            p.refresh.retain(|_, r| r.expires > now);
            p.revoked.retain(|_, e| *e > now);
            p.refresh.insert(
                sha_hex(&token),
                Refresh {
                    client_id: client.client_id.clone(),
                    sub: sub.to_string(),
                    scope: scope.to_string(),
                    fhir_user: fhir_user.clone(),
                    patient: patient.clone(),
                    family,
                    expires,
                    spent: false,
                    session_ends,
                },
            );
            self.save(&p)?;
            body["refresh_token"] = json!(token);
        }
        if granted.iter().any(|s| s == "openid") {
            let mut id = Map::new();
            id.insert("iss".into(), json!(self.base));
            id.insert("sub".into(), json!(sub));
            id.insert("aud".into(), json!(client.client_id));
            if let Some(n) = nonce {
                id.insert("nonce".into(), json!(n));
            }
            if granted.iter().any(|s| s == "fhirUser") {
                if let Some(f) = &fhir_user {
                    id.insert("fhirUser".into(), json!(format!("{}/{f}", self.base)));
                }
            }
            body["id_token"] = json!(self.key.sign(&id, ACCESS_TTL)?);
        }
        Ok(TokenResponse(body))
    }

    // ---- resource server side ----

    /// The grant of a bearer token presented to the FHIR API, or why it is refused.
    pub fn grant(&self, token: &str) -> std::result::Result<std::sync::Arc<Grant>, String> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        let cached = self
            .verified
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        let (grant, exp) = match cached {
            Some(hit) => hit,
            None => {
                let (grant, exp) = self.verify_access_token(token)?;
                let grant = std::sync::Arc::new(grant);
                let mut cache = self.verified.write().unwrap_or_else(|e| e.into_inner());
                if cache.len() >= VERIFIED_TOKENS {
                    cache.clear();
                }
                cache.insert(digest, (grant.clone(), exp));
                (grant, exp)
            }
        };
        if exp <= now {
            return Err("the token has expired".into());
        }
        if self
            .persisted
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .revoked
            .contains_key(&grant.jti)
        {
            return Err("the token was revoked".into());
        }
        Ok(grant)
    }

    /// Signature, expiry, issuer and audience of an access token; its grant and expiry.
    fn verify_access_token(&self, token: &str) -> std::result::Result<(Grant, i64), String> {
        if let Some(ext) = self.external_issuer_of(token) {
            let keys = self
                .jwks_urls
                .get(&ext.jwks_uri)
                .unwrap_or_else(|| json!({"keys": []}));
            return ext.verify(token, &keys, &self.base);
        }
        let claims = self.key.verify(token)?;
        let exp = claims
            .get("exp")
            .and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().map(|f| f as i64))
                    .or_else(|| v.as_str()?.parse().ok())
            })
            .ok_or("the token has no expiry")?;
        let s = |k: &str| claims.get(k).and_then(Value::as_str);
        if s("iss") != Some(self.base.as_str()) {
            return Err("the token was issued by someone else".into());
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.base,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(self.base.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err("the token is not meant for this server (aud)".into());
        }
        let jti = s("jti").ok_or("the token has no jti")?;
        let fhir_user = s("fhirUser").map(|f| {
            f.strip_prefix(&format!("{}/", self.base))
                .unwrap_or(f)
                .to_string()
        });
        let grant = Grant::new(
            s("client_id").unwrap_or(""),
            s("sub").unwrap_or(""),
            s("scope").unwrap_or(""),
            s("patient").map(str::to_string),
            fhir_user,
            jti,
        );
        Ok((grant, exp))
    }

    /// RFC 7662. The caller must be an authenticated client or hold a valid token.
    pub fn introspect(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
        bearer: Option<&str>,
    ) -> std::result::Result<Value, OAuthError> {
        let caller_ok = bearer.is_some_and(|b| self.grant(b).is_ok())
            || (basic.is_some() || form.iter().any(|(k, _)| k == "client_assertion_type"))
                && self.client_auth(form, basic).is_ok();
        if !caller_ok {
            return Err(oauth(
                "invalid_client",
                "introspection needs client authentication or a bearer token",
            ));
        }
        let token = form_value(form, "token").unwrap_or("");
        let Ok(claims) = self.key.verify(token) else {
            return Ok(json!({"active": false}));
        };
        let Ok(g) = self.grant(token) else {
            return Ok(json!({"active": false}));
        };
        let mut out = json!({
            "active": true,
            "scope": g.scope,
            "client_id": g.client_id,
            "sub": g.sub,
            "iss": self.base,
            "aud": self.base,
            "token_type": "Bearer",
            "exp": claims.get("exp"),
            "iat": claims.get("iat"),
        });
        if let Some(p) = &g.patient {
            out["patient"] = json!(p);
        }
        if let Some(f) = claims.get("fhirUser") {
            out["fhirUser"] = f.clone();
        }
        Ok(out)
    }

    /// RFC 7009: revoke an access token (by jti) or a refresh token (and its family).
    pub fn revoke(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> std::result::Result<(), OAuthError> {
        let client = self.client_auth(form, basic)?;
        let token = form_value(form, "token").unwrap_or("");
        let mut p = self.persisted.write().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = p.refresh.get(&sha_hex(token)).cloned() {
            if r.client_id == client.client_id && !p.revoked_families.contains(&r.family) {
                p.revoked_families.push(r.family);
                self.save(&p)?;
            }
            return Ok(());
        }
        if let Ok(claims) = self.key.verify(token) {
            let same_client =
                claims.get("client_id").and_then(Value::as_str) == Some(client.client_id.as_str());
            if let (true, Some(jti)) = (same_client, claims.get("jti").and_then(Value::as_str)) {
                let exp = claims
                    .get("exp")
                    .and_then(Value::as_i64)
                    .unwrap_or(unix_now() + 3600);
                p.revoked.insert(jti.to_string(), exp);
                self.save(&p)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (AuthServer, tempfile::TempDir, Client) {
        let dir = tempfile::tempdir().unwrap();
        let auth = AuthServer::open(dir.path(), "http://x/fhir").unwrap();
        let client = Client {
            client_id: "app".into(),
            name: String::new(),
            auth: ClientAuth::Public,
            redirect_uris: vec!["http://localhost/cb".into()],
            scope: "online_access offline_access patient/*.rs".into(),
            encryption_jwks: None,
            jwks_uri: None,
        };
        auth.directory.put_client(client.clone()).unwrap();
        (auth, dir, client)
    }

    fn refresh_record(auth: &AuthServer, token: &str) -> Refresh {
        let p = auth.persisted.read().unwrap();
        p.refresh.get(&sha_hex(token)).cloned().unwrap()
    }

    #[test]
    fn online_access_lives_an_hour_at_a_time_within_its_session() {
        let (auth, _dir, client) = server();
        let now = unix_now();
        let online = auth
            .issue(
                &client,
                "ann",
                "online_access patient/*.rs",
                None,
                None,
                None,
                None,
            )
            .unwrap();
        let token = online.0["refresh_token"].as_str().unwrap().to_string();
        let r = refresh_record(&auth, &token);
        assert!(r.expires <= now + ONLINE_IDLE + 5 && r.expires >= now + ONLINE_IDLE - 5);
        assert!(r.session_ends >= now + ONLINE_SESSION - 5);
        // Refreshing keeps the session's end: a chain of refreshes never outlives the login.
        let form = vec![
            ("grant_type".to_string(), "refresh_token".to_string()),
            ("refresh_token".to_string(), token),
            ("client_id".to_string(), "app".to_string()),
        ];
        let next = auth.token(&form, None).unwrap();
        let r2 = refresh_record(&auth, next.0["refresh_token"].as_str().unwrap());
        assert_eq!(r2.session_ends, r.session_ends);
        assert_eq!(r2.family, r.family);
        let offline = auth
            .issue(
                &client,
                "ann",
                "offline_access patient/*.rs",
                None,
                None,
                None,
                None,
            )
            .unwrap();
        let r3 = refresh_record(&auth, offline.0["refresh_token"].as_str().unwrap());
        assert_eq!(r3.session_ends, 0);
        assert!(r3.expires >= now + REFRESH_TTL - 5);
        let none = auth
            .issue(&client, "ann", "patient/*.rs", None, None, None, None)
            .unwrap();
        assert!(none.0.get("refresh_token").is_none());
    }
}

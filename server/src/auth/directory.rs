//! Registered clients and users: `<data-dir>/auth/clients.json` and `users.json`, written by
//! `fhirmament clients add` and `fhirmament users add` and read by the server when it needs
//! them (so an addition takes effect without a restart). Passwords and client secrets are
//! stored as argon2id hashes.

use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientAuth {
    /// A browser or mobile app: no secret, PKCE only.
    Public,
    /// `client_secret_basic`.
    Symmetric { secret_hash: String },
    /// `private_key_jwt` with RS384 or ES384, keys given inline as a JWKS.
    Asymmetric { jwks: Value },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Client {
    pub client_id: String,
    #[serde(default)]
    pub name: String,
    pub auth: ClientAuth,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// The scopes this client may be granted (space-separated).
    pub scope: String,
    /// Public keys responses may be encrypted to (`Accept: application/jose`; see `jwe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_jwks: Option<Value>,
    /// Where the client publishes its public keys (RFC 7591 `jwks_uri`; see `jwks_url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Patient,
    Practitioner,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    /// `Patient/<id>`, `Practitioner/<id>`, ...
    #[serde(default)]
    pub fhir_user: Option<String>,
    /// Narrower scopes for this user (e.g. pharmacy staff); none: what the role allows.
    #[serde(default)]
    pub scope: Option<String>,
    /// Base32 TOTP secret (RFC 6238, SHA-1, 6 digits, 30 s): a second factor at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret: Option<String>,
}

/// A new TOTP secret (base32) and its `otpauth://` URI for authenticator apps.
pub fn new_totp(username: &str) -> Result<(String, String)> {
    let raw = crate::ledger::entry::new_salt()?[..20].to_vec();
    let secret = totp_rs::Secret::Raw(raw).to_encoded().to_string();
    let uri = format!(
        "otpauth://totp/Fhirmament:{}?secret={secret}&issuer=Fhirmament&algorithm=SHA1&digits=6&period=30",
        form_urlencoded::byte_serialize(username.as_bytes()).collect::<String>()
    );
    Ok((secret, uri))
}

/// Does `code` match the TOTP secret now (one step of clock skew allowed)?
pub fn verify_totp(secret: &str, code: &str) -> bool {
    let Ok(bytes) = totp_rs::Secret::Encoded(secret.to_string()).to_bytes() else {
        return false;
    };
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes)
        .ok()
        .and_then(|t| t.check_current(code.trim()).ok())
        .unwrap_or(false)
}

impl User {
    /// The patient a patient user is.
    pub fn patient_id(&self) -> Option<&str> {
        match self.role {
            Role::Patient => self.fhir_user.as_deref()?.strip_prefix("Patient/"),
            _ => None,
        }
    }
}

pub fn hash_secret(secret: &str) -> Result<String> {
    let salt = crate::ledger::entry::new_salt()?;
    let salt = SaltString::encode_b64(&salt[..16]).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| Error::Internal(e.to_string()))?
        .to_string())
}

pub fn verify_secret(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash).ok().is_some_and(|h| {
        Argon2::default()
            .verify_password(secret.as_bytes(), &h)
            .is_ok()
    })
}

pub struct Directory {
    dir: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{}: {e}", path.display()))
}

impl Directory {
    pub fn new(auth_dir: &Path) -> Directory {
        Directory {
            dir: auth_dir.to_path_buf(),
        }
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, file: &str) -> Result<Vec<T>> {
        let path = self.dir.join(file);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn write<T: Serialize>(&self, file: &str, items: &[T]) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let path = self.dir.join(file);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let text = serde_json::to_vec_pretty(items).map_err(|e| io(&path, e))?;
        std::fs::write(&tmp, text).map_err(|e| io(&tmp, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600));
        }
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    }

    pub fn clients(&self) -> Result<Vec<Client>> {
        self.read("clients.json")
    }

    pub fn client(&self, id: &str) -> Result<Option<Client>> {
        Ok(self.clients()?.into_iter().find(|c| c.client_id == id))
    }

    pub fn users(&self) -> Result<Vec<User>> {
        self.read("users.json")
    }

    pub fn user(&self, name: &str) -> Result<Option<User>> {
        Ok(self.users()?.into_iter().find(|u| u.username == name))
    }

    /// Add or replace a client.
    pub fn put_client(&self, c: Client) -> Result<()> {
        let mut all = self.clients()?;
        all.retain(|x| x.client_id != c.client_id);
        all.push(c);
        self.write("clients.json", &all)
    }

    /// Add or replace a user.
    pub fn put_user(&self, u: User) -> Result<()> {
        let mut all = self.users()?;
        all.retain(|x| x.username != u.username);
        all.push(u);
        self.write("users.json", &all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_hash_and_verify() {
        let h = hash_secret("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_secret("correct horse", &h));
        assert!(!verify_secret("wrong", &h));
        assert!(!verify_secret("x", "not a hash"));
    }

    #[test]
    fn additions_replace_by_id_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let d = Directory::new(dir.path());
        assert!(d.clients().unwrap().is_empty());
        let c = Client {
            client_id: "app".into(),
            name: "App".into(),
            auth: ClientAuth::Public,
            redirect_uris: vec!["http://localhost/cb".into()],
            scope: "openid patient/*.rs".into(),
            encryption_jwks: None,
            jwks_uri: None,
        };
        d.put_client(c.clone()).unwrap();
        d.put_client(Client {
            name: "App 2".into(),
            ..c
        })
        .unwrap();
        let all = d.clients().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "App 2");
    }
}

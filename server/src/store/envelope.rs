//! Envelope encryption of stored resource versions.
//!
//! - The **KEK** (key-encryption key) is a 256-bit symmetric JWK (`{"kty":"oct","kid":…,"k":…}`)
//!   loaded from a file or the environment, never from the data directory it protects.
//! - Each patient compartment has its own **DEK** (data-encryption key, 256 bits); a resource
//!   outside every compartment has one of its own. A DEK is stored wrapped under the KEK as a
//!   JWE (`alg: A256KW`, `enc: A256GCM`, `kid`: the KEK's) in the `keys` column family, under
//!   its scope (`Patient/<id>`, or `<Type>/<id>`).
//! - Each stored version is a JWE in compact serialization (`alg: dir`, `enc: A256GCM`, `kid`:
//!   the DEK's scope). Nothing else about the resource is in clear in the `versions` family.
//! - A `kek-check` record (a JWE of a fixed text under the KEK) lets startup refuse a wrong KEK
//!   before anything is read or written.
//!
//! Rotating the KEK re-wraps the DEKs only; bulk data is never re-encrypted for it. At start:
//! the new KEK and the previous one (`--previous-kek-file`); the store re-wraps every data key
//! under the new KEK, then seals its check record under it, after which the previous KEK is
//! no longer needed (a crash in between is resumed at the next start). Online: SIGHUP makes
//! the commit thread `begin_rotation` and drive it to the end (`txlog::Rotation`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use josekit::jwe::{self, Dir, JweHeader, A256KW};
use serde_json::Value;

use crate::error::{Error, Result};

const KEK_CHECK_TEXT: &[u8] = b"fhirmament/kek-check/v1";

/// The key-encryption key.
#[derive(Clone)]
pub struct Kek {
    pub kid: String,
    key: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.kid)
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Kek {
    /// A new random KEK, as the JWK text to keep in a file or secret.
    pub fn generate() -> Result<(Kek, String)> {
        let key = crate::ledger::entry::new_salt()?;
        let kid = format!(
            "kek-{}",
            &crate::ledger::entry::hex(&crate::ledger::entry::new_salt()?)[..16]
        );
        let jwk = serde_json::json!({"kty": "oct", "kid": kid, "alg": "A256KW", "k": b64(&key)});
        Ok((
            Kek { kid, key },
            serde_json::to_string_pretty(&jwk).expect("json") + "\n",
        ))
    }

    /// A KEK from its JWK text.
    pub fn from_jwk(text: &str) -> std::result::Result<Kek, String> {
        let v: Value = serde_json::from_str(text.trim()).map_err(|e| format!("not a JWK: {e}"))?;
        if v["kty"] != "oct" {
            return Err("the KEK must be a symmetric JWK (\"kty\": \"oct\")".into());
        }
        let kid = v["kid"]
            .as_str()
            .filter(|k| !k.is_empty())
            .ok_or("the KEK JWK needs a \"kid\"")?
            .to_string();
        let key: [u8; 32] = v["k"]
            .as_str()
            .and_then(|k| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(k)
                    .ok()
            })
            .and_then(|b| b.try_into().ok())
            .ok_or("the KEK's \"k\" must be 32 bytes, base64url")?;
        Ok(Kek { kid, key })
    }

    fn wrap(&self, plaintext: &[u8]) -> Result<String> {
        let mut header = JweHeader::new();
        header.set_content_encryption("A256GCM");
        header.set_key_id(&self.kid);
        let enc = A256KW
            .encrypter_from_bytes(self.key)
            .map_err(|e| Error::Internal(e.to_string()))?;
        jwe::serialize_compact(plaintext, &header, &enc).map_err(|e| Error::Internal(e.to_string()))
    }

    fn unwrap(&self, jwe_text: &str) -> std::result::Result<Vec<u8>, String> {
        let kid = protected_kid(jwe_text).ok_or("not a JWE")?;
        if kid != self.kid {
            return Err(format!("sealed under KEK {kid}, not {}", self.kid));
        }
        let dec = A256KW
            .decrypter_from_bytes(self.key)
            .map_err(|e| e.to_string())?;
        jwe::deserialize_compact(jwe_text, &dec)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    }

    /// The record that proves a store was sealed under this KEK.
    pub fn check_record(&self) -> Result<Vec<u8>> {
        Ok(self.wrap(KEK_CHECK_TEXT)?.into_bytes())
    }

    /// Does this KEK open the store's check record?
    pub fn opens(&self, record: &[u8]) -> std::result::Result<(), String> {
        let text = std::str::from_utf8(record).map_err(|_| "corrupt KEK check record")?;
        match self.unwrap(text) {
            Ok(p) if p == KEK_CHECK_TEXT => Ok(()),
            Ok(_) => Err("the KEK check record is not what this KEK sealed".into()),
            Err(e) => Err(e),
        }
    }
}

/// The `kid` in a compact JWE's protected header.
fn protected_kid(jwe_text: &str) -> Option<String> {
    let header = jwe_text.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["kid"].as_str().map(str::to_string)
}

/// A data-encryption key, unwrapped.
#[derive(Clone)]
pub struct Dek([u8; 32]);

impl Dek {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The KEK (and, while a rotation completes, the previous one) and the DEKs unwrapped so far
/// (by the wrapped form, so a cached DEK is always one that is stored exactly so).
pub struct Envelope {
    keks: RwLock<Keks>,
    unwrapped: RwLock<HashMap<String, Arc<Dek>>>,
}

#[derive(Clone)]
struct Keks {
    current: Kek,
    previous: Option<Kek>,
}

impl Envelope {
    pub fn new(kek: Kek) -> Envelope {
        Envelope::rotating(kek, None)
    }

    /// An envelope that also opens data keys wrapped under the previous KEK (a rotation).
    pub fn rotating(kek: Kek, previous: Option<Kek>) -> Envelope {
        Envelope {
            keks: RwLock::new(Keks {
                previous: previous.filter(|p| p.kid != kek.kid),
                current: kek,
            }),
            unwrapped: RwLock::new(HashMap::new()),
        }
    }

    fn keks(&self) -> std::sync::RwLockReadGuard<'_, Keks> {
        self.keks.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The KEK new data keys are wrapped under.
    pub fn kek(&self) -> Kek {
        self.keks().current.clone()
    }

    /// The KEK being rotated away from, while a rotation is under way.
    pub fn previous(&self) -> Option<Kek> {
        self.keks().previous.clone()
    }

    /// Start a rotation in a running process: new data keys are wrapped under `new` from now
    /// on, and keys under the current KEK still open until `finish_rotation`.
    pub fn begin_rotation(&self, new: Kek) -> std::result::Result<(), String> {
        let mut keks = self.keks.write().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = &keks.previous {
            return Err(format!(
                "a rotation from KEK {} to {} is still under way",
                p.kid, keks.current.kid
            ));
        }
        if new.kid == keks.current.kid {
            return Err(format!("KEK {} is already the current one", new.kid));
        }
        let old = std::mem::replace(&mut keks.current, new);
        keks.previous = Some(old);
        Ok(())
    }

    /// Every data key is wrapped under the current KEK: forget the previous one.
    pub fn finish_rotation(&self) {
        self.keks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .previous = None;
    }

    /// The KEK a wrapped data key was wrapped under, if this envelope has it.
    fn kek_for(&self, wrapped: &str) -> Option<Kek> {
        let kid = protected_kid(wrapped)?;
        let keks = self.keks();
        std::iter::once(&keks.current)
            .chain(keks.previous.iter())
            .find(|k| k.kid == kid)
            .cloned()
    }

    /// A data key wrapped under the previous KEK, re-wrapped under the current one; None when
    /// it is already under the current KEK.
    pub fn rewrap(&self, wrapped: &[u8]) -> Result<Option<Vec<u8>>> {
        let text = std::str::from_utf8(wrapped)
            .map_err(|_| Error::Integrity("a wrapped data key is corrupt".into()))?;
        let kek = self.kek_for(text).ok_or_else(|| {
            Error::Integrity(format!(
                "a data key is wrapped under KEK {}, which was not given",
                protected_kid(text).unwrap_or_default()
            ))
        })?;
        let current = self.kek();
        if kek.kid == current.kid {
            return Ok(None);
        }
        let raw = kek
            .unwrap(text)
            .map_err(|e| Error::Integrity(format!("a data key does not unwrap: {e}")))?;
        Ok(Some(current.wrap(&raw)?.into_bytes()))
    }

    /// A new DEK and its wrapped form (to store under its scope).
    pub fn new_dek(&self) -> Result<(Arc<Dek>, Vec<u8>)> {
        let dek = Arc::new(Dek(crate::ledger::entry::new_salt()?));
        let wrapped = self.kek().wrap(&dek.0)?;
        self.remember(&wrapped, dek.clone());
        Ok((dek, wrapped.into_bytes()))
    }

    fn remember(&self, wrapped: &str, dek: Arc<Dek>) {
        let mut cache = self.unwrapped.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(wrapped.to_string(), dek);
    }

    /// The DEK a stored wrapped form holds.
    pub fn dek(&self, wrapped: &[u8]) -> Result<Arc<Dek>> {
        let text = std::str::from_utf8(wrapped)
            .map_err(|_| Error::Integrity("a wrapped data key is corrupt".into()))?;
        if let Some(d) = self
            .unwrapped
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(text)
        {
            return Ok(d.clone());
        }
        let kek = self.kek_for(text).ok_or_else(|| {
            Error::Integrity(format!(
                "a data key is wrapped under KEK {}, which was not given",
                protected_kid(text).unwrap_or_default()
            ))
        })?;
        let raw = kek
            .unwrap(text)
            .map_err(|e| Error::Integrity(format!("a data key does not unwrap: {e}")))?;
        let dek = Arc::new(Dek(raw
            .try_into()
            .map_err(|_| Error::Integrity("a data key has the wrong length".into()))?));
        self.remember(text, dek.clone());
        Ok(dek)
    }

    /// Encrypt a version's JSON under the DEK of `scope`.
    pub fn seal(&self, scope: &str, dek: &Dek, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut header = JweHeader::new();
        header.set_content_encryption("A256GCM");
        header.set_key_id(scope);
        let enc = Dir
            .encrypter_from_bytes(dek.0)
            .map_err(|e| Error::Internal(e.to_string()))?;
        jwe::serialize_compact(plaintext, &header, &enc)
            .map(String::into_bytes)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The scope (`kid`) a sealed version names.
    pub fn scope_of(sealed: &[u8]) -> Option<String> {
        protected_kid(std::str::from_utf8(sealed).ok()?)
    }

    /// Decrypt a sealed version with its DEK.
    pub fn open(&self, dek: &Dek, sealed: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let text = std::str::from_utf8(sealed).map_err(|_| "not a JWE".to_string())?;
        let dec = Dir.decrypter_from_bytes(dek.0).map_err(|e| e.to_string())?;
        jwe::deserialize_compact(text, &dec)
            .map(|(p, _)| p)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope() -> Envelope {
        Envelope::new(Kek::generate().unwrap().0)
    }

    #[test]
    fn versions_round_trip_and_name_their_scope_only() {
        let e = envelope();
        let (dek, wrapped) = e.new_dek().unwrap();
        let sealed = e
            .seal("Patient/p1", &dek, br#"{"name":[{"family":"Chalmers"}]}"#)
            .unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("Chalmers"));
        assert_eq!(Envelope::scope_of(&sealed).as_deref(), Some("Patient/p1"));
        let again = e.dek(&wrapped).unwrap();
        assert_eq!(
            e.open(&again, &sealed).unwrap(),
            br#"{"name":[{"family":"Chalmers"}]}"#
        );
    }

    #[test]
    fn a_flipped_byte_or_another_key_fails() {
        let e = envelope();
        let (dek, _) = e.new_dek().unwrap();
        let sealed = e.seal("Patient/p1", &dek, b"{}").unwrap();
        for i in [sealed.len() - 3, sealed.len() / 2, 5] {
            let mut bad = sealed.clone();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            assert!(e.open(&dek, &bad).is_err(), "byte {i}");
        }
        let (other, _) = e.new_dek().unwrap();
        assert!(e.open(&other, &sealed).is_err());
    }

    #[test]
    fn rotation_rewraps_data_keys_only() {
        let (old, _) = Kek::generate().unwrap();
        let (new, _) = Kek::generate().unwrap();
        let before = Envelope::new(old.clone());
        let (dek, wrapped) = before.new_dek().unwrap();
        let sealed = before.seal("Patient/p1", &dek, b"{\"a\":1}").unwrap();
        let during = Envelope::rotating(new.clone(), Some(old.clone()));
        let rewrapped = during.rewrap(&wrapped).unwrap().expect("under the old KEK");
        assert!(during.rewrap(&rewrapped).unwrap().is_none());
        let after = Envelope::new(new);
        let dek = after.dek(&rewrapped).unwrap();
        assert_eq!(after.open(&dek, &sealed).unwrap(), b"{\"a\":1}");
        assert!(after.dek(&wrapped).is_err(), "the old KEK is retired");
    }

    #[test]
    fn a_wrong_kek_is_refused() {
        let (kek, text) = Kek::generate().unwrap();
        assert_eq!(Kek::from_jwk(&text).unwrap().kid, kek.kid);
        let record = kek.check_record().unwrap();
        assert!(kek.opens(&record).is_ok());
        let (other, _) = Kek::generate().unwrap();
        assert!(other.opens(&record).is_err());
        let e = Envelope::new(kek);
        let (_, wrapped) = e.new_dek().unwrap();
        assert!(Envelope::new(other).dek(&wrapped).is_err());
        assert!(Kek::from_jwk(r#"{"kty":"oct","kid":"x","k":"AAAA"}"#).is_err());
        assert!(Kek::from_jwk("nonsense").is_err());
    }
}

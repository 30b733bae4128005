//! Client keys published at a JWKS URL (RFC 7591 `jwks_uri`, SMART backend services): fetched
//! before the token endpoint or an encrypted response needs them, cached for a few minutes,
//! and fetched again at once when an assertion names a `kid` the cached set lacks (so a client
//! can rotate its keys). Only `https` URLs, or `http` on loopback (development), are fetched.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a fetched key set is used before it is fetched again.
const FRESH_FOR: Duration = Duration::from_secs(300);
/// The largest key set accepted.
const MAX_BYTES: usize = 64 * 1024;

#[derive(Default)]
pub struct JwksCache {
    sets: RwLock<HashMap<String, (Value, Instant)>>,
}

/// May this URL be fetched?
pub fn allowed(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => u.host_str().is_some(),
        "http" => matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")),
        _ => false,
    }
}

impl JwksCache {
    /// The cached key set of a URL (possibly stale), if any.
    pub fn get(&self, url: &str) -> Option<Value> {
        self.sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .map(|(v, _)| v.clone())
    }

    /// Remember a key set fetched by other means (an issuer's, at discovery).
    pub fn seed(&self, url: &str, set: Value) {
        self.sets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(url.to_string(), (set, Instant::now()));
    }

    /// Make sure the key set of `url` is fresh and, if `kid` is given, holds that key (fetching
    /// again once when it does not). Errors are the client's problem: they are returned as
    /// text and the token request fails with `invalid_client`.
    pub async fn refresh(
        &self,
        http: &reqwest::Client,
        url: &str,
        kid: Option<&str>,
    ) -> Result<(), String> {
        if !allowed(url) {
            return Err(format!("jwks_uri {url} is not https (or http on loopback)"));
        }
        let cached = self
            .sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .cloned();
        let has_kid = |set: &Value| {
            kid.is_none_or(|k| {
                set["keys"]
                    .as_array()
                    .is_some_and(|ks| ks.iter().any(|x| x["kid"] == k))
            })
        };
        if let Some((set, at)) = &cached {
            if at.elapsed() < FRESH_FOR && has_kid(set) {
                return Ok(());
            }
        }
        let resp = http
            .get(url)
            .header("Accept", "application/json")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("fetching {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("fetching {url}: status {}", resp.status()));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| format!("fetching {url}: {e}"))?;
        if bytes.len() > MAX_BYTES {
            return Err(format!("{url} is larger than {MAX_BYTES} bytes"));
        }
        let set: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{url} is not JSON: {e}"))?;
        if !set["keys"].is_array() {
            return Err(format!("{url} is not a JWK Set"));
        }
        let mut sets = self.sets.write().unwrap_or_else(|p| p.into_inner());
        if sets.len() > 1000 {
            sets.clear();
        }
        sets.insert(url.to_string(), (set, Instant::now()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http_is_fetched() {
        assert!(allowed("https://app.example/.well-known/jwks.json"));
        assert!(allowed("http://127.0.0.1:9999/jwks"));
        assert!(allowed("http://localhost/jwks"));
        assert!(!allowed("http://app.example/jwks"));
        assert!(!allowed("file:///etc/passwd"));
        assert!(!allowed("not a url"));
    }
}

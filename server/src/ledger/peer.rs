//! Retrieval between organizations. A version's bytes stay with the organization whose node
//! accepted the write (its holder); any other replica that must serve it asks the holder over
//! HTTP, authenticating with its genesis key, and serves the bytes only if they reproduce the
//! commitment the ledger holds for that version.
//!
//! Request authentication: header `X-Fhirmament-Node: <replica id>.<unix ms>.<hex signature>`,
//! the signature being Ed25519 over `fhirmament/node-get/v2 \0 chain \0 <resource path> \0 ms
//! \0 <acting>`, where `<acting>` (header `X-Fhirmament-Acting`, form-encoded) names on whose
//! behalf the node asks: client, user (`fhirUser`) and purpose of use. The holder accepts it
//! within `MAX_SKEW_MS` of its clock from a genesis member other than itself, and releases the
//! version only if the patient's Consents permit the requesting organization and that user.
//!
//! The release is a JWE (ECDH-ES+A256KW, A256GCM) encrypted to the asking replica's genesis
//! key in its X25519 (Montgomery) form, so only that replica can open it. The same key signs
//! and, converted, agrees keys; the two uses cannot be confused (an Ed25519 signature and an
//! X25519 agreement never take each other's inputs).

use std::time::Duration;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, Verifier};

use super::entry::{commitment_of_stored, hex};
use super::replica::ReplicaSetup;
use super::RecordRef;
use crate::error::{Error, Result};
use crate::fhir::{now_ms, ResourceType};
use crate::store::{Method, Version};

pub const NODE_HEADER: &str = "X-Fhirmament-Node";
pub const ACTING_HEADER: &str = "X-Fhirmament-Acting";
const MAX_SKEW_MS: i64 = 60_000;
const DOMAIN: &[u8] = b"fhirmament/node-get/v2\0";

/// On whose behalf a node asks another for a version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acting {
    pub client: String,
    /// The user's FHIR identity (`Practitioner/<id>`), if any.
    pub user: Option<String>,
    /// The purpose of use (v3-ActReason).
    pub purpose: Option<String>,
    /// The ledger position the requester had applied when it asked: the holder decides on
    /// consent state at least that recent (read-your-writes across replicas), so a Consent
    /// the requester already acknowledged is never judged by a holder a block behind.
    pub after: u64,
}

impl Acting {
    pub fn of(grant: Option<&crate::auth::Grant>, purpose: Option<&str>) -> Acting {
        Acting {
            client: grant.map(|g| g.client_id.clone()).unwrap_or_default(),
            user: grant.and_then(|g| g.fhir_user.clone()),
            purpose: purpose.map(str::to_string),
            after: 0,
        }
    }

    pub fn encode(&self) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        ser.append_pair("client", &self.client);
        if let Some(u) = &self.user {
            ser.append_pair("user", u);
        }
        if let Some(p) = &self.purpose {
            ser.append_pair("purpose", p);
        }
        if self.after > 0 {
            ser.append_pair("after", &self.after.to_string());
        }
        ser.finish()
    }

    pub fn decode(s: &str) -> Acting {
        let mut a = Acting::default();
        for (k, v) in form_urlencoded::parse(s.as_bytes()) {
            match k.as_ref() {
                "client" => a.client = v.into_owned(),
                "user" => a.user = Some(v.into_owned()),
                "purpose" => a.purpose = Some(v.into_owned()),
                "after" => a.after = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        a
    }

    /// The grant a holder's consent checks see for this request: the client and the user.
    pub fn as_grant(&self) -> crate::auth::Grant {
        let sub = self.user.clone().unwrap_or_else(|| self.client.clone());
        crate::auth::Grant::new(&self.client, &sub, "", None, self.user.clone(), "")
    }
}

/// The path a node request names, independent of either side's base URL.
pub fn resource_path(t: ResourceType, id: &str, version: u64) -> String {
    format!("{t}/{id}/_history/{version}")
}

fn message(chain: &str, path: &str, ms: i64, acting: &str) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(chain.as_bytes());
    m.push(0);
    m.extend_from_slice(path.as_bytes());
    m.push(0);
    m.extend_from_slice(ms.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(acting.as_bytes());
    m
}

pub fn sign_request(me: &ReplicaSetup, path: &str, ms: i64, acting: &str) -> String {
    let sig = me
        .key
        .sign(&message(&me.membership.chain_id, path, ms, acting));
    format!("{}.{ms}.{}", me.id, hex(&sig.to_bytes()))
}

/// The replica a node request says it comes from (not yet verified: `check_request` does).
pub fn claimed_replica(header: Option<&str>) -> Option<u32> {
    header?.split('.').next()?.parse().ok()
}

/// The replica a node request comes from, if its signature (over the path and the acting
/// party) holds.
pub fn check_request(
    me: &ReplicaSetup,
    header: Option<&str>,
    path: &str,
    acting: &str,
) -> Result<u32> {
    let refuse = |why: &str| Error::Forbidden(format!("node request refused: {why}"));
    let h = header.ok_or_else(|| refuse("no node credentials"))?;
    let mut parts = h.splitn(3, '.');
    let (Some(id), Some(ms), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(refuse("malformed credentials"));
    };
    let id: u32 = id.parse().map_err(|_| refuse("malformed replica id"))?;
    let ms: i64 = ms.parse().map_err(|_| refuse("malformed time"))?;
    if (now_ms() - ms).abs() > MAX_SKEW_MS {
        return Err(refuse("stale or future credentials"));
    }
    if id == me.id {
        return Err(refuse("a node does not ask itself"));
    }
    let key = me
        .membership
        .keys
        .get(id as usize)
        .ok_or_else(|| refuse("not a member of the consortium"))?;
    let sig = super::entry::unhex(sig)
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| refuse("malformed signature"))?;
    key.verify(&message(&me.membership.chain_id, path, ms, acting), &sig)
        .map_err(|_| refuse("bad signature"))?;
    Ok(id)
}

/// The key a holder encrypts a release to: the asking replica's genesis key, as X25519
/// (the Montgomery form of its Ed25519 key), in a JWK for ECDH-ES+A256KW.
pub fn release_key(me: &ReplicaSetup, replica: u32) -> Option<serde_json::Value> {
    let key = me.membership.keys.get(replica as usize)?;
    Some(serde_json::json!({
        "kty": "OKP",
        "crv": "X25519",
        "kid": format!("replica-{replica}"),
        "x": crate::auth::b64url(key.to_montgomery().as_bytes()),
    }))
}

/// Open a release encrypted to this replica (see `release_key`).
pub fn open_release(me: &ReplicaSetup, jwe: &str) -> std::result::Result<Vec<u8>, String> {
    use josekit::jwe::ECDH_ES_A256KW;
    let private = serde_json::json!({
        "kty": "OKP",
        "crv": "X25519",
        "x": crate::auth::b64url(me.key.verifying_key().to_montgomery().as_bytes()),
        "d": crate::auth::b64url(&me.key.to_scalar_bytes()),
    });
    let map = private.as_object().cloned().unwrap_or_default();
    let jwk = josekit::jwk::Jwk::from_map(map).map_err(|e| e.to_string())?;
    let decrypter = ECDH_ES_A256KW
        .decrypter_from_jwk(&jwk)
        .map_err(|e| e.to_string())?;
    josekit::jwe::deserialize_compact(jwe, &decrypter)
        .map(|(payload, _)| payload)
        .map_err(|e| e.to_string())
}

/// What a holder sends: a Parameters resource with the version and its salt (encrypted to the
/// asking replica on the way out).
pub fn release(resource: serde_json::Value, salt: &[u8; 32]) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [
            {"name": "salt", "valueBase64Binary": base64::engine::general_purpose::STANDARD.encode(salt)},
            {"name": "resource", "resource": resource},
        ]
    })
}

fn parse_release(v: &serde_json::Value) -> Option<([u8; 32], serde_json::Value)> {
    let params = v["parameter"].as_array()?;
    let salt = params.iter().find(|p| p["name"] == "salt")?["valueBase64Binary"]
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())?
        .try_into()
        .ok()?;
    let resource = params.iter().find(|p| p["name"] == "resource")?["resource"].clone();
    Some((salt, resource))
}

/// Fetch a version from its holder and check it against the ledger record.
pub async fn fetch(
    me: &ReplicaSetup,
    client: &reqwest::Client,
    t: ResourceType,
    id: &str,
    version: u64,
    rec: &RecordRef,
    acting: &Acting,
) -> Result<Version> {
    let unavailable = |why: String| {
        Error::Unavailable(format!(
            "{t}/{id}/_history/{version} is held by replica {}, which {why}",
            rec.holder
        ))
    };
    let api = me
        .genesis
        .replicas
        .get(rec.holder as usize)
        .and_then(|r| r.api.clone())
        .ok_or_else(|| unavailable("has no API address in the genesis".into()))?;
    let path = resource_path(t, id, version);
    let acting = acting.encode();
    let resp = client
        .get(format!("{}/_node/{path}", api.trim_end_matches('/')))
        .header(NODE_HEADER, sign_request(me, &path, now_ms(), &acting))
        .header(ACTING_HEADER, &acting)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| unavailable(format!("did not answer ({e})")))?;
    if resp.status() == reqwest::StatusCode::FORBIDDEN {
        return Err(Error::Forbidden(format!(
            "{t}/{id}/_history/{version} is held by replica {}, which refused to release it under the patient's consent",
            rec.holder
        )));
    }
    if !resp.status().is_success() {
        return Err(unavailable(format!("answered {}", resp.status())));
    }
    let jwe = resp
        .text()
        .await
        .map_err(|e| unavailable(format!("sent an unreadable answer ({e})")))?;
    let plain = open_release(me, &jwe).map_err(|e| {
        unavailable(format!(
            "sent an answer not encrypted to this replica ({e})"
        ))
    })?;
    let released: serde_json::Value = serde_json::from_slice(&plain)
        .map_err(|e| unavailable(format!("sent an unreadable answer ({e})")))?;
    let (salt, resource) = parse_release(&released)
        .ok_or_else(|| unavailable("sent an answer without salt and resource".into()))?;
    let body = serde_json::to_vec(&resource).map_err(|e| Error::Internal(e.to_string()))?;
    let matches = rec
        .commitment
        .is_some_and(|c| commitment_of_stored(&salt, &body).is_ok_and(|got| got == c));
    if !matches {
        tracing::error!(
            target: "fhirmament::integrity",
            holder = rec.holder,
            resource = %path,
            "ALERT: a holder served bytes that do not match the ledger commitment"
        );
        return Err(unavailable(
            "sent bytes that do not match the ledger commitment; they were discarded".into(),
        ));
    }
    let meta_ts = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["meta"]["lastUpdated"]
                .as_str()
                .and_then(crate::search::value::parse_date_range)
                .map(|(lo, _)| lo)
        })
        .unwrap_or(0);
    Ok(Version {
        rtype: t,
        id: id.to_string(),
        version,
        tx: 0,
        last_updated: meta_ts,
        deleted: false,
        method: if version == 1 {
            Method::Post
        } else {
            Method::Put
        },
        body: body.to_vec().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::Acting;

    #[test]
    fn the_acting_party_and_the_requesters_ledger_position_survive_the_signed_header() {
        let a = Acting {
            client: "ehr & co".into(),
            user: Some("Practitioner/p1".into()),
            purpose: Some("ETREAT".into()),
            after: 4_812,
        };
        assert_eq!(Acting::decode(&a.encode()), a);
        let fresh = Acting {
            after: 0,
            ..a.clone()
        };
        assert!(!fresh.encode().contains("after"));
        assert_eq!(Acting::decode(&fresh.encode()), fresh);
    }
}

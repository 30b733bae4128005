//! Content negotiation and request headers: `_format`, `Accept`, `Content-Type`, `Prefer`,
//! `If-Match`, and reading the body within the configured size limit.

use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use serde_json::Value;

use super::{Body, Route};
use crate::error::{Error, Issue, Result};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReturnPreference {
    Minimal,
    #[default]
    Representation,
    OperationOutcome,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Prefer {
    pub return_: ReturnPreference,
    /// `handling=lenient`: ignore unknown search parameters (and say so).
    pub lenient: bool,
}

pub fn query_pairs(qs: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(qs.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn pretty(query: &[(String, String)]) -> bool {
    query.iter().any(|(k, v)| k == "_pretty" && v == "true")
}

fn json_mime(m: &str) -> bool {
    let base = m
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        base.as_str(),
        "application/fhir+json"
            | "application/json"
            | "application/json+fhir"
            | "json"
            | "*/*"
            | "application/*"
    )
}

/// `_format` wins over `Accept`; both must allow JSON, the only format served.
/// Can the response be given in a form the client accepts? True when it asks for the
/// response encrypted to it (`Accept: application/jose`, see `auth::jwe`).
pub fn check_accept(req: &HttpRequest, query: &[(String, String)]) -> Result<bool> {
    if let Some((_, f)) = query.iter().find(|(k, _)| k == "_format") {
        if !json_mime(f) {
            return Err(Error::NotAcceptable(format!(
                "_format '{f}' is not supported; this server speaks application/fhir+json"
            )));
        }
        return Ok(false);
    }
    if let Some(accept) = header(req, "Accept") {
        let jose = accept
            .split(',')
            .any(|m| m.split(';').next().unwrap_or("").trim() == crate::auth::jwe::JOSE);
        if jose {
            return Ok(true);
        }
        if !accept.split(',').any(json_mime) {
            return Err(Error::NotAcceptable(format!(
                "cannot produce any of '{accept}'; this server speaks application/fhir+json (or application/jose, encrypted to a registered key)"
            )));
        }
    }
    Ok(false)
}

pub fn header(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `If-Match: W/"3"` -> 3.
pub fn parse_etag(value: &str) -> Result<u64> {
    let v = value.trim().trim_start_matches("W/").trim_matches('"');
    v.parse().map_err(|_| {
        Error::bad_request(
            "invalid",
            format!("ETag '{value}' is not of the form W/\"<version>\""),
        )
    })
}

pub fn if_match(req: &HttpRequest) -> Result<Option<u64>> {
    header(req, "If-Match").map(|v| parse_etag(&v)).transpose()
}

pub fn prefer(req: &HttpRequest) -> Prefer {
    let mut p = Prefer::default();
    for value in req
        .headers()
        .get_all("Prefer")
        .filter_map(|v| v.to_str().ok())
    {
        for part in value.split(',').map(str::trim) {
            match part.replace(' ', "").as_str() {
                "return=minimal" => p.return_ = ReturnPreference::Minimal,
                "return=representation" => p.return_ = ReturnPreference::Representation,
                "return=OperationOutcome" => p.return_ = ReturnPreference::OperationOutcome,
                "handling=lenient" => p.lenient = true,
                "handling=strict" => p.lenient = false,
                _ => {}
            }
        }
    }
    p
}

pub fn parse_resource(bytes: &[u8]) -> Result<Value> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Error::BadRequest(Issue::error(
            "structure",
            format!("the body is not valid JSON: {e}"),
        ))
    })?;
    if !value.is_object() {
        return Err(Error::BadRequest(Issue::error(
            "structure",
            "the body must be a JSON object (a FHIR resource)",
        )));
    }
    Ok(value)
}

/// Read and parse the body the route expects, refusing bodies over `limit` bytes.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    route: &Route,
) -> Result<Body> {
    let declared = header(req, "Content-Length").and_then(|l| l.parse::<usize>().ok());
    if declared.is_some_and(|l| l > limit) {
        return Err(Error::PayloadTooLarge(limit));
    }
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            Error::bad_request(
                "incomplete",
                format!("reading the request body failed: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > limit {
            return Err(Error::PayloadTooLarge(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    let content_type = header(req, "Content-Type").unwrap_or_default();
    let base = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let wants_resource = matches!(
        route,
        Route::SystemBundle
            | Route::Create(_)
            | Route::Update(..)
            | Route::ConditionalUpdate(_)
            | Route::ValidateType(_)
            | Route::ValidateInstance(..)
    );
    if wants_resource {
        if bytes.is_empty() {
            return Err(Error::bad_request(
                "required",
                "this interaction needs a resource in the body",
            ));
        }
        if !matches!(
            base.as_str(),
            "application/fhir+json" | "application/json" | "application/json+fhir"
        ) {
            return Err(Error::UnsupportedMediaType(format!(
                "Content-Type '{content_type}' is not supported; send application/fhir+json"
            )));
        }
        return Ok(Body::Resource(parse_resource(&bytes)?));
    }
    match route {
        Route::Patch(..) | Route::ConditionalPatch(_) => {
            if base != "application/json-patch+json" {
                return Err(Error::UnsupportedMediaType(format!(
                    "PATCH needs Content-Type application/json-patch+json, not '{content_type}'"
                )));
            }
            let patch: json_patch::Patch = serde_json::from_slice(&bytes).map_err(|e| {
                Error::BadRequest(Issue::error(
                    "structure",
                    format!("the body is not a JSON Patch document: {e}"),
                ))
            })?;
            Ok(Body::Patch(patch))
        }
        Route::SearchPost(_) => {
            if !bytes.is_empty() && base != "application/x-www-form-urlencoded" {
                return Err(Error::UnsupportedMediaType(
                    "POST _search needs Content-Type application/x-www-form-urlencoded".into(),
                ));
            }
            Ok(Body::Form(query_pairs(
                std::str::from_utf8(&bytes)
                    .map_err(|_| Error::bad_request("invalid", "form body is not UTF-8"))?,
            )))
        }
        _ => Ok(Body::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"3\"").unwrap(), 3);
        assert_eq!(parse_etag("\"12\"").unwrap(), 12);
        assert!(parse_etag("W/\"abc\"").is_err());
    }

    #[test]
    fn json_mimes() {
        assert!(json_mime("application/fhir+json;fhirVersion=4.0"));
        assert!(json_mime("*/*"));
        assert!(!json_mime("application/fhir+xml"));
        assert!(!json_mime("text/html"));
    }
}

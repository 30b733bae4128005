//! HTTP: the only module (with `error`) that knows actix-web. One route table (`route`),
//! one dispatcher, and the conversions between HTTP and `FhirRequest`/`FhirResponse`.

pub mod bundle;
pub mod capability;
pub mod interaction;
pub mod negotiate;
pub mod oauth;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::fhir::{check_id, format_http_date, ResourceType};
use crate::Service;
use negotiate::{Prefer, ReturnPreference};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }
}

/// Every interaction the server answers, by URL shape and method (R4 http.html).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Capabilities,
    SystemBundle,
    SystemHistory,
    Search(ResourceType),
    SearchPost(ResourceType),
    Create(ResourceType),
    ConditionalUpdate(ResourceType),
    ConditionalDelete(ResourceType),
    ConditionalPatch(ResourceType),
    TypeHistory(ResourceType),
    ValidateType(ResourceType),
    Read(ResourceType, String),
    Update(ResourceType, String),
    Patch(ResourceType, String),
    Delete(ResourceType, String),
    InstanceHistory(ResourceType, String),
    VRead(ResourceType, String, u64),
    ValidateInstance(ResourceType, String),
    /// `$verify`: the ledger receipt of a version (the current one when None).
    Verify(ResourceType, String, Option<u64>),
    /// Read-only ledger views: `_ledger`, `_ledger/blocks/{seq}`.
    LedgerHead,
    LedgerBlock(u64),
    /// Node-to-node: a version this node holds, for another replica (`_node/T/id/_history/v`).
    NodeVersion(ResourceType, String, u64),
    /// `Patient/{id}/{type}`
    PatientCompartment(String, ResourceType),
    /// `Patient/{id}/$everything`: the patient and their compartment, as consent allows.
    PatientEverything(String),
}

fn not_allowed(method: Method, what: &str) -> Error {
    Error::MethodNotAllowed(format!("{method:?} is not allowed on {what}"))
}

/// The route table: URL path segments below the base, and the method.
pub fn route(method: Method, segments: &[&str]) -> Result<Route> {
    use Method::*;
    let read = matches!(method, Get | Head);
    Ok(match segments {
        [] | [""] => match method {
            Post => Route::SystemBundle,
            _ => {
                return Err(not_allowed(
                    method,
                    "the base URL (system search is not supported)",
                ))
            }
        },
        ["metadata"] if read => Route::Capabilities,
        ["_history"] if read => Route::SystemHistory,
        ["metadata"] | ["_history"] => return Err(not_allowed(method, segments[0])),
        ["_ledger"] if read => Route::LedgerHead,
        ["_node", t, id, "_history", v] if read => {
            check_id(id)?;
            let v: u64 = v.parse().map_err(|_| {
                Error::bad_request("invalid", format!("version '{v}' is not a number"))
            })?;
            Route::NodeVersion(t.parse()?, id.to_string(), v)
        }
        ["_ledger", "blocks", seq] if read => Route::LedgerBlock(seq.parse().map_err(|_| {
            Error::bad_request("invalid", format!("block '{seq}' is not a sequence number"))
        })?),
        [t] => {
            let rt: ResourceType = t.parse()?;
            match method {
                Get | Head => Route::Search(rt),
                Post => Route::Create(rt),
                Put => Route::ConditionalUpdate(rt),
                Delete => Route::ConditionalDelete(rt),
                Patch => Route::ConditionalPatch(rt),
            }
        }
        [t, "_search"] if method == Post => Route::SearchPost(t.parse()?),
        [t, "_history"] if read => Route::TypeHistory(t.parse()?),
        [t, "$validate"] if method == Post => Route::ValidateType(t.parse()?),
        [t, id] if !id.starts_with('_') && !id.starts_with('$') => {
            let rt: ResourceType = t.parse()?;
            check_id(id)?;
            let id = id.to_string();
            match method {
                Get | Head => Route::Read(rt, id),
                Put => Route::Update(rt, id),
                Patch => Route::Patch(rt, id),
                Delete => Route::Delete(rt, id),
                Post => {
                    return Err(not_allowed(
                        method,
                        "a resource instance (use PUT to update)",
                    ))
                }
            }
        }
        [t, id, "_history"] if read => {
            check_id(id)?;
            Route::InstanceHistory(t.parse()?, id.to_string())
        }
        [t, id, "_history", v] if read => {
            check_id(id)?;
            let v: u64 = v.parse().map_err(|_| {
                Error::bad_request("invalid", format!("version '{v}' is not a number"))
            })?;
            Route::VRead(t.parse()?, id.to_string(), v)
        }
        [t, id, "$verify"] if read => {
            check_id(id)?;
            Route::Verify(t.parse()?, id.to_string(), None)
        }
        [t, id, "_history", v, "$verify"] if read => {
            check_id(id)?;
            let v: u64 = v.parse().map_err(|_| {
                Error::bad_request("invalid", format!("version '{v}' is not a number"))
            })?;
            Route::Verify(t.parse()?, id.to_string(), Some(v))
        }
        [t, id, "$validate"] if method == Post => {
            check_id(id)?;
            Route::ValidateInstance(t.parse()?, id.to_string())
        }
        ["Patient", id, "$everything"] if read => {
            check_id(id)?;
            Route::PatientEverything(id.to_string())
        }
        ["Patient", id, t] if read && !t.starts_with('_') && !t.starts_with('$') => {
            check_id(id)?;
            Route::PatientCompartment(id.to_string(), t.parse()?)
        }
        [t, ..] => {
            let _: ResourceType = t.parse()?;
            return Err(Error::NotFound(format!(
                "no FHIR interaction at /{} for {method:?}",
                segments.join("/")
            )));
        }
    })
}

/// The body of a request, already parsed.
#[derive(Debug, Clone)]
pub enum Body {
    None,
    Resource(Value),
    Patch(json_patch::Patch),
    Form(Vec<(String, String)>),
}

#[derive(Debug, Clone)]
pub struct FhirRequest {
    pub method: Method,
    pub route: Route,
    pub query: Vec<(String, String)>,
    pub body: Body,
    pub if_match: Option<u64>,
    pub if_none_exist: Option<String>,
    pub if_none_match: Option<String>,
    pub prefer: Prefer,
    /// Node-to-node credentials (`X-Fhirmament-Node`), for `_node` requests.
    pub node: Option<String>,
    /// For whom a node asks (`X-Fhirmament-Acting`), covered by its credentials.
    pub node_acting: Option<String>,
    /// What the request's access token allows (None: no valid token was presented).
    pub grant: Option<Arc<crate::auth::Grant>>,
    /// Why a presented token was refused.
    pub token_error: Option<String>,
    /// The purpose of use the client states (`X-Purpose-Of-Use`, a v3-ActReason code).
    pub purpose: Option<String>,
    /// The client's network address, for the AuditEvent.
    pub peer_address: Option<String>,
    /// The interaction's AuditEvent, for a write to commit in the same ledger entry.
    pub audit: Option<Arc<crate::audit::AuditSlot>>,
}

#[derive(Debug, Clone)]
pub enum ResponseBody {
    None,
    Json(Value),
    /// Stored resource bytes, sent as they are.
    Stored(Arc<[u8]>),
}

#[derive(Debug, Clone)]
pub struct FhirResponse {
    pub status: StatusCode,
    pub body: ResponseBody,
    pub version: Option<u64>,
    pub last_modified: Option<i64>,
    pub location: Option<String>,
}

impl FhirResponse {
    pub fn json(status: StatusCode, body: Value) -> Self {
        FhirResponse {
            status,
            body: ResponseBody::Json(body),
            version: None,
            last_modified: None,
            location: None,
        }
    }

    /// Apply `Prefer: return=`.
    pub fn with_return(
        mut self,
        prefer: ReturnPreference,
        outcome: impl FnOnce() -> Value,
    ) -> Self {
        match prefer {
            ReturnPreference::Representation => {}
            ReturnPreference::Minimal => self.body = ResponseBody::None,
            ReturnPreference::OperationOutcome => self.body = ResponseBody::Json(outcome()),
        }
        self
    }

    pub fn body_json(&self) -> Option<Value> {
        match &self.body {
            ResponseBody::None => None,
            ResponseBody::Json(v) => Some(v.clone()),
            ResponseBody::Stored(b) => serde_json::from_slice(b).ok(),
        }
    }
}

const MIN_COMPRESSED_BYTES: usize = 1024;

/// Status and headers of a response.
fn response_head(resp: &FhirResponse) -> actix_web::HttpResponseBuilder {
    let mut out = HttpResponse::build(resp.status);
    if let Some(v) = resp.version {
        out.insert_header(("ETag", format!("W/\"{v}\"")));
    }
    if let Some(ms) = resp.last_modified {
        out.insert_header(("Last-Modified", format_http_date(ms)));
    }
    if let Some(loc) = &resp.location {
        out.insert_header(("Location", loc.clone()));
        out.insert_header(("Content-Location", loc.clone()));
    }
    out
}

/// The body of a response as FHIR JSON.
fn response_bytes(body: ResponseBody, pretty: bool) -> Option<Vec<u8>> {
    match body {
        ResponseBody::None => None,
        ResponseBody::Json(v) => Some(
            if pretty {
                serde_json::to_vec_pretty(&v)
            } else {
                serde_json::to_vec(&v)
            }
            .unwrap_or_default(),
        ),
        ResponseBody::Stored(b) if pretty => serde_json::from_slice::<Value>(&b)
            .ok()
            .and_then(|v| serde_json::to_vec_pretty(&v).ok()),
        ResponseBody::Stored(b) => Some(b.to_vec()),
    }
}

fn to_http(resp: FhirResponse, pretty: bool, head: bool) -> HttpResponse {
    let mut out = response_head(&resp);
    match response_bytes(resp.body, pretty) {
        Some(b) => {
            out.content_type(negotiate::FHIR_JSON);
            // Compressing a small body costs both ends more than it saves (cf. nginx
            // gzip_min_length); an explicit identity encoding tells Compress to leave it.
            if b.len() < MIN_COMPRESSED_BYTES {
                out.insert_header(("Content-Encoding", "identity"));
            }
            if head {
                out.finish()
            } else {
                out.body(b)
            }
        }
        None => out.finish(),
    }
}

/// The one actix handler: everything under the base path comes here.
pub async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    svc: web::Data<Service>,
) -> Result<HttpResponse> {
    let (grant, token_error) = match bearer(&req) {
        None => (None, None),
        Some(t) => match {
            svc.auth.refresh_issuer_keys(&svc.peers, &t).await;
            svc.auth.grant(&t)
        } {
            Ok(g) => (Some(g), None),
            Err(e) => (None, Some(e)),
        },
    };
    match parse_request(&req, payload, &svc, grant.clone(), token_error).await {
        Ok((freq, pretty, head, jose)) => {
            let resp = interaction::handle(&svc, freq).await?;
            match jose {
                Some(key) => encrypted(resp, &key, head),
                None => Ok(to_http(resp, pretty, head)),
            }
        }
        Err(e) => {
            // A request refused before it became an interaction is audited too.
            let path = req.path().to_string();
            let peer = req.peer_addr().map(|a| a.ip().to_string());
            interaction::audit_refused(&svc, grant.as_deref(), peer, &path, &e).await?;
            Err(e)
        }
    }
}

/// A response encrypted to its recipient (`application/jose`): the ordinary FHIR JSON body,
/// inside a JWE only the recipient's private key opens. Headers stay as they are.
fn encrypted(resp: FhirResponse, key: &Value, head: bool) -> Result<HttpResponse> {
    let mut out = response_head(&resp);
    match response_bytes(resp.body, false) {
        Some(body) => {
            let jwe = crate::auth::jwe::encrypt_to_jwk(key, &body)?;
            out.content_type(crate::auth::jwe::JOSE);
            Ok(if head { out.finish() } else { out.body(jwe) })
        }
        None => Ok(out.finish()),
    }
}

/// Everything a FHIR request says, checked: route, negotiation, body — and the key the response
/// is encrypted to: the client's, when it asked for `application/jose`; the asking
/// organization's, always, for a node-to-node release.
async fn parse_request(
    req: &HttpRequest,
    payload: web::Payload,
    svc: &Service,
    grant: Option<Arc<crate::auth::Grant>>,
    token_error: Option<String>,
) -> Result<(FhirRequest, bool, bool, Option<Value>)> {
    let method = Method::parse(req.method().as_str())
        .ok_or_else(|| Error::MethodNotAllowed(format!("{} is not a FHIR method", req.method())))?;
    let base_path = svc.config.base_path();
    let path = req
        .path()
        .strip_prefix(base_path.as_str())
        .unwrap_or(req.path())
        .trim_matches('/');
    let decoded: Vec<String> = path
        .split('/')
        .map(|s| percent_decode(s))
        .collect::<Result<_>>()?;
    let segments: Vec<&str> = decoded
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let route = route(method, &segments)?;
    let query = negotiate::query_pairs(req.query_string());
    let pretty = negotiate::pretty(&query);
    let asks_jose = negotiate::check_accept(req, &query)?;
    let jose = if let Route::NodeVersion(..) = &route {
        let header = negotiate::header(req, crate::ledger::peer::NODE_HEADER);
        crate::ledger::peer::claimed_replica(header.as_deref())
            .and_then(|r| crate::ledger::peer::release_key(&svc.replica, r))
    } else if asks_jose {
        let client = grant
            .as_ref()
            .and_then(|g| svc.auth.directory.client(&g.client_id).ok().flatten());
        let mut published = None;
        if let Some(uri) = client.as_ref().and_then(|c| c.jwks_uri.as_deref()) {
            if let Err(e) = svc.auth.jwks_urls.refresh(&svc.peers, uri, None).await {
                tracing::warn!(error = %e, "the client's JWKS URL could not be fetched");
            }
            published = svc.auth.jwks_urls.get(uri);
        }
        let key = client
            .and_then(|c| crate::auth::jwe::encryption_key(&c, published.as_ref()))
            .ok_or_else(|| {
                Error::NotAcceptable(
                    "application/jose needs an access token of a client that registered an encryption key (a JWK with \"use\": \"enc\")".into(),
                )
            })?;
        Some(key)
    } else {
        None
    };
    let body = negotiate::read_body(req, payload, svc.config.max_body_bytes, &route).await?;
    let freq = FhirRequest {
        method,
        route,
        query,
        body,
        if_match: negotiate::if_match(req)?,
        if_none_exist: negotiate::header(req, "If-None-Exist"),
        if_none_match: negotiate::header(req, "If-None-Match"),
        prefer: negotiate::prefer(req),
        node: negotiate::header(req, crate::ledger::peer::NODE_HEADER),
        node_acting: negotiate::header(req, crate::ledger::peer::ACTING_HEADER),
        grant,
        token_error,
        purpose: negotiate::header(req, "X-Purpose-Of-Use").map(|p| p.trim().to_string()),
        peer_address: req.peer_addr().map(|a| a.ip().to_string()),
        audit: None,
    };
    Ok((freq, pretty, method == Method::Head, jose))
}

/// `GET /health/live` and `/health/ready` (see `crate::health`): 200 or 503, with details.
pub async fn live(svc: web::Data<Service>) -> HttpResponse {
    let (live, _, details) = svc.health.report();
    health_response(live, details)
}

pub async fn ready(svc: web::Data<Service>) -> HttpResponse {
    let (_, ready, details) = svc.health.report();
    health_response(ready, details)
}

fn health_response(ok: bool, details: Value) -> HttpResponse {
    let mut r = if ok {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    r.content_type("application/json")
        .insert_header(("Cache-Control", "no-store"))
        .body(details.to_string())
}

/// The bearer token of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    let h = req.headers().get("Authorization")?.to_str().ok()?;
    let (scheme, token) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes: Vec<u8> = form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8(bytes)
        .map_err(|_| Error::bad_request("invalid", "the URL is not valid UTF-8"))
}

/// `Content-Encoding: identity` only told `Compress` to leave a small body alone (RFC 9110
/// says not to send it): remove it on the way out.
pub async fn strip_identity_encoding(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let mut res = next.call(req).await?;
    let headers = res.headers_mut();
    if headers
        .get(actix_web::http::header::CONTENT_ENCODING)
        .is_some_and(|v| v == "identity")
    {
        headers.remove(actix_web::http::header::CONTENT_ENCODING);
    }
    Ok(res)
}

/// CORS for browser apps (SMART public clients): preflights are answered here, and every
/// response to a request with an `Origin` allows that origin. Tokens travel in the
/// `Authorization` header, never in cookies, so no credentials mode is offered.
pub async fn cors(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let origin = req.headers().get("Origin").cloned();
    let preflight = req.method() == actix_web::http::Method::OPTIONS
        && req.headers().contains_key("Access-Control-Request-Method");
    if let (true, Some(o)) = (preflight, origin.clone()) {
        let resp = HttpResponse::NoContent()
            .insert_header(("Access-Control-Allow-Origin", o))
            .insert_header(("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE"))
            .insert_header((
                "Access-Control-Allow-Headers",
                "Authorization, Content-Type, Accept, If-Match, If-None-Match, If-None-Exist, Prefer",
            ))
            .insert_header(("Access-Control-Max-Age", "600"))
            .insert_header(("Vary", "Origin"))
            .finish();
        return Ok(req.into_response(resp).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    if let Some(o) = origin {
        let h = res.headers_mut();
        h.insert(actix_web::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(
            actix_web::http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
            actix_web::http::header::HeaderValue::from_static(
                "Location, Content-Location, ETag, Last-Modified, WWW-Authenticate",
            ),
        );
        h.insert(
            actix_web::http::header::VARY,
            actix_web::http::header::HeaderValue::from_static("Origin"),
        );
    }
    Ok(res.map_into_left_body())
}

/// Requests outside the base path, and methods actix would otherwise answer itself.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(Error::NotFound(format!(
        "nothing at {}; the FHIR API is under the base URL",
        req.path()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: Method, path: &str) -> Result<Route> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        route(method, &segs)
    }

    #[test]
    fn the_route_table_matches_r4_http() {
        use Method::*;
        let p = ResourceType::Patient;
        assert_eq!(r(Get, "metadata").unwrap(), Route::Capabilities);
        assert_eq!(r(Post, "").unwrap(), Route::SystemBundle);
        assert_eq!(r(Get, "_history").unwrap(), Route::SystemHistory);
        assert_eq!(r(Get, "Patient").unwrap(), Route::Search(p));
        assert_eq!(r(Post, "Patient").unwrap(), Route::Create(p));
        assert_eq!(r(Put, "Patient").unwrap(), Route::ConditionalUpdate(p));
        assert_eq!(r(Delete, "Patient").unwrap(), Route::ConditionalDelete(p));
        assert_eq!(r(Post, "Patient/_search").unwrap(), Route::SearchPost(p));
        assert_eq!(r(Get, "Patient/_history").unwrap(), Route::TypeHistory(p));
        assert_eq!(r(Get, "Patient/1").unwrap(), Route::Read(p, "1".into()));
        assert_eq!(r(Put, "Patient/1").unwrap(), Route::Update(p, "1".into()));
        assert_eq!(r(Patch, "Patient/1").unwrap(), Route::Patch(p, "1".into()));
        assert_eq!(
            r(Delete, "Patient/1").unwrap(),
            Route::Delete(p, "1".into())
        );
        assert_eq!(
            r(Get, "Patient/1/_history").unwrap(),
            Route::InstanceHistory(p, "1".into())
        );
        assert_eq!(
            r(Get, "Patient/1/_history/2").unwrap(),
            Route::VRead(p, "1".into(), 2)
        );
        assert_eq!(
            r(Post, "Patient/$validate").unwrap(),
            Route::ValidateType(p)
        );
        assert_eq!(
            r(Get, "Patient/1/DocumentReference").unwrap(),
            Route::PatientCompartment("1".into(), ResourceType::DocumentReference)
        );
    }

    #[test]
    fn bad_paths_are_client_errors() {
        use Method::*;
        assert!(matches!(r(Get, "Observation/1"), Err(Error::NotFound(_))));
        assert!(matches!(
            r(Get, "Patient/bad id"),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r(Get, "Patient/1/_history/x"),
            Err(Error::BadRequest(_))
        ));
        assert!(matches!(
            r(Post, "Patient/1"),
            Err(Error::MethodNotAllowed(_))
        ));
        assert!(matches!(
            r(Delete, "metadata"),
            Err(Error::MethodNotAllowed(_))
        ));
        assert!(matches!(r(Get, "Patient/1/x/y/z"), Err(Error::NotFound(_))));
    }
}

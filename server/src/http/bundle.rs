//! `POST [base]` with a batch or transaction Bundle (R4 http.html#transaction).
//!
//! A batch runs each entry as its own interaction. A transaction is all-or-nothing: every
//! write entry becomes one `Change` in a single `TxLog` submission, after `urn:uuid:` (and
//! other) fullUrls are mapped to new ids, conditional references (`Patient?identifier=…`) are
//! resolved, every reference is rewritten, and every resource is validated. Reads in a
//! transaction run after the commit, and see it.

use std::collections::{HashMap, HashSet};

use actix_web::http::StatusCode;
use base64::Engine;
use serde_json::{json, Value};

use super::interaction::{self, commit, condition, if_none_exist_query, patched, resource_url};
use super::negotiate::{parse_etag, query_pairs};
use super::{route, Body, FhirRequest, FhirResponse, Method as HttpMethod, ResponseBody, Route};
use crate::error::{Error, Issue, Result};
use crate::fhir::{format_instant, new_id, ResourceType};
use crate::search::exec;
use crate::store::txlog::{Change, OnMatch, Outcome};
use crate::store::Method;
use crate::Service;

/// Most entries one Bundle may carry.
pub const MAX_ENTRIES: usize = 10_000;

struct Entry {
    method: HttpMethod,
    route: Route,
    query: Vec<(String, String)>,
    full_url: Option<String>,
    resource: Option<Value>,
    if_match: Option<u64>,
    if_none_exist: Option<String>,
    if_none_match: Option<String>,
}

fn entry_error(index: usize, e: Error) -> Error {
    Error::TransactionEntry {
        index,
        source: Box::new(e),
    }
}

fn parse_entry(svc: &Service, index: usize, e: &Value) -> Result<Entry> {
    let req = e.get("request").ok_or_else(|| {
        Error::BadRequest(
            Issue::error("required", "entry has no request")
                .at(format!("Bundle.entry[{index}].request")),
        )
    })?;
    let method_text = req["method"].as_str().unwrap_or("");
    let method = HttpMethod::parse(method_text).ok_or_else(|| {
        Error::BadRequest(
            Issue::error(
                "value",
                format!("request.method '{method_text}' is not a FHIR method"),
            )
            .at(format!("Bundle.entry[{index}].request.method")),
        )
    })?;
    let url = req["url"].as_str().ok_or_else(|| {
        Error::BadRequest(
            Issue::error("required", "request.url is missing")
                .at(format!("Bundle.entry[{index}].request.url")),
        )
    })?;
    let relative = url
        .strip_prefix(&svc.config.base_url)
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, qs) = relative.split_once('?').unwrap_or((relative, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let route = route(method, &segments)?;
    if route == Route::SystemBundle {
        return Err(Error::bad_request(
            "not-supported",
            "a Bundle entry may not be another batch or transaction",
        ));
    }
    let etag = |name: &str| {
        req.get(name)
            .and_then(Value::as_str)
            .map(parse_etag)
            .transpose()
    };
    Ok(Entry {
        method,
        route,
        query: query_pairs(qs),
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        resource: e.get("resource").cloned(),
        if_match: etag("ifMatch")?,
        if_none_exist: req
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(str::to_string),
        if_none_match: req
            .get("ifNoneMatch")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// The body of a PATCH entry: a Binary holding a JSON Patch.
fn patch_of(resource: &Option<Value>) -> Result<json_patch::Patch> {
    let r = resource.as_ref().ok_or_else(|| {
        Error::bad_request(
            "required",
            "a PATCH entry needs a Binary resource holding a JSON Patch",
        )
    })?;
    if r["resourceType"] != "Binary" || r["contentType"] != "application/json-patch+json" {
        return Err(Error::bad_request(
            "not-supported",
            "a PATCH entry must carry a Binary with contentType application/json-patch+json",
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(r["data"].as_str().unwrap_or(""))
        .map_err(|e| Error::bad_request("invalid", format!("Binary.data is not base64: {e}")))?;
    serde_json::from_slice(&data)
        .map_err(|e| Error::bad_request("invalid", format!("Binary.data is not a JSON Patch: {e}")))
}

fn status_line(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}

fn response_entry(resp: &FhirResponse, svc_location: Option<String>) -> Value {
    let mut r = json!({"status": status_line(resp.status)});
    if let Some(loc) = resp.location.clone().or(svc_location) {
        r["location"] = json!(loc);
    }
    if let Some(v) = resp.version {
        r["etag"] = json!(format!("W/\"{v}\""));
    }
    if let Some(ms) = resp.last_modified {
        r["lastModified"] = json!(format_instant(ms));
    }
    let mut e = json!({"response": r});
    if let Some(body) = resp.body_json() {
        if body["resourceType"] == "OperationOutcome" && !resp.status.is_success() {
            e["response"]["outcome"] = body;
        } else {
            e["resource"] = body;
        }
    }
    e
}

pub async fn process(svc: &Service, req: FhirRequest) -> Result<FhirResponse> {
    let Body::Resource(bundle) = &req.body else {
        return Err(Error::bad_request(
            "required",
            "POST to the base needs a Bundle",
        ));
    };
    if bundle["resourceType"] != "Bundle" {
        return Err(Error::BadRequest(
            Issue::error(
                "invalid",
                "POST to the base URL takes a batch or transaction Bundle",
            )
            .at("resourceType"),
        ));
    }
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    if entries.len() > MAX_ENTRIES {
        return Err(Error::bad_request(
            "too-costly",
            format!("a Bundle may carry at most {MAX_ENTRIES} entries"),
        ));
    }
    match bundle["type"].as_str() {
        Some("batch") => batch(svc, &entries, &req).await,
        Some("transaction") => transaction(svc, &entries, &req).await,
        other => Err(Error::BadRequest(
            Issue::error(
                "value",
                format!("Bundle.type must be batch or transaction, not {other:?}"),
            )
            .at("Bundle.type"),
        )),
    }
}

async fn batch(svc: &Service, entries: &[Value], outer: &FhirRequest) -> Result<FhirResponse> {
    let (prefer, grant) = (outer.prefer, &outer.grant);
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let result = async {
            let entry = parse_entry(svc, i, e)?;
            let body = match entry.method {
                HttpMethod::Patch => Body::Patch(patch_of(&entry.resource)?),
                HttpMethod::Post | HttpMethod::Put => {
                    Body::Resource(entry.resource.clone().ok_or_else(|| {
                        Error::bad_request("required", "this entry needs a resource")
                    })?)
                }
                _ => Body::None,
            };
            let freq = FhirRequest {
                method: entry.method,
                route: entry.route,
                query: entry.query,
                body,
                if_match: entry.if_match,
                if_none_exist: entry.if_none_exist,
                if_none_match: entry.if_none_match,
                prefer,
                node: None,
                node_acting: None,
                grant: grant.clone(),
                token_error: None,
                purpose: outer.purpose.clone(),
                peer_address: outer.peer_address.clone(),
                audit: None,
            };
            Box::pin(interaction::handle(svc, freq)).await
        }
        .await;
        out.push(match result {
            Ok(resp) => response_entry(&resp, None),
            Err(e) => {
                json!({"response": {"status": status_line(e.status()), "outcome": e.outcome()}})
            }
        });
    }
    Ok(FhirResponse::json(
        StatusCode::OK,
        json!({"resourceType": "Bundle", "id": new_id(), "type": "batch-response", "entry": out}),
    ))
}

/// Replace every `reference` whose value is a mapped fullUrl.
fn rewrite_references(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference" {
                    if let Some(new) = child.as_str().and_then(|s| map.get(s)) {
                        *child = Value::String(new.clone());
                        continue;
                    }
                }
                rewrite_references(child, map);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_references(c, map)),
        _ => {}
    }
}

/// Collect conditional references (`Type?params`) found in a resource.
fn conditional_references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                if k == "reference" {
                    if let Some(s) = child
                        .as_str()
                        .filter(|s| s.contains('?') && !s.starts_with("urn:"))
                    {
                        out.push(s.to_string());
                    }
                }
                conditional_references(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| conditional_references(c, out)),
        _ => {}
    }
}

/// The first `urn:` reference in a resource that no fullUrl of the Bundle declares.
fn unresolved_urn(v: &Value, map: &HashMap<String, String>) -> Option<String> {
    match v {
        Value::Object(o) => o.iter().find_map(|(k, child)| match child.as_str() {
            Some(s) if k == "reference" && s.starts_with("urn:") && !map.contains_key(s) => {
                Some(s.to_string())
            }
            _ => unresolved_urn(child, map),
        }),
        Value::Array(a) => a.iter().find_map(|c| unresolved_urn(c, map)),
        _ => None,
    }
}

enum Planned {
    /// Index into the change list.
    Write,
    /// Conditional create that matched before the transaction: answer with this resource.
    Existing(ResourceType, String),
    Read,
}

async fn transaction(svc: &Service, raw: &[Value], outer: &FhirRequest) -> Result<FhirResponse> {
    let (prefer, grant) = (outer.prefer, &outer.grant);
    let entries: Vec<Entry> = raw
        .iter()
        .enumerate()
        .map(|(i, e)| parse_entry(svc, i, e))
        .collect::<Result<_>>()?;

    // 1. Ids for every write, and the fullUrl -> Type/id map.
    let mut map: HashMap<String, String> = HashMap::new();
    let mut targets: Vec<Option<(ResourceType, String)>> = Vec::with_capacity(entries.len());
    let mut existing: HashSet<usize> = HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        let target = match &e.route {
            Route::Create(t) => {
                let mut id = new_id();
                if let Some(h) = &e.if_none_exist {
                    let q = if_none_exist_query(svc, *t, h).map_err(|err| entry_error(i, err))?;
                    let found = exec::matching_ids(&svc.store, &svc.config.base_url, &q)
                        .map_err(|err| entry_error(i, err))?;
                    match found.len() {
                        0 => {}
                        1 => {
                            id = found[0].clone();
                            existing.insert(i);
                        }
                        _ => {
                            return Err(entry_error(
                                i,
                                Error::MultipleMatches(format!(
                                    "ifNoneExist matches more than one {t}"
                                )),
                            ))
                        }
                    }
                }
                Some((*t, id))
            }
            Route::Update(t, id) | Route::Patch(t, id) | Route::Delete(t, id) => {
                Some((*t, id.clone()))
            }
            Route::ConditionalUpdate(t) => {
                let q = condition(svc, *t, &e.query).map_err(|err| entry_error(i, err))?;
                let found = exec::matching_ids(&svc.store, &svc.config.base_url, &q)
                    .map_err(|err| entry_error(i, err))?;
                match found.len() {
                    0 => Some((
                        *t,
                        e.resource
                            .as_ref()
                            .and_then(|r| r["id"].as_str())
                            .map_or_else(new_id, str::to_string),
                    )),
                    1 => Some((*t, found[0].clone())),
                    _ => {
                        return Err(entry_error(
                            i,
                            Error::MultipleMatches(format!(
                                "the condition matches more than one {t}"
                            )),
                        ))
                    }
                }
            }
            _ => None,
        };
        if let (Some(full_url), Some((t, id))) = (&e.full_url, &target) {
            map.insert(full_url.clone(), format!("{t}/{id}"));
        }
        targets.push(target);
    }
    // A resource may be written by at most one entry.
    let mut written = HashSet::new();
    for (i, t) in targets.iter().enumerate() {
        if let Some(t) = t {
            if !written.insert(t.clone()) {
                return Err(entry_error(
                    i,
                    Error::bad_request(
                        "invalid",
                        format!("{}/{} is the target of more than one entry", t.0, t.1),
                    ),
                ));
            }
        }
    }

    // 2. Conditional references resolve to exactly one resource.
    for (i, e) in entries.iter().enumerate() {
        let Some(r) = &e.resource else { continue };
        let mut conds = Vec::new();
        conditional_references(r, &mut conds);
        for c in conds {
            if map.contains_key(&c) {
                continue;
            }
            let (ty, qs) = c.split_once('?').expect("contains ?");
            let t: ResourceType = ty.parse().map_err(|err| entry_error(i, err))?;
            let q = condition(svc, t, &query_pairs(qs)).map_err(|err| entry_error(i, err))?;
            let found = exec::matching_ids(&svc.store, &svc.config.base_url, &q)
                .map_err(|err| entry_error(i, err))?;
            match found.as_slice() {
                [id] => {
                    map.insert(c.clone(), format!("{t}/{id}"));
                }
                [] => {
                    return Err(entry_error(
                        i,
                        Error::PreconditionFailed(format!(
                            "conditional reference '{c}' matches nothing"
                        )),
                    ))
                }
                _ => {
                    return Err(entry_error(
                        i,
                        Error::MultipleMatches(format!(
                            "conditional reference '{c}' matches more than one resource"
                        )),
                    ))
                }
            }
        }
    }

    // Every urn: reference must name an entry of this Bundle.
    for (i, e) in entries.iter().enumerate() {
        let Some(r) = &e.resource else { continue };
        if let Some(dangling) = unresolved_urn(r, &map) {
            return Err(entry_error(
                i,
                Error::BadRequest(
                    Issue::error(
                        "not-found",
                        format!("reference '{dangling}' names no entry of this Bundle"),
                    )
                    .at("reference"),
                ),
            ));
        }
    }

    // 3. Rewrite, validate and plan every entry; deletes first, then creates, then updates.
    let mut deletes = Vec::new();
    let mut creates = Vec::new();
    let mut updates = Vec::new();
    let mut plan: Vec<Planned> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let mut resource = e.resource.clone();
        if let Some(r) = resource.as_mut() {
            rewrite_references(r, &map);
        }
        if let Some(g) = grant {
            interaction::permit(svc, g, &e.route, resource.as_ref())
                .await
                .map_err(|err| entry_error(i, err))?;
        }
        let change = match (&e.route, &targets[i]) {
            (Route::Create(t), Some((_, id))) => {
                if existing.contains(&i) {
                    // The matched resource is returned: the token must be allowed to read it.
                    if let Some(g) = grant {
                        let v = svc.store.read(*t, id).map_err(|err| entry_error(i, err))?;
                        let found: Value = serde_json::from_slice(&v.body)
                            .map_err(|err| entry_error(i, Error::Internal(err.to_string())))?;
                        crate::auth::access::check_resource(
                            &svc.registry,
                            &svc.config.base_url,
                            g,
                            *t,
                            crate::auth::scopes::Perm::R,
                            &found,
                        )
                        .map_err(|err| entry_error(i, err))?;
                    }
                    plan.push(Planned::Existing(*t, id.clone()));
                    continue;
                }
                let r = resource.ok_or_else(|| {
                    entry_error(
                        i,
                        Error::bad_request("required", "a POST entry needs a resource"),
                    )
                })?;
                svc.validator
                    .validate(*t, &r)
                    .map_err(|err| entry_error(i, err))?;
                let if_none_exist = e
                    .if_none_exist
                    .as_deref()
                    .map(|h| if_none_exist_query(svc, *t, h))
                    .transpose()
                    .map_err(|err| entry_error(i, err))?;
                (
                    1,
                    Change::Create {
                        rtype: *t,
                        id: id.clone(),
                        resource: r,
                        if_none_exist,
                        on_match: OnMatch::Fail,
                    },
                )
            }
            (Route::Update(t, _) | Route::ConditionalUpdate(t), Some((_, target_id))) => {
                let mut r = resource.ok_or_else(|| {
                    entry_error(
                        i,
                        Error::bad_request("required", "a PUT entry needs a resource"),
                    )
                })?;
                svc.validator
                    .validate(*t, &r)
                    .map_err(|err| entry_error(i, err))?;
                if let Route::Update(_, url_id) = &e.route {
                    if r.get("id").and_then(Value::as_str) != Some(url_id.as_str()) {
                        return Err(entry_error(
                            i,
                            Error::bad_request(
                                "invalid",
                                format!("resource id must be '{url_id}' to match request.url"),
                            ),
                        ));
                    }
                }
                r["id"] = json!(target_id);
                // A conditional update resolved to "no match" must still find none at commit.
                let guard = match &e.route {
                    Route::ConditionalUpdate(_)
                        if svc
                            .store
                            .current(*t, target_id)
                            .map_err(|err| entry_error(i, err))?
                            .is_none() =>
                    {
                        Some(condition(svc, *t, &e.query).map_err(|err| entry_error(i, err))?)
                    }
                    _ => None,
                };
                match guard {
                    Some(q) => (
                        1,
                        Change::Create {
                            rtype: *t,
                            id: target_id.clone(),
                            resource: r,
                            if_none_exist: Some(q),
                            on_match: OnMatch::Fail,
                        },
                    ),
                    None => (
                        2,
                        Change::Update {
                            rtype: *t,
                            id: target_id.clone(),
                            resource: r,
                            if_match: e.if_match,
                            method: Method::Put,
                        },
                    ),
                }
            }
            (Route::Patch(t, id), _) => {
                let patch = patch_of(&e.resource).map_err(|err| entry_error(i, err))?;
                let (doc, version) =
                    patched(svc, *t, id, &patch).map_err(|err| entry_error(i, err))?;
                if e.if_match.is_some_and(|m| m != version) {
                    return Err(entry_error(
                        i,
                        Error::PreconditionFailed(format!(
                            "ifMatch is stale: {t}/{id} is at version {version}"
                        )),
                    ));
                }
                (
                    2,
                    Change::Update {
                        rtype: *t,
                        id: id.clone(),
                        resource: doc,
                        if_match: Some(version),
                        method: Method::Patch,
                    },
                )
            }
            (Route::Delete(t, id), _) => (
                0,
                Change::Delete {
                    rtype: *t,
                    id: id.clone(),
                    if_match: e.if_match,
                },
            ),
            (Route::ConditionalDelete(t), _) => {
                let q = condition(svc, *t, &e.query).map_err(|err| entry_error(i, err))?;
                (
                    0,
                    Change::ConditionalDelete {
                        rtype: *t,
                        query: q,
                    },
                )
            }
            (r, _) if interaction::is_read_only(e.method) => {
                let _ = r;
                plan.push(Planned::Read);
                continue;
            }
            _ => {
                return Err(entry_error(
                    i,
                    Error::bad_request(
                        "not-supported",
                        "this interaction is not allowed in a transaction",
                    ),
                ))
            }
        };
        let (phase, change) = change;
        let list = match phase {
            0 => &mut deletes,
            1 => &mut creates,
            _ => &mut updates,
        };
        list.push((i, change));
        plan.push(Planned::Write);
    }
    let ordered: Vec<(usize, Change)> = deletes.into_iter().chain(creates).chain(updates).collect();
    let mut position_of_entry: HashMap<usize, usize> = HashMap::new();
    for (pos, (i, _)) in ordered.iter().enumerate() {
        position_of_entry.insert(*i, pos);
    }
    let entry_of_position: Vec<usize> = ordered.iter().map(|(i, _)| *i).collect();
    let changes: Vec<Change> = ordered.into_iter().map(|(_, c)| c).collect();

    // 4. One atomic commit.
    let committed = if changes.is_empty() {
        None
    } else {
        Some(commit(svc, changes, outer).await.map_err(|e| match e {
            Error::TransactionEntry { index, source } => Error::TransactionEntry {
                index: entry_of_position[index],
                source,
            },
            other => other,
        })?)
    };

    // 5. Responses in request order; reads run now and see the commit.
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let entry = match &plan[i] {
            Planned::Write => {
                let pos = position_of_entry[&i];
                let a = &committed.as_ref().expect("writes were committed").applied[pos];
                let resp = match a.outcome {
                    Outcome::Deleted | Outcome::NoOp => FhirResponse {
                        status: if a.outcome == Outcome::Deleted {
                            StatusCode::NO_CONTENT
                        } else {
                            StatusCode::OK
                        },
                        body: ResponseBody::None,
                        version: (a.outcome == Outcome::Deleted).then_some(a.version),
                        last_modified: None,
                        location: None,
                    },
                    _ => interaction::applied_response(svc, a, prefer.return_),
                };
                response_entry(&resp, None)
            }
            Planned::Existing(t, id) => {
                let v = svc.store.read(*t, id).map_err(|err| entry_error(i, err))?;
                let resp = FhirResponse {
                    status: StatusCode::OK,
                    body: ResponseBody::Stored(v.body.clone()),
                    version: Some(v.version),
                    last_modified: Some(v.last_updated),
                    location: Some(format!(
                        "{}/_history/{}",
                        resource_url(svc, *t, id),
                        v.version
                    )),
                };
                response_entry(&resp, None)
            }
            Planned::Read => {
                let freq = FhirRequest {
                    method: e.method,
                    route: e.route.clone(),
                    query: e.query.clone(),
                    body: Body::None,
                    if_match: None,
                    if_none_exist: None,
                    if_none_match: e.if_none_match.clone(),
                    prefer,
                    node: None,
                    node_acting: None,
                    grant: grant.clone(),
                    token_error: None,
                    purpose: outer.purpose.clone(),
                    peer_address: outer.peer_address.clone(),
                    audit: None,
                };
                match Box::pin(interaction::handle(svc, freq)).await {
                    Ok(resp) => response_entry(&resp, None),
                    Err(err) => {
                        json!({"response": {"status": status_line(err.status()), "outcome": err.outcome()}})
                    }
                }
            }
        };
        out.push(entry);
    }
    Ok(FhirResponse::json(
        StatusCode::OK,
        json!({"resourceType": "Bundle", "id": new_id(), "type": "transaction-response", "entry": out}),
    ))
}

//! The FHIR interactions (R4 http.html), one function each, over `FhirRequest` so that the
//! HTTP dispatcher and Bundle entries share them.

use std::sync::Arc;

use actix_web::http::StatusCode;
use serde_json::{json, Map, Value};

use super::negotiate::ReturnPreference;
use super::{
    bundle, capability, Body, FhirRequest, FhirResponse, Method as HttpMethod, ResponseBody, Route,
};
use crate::audit;
use crate::auth::access;
use crate::auth::scopes::Perm;
use crate::auth::Grant;
use crate::consent::gate::{ConsentGate, Verdict};
use crate::error::{operation_outcome, Error, Issue, Result};
use crate::fhir::{check_id, format_instant, new_id, ResourceType};
use crate::ledger::peer::Acting;
use crate::search::exec;
use crate::search::query::{self, SearchQuery, Summary, Total};
use crate::search::value::parse_date_range;
use crate::store::txlog::{Applied, Change, Committed, OnMatch, Outcome, Submission};
use crate::store::{Method, Version};
use crate::Service;

/// Every FHIR interaction passes here: the token's grant is required (except for the
/// CapabilityStatement and node-to-node retrieval), checked before the interaction runs, and
/// applied to what it returns; the patients' Consents decide what may leave; and the
/// interaction's AuditEvent commits on the ledger before the response leaves (fail closed).
pub async fn handle(svc: &Service, mut req: FhirRequest) -> Result<FhirResponse> {
    if req.route == Route::Capabilities {
        return Ok(FhirResponse::json(
            StatusCode::OK,
            capability::statement(svc),
        ));
    }
    let mut ctx = audit_context(svc, &req);
    // A node-to-node request acts for another organization's user; its consent checks see
    // that organization, client, user and purpose (verified with its signature before use).
    let node_acting = match &req.route {
        Route::NodeVersion(..) => Some((
            Acting::decode(req.node_acting.as_deref().unwrap_or("")),
            crate::ledger::peer::claimed_replica(req.node.as_deref()),
        )),
        _ => None,
    };
    let node_grant = node_acting.as_ref().map(|(a, _)| a.as_grant());
    let (grant, purpose, organization) = match &node_acting {
        Some((a, from)) => {
            ctx.client_id = Some(a.client.clone());
            ctx.user = a.user.clone();
            ctx.fhir_user = a.user.clone();
            ctx.purpose = a.purpose.clone();
            (
                node_grant.as_ref(),
                a.purpose.as_deref(),
                format!("Organization/replica-{}", from.unwrap_or(u32::MAX)),
            )
        }
        None => (
            req.grant.as_deref(),
            req.purpose.as_deref(),
            svc.config.consent.organization.clone(),
        ),
    };
    let mut gate = ConsentGate::new(
        &svc.store,
        &svc.config.consent,
        grant,
        purpose,
        &organization,
        crate::fhir::now_ms(),
    );
    if carries_its_audit(&req) {
        let success = audit::AuditOutcome {
            status: 200,
            description: None,
            resources: Vec::new(),
            patients: Vec::new(),
        };
        let mut draft = ctx.clone();
        draft.target = None;
        req.audit = Some(Arc::new(audit::AuditSlot::new(audit::event(
            &draft,
            &success,
            &gate.summary(),
            crate::fhir::now_ms(),
        ))));
    }
    let slot = req.audit.clone();
    let actor = actor(req.grant.as_deref());
    // The patients a refused or failed request concerned, so that they see it too.
    let addressed = match &req.route {
        Route::Read(t, id)
        | Route::VRead(t, id, _)
        | Route::Update(t, id)
        | Route::Patch(t, id)
        | Route::Delete(t, id)
        | Route::InstanceHistory(t, id) => svc.store.ledger_patients(*t, id).unwrap_or_default(),
        Route::PatientCompartment(p, _) | Route::PatientEverything(p) => {
            vec![format!("Patient/{p}")]
        }
        _ => Vec::new(),
    };
    let result = authorized(svc, req, &mut gate).await;
    let committed = slot.is_some_and(|s| s.committed.load(std::sync::atomic::Ordering::SeqCst));
    if committed && result.is_ok() {
        return result;
    }
    let outcome = match &result {
        Ok(resp) => released(svc, resp),
        Err(e) => audit::AuditOutcome {
            status: e.status().as_u16(),
            description: Some(e.to_string()),
            resources: Vec::new(),
            patients: addressed,
        },
    };
    let event = audit::event(&ctx, &outcome, &gate.summary(), crate::fhir::now_ms());
    commit_audit(svc, event, actor).await?;
    result
}

/// The AuditEvent of a request refused before it became an interaction (no route, bad media
/// type, malformed or oversized body): committed before the refusal is answered.
pub async fn audit_refused(
    svc: &Service,
    grant: Option<&crate::auth::Grant>,
    peer_address: Option<String>,
    path: &str,
    error: &Error,
) -> Result<()> {
    let ctx = audit::AuditContext {
        token: false,
        interaction: "operation".into(),
        action: "E",
        client_id: grant.map(|g| g.client_id.clone()),
        user: grant.map(|g| g.sub.clone()),
        fhir_user: grant.and_then(|g| g.fhir_user.clone()),
        organization: svc.config.consent.organization.clone(),
        peer_address,
        purpose: None,
        query: Some(path.to_string()),
        target: None,
    };
    let outcome = audit::AuditOutcome {
        status: error.status().as_u16(),
        description: Some(error.to_string()),
        resources: Vec::new(),
        patients: Vec::new(),
    };
    let actor = actor(grant);
    let event = audit::event(
        &ctx,
        &outcome,
        &audit::ConsentSummary::default(),
        crate::fhir::now_ms(),
    );
    commit_audit(svc, event, actor).await
}

/// Commit an AuditEvent on its own: an interaction is answered only once its record is durable
/// and committed on the ledger.
pub async fn commit_audit(svc: &Service, event: Value, actor: String) -> Result<()> {
    let submission = Submission {
        changes: Vec::new(),
        actor,
        audit: Some(event),
    };
    match svc.txlog.submit(submission).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "an AuditEvent could not be committed; the interaction fails");
            Err(Error::LedgerUnavailable(format!(
                "the audit record of this interaction could not be committed ({e}); nothing was released"
            )))
        }
        Err(_) => Err(Error::LedgerUnavailable(
            "the commit thread stopped before the audit record committed; nothing was released"
                .into(),
        )),
    }
}

/// The ledger entry's actor: client id and user.
fn actor(grant: Option<&crate::auth::Grant>) -> String {
    match grant {
        Some(g) => format!("{} {}", g.client_id, g.sub),
        None => "anonymous".into(),
    }
}

/// Does this request's write carry its AuditEvent in its own ledger entry? (A batch's entries
/// carry theirs; a transaction carries one for all of them.)
fn carries_its_audit(req: &FhirRequest) -> bool {
    match &req.route {
        Route::Create(_)
        | Route::Update(..)
        | Route::ConditionalUpdate(_)
        | Route::Patch(..)
        | Route::ConditionalPatch(_)
        | Route::Delete(..)
        | Route::ConditionalDelete(_) => true,
        Route::SystemBundle => {
            matches!(&req.body, Body::Resource(b) if b["type"] == "transaction")
        }
        _ => false,
    }
}

/// Who asks, for what, as the AuditEvent records it.
fn audit_context(svc: &Service, req: &FhirRequest) -> audit::AuditContext {
    use Route::*;
    let (interaction, action) = match &req.route {
        Read(..) | NodeVersion(..) => ("read", "R"),
        VRead(..) => ("vread", "R"),
        Create(_) => ("create", "C"),
        Update(..) | ConditionalUpdate(_) => ("update", "U"),
        Patch(..) | ConditionalPatch(_) => ("patch", "U"),
        Delete(..) | ConditionalDelete(_) => ("delete", "D"),
        Search(_) | SearchPost(_) | PatientCompartment(..) => ("search-type", "E"),
        InstanceHistory(..) => ("history-instance", "R"),
        TypeHistory(_) => ("history-type", "R"),
        SystemHistory => ("history-system", "R"),
        SystemBundle => match &req.body {
            Body::Resource(b) if b["type"] == "transaction" => ("transaction", "E"),
            _ => ("batch", "E"),
        },
        ValidateType(_) | ValidateInstance(..) | Verify(..) | LedgerHead | LedgerBlock(_)
        | PatientEverything(_) => ("operation", "E"),
        Capabilities => ("capabilities", "R"),
    };
    let target = match &req.route {
        Read(t, id) | Update(t, id) | Patch(t, id) | Delete(t, id) | InstanceHistory(t, id) => {
            Some(format!("{t}/{id}"))
        }
        VRead(t, id, v) | NodeVersion(t, id, v) => Some(format!("{t}/{id}/_history/{v}")),
        PatientCompartment(p, _) | PatientEverything(p) => Some(format!("Patient/{p}")),
        _ => None,
    };
    let query = match &req.route {
        Search(_)
        | SearchPost(_)
        | PatientCompartment(..)
        | PatientEverything(_)
        | ConditionalUpdate(_)
        | ConditionalPatch(_)
        | ConditionalDelete(_) => {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &req.query {
                ser.append_pair(k, v);
            }
            if let Body::Form(form) = &req.body {
                for (k, v) in form {
                    ser.append_pair(k, v);
                }
            }
            Some(ser.finish())
        }
        _ => None,
    };
    let grant = req.grant.as_deref();
    audit::AuditContext {
        token: false,
        interaction: interaction.into(),
        action,
        client_id: grant.map(|g| g.client_id.clone()),
        user: grant.map(|g| g.sub.clone()),
        fhir_user: grant.and_then(|g| g.fhir_user.clone()),
        organization: svc.config.consent.organization.clone(),
        peer_address: req.peer_address.clone(),
        purpose: Some(
            req.purpose
                .clone()
                .unwrap_or_else(|| crate::consent::gate::DEFAULT_PURPOSE.into()),
        ),
        query,
        target,
    }
}

/// What a successful response released: its resources and their patients.
fn released(svc: &Service, resp: &FhirResponse) -> audit::AuditOutcome {
    const MAX_LISTED: usize = 100;
    let mut out = audit::AuditOutcome {
        status: resp.status.as_u16(),
        description: None,
        resources: Vec::new(),
        patients: Vec::new(),
    };
    let mut note = |r: &Value| {
        let (Some(t), Some(id)) = (
            r["resourceType"]
                .as_str()
                .and_then(|t| t.parse::<ResourceType>().ok()),
            r["id"].as_str(),
        ) else {
            return;
        };
        for p in svc.registry.patients_of(t, id, r, &svc.config.base_url) {
            if !out.patients.contains(&p) {
                out.patients.push(p);
            }
        }
        if out.resources.len() < MAX_LISTED {
            out.resources.push(match r["meta"]["versionId"].as_str() {
                Some(v) => format!("{t}/{id}/_history/{v}"),
                None => format!("{t}/{id}"),
            });
        }
    };
    match &resp.body {
        ResponseBody::Stored(b) => {
            if let Ok(v) = serde_json::from_slice::<Value>(b) {
                note(&v);
            }
        }
        ResponseBody::Json(v) if v["resourceType"] == "Bundle" => {
            for e in v["entry"].as_array().into_iter().flatten() {
                if e["resource"]["resourceType"] != "OperationOutcome" {
                    note(&e["resource"]);
                }
            }
        }
        ResponseBody::Json(v) => note(v),
        ResponseBody::None => {}
    }
    out
}

/// The grant check, the interaction, and what the grant may see of its response.
async fn authorized(
    svc: &Service,
    req: FhirRequest,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let grant = match &req.route {
        Route::NodeVersion(..) => None,
        _ => Some(req.grant.clone().ok_or_else(|| {
            Error::Unauthorized(match &req.token_error {
                Some(e) => format!("the access token was refused: {e}"),
                None => "no access token: send Authorization: Bearer <token> (see .well-known/smart-configuration)".into(),
            })
        })?),
    };
    let route = req.route.clone();
    if let Some(g) = &grant {
        let body = match &req.body {
            Body::Resource(v) => Some(v),
            _ => None,
        };
        permit(svc, g, &route, body).await?;
    }
    let resp = run(svc, req, gate).await?;
    match &grant {
        Some(g) => filter_response(svc, g, &route, resp),
        None => Ok(resp),
    }
}

/// A resource's current version, wherever it is held: from this node's store, or fetched from
/// the organization that holds it (404 when unknown, 410 when deleted).
async fn current_version(
    svc: &Service,
    t: ResourceType,
    id: &str,
    acting: &Acting,
) -> Result<Version> {
    match svc.store.ledger_head(t, id)? {
        Some(h) if h.holder != me(svc) => {
            if h.deleted {
                return Err(Error::Gone {
                    rtype: t.to_string(),
                    id: id.to_string(),
                    version: h.version,
                });
            }
            remote_version(svc, t, id, h.version, acting)
                .await?
                .ok_or_else(|| Error::NotFound(format!("{t}/{id} is not known")))
        }
        _ => svc.store.read(t, id),
    }
}

/// `current_version` as JSON; None when it is unknown or deleted.
async fn current_resource(
    svc: &Service,
    t: ResourceType,
    id: &str,
    acting: &Acting,
) -> Result<Option<Value>> {
    match current_version(svc, t, id, acting).await {
        Ok(v) => Ok(Some(
            serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?,
        )),
        Err(Error::NotFound(_) | Error::Gone { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// May this grant perform this interaction (with this body)? Resource-level checks apply to
/// the incoming resource and, for updates and deletes, to the one it replaces.
pub async fn permit(
    svc: &Service,
    grant: &Grant,
    route: &Route,
    body: Option<&Value>,
) -> Result<()> {
    use access::{check_resource, require_all_types, restriction, Restriction};
    use Perm::*;
    let (reg, base) = (&svc.registry, svc.config.base_url.as_str());
    let unrestricted = |t: ResourceType, p: Perm| -> Result<()> {
        if restriction(grant, t, p)? != Restriction::default() {
            return Err(Error::Forbidden(format!(
                "this interaction on {t} needs a user/ or system/ scope; patient and granular scopes cannot bound it"
            )));
        }
        Ok(())
    };
    let existing = |t: ResourceType, id: String, p: Perm| async move {
        // Only a restricted grant needs to see the resource it would touch.
        if restriction(grant, t, p)? == Restriction::default() {
            return Ok(());
        }
        let acting = Acting::of(Some(grant), None);
        if let Some(r) = current_resource(svc, t, &id, &acting).await? {
            check_resource(reg, base, grant, t, p, &r)?;
        }
        Ok::<(), Error>(())
    };
    if audit::is_audit_mutation(route) {
        return Err(Error::MethodNotAllowed(
            "AuditEvents are a permanent record: they cannot be updated, patched or deleted".into(),
        ));
    }
    if let Route::Read(ResourceType::AuditEvent, _)
    | Route::VRead(ResourceType::AuditEvent, ..)
    | Route::Search(ResourceType::AuditEvent)
    | Route::SearchPost(ResourceType::AuditEvent)
    | Route::PatientCompartment(_, ResourceType::AuditEvent)
    | Route::InstanceHistory(ResourceType::AuditEvent, _)
    | Route::TypeHistory(ResourceType::AuditEvent) = route
    {
        access::check_audit_reader(grant)?;
    }
    match route {
        Route::Capabilities | Route::NodeVersion(..) | Route::SystemBundle => Ok(()),
        Route::Read(t, _) | Route::VRead(t, ..) | Route::ValidateInstance(t, _) => {
            restriction(grant, *t, R).map(|_| ())
        }
        Route::InstanceHistory(t, id) => {
            restriction(grant, *t, R)?;
            existing(*t, id.clone(), R).await
        }
        Route::Verify(t, id, _) => {
            restriction(grant, *t, R)?;
            existing(*t, id.clone(), R).await
        }
        Route::Search(t) | Route::SearchPost(t) | Route::PatientCompartment(_, t) => {
            restriction(grant, *t, S).map(|_| ())
        }
        Route::PatientEverything(_) => restriction(grant, ResourceType::Patient, R).map(|_| ()),
        Route::TypeHistory(t) => unrestricted(*t, S),
        Route::SystemHistory => require_all_types(grant, S),
        Route::Create(t) => {
            restriction(grant, *t, C)?;
            match body {
                Some(b) => check_resource(reg, base, grant, *t, C, b),
                None => Ok(()),
            }
        }
        Route::Update(t, id) => {
            restriction(grant, *t, U)?;
            if let Some(b) = body {
                check_resource(reg, base, grant, *t, U, b)?;
            }
            existing(*t, id.clone(), U).await
        }
        Route::Patch(t, id) => {
            restriction(grant, *t, U)?;
            existing(*t, id.clone(), U).await
        }
        Route::Delete(t, id) => {
            restriction(grant, *t, D)?;
            existing(*t, id.clone(), D).await
        }
        Route::ConditionalUpdate(t) | Route::ConditionalPatch(t) => unrestricted(*t, U),
        Route::ConditionalDelete(t) => unrestricted(*t, D),
        Route::ValidateType(t) => restriction(grant, *t, C)
            .or_else(|_| restriction(grant, *t, U))
            .map(|_| ()),
        Route::LedgerHead | Route::LedgerBlock(_) => require_all_types(grant, R),
    }
}

/// What a restricted grant may see of a response: a single resource must be inside the
/// restriction; Bundle entries outside it are dropped (search matches are already narrowed
/// in the query; this catches history versions and `_include`/`_revinclude` results).
fn filter_response(
    svc: &Service,
    grant: &Grant,
    route: &Route,
    mut resp: FhirResponse,
) -> Result<FhirResponse> {
    use access::{restriction, visible, Restriction};
    let (reg, base) = (&svc.registry, svc.config.base_url.as_str());
    match route {
        // A conditional create answers with the resource it matched: the token must be allowed
        // to read that one too.
        Route::Read(t, _) | Route::VRead(t, ..) | Route::Create(t) => {
            let created = matches!(route, Route::Create(_)) && resp.status == StatusCode::CREATED;
            if created || restriction(grant, *t, Perm::R).is_ok_and(|r| r == Restriction::default())
            {
                return Ok(resp);
            }
            let resource: Option<Value> = match &resp.body {
                ResponseBody::Stored(b) => serde_json::from_slice(b).ok(),
                ResponseBody::Json(v) => Some(v.clone()),
                _ => None,
            };
            if let Some(r) = resource {
                access::check_resource(reg, base, grant, *t, Perm::R, &r)?;
            }
            Ok(resp)
        }
        Route::InstanceHistory(..)
        | Route::Search(_)
        | Route::SearchPost(_)
        | Route::PatientCompartment(..)
        | Route::PatientEverything(_) => {
            if let ResponseBody::Json(bundle) = &mut resp.body {
                if let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) {
                    let mut keep = Vec::with_capacity(entries.len());
                    for e in entries.drain(..) {
                        let Some(t) = e["resource"]["resourceType"]
                            .as_str()
                            .and_then(|t| t.parse::<ResourceType>().ok())
                        else {
                            keep.push(e); // OperationOutcome entries, deleted versions
                            continue;
                        };
                        let perm = if e["search"]["mode"] == "match" {
                            Perm::S
                        } else {
                            Perm::R
                        };
                        let ok = match restriction(grant, t, perm) {
                            Ok(r) => visible(reg, base, t, &e["resource"], &r)?,
                            Err(_) => false,
                        };
                        if ok {
                            keep.push(e);
                        }
                    }
                    *entries = keep;
                }
            }
            Ok(resp)
        }
        _ => Ok(resp),
    }
}

async fn run(svc: &Service, req: FhirRequest, gate: &mut ConsentGate<'_>) -> Result<FhirResponse> {
    match req.route.clone() {
        Route::Capabilities => Ok(FhirResponse::json(
            StatusCode::OK,
            capability::statement(svc),
        )),
        Route::SystemBundle => bundle::process(svc, req).await,
        Route::Read(t, id) => read(svc, t, &id, req.if_none_match.as_deref(), gate).await,
        Route::VRead(t, id, v) => vread(svc, t, &id, v, gate).await,
        Route::Create(t) => create(svc, t, req).await,
        Route::Update(t, id) => update(svc, t, &id, req).await,
        Route::ConditionalUpdate(t) => conditional_update(svc, t, req).await,
        Route::Patch(t, id) => patch(svc, t, id, &req).await,
        Route::ConditionalPatch(t) => {
            let q = condition(svc, t, &req.query)?;
            let ids = exec::matching_ids(&svc.store, &svc.config.base_url, &q)?;
            match ids.as_slice() {
                [] => Err(Error::NotFound(format!(
                    "no {t} matches the PATCH condition"
                ))),
                [id] => patch(svc, t, id.clone(), &req).await,
                _ => Err(Error::MultipleMatches(format!(
                    "the PATCH condition matches more than one {t}"
                ))),
            }
        }
        Route::Delete(t, id) => Ok(deleted_response(
            &commit_one(
                svc,
                Change::Delete {
                    rtype: t,
                    id,
                    if_match: req.if_match,
                },
                &req,
            )
            .await?,
        )),
        Route::ConditionalDelete(t) => {
            let q = condition(svc, t, &req.query)?;
            Ok(deleted_response(
                &commit_one(svc, Change::ConditionalDelete { rtype: t, query: q }, &req).await?,
            ))
        }
        Route::Search(t) => search(svc, t, None, &req.query, &req, gate).await,
        Route::SearchPost(t) => {
            let mut params = req.query.clone();
            if let Body::Form(form) = &req.body {
                params.extend(form.iter().cloned());
            }
            search(svc, t, None, &params, &req, gate).await
        }
        Route::PatientCompartment(pid, t) => {
            search(svc, t, Some(&pid), &req.query, &req, gate).await
        }
        Route::PatientEverything(pid) => everything(svc, &pid, &req, gate).await,
        Route::InstanceHistory(t, id) => history(svc, Some((t, id)), None, &req.query, gate).await,
        Route::TypeHistory(t) => history(svc, None, Some(t), &req.query, gate).await,
        Route::SystemHistory => history(svc, None, None, &req.query, gate).await,
        Route::NodeVersion(t, id, v) => node_version(svc, t, &id, v, &req, gate).await,
        Route::ValidateType(t) => validate_operation(svc, t, None, &req.body),
        Route::ValidateInstance(t, id) => validate_operation(svc, t, Some(&id), &req.body),
        Route::Verify(t, id, v) => verify(svc, t, &id, v),
        Route::LedgerHead => Ok(FhirResponse::json(
            StatusCode::OK,
            crate::ledger::views::head(svc)?,
        )),
        Route::LedgerBlock(seq) => Ok(FhirResponse::json(
            StatusCode::OK,
            crate::ledger::views::block(svc, seq)?,
        )),
    }
}

/// Commit changes as one ledger entry, with the request's AuditEvent (once) if it carries one.
pub async fn commit(svc: &Service, changes: Vec<Change>, req: &FhirRequest) -> Result<Committed> {
    use std::sync::atomic::Ordering;
    let slot = req
        .audit
        .as_ref()
        .filter(|s| !s.committed.load(Ordering::SeqCst));
    let submission = Submission {
        changes,
        actor: actor(req.grant.as_deref()),
        audit: slot.map(|s| s.event.clone()),
    };
    let committed = svc
        .txlog
        .submit(submission)
        .await
        .map_err(|_| Error::Storage("the commit thread stopped before answering".into()))??;
    if let Some(s) = slot {
        s.committed.store(true, Ordering::SeqCst);
    }
    Ok(committed)
}

/// Commit one change outside any Bundle: its errors are the interaction's own.
async fn commit_one(svc: &Service, change: Change, req: &FhirRequest) -> Result<Applied> {
    match commit(svc, vec![change], req).await {
        Ok(mut c) => Ok(c.applied.remove(0)),
        Err(Error::TransactionEntry { source, .. }) => Err(*source),
        Err(e) => Err(e),
    }
}

pub fn resource_url(svc: &Service, t: ResourceType, id: &str) -> String {
    format!("{}/{t}/{id}", svc.config.base_url)
}

fn version_response(status: StatusCode, v: &Version) -> FhirResponse {
    FhirResponse {
        status,
        body: ResponseBody::Stored(v.body.clone()),
        version: Some(v.version),
        last_modified: Some(v.last_updated),
        location: None,
    }
}

/// A resource's versions, newest first: from this node's store when it holds them all,
/// otherwise along the ledger's records, fetching other organizations' versions.
async fn instance_history(
    svc: &Service,
    t: ResourceType,
    id: &str,
    since: Option<i64>,
    before: Option<u64>,
    count: usize,
    acting: &Acting,
) -> Result<crate::store::HistoryPage> {
    let records = svc.store.ledger_versions(t, id)?;
    if records.is_empty() && svc.store.current(t, id)?.is_none() {
        return Err(Error::NotFound(format!("{t}/{id} is not known")));
    }
    if records.iter().all(|(_, r)| r.holder == me(svc)) {
        return svc.store.instance_history(t, id, since, before, count);
    }
    let mut versions = Vec::new();
    let mut next = None;
    for (ver, _) in records
        .into_iter()
        .filter(|(v, _)| before.is_none_or(|b| *v < b))
    {
        let v = match remote_version(svc, t, id, ver, acting).await? {
            Some(v) => v,
            None => match svc.store.version(t, id, ver)? {
                Some(v) => v,
                None => continue,
            },
        };
        if since.is_some_and(|s| v.last_updated != 0 && v.last_updated < s) {
            break;
        }
        if versions.len() == count {
            next = Some((ver + 1, 0));
            break;
        }
        versions.push(v);
    }
    Ok(crate::store::HistoryPage { versions, next })
}

/// This node's replica id: the holder of what it accepted.
fn me(svc: &Service) -> u32 {
    svc.replica.id
}

/// A version held by another organization, fetched from it and checked against the ledger.
async fn remote_version(
    svc: &Service,
    t: ResourceType,
    id: &str,
    version: u64,
    acting: &Acting,
) -> Result<Option<Version>> {
    let Some(rec) = svc.store.ledger_record(t, id, version)? else {
        return Ok(None);
    };
    if rec.holder == me(svc) {
        return Ok(None);
    }
    if rec.deleted {
        return Ok(Some(Version {
            rtype: t,
            id: id.to_string(),
            version,
            tx: 0,
            last_updated: 0,
            deleted: true,
            method: Method::Delete,
            body: Vec::new().into(),
        }));
    }
    let acting = Acting {
        after: svc.store.applied()?.0,
        ..acting.clone()
    };
    crate::ledger::peer::fetch(&svc.replica, &svc.peers, t, id, version, &rec, &acting)
        .await
        .map(Some)
}

/// May this version leave, under the patients' Consents? A deny is a 403 naming the Consent;
/// a break-the-glass release comes back labelled (Some).
fn consent_release(gate: &mut ConsentGate<'_>, v: &Version) -> Result<Option<Value>> {
    match gate.check_current(v.rtype, &v.id)? {
        Verdict::Permit => Ok(None),
        Verdict::Deny(reasons) => Err(Error::Forbidden(format!(
            "the patient's consent does not permit this access: {}",
            reasons.join("; ")
        ))),
        Verdict::Override(_) => {
            let mut r: Value =
                serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?;
            label_break_glass(&mut r);
            Ok(Some(r))
        }
    }
}

/// Mark a resource released by break-the-glass (`meta.security` BTG).
fn label_break_glass(r: &mut Value) {
    if !r["meta"].is_object() {
        r["meta"] = json!({});
    }
    if !r["meta"]["security"].is_array() {
        r["meta"]["security"] = json!([]);
    }
    if let Some(labels) = r["meta"]["security"].as_array_mut() {
        labels.push(audit::break_glass_label());
    }
}

async fn read(
    svc: &Service,
    t: ResourceType,
    id: &str,
    if_none_match: Option<&str>,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let v = current_version(svc, t, id, &gate.acting()).await?;
    let labelled = consent_release(gate, &v)?;
    if let Some(tag) = if_none_match {
        if super::negotiate::parse_etag(tag).ok() == Some(v.version) {
            return Ok(FhirResponse {
                status: StatusCode::NOT_MODIFIED,
                body: ResponseBody::None,
                version: Some(v.version),
                last_modified: Some(v.last_updated),
                location: None,
            });
        }
    }
    Ok(labelled_response(&v, labelled))
}

/// A version's 200 response, with the labelled body if break-the-glass released it.
fn labelled_response(v: &Version, labelled: Option<Value>) -> FhirResponse {
    let mut resp = version_response(StatusCode::OK, v);
    if let Some(body) = labelled {
        resp.body = ResponseBody::Json(body);
    }
    resp
}

async fn vread(
    svc: &Service,
    t: ResourceType,
    id: &str,
    version: u64,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let v = match remote_version(svc, t, id, version, &gate.acting()).await? {
        Some(v) => v,
        None => svc
            .store
            .version(t, id, version)?
            .ok_or_else(|| Error::NotFound(format!("{t}/{id} has no version {version}")))?,
    };
    if v.deleted {
        return Err(Error::Gone {
            rtype: t.to_string(),
            id: id.to_string(),
            version,
        });
    }
    let labelled = consent_release(gate, &v)?;
    Ok(labelled_response(&v, labelled))
}

/// How long a holder waits to apply the ledger as far as a requesting replica had: longer
/// than a block takes to reach every replica, short enough for the requester's 5 s timeout.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Wait (briefly) until this node applied the ledger up to `seq`. Past the wait, the consent
/// checks run on the state this node has: a denial then is fail-closed, and a Consent revoked
/// since is also checked by the requester on its own, more recent state.
async fn wait_until_applied(svc: &Service, seq: u64) -> Result<()> {
    let started = std::time::Instant::now();
    while svc.store.applied()?.0 < seq && started.elapsed() < CATCH_UP_WAIT {
        actix_web::rt::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Node-to-node release of a version this node holds (see `ledger::peer`). The holder
/// decides: the version leaves only if the patient's Consents permit the requesting
/// organization and the user it acts for (the gate was built from both), judged on consent
/// state at least as recent as the requester's (the gate reads it at its first check).
async fn node_version(
    svc: &Service,
    t: ResourceType,
    id: &str,
    version: u64,
    req: &FhirRequest,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let path = crate::ledger::peer::resource_path(t, id, version);
    let acting = req.node_acting.as_deref().unwrap_or("");
    let from =
        crate::ledger::peer::check_request(&svc.replica, req.node.as_deref(), &path, acting)?;
    wait_until_applied(svc, Acting::decode(acting).after).await?;
    let v = svc
        .store
        .version(t, id, version)?
        .ok_or_else(|| Error::NotFound(format!("{t}/{id} has no version {version} here")))?;
    if v.deleted {
        return Err(Error::Gone {
            rtype: t.to_string(),
            id: id.to_string(),
            version,
        });
    }
    // A break-the-glass release goes out unlabelled: the requester checks the bytes against
    // the ledger commitment, and labels what it serves itself.
    consent_release(gate, &v)?;
    let salt = svc
        .store
        .salt(t, id, version)?
        .ok_or_else(|| Error::Integrity(format!("{path} has no salt")))?;
    let resource: Value =
        serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(to = from, resource = %path, "released a version to another replica");
    Ok(FhirResponse::json(
        StatusCode::OK,
        crate::ledger::peer::release(resource, &salt),
    ))
}

/// `$verify`: the receipt proving a version against the consortium's signatures.
fn verify(svc: &Service, t: ResourceType, id: &str, version: Option<u64>) -> Result<FhirResponse> {
    let version = match version {
        Some(v) => v,
        None => {
            svc.store
                .current(t, id)?
                .ok_or_else(|| Error::NotFound(format!("{t}/{id} is not known")))?
                .version
        }
    };
    let receipt = crate::ledger::receipt::build(
        &svc.store,
        &svc.replica.membership.chain_id,
        t,
        id,
        version,
    )?;
    Ok(FhirResponse::json(StatusCode::OK, receipt))
}

fn take_resource(body: &Body) -> Result<Value> {
    match body {
        Body::Resource(v) => Ok(v.clone()),
        _ => Err(Error::bad_request(
            "required",
            "this interaction needs a resource in the body",
        )),
    }
}

/// A search query used as a condition (conditional create/update/delete).
pub fn condition(
    svc: &Service,
    t: ResourceType,
    params: &[(String, String)],
) -> Result<SearchQuery> {
    let params: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "_format" && k != "_pretty")
        .cloned()
        .collect();
    if params.is_empty() {
        return Err(Error::bad_request(
            "required",
            "a conditional interaction needs search parameters",
        ));
    }
    let mut q = query::parse(&svc.registry, t, &params, false)?;
    q.count = 2;
    Ok(q)
}

pub fn if_none_exist_query(svc: &Service, t: ResourceType, header: &str) -> Result<SearchQuery> {
    let header = header
        .trim_start_matches(|c| c == '?')
        .rsplit('?')
        .next()
        .unwrap_or(header);
    condition(svc, t, &super::negotiate::query_pairs(header))
}

pub fn applied_response(svc: &Service, a: &Applied, prefer: ReturnPreference) -> FhirResponse {
    let status = match a.outcome {
        Outcome::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let body = a
        .body
        .clone()
        .map_or(ResponseBody::None, ResponseBody::Stored);
    let location = matches!(a.outcome, Outcome::Created | Outcome::Updated).then(|| {
        format!(
            "{}/_history/{}",
            resource_url(svc, a.rtype, &a.id),
            a.version
        )
    });
    let message = match a.outcome {
        Outcome::Created => format!("created {}/{} version {}", a.rtype, a.id, a.version),
        Outcome::Updated => format!("updated {}/{} to version {}", a.rtype, a.id, a.version),
        Outcome::Existing => format!(
            "{}/{} already matches the condition; nothing was created",
            a.rtype, a.id
        ),
        Outcome::Deleted | Outcome::NoOp => format!("{}/{}", a.rtype, a.id),
    };
    FhirResponse {
        status,
        body,
        version: Some(a.version),
        last_modified: Some(a.last_updated),
        location,
    }
    .with_return(prefer, || operation_outcome(&[Issue::information(message)]))
}

fn deleted_response(a: &Applied) -> FhirResponse {
    let message = match a.outcome {
        Outcome::Deleted => format!(
            "deleted {}/{} (version {} records the deletion)",
            a.rtype, a.id, a.version
        ),
        _ => "nothing matched; nothing was deleted".to_string(),
    };
    let mut r = FhirResponse::json(
        StatusCode::OK,
        operation_outcome(&[Issue::information(message)]),
    );
    if a.outcome == Outcome::Deleted {
        r.version = Some(a.version);
        r.last_modified = Some(a.last_updated);
    }
    r
}

async fn create(svc: &Service, t: ResourceType, req: FhirRequest) -> Result<FhirResponse> {
    let resource = take_resource(&req.body)?;
    svc.validator.validate(t, &resource)?;
    let if_none_exist = req
        .if_none_exist
        .as_deref()
        .map(|h| if_none_exist_query(svc, t, h))
        .transpose()?;
    let change = Change::Create {
        rtype: t,
        id: new_id(),
        resource,
        if_none_exist,
        on_match: OnMatch::ReturnExisting,
    };
    Ok(applied_response(
        svc,
        &commit_one(svc, change, &req).await?,
        req.prefer.return_,
    ))
}

fn check_body_id(resource: &Value, id: &str) -> Result<()> {
    match resource.get("id").and_then(Value::as_str) {
        None => Err(Error::BadRequest(
            Issue::error("required", "an update needs the resource id in the body").at("id"),
        )),
        Some(b) if b != id => Err(Error::BadRequest(
            Issue::error(
                "invalid",
                format!("body id '{b}' does not match the URL id '{id}'"),
            )
            .at("id"),
        )),
        Some(_) => Ok(()),
    }
}

async fn update(
    svc: &Service,
    t: ResourceType,
    id: &str,
    req: FhirRequest,
) -> Result<FhirResponse> {
    let resource = take_resource(&req.body)?;
    svc.validator.validate(t, &resource)?;
    check_body_id(&resource, id)?;
    let change = Change::Update {
        rtype: t,
        id: id.to_string(),
        resource,
        if_match: req.if_match,
        method: Method::Put,
    };
    Ok(applied_response(
        svc,
        &commit_one(svc, change, &req).await?,
        req.prefer.return_,
    ))
}

async fn conditional_update(
    svc: &Service,
    t: ResourceType,
    req: FhirRequest,
) -> Result<FhirResponse> {
    let resource = take_resource(&req.body)?;
    svc.validator.validate(t, &resource)?;
    if let Some(id) = resource.get("id").and_then(Value::as_str) {
        check_id(id)?;
    }
    let q = condition(svc, t, &req.query)?;
    Ok(applied_response(
        svc,
        &commit_one(
            svc,
            Change::ConditionalUpdate {
                rtype: t,
                query: q,
                resource,
                if_match: req.if_match,
            },
            &req,
        )
        .await?,
        req.prefer.return_,
    ))
}

/// Apply a JSON Patch to the current version; the result is validated like an update.
pub fn patched(
    svc: &Service,
    t: ResourceType,
    id: &str,
    patch: &json_patch::Patch,
) -> Result<(Value, u64)> {
    let current = svc.store.read(t, id)?;
    let mut doc: Value =
        serde_json::from_slice(&current.body).map_err(|e| Error::Internal(e.to_string()))?;
    json_patch::patch(&mut doc, patch).map_err(|e| {
        Error::BadRequest(Issue::error(
            "processing",
            format!("the JSON Patch does not apply: {e}"),
        ))
    })?;
    if doc.get("resourceType").and_then(Value::as_str) != Some(t.as_str())
        || doc.get("id").and_then(Value::as_str) != Some(id)
    {
        return Err(Error::bad_request(
            "invalid",
            "a PATCH may not change resourceType or id",
        ));
    }
    svc.validator.validate(t, &doc)?;
    Ok((doc, current.version))
}

async fn patch(
    svc: &Service,
    t: ResourceType,
    id: String,
    req: &FhirRequest,
) -> Result<FhirResponse> {
    let Body::Patch(p) = &req.body else {
        return Err(Error::bad_request(
            "required",
            "PATCH needs a JSON Patch body",
        ));
    };
    // Without If-Match, the patch applies to whatever version is current when it commits:
    // retry if another writer got in between our read and our commit.
    for _ in 0..5 {
        let (doc, version) = patched(svc, t, &id, p)?;
        if let Some(g) = &req.grant {
            access::check_resource(&svc.registry, &svc.config.base_url, g, t, Perm::U, &doc)?;
        }
        if req.if_match.is_some_and(|m| m != version) {
            return Err(Error::PreconditionFailed(format!(
                "If-Match version {} is stale: {t}/{id} is at version {version}",
                req.if_match.unwrap_or(0)
            )));
        }
        let change = Change::Update {
            rtype: t,
            id: id.clone(),
            resource: doc,
            if_match: Some(version),
            method: Method::Patch,
        };
        match commit_one(svc, change, req).await {
            Err(Error::PreconditionFailed(_)) if req.if_match.is_none() => continue,
            r => return Ok(applied_response(svc, &r?, req.prefer.return_)),
        }
    }
    Err(Error::VersionConflict(format!(
        "{t}/{id} kept changing under the PATCH; retry"
    )))
}

fn validate_operation(
    svc: &Service,
    t: ResourceType,
    id: Option<&str>,
    body: &Body,
) -> Result<FhirResponse> {
    let mut resource = take_resource(body)?;
    // Accept a Parameters wrapper with a `resource` parameter, as the operation defines.
    if resource.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
        resource = resource["parameter"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == "resource"))
            .and_then(|p| p.get("resource").cloned())
            .ok_or_else(|| {
                Error::bad_request("required", "Parameters has no 'resource' parameter")
            })?;
    }
    let mut issues = match svc.validator.validate(t, &resource) {
        Ok(()) => vec![],
        Err(Error::Invalid(i)) => i,
        Err(Error::BadRequest(i)) => vec![i],
        Err(e) => return Err(e),
    };
    if let (Some(id), Some(body_id)) = (id, resource.get("id").and_then(Value::as_str)) {
        if id != body_id {
            issues.push(
                Issue::error(
                    "invalid",
                    format!("body id '{body_id}' does not match the URL id '{id}'"),
                )
                .at("id"),
            );
        }
    }
    if issues.is_empty() {
        issues.push(Issue::information(format!("the {t} is valid")));
    }
    Ok(FhirResponse::json(
        StatusCode::OK,
        operation_outcome(&issues),
    ))
}

// ---- search ----

fn link(relation: &str, url: String) -> Value {
    json!({"relation": relation, "url": url})
}

fn page_url(
    svc: &Service,
    path: &str,
    applied: &[(String, String)],
    count: usize,
    offset: usize,
) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in applied
        .iter()
        .filter(|(k, _)| k != "_count" && k != "_offset")
    {
        ser.append_pair(k, v);
    }
    ser.append_pair("_count", &count.to_string());
    ser.append_pair("_offset", &offset.to_string());
    format!("{}/{path}?{}", svc.config.base_url, ser.finish())
}

/// `_summary` / `_elements` projection; marks the result SUBSETTED.
fn project(svc: &Service, t: ResourceType, q: &SearchQuery, resource: Value) -> Value {
    let keep: Option<Vec<String>> = match (q.summary, &q.elements) {
        (Summary::True, _) => Some(svc.profiles.summary_elements(t)),
        (Summary::Text, _) => Some(vec!["text".into()]),
        (Summary::Data, _) => {
            let mut all: Vec<String> = resource
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            all.retain(|k| k != "text");
            Some(all)
        }
        (_, Some(e)) => Some(e.clone()),
        _ => None,
    };
    let Some(mut keep) = keep else {
        return resource;
    };
    keep.extend(svc.profiles.mandatory_elements(t));
    let Value::Object(obj) = resource else {
        return resource;
    };
    let mut out = Map::new();
    for (k, v) in obj {
        if k == "resourceType"
            || k == "id"
            || k == "meta"
            || keep
                .iter()
                .any(|e| e == &k || e.strip_prefix('_') == Some(&k))
        {
            out.insert(k, v);
        }
    }
    let meta = out.entry("meta").or_insert_with(|| json!({}));
    let tags = meta
        .as_object_mut()
        .map(|m| m.entry("tag").or_insert_with(|| json!([])));
    if let Some(Value::Array(tags)) = tags {
        tags.push(json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED", "display": "subsetted"}));
    }
    Value::Object(out)
}

async fn search(
    svc: &Service,
    t: ResourceType,
    compartment: Option<&str>,
    params: &[(String, String)],
    req: &FhirRequest,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let mut q = query::parse(&svc.registry, t, params, req.prefer.lenient)?;
    if let Some(g) = &req.grant {
        let r = access::restriction(g, t, Perm::S)?;
        access::narrow(&svc.registry, &mut q, &r)?;
    }
    let path = match compartment {
        Some(pid) => {
            query::add_patient_compartment(&svc.registry, &mut q, pid)?;
            format!("Patient/{pid}/{t}")
        }
        None => t.to_string(),
    };
    let mut ids = exec::matching_ids(&svc.store, &svc.config.base_url, &q)?;
    // A patient's compartment spans the consortium: add the matching members other
    // organizations hold, fetched from them and checked against the ledger.
    let mut remote: std::collections::BTreeMap<String, Version> = Default::default();
    let mut missing: Vec<String> = Vec::new();
    if let Some(pid) = compartment {
        let now = crate::fhir::now_ms();
        for id in svc.store.ledger_compartment(pid, t)? {
            let Some(h) = svc.store.ledger_head(t, &id)? else {
                continue;
            };
            if h.holder == me(svc) || h.deleted || ids.contains(&id) {
                continue;
            }
            match remote_version(svc, t, &id, h.version, &gate.acting()).await {
                Ok(Some(v)) => {
                    let resource: Value = serde_json::from_slice(&v.body)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    if exec::resource_matches(&q, &resource, &svc.config.base_url, now) {
                        remote.insert(id, v);
                    }
                }
                Ok(None) => {}
                Err(e) => missing.push(e.to_string()),
            }
        }
        ids.extend(remote.keys().cloned());
    }
    // What the patients' Consents withhold is not matched at all: not counted, not paged.
    let mut overridden = std::collections::HashSet::new();
    let mut permitted = Vec::with_capacity(ids.len());
    for id in ids {
        match gate.check_current(t, &id)? {
            Verdict::Permit => permitted.push(id),
            Verdict::Override(_) => {
                overridden.insert(id.clone());
                permitted.push(id);
            }
            Verdict::Deny(_) => {}
        }
    }
    let ids = permitted;
    let total = ids.len();
    let mut bundle = json!({"resourceType": "Bundle", "id": new_id(), "meta": {"lastUpdated": format_instant(crate::fhir::now_ms())}, "type": "searchset"});
    if q.total == Total::Accurate || q.summary == Summary::Count {
        bundle["total"] = json!(total);
    }
    let count = if q.summary == Summary::Count {
        0
    } else {
        q.count
    };
    let offset = q.offset.min(total);
    let mut links = vec![link(
        "self",
        page_url(svc, &path, &q.applied, count, offset),
    )];
    if count > 0 {
        links.push(link("first", page_url(svc, &path, &q.applied, count, 0)));
        if offset > 0 {
            links.push(link(
                "previous",
                page_url(svc, &path, &q.applied, count, offset.saturating_sub(count)),
            ));
        }
        if offset + count < total {
            links.push(link(
                "next",
                page_url(svc, &path, &q.applied, count, offset + count),
            ));
            links.push(link(
                "last",
                page_url(svc, &path, &q.applied, count, (total - 1) / count * count),
            ));
        }
    }
    bundle["link"] = json!(links);
    let page: Vec<&String> = ids.iter().skip(offset).take(count).collect();
    let mut entries = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for id in &page {
        // A resource deleted between the index scan and this read is simply absent.
        let v = match remote.get(id.as_str()) {
            Some(v) => v.clone(),
            None => match svc.store.read(t, id) {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        seen.insert((t, id.to_string()));
        let mut resource: Value =
            serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?;
        if overridden.contains(id.as_str()) {
            label_break_glass(&mut resource);
        }
        entries.push(json!({"fullUrl": resource_url(svc, t, id), "resource": project(svc, t, &q, resource), "search": {"mode": "match"}}));
    }
    for (target, v) in includes(svc, &q, &page)? {
        let labelled = match gate.check_current(target, &v.id)? {
            Verdict::Permit => false,
            Verdict::Override(_) => true,
            Verdict::Deny(_) => continue,
        };
        if seen.insert((target, v.id.clone())) {
            let mut resource: Value =
                serde_json::from_slice(&v.body).map_err(|e| Error::Internal(e.to_string()))?;
            if labelled {
                label_break_glass(&mut resource);
            }
            entries.push(json!({"fullUrl": resource_url(svc, target, &v.id), "resource": resource, "search": {"mode": "include"}}));
        }
    }
    if !missing.is_empty() {
        let issues: Vec<Issue> = missing
            .into_iter()
            .map(|m| Issue::warning("incomplete", format!("results are incomplete: {m}")))
            .collect();
        entries
            .push(json!({"resource": operation_outcome(&issues), "search": {"mode": "outcome"}}));
    }
    if !q.ignored.is_empty() {
        let oo = operation_outcome(&[Issue::warning(
            "not-supported",
            format!("ignored under handling=lenient: {}", q.ignored.join(", ")),
        )]);
        entries.push(json!({"resource": oo, "search": {"mode": "outcome"}}));
    }
    if !entries.is_empty() {
        bundle["entry"] = json!(entries);
    }
    Ok(FhirResponse::json(StatusCode::OK, bundle))
}

/// `Patient/{id}/$everything`: the patient and every resource in their compartment that the
/// token's scopes reach and the patient's Consents release (consortium-wide, like a compartment
/// search). `_type` narrows the types (AuditEvents only when asked for), `_since` the time.
async fn everything(
    svc: &Service,
    pid: &str,
    req: &FhirRequest,
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    let mut types: Vec<ResourceType> = ResourceType::ALL
        .iter()
        .copied()
        .filter(|t| !matches!(t, ResourceType::Patient | ResourceType::AuditEvent))
        .collect();
    let mut params: Vec<(String, String)> = vec![
        ("_count".into(), query::MAX_COUNT.to_string()),
        ("_total".into(), "accurate".into()),
    ];
    for (k, v) in &req.query {
        match k.as_str() {
            "_type" => {
                types = v
                    .split(',')
                    .map(|t| t.trim().parse::<ResourceType>())
                    .collect::<Result<_>>()?;
                types.retain(|t| *t != ResourceType::Patient);
            }
            "_since" => params.push(("_lastUpdated".into(), format!("ge{v}"))),
            "_format" | "_pretty" => {}
            other => {
                return Err(Error::UnknownSearchParameter(format!(
                    "$everything does not support the parameter '{other}'"
                )))
            }
        }
    }
    let patient = current_version(svc, ResourceType::Patient, pid, &gate.acting()).await?;
    let labelled = consent_release(gate, &patient)?;
    let patient_json: Value = match labelled {
        Some(v) => v,
        None => {
            serde_json::from_slice(&patient.body).map_err(|e| Error::Internal(e.to_string()))?
        }
    };
    let mut entries = vec![json!({
        "fullUrl": resource_url(svc, ResourceType::Patient, pid),
        "resource": patient_json,
        "search": {"mode": "match"},
    })];
    let mut issues = Vec::new();
    for t in types {
        let allowed = match &req.grant {
            Some(g) => {
                access::restriction(g, t, Perm::S).is_ok()
                    && (t != ResourceType::AuditEvent || access::check_audit_reader(g).is_ok())
            }
            None => false,
        };
        if !allowed {
            continue;
        }
        let resp = search(svc, t, Some(pid), &params, req, gate).await?;
        let ResponseBody::Json(bundle) = resp.body else {
            continue;
        };
        let found = bundle["entry"].as_array().cloned().unwrap_or_default();
        let matched = found
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .count();
        if bundle["total"]
            .as_u64()
            .is_some_and(|n| n as usize > matched)
        {
            issues.push(Issue::warning(
                "too-costly",
                format!(
                    "only the first {matched} of {} {t} resources are included; page Patient/{pid}/{t} for the rest",
                    bundle["total"]
                ),
            ));
        }
        entries.extend(found);
    }
    if !issues.is_empty() {
        entries
            .push(json!({"resource": operation_outcome(&issues), "search": {"mode": "outcome"}}));
    }
    let total = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .count();
    Ok(FhirResponse::json(
        StatusCode::OK,
        json!({
            "resourceType": "Bundle",
            "id": new_id(),
            "meta": {"lastUpdated": format_instant(crate::fhir::now_ms())},
            "type": "searchset",
            "total": total,
            "link": [link("self", format!("{}/Patient/{pid}/$everything", svc.config.base_url))],
            "entry": entries,
        }),
    ))
}

/// `_include` targets of the page, and `_revinclude` sources pointing at it.
fn includes(
    svc: &Service,
    q: &SearchQuery,
    page: &[&String],
) -> Result<Vec<(ResourceType, Version)>> {
    let mut out = Vec::new();
    let ids: Vec<&str> = page.iter().map(|s| s.as_str()).collect();
    for inc in &q.include {
        for values in svc
            .store
            .values(q.rtype, &[&inc.param.code], &ids)?
            .swap_remove(0)
        {
            for v in values {
                let crate::search::value::IndexValue::Reference {
                    target: Some(target),
                    ..
                } = v
                else {
                    continue;
                };
                let local = crate::search::keys::local_reference(&target, &svc.config.base_url);
                let Some((ty, id)) = local.split_once('/') else {
                    continue;
                };
                let Ok(rt) = ty.parse::<ResourceType>() else {
                    continue;
                };
                if inc.target.is_some_and(|t| t != rt) {
                    continue;
                }
                if let Ok(v) = svc.store.read(rt, id) {
                    out.push((rt, v));
                }
            }
        }
    }
    for inc in &q.revinclude {
        for id in &ids {
            let mut rq = query::parse(&svc.registry, inc.source, &[], false)?;
            rq.clauses.push(query::Clause {
                params: vec![inc.param.clone()],
                modifier: query::Modifier::None,
                values: vec![query::ClauseValue::Reference(format!("{}/{id}", q.rtype))],
                single_date_width: None,
            });
            for sid in exec::matching_ids(&svc.store, &svc.config.base_url, &rq)? {
                if let Ok(v) = svc.store.read(inc.source, &sid) {
                    out.push((inc.source, v));
                }
            }
        }
    }
    Ok(out)
}

// ---- history ----

async fn history(
    svc: &Service,
    instance: Option<(ResourceType, String)>,
    rtype: Option<ResourceType>,
    params: &[(String, String)],
    gate: &mut ConsentGate<'_>,
) -> Result<FhirResponse> {
    if let Some((t, id)) = &instance {
        if let Verdict::Deny(reasons) = gate.check_current(*t, id)? {
            return Err(Error::Forbidden(format!(
                "the patient's consent does not permit this access: {}",
                reasons.join("; ")
            )));
        }
    }
    let mut since = None;
    let mut count = query::DEFAULT_COUNT;
    let mut cursor: Option<(u64, u32)> = None;
    for (k, v) in params {
        match k.as_str() {
            "_since" => {
                let (lo, _) = parse_date_range(v)
                    .filter(|_| v.contains('T') || v.len() == 10)
                    .ok_or_else(|| {
                        Error::BadRequest(
                            Issue::error("invalid", format!("_since '{v}' is not an instant"))
                                .at("_since"),
                        )
                    })?;
                since = Some(lo);
            }
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| {
                        Error::bad_request("invalid", format!("_count '{v}' is not a number"))
                    })?
                    .clamp(1, query::MAX_COUNT)
            }
            "_page" => {
                let (a, b) = v
                    .split_once('.')
                    .ok_or_else(|| Error::bad_request("invalid", "bad _page cursor"))?;
                cursor = Some((
                    a.parse()
                        .map_err(|_| Error::bad_request("invalid", "bad _page cursor"))?,
                    b.parse()
                        .map_err(|_| Error::bad_request("invalid", "bad _page cursor"))?,
                ));
            }
            "_format" | "_pretty" => {}
            other => {
                return Err(Error::UnknownSearchParameter(format!(
                    "history does not support the parameter '{other}'"
                )))
            }
        }
    }
    let (page, path) = match &instance {
        Some((t, id)) => (
            instance_history(
                svc,
                *t,
                id,
                since,
                cursor.map(|c| c.0),
                count,
                &gate.acting(),
            )
            .await?,
            format!("{t}/{id}/_history"),
        ),
        None => (
            svc.store.history(rtype, since, cursor, count)?,
            rtype.map_or("_history".to_string(), |t| format!("{t}/_history")),
        ),
    };
    let link_for = |c: Option<(u64, u32)>| {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        if let Some((k, v)) = params.iter().find(|(k, _)| k == "_since") {
            ser.append_pair(k, v);
        }
        ser.append_pair("_count", &count.to_string());
        if let Some((a, b)) = c {
            ser.append_pair("_page", &format!("{a}.{b}"));
        }
        format!("{}/{path}?{}", svc.config.base_url, ser.finish())
    };
    let mut links = vec![link("self", link_for(cursor))];
    if let Some(next) = page.next {
        links.push(link("next", link_for(Some(next))));
    }
    let mut released = Vec::with_capacity(page.versions.len());
    for v in &page.versions {
        match gate.check_current(v.rtype, &v.id)? {
            Verdict::Permit => released.push((v, false)),
            Verdict::Override(_) => released.push((v, true)),
            Verdict::Deny(_) => {}
        }
    }
    let entries: Vec<Value> = released
        .into_iter()
        .map(|(v, labelled)| {
            let url = resource_url(svc, v.rtype, &v.id);
            let (request_url, status) = match v.method {
                Method::Post => (v.rtype.to_string(), "201 Created"),
                Method::Delete => (format!("{}/{}", v.rtype, v.id), "200 OK"),
                _ if v.version == 1 => (format!("{}/{}", v.rtype, v.id), "201 Created"),
                _ => (format!("{}/{}", v.rtype, v.id), "200 OK"),
            };
            let mut e = json!({
                "fullUrl": url,
                "request": {"method": v.method.as_str(), "url": request_url},
                "response": {"status": status, "etag": format!("W/\"{}\"", v.version), "lastModified": format_instant(v.last_updated)},
            });
            if !v.deleted {
                e["resource"] = serde_json::from_slice(&v.body).unwrap_or(Value::Null);
                if labelled {
                    label_break_glass(&mut e["resource"]);
                }
            }
            e
        })
        .collect();
    let mut bundle =
        json!({"resourceType": "Bundle", "id": new_id(), "type": "history", "link": links});
    if instance.is_some() && cursor.is_none() && page.next.is_none() {
        bundle["total"] = json!(entries.len());
    }
    if !entries.is_empty() {
        bundle["entry"] = json!(entries);
    }
    Ok(FhirResponse::json(StatusCode::OK, bundle))
}

pub fn is_read_only(method: HttpMethod) -> bool {
    matches!(method, HttpMethod::Get | HttpMethod::Head)
}

//! The authorization server's HTTP face (SMART App Launch 2.x): discovery, JWKS, the
//! authorize / login / approve pages, token, introspection, revocation and EHR launches. The
//! flows themselves are in `crate::auth::flows`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::auth::flows::{Authorize, Login, OAuthError};
use crate::auth::form_value;
use crate::Service;

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("Pragma", "no-cache"))
        .insert_header(("Access-Control-Allow-Origin", "*"))
        .body(body.to_string())
}

fn oauth_error(e: &OAuthError) -> HttpResponse {
    let status = if e.error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else if e.error == "server_error" {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::BAD_REQUEST
    };
    json_response(
        status,
        &json!({"error": e.error, "error_description": e.description}),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-store"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Content-Security-Policy", "default-src 'none'; form-action 'self'; style-src 'unsafe-inline'"))
        .body(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1>{body}</body></html>",
            t = escape(title)
        ))
}

fn login_page(svc: &Service, txn: &str, client: &str, message: Option<&str>) -> HttpResponse {
    page(
        "Sign in to Fhirmament",
        &format!(
            "<p><b>{client}</b> asks to access your health records.</p>{msg}\
             <form method=\"post\" action=\"{action}\">\
             <input type=\"hidden\" name=\"txn\" value=\"{txn}\">\
             <label>User name <input name=\"username\" autocomplete=\"username\"></label><br>\
             <label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\"></label><br>\
             <label>One-time code (if you enabled it) <input name=\"otp\" inputmode=\"numeric\" autocomplete=\"one-time-code\"></label><br>\
             <button type=\"submit\">Sign in</button></form>",
            client = escape(client),
            msg = message.map(|m| format!("<p role=\"alert\">{}</p>", escape(m))).unwrap_or_default(),
            action = escape(&svc.auth.endpoint("login")),
            txn = escape(txn),
        ),
    )
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn basic_auth(req: &HttpRequest) -> Option<(String, String)> {
    let h = req.headers().get("Authorization")?.to_str().ok()?;
    let (scheme, b64) = h.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

pub async fn smart_configuration(svc: web::Data<Service>) -> HttpResponse {
    json_response(StatusCode::OK, &svc.auth.smart_configuration())
}

pub async fn openid_configuration(svc: web::Data<Service>) -> HttpResponse {
    json_response(StatusCode::OK, &svc.auth.openid_configuration())
}

pub async fn jwks(svc: web::Data<Service>) -> HttpResponse {
    json_response(StatusCode::OK, &svc.auth.key.jwks())
}

/// GET (query) or POST (form), per SMART's `authorize-post`.
pub async fn authorize(
    req: HttpRequest,
    body: web::Bytes,
    svc: web::Data<Service>,
) -> HttpResponse {
    let params = if req.method() == actix_web::http::Method::POST {
        form_pairs(&body)
    } else {
        form_pairs(req.query_string().as_bytes())
    };
    match svc.auth.authorize(&params) {
        Err(e) => oauth_error(&OAuthError::from(e)),
        Ok(Authorize::Refuse(e)) => HttpResponse::BadRequest()
            .content_type("text/html; charset=utf-8")
            .body(format!(
                "<!doctype html><p>Authorization refused: {} ({})</p>",
                escape(&e.description),
                e.error
            )),
        Ok(Authorize::RedirectError {
            redirect_uri,
            state,
            error,
        }) => {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            ser.append_pair("error", error.error);
            ser.append_pair("error_description", &error.description);
            if let Some(s) = state {
                ser.append_pair("state", &s);
            }
            let sep = if redirect_uri.contains('?') { '&' } else { '?' };
            HttpResponse::Found()
                .insert_header(("Location", format!("{redirect_uri}{sep}{}", ser.finish())))
                .finish()
        }
        Ok(Authorize::Login { txn, client }) => login_page(&svc, &txn, &client, None),
    }
}

pub async fn login(body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    let form = form_pairs(&body);
    let txn = form_value(&form, "txn").unwrap_or("");
    let result = svc.auth.login(
        txn,
        form_value(&form, "username").unwrap_or(""),
        form_value(&form, "password").unwrap_or(""),
        form_value(&form, "otp").unwrap_or(""),
    );
    match result {
        Err(e) => oauth_error(&OAuthError::from(e)),
        Ok(Login::Expired) => page(
            "Sign in",
            "<p>This sign-in has expired. Start again from the app.</p>",
        ),
        Ok(Login::Retry {
            txn,
            client,
            message,
        }) => login_page(&svc, &txn, &client, Some(&message)),
        Ok(Login::Approve {
            txn,
            client,
            offered,
            pick_patient,
        }) => {
            let boxes: String = offered
                .iter()
                .map(|s| {
                    format!(
                        "<label><input type=\"checkbox\" name=\"scope\" value=\"{v}\" checked> {v}</label><br>",
                        v = escape(s)
                    )
                })
                .collect();
            let picker = if pick_patient {
                "<label>Patient id <input name=\"patient\"></label><br>"
            } else {
                ""
            };
            page(
                "Approve access",
                &format!(
                    "<p><b>{client}</b> asks for the access below. Untick what you do not want to share.</p>\
                     <form method=\"post\" action=\"{action}\"><input type=\"hidden\" name=\"txn\" value=\"{txn}\">\
                     {boxes}{picker}<button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button>\
                     <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
                    client = escape(&client),
                    action = escape(&svc.auth.endpoint("approve")),
                    txn = escape(&txn),
                ),
            )
        }
    }
}

pub async fn approve(body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    let form = form_pairs(&body);
    let txn = form_value(&form, "txn").unwrap_or("");
    let chosen: Vec<String> = if form_value(&form, "decision") == Some("deny") {
        Vec::new()
    } else {
        form.iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.clone())
            .collect()
    };
    let store = svc.store.clone();
    let exists = move |id: &str| {
        crate::fhir::is_valid_id(id)
            && store
                .ledger_head(crate::fhir::ResourceType::Patient, id)
                .ok()
                .flatten()
                .is_some_and(|h| !h.deleted)
    };
    match svc
        .auth
        .approve(txn, &chosen, form_value(&form, "patient"), exists)
    {
        Err(e) => oauth_error(&OAuthError::from(e)),
        Ok(Err(e)) => page(
            "Authorization",
            &format!("<p>{}</p>", escape(&e.description)),
        ),
        Ok(Ok(location)) => HttpResponse::Found()
            .insert_header(("Location", location))
            .finish(),
    }
}

/// The token endpoint. Every issuance and every refusal leaves an AuditEvent (user
/// authentication); a token is handed out only once that record is committed.
pub async fn token(req: HttpRequest, body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    let form = form_pairs(&body);
    let basic = basic_auth(&req);
    // A client that publishes its keys at a JWKS URL: make sure they are at hand (and fresh,
    // or hold the key the assertion names) before the signature is checked.
    let mut fetch_failed = None;
    let asserted = crate::auth::form_value(&form, "client_assertion")
        .and_then(|a| svc.auth.assertion_client(a));
    if let Some((client, kid)) = asserted {
        if let Some(uri) = &client.jwks_uri {
            if let Err(e) = svc
                .auth
                .jwks_urls
                .refresh(&svc.peers, uri, kid.as_deref())
                .await
            {
                fetch_failed = Some(e);
            }
        }
    }
    let result = match fetch_failed {
        Some(e) => Err(crate::auth::flows::OAuthError {
            error: "invalid_client",
            description: format!("the client's keys could not be fetched: {e}"),
        }),
        None => svc.auth.token(&form, basic.clone()),
    };
    let mut ctx = crate::audit::AuditContext {
        token: true,
        interaction: "token".into(),
        action: "E",
        organization: svc.config.consent.organization.clone(),
        peer_address: req.peer_addr().map(|a| a.ip().to_string()),
        client_id: basic
            .map(|(id, _)| id)
            .or_else(|| crate::auth::form_value(&form, "client_id").map(str::to_string)),
        ..Default::default()
    };
    let mut outcome = crate::audit::AuditOutcome {
        status: 200,
        description: None,
        resources: Vec::new(),
        patients: Vec::new(),
    };
    match &result {
        Ok(t) => {
            let grant = t.0["access_token"]
                .as_str()
                .and_then(|a| svc.auth.grant(a).ok());
            if let Some(g) = grant {
                ctx.client_id = Some(g.client_id.clone());
                ctx.user = Some(g.sub.clone());
                ctx.fhir_user = g.fhir_user.clone();
                outcome
                    .patients
                    .extend(g.patient.as_ref().map(|p| format!("Patient/{p}")));
            }
        }
        Err(e) => {
            outcome.status = if e.error == "invalid_client" {
                401
            } else {
                400
            };
            outcome.description = Some(format!("{}: {}", e.error, e.description));
        }
    }
    let actor = format!(
        "{} {}",
        ctx.client_id.as_deref().unwrap_or("unknown"),
        ctx.user.as_deref().unwrap_or("-")
    );
    let event = crate::audit::event(
        &ctx,
        &outcome,
        &crate::audit::ConsentSummary::default(),
        crate::fhir::now_ms(),
    );
    if let Err(e) = super::interaction::commit_audit(&svc, event, actor).await {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "temporarily_unavailable", "error_description": e.to_string()}),
        );
    }
    match result {
        Ok(t) => json_response(StatusCode::OK, &t.0),
        Err(e) => oauth_error(&e),
    }
}

pub async fn introspect(
    req: HttpRequest,
    body: web::Bytes,
    svc: web::Data<Service>,
) -> HttpResponse {
    let bearer = super::bearer(&req);
    match svc
        .auth
        .introspect(&form_pairs(&body), basic_auth(&req), bearer.as_deref())
    {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => oauth_error(&e),
    }
}

pub async fn revoke(req: HttpRequest, body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    match svc.auth.revoke(&form_pairs(&body), basic_auth(&req)) {
        Ok(()) => json_response(StatusCode::OK, &json!({})),
        Err(e) => oauth_error(&e),
    }
}

/// RFC 7591 dynamic client registration (JSON), guarded by the initial access token.
pub async fn register(req: HttpRequest, body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    let meta: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "invalid_client_metadata", "error_description": format!("not JSON: {e}")}),
            )
        }
    };
    match svc.auth.register(super::bearer(&req).as_deref(), &meta) {
        Ok(v) => json_response(StatusCode::CREATED, &v),
        Err((status, e)) => json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            &json!({"error": e.error, "error_description": e.description}),
        ),
    }
}

/// EHR launch: an EHR user (user/ or system/ scopes on Patient) opens an app for a patient.
/// Answers the `launch` value and the URL to hand the app (`iss` + `launch`).
pub async fn launch(req: HttpRequest, body: web::Bytes, svc: web::Data<Service>) -> HttpResponse {
    let denied = |status: StatusCode, m: &str| {
        json_response(
            status,
            &json!({"error": "access_denied", "error_description": m}),
        )
    };
    let Some(grant) = super::bearer(&req).and_then(|t| svc.auth.grant(&t).ok()) else {
        return denied(
            StatusCode::UNAUTHORIZED,
            "an EHR launch needs a valid access token",
        );
    };
    let ehr = grant.scopes.iter().any(|s| {
        s.context != crate::auth::scopes::Context::Patient
            && s.allows(
                crate::fhir::ResourceType::Patient,
                crate::auth::scopes::Perm::R,
            )
    });
    if !ehr {
        return denied(
            StatusCode::FORBIDDEN,
            "an EHR launch needs user/ or system/ read access to Patient",
        );
    }
    let form = form_pairs(&body);
    let Some(patient) = form_value(&form, "patient").filter(|p| crate::fhir::is_valid_id(p)) else {
        return denied(StatusCode::BAD_REQUEST, "patient (an id) is required");
    };
    match svc.auth.create_launch(patient) {
        Ok(l) => json_response(StatusCode::OK, &json!({"launch": l, "iss": svc.auth.base})),
        Err(e) => oauth_error(&OAuthError::from(e)),
    }
}

//! AuditEvents after IHE Basic Audit Log Patterns (BALP): one per interaction, built here as
//! data and committed through the ledger like any other version (fail closed: the interaction
//! fails when its AuditEvent cannot commit). Writes carry their AuditEvent in the same ledger
//! entry (`txlog::Submission::audit`), so a change and its record commit together or not at all.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::fhir::format_instant;
use crate::store::txlog::{Applied, Outcome};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
pub const DECISION_URL: &str = "https://fhirmament.dev/fhir/StructureDefinition/consent-decision";
pub const REVIEW_SYSTEM: &str = "https://fhirmament.dev/fhir/CodeSystem/audit-review";

/// The security label a response released by break-the-glass carries.
pub fn break_glass_label() -> Value {
    json!({"system": ACT_REASON, "code": "BTG", "display": "break the glass"})
}

/// Who did what, as the request states it (before its outcome is known).
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    /// BALP event type: `rest` for FHIR interactions, `110114` (user authentication) for tokens.
    pub token: bool,
    /// `http://hl7.org/fhir/restful-interaction` code (read, search-type, create, ...).
    pub interaction: String,
    /// C R U D E.
    pub action: &'static str,
    pub client_id: Option<String>,
    /// The token's subject.
    pub user: Option<String>,
    /// The user's FHIR reference (`fhirUser`), if any.
    pub fhir_user: Option<String>,
    /// The organization whose node served the request (`Organization/<id>`).
    pub organization: String,
    pub peer_address: Option<String>,
    pub purpose: Option<String>,
    /// The query string of a search, or the request URL of other interactions.
    pub query: Option<String>,
    /// The resource addressed (`Type/id` or `Type/id/_history/v`), when the URL names one.
    pub target: Option<String>,
}

/// The AuditEvent a write commits in its own ledger entry, and whether it did.
#[derive(Debug)]
pub struct AuditSlot {
    pub event: Value,
    pub committed: std::sync::atomic::AtomicBool,
}

impl AuditSlot {
    pub fn new(event: Value) -> AuditSlot {
        AuditSlot {
            event,
            committed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// What the consent checks of one interaction decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConsentSummary {
    /// The consent decision (`permit`, `deny`, `break-glass`), or none when no
    /// patient data under consent was involved.
    pub decision: Option<&'static str>,
    /// The ledger height of the consent state used.
    pub ledger_height: u64,
    /// Resources withheld from a search or history.
    pub withheld: usize,
    pub reasons: Vec<String>,
}

/// The outcome of the interaction.
#[derive(Debug, Clone)]
pub struct AuditOutcome {
    /// HTTP status.
    pub status: u16,
    pub description: Option<String>,
    /// Resources released or touched (`Type/id/_history/v`).
    pub resources: Vec<String>,
    /// Patients whose data was involved (`Patient/<id>`).
    pub patients: Vec<String>,
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// The AuditEvent for an interaction.
pub fn event(
    ctx: &AuditContext,
    outcome: &AuditOutcome,
    consent: &ConsentSummary,
    recorded: i64,
) -> Value {
    let (event_type, subtype) = if ctx.token {
        (
            coding(DCM, "110114", "User Authentication"),
            coding(DCM, "110122", "Login"),
        )
    } else {
        (
            coding(
                "http://terminology.hl7.org/CodeSystem/audit-event-type",
                "rest",
                "Restful Operation",
            ),
            json!({"system": "http://hl7.org/fhir/restful-interaction", "code": ctx.interaction}),
        )
    };
    let code = match outcome.status {
        0..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let client = ctx.client_id.clone().unwrap_or_else(|| "unknown".into());
    let mut client_agent = json!({
        "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": crate::consent::CLIENT_ID_SYSTEM, "value": client}},
        "requestor": ctx.user.is_none(),
    });
    if let Some(addr) = &ctx.peer_address {
        client_agent["network"] = json!({"address": addr, "type": "2"});
    }
    let mut agents = vec![client_agent];
    if let Some(user) = &ctx.user {
        let mut who = json!({"identifier": {"value": user}});
        if let Some(r) = &ctx.fhir_user {
            who["reference"] = json!(r);
        }
        let mut a = json!({
            "type": {"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient")]},
            "who": who,
            "altId": user,
            "requestor": true,
        });
        if let Some(p) = &ctx.purpose {
            a["purposeOfUse"] = json!([{"coding": [{"system": ACT_REASON, "code": p}]}]);
        }
        agents.push(a);
    }
    agents.push(json!({
        "type": {"coding": [coding(DCM, "110152", "Destination Role ID")]},
        "who": {"reference": ctx.organization},
        "requestor": false,
    }));
    let mut entities: Vec<Value> = Vec::new();
    for p in &outcome.patients {
        entities.push(patient_entity(p));
    }
    let mut resources: Vec<&String> = outcome.resources.iter().collect();
    if resources.is_empty() {
        resources.extend(ctx.target.iter());
    }
    for r in resources {
        entities.push(resource_entity(r));
    }
    if let Some(q) = &ctx.query {
        entities.push(json!({
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
            "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query"),
            "query": base64::engine::general_purpose::STANDARD.encode(q.as_bytes()),
        }));
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "type": event_type,
        "subtype": [subtype],
        "action": ctx.action,
        "recorded": format_instant(recorded),
        "outcome": code,
        "agent": agents,
        "source": {
            "observer": {"reference": ctx.organization},
            "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
        },
    });
    if let Some(d) = &outcome.description {
        ev["outcomeDesc"] = json!(d);
    }
    if let Some(p) = &ctx.purpose {
        ev["purposeOfEvent"] = json!([{"coding": [{"system": ACT_REASON, "code": p}]}]);
    }
    if !entities.is_empty() {
        ev["entity"] = json!(entities);
    }
    if let Some(decision) = consent.decision {
        let mut ext = vec![
            json!({"url": "decision", "valueCode": decision}),
            json!({"url": "ledgerHeight", "valueUnsignedInt": consent.ledger_height.min(i32::MAX as u64)}),
        ];
        if consent.withheld > 0 {
            ext.push(json!({"url": "withheld", "valueUnsignedInt": consent.withheld.min(i32::MAX as usize)}));
        }
        for r in consent.reasons.iter().take(20) {
            ext.push(json!({"url": "reason", "valueString": r}));
        }
        ev["extension"] = json!([{"url": DECISION_URL, "extension": ext}]);
        if decision == "break-glass" {
            ev["meta"] = json!({
                "security": [break_glass_label()],
                "tag": [coding(REVIEW_SYSTEM, "review-required", "break-the-glass access: review required")],
            });
        }
    }
    ev
}

fn patient_entity(p: &str) -> Value {
    json!({
        "what": {"reference": p},
        "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"),
        "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient"),
    })
}

fn resource_entity(r: &str) -> Value {
    json!({
        "what": {"reference": r},
        "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
        "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource"),
    })
}

/// Add the versions a submission wrote (and their patients) to its AuditEvent: called by the
/// commit thread, the only place that knows them.
pub fn add_written(event: &mut Value, applied: &[Applied]) {
    let mut entities: Vec<Value> = event
        .get("entity")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for a in applied {
        if !matches!(
            a.outcome,
            Outcome::Created | Outcome::Updated | Outcome::Deleted
        ) {
            continue;
        }
        for p in &a.patients {
            if !entities
                .iter()
                .any(|e| e["what"]["reference"] == p.as_str())
            {
                entities.push(patient_entity(p));
            }
        }
        entities.push(resource_entity(&format!(
            "{}/{}/_history/{}",
            a.rtype, a.id, a.version
        )));
    }
    if !entities.is_empty() {
        event["entity"] = json!(entities);
    }
}

/// Is this request's interaction a change to an AuditEvent (which the API refuses)?
pub fn is_audit_mutation(route: &crate::http::Route) -> bool {
    use crate::fhir::ResourceType::AuditEvent;
    use crate::http::Route::*;
    matches!(
        route,
        Update(AuditEvent, _)
            | Patch(AuditEvent, _)
            | Delete(AuditEvent, _)
            | ConditionalUpdate(AuditEvent)
            | ConditionalPatch(AuditEvent)
            | ConditionalDelete(AuditEvent)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::ResourceType;

    fn ctx() -> AuditContext {
        AuditContext {
            interaction: "read".into(),
            action: "R",
            client_id: Some("ehr".into()),
            user: Some("dr-who".into()),
            fhir_user: Some("Practitioner/d1".into()),
            organization: "Organization/replica-0".into(),
            peer_address: Some("127.0.0.1".into()),
            purpose: Some("TREAT".into()),
            query: Some("family=Smith".into()),
            target: Some("Patient/p1".into()),
            token: false,
        }
    }

    #[test]
    fn audit_events_are_valid_r4() {
        let profiles = std::sync::Arc::new(crate::profiles::Profiles::embedded().unwrap());
        let validator = crate::validate::Validator::new(profiles);
        let outcome = AuditOutcome {
            status: 200,
            description: None,
            resources: vec!["Patient/p1/_history/2".into()],
            patients: vec!["Patient/p1".into()],
        };
        let consent = ConsentSummary {
            decision: Some("break-glass"),
            ledger_height: 42,
            withheld: 1,
            reasons: vec!["denied by Consent/c1 provision".into()],
        };
        let ev = event(&ctx(), &outcome, &consent, 1_700_000_000_000);
        validator
            .validate(ResourceType::AuditEvent, &ev)
            .expect("valid");
        let mut token = ctx();
        token.token = true;
        token.user = None;
        let failed = AuditOutcome {
            status: 401,
            description: Some("bad password".into()),
            resources: vec![],
            patients: vec![],
        };
        let ev = event(&token, &failed, &ConsentSummary::default(), 0);
        validator
            .validate(ResourceType::AuditEvent, &ev)
            .expect("valid");
        assert_eq!(ev["outcome"], "4");
        assert_eq!(ev["agent"][0]["requestor"], true);
    }

    #[test]
    fn the_patient_entity_makes_it_searchable_by_patient() {
        let profiles = crate::profiles::Profiles::embedded().unwrap();
        let registry = crate::search::Registry::from_profiles(&profiles);
        let outcome = AuditOutcome {
            status: 200,
            description: None,
            resources: vec!["DocumentReference/d/_history/1".into()],
            patients: vec!["Patient/p1".into()],
        };
        let ev = event(
            &ctx(),
            &outcome,
            &ConsentSummary::default(),
            1_700_000_000_000,
        );
        assert_eq!(
            registry.patients_of(ResourceType::AuditEvent, "a", &ev, "http://x/fhir"),
            vec!["Patient/p1".to_string()]
        );
    }
}

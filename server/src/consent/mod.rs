//! Patient consent: what an R4 Consent (scope `patient-privacy`) decides, as a pure function.
//!
//! A Consent becomes a `ConsentPolicy` when its version is sealed into a ledger entry; every
//! replica applies it at the same ledger position (`store::txlog`), so every replica decides
//! with the same state. `decide` takes the policies in force for a patient and one request
//! and returns a `ConsentDecision` with its reasons. It reads no clock and no store.
//!
//! Semantics (R4 consent.html, "provision"): a provision applies to a request when every
//! constraint it states matches (actor, action, purpose, class, data, period); its nested
//! provisions are exceptions to it. Among provisions at the same level, and among a patient's
//! Consents, **deny wins**. Where no Consent says anything, the deployment's base policy
//! decides (opt-out: permit; opt-in: deny).
//!
//! Constraints this server cannot evaluate (security labels, `provision.code`, `dataPeriod`,
//! data meanings `dependents`/`authoredby`, classes that are not resource types) are read
//! conservatively: they are assumed to match a deny provision and never to match a permit.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod gate;

/// The consent-action codes (http://terminology.hl7.org/CodeSystem/consentaction).
pub const ACTION_ACCESS: &str = "access";

/// The system for client applications named as Consent actors by their OAuth client id.
pub const CLIENT_ID_SYSTEM: &str = "https://fhirmament.dev/fhir/sid/client-id";

/// The base policy of a deployment: what holds where no Consent provision applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BasePolicy {
    /// Share unless the patient denied it.
    OptOut,
    /// Share only what the patient permitted.
    OptIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Permit,
    Deny,
}

/// A Consent in force, as every replica keeps it on the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentPolicy {
    /// `Consent/<id>`.
    pub consent: String,
    /// `Patient/<id>`.
    pub patient: String,
    pub provision: Provision,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    /// None: the provision only narrows, and takes its parent's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    /// References (`Practitioner/1`, `Organization/x`, `client:<client id>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actors: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    /// v3-ActReason codes (TREAT, ETREAT, HPAYMT, HRESCH, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<String>,
    /// Resource types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Specific resources (`DocumentReference/5`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
    /// Epoch milliseconds, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
    /// States a constraint this server cannot evaluate (see the module documentation).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unsupported: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provisions: Vec<Provision>,
}

/// Who asks for what, and why.
#[derive(Debug, Clone, Default)]
pub struct AccessRequest {
    /// Everything the requester is, as references: the user (`fhirUser`), the
    /// organization whose node serves the request, the client (`client:<id>`).
    pub actors: Vec<String>,
    pub action: String,
    pub purpose: String,
    pub resource_type: String,
    /// `Type/id`.
    pub resource: String,
    /// Epoch milliseconds.
    pub now: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentDecision {
    pub permit: bool,
    /// Why, naming the Consents and provisions that decided (or the base policy).
    pub reasons: Vec<String>,
}

impl ConsentPolicy {
    /// The policy of a Consent version; None when it is not in force (not `active`, another
    /// scope than `patient-privacy`, no patient).
    pub fn from_resource(consent: &Value, base_url: &str) -> Option<ConsentPolicy> {
        if consent["status"] != "active" {
            return None;
        }
        let privacy = consent["scope"]["coding"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["code"] == "patient-privacy"));
        if !privacy {
            return None;
        }
        let patient = local_reference(consent["patient"]["reference"].as_str()?, base_url)?;
        if !patient.starts_with("Patient/") {
            return None;
        }
        let id = consent["id"].as_str()?;
        let mut provision = match consent.get("provision") {
            Some(p) => Provision::from_json(p, base_url),
            None => Provision::default(),
        };
        // A Consent without a stated base kind expresses agreement to what it states.
        provision.kind.get_or_insert(Kind::Permit);
        Some(ConsentPolicy {
            consent: format!("Consent/{id}"),
            patient,
            provision,
        })
    }
}

/// `Type/id` from a relative or absolute reference on this server; None otherwise.
fn local_reference(reference: &str, base_url: &str) -> Option<String> {
    let r = reference
        .strip_prefix(base_url)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(reference);
    let mut parts = r.split('/');
    match (parts.next(), parts.next()) {
        (Some(t), Some(id)) if !t.is_empty() && !id.is_empty() && !t.contains(':') => {
            Some(format!("{t}/{id}"))
        }
        _ => None,
    }
}

fn instant_ms(v: &Value) -> Option<i64> {
    crate::search::value::parse_date_range(v.as_str()?).map(|(lo, _)| lo)
}

fn instant_end_ms(v: &Value) -> Option<i64> {
    crate::search::value::parse_date_range(v.as_str()?).map(|(_, hi)| hi)
}

impl Provision {
    fn from_json(p: &Value, base_url: &str) -> Provision {
        let mut out = Provision {
            kind: match p["type"].as_str() {
                Some("permit") => Some(Kind::Permit),
                Some("deny") => Some(Kind::Deny),
                _ => None,
            },
            ..Provision::default()
        };
        for a in p["actor"].as_array().into_iter().flatten() {
            let r = &a["reference"];
            if let Some(local) = r["reference"]
                .as_str()
                .and_then(|s| local_reference(s, base_url))
            {
                out.actors.push(local);
            } else if r["identifier"]["system"] == CLIENT_ID_SYSTEM {
                if let Some(v) = r["identifier"]["value"].as_str() {
                    out.actors.push(format!("client:{v}"));
                }
            } else {
                out.unsupported = true;
            }
        }
        for a in p["action"].as_array().into_iter().flatten() {
            for c in a["coding"].as_array().into_iter().flatten() {
                if let Some(code) = c["code"].as_str() {
                    out.actions.push(code.to_string());
                }
            }
        }
        for c in p["purpose"].as_array().into_iter().flatten() {
            if let Some(code) = c["code"].as_str() {
                out.purposes.push(code.to_string());
            }
        }
        for c in p["class"].as_array().into_iter().flatten() {
            match (c["system"].as_str(), c["code"].as_str()) {
                (Some("http://hl7.org/fhir/resource-types"), Some(code)) => {
                    out.classes.push(code.to_string())
                }
                _ => out.unsupported = true,
            }
        }
        for d in p["data"].as_array().into_iter().flatten() {
            let meaning = d["meaning"].as_str().unwrap_or("instance");
            match d["reference"]["reference"]
                .as_str()
                .and_then(|s| local_reference(s, base_url))
            {
                Some(r) if meaning == "instance" || meaning == "related" => out.data.push(r),
                _ => out.unsupported = true,
            }
        }
        if let Some(period) = p.get("period") {
            out.start = period.get("start").and_then(instant_ms);
            out.end = period.get("end").and_then(instant_end_ms);
        }
        if p.get("securityLabel").is_some()
            || p.get("code").is_some()
            || p.get("dataPeriod").is_some()
        {
            out.unsupported = true;
        }
        for nested in p["provision"].as_array().into_iter().flatten() {
            out.provisions.push(Provision::from_json(nested, base_url));
        }
        out
    }

    /// Do the constraints this provision states hold for the request?
    fn applies(&self, req: &AccessRequest) -> bool {
        let any = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        (self.actors.is_empty() || self.actors.iter().any(|a| req.actors.contains(a)))
            && any(&self.actions, &req.action)
            && any(&self.purposes, &req.purpose)
            && any(&self.classes, &req.resource_type)
            && any(&self.data, &req.resource)
            && self.start.is_none_or(|s| req.now >= s)
            && self.end.is_none_or(|e| req.now <= e)
    }

    /// The kind this provision (with its exceptions) gives the request, if it applies.
    fn evaluate(&self, req: &AccessRequest, inherited: Kind, path: &str) -> Option<(Kind, String)> {
        let own = self.kind.unwrap_or(inherited);
        if !self.applies(req) || (self.unsupported && own == Kind::Permit) {
            return None;
        }
        let nested: Vec<(Kind, String)> = self
            .provisions
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.evaluate(req, own, &format!("{path}.provision[{i}]")))
            .collect();
        if let Some(deny) = nested.iter().find(|(k, _)| *k == Kind::Deny) {
            return Some(deny.clone());
        }
        if let Some(permit) = nested.into_iter().next() {
            return Some(permit);
        }
        Some((own, path.to_string()))
    }
}

/// The decision for one request under the Consents in force for the patient.
pub fn decide(
    policies: &[ConsentPolicy],
    base: BasePolicy,
    req: &AccessRequest,
) -> ConsentDecision {
    let mut permits = Vec::new();
    let mut denies = Vec::new();
    for p in policies {
        if let Some((kind, path)) = p.provision.evaluate(req, Kind::Permit, "provision") {
            let why = format!("{} {path}", p.consent);
            match kind {
                Kind::Deny => denies.push(why),
                Kind::Permit => permits.push(why),
            }
        }
    }
    if !denies.is_empty() {
        return ConsentDecision {
            permit: false,
            reasons: denies
                .into_iter()
                .map(|d| format!("denied by {d}"))
                .collect(),
        };
    }
    if !permits.is_empty() {
        return ConsentDecision {
            permit: true,
            reasons: permits
                .into_iter()
                .map(|p| format!("permitted by {p}"))
                .collect(),
        };
    }
    ConsentDecision {
        permit: base == BasePolicy::OptOut,
        reasons: vec![match base {
            BasePolicy::OptOut => "no consent provision applies; the base policy is opt-out".into(),
            BasePolicy::OptIn => {
                "no consent provision permits it; the base policy is opt-in".into()
            }
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "http://example.org/fhir";

    fn consent(id: &str, provision: Value) -> Value {
        json!({
            "resourceType": "Consent", "id": id, "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
            "provision": provision,
        })
    }

    fn policy(id: &str, provision: Value) -> ConsentPolicy {
        ConsentPolicy::from_resource(&consent(id, provision), BASE).expect("in force")
    }

    fn request(actor: &str, purpose: &str, resource: &str) -> AccessRequest {
        AccessRequest {
            actors: vec![
                actor.to_string(),
                "Organization/org-a".into(),
                "client:ehr".into(),
            ],
            action: ACTION_ACCESS.into(),
            purpose: purpose.into(),
            resource_type: resource.split('/').next().unwrap().into(),
            resource: resource.into(),
            now: 1_700_000_000_000,
        }
    }

    fn permits(ps: &[ConsentPolicy], base: BasePolicy, r: &AccessRequest) -> bool {
        decide(ps, base, r).permit
    }

    #[test]
    fn without_consents_the_base_policy_decides() {
        let r = request("Practitioner/d1", "TREAT", "Patient/p1");
        assert!(permits(&[], BasePolicy::OptOut, &r));
        assert!(!permits(&[], BasePolicy::OptIn, &r));
        assert!(decide(&[], BasePolicy::OptIn, &r).reasons[0].contains("opt-in"));
    }

    #[test]
    fn only_active_patient_privacy_consents_are_in_force() {
        let mut c = consent("c1", json!({"type": "deny"}));
        assert!(ConsentPolicy::from_resource(&c, BASE).is_some());
        c["status"] = json!("inactive");
        assert!(ConsentPolicy::from_resource(&c, BASE).is_none());
        let mut c = consent("c1", json!({"type": "deny"}));
        c["scope"]["coding"][0]["code"] = json!("research");
        assert!(ConsentPolicy::from_resource(&c, BASE).is_none());
        let mut c = consent("c1", json!({"type": "deny"}));
        c["patient"] = json!({"reference": format!("{BASE}/Patient/p9")});
        assert_eq!(
            ConsentPolicy::from_resource(&c, BASE).unwrap().patient,
            "Patient/p9"
        );
        c.as_object_mut().unwrap().remove("patient");
        assert!(ConsentPolicy::from_resource(&c, BASE).is_none());
    }

    #[test]
    fn opt_in_with_a_permit_for_one_practitioner() {
        let p = policy(
            "c1",
            json!({"type": "deny", "provision": [{"type": "permit", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/d1"}}]}]}),
        );
        for base in [BasePolicy::OptIn, BasePolicy::OptOut] {
            assert!(permits(
                std::slice::from_ref(&p),
                base,
                &request("Practitioner/d1", "TREAT", "Patient/p1")
            ));
            assert!(!permits(
                std::slice::from_ref(&p),
                base,
                &request("Practitioner/d2", "TREAT", "Patient/p1")
            ));
        }
        let d = decide(
            &[p],
            BasePolicy::OptIn,
            &request("Practitioner/d1", "TREAT", "Patient/p1"),
        );
        assert_eq!(
            d.reasons,
            vec!["permitted by Consent/c1 provision.provision[0]"]
        );
    }

    #[test]
    fn actors_match_organizations_clients_and_absolute_references() {
        let by_org = policy(
            "c1",
            json!({"type": "deny", "actor": [{"role": {"coding": [{"code": "IRCP"}]}, "reference": {"reference": format!("{BASE}/Organization/org-a")}}]}),
        );
        let r = request("Practitioner/d1", "TREAT", "Patient/p1");
        assert!(!permits(
            std::slice::from_ref(&by_org),
            BasePolicy::OptOut,
            &r
        ));
        let mut other = r.clone();
        other.actors[1] = "Organization/org-b".into();
        assert!(permits(&[by_org], BasePolicy::OptOut, &other));
        let by_client = policy(
            "c2",
            json!({"type": "deny", "actor": [{"role": {"coding": [{"code": "IRCP"}]}, "reference": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": "ehr"}}}]}),
        );
        assert!(!permits(&[by_client.clone()], BasePolicy::OptOut, &r));
        let mut app = r.clone();
        app.actors[2] = "client:other-app".into();
        assert!(permits(&[by_client], BasePolicy::OptOut, &app));
    }

    #[test]
    fn a_deny_on_one_document_hides_just_that_one() {
        let p = policy(
            "c1",
            json!({"type": "permit", "provision": [{"type": "deny", "data": [{"meaning": "instance", "reference": {"reference": "DocumentReference/secret"}}]}]}),
        );
        let ps = [p];
        assert!(!permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d1", "TREAT", "DocumentReference/secret")
        ));
        assert!(permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d1", "TREAT", "DocumentReference/other")
        ));
        assert!(permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d1", "TREAT", "Patient/p1")
        ));
    }

    #[test]
    fn purpose_of_use_narrows_a_provision() {
        let p = policy(
            "c1",
            json!({"type": "deny", "provision": [{"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}, {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT"}]}]}),
        );
        let ps = [p];
        for (purpose, ok) in [
            ("TREAT", true),
            ("ETREAT", true),
            ("HPAYMT", false),
            ("HRESCH", false),
        ] {
            assert_eq!(
                permits(
                    &ps,
                    BasePolicy::OptOut,
                    &request("Practitioner/d1", purpose, "Patient/p1")
                ),
                ok,
                "{purpose}"
            );
        }
    }

    #[test]
    fn classes_periods_and_actions() {
        let p = policy(
            "c1",
            json!({"type": "permit", "provision": [
                {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}], "period": {"start": "2023-01-01", "end": "2023-12-31"}},
                {"type": "deny", "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "correct"}]}]}
            ]}),
        );
        let ps = [p];
        let mut r = request("Practitioner/d1", "TREAT", "DocumentReference/x");
        r.now = 1_690_000_000_000; // 2023-07-22
        assert!(!permits(&ps, BasePolicy::OptIn, &r));
        r.now = 1_710_000_000_000; // 2024-03-09
        assert!(permits(&ps, BasePolicy::OptIn, &r));
        r.now = 1_690_000_000_000;
        r.resource_type = "Patient".into();
        r.resource = "Patient/p1".into();
        assert!(permits(&ps, BasePolicy::OptIn, &r));
        r.action = "correct".into();
        assert!(!permits(&ps, BasePolicy::OptIn, &r));
    }

    #[test]
    fn deny_wins_across_consents_and_siblings() {
        let permit_all = policy("c1", json!({"type": "permit"}));
        let deny_all = policy("c2", json!({"type": "deny"}));
        let r = request("Practitioner/d1", "TREAT", "Patient/p1");
        assert!(!permits(
            &[permit_all.clone(), deny_all.clone()],
            BasePolicy::OptOut,
            &r
        ));
        assert!(!permits(&[deny_all, permit_all], BasePolicy::OptOut, &r));
        let siblings = policy(
            "c3",
            json!({"type": "deny", "provision": [
                {"type": "permit", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/d1"}}]},
                {"type": "deny", "purpose": [{"code": "TREAT"}]}
            ]}),
        );
        let d = decide(&[siblings], BasePolicy::OptOut, &r);
        assert!(!d.permit);
        assert_eq!(
            d.reasons,
            vec!["denied by Consent/c3 provision.provision[1]"]
        );
    }

    #[test]
    fn nested_exceptions_alternate() {
        // Permit all, except DocumentReferences, except for Dr. d1 (who may see them).
        let p = policy(
            "c1",
            json!({"type": "permit", "provision": [{"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}],
                "provision": [{"type": "permit", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/d1"}}]}]}]}),
        );
        let ps = [p];
        assert!(permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d1", "TREAT", "DocumentReference/x")
        ));
        assert!(!permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d2", "TREAT", "DocumentReference/x")
        ));
        assert!(permits(
            &ps,
            BasePolicy::OptIn,
            &request("Practitioner/d2", "TREAT", "Patient/p1")
        ));
    }

    #[test]
    fn constraints_it_cannot_evaluate_never_widen_access() {
        let labelled_permit = policy(
            "c1",
            json!({"type": "deny", "provision": [{"type": "permit", "securityLabel": [{"code": "R"}]}]}),
        );
        let labelled_deny = policy(
            "c2",
            json!({"type": "permit", "provision": [{"type": "deny", "class": [{"system": "urn:other", "code": "x"}]}]}),
        );
        let r = request("Practitioner/d1", "TREAT", "Patient/p1");
        assert!(!permits(&[labelled_permit], BasePolicy::OptOut, &r));
        assert!(!permits(&[labelled_deny], BasePolicy::OptOut, &r));
    }

    #[test]
    fn the_policy_round_trips_through_its_ledger_form() {
        let p = policy(
            "c1",
            json!({"type": "deny", "period": {"start": "2020-01-01T00:00:00Z"}, "provision": [{"type": "permit", "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/d1"}}], "purpose": [{"code": "TREAT"}]}]}),
        );
        let bytes = serde_json::to_vec(&p).unwrap();
        assert_eq!(serde_json::from_slice::<ConsentPolicy>(&bytes).unwrap(), p);
    }

    proptest::proptest! {
        /// Adding a deny-everything Consent never permits anything more, whatever else holds.
        #[test]
        fn a_blanket_deny_always_denies(purpose in "(TREAT|ETREAT|HPAYMT|HRESCH)", actor in "Practitioner/d[0-9]", opt_in: bool) {
            let base = if opt_in { BasePolicy::OptIn } else { BasePolicy::OptOut };
            let permit = policy("c1", json!({"type": "permit"}));
            let deny = policy("c2", json!({"type": "deny"}));
            let r = request(&actor, &purpose, "Patient/p1");
            proptest::prop_assert!(!decide(&[permit, deny], base, &r).permit);
        }
    }
}

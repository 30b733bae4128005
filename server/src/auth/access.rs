//! Enforcement of a token's scopes: the one place that decides whether a request may touch
//! a resource type with a permission, and which resources it may then see.
//!
//! - A `user/` or `system/` scope for the type and permission: any resource of that type.
//! - Only `patient/` scopes: resources in the token's patient's compartment (Patient: the
//!   patient itself; others: the CompartmentDefinition's parameters point at the patient).
//! - Granular scopes (`?category=...`): only resources matching the query.
//!
//! Searches are narrowed by adding the same restrictions as clauses, so totals and paging stay
//! right; reads, writes, history and included resources are checked resource by resource.

use serde_json::Value;

use super::scopes::{Context, Perm};
use super::Grant;
use crate::error::{Error, Result};
use crate::fhir::ResourceType;
use crate::search::query::{self, SearchQuery};
use crate::search::{exec, Registry};

/// What a grant allows for one type and permission.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restriction {
    /// Only this patient's compartment.
    pub patient: Option<String>,
    /// Only resources matching one of these queries (granular scopes).
    pub queries: Vec<Vec<(String, String)>>,
}

fn forbidden(grant: &Grant, rtype: ResourceType, perm: Perm) -> Error {
    Error::Forbidden(format!(
        "the token's scopes ({}) do not allow {} on {rtype}",
        grant.scope,
        super::scopes::perms_text(&[perm])
    ))
}

/// May this grant use `perm` on `rtype`, and within what?
pub fn restriction(grant: &Grant, rtype: ResourceType, perm: Perm) -> Result<Restriction> {
    let matching: Vec<_> = grant
        .scopes
        .iter()
        .filter(|s| s.allows(rtype, perm))
        .collect();
    if matching.is_empty() {
        return Err(forbidden(grant, rtype, perm));
    }
    let unrestricted = |s: &&super::scopes::ResourceScope| s.query.is_empty();
    if matching
        .iter()
        .any(|s| s.context != Context::Patient && unrestricted(s))
    {
        return Ok(Restriction::default());
    }
    let patient = if matching.iter().all(|s| s.context == Context::Patient) {
        Some(grant.patient.clone().ok_or_else(|| {
            Error::Forbidden(
                "patient/ scopes need a patient in context; this token has none".into(),
            )
        })?)
    } else {
        None
    };
    let queries = if matching.iter().any(unrestricted) {
        Vec::new()
    } else {
        matching.iter().map(|s| s.query.clone()).collect()
    };
    Ok(Restriction { patient, queries })
}

/// AuditEvents are read by the patient they concern (patient/ scopes, narrowed to the
/// patient's compartment) and by administrators and audit services (system/ scopes); a
/// clinician's user/ scopes do not reach them.
pub fn check_audit_reader(grant: &Grant) -> Result<()> {
    let reader = grant.scopes.iter().any(|s| {
        (s.allows(ResourceType::AuditEvent, Perm::R) || s.allows(ResourceType::AuditEvent, Perm::S))
            && s.context != Context::User
    });
    if reader {
        Ok(())
    } else {
        Err(Error::Forbidden(
            "AuditEvents are visible to the patient they concern (patient/ scopes) and to administrators (system/ scopes)".into(),
        ))
    }
}

/// Narrow a search to what the restriction allows.
pub fn narrow(registry: &Registry, q: &mut SearchQuery, r: &Restriction) -> Result<()> {
    if let Some(pid) = &r.patient {
        query::add_patient_compartment(registry, q, pid)?;
    }
    match r.queries.as_slice() {
        [] => {}
        [one] => {
            let extra = query::parse(registry, q.rtype, one, false)?;
            q.clauses.extend(extra.clauses);
        }
        several => {
            // Several granular scopes are alternatives: one clause whose values are OR-ed works
            // when they all constrain the same single parameter.
            let name = several[0].first().map(|(k, _)| k.clone());
            let same = several
                .iter()
                .all(|s| s.len() == 1 && Some(&s[0].0) == name.as_ref());
            if !same {
                return Err(Error::Forbidden(
                    "these granular scopes cannot be combined in one search; ask for one".into(),
                ));
            }
            let values: Vec<String> = several.iter().map(|s| s[0].1.replace(',', "\\,")).collect();
            let pair = vec![(name.unwrap_or_default(), values.join(","))];
            let extra = query::parse(registry, q.rtype, &pair, false)?;
            q.clauses.extend(extra.clauses);
        }
    }
    Ok(())
}

/// Is this resource within the restriction?
pub fn visible(
    registry: &Registry,
    base: &str,
    rtype: ResourceType,
    resource: &Value,
    r: &Restriction,
) -> Result<bool> {
    if r == &Restriction::default() {
        return Ok(true);
    }
    let mut q = query::parse(registry, rtype, &[], false)?;
    narrow(registry, &mut q, r)?;
    Ok(exec::resource_matches(
        &q,
        resource,
        base,
        crate::fhir::now_ms(),
    ))
}

/// `restriction` then `visible`, as a 403 when the resource is outside.
pub fn check_resource(
    registry: &Registry,
    base: &str,
    grant: &Grant,
    rtype: ResourceType,
    perm: Perm,
    resource: &Value,
) -> Result<()> {
    let r = restriction(grant, rtype, perm)?;
    if visible(registry, base, rtype, resource, &r)? {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "this {rtype} is outside what the token's scopes allow{}",
            r.patient
                .map(|p| format!(" (the compartment of Patient/{p})"))
                .unwrap_or_default()
        )))
    }
}

/// Every served type with `perm` unrestricted (type-independent interactions such as system
/// history need this).
pub fn require_all_types(grant: &Grant, perm: Perm) -> Result<()> {
    for t in ResourceType::ALL {
        if restriction(grant, t, perm)? != Restriction::default() {
            return Err(Error::Forbidden(format!(
                "this interaction spans every resource type; the token's scopes restrict {t}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::Profiles;
    use serde_json::json;

    fn grant(scope: &str, patient: Option<&str>) -> Grant {
        Grant::new("c", "s", scope, patient.map(str::to_string), None, "j")
    }

    #[test]
    fn patient_scopes_confine_to_the_compartment() {
        let reg = Registry::from_profiles(&Profiles::embedded().unwrap());
        let base = "http://x/fhir";
        let g = grant("launch/patient patient/*.rs", Some("a"));
        let pa = json!({"resourceType": "Patient", "id": "a"});
        let pb = json!({"resourceType": "Patient", "id": "b"});
        let da = json!({"resourceType": "DocumentReference", "id": "d1", "status": "current", "subject": {"reference": "Patient/a"}});
        let db = json!({"resourceType": "DocumentReference", "id": "d2", "status": "current", "subject": {"reference": "Patient/b"}});
        assert!(check_resource(&reg, base, &g, ResourceType::Patient, Perm::R, &pa).is_ok());
        assert!(check_resource(&reg, base, &g, ResourceType::Patient, Perm::R, &pb).is_err());
        assert!(check_resource(
            &reg,
            base,
            &g,
            ResourceType::DocumentReference,
            Perm::R,
            &da
        )
        .is_ok());
        assert!(check_resource(
            &reg,
            base,
            &g,
            ResourceType::DocumentReference,
            Perm::R,
            &db
        )
        .is_err());
        // No write scope at all.
        assert!(restriction(&g, ResourceType::Patient, Perm::U).is_err());
        // A patient scope without a patient in context allows nothing.
        assert!(restriction(&grant("patient/*.rs", None), ResourceType::Patient, Perm::R).is_err());
    }

    #[test]
    fn user_and_system_scopes_are_type_wide_and_granular_scopes_filter() {
        let reg = Registry::from_profiles(&Profiles::embedded().unwrap());
        let base = "http://x/fhir";
        let g = grant(
            "user/DocumentReference.rs?status=current patient/Patient.r",
            Some("a"),
        );
        let cur = json!({"resourceType": "DocumentReference", "status": "current", "content": []});
        let old =
            json!({"resourceType": "DocumentReference", "status": "superseded", "content": []});
        assert!(check_resource(
            &reg,
            base,
            &g,
            ResourceType::DocumentReference,
            Perm::S,
            &cur
        )
        .is_ok());
        assert!(check_resource(
            &reg,
            base,
            &g,
            ResourceType::DocumentReference,
            Perm::S,
            &old
        )
        .is_err());
        let sys = grant("system/*.cruds", None);
        assert_eq!(
            restriction(&sys, ResourceType::Consent, Perm::D).unwrap(),
            Restriction::default()
        );
        assert!(require_all_types(&sys, Perm::S).is_ok());
        assert!(require_all_types(&grant("system/Patient.rs", None), Perm::S).is_err());
    }
}

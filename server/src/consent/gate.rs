//! The consent checks of one interaction: who asks (from the token) and why, the ledger's
//! consent state at one height, and what was permitted, withheld or released by
//! break-the-glass, for the interaction's AuditEvent.

use std::collections::HashMap;

use super::{decide, AccessRequest, BasePolicy, ConsentPolicy, ACTION_ACCESS};
use crate::audit::ConsentSummary;
use crate::auth::Grant;
use crate::error::Result;
use crate::fhir::ResourceType;
use crate::store::Store;

/// How a deployment applies consent.
#[derive(Debug, Clone)]
pub struct ConsentSettings {
    pub base: BasePolicy,
    /// May practitioners override a deny with purpose of use ETREAT?
    pub break_glass: bool,
    /// This node's organization (`Organization/<id>`), a Consent actor.
    pub organization: String,
}

/// The purpose of use assumed when a request states none.
pub const DEFAULT_PURPOSE: &str = "TREAT";
pub const EMERGENCY_PURPOSE: &str = "ETREAT";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Permit,
    Deny(Vec<String>),
    /// Denied, released by break-the-glass.
    Override(Vec<String>),
}

pub struct ConsentGate<'a> {
    store: &'a Store,
    settings: &'a ConsentSettings,
    actors: Vec<String>,
    purpose: String,
    /// The patient the user is (a patient reads their own data without consent checks).
    own_patient: Option<String>,
    may_break_glass: bool,
    /// For whom this node asks when it fetches a version another organization holds.
    acting: crate::ledger::peer::Acting,
    now: i64,
    /// False when nothing can be denied (no Consent in force and an opt-out base); read from
    /// the store at the first check, so interactions that release nothing pay nothing.
    active: Option<bool>,
    policies: HashMap<String, Vec<ConsentPolicy>>,
    summary: ConsentSummary,
}

impl<'a> ConsentGate<'a> {
    /// The gate for a request; `grant` None for node-to-node and unauthenticated requests,
    /// whose actors are only the organization.
    pub fn new(
        store: &'a Store,
        settings: &'a ConsentSettings,
        grant: Option<&Grant>,
        purpose: Option<&str>,
        organization: &str,
        now: i64,
    ) -> ConsentGate<'a> {
        let mut actors = vec![organization.to_string()];
        let acting = crate::ledger::peer::Acting::of(grant, purpose);
        let mut own_patient = None;
        let mut practitioner = false;
        if let Some(g) = grant {
            actors.push(format!("client:{}", g.client_id));
            if let Some(u) = &g.fhir_user {
                actors.push(u.clone());
                if u.starts_with("Patient/") {
                    own_patient = Some(u.clone());
                }
                practitioner = u.starts_with("Practitioner/") || u.starts_with("PractitionerRole/");
            }
        }
        let purpose = purpose.unwrap_or(DEFAULT_PURPOSE).to_string();
        let may_break_glass = settings.break_glass && practitioner && purpose == EMERGENCY_PURPOSE;
        ConsentGate {
            store,
            settings,
            actors,
            purpose,
            own_patient,
            may_break_glass,
            acting,
            now,
            active: None,
            policies: HashMap::new(),
            summary: ConsentSummary::default(),
        }
    }

    /// Can anything be denied? Fixes the consent state's ledger height for this interaction.
    fn active(&mut self) -> Result<bool> {
        if let Some(a) = self.active {
            return Ok(a);
        }
        self.summary.ledger_height = self.store.applied()?.0;
        let a = self.settings.base == BasePolicy::OptIn || self.store.any_consent()?;
        self.active = Some(a);
        Ok(a)
    }

    /// May the requester read this resource, which belongs to these patient compartments?
    pub fn check(&mut self, rtype: ResourceType, id: &str, patients: &[String]) -> Result<Verdict> {
        if matches!(rtype, ResourceType::Consent | ResourceType::AuditEvent)
            || patients.is_empty()
            || !self.active()?
        {
            return Ok(Verdict::Permit);
        }
        let req = AccessRequest {
            actors: self.actors.clone(),
            action: ACTION_ACCESS.into(),
            purpose: self.purpose.clone(),
            resource_type: rtype.to_string(),
            resource: format!("{rtype}/{id}"),
            now: self.now,
        };
        let mut denied = Vec::new();
        let mut permitted = Vec::new();
        for p in patients {
            if self.own_patient.as_deref() == Some(p.as_str()) {
                continue;
            }
            if !self.policies.contains_key(p) {
                let ps = self
                    .store
                    .consent_policies(p)?
                    .into_iter()
                    .map(|(_, p)| p)
                    .collect();
                self.policies.insert(p.clone(), ps);
            }
            let d = decide(&self.policies[p], self.settings.base, &req);
            if d.permit {
                permitted.extend(d.reasons);
            } else {
                denied.extend(d.reasons);
            }
        }
        let verdict = if denied.is_empty() {
            if self.summary.decision.is_none() && !permitted.is_empty() {
                self.summary.decision = Some("permit");
            }
            if self.summary.reasons.len() < 20 {
                self.summary.reasons.extend(permitted);
            }
            Verdict::Permit
        } else if self.may_break_glass {
            self.summary.decision = Some("break-glass");
            self.summary.reasons.extend(denied.clone());
            Verdict::Override(denied)
        } else {
            if self.summary.decision != Some("break-glass") {
                self.summary.decision = Some("deny");
            }
            self.summary.withheld += 1;
            if self.summary.reasons.len() < 20 {
                self.summary.reasons.extend(denied.clone());
            }
            Verdict::Deny(denied)
        };
        Ok(verdict)
    }

    /// `check` for a resource whose compartments the ledger records (its current version).
    pub fn check_current(&mut self, rtype: ResourceType, id: &str) -> Result<Verdict> {
        if matches!(rtype, ResourceType::Consent | ResourceType::AuditEvent) || !self.active()? {
            return Ok(Verdict::Permit);
        }
        let patients = self.store.ledger_patients(rtype, id)?;
        self.check(rtype, id, &patients)
    }

    /// On whose behalf this interaction fetches versions other organizations hold.
    pub fn acting(&self) -> crate::ledger::peer::Acting {
        self.acting.clone()
    }

    /// What the checks decided, for the AuditEvent.
    pub fn summary(&self) -> ConsentSummary {
        self.summary.clone()
    }
}

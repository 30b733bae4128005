//! The CapabilityStatement, generated from what the server actually offers: the served types,
//! the interactions the route table answers, and the search parameters the registry built.

use serde_json::{json, Value};

use crate::fhir::{format_instant, ResourceType};
use crate::Service;

pub fn statement(svc: &Service) -> Value {
    let resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|t| {
            let params: Vec<Value> = svc
                .registry
                .params(*t)
                .map(|p| json!({"name": p.code, "definition": p.url, "type": p.kind.as_str(), "documentation": p.expression_text}))
                .collect();
            let includes: Vec<Value> = svc
                .registry
                .params(*t)
                .filter(|p| p.kind == crate::search::ParamKind::Reference)
                .map(|p| json!(format!("{t}:{}", p.code)))
                .collect();
            let revincludes: Vec<Value> = ResourceType::ALL
                .iter()
                .flat_map(|src| {
                    svc.registry
                        .params(*src)
                        .filter(|p| p.kind == crate::search::ParamKind::Reference && (p.targets.is_empty() || p.targets.iter().any(|x| x == t.as_str())))
                        .map(move |p| json!(format!("{src}:{}", p.code)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let interactions: Vec<Value> = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
                .iter()
                .map(|c| json!({"code": c}))
                .collect();
            let mut operations = vec![
                json!({"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}),
                json!({"name": "verify", "definition": "https://fhirmament.dev/OperationDefinition/verify",
                 "documentation": "GET [type]/[id](/_history/[vid])/$verify: a Parameters receipt proving the version against the consortium ledger (entry, Merkle proofs, 2f+1 signatures); check it offline with `fhirmament verify`"}),
            ];
            if *t == ResourceType::Patient {
                operations.push(json!({"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "GET Patient/[id]/$everything (_type, _since): the patient and their compartment across the consortium, as scopes and Consents allow"}));
            }
            json!({
                "type": t.as_str(),
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{t}"),
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchInclude": includes,
                "searchRevInclude": revincludes,
                "searchParam": params,
                "operation": operations,
            })
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(crate::fhir::now_ms()),
        "publisher": "Fhirmament",
        "kind": "instance",
        "software": {"name": "Fhirmament", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Fhirmament FHIR R4 server", "url": svc.config.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Unknown search parameters are rejected with 400 unless the request says Prefer: handling=lenient.",
            "security": {
                "cors": true,
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR"
                }]}],
                "description": "SMART App Launch 2.x: see .well-known/smart-configuration. Every interaction but this CapabilityStatement needs a bearer token.",
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [
                        {"url": "authorize", "valueUri": svc.auth.endpoint("authorize")},
                        {"url": "token", "valueUri": svc.auth.endpoint("token")},
                        {"url": "introspect", "valueUri": svc.auth.endpoint("introspect")},
                        {"url": "revoke", "valueUri": svc.auth.endpoint("revoke")}
                    ]
                }]
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
        }],
    })
}

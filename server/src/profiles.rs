//! FHIR knowledge that is data: the official R4 JSON schema, StructureDefinitions,
//! SearchParameters and the Patient CompartmentDefinition, from `profiles/`.
//!
//! The files are embedded at build time so `fhirmament serve` runs from anywhere; an operator
//! can point `--profiles DIR` at another copy (for example to add search parameters) and that
//! copy is loaded at start instead.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::fhir::ResourceType;

const EMBEDDED_SCHEMA: &str = include_str!("../../profiles/fhir.schema.json");
const EMBEDDED_SEARCH_PARAMETERS: &str = include_str!("../../profiles/search-parameters.json");
const EMBEDDED_COMPARTMENT: &str = include_str!("../../profiles/compartment-patient.json");
const EMBEDDED_STRUCTURE_DEFINITIONS: [(&str, &str); 4] = [
    (
        "Patient",
        include_str!("../../profiles/structure-definitions/Patient.json"),
    ),
    (
        "Consent",
        include_str!("../../profiles/structure-definitions/Consent.json"),
    ),
    (
        "DocumentReference",
        include_str!("../../profiles/structure-definitions/DocumentReference.json"),
    ),
    (
        "AuditEvent",
        include_str!("../../profiles/structure-definitions/AuditEvent.json"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("profile file {path} is not valid JSON: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("profile file {path}: {message}")]
    Shape { path: String, message: String },
}

/// One element of a StructureDefinition snapshot, reduced to what validation and
/// `_summary` need.
#[derive(Debug, Clone)]
pub struct ElementDefinition {
    /// Path below the resource, e.g. `["provision", "actor", "role"]`.
    pub path: Vec<String>,
    pub min: u32,
    pub is_summary: bool,
    /// Resource types a Reference here may point to; empty means any.
    pub reference_targets: Vec<String>,
    /// `max` is "1".
    pub max_one: bool,
    /// The element's type codes (`date`, `Period`, …).
    pub types: Vec<String>,
}

#[derive(Debug)]
pub struct Profiles {
    pub schema: Value,
    /// SearchParameter resources whose base includes a served type, Resource or DomainResource.
    pub search_parameters: Vec<Value>,
    /// Patient compartment: resource type -> the search parameters that link it to a Patient.
    pub patient_compartment: BTreeMap<String, Vec<String>>,
    pub elements: BTreeMap<ResourceType, Vec<ElementDefinition>>,
}

fn parse(path: &str, text: &str) -> Result<Value, ProfileError> {
    serde_json::from_str(text).map_err(|source| ProfileError::Parse {
        path: path.to_string(),
        source,
    })
}

fn read(dir: &Path, name: &str) -> Result<(String, String), ProfileError> {
    let path = dir.join(name);
    let shown = path.display().to_string();
    std::fs::read_to_string(&path)
        .map(|t| (shown.clone(), t))
        .map_err(|source| ProfileError::Read {
            path: shown,
            source,
        })
}

impl Profiles {
    pub fn embedded() -> Result<Profiles, ProfileError> {
        let sds = EMBEDDED_STRUCTURE_DEFINITIONS
            .iter()
            .map(|(t, text)| {
                Ok((
                    format!("embedded:structure-definitions/{t}.json"),
                    parse(t, text)?,
                ))
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        Self::build(
            parse("embedded:fhir.schema.json", EMBEDDED_SCHEMA)?,
            (
                "embedded:search-parameters.json",
                parse("search-parameters.json", EMBEDDED_SEARCH_PARAMETERS)?,
            ),
            (
                "embedded:compartment-patient.json",
                parse("compartment-patient.json", EMBEDDED_COMPARTMENT)?,
            ),
            sds,
        )
    }

    pub fn load(dir: &Path) -> Result<Profiles, ProfileError> {
        let (p, t) = read(dir, "fhir.schema.json")?;
        let schema = parse(&p, &t)?;
        let (sp_path, t) = read(dir, "search-parameters.json")?;
        let sps = parse(&sp_path, &t)?;
        let (cp_path, t) = read(dir, "compartment-patient.json")?;
        let cp = parse(&cp_path, &t)?;
        let mut sds = Vec::new();
        for rt in ResourceType::ALL {
            let (p, t) = read(dir, &format!("structure-definitions/{rt}.json"))?;
            sds.push((p.clone(), parse(&p, &t)?));
        }
        Self::build(schema, (&sp_path, sps), (&cp_path, cp), sds)
    }

    fn build(
        schema: Value,
        (sp_path, search_bundle): (&str, Value),
        (cp_path, compartment): (&str, Value),
        structure_definitions: Vec<(String, Value)>,
    ) -> Result<Profiles, ProfileError> {
        let shape = |path: &str, message: &str| ProfileError::Shape {
            path: path.to_string(),
            message: message.to_string(),
        };
        if schema.pointer("/definitions/Patient").is_none() {
            return Err(shape(
                "fhir.schema.json",
                "has no definitions/Patient: not the FHIR R4 JSON schema",
            ));
        }
        let entries = search_bundle["entry"]
            .as_array()
            .ok_or_else(|| shape(sp_path, "not a Bundle with entries"))?;
        let search_parameters = entries
            .iter()
            .filter_map(|e| e.get("resource"))
            .filter(|r| r["resourceType"] == "SearchParameter")
            .cloned()
            .collect::<Vec<_>>();

        let mut patient_compartment = BTreeMap::new();
        for res in compartment["resource"]
            .as_array()
            .ok_or_else(|| shape(cp_path, "has no resource list"))?
        {
            let (Some(code), Some(params)) = (res["code"].as_str(), res["param"].as_array()) else {
                continue;
            };
            let params: Vec<String> = params
                .iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect();
            if !params.is_empty() {
                patient_compartment.insert(code.to_string(), params);
            }
        }

        let mut elements = BTreeMap::new();
        for (path, sd) in structure_definitions {
            let rtype: ResourceType = sd["type"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| {
                    shape(
                        &path,
                        "StructureDefinition.type is not a served resource type",
                    )
                })?;
            let snapshot = sd
                .pointer("/snapshot/element")
                .and_then(Value::as_array)
                .ok_or_else(|| shape(&path, "has no snapshot"))?;
            let defs = snapshot
                .iter()
                .filter_map(|e| {
                    let full = e["path"].as_str()?;
                    let mut segments: Vec<String> = full.split('.').map(str::to_string).collect();
                    segments.remove(0);
                    if segments.is_empty() {
                        return None;
                    }
                    let reference_targets = e["type"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|t| t["code"] == "Reference")
                        .flat_map(|t| t["targetProfile"].as_array().cloned().unwrap_or_default())
                        .filter_map(|p| {
                            p.as_str()
                                .and_then(|p| p.rsplit('/').next())
                                .map(str::to_string)
                        })
                        .filter(|t| t != "Resource")
                        .collect();
                    Some(ElementDefinition {
                        max_one: e["max"] == "1",
                        types: e["type"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|t| t["code"].as_str().map(str::to_string))
                            .collect(),
                        path: segments,
                        min: e["min"].as_u64().unwrap_or(0) as u32,
                        is_summary: e["isSummary"].as_bool().unwrap_or(false),
                        reference_targets,
                    })
                })
                .collect();
            elements.insert(rtype, defs);
        }
        for rt in ResourceType::ALL {
            if !elements.contains_key(&rt) {
                return Err(shape(
                    "structure-definitions",
                    &format!("no StructureDefinition for {rt}"),
                ));
            }
        }
        Ok(Profiles {
            schema,
            search_parameters,
            patient_compartment,
            elements,
        })
    }

    /// Top-level elements marked `isSummary` for a type (for `_summary=true`).
    pub fn summary_elements(&self, rtype: ResourceType) -> Vec<String> {
        self.elements[&rtype]
            .iter()
            .filter(|e| e.path.len() == 1 && e.is_summary)
            .map(|e| e.path[0].clone())
            .collect()
    }

    /// Top-level elements with min >= 1 (kept by `_elements` and `_summary`).
    pub fn mandatory_elements(&self, rtype: ResourceType) -> Vec<String> {
        self.elements[&rtype]
            .iter()
            .filter(|e| e.path.len() == 1 && e.min >= 1)
            .map(|e| e.path[0].clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profiles_load_and_cover_every_served_type() {
        let p = Profiles::embedded().unwrap();
        assert!(p.search_parameters.len() > 80);
        assert_eq!(
            p.patient_compartment["Consent"],
            vec!["patient".to_string()]
        );
        assert!(p.patient_compartment["DocumentReference"].contains(&"subject".to_string()));
        let summary = p.summary_elements(ResourceType::Patient);
        assert!(
            summary.contains(&"name".to_string()) && summary.contains(&"birthDate".to_string())
        );
        assert!(!summary.contains(&"photo".to_string()));
        assert_eq!(
            p.mandatory_elements(ResourceType::Consent),
            vec!["status", "scope", "category"]
        );
    }

    #[test]
    fn a_directory_copy_loads_the_same() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let p = Profiles::load(&dir).unwrap();
        assert_eq!(
            p.search_parameters.len(),
            Profiles::embedded().unwrap().search_parameters.len()
        );
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = Profiles::load(Path::new("/nonexistent/profiles")).unwrap_err();
        assert!(err
            .to_string()
            .contains("/nonexistent/profiles/fhir.schema.json"));
    }
}

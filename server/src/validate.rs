//! Validation of incoming resources: the official R4 JSON schema (structure, primitive
//! formats, required code bindings) plus the rules the schema cannot express, read from the
//! StructureDefinitions: minimum cardinalities of primitives and reference target types.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::error::{Error, Issue};
use crate::fhir::ResourceType;
use crate::profiles::{ElementDefinition, Profiles};

/// How many schema errors one response reports; the rest are summarised.
const MAX_REPORTED_ISSUES: usize = 20;

pub struct Validator {
    profiles: Arc<Profiles>,
    schemas: [OnceLock<Result<jsonschema::Validator, String>>; 4],
}

fn type_index(rtype: ResourceType) -> usize {
    ResourceType::ALL
        .iter()
        .position(|t| *t == rtype)
        .expect("served type")
}

/// `/name/0/given` -> `Patient.name[0].given`.
fn pointer_to_expression(rtype: ResourceType, pointer: &str) -> String {
    let mut out = rtype.as_str().to_string();
    for seg in pointer.split('/').skip(1) {
        if seg.bytes().all(|b| b.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    out
}

impl Validator {
    pub fn new(profiles: Arc<Profiles>) -> Self {
        Validator {
            profiles,
            schemas: Default::default(),
        }
    }

    /// Compile the per-type schema validators (about 0.2 s each) before the first request needs them.
    pub fn warm(&self) {
        for rt in ResourceType::ALL {
            let _ = self.schema(rt);
        }
    }

    fn schema(&self, rtype: ResourceType) -> Result<&jsonschema::Validator, Error> {
        self.schemas[type_index(rtype)]
            .get_or_init(|| {
                // The root schema is a oneOf over every type, whose errors say nothing useful; a
                // per-type entry point gives errors that name the element.
                let mut schema = self.profiles.schema.clone();
                let obj = schema.as_object_mut().expect("schema is an object");
                obj.remove("oneOf");
                obj.remove("discriminator");
                obj.insert(
                    "$ref".into(),
                    Value::String(format!("#/definitions/{rtype}")),
                );
                jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft6)
                    .build(&schema)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::Internal(format!("schema for {rtype} does not compile: {e}")))
    }

    /// Validate a resource that claims to be of `rtype`.
    pub fn validate(&self, rtype: ResourceType, resource: &Value) -> Result<(), Error> {
        let Some(obj) = resource.as_object() else {
            return Err(Error::BadRequest(Issue::error(
                "structure",
                "a resource must be a JSON object",
            )));
        };
        match obj.get("resourceType").and_then(Value::as_str) {
            None => {
                return Err(Error::BadRequest(
                    Issue::error("required", "resourceType is missing").at("resourceType"),
                ))
            }
            Some(t) if t != rtype.as_str() => {
                return Err(Error::BadRequest(
                    Issue::error(
                        "invalid",
                        format!("resourceType '{t}' does not match the endpoint type '{rtype}'"),
                    )
                    .at("resourceType"),
                ))
            }
            Some(_) => {}
        }
        let validator = self.schema(rtype)?;
        if !validator.is_valid(resource) {
            let mut issues: Vec<Issue> = Vec::new();
            let mut total = 0;
            for err in validator.iter_errors(resource) {
                total += 1;
                if issues.len() < MAX_REPORTED_ISSUES {
                    let mut expression = pointer_to_expression(rtype, err.instance_path().as_str());
                    // An unknown element is located at the element itself, not its parent.
                    if let jsonschema::error::ValidationErrorKind::AdditionalProperties {
                        unexpected,
                    } = err.kind()
                    {
                        if let [one] = unexpected.as_slice() {
                            expression = format!("{expression}.{one}");
                        }
                    }
                    issues.push(
                        Issue::error("structure", format!("{expression}: {err}")).at(expression),
                    );
                }
            }
            if total > issues.len() {
                issues.push(Issue::information(format!(
                    "{} further schema errors not shown",
                    total - issues.len()
                )));
            }
            return Err(Error::Invalid(issues));
        }
        let issues = self.profile_rules(rtype, resource);
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(issues))
        }
    }

    fn profile_rules(&self, rtype: ResourceType, resource: &Value) -> Vec<Issue> {
        let mut issues = Vec::new();
        for def in &self.profiles.elements[&rtype] {
            if def.min >= 1 {
                check_min(rtype, def, resource, &mut issues);
            }
            if !def.reference_targets.is_empty() {
                check_reference_targets(rtype, def, resource, &mut issues);
            }
        }
        issues
    }
}

/// Nodes at `path` below `root`, each with its FHIRPath location (`Patient.name[0]`).
fn nodes_at<'a>(root: &'a Value, base: String, path: &[String]) -> Vec<(&'a Value, String)> {
    let mut current = vec![(root, base)];
    for seg in path {
        let mut next = Vec::new();
        for (node, loc) in current {
            let Some(obj) = node.as_object() else {
                continue;
            };
            let matches: Vec<(&String, &Value)> = if let Some(stem) = seg.strip_suffix("[x]") {
                obj.iter()
                    .filter(|(k, _)| {
                        k.strip_prefix(stem)
                            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                    })
                    .collect()
            } else {
                obj.get_key_value(seg.as_str()).into_iter().collect()
            };
            for (key, value) in matches {
                match value {
                    Value::Array(items) => next.extend(
                        items
                            .iter()
                            .enumerate()
                            .map(|(i, item)| (item, format!("{loc}.{key}[{i}]"))),
                    ),
                    v => next.push((v, format!("{loc}.{key}"))),
                }
            }
        }
        current = next;
    }
    current
}

fn check_min(
    rtype: ResourceType,
    def: &ElementDefinition,
    resource: &Value,
    issues: &mut Vec<Issue>,
) {
    let (parent_path, last) = def.path.split_at(def.path.len() - 1);
    let name = &last[0];
    for (parent, loc) in nodes_at(resource, rtype.to_string(), parent_path) {
        let Some(obj) = parent.as_object() else {
            continue;
        };
        let present = if let Some(stem) = name.strip_suffix("[x]") {
            obj.keys().any(|k| {
                k.strip_prefix(stem)
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_uppercase()))
            })
        } else {
            let non_empty = |v: Option<&Value>| match v {
                None | Some(Value::Null) => false,
                Some(Value::Array(a)) => !a.is_empty(),
                Some(_) => true,
            };
            non_empty(obj.get(name.as_str())) || non_empty(obj.get(&format!("_{name}")))
        };
        if !present {
            let expression = format!("{loc}.{}", name.trim_end_matches("[x]"));
            issues.push(
                Issue::error(
                    "required",
                    format!("{expression} is required (minimum cardinality {})", def.min),
                )
                .at(expression),
            );
        }
    }
}

fn check_reference_targets(
    rtype: ResourceType,
    def: &ElementDefinition,
    resource: &Value,
    issues: &mut Vec<Issue>,
) {
    for (node, loc) in nodes_at(resource, rtype.to_string(), &def.path) {
        let Some(reference) = node.get("reference").and_then(Value::as_str) else {
            continue;
        };
        if reference.starts_with('#') || reference.starts_with("urn:") {
            continue;
        }
        // Relative `Type/id` or `Type/id/_history/n`, or an absolute URL ending that way.
        let parts: Vec<&str> = reference.split('/').collect();
        let target_type = match parts.iter().rposition(|p| *p == "_history") {
            Some(h) if h >= 2 => parts[h - 2],
            _ if parts.len() >= 2 => parts[parts.len() - 2],
            _ => {
                issues.push(
                    Issue::error(
                        "value",
                        format!("{loc}.reference '{reference}' is not a Type/id reference"),
                    )
                    .at(format!("{loc}.reference")),
                );
                continue;
            }
        };
        if !def.reference_targets.iter().any(|t| t == target_type) {
            issues.push(
                Issue::error(
                    "value",
                    format!(
                        "{loc} refers to a {target_type}; allowed targets are {}",
                        def.reference_targets.join(", ")
                    ),
                )
                .at(format!("{loc}.reference")),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn validator() -> &'static Validator {
        static V: OnceLock<Validator> = OnceLock::new();
        V.get_or_init(|| Validator::new(Arc::new(Profiles::embedded().unwrap())))
    }

    fn issues(rtype: ResourceType, v: Value) -> Vec<Issue> {
        match validator().validate(rtype, &v) {
            Ok(()) => vec![],
            Err(Error::Invalid(i)) => i,
            Err(Error::BadRequest(i)) => vec![i],
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn a_valid_patient_passes() {
        assert!(issues(ResourceType::Patient, json!({"resourceType":"Patient","name":[{"family":"Chalmers","given":["Peter"]}],"gender":"male","birthDate":"1974-12-25"})).is_empty());
    }

    #[test]
    fn unknown_elements_bad_codes_and_bad_dates_name_the_element() {
        let i = issues(
            ResourceType::Patient,
            json!({"resourceType":"Patient","name":[{"nickname":"x"}]}),
        );
        assert_eq!(i[0].expression, vec!["Patient.name[0].nickname"]);
        assert!(i[0].diagnostics.contains("nickname"));
        let i = issues(
            ResourceType::Patient,
            json!({"resourceType":"Patient","gender":"robot"}),
        );
        assert_eq!(i[0].expression, vec!["Patient.gender"]);
        let i = issues(
            ResourceType::Patient,
            json!({"resourceType":"Patient","birthDate":"1974-13-45"}),
        );
        assert_eq!(i[0].expression, vec!["Patient.birthDate"]);
    }

    #[test]
    fn required_primitives_the_schema_misses_are_enforced() {
        let i = issues(
            ResourceType::Consent,
            json!({"resourceType":"Consent","scope":{"text":"x"},"category":[{"text":"y"}]}),
        );
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].expression, vec!["Consent.status"]);
        assert_eq!(i[0].code, "required");
        let i = issues(
            ResourceType::DocumentReference,
            json!({"resourceType":"DocumentReference","content":[{"attachment":{}}]}),
        );
        assert_eq!(i[0].expression, vec!["DocumentReference.status"]);
    }

    #[test]
    fn reference_targets_are_checked() {
        let i = issues(
            ResourceType::Consent,
            json!({"resourceType":"Consent","status":"active","scope":{"text":"x"},"category":[{"text":"y"}],"patient":{"reference":"Organization/1"}}),
        );
        assert_eq!(i[0].expression, vec!["Consent.patient.reference"]);
        assert!(issues(
            ResourceType::Consent,
            json!({"resourceType":"Consent","status":"active","scope":{"text":"x"},"category":[{"text":"y"}],"patient":{"reference":"Patient/1"}}),
        )
        .is_empty());
    }

    #[test]
    fn wrong_resource_type_is_a_bad_request() {
        let e = validator()
            .validate(ResourceType::Patient, &json!({"resourceType":"Consent"}))
            .unwrap_err();
        assert!(matches!(e, Error::BadRequest(_)));
    }
}

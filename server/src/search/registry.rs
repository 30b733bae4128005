//! The search parameters this server offers, built at start from the official R4
//! SearchParameter resources in `profiles/`. Nothing about a parameter is hand-coded: its
//! code, type, FHIRPath expression and reference targets all come from the data.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::fhirpath::{Expression, Item};
use super::keys::ValueRecord;
use super::value::{clean, encode_values, parse_date_range, soundex, IndexValue};
use crate::fhir::ResourceType;
use crate::profiles::Profiles;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    String,
    Token,
    Reference,
    Date,
    Uri,
}

impl ParamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::String => "string",
            ParamKind::Token => "token",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
            ParamKind::Uri => "uri",
        }
    }
}

#[derive(Debug)]
pub struct SearchParameter {
    pub code: String,
    pub url: String,
    pub kind: ParamKind,
    pub expression: Expression,
    pub expression_text: String,
    /// Resource types a reference parameter may point to.
    pub targets: Vec<String>,
    /// `phonetic`: values are indexed and matched by Soundex.
    pub phonetic: bool,
}

#[derive(Debug, Default)]
pub struct Registry {
    by_type: BTreeMap<ResourceType, BTreeMap<String, Arc<SearchParameter>>>,
    /// (type, code, reason) for parameters in the data that this server cannot evaluate.
    pub not_offered: Vec<(ResourceType, String, String)>,
    /// Patient compartment membership: type -> parameters.
    pub patient_compartment: BTreeMap<ResourceType, Vec<Arc<SearchParameter>>>,
    /// Date parameters whose value is one date/dateTime/instant per resource (max 1 all along
    /// the path, per the StructureDefinition): (type, code) -> the widest range such a value
    /// can cover, in ms. AND-ed clauses on them constrain the same value.
    pub single_date: BTreeMap<(ResourceType, String), i64>,
}

/// A date value of year precision covers at most 366 days (plus a leap second).
const WIDEST_DATE_MS: i64 = 367 * 86_400_000;

fn single_date_width(
    profiles: &Profiles,
    rtype: ResourceType,
    param: &SearchParameter,
) -> Option<i64> {
    let (fields, as_type) = param.expression.plain_path(rtype.as_str())?;
    let elements = &profiles.elements[&rtype];
    let mut last = None;
    for depth in 1..=fields.len() {
        let path = &fields[..depth];
        let def = elements.iter().find(|e| {
            e.path.len() == depth
                && e.path[..depth - 1] == path[..depth - 1]
                && (e.path[depth - 1] == path[depth - 1]
                    || e.path[depth - 1] == format!("{}[x]", path[depth - 1]))
        })?;
        if !def.max_one {
            return None;
        }
        last = Some(def);
    }
    let types: Vec<&str> = match &as_type {
        Some(t) => vec![t.as_str()],
        None => last?.types.iter().map(String::as_str).collect(),
    };
    let all_dates = !types.is_empty()
        && types
            .iter()
            .all(|t| matches!(*t, "date" | "dateTime" | "instant"));
    all_dates.then_some(WIDEST_DATE_MS)
}

impl Registry {
    pub fn from_profiles(profiles: &Profiles) -> Registry {
        let mut reg = Registry::default();
        for rt in ResourceType::ALL {
            reg.by_type.insert(rt, BTreeMap::new());
        }
        for sp in &profiles.search_parameters {
            let (Some(code), Some(kind)) = (sp["code"].as_str(), sp["type"].as_str()) else {
                continue;
            };
            let bases: Vec<&str> = sp["base"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let applies: Vec<ResourceType> = ResourceType::ALL
                .into_iter()
                .filter(|rt| {
                    bases
                        .iter()
                        .any(|b| *b == rt.as_str() || *b == "Resource" || *b == "DomainResource")
                })
                .collect();
            let refuse = |reg: &mut Registry, reason: String| {
                for rt in &applies {
                    reg.not_offered
                        .push((*rt, code.to_string(), reason.clone()));
                }
            };
            let kind = match kind {
                "string" => ParamKind::String,
                "token" => ParamKind::Token,
                "reference" => ParamKind::Reference,
                "date" => ParamKind::Date,
                "uri" => ParamKind::Uri,
                other => {
                    refuse(
                        &mut reg,
                        format!("parameters of type {other} are not supported"),
                    );
                    continue;
                }
            };
            let Some(expression_text) = sp["expression"].as_str() else {
                refuse(&mut reg, "the definition has no FHIRPath expression".into());
                continue;
            };
            let expression = match Expression::parse(expression_text) {
                Ok(e) => e,
                Err(reason) => {
                    refuse(&mut reg, reason);
                    continue;
                }
            };
            let param = Arc::new(SearchParameter {
                code: code.to_string(),
                url: sp["url"].as_str().unwrap_or_default().to_string(),
                kind,
                expression,
                expression_text: expression_text.to_string(),
                targets: sp["target"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                phonetic: code == "phonetic",
            });
            for rt in applies {
                if param.expression.applies_to(rt.as_str()) {
                    reg.by_type
                        .get_mut(&rt)
                        .expect("all types present")
                        .insert(code.to_string(), param.clone());
                }
            }
        }
        for rt in ResourceType::ALL {
            let dates: Vec<Arc<SearchParameter>> = reg
                .params(rt)
                .filter(|p| p.kind == ParamKind::Date)
                .cloned()
                .collect();
            for p in dates {
                if let Some(w) = single_date_width(profiles, rt, &p) {
                    reg.single_date.insert((rt, p.code.clone()), w);
                }
            }
        }
        // Index keys identify a parameter by 4 bytes of its code's hash: a code that collides
        // with another is not offered (none of the R4 codes do; a test checks).
        let mut owner: std::collections::HashMap<[u8; 4], String> =
            std::collections::HashMap::new();
        for rt in ResourceType::ALL {
            let colliding: Vec<String> = reg
                .params(rt)
                .filter(|p| {
                    owner
                        .entry(super::keys::code_hash(&p.code))
                        .or_insert_with(|| p.code.clone())
                        != &p.code
                })
                .map(|p| p.code.clone())
                .collect();
            for code in colliding {
                reg.by_type
                    .get_mut(&rt)
                    .expect("all types present")
                    .remove(&code);
                reg.not_offered.push((
                    rt,
                    code,
                    "its index prefix collides with another parameter".into(),
                ));
            }
        }
        for (type_name, codes) in &profiles.patient_compartment {
            let Ok(rt) = type_name.parse::<ResourceType>() else {
                continue;
            };
            let params = codes.iter().filter_map(|c| reg.get(rt, c)).collect();
            reg.patient_compartment.insert(rt, params);
        }
        reg
    }

    pub fn get(&self, rtype: ResourceType, code: &str) -> Option<Arc<SearchParameter>> {
        self.by_type.get(&rtype)?.get(code).cloned()
    }

    pub fn params(&self, rtype: ResourceType) -> impl Iterator<Item = &Arc<SearchParameter>> {
        self.by_type[&rtype].values()
    }

    /// Every parameter's values in a resource, as the `values` family stores them.
    pub fn value_record(&self, rtype: ResourceType, resource: &Value) -> ValueRecord {
        ValueRecord::of(
            self.params(rtype)
                .map(|p| (p.code.as_str(), encode_values(&extract(p, rtype, resource)))),
        )
    }
}

/// Extract the values of `param` from a resource, ready for indexing.
impl Registry {
    /// The patient compartments a resource belongs to (`Patient/<id>`), from the
    /// CompartmentDefinition's parameters.
    pub fn patients_of(
        &self,
        rtype: ResourceType,
        id: &str,
        resource: &Value,
        base_url: &str,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if rtype == ResourceType::Patient {
            out.push(format!("Patient/{id}"));
        }
        let base = format!("{base_url}/");
        for p in self.patient_compartment.get(&rtype).into_iter().flatten() {
            for v in extract(p, rtype, resource) {
                if let IndexValue::Reference {
                    target: Some(t), ..
                } = v
                {
                    let t = t.strip_prefix(&base).unwrap_or(&t).to_string();
                    if t.starts_with("Patient/") && !out.contains(&t) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }
}

pub fn extract(param: &SearchParameter, rtype: ResourceType, resource: &Value) -> Vec<IndexValue> {
    let mut out = Vec::new();
    for item in param.expression.evaluate(rtype.as_str(), resource) {
        match item {
            Item::Boolean(b) => {
                if param.kind == ParamKind::Token {
                    out.push(IndexValue::Token {
                        system: None,
                        code: Some(b.to_string()),
                        text: None,
                        personal: false,
                    });
                }
            }
            Item::Node(v) => values_of(param, v, &mut out),
        }
    }
    out.dedup();
    out
}

const STRING_PARTS: [&str; 11] = [
    "text",
    "family",
    "given",
    "prefix",
    "suffix",
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
];

fn strings_in<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|i| strings_in(i, out)),
        Value::Object(o) => {
            for part in STRING_PARTS {
                if let Some(p) = o.get(part) {
                    strings_in(p, out);
                }
            }
        }
        _ => {}
    }
}

fn opt(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(clean)
}

fn values_of(param: &SearchParameter, v: &Value, out: &mut Vec<IndexValue>) {
    match param.kind {
        ParamKind::String => {
            let mut strings = Vec::new();
            strings_in(v, &mut strings);
            for s in strings {
                if param.phonetic {
                    out.extend(
                        s.split_whitespace()
                            .filter_map(soundex)
                            .map(IndexValue::Str),
                    );
                } else {
                    out.push(IndexValue::Str(clean(s)));
                }
            }
        }
        ParamKind::Token => match v {
            Value::String(s) => out.push(IndexValue::Token {
                system: None,
                code: Some(clean(s)),
                text: None,
                personal: false,
            }),
            Value::Bool(b) => out.push(IndexValue::Token {
                system: None,
                code: Some(b.to_string()),
                text: None,
                personal: false,
            }),
            Value::Object(o)
                if o.contains_key("coding")
                    || (o.contains_key("text") && !o.contains_key("value")) =>
            {
                let cc_text = opt(v, "text");
                for coding in o
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    out.push(IndexValue::Token {
                        system: opt(coding, "system"),
                        code: opt(coding, "code"),
                        text: opt(coding, "display"),
                        personal: false,
                    });
                }
                if cc_text.is_some() {
                    out.push(IndexValue::Token {
                        system: None,
                        code: None,
                        text: cc_text,
                        personal: false,
                    });
                }
            }
            Value::Object(o)
                if o.contains_key("code")
                    || (o.contains_key("system") && !o.contains_key("value")) =>
            {
                out.push(IndexValue::Token {
                    system: opt(v, "system"),
                    code: opt(v, "code"),
                    text: opt(v, "display"),
                    personal: false,
                });
            }
            // Identifier and ContactPoint: system|value, with Identifier.type.text as text.
            Value::Object(o) if o.contains_key("value") => {
                let text = o.get("type").and_then(|t| opt(t, "text"));
                out.push(IndexValue::Token {
                    system: opt(v, "system"),
                    code: opt(v, "value"),
                    text,
                    personal: true,
                });
            }
            _ => {}
        },
        ParamKind::Reference => match v {
            Value::Object(_) => {
                let target = opt(v, "reference")
                    .map(|r| r.split("/_history/").next().unwrap_or(&r).to_string());
                let identifier = v
                    .get("identifier")
                    .and_then(|i| opt(i, "value").map(|val| (opt(i, "system"), val)));
                if target.is_some() || identifier.is_some() {
                    out.push(IndexValue::Reference { target, identifier });
                }
            }
            Value::String(s) => out.push(IndexValue::Reference {
                target: Some(clean(s)),
                identifier: None,
            }),
            _ => {}
        },
        ParamKind::Uri => {
            if let Some(s) = v.as_str() {
                out.push(IndexValue::Uri(clean(s)));
            }
        }
        ParamKind::Date => match v {
            Value::String(s) => {
                if let Some((lo, hi)) = parse_date_range(s) {
                    out.push(IndexValue::Date { lo, hi });
                }
            }
            Value::Object(o) if o.contains_key("start") || o.contains_key("end") => {
                let lo = o
                    .get("start")
                    .and_then(Value::as_str)
                    .and_then(parse_date_range)
                    .map_or(i64::MIN, |r| r.0);
                let hi = o
                    .get("end")
                    .and_then(Value::as_str)
                    .and_then(parse_date_range)
                    .map_or(i64::MAX, |r| r.1);
                out.push(IndexValue::Date { lo, hi });
            }
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::OnceLock;

    pub(crate) fn registry() -> &'static Registry {
        static R: OnceLock<Registry> = OnceLock::new();
        R.get_or_init(|| Registry::from_profiles(&Profiles::embedded().unwrap()))
    }

    #[test]
    fn every_parameter_of_the_served_types_is_offered_except_the_unsupported_kinds() {
        let r = registry();
        for code in [
            "name",
            "family",
            "given",
            "birthdate",
            "identifier",
            "gender",
            "phone",
            "email",
            "telecom",
            "address",
            "address-city",
            "death-date",
            "deceased",
            "general-practitioner",
            "organization",
            "link",
            "active",
            "_id",
            "_lastUpdated",
            "_tag",
            "phonetic",
        ] {
            assert!(
                r.get(ResourceType::Patient, code).is_some(),
                "Patient {code}"
            );
        }
        for code in [
            "patient", "status", "actor", "period", "scope", "category", "date", "data",
        ] {
            assert!(
                r.get(ResourceType::Consent, code).is_some(),
                "Consent {code}"
            );
        }
        for code in [
            "subject",
            "patient",
            "type",
            "date",
            "location",
            "relatesto",
            "period",
        ] {
            assert!(
                r.get(ResourceType::DocumentReference, code).is_some(),
                "DocumentReference {code}"
            );
        }
        for code in [
            "patient", "agent", "entity", "date", "type", "subtype", "action", "outcome",
            "address", "policy",
        ] {
            assert!(
                r.get(ResourceType::AuditEvent, code).is_some(),
                "AuditEvent {code}"
            );
        }
        assert!(!r
            .not_offered
            .iter()
            .any(|(_, _, why)| why.contains("collides")));
        // Not offered, and so not advertised: composite, and _text/_content without expressions.
        assert!(r
            .get(ResourceType::DocumentReference, "relationship")
            .is_none());
        assert!(r.get(ResourceType::Patient, "_text").is_none());
        // Cross-type parameters apply only where their expression has a term for the type.
        assert!(r.get(ResourceType::Patient, "patient").is_none());
    }

    #[test]
    fn extraction_follows_the_value_shapes() {
        let r = registry();
        let p = json!({"resourceType":"Patient","name":[{"family":"Chalmers","given":["Peter","James"]}],
            "identifier":[{"system":"urn:oid:1.2","value":"12345","type":{"text":"MRN"}}],
            "telecom":[{"system":"phone","value":"555"}],"birthDate":"1974-12-25","deceasedBoolean":false,
            "managingOrganization":{"reference":"Organization/1"}});
        let ex = |code: &str| {
            extract(
                &r.get(ResourceType::Patient, code).unwrap(),
                ResourceType::Patient,
                &p,
            )
        };
        assert_eq!(ex("family"), vec![IndexValue::Str("Chalmers".into())]);
        assert_eq!(ex("name").len(), 3);
        assert_eq!(
            ex("identifier"),
            vec![IndexValue::Token {
                system: Some("urn:oid:1.2".into()),
                code: Some("12345".into()),
                text: Some("MRN".into()),
                personal: true,
            }]
        );
        assert_eq!(
            ex("phone"),
            vec![IndexValue::Token {
                system: Some("phone".into()),
                code: Some("555".into()),
                text: None,
                personal: true,
            }]
        );
        assert_eq!(ex("email"), vec![]);
        assert_eq!(
            ex("deceased"),
            vec![IndexValue::Token {
                system: None,
                code: Some("false".into()),
                text: None,
                personal: false,
            }]
        );
        assert!(matches!(ex("birthdate")[0], IndexValue::Date { .. }));
        assert_eq!(
            ex("organization"),
            vec![IndexValue::Reference {
                target: Some("Organization/1".into()),
                identifier: None
            }]
        );
        assert_eq!(ex("phonetic")[0], IndexValue::Str("C456".into()));
    }

    #[test]
    fn single_valued_date_parameters_come_from_the_structure_definitions() {
        let r = registry();
        assert!(r
            .single_date
            .contains_key(&(ResourceType::Patient, "birthdate".to_string())));
        assert!(r
            .single_date
            .contains_key(&(ResourceType::Patient, "death-date".to_string())));
        assert!(r
            .single_date
            .contains_key(&(ResourceType::AuditEvent, "date".to_string())));
        assert!(
            r.single_date
                .contains_key(&(ResourceType::Patient, "_lastUpdated".to_string()))
                == false
        );
        // Periods and repeating elements do not qualify.
        assert!(!r
            .single_date
            .contains_key(&(ResourceType::DocumentReference, "period".to_string())));
        assert!(!r
            .single_date
            .contains_key(&(ResourceType::Consent, "period".to_string())));
    }

    #[test]
    fn the_patient_compartment_comes_from_the_compartment_definition() {
        let r = registry();
        let codes: Vec<&str> = r.patient_compartment[&ResourceType::DocumentReference]
            .iter()
            .map(|p| p.code.as_str())
            .collect();
        assert!(codes.contains(&"subject") && codes.contains(&"author"));
        assert_eq!(
            r.patient_compartment[&ResourceType::Consent][0].code,
            "patient"
        );
    }
}

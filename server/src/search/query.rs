//! Parsing a FHIR search query string into clauses and result controls. Pure: no storage.

use std::sync::Arc;

use super::registry::{ParamKind, Registry, SearchParameter};
use super::value::{normalize, parse_date_range, soundex};
use crate::error::{Error, Issue, Result};
use crate::fhir::ResourceType;

pub const DEFAULT_COUNT: usize = 20;
pub const MAX_COUNT: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modifier {
    None,
    Exact,
    Contains,
    Missing(bool),
    Not,
    Text,
    Identifier,
    /// `subject:Patient=123`
    Type(String),
    Below,
    Above,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClauseValue {
    /// Already normalised for prefix/contains matching, exact for `:exact`.
    Str(String),
    /// `system` None: any system; Some(""): no system.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    Text(String),
    /// `Type/id`, a bare id, or an absolute URL.
    Reference(String),
    ReferenceIdentifier {
        system: Option<String>,
        value: String,
    },
    Uri(String),
    Date {
        prefix: Prefix,
        lo: i64,
        hi: i64,
    },
    /// For `:missing`.
    Flag,
}

/// One search parameter occurrence: the values are ORed; the parameters (more than one only
/// for compartment membership) are ORed too.
#[derive(Debug, Clone)]
pub struct Clause {
    pub params: Vec<Arc<SearchParameter>>,
    pub modifier: Modifier,
    pub values: Vec<ClauseValue>,
    /// For a date parameter with one value per resource: the widest range that value can
    /// cover. AND-ed clauses on such a parameter constrain the same value.
    pub single_date_width: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    Accurate,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    False,
    True,
    Count,
    Text,
    Data,
}

#[derive(Debug, Clone)]
pub enum SortKey {
    Id,
    Param(Arc<SearchParameter>),
}

#[derive(Debug, Clone)]
pub struct Include {
    pub source: ResourceType,
    pub param: Arc<SearchParameter>,
    pub target: Option<ResourceType>,
}

#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub rtype: ResourceType,
    pub clauses: Vec<Clause>,
    pub count: usize,
    pub offset: usize,
    pub sort: Vec<(SortKey, bool)>,
    pub total: Total,
    pub summary: Summary,
    pub elements: Option<Vec<String>>,
    pub include: Vec<Include>,
    pub revinclude: Vec<Include>,
    /// Parameters that were applied, as (name, value), for the `self` link.
    pub applied: Vec<(String, String)>,
    /// Parameters ignored under `Prefer: handling=lenient`.
    pub ignored: Vec<String>,
}

/// Split on unescaped commas (or `|`), unescaping `\,` `\|` `\$` `\\`.
pub fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n) if n == sep => out.last_mut().expect("non-empty").push(n),
                Some(n) => {
                    // Keep other escapes for a later split on another separator.
                    let last = out.last_mut().expect("non-empty");
                    if n == ',' || n == '|' || n == '$' || n == '\\' {
                        if sep == ',' {
                            last.push('\\');
                        }
                    }
                    last.push(n);
                }
                None => out.last_mut().expect("non-empty").push('\\'),
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("non-empty").push(c);
        }
    }
    out
}

fn bad_value(name: &str, value: &str, why: &str) -> Error {
    Error::BadRequest(
        Issue::error(
            "invalid",
            format!("search parameter {name}: '{value}' {why}"),
        )
        .at(name.to_string()),
    )
}

fn parse_prefix(v: &str) -> (Prefix, &str) {
    let prefixes = [
        ("eq", Prefix::Eq),
        ("ne", Prefix::Ne),
        ("gt", Prefix::Gt),
        ("lt", Prefix::Lt),
        ("ge", Prefix::Ge),
        ("le", Prefix::Le),
        ("sa", Prefix::Sa),
        ("eb", Prefix::Eb),
        ("ap", Prefix::Ap),
    ];
    for (p, prefix) in prefixes {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                return (prefix, rest);
            }
        }
    }
    (Prefix::Eq, v)
}

fn parse_modifier(
    param: &SearchParameter,
    name: &str,
    m: Option<&str>,
    registry_has_type: bool,
) -> Result<Modifier> {
    let unsupported = || {
        Error::UnknownSearchParameter(format!(
            "modifier '{}' is not supported for {name}",
            m.unwrap_or("")
        ))
    };
    Ok(match (param.kind, m) {
        (_, None) => Modifier::None,
        (_, Some("missing")) => Modifier::Missing(true), // value decides true/false later
        (ParamKind::String, Some("exact")) => Modifier::Exact,
        (ParamKind::String, Some("contains")) => Modifier::Contains,
        (ParamKind::Token, Some("not")) => Modifier::Not,
        (ParamKind::Token, Some("text")) => Modifier::Text,
        (ParamKind::Reference, Some("identifier")) => Modifier::Identifier,
        (ParamKind::Reference, Some(t))
            if registry_has_type && (param.targets.iter().any(|x| x == t)) =>
        {
            Modifier::Type(t.to_string())
        }
        (ParamKind::Uri, Some("below")) => Modifier::Below,
        (ParamKind::Uri, Some("above")) => Modifier::Above,
        _ => return Err(unsupported()),
    })
}

fn parse_value(
    param: &SearchParameter,
    name: &str,
    modifier: &Modifier,
    raw: &str,
) -> Result<ClauseValue> {
    if raw.is_empty() {
        return Err(bad_value(name, raw, "is empty"));
    }
    Ok(match (param.kind, modifier) {
        (_, Modifier::Missing(_)) => ClauseValue::Flag,
        (ParamKind::String, Modifier::Exact) => ClauseValue::Str(raw.to_string()),
        (ParamKind::String, _) if param.phonetic => ClauseValue::Str(normalize(
            &soundex(raw).ok_or_else(|| bad_value(name, raw, "has no letters"))?,
        )),
        (ParamKind::String, _) => ClauseValue::Str(normalize(raw)),
        (ParamKind::Token, Modifier::Text) => ClauseValue::Text(normalize(raw)),
        (ParamKind::Token, _) => {
            let parts = split_escaped(raw, '|');
            match parts.as_slice() {
                [code] => ClauseValue::Token {
                    system: None,
                    code: Some(code.clone()),
                },
                [system, code] if code.is_empty() => ClauseValue::Token {
                    system: Some(system.clone()),
                    code: None,
                },
                [system, code] => ClauseValue::Token {
                    system: Some(system.clone()),
                    code: Some(code.clone()),
                },
                _ => return Err(bad_value(name, raw, "has more than one '|'")),
            }
        }
        (ParamKind::Reference, Modifier::Identifier) => match split_escaped(raw, '|').as_slice() {
            [value] => ClauseValue::ReferenceIdentifier {
                system: None,
                value: value.clone(),
            },
            [system, value] => ClauseValue::ReferenceIdentifier {
                system: Some(system.clone()),
                value: value.clone(),
            },
            _ => return Err(bad_value(name, raw, "has more than one '|'")),
        },
        (ParamKind::Reference, Modifier::Type(t)) => {
            if raw.contains('/') {
                return Err(bad_value(
                    name,
                    raw,
                    "must be a bare id with a :Type modifier",
                ));
            }
            ClauseValue::Reference(format!("{t}/{raw}"))
        }
        (ParamKind::Reference, _) => ClauseValue::Reference(raw.to_string()),
        (ParamKind::Uri, _) => ClauseValue::Uri(raw.to_string()),
        (ParamKind::Date, _) => {
            let (prefix, date) = parse_prefix(raw);
            let (lo, hi) = parse_date_range(date).ok_or_else(|| {
                bad_value(name, raw, "is not a valid FHIR date, dateTime or instant")
            })?;
            ClauseValue::Date { prefix, lo, hi }
        }
    })
}

/// Parameters that affect only the response format.
const FORMAT_ONLY: [&str; 2] = ["_format", "_pretty"];

fn parse_include(
    registry: &Registry,
    rtype: ResourceType,
    name: &str,
    v: &str,
    rev: bool,
) -> Result<Include> {
    let parts: Vec<&str> = v.split(':').collect();
    let bad = || bad_value(name, v, "must be Type:parameter[:TargetType]");
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad());
    }
    let source: ResourceType = parts[0].parse().map_err(|_| bad())?;
    if !rev && source != rtype {
        return Err(bad_value(name, v, "must start with the searched type"));
    }
    let param = registry
        .get(source, parts[1])
        .filter(|p| p.kind == ParamKind::Reference)
        .ok_or_else(|| {
            Error::UnknownSearchParameter(format!(
                "{name}: {} has no reference parameter '{}'",
                parts[0], parts[1]
            ))
        })?;
    let target = match parts.get(2) {
        Some(t) => Some(t.parse::<ResourceType>().map_err(|_| bad())?),
        None => None,
    };
    Ok(Include {
        source,
        param,
        target,
    })
}

/// Parse `params` (name, value pairs in order) for a search on `rtype`.
pub fn parse(
    registry: &Registry,
    rtype: ResourceType,
    params: &[(String, String)],
    lenient: bool,
) -> Result<SearchQuery> {
    let mut q = SearchQuery {
        rtype,
        clauses: vec![],
        count: DEFAULT_COUNT,
        offset: 0,
        sort: vec![],
        total: Total::Accurate,
        summary: Summary::False,
        elements: None,
        include: vec![],
        revinclude: vec![],
        applied: vec![],
        ignored: vec![],
    };
    for (name, value) in params {
        if FORMAT_ONLY.contains(&name.as_str()) {
            continue;
        }
        let mut applied = true;
        match name.as_str() {
            "_count" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| bad_value(name, value, "is not a non-negative integer"))?;
                q.count = n.min(MAX_COUNT);
            }
            "_offset" => {
                q.offset = value
                    .parse()
                    .map_err(|_| bad_value(name, value, "is not a non-negative integer"))?
            }
            "_total" => {
                q.total = match value.as_str() {
                    "accurate" | "estimate" => Total::Accurate,
                    "none" => Total::None,
                    _ => return Err(bad_value(name, value, "must be none, estimate or accurate")),
                }
            }
            "_summary" => {
                q.summary = match value.as_str() {
                    "true" => Summary::True,
                    "false" => Summary::False,
                    "count" => Summary::Count,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    _ => {
                        return Err(bad_value(
                            name,
                            value,
                            "must be true, false, count, text or data",
                        ))
                    }
                }
            }
            "_elements" => {
                q.elements = Some(
                    value
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "_sort" => {
                for key in value.split(',').filter(|k| !k.is_empty()) {
                    let (desc, code) = key.strip_prefix('-').map_or((false, key), |c| (true, c));
                    let sk = if code == "_id" {
                        SortKey::Id
                    } else {
                        match registry.get(rtype, code) {
                            Some(p) => SortKey::Param(p),
                            None if lenient => {
                                q.ignored.push(format!("_sort={key}"));
                                continue;
                            }
                            None => {
                                return Err(Error::UnknownSearchParameter(format!(
                                    "cannot sort {rtype} by unknown parameter '{code}'"
                                )))
                            }
                        }
                    };
                    q.sort.push((sk, desc));
                }
            }
            "_include" | "_revinclude" => {
                let rev = name == "_revinclude";
                match parse_include(registry, rtype, name, value, rev) {
                    Ok(inc) if rev => q.revinclude.push(inc),
                    Ok(inc) => q.include.push(inc),
                    Err(e) if lenient => {
                        q.ignored.push(format!("{name}={value}: {e}"));
                        applied = false;
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                let (code, modifier) = match name.split_once(':') {
                    Some((c, m)) => (c, Some(m)),
                    None => (name.as_str(), None),
                };
                let Some(param) = registry.get(rtype, code) else {
                    if lenient {
                        q.ignored.push(name.clone());
                        continue;
                    }
                    return Err(Error::UnknownSearchParameter(format!(
                        "unknown or unsupported search parameter '{code}' for {rtype}"
                    )));
                };
                let mut modifier = match parse_modifier(&param, name, modifier, true) {
                    Ok(m) => m,
                    Err(e) if lenient => {
                        q.ignored.push(format!("{name}: {e}"));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Modifier::Missing(_) = modifier {
                    modifier = Modifier::Missing(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(bad_value(
                                name,
                                value,
                                "must be true or false for :missing",
                            ))
                        }
                    });
                }
                let values = split_escaped(value, ',')
                    .iter()
                    .map(|v| parse_value(&param, name, &modifier, v))
                    .collect::<Result<Vec<_>>>()?;
                let single_date_width = (modifier == Modifier::None)
                    .then(|| {
                        registry
                            .single_date
                            .get(&(rtype, param.code.clone()))
                            .copied()
                    })
                    .flatten();
                q.clauses.push(Clause {
                    params: vec![param],
                    modifier,
                    values,
                    single_date_width,
                });
            }
        }
        if applied {
            q.applied.push((name.clone(), value.clone()));
        }
    }
    Ok(q)
}

/// Restrict a query to one Patient's compartment.
pub fn add_patient_compartment(
    registry: &Registry,
    q: &mut SearchQuery,
    patient_id: &str,
) -> Result<()> {
    if q.rtype == ResourceType::Patient {
        let id_param = registry
            .get(ResourceType::Patient, "_id")
            .ok_or_else(|| Error::Internal("no _id parameter".into()))?;
        q.clauses.push(Clause {
            params: vec![id_param],
            modifier: Modifier::None,
            values: vec![ClauseValue::Token {
                system: None,
                code: Some(patient_id.to_string()),
            }],
            single_date_width: None,
        });
        return Ok(());
    }
    let params = registry
        .patient_compartment
        .get(&q.rtype)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| Error::NotFound(format!("{} is not in the Patient compartment", q.rtype)))?;
    q.clauses.push(Clause {
        params: params.clone(),
        modifier: Modifier::None,
        values: vec![ClauseValue::Reference(format!("Patient/{patient_id}"))],
        single_date_width: None,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::Profiles;
    use std::sync::OnceLock;

    fn registry() -> &'static Registry {
        static R: OnceLock<Registry> = OnceLock::new();
        R.get_or_init(|| Registry::from_profiles(&Profiles::embedded().unwrap()))
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn escaping_follows_the_spec() {
        assert_eq!(split_escaped(r"a,b\,c", ','), vec!["a", r"b,c"]);
        assert_eq!(split_escaped(r"sys\|x|code", '|'), vec!["sys|x", "code"]);
        assert_eq!(split_escaped(r"a\|b,c", ','), vec![r"a\|b", "c"]);
    }

    #[test]
    fn clauses_values_and_modifiers() {
        let q = parse(
            registry(),
            ResourceType::Patient,
            &p(&[
                ("family", "Chal,Smith"),
                ("birthdate", "ge1970"),
                ("identifier", "urn:x|1"),
                ("name:exact", "Peter"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(q.clauses.len(), 4);
        assert_eq!(
            q.clauses[0].values,
            vec![
                ClauseValue::Str("chal".into()),
                ClauseValue::Str("smith".into())
            ]
        );
        assert!(matches!(
            q.clauses[1].values[0],
            ClauseValue::Date {
                prefix: Prefix::Ge,
                ..
            }
        ));
        assert_eq!(
            q.clauses[2].values[0],
            ClauseValue::Token {
                system: Some("urn:x".into()),
                code: Some("1".into())
            }
        );
        assert_eq!(q.clauses[3].modifier, Modifier::Exact);
        assert_eq!(q.clauses[3].values[0], ClauseValue::Str("Peter".into()));
    }

    #[test]
    fn unknown_parameters_are_errors_unless_lenient() {
        let params = p(&[("nonsense", "1"), ("family", "x")]);
        assert!(matches!(
            parse(registry(), ResourceType::Patient, &params, false),
            Err(Error::UnknownSearchParameter(_))
        ));
        let q = parse(registry(), ResourceType::Patient, &params, true).unwrap();
        assert_eq!(q.ignored, vec!["nonsense"]);
        assert_eq!(q.clauses.len(), 1);
        assert!(parse(
            registry(),
            ResourceType::Patient,
            &p(&[("family:not", "x")]),
            false
        )
        .is_err());
        assert!(parse(
            registry(),
            ResourceType::Patient,
            &p(&[("_has:Observation:patient:code", "x")]),
            false
        )
        .is_err());
    }

    #[test]
    fn malformed_values_are_bad_requests() {
        for (n, v) in [
            ("birthdate", "1970-13"),
            ("birthdate", "gex"),
            ("_count", "-1"),
            ("_summary", "maybe"),
            ("active:missing", "perhaps"),
            ("family", ""),
        ] {
            assert!(
                matches!(
                    parse(registry(), ResourceType::Patient, &p(&[(n, v)]), false),
                    Err(Error::BadRequest(_))
                ),
                "{n}={v}"
            );
        }
    }

    #[test]
    fn controls() {
        let q = parse(
            registry(),
            ResourceType::Patient,
            &p(&[
                ("_count", "5000"),
                ("_sort", "-birthdate,_id"),
                ("_summary", "count"),
                ("_include", "Patient:organization"),
            ]),
            false,
        )
        .unwrap();
        assert_eq!(q.count, MAX_COUNT);
        assert_eq!(q.sort.len(), 2);
        assert!(q.sort[0].1);
        assert_eq!(q.summary, Summary::Count);
        assert_eq!(q.include.len(), 1);
        assert!(parse(
            registry(),
            ResourceType::Patient,
            &p(&[("_include", "Patient:nonsense")]),
            false
        )
        .is_err());
    }
}

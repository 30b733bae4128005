//! The subset of FHIRPath that the R4 SearchParameter expressions for the served types use:
//! unions (`|`), paths with choice types, `as T`, `where(resolve() is T)`,
//! `where(field='value')`, and `X.exists() and X != false`. An expression outside the subset
//! fails to compile, and its parameter is then not offered (nor advertised).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    /// `as dateTime`: keep choice values of that type.
    As(String),
    /// `where(resolve() is Patient)`: keep References to that type.
    ResolvesTo(String),
    /// `where(system='phone')`.
    FieldEquals(String, String),
}

#[derive(Debug, Clone, PartialEq)]
struct Path {
    root: String,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq)]
enum Term {
    Path(Path),
    /// `P.exists() and P != false`, a boolean.
    ExistsAndNotFalse(Path),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expression {
    terms: Vec<Term>,
}

/// What evaluation yields: a JSON value, or a boolean the expression computed.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<'a> {
    Node(&'a Value),
    Boolean(bool),
}

fn split_top_level(s: &str, sep: char) -> Vec<&str> {
    let (mut depth, mut quoted, mut start, mut out) = (0i32, false, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if c == sep && depth == 0 && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn strip_parens(s: &str) -> &str {
    let t = s.trim();
    if t.starts_with('(') && t.ends_with(')') && split_top_level(&t[1..t.len() - 1], '|').len() >= 1
    {
        // Only strip when the parentheses wrap the whole term.
        let inner = &t[1..t.len() - 1];
        let mut depth = 0;
        for c in inner.chars() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth < 0 {
                        return t;
                    }
                }
                _ => {}
            }
        }
        return inner.trim();
    }
    t
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_path(s: &str) -> Result<Path, String> {
    let s = strip_parens(s);
    let (s, as_type) = match s.split_once(" as ") {
        Some((p, t)) if is_identifier(t.trim()) => (p.trim(), Some(t.trim().to_string())),
        Some(_) => return Err(format!("unsupported 'as' in '{s}'")),
        None => (s, None),
    };
    let parts = split_top_level(s, '.');
    let root = parts[0].trim().to_string();
    if !is_identifier(&root) {
        return Err(format!("unsupported root '{root}'"));
    }
    let mut steps = Vec::new();
    for part in &parts[1..] {
        let part = part.trim();
        if is_identifier(part) {
            steps.push(Step::Field(part.to_string()));
        } else if let Some(arg) = part
            .strip_prefix("where(")
            .and_then(|p| p.strip_suffix(')'))
        {
            if let Some(t) = arg.strip_prefix("resolve() is ") {
                steps.push(Step::ResolvesTo(t.trim().to_string()));
            } else if let Some((field, value)) = arg.split_once('=') {
                let value = value.trim().trim_matches('\'');
                steps.push(Step::FieldEquals(
                    field.trim().to_string(),
                    value.to_string(),
                ));
            } else {
                return Err(format!("unsupported where() in '{part}'"));
            }
        } else if let Some(t) = part.strip_prefix("as(").and_then(|p| p.strip_suffix(')')) {
            steps.push(Step::As(t.trim().to_string()));
        } else {
            return Err(format!("unsupported step '{part}'"));
        }
    }
    if let Some(t) = as_type {
        steps.push(Step::As(t));
    }
    Ok(Path { root, steps })
}

impl Expression {
    pub fn parse(expr: &str) -> Result<Expression, String> {
        let mut terms = Vec::new();
        for part in split_top_level(expr, '|') {
            let part = strip_parens(part);
            if let Some((left, right)) = part.split_once(" and ") {
                let exists = left
                    .trim()
                    .strip_suffix(".exists()")
                    .ok_or_else(|| format!("unsupported 'and' in '{part}'"))?;
                let not_false = right
                    .trim()
                    .strip_suffix("!= false")
                    .map(str::trim)
                    .ok_or_else(|| format!("unsupported 'and' in '{part}'"))?;
                if exists != not_false {
                    return Err(format!("unsupported 'and' in '{part}'"));
                }
                terms.push(Term::ExistsAndNotFalse(parse_path(exists)?));
            } else {
                terms.push(Term::Path(parse_path(part)?));
            }
        }
        Ok(Expression { terms })
    }

    /// Does any term of this expression apply to `resource_type`?
    pub fn applies_to(&self, resource_type: &str) -> bool {
        self.terms.iter().any(|t| {
            let root = match t {
                Term::Path(p) | Term::ExistsAndNotFalse(p) => &p.root,
            };
            root == resource_type || root == "Resource" || root == "DomainResource"
        })
    }

    /// For an expression that is, for `resource_type`, one plain path of fields (optionally
    /// narrowed by `as T`), the field names and the `as` type.
    pub fn plain_path(&self, resource_type: &str) -> Option<(Vec<String>, Option<String>)> {
        let mut found = None;
        for t in &self.terms {
            match t {
                Term::Path(p) if p.root == resource_type => {
                    if found.is_some() {
                        return None;
                    }
                    let mut fields = Vec::new();
                    let mut as_type = None;
                    for s in &p.steps {
                        match s {
                            Step::Field(f) if as_type.is_none() => fields.push(f.clone()),
                            Step::As(t) => as_type = Some(t.clone()),
                            _ => return None,
                        }
                    }
                    found = Some((fields, as_type));
                }
                Term::Path(p) if p.root == "Resource" || p.root == "DomainResource" => return None,
                Term::ExistsAndNotFalse(p) if p.root == resource_type => return None,
                _ => {}
            }
        }
        found
    }

    pub fn evaluate<'a>(&self, resource_type: &str, resource: &'a Value) -> Vec<Item<'a>> {
        let mut out = Vec::new();
        for term in &self.terms {
            match term {
                Term::Path(p) => out.extend(
                    eval_path(p, resource_type, resource)
                        .into_iter()
                        .map(|(v, _)| Item::Node(v)),
                ),
                Term::ExistsAndNotFalse(p) => {
                    if p.root != resource_type {
                        continue;
                    }
                    let values = eval_path(p, resource_type, resource);
                    out.push(Item::Boolean(
                        !values.is_empty() && values.iter().all(|(v, _)| **v != Value::Bool(false)),
                    ));
                }
            }
        }
        out
    }
}

/// Evaluate a path; each result carries the choice-type suffix it was found under, if any.
fn eval_path<'a>(
    p: &Path,
    resource_type: &str,
    resource: &'a Value,
) -> Vec<(&'a Value, Option<String>)> {
    if !(p.root == resource_type || p.root == "Resource" || p.root == "DomainResource") {
        return vec![];
    }
    let mut current: Vec<(&'a Value, Option<String>)> = vec![(resource, None)];
    for step in &p.steps {
        let mut next = Vec::new();
        for (node, choice) in current {
            match step {
                Step::Field(name) => {
                    let Some(obj) = node.as_object() else {
                        continue;
                    };
                    let mut push = |v: &'a Value, c: Option<String>| match v {
                        Value::Array(items) => next.extend(items.iter().map(|i| (i, c.clone()))),
                        v => next.push((v, c)),
                    };
                    if let Some(v) = obj.get(name) {
                        push(v, None);
                    } else {
                        for (k, v) in obj {
                            if let Some(rest) = k.strip_prefix(name.as_str()) {
                                if rest.starts_with(|c: char| c.is_ascii_uppercase()) {
                                    push(v, Some(rest.to_string()));
                                }
                            }
                        }
                    }
                }
                Step::As(t) => {
                    if choice.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(t)) {
                        next.push((node, choice));
                    }
                }
                Step::ResolvesTo(t) => {
                    let r = node.get("reference").and_then(Value::as_str).unwrap_or("");
                    let without_history = r.split("/_history/").next().unwrap_or(r);
                    let mut segs = without_history.rsplit('/');
                    let _id = segs.next();
                    if segs.next() == Some(t.as_str()) {
                        next.push((node, choice));
                    }
                }
                Step::FieldEquals(field, value) => {
                    if node.get(field).and_then(Value::as_str) == Some(value.as_str()) {
                        next.push((node, choice));
                    }
                }
            }
        }
        current = next;
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(expr: &str, rt: &str, v: &Value) -> Vec<Value> {
        Expression::parse(expr)
            .unwrap()
            .evaluate(rt, v)
            .into_iter()
            .map(|i| match i {
                Item::Node(v) => v.clone(),
                Item::Boolean(b) => Value::Bool(b),
            })
            .collect()
    }

    #[test]
    fn paths_unions_and_arrays() {
        let p = json!({"resourceType":"Patient","name":[{"family":"A","given":["B","C"]},{"given":["D"]}]});
        assert_eq!(
            eval("Patient.name.given", "Patient", &p),
            vec![json!("B"), json!("C"), json!("D")]
        );
        assert_eq!(
            eval("Patient.name.family | Person.name.family", "Patient", &p),
            vec![json!("A")]
        );
        assert_eq!(eval("Person.name", "Patient", &p), Vec::<Value>::new());
    }

    #[test]
    fn choice_types_and_as() {
        let p = json!({"deceasedDateTime":"2020-01-01"});
        assert_eq!(
            eval("(Patient.deceased as dateTime)", "Patient", &p),
            vec![json!("2020-01-01")]
        );
        let q = json!({"deceasedBoolean":true});
        assert!(eval("(Patient.deceased as dateTime)", "Patient", &q).is_empty());
        assert_eq!(
            eval(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient",
                &q
            ),
            vec![json!(true)]
        );
        assert_eq!(
            eval(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient",
                &json!({})
            ),
            vec![json!(false)]
        );
        assert_eq!(
            eval(
                "Patient.deceased.exists() and Patient.deceased != false",
                "Patient",
                &p
            ),
            vec![json!(true)]
        );
    }

    #[test]
    fn where_filters() {
        let d =
            json!({"subject":{"reference":"Patient/1"},"author":[{"reference":"Practitioner/2"}]});
        assert_eq!(
            eval(
                "DocumentReference.subject.where(resolve() is Patient)",
                "DocumentReference",
                &d
            )
            .len(),
            1
        );
        assert!(eval(
            "DocumentReference.author.where(resolve() is Patient)",
            "DocumentReference",
            &d
        )
        .is_empty());
        let p =
            json!({"telecom":[{"system":"phone","value":"1"},{"system":"email","value":"a@b"}]});
        assert_eq!(
            eval("Patient.telecom.where(system='email')", "Patient", &p),
            vec![json!({"system":"email","value":"a@b"})]
        );
    }

    #[test]
    fn resource_level_paths_apply_to_every_type() {
        let e = Expression::parse("Resource.meta.lastUpdated").unwrap();
        assert!(e.applies_to("Consent"));
        assert_eq!(
            eval(
                "Resource.meta.lastUpdated",
                "Consent",
                &json!({"meta":{"lastUpdated":"x"}})
            ),
            vec![json!("x")]
        );
    }

    #[test]
    fn unsupported_expressions_are_refused() {
        assert!(Expression::parse("Patient.name.select(given)").is_err());
        assert!(Expression::parse("Patient.a and Patient.b").is_err());
    }
}

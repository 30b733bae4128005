//! SMART scopes (App Launch 2.x, "Scopes and Launch Context"): parsing v1 and v2 resource
//! scopes, and the identity and context scopes.
//!
//! `patient|user|system / Type|* . cruds-subset [?param=value&...]`; v1 suffixes map to v2:
//! `read` -> `rs`, `write` -> `cud`, `*` -> `cruds`.

use crate::fhir::ResourceType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Context {
    Patient,
    User,
    System,
}

/// Create, read (read, vread, instance history), update (and patch), delete, search (type
/// search and history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    C,
    R,
    U,
    D,
    S,
}

impl Perm {
    fn letter(self) -> char {
        match self {
            Perm::C => 'c',
            Perm::R => 'r',
            Perm::U => 'u',
            Perm::D => 'd',
            Perm::S => 's',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// None: every type (`*`).
    pub rtype: Option<ResourceType>,
    pub perms: Vec<Perm>,
    /// Granular scopes: search parameters a resource must match (e.g. `category=...`).
    pub query: Vec<(String, String)>,
    /// As written (v1 or v2), so a response can give back what was asked for.
    pub text: String,
}

impl ResourceScope {
    pub fn allows(&self, rtype: ResourceType, perm: Perm) -> bool {
        self.rtype.is_none_or(|t| t == rtype) && self.perms.contains(&perm)
    }
}

/// Parse a resource scope; None for anything else (identity/context scopes, unknown types).
pub fn parse_resource_scope(s: &str) -> Option<ResourceScope> {
    let (ctx, rest) = s.split_once('/')?;
    let context = match ctx {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return None,
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (
            r,
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ),
        None => (rest, Vec::new()),
    };
    let (ty, suffix) = rest.split_once('.')?;
    let rtype = match ty {
        "*" => None,
        t => Some(t.parse::<ResourceType>().ok()?),
    };
    let perms = match suffix {
        "read" => vec![Perm::R, Perm::S],
        "write" => vec![Perm::C, Perm::U, Perm::D],
        "*" => vec![Perm::C, Perm::R, Perm::U, Perm::D, Perm::S],
        v2 => {
            // A non-empty subset of "cruds", in that order.
            let order = "cruds";
            let mut last = None;
            let mut perms = Vec::new();
            for ch in v2.chars() {
                let pos = order.find(ch)?;
                if last.is_some_and(|l| pos <= l) {
                    return None;
                }
                last = Some(pos);
                perms.push(match ch {
                    'c' => Perm::C,
                    'r' => Perm::R,
                    'u' => Perm::U,
                    'd' => Perm::D,
                    _ => Perm::S,
                });
            }
            if perms.is_empty() {
                return None;
            }
            perms
        }
    };
    Some(ResourceScope {
        context,
        rtype,
        perms,
        query,
        text: s.to_string(),
    })
}

/// The identity and context scopes this server knows.
pub const OTHER_SCOPES: [&str; 7] = [
    "openid",
    "fhirUser",
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
    "profile",
];

pub fn is_known(s: &str) -> bool {
    OTHER_SCOPES.contains(&s) || parse_resource_scope(s).is_some()
}

/// Is `asked` covered by `allowed` (the scopes a client or user may have)? A resource scope is
/// covered by an allowed one of the same context whose type and permissions include it (a
/// granular scope is covered by its resource-level form).
pub fn covered(asked: &str, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == asked) {
        return true;
    }
    let Some(a) = parse_resource_scope(asked) else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|s| parse_resource_scope(s))
        .any(|al| {
            al.context == a.context
                && (al.rtype.is_none() || al.rtype == a.rtype)
                && a.perms.iter().all(|p| al.perms.contains(p))
                && (al.query.is_empty() || al.query == a.query)
        })
}

/// Render a permission set the v2 way (for messages).
pub fn perms_text(perms: &[Perm]) -> String {
    perms.iter().map(|p| p.letter()).collect()
}

pub fn split(scope: &str) -> Vec<String> {
    scope.split_whitespace().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_scopes_parse_to_permissions() {
        let s = parse_resource_scope("patient/Patient.read").unwrap();
        assert_eq!(
            (s.context, s.rtype, s.perms.clone()),
            (
                Context::Patient,
                Some(ResourceType::Patient),
                vec![Perm::R, Perm::S]
            )
        );
        let s = parse_resource_scope("user/*.write").unwrap();
        assert_eq!(
            (s.rtype, s.perms.clone()),
            (None, vec![Perm::C, Perm::U, Perm::D])
        );
        let s = parse_resource_scope("system/*.cruds").unwrap();
        assert_eq!(s.perms.len(), 5);
        let s = parse_resource_scope("user/DocumentReference.rs?category=http://loinc.org|11488-4")
            .unwrap();
        assert_eq!(
            s.query,
            vec![(
                "category".to_string(),
                "http://loinc.org|11488-4".to_string()
            )]
        );
        assert!(s.allows(ResourceType::DocumentReference, Perm::S));
        assert!(!s.allows(ResourceType::DocumentReference, Perm::C));
        for bad in [
            "patient/Patient.dus",
            "patient/Patient.",
            "patient/Observation.rs",
            "other/Patient.rs",
            "patient/Patient.rx",
            "Patient.rs",
        ] {
            assert!(parse_resource_scope(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn coverage_never_widens_a_grant() {
        let allowed = split("launch/patient openid patient/*.rs patient/Consent.cruds");
        assert!(covered("patient/Patient.rs", &allowed));
        assert!(covered("patient/Patient.r", &allowed));
        assert!(covered("patient/Consent.cud", &allowed));
        assert!(covered("patient/DocumentReference.rs?category=x", &allowed));
        assert!(covered("openid", &allowed));
        assert!(!covered("patient/Patient.cruds", &allowed));
        assert!(!covered("user/Patient.rs", &allowed));
        assert!(!covered("offline_access", &allowed));
        assert!(!covered("system/*.rs", &allowed));
    }
}

//! FHIR R4 vocabulary the server works in: the resource types it serves, logical ids,
//! instants. No HTTP and no storage here.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Issue};

/// The resource types this server stores. Adding one is a change here plus its profile data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Patient,
    Consent,
    DocumentReference,
    AuditEvent,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Patient,
        ResourceType::Consent,
        ResourceType::DocumentReference,
        ResourceType::AuditEvent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Patient => "Patient",
            ResourceType::Consent => "Consent",
            ResourceType::DocumentReference => "DocumentReference",
            ResourceType::AuditEvent => "AuditEvent",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ResourceType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        ResourceType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "resource type '{s}' is not supported by this server"
                ))
            })
    }
}

/// R4 `id`: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

pub fn check_id(id: &str) -> Result<(), Error> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::BadRequest(Issue::error(
            "invalid",
            format!("'{id}' is not a valid FHIR id ([A-Za-z0-9-.]{{1,64}})"),
        )))
    }
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Milliseconds since the Unix epoch, formatted as an R4 `instant` in UTC.
pub fn format_instant(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

/// RFC 7231 HTTP-date, for `Last-Modified`.
pub fn format_http_date(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&f).unwrap_or_default()
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_r4_rule() {
        assert!(is_valid_id("example"));
        assert!(is_valid_id("a.b-C9"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id("slash/"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn instants_and_http_dates() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_instant(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            format_http_date(1_700_000_000_123),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
    }

    #[test]
    fn only_served_types_parse() {
        assert_eq!(
            "Patient".parse::<ResourceType>().unwrap(),
            ResourceType::Patient
        );
        assert!("Observation".parse::<ResourceType>().is_err());
        assert!("patient".parse::<ResourceType>().is_err());
    }
}

//! The server's one error type, and the one place where errors become HTTP statuses and
//! OperationOutcome resources. Nothing else in the crate chooses a status code for a failure.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Value};

/// One OperationOutcome.issue.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: &'static str,
    /// An IssueType code (http://hl7.org/fhir/issue-type).
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath-style locations, e.g. `Patient.name[0].given`.
    pub expression: Vec<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: "error",
            code,
            diagnostics: diagnostics.into(),
            expression: vec![],
        }
    }
    pub fn warning(code: &'static str, diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: "warning",
            code,
            diagnostics: diagnostics.into(),
            expression: vec![],
        }
    }
    pub fn information(diagnostics: impl Into<String>) -> Self {
        Issue {
            severity: "information",
            code: "informational",
            diagnostics: diagnostics.into(),
            expression: vec![],
        }
    }
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression.push(expression.into());
        self
    }
    pub fn to_json(&self) -> Value {
        let mut v =
            json!({"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics});
        if !self.expression.is_empty() {
            v["expression"] = json!(self.expression);
        }
        v
    }
}

pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(Issue::to_json).collect::<Vec<_>>(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is malformed: bad JSON, bad parameter value, mismatched ids.
    #[error("{}", .0.diagnostics)]
    BadRequest(Issue),
    /// The resource parsed but breaks the R4 rules (schema, cardinality, bindings, references).
    #[error("resource failed validation ({} issues)", .0.len())]
    Invalid(Vec<Issue>),
    /// A search used a parameter or modifier this server does not support (strict handling).
    #[error("{0}")]
    UnknownSearchParameter(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// No valid access token (absent, malformed, forged, expired, revoked, wrong audience).
    #[error("{0}")]
    Unauthorized(String),
    /// Something this request needs (another organization's node) is not available now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{rtype}/{id} was deleted")]
    Gone {
        rtype: String,
        id: String,
        version: u64,
    },
    #[error("{0}")]
    VersionConflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    MultipleMatches(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("request body is larger than the configured limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The change's ledger entry (its versions' commitments) is larger than the ledger orders.
    #[error("this change records {versions} versions in a ledger entry of {bytes} bytes, larger than the {limit} bytes one entry may take; split the transaction")]
    LedgerEntryTooLarge {
        versions: usize,
        bytes: usize,
        limit: usize,
    },
    /// A transaction entry failed; the whole transaction was rolled back.
    #[error("transaction failed at entry {index}: {source}")]
    TransactionEntry { index: usize, source: Box<Error> },
    /// The storage engine failed. Nothing was acknowledged.
    #[error("storage failure: {0}")]
    Storage(String),
    /// Stored bytes do not match what the ledger committed to: served to nobody.
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// The ledger did not commit in time (or is not reachable); the write was not acknowledged.
    #[error("ledger unavailable: {0}")]
    LedgerUnavailable(String),
    /// The server cannot start with this configuration.
    #[error("{0}")]
    Startup(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl Error {
    pub fn bad_request(code: &'static str, msg: impl Into<String>) -> Self {
        Error::BadRequest(Issue::error(code, msg))
    }
    pub fn invalid_at(expression: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid(vec![Issue::error("invalid", msg).at(expression)])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::UnknownSearchParameter(_) => StatusCode::BAD_REQUEST,
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Gone { .. } => StatusCode::GONE,
            Error::VersionConflict(_) => StatusCode::CONFLICT,
            Error::PreconditionFailed(_) | Error::MultipleMatches(_) => {
                StatusCode::PRECONDITION_FAILED
            }
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Error::PayloadTooLarge(_) | Error::LedgerEntryTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Error::TransactionEntry { source, .. } => source.status(),
            Error::Storage(_) | Error::Internal(_) | Error::Integrity(_) | Error::Startup(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Error::LedgerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn issues(&self) -> Vec<Issue> {
        match self {
            Error::BadRequest(issue) => vec![issue.clone()],
            Error::Invalid(issues) => issues.clone(),
            Error::UnknownSearchParameter(m) => vec![Issue::error("not-supported", m.clone())],
            Error::NotFound(m) => vec![Issue::error("not-found", m.clone())],
            Error::Forbidden(m) => vec![Issue::error("forbidden", m.clone())],
            Error::Unauthorized(m) => vec![Issue::error("login", m.clone())],
            Error::Unavailable(m) => vec![Issue::error("transient", m.clone())],
            Error::Gone { .. } => vec![Issue::error("deleted", self.to_string())],
            Error::VersionConflict(m) | Error::PreconditionFailed(m) => {
                vec![Issue::error("conflict", m.clone())]
            }
            Error::MultipleMatches(m) => vec![Issue::error("multiple-matches", m.clone())],
            Error::MethodNotAllowed(m) => vec![Issue::error("not-supported", m.clone())],
            Error::UnsupportedMediaType(m) | Error::NotAcceptable(m) => {
                vec![Issue::error("not-supported", m.clone())]
            }
            Error::PayloadTooLarge(_) | Error::LedgerEntryTooLarge { .. } => {
                vec![Issue::error("too-long", self.to_string())]
            }
            Error::TransactionEntry { index, source } => source
                .issues()
                .into_iter()
                .map(|mut i| {
                    i.diagnostics = format!("Bundle.entry[{index}]: {}", i.diagnostics);
                    i.expression = i
                        .expression
                        .into_iter()
                        .map(|e| format!("Bundle.entry[{index}].resource.{e}"))
                        .collect();
                    i
                })
                .collect(),
            // Never leak internals to the client; the detail goes to the log.
            Error::Storage(_) => vec![Issue::error(
                "exception",
                "the storage engine failed; nothing was written",
            )],
            Error::Internal(_) | Error::Startup(_) => {
                vec![Issue::error("exception", "internal server error")]
            }
            // Which record failed is not a secret; how the store is laid out is.
            Error::Integrity(m) => vec![Issue::error(
                "exception",
                format!("{m}; the record is withheld and operators have been alerted"),
            )],
            Error::LedgerUnavailable(m) => vec![Issue::error("transient", m.clone())],
        }
    }

    pub fn outcome(&self) -> Value {
        operation_outcome(&self.issues())
    }
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        self.status()
    }
    fn error_response(&self) -> HttpResponse {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = HttpResponse::build(self.status());
        resp.content_type("application/fhir+json; charset=utf-8");
        if let Error::Gone { version, .. } = self {
            resp.insert_header(("ETag", format!("W/\"{version}\"")));
        }
        if let Error::Unauthorized(m) = self {
            // RFC 6750 §3: no error code when no token was presented.
            let challenge = if m.starts_with("no access token") {
                "Bearer realm=\"fhirmament\"".to_string()
            } else {
                format!(
                    "Bearer realm=\"fhirmament\", error=\"invalid_token\", error_description=\"{}\"",
                    m.replace('"', "'")
                )
            };
            resp.insert_header(("WWW-Authenticate", challenge));
        }
        resp.body(serde_json::to_vec(&self.outcome()).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_entry_errors_point_into_the_bundle() {
        let e = Error::TransactionEntry {
            index: 2,
            source: Box::new(Error::invalid_at("Patient.gender", "bad code")),
        };
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let oo = e.outcome();
        assert_eq!(
            oo["issue"][0]["expression"][0],
            "Bundle.entry[2].resource.Patient.gender"
        );
    }

    #[test]
    fn storage_errors_do_not_leak_detail() {
        let e = Error::Storage("IO error: /secret/path".into());
        assert!(!e.outcome().to_string().contains("/secret/path"));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}

//! FHIR search: parameters from `profiles/`, values extracted by FHIRPath, index keys,
//! query parsing and evaluation against the store's indexes.

pub mod blind;
pub mod exec;
pub mod fhirpath;
pub mod keys;
pub mod query;
pub mod registry;
pub mod value;

pub use registry::{extract, ParamKind, Registry, SearchParameter};

//! The consortium ledger: orders opaque entries and makes them verifiable. It knows nothing
//! of FHIR, HTTP or PHI.
//!
//! Present today: `merkle`, the RFC 6962 / RFC 9162 Merkle tree hashing that blocks will use
//! to commit to their entries, with inclusion proofs. The PBFT protocol core, its store and
//! its transport are issue #3.

pub mod merkle;

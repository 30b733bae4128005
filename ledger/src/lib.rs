//! The consortium ledger: orders opaque entries and makes them verifiable. It knows nothing
//! of FHIR, HTTP or PHI.
//!
//! - `core`: the PBFT protocol (Castro & Liskov) as a pure state machine.
//! - `sim`: a deterministic, seeded simulator of a cluster with injected faults.
//! - `merkle`: RFC 6962 / RFC 9162 Merkle tree hashing with inclusion proofs.
//!
//! Its RocksDB store and network transport (the I/O shell around `core`) are still to come.

pub mod core;
pub mod merkle;
pub mod sim;

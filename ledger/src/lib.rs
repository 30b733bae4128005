//! The consortium ledger: orders opaque entries and makes them verifiable. It knows nothing
//! of FHIR, HTTP or PHI.
//!
//! - `core`: the PBFT protocol (Castro & Liskov) as a pure state machine.
//! - `sim`: a deterministic, seeded simulator of a cluster with injected faults.
//! - `merkle`: RFC 6962 / RFC 9162 Merkle tree hashing with inclusion proofs.
//!
//! - `store`: RocksDB persistence for a replica's records and the ledger's blocks.
//! - `node`: the replica process: genesis and keys, TCP transport, the driver loop.

pub mod core;
pub mod merkle;
pub mod node;
pub mod sim;
pub mod store;

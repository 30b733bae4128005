//! The sans-IO PBFT core: no I/O, no async, no clock, no randomness. Time comes in as a tick
//! argument; messages and effects go out as `Step`s.

pub mod message;
pub mod replica;

pub use message::{
    block_leaf, block_leaf_of_digest, test_key, Batch, Digest, Membership, Payload, Prepared,
    ReplicaId, Seq, Signed, View,
};
pub use replica::{Action, Config, Fault, FaultKind, Record, Replica, Step};

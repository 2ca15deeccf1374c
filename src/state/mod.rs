//! Domain state: the model ([`model`]), the commands that change it ([`command`]) and the
//! deterministic apply logic ([`machine`]); [`census`] counts runs and tasks by state
//! incrementally for the metrics. Nothing here knows Raft, RocksDB or HTTP.

pub mod census;
pub mod command;
pub mod machine;
pub mod model;
pub mod progress;

pub use command::{Batch, BatchResponse, Command, IdempotencyKey, Outcome, Request, Response};
pub use machine::{apply_request, Kv, KvError, Table};

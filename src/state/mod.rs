//! Domain state: the model ([`model`]), the commands that change it ([`command`]) and the
//! deterministic apply logic ([`machine`]); [`census`] counts runs and tasks by state
//! incrementally for the metrics, [`due`] indexes the active runs by when a supervise
//! pass must look at them, and [`dag_changes`] logs which DAGs apply wrote. Nothing here knows Raft, RocksDB or HTTP.

pub mod census;
pub mod command;
pub mod dag_changes;
pub mod due;
pub mod machine;
pub mod model;
pub mod progress;

pub use command::{Batch, BatchResponse, Command, IdempotencyKey, Outcome, Request, Response};
pub use machine::{apply_request, Kv, KvError, Table};

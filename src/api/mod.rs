//! The public HTTP API under `/api/v1/runtime/orchestrator`, plus `/healthz` and
//! `/readyz`. Only this module knows HTTP and the JSON wire shapes: handlers verify the
//! caller, validate input, stamp a [`crate::state::Request`] and hand it to the proposer,
//! then render the outcome through [`error::ApiError`]'s single table.
//! `routes` holds the route table and shared plumbing; `dags`, `runs` and `cluster`
//! hold the handlers of each resource; `ui` serves the web UI (assets in the binary).

pub(crate) mod cluster;
pub(crate) mod dags;
pub mod error;
mod metrics;
pub mod openapi;
mod routes;
pub(crate) mod runs;
pub mod ui;

pub use routes::{router, ApiState};

/// Where every public path lives.
pub const BASE: &str = "/api/v1/runtime/orchestrator";

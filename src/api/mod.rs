//! The public HTTP API under `/api/v1/runtime/orchestrator`, plus `/healthz` and
//! `/readyz`. Only this module knows HTTP and the JSON wire shapes: handlers verify the
//! caller, validate input, stamp a [`crate::state::Request`] and hand it to the proposer,
//! then render the outcome through [`error::ApiError`]'s single table.
//! `routes` holds the route table and shared plumbing; `dags`, `runs` and `cluster`
//! hold the handlers of each resource, each with its `#[utoipa::path]` documentation;
//! `openapi` completes the OpenAPI 3.1 document generated from them and `schema` holds
//! the schema fragments of the validators' rules; `docs_ui` serves Swagger UI on it at
//! `/docs`; `ui` serves the web UI (assets in the binary).

pub(crate) mod cluster;
pub(crate) mod dags;
mod docs_ui;
pub mod error;
mod metrics;
pub mod openapi;
mod routes;
pub(crate) mod runs;
pub mod schema;
pub mod ui;

pub use docs_ui::DOCS_PATH;
pub use routes::{document, router, ApiState};

/// Where every public path lives.
pub const BASE: &str = "/api/v1/runtime/orchestrator";

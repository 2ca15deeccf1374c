//! orchestrator: a distributed DAG workflow scheduler. Teams submit DAGs of tasks with
//! cron schedules over a REST API, trigger manual and backfill runs and watch them; three
//! nodes replicate all state with Raft (openraft, log and state on RocksDB).
//!
//! Layout, outside in:
//! - [`api`]: the HTTP API (routes, JSON shapes, the error table). Only it knows HTTP.
//! - [`auth`]: bearer-token verification and dev token minting.
//! - [`actors`]: the actix actors behind cloneable handles — the proposer (API actor,
//!   batches writes into Raft entries), DAG registry, scheduler, run supervisor, executor.
//! - [`raft`]: openraft wiring — RocksDB database, log store, state machine, peer network
//!   client and server, and the node wrapper (writes, current reads, membership).
//! - [`state`]: the replicated domain model, commands and the deterministic apply logic.
//! - [`dag`]: DAG definition input and validation. [`schedule`]: cron and timezones.
//! - [`rate_limit`]: per-tenant limits shared across nodes by gossip. [`quota`]: per-tenant
//!   run quotas counted from the replicated active-runs index.
//! - [`admission`]: what a client may cost before it authenticates (connections per
//!   listener and address, failed authentications per address).
//! - [`config`]: layered configuration. [`server`]: running one node end to end.
//! - [`cidr`]: IP networks, for the peer networks members must be in.
//! - [`telemetry`]: the Prometheus metrics (names, buckets, recorder) and the log format.

// openraft's `StorageError` and `RaftError` are large and are what its traits return;
// boxing them at every call site would only obscure the code.
#![allow(clippy::result_large_err)]

pub mod actors;
pub mod admission;
pub mod api;
pub mod auth;
pub mod cidr;
pub mod config;
pub mod dag;
pub mod executor;
pub mod quota;
pub mod raft;
pub mod rate_limit;
pub mod schedule;
pub mod server;
pub mod state;
pub mod telemetry;

//! Run endpoints: trigger (manual or backfill), get, list with filters, cancel, retry,
//! and an attempt's log (read on the node that ran it, from any node).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::routes::{
    act, commit, decode_cursor, fmt_ms, json_body, page_limit, stamp, with_replay, ApiState,
};
use crate::auth::{Access, Principal};
use crate::dag;
use crate::state::machine::keys;
use crate::state::model::{DagSpec, Run, RunState, RunType, TaskKind, TaskState, Window};
use crate::state::{Command, Outcome, Table};

/// A run to trigger. A backfill needs `from` and `to`; a manual run may give both or
/// neither. Runs with a window are idempotent by `(dag_id, window)`: triggering the same
/// window again returns the existing run. A manual run without a window is a new run each
/// time (its window is the instant it is applied); send `X-Request-Id` to make its retries
/// safe.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"dag_id": "sales_gdp", "run_type": "backfill", "from": "2025-10-01", "to": "2025-10-04"}))]
pub struct RunInput {
    /// The DAG to run.
    #[schema(schema_with = super::schema::id)]
    dag_id: String,
    /// `manual` (default) or `backfill`; `scheduled` runs are made by the scheduler only.
    #[serde(default)]
    #[schema(schema_with = trigger_run_type)]
    run_type: Option<String>,
    /// The window's start: a date (midnight in the DAG's timezone) or an RFC 3339 time.
    #[serde(default)]
    #[schema(schema_with = super::schema::instant)]
    from: Option<String>,
    /// The window's end (after `from`).
    #[serde(default)]
    #[schema(schema_with = super::schema::instant_end)]
    to: Option<String>,
}

fn trigger_run_type() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::schema::Type::String,
            utoipa::openapi::schema::Type::Null,
        ]))
        .enum_values(Some([json!("manual"), json!("backfill"), Value::Null]))
        .default(Some(json!("manual")))
        .build()
}

/// The answer to a trigger or a cancel.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"run_id": "run_9", "state": "queued"}))]
pub struct RunAck {
    #[schema(schema_with = super::schema::run_id)]
    pub run_id: String,
    pub state: RunState,
}

/// The answer to a retry.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"run_id": "run_9", "state": "queued", "retried_tasks": 2}))]
pub struct RetryAck {
    #[schema(schema_with = super::schema::run_id)]
    pub run_id: String,
    /// Always `queued`: the run goes on with the retried tasks.
    pub state: RunState,
    /// How many tasks were set to run again.
    pub retried_tasks: u32,
}

/// A run's data interval.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowOut {
    #[schema(format = DateTime)]
    pub from: String,
    #[schema(format = DateTime)]
    pub to: String,
}

/// One attempt of a task.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptOut {
    pub attempt: u32,
    /// The node that ran it (its log is kept there).
    pub node: u64,
    pub state: TaskState,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
}

/// A task of a run, with its attempts.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskOut {
    pub state: TaskState,
    /// The current attempt number (0 before the first).
    pub attempt: u32,
    /// When a `retrying` task may run again.
    #[schema(format = DateTime)]
    pub next_try_at: Option<String>,
    pub attempts: Vec<AttemptOut>,
}

/// A run: the spec's `run_id`, `state` and `tasks` map, plus its detail.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "run_id": "run_9", "state": "running", "tasks": {"extract": "done", "transform": "running"},
    "dag_id": "sales_gdp", "dag_version": 1, "run_type": "backfill",
    "window": {"from": "2025-10-01T00:00:00.000Z", "to": "2025-10-04T00:00:00.000Z"},
    "created_at": "2025-10-05T08:00:00.000Z", "started_at": "2025-10-05T08:00:00.120Z", "ended_at": null,
    "sla_deadline": "2025-10-05T10:00:00.000Z", "sla_missed": false,
    "task_details": {
        "extract": {"state": "done", "attempt": 1, "next_try_at": null, "attempts": [{"attempt": 1, "node": 2,
            "state": "done", "started_at": "2025-10-05T08:00:00.150Z", "ended_at": "2025-10-05T08:00:03.410Z",
            "duration_ms": 3260, "exit_code": 0, "error": null}]},
        "transform": {"state": "running", "attempt": 1, "next_try_at": null, "attempts": [{"attempt": 1, "node": 3,
            "state": "running", "started_at": "2025-10-05T08:00:03.500Z", "ended_at": null,
            "duration_ms": null, "exit_code": null, "error": null}]}
    }
}))]
pub struct RunOut {
    #[schema(schema_with = super::schema::run_id)]
    pub run_id: String,
    pub state: RunState,
    /// Each task's state, by task id.
    pub tasks: BTreeMap<String, TaskState>,
    pub dag_id: String,
    /// The DAG version the run executes.
    pub dag_version: u64,
    pub run_type: RunType,
    pub window: WindowOut,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub started_at: Option<String>,
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    /// When the run misses its SLA if not finished (DAGs with `sla` only).
    #[schema(format = DateTime)]
    pub sla_deadline: Option<String>,
    pub sla_missed: bool,
    /// The token subject that triggered the run (manual and backfill runs, from protocol 3).
    pub triggered_by: Option<String>,
    /// Each task's attempts and timings, by task id.
    pub task_details: BTreeMap<String, TaskOut>,
}

/// A run in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunSummary {
    #[schema(schema_with = super::schema::run_id)]
    pub run_id: String,
    pub dag_id: String,
    pub state: RunState,
    pub run_type: RunType,
    pub window: WindowOut,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub ended_at: Option<String>,
    pub sla_missed: bool,
    /// The token subject that triggered the run (manual and backfill runs, from protocol 3).
    pub triggered_by: Option<String>,
    /// The DAG version the run executes.
    pub dag_version: u64,
    /// Task id → state (as in `GET /runs/{run_id}`).
    pub tasks: BTreeMap<String, TaskState>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The `{run_id}` of a run path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RunPath {
    /// The run's id, as returned by `POST /runs`.
    #[param(schema_with = super::schema::run_id)]
    pub run_id: String,
}

/// The path of an attempt's log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AttemptPath {
    #[param(schema_with = super::schema::run_id)]
    pub run_id: String,
    #[param(schema_with = super::schema::id)]
    pub task_id: String,
    /// The attempt number (1 for the first).
    #[param(value_type = u64, minimum = 0, maximum = 4294967295_u64)]
    pub attempt: String,
}

fn window_out(w: &Window) -> WindowOut {
    WindowOut {
        from: fmt_ms(w.start_ms),
        to: fmt_ms(w.end_ms),
    }
}

fn parse_run_type(s: &str) -> Result<RunType, ApiError> {
    match s {
        "manual" => Ok(RunType::Manual),
        "backfill" => Ok(RunType::Backfill),
        "scheduled" => Ok(RunType::Scheduled),
        other => Err(ApiError::InvalidRequest(format!(
            "run_type: '{other}' is not manual, backfill or scheduled"
        ))),
    }
}

/// `POST /runs`: a manual or backfill run; idempotent by `(dag_id, window)` when it has a
/// window, by `X-Request-Id` when it has none.
#[utoipa::path(
    post,
    path = "/runs",
    tag = "runs",
    operation_id = "trigger_run",
    summary = "Trigger a manual or backfill run",
    description = "Idempotent by `(dag_id, window)`: the same window again returns the existing run. \
A manual run without `from` and `to` is a new run each time (its window is the instant it is applied): \
send `X-Request-Id` to make its retries safe. Dates are midnight in the DAG's timezone.",
    request_body(
        content = RunInput,
        example = json!({"dag_id": "sales_gdp", "run_type": "backfill", "from": "2025-10-01", "to": "2025-10-04"}),
    ),
    responses(
        (status = 200, description = "The run (new, or the existing one of that window). A replay of an \
idempotent request says `Idempotent-Replayed: true`.", body = RunAck, example = json!({"run_id": "run_9", "state": "queued"})),
        (status = 400, description = "Malformed JSON, an unknown field, a bad `dag_id`, `from` not before `to`, \
or only one of `from` and `to`.", body = ErrorBody),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: this `X-Request-Id` was used with another body; \
`invalid_state`: the DAG cannot take this run now.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the tenant's rate limit is spent; `quota_exceeded`: a new \
run beyond `limits.max_queued_runs_per_dag` or `limits.max_active_runs_per_tenant` (the message names it; \
retry once runs have started or finished).", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn trigger(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    p.require(Access::Write)?;
    let raw = json_body(body)?;
    let input: RunInput = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::InvalidRequest(format!("invalid run request: {e}")))?;
    dag::check_id("dag_id", &input.dag_id)?;
    let run_type = match parse_run_type(input.run_type.as_deref().unwrap_or("manual"))? {
        RunType::Scheduled => {
            return Err(ApiError::InvalidRequest(
                "run_type: scheduled runs are made by the scheduler; use manual or backfill".into(),
            ))
        }
        t => t,
    };
    // Dates are midnight in the DAG's timezone: look the DAG up (current read).
    let tz = match (&input.from, &input.to) {
        (None, None) => "UTC".to_string(),
        _ => {
            super::dags::load(&st, &p.tenant, &input.dag_id)
                .await?
                .spec
                .timezone
        }
    };
    let now = st.node.clock.now_ms();
    let window = match (&input.from, &input.to) {
        (Some(f), Some(t)) => {
            let start_ms = dag::parse_instant("from", f, &tz)?;
            let end_ms = dag::parse_instant("to", t, &tz)?;
            if start_ms >= end_ms {
                return Err(ApiError::InvalidRequest("from must be before to".into()));
            }
            Window { start_ms, end_ms }
        }
        (None, None) if run_type == RunType::Manual => Window {
            start_ms: now,
            end_ms: now,
        },
        _ => {
            return Err(ApiError::InvalidRequest(
                "give both from and to (a backfill needs them; a manual run may omit both)".into(),
            ))
        }
    };
    let windowless = window.start_ms == window.end_ms;
    let cmd = Command::TriggerRun {
        tenant: p.tenant.clone(),
        dag_id: input.dag_id.clone(),
        run_type,
        window,
    };
    let mut req = stamp(&st, &p, &headers, "POST /runs", &raw, cmd);
    req.proposed_at_ms = now;
    // From protocol 5 apply enforces the run quotas race-free, and this check of the
    // replica's counts only spares Raft a write apply would refuse. It is skipped where
    // apply may answer without a new run: a keyed request (a retry of one that was
    // applied gets its answer back) or a window (its run may exist). Below protocol 5 it
    // is the only check.
    let apply_checks = st.node.applied_protocol().is_ok_and(|v| v >= 5);
    if !apply_checks || (windowless && req.idempotency.is_none()) {
        let quota = (&st.node.config().limits.for_tenant(&p.tenant)).into();
        let usage = st.node.sm.tenant_counts().usage(&p.tenant, &input.dag_id);
        crate::quota::check_new_run(usage, &p.tenant, &input.dag_id, &quota)
            .map_err(|e| ApiError::QuotaExceeded(e.to_string()))?;
    }
    let (outcome, replayed) = commit(&st, req).await?;
    let Outcome::RunTriggered { run_id, state, .. } = outcome else {
        return Err(ApiError::Internal(format!(
            "unexpected outcome {outcome:?}"
        )));
    };
    Ok(with_replay(
        Json(RunAck { run_id, state }).into_response(),
        replayed,
    ))
}

/// The full JSON of a run: the spec's `run_id`, `state`, `tasks` map, plus detail.
pub fn render_run(run: &Run) -> RunOut {
    let tasks = run
        .tasks
        .iter()
        .map(|(id, t)| (id.clone(), t.state))
        .collect();
    let task_details = run
        .tasks
        .iter()
        .map(|(id, t)| {
            let attempts = t
                .attempts
                .iter()
                .map(|a| AttemptOut {
                    attempt: a.attempt,
                    node: a.node,
                    state: a.state,
                    started_at: fmt_ms(a.started_ms),
                    ended_at: a.ended_ms.map(fmt_ms),
                    duration_ms: a.ended_ms.map(|e| e - a.started_ms),
                    exit_code: a.exit_code,
                    error: a.error.clone(),
                })
                .collect();
            let out = TaskOut {
                state: t.state,
                attempt: t.attempt,
                next_try_at: t.next_try_ms.map(fmt_ms),
                attempts,
            };
            (id.clone(), out)
        })
        .collect();
    RunOut {
        run_id: run.run_id.clone(),
        state: run.state,
        tasks,
        dag_id: run.dag_id.clone(),
        dag_version: run.dag_version,
        run_type: run.run_type,
        window: window_out(&run.window),
        created_at: fmt_ms(run.created_ms),
        started_at: run.started_ms.map(fmt_ms),
        ended_at: run.ended_ms.map(fmt_ms),
        sla_deadline: run.sla_deadline_ms.map(fmt_ms),
        sla_missed: run.sla_missed,
        triggered_by: run.triggered_by.clone(),
        task_details,
    }
}

async fn load(st: &ApiState, tenant: &str, run_id: &str) -> Result<Run, ApiError> {
    st.node.linearizable_barrier().await?;
    let run: Option<Run> = st.node.db.get_json(Table::Runs.name(), run_id.as_bytes())?;
    // Another tenant's run is indistinguishable from a missing one.
    run.filter(|r| r.tenant == tenant)
        .ok_or_else(|| ApiError::NotFound(format!("run '{run_id}' not found")))
}

/// `GET /runs/{run_id}`.
#[utoipa::path(
    get,
    path = "/runs/{run_id}",
    tag = "runs",
    operation_id = "get_run",
    summary = "Get a run",
    description = "Its state, each task's state (`tasks`), SLA deadline, and each task's attempts and timings.",
    params(RunPath),
    responses(
        (status = 200, description = "The run.", body = RunOut),
        (status = 404, description = "No run with this id in the caller's tenant.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn get_one(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(RunPath { run_id }): Path<RunPath>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let run = load(&st, &p.tenant, &run_id).await?;
    Ok(Json(render_run(&run)).into_response())
}

/// Filters and paging of `GET /runs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this DAG's runs.
    #[param(schema_with = super::schema::id)]
    dag_id: Option<String>,
    /// Only runs in this state.
    #[param(value_type = Option<RunState>)]
    state: Option<String>,
    /// Only runs of this type.
    #[param(value_type = Option<RunType>)]
    run_type: Option<String>,
    /// Windows starting at or after this (date: midnight UTC, or RFC 3339).
    #[param(schema_with = super::schema::instant_required)]
    from: Option<String>,
    /// Windows ending at or before this.
    #[param(schema_with = super::schema::instant_end_required)]
    to: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(schema_with = super::schema::cursor)]
    cursor: Option<String>,
}

/// `GET /runs?dag_id=&state=&run_type=&from=&to=&limit=&cursor=`: newest first.
#[utoipa::path(
    get,
    path = "/runs",
    tag = "runs",
    operation_id = "list_runs",
    summary = "List runs",
    description = "The caller's tenant's runs, newest first, filtered. A page scans a bounded number of \
runs: with selective filters it may hold fewer than `limit` runs and still have a `next_cursor`.",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of runs.", body = RunList),
        (status = 400, description = "A query parameter this endpoint does not take or that does not parse \
(`limit` outside 1-500, an unknown `state`, a `cursor` this API did not return).", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn list(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let Query(q) = q.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = page_limit(q.limit)?;
    let state: Option<RunState> = q
        .state
        .as_deref()
        .map(|s| {
            serde_json::from_value(json!(s)).map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "state: '{s}' is not queued, running, done, failed or cancelled"
                ))
            })
        })
        .transpose()?;
    let run_type = q.run_type.as_deref().map(parse_run_type).transpose()?;
    let from = q
        .from
        .as_deref()
        .map(|s| dag::parse_instant("from", s, "UTC"))
        .transpose()?;
    let to =
        q.to.as_deref()
            .map(|s| dag::parse_instant("to", s, "UTC"))
            .transpose()?;
    if let Some(d) = &q.dag_id {
        dag::check_id("dag_id", d)?;
    }
    let (table, prefix) = match &q.dag_id {
        Some(d) => (
            Table::RunsByDag,
            keys::prefix(&[p.tenant.as_bytes(), d.as_bytes()]),
        ),
        None => (Table::RunsByTenant, keys::prefix(&[p.tenant.as_bytes()])),
    };
    let mut before = decode_cursor(q.cursor.as_deref(), &prefix)?;
    st.node.linearizable_barrier().await?;
    let mut out = Vec::new();
    let mut more = false;
    // Scan at most this many index entries per request, filters or not.
    let mut budget = 20 * limit + 100;
    'scan: loop {
        let page = st
            .node
            .db
            .scan_prefix_rev(table, &prefix, before.as_deref(), 256)?;
        if page.is_empty() {
            break;
        }
        for (k, _) in page {
            if out.len() == limit || budget == 0 {
                more = true;
                break 'scan;
            }
            budget -= 1;
            before = Some(k.clone());
            let run_id = keys::last_part(&k);
            let Some(run) = st.node.db.get_json::<Run>(Table::Runs.name(), run_id)? else {
                continue;
            };
            let keep = state.is_none_or(|s| run.state == s)
                && run_type.is_none_or(|t| run.run_type == t)
                && from.is_none_or(|f| run.window.start_ms >= f)
                && to.is_none_or(|t| run.window.end_ms <= t);
            if keep {
                out.push(RunSummary {
                    tasks: run
                        .tasks
                        .iter()
                        .map(|(id, t)| (id.clone(), t.state))
                        .collect(),
                    window: window_out(&run.window),
                    created_at: fmt_ms(run.created_ms),
                    ended_at: run.ended_ms.map(fmt_ms),
                    sla_missed: run.sla_missed,
                    state: run.state,
                    run_type: run.run_type,
                    run_id: run.run_id,
                    dag_id: run.dag_id,
                    triggered_by: run.triggered_by,
                    dag_version: run.dag_version,
                });
            }
        }
    }
    let next = if more { before.map(hex::encode) } else { None };
    Ok(Json(RunList {
        runs: out,
        next_cursor: next,
    })
    .into_response())
}

/// `POST /runs/{run_id}/cancel`: unfinished tasks are cancelled, running attempts killed.
#[utoipa::path(
    post,
    path = "/runs/{run_id}/cancel",
    tag = "runs",
    operation_id = "cancel_run",
    summary = "Cancel a run",
    description = "Unfinished tasks are cancelled and running attempts killed. Cancelling a finished run \
returns its state unchanged. Takes no body (one sent is ignored).",
    params(RunPath),
    responses(
        (status = 200, description = "The run's state after the cancel.", body = RunAck,
            example = json!({"run_id": "run_9", "state": "cancelled"})),
        (status = 404, description = "No run with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: this `X-Request-Id` was used for another request.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn cancel(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(RunPath { run_id }): Path<RunPath>,
) -> Result<Response, ApiError> {
    let cmd = Command::CancelRun {
        tenant: p.tenant.clone(),
        run_id: run_id.clone(),
    };
    act(
        &st,
        &p,
        &headers,
        "POST /runs/cancel",
        &run_id,
        cmd,
        |o| match o {
            Outcome::RunCancelled { run_id, state } => Ok(json!(RunAck { run_id, state })),
            o => Err(o),
        },
    )
    .await
}

/// `POST /runs/{run_id}/retry`: re-run failed, upstream-failed and cancelled tasks as new
/// attempts.
#[utoipa::path(
    post,
    path = "/runs/{run_id}/retry",
    tag = "runs",
    operation_id = "retry_run",
    summary = "Retry a finished run's failed or cancelled tasks",
    description = "Failed, upstream-failed and cancelled tasks run again as new attempts (so a cancelled run \
can be resumed); tasks that finished stay done; the run is queued again. Takes no body (one sent is ignored).",
    params(RunPath),
    responses(
        (status = 200, description = "Queued again.", body = RetryAck),
        (status = 404, description = "No run with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`invalid_state`: the run is not finished, has no failed or cancelled task, or ran a \
DAG version no longer kept (`limits.max_dag_versions`); `idempotency_key_reused`: this `X-Request-Id` was \
used for another request.", body = ErrorBody),
        (status = 429, description = "`rate_limited`: the tenant's rate limit is spent; `quota_exceeded`: the \
run, queued again, would go beyond `limits.max_queued_runs_per_dag` or `limits.max_active_runs_per_tenant` \
(the message names it; retry once runs have started or finished).", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn retry(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(RunPath { run_id }): Path<RunPath>,
) -> Result<Response, ApiError> {
    let cmd = Command::RetryRun {
        tenant: p.tenant.clone(),
        run_id: run_id.clone(),
    };
    act(
        &st,
        &p,
        &headers,
        "POST /runs/retry",
        &run_id,
        cmd,
        |o| match o {
            Outcome::RunRetried { run_id, tasks } => Ok(json!(RetryAck {
                run_id,
                state: RunState::Queued,
                retried_tasks: tasks,
            })),
            o => Err(o),
        },
    )
    .await
}

/// `GET /runs/{run_id}/tasks/{task_id}/attempts/{attempt}/log`: the attempt's output,
/// fetched from the node that ran it.
#[utoipa::path(
    get,
    path = "/runs/{run_id}/tasks/{task_id}/attempts/{attempt}/log",
    tag = "runs",
    operation_id = "get_attempt_log",
    summary = "An attempt's output",
    description = "The attempt's stdout and stderr as text, read from the node that ran it (any node answers). \
A noop task's log is empty; an http task's holds the status line and the answer's start, or the error.",
    params(AttemptPath),
    responses(
        (status = 200, description = "The output.", body = String, content_type = "text/plain; charset=utf-8",
            example = "extracting 2025-10-01 .. 2025-10-04\n3 files, 1204 rows\n"),
        (status = 400, description = "`attempt` is not a number.", body = ErrorBody),
        (status = 404, description = "No such run in the caller's tenant, no such task or attempt, or no log \
kept for it: none yet (an http request still waiting for its answer, or an attempt not started), \
purged by retention, or its node lost its data.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn attempt_log(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(AttemptPath {
        run_id,
        task_id,
        attempt,
    }): Path<AttemptPath>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let attempt: u32 = attempt
        .parse()
        .map_err(|_| ApiError::InvalidRequest(format!("attempt '{attempt}' is not a number")))?;
    let run = load(&st, &p.tenant, &run_id).await?;
    let node = run
        .tasks
        .get(&task_id)
        .and_then(|t| t.attempts.iter().find(|a| a.attempt == attempt))
        .map(|a| a.node)
        .ok_or_else(|| {
            ApiError::NotFound(format!("attempt {attempt} of task '{task_id}' not found"))
        })?;
    // A noop task's log is empty: known without asking its node while its DAG version is
    // kept, and read from the (empty) file its node wrote once the version is gone.
    let noop = st
        .node
        .db
        .get_json::<DagSpec>(
            Table::DagVersions.name(),
            &keys::dag_version(&p.tenant, &run.dag_id, run.dag_version),
        )?
        .and_then(|spec| spec.tasks.into_iter().find(|t| t.task_id == task_id))
        .is_some_and(|t| matches!(t.kind, TaskKind::Noop));
    let text = if noop {
        String::new()
    } else {
        st.node
            .attempt_log(node, &run_id, &task_id, attempt)
            .await
            .map_err(|e| {
                ApiError::DependencyDown(format!("node {node} holding the log is unreachable: {e}"))
            })?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no log kept for attempt {attempt} of '{task_id}' (none yet, purged, or its \
                     node lost its data)"
                ))
            })?
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

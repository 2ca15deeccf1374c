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

use super::error::ApiError;
use super::routes::{
    act, commit, decode_cursor, fmt_ms, json_body, now_ms, page_limit, stamp, with_replay, ApiState,
};
use crate::auth::{Access, Principal};
use crate::dag;
use crate::state::machine::keys;
use crate::state::model::{Run, RunState, RunType, Window};
use crate::state::{Command, Outcome, Table};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RunInput {
    dag_id: String,
    #[serde(default)]
    run_type: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
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

/// `POST /runs`: a manual or backfill run; idempotent by `(dag_id, window)`.
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
    let now = now_ms();
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
    let cmd = Command::TriggerRun {
        tenant: p.tenant.clone(),
        dag_id: input.dag_id.clone(),
        run_type,
        window,
    };
    let mut req = stamp(&p, &headers, "POST /runs", &raw, cmd);
    req.proposed_at_ms = now;
    let (outcome, replayed) = commit(&st, req).await?;
    let Outcome::RunTriggered { run_id, state, .. } = outcome else {
        return Err(ApiError::Internal(format!(
            "unexpected outcome {outcome:?}"
        )));
    };
    Ok(with_replay(
        Json(json!({"run_id": run_id, "state": state})).into_response(),
        replayed,
    ))
}

/// The spec's `tasks` map of a run: task id → state.
fn task_states(run: &Run) -> serde_json::Map<String, Value> {
    run.tasks
        .iter()
        .map(|(id, t)| (id.clone(), json!(t.state)))
        .collect()
}

/// The full JSON of a run: the spec's `run_id`, `state`, `tasks` map, plus detail.
pub fn render_run(run: &Run) -> Value {
    let tasks = task_states(run);
    let detail: serde_json::Map<String, Value> = run
        .tasks
        .iter()
        .map(|(id, t)| {
            let attempts: Vec<Value> = t
                .attempts
                .iter()
                .map(|a| {
                    json!({
                        "attempt": a.attempt,
                        "node": a.node,
                        "state": a.state,
                        "started_at": fmt_ms(a.started_ms),
                        "ended_at": a.ended_ms.map(fmt_ms),
                        "duration_ms": a.ended_ms.map(|e| e - a.started_ms),
                        "exit_code": a.exit_code,
                        "error": a.error,
                    })
                })
                .collect();
            (
                id.clone(),
                json!({"state": t.state, "attempt": t.attempt, "next_try_at": t.next_try_ms.map(fmt_ms), "attempts": attempts}),
            )
        })
        .collect();
    json!({
        "run_id": run.run_id,
        "state": run.state,
        "tasks": tasks,
        "dag_id": run.dag_id,
        "dag_version": run.dag_version,
        "run_type": run.run_type,
        "window": {"from": fmt_ms(run.window.start_ms), "to": fmt_ms(run.window.end_ms)},
        "created_at": fmt_ms(run.created_ms),
        "started_at": run.started_ms.map(fmt_ms),
        "ended_at": run.ended_ms.map(fmt_ms),
        "sla_deadline": run.sla_deadline_ms.map(fmt_ms),
        "sla_missed": run.sla_missed,
        "task_details": detail,
    })
}

async fn load(st: &ApiState, tenant: &str, run_id: &str) -> Result<Run, ApiError> {
    st.node.linearizable_barrier().await?;
    let run: Option<Run> = st.node.db.get_json(Table::Runs.name(), run_id.as_bytes())?;
    // Another tenant's run is indistinguishable from a missing one.
    run.filter(|r| r.tenant == tenant)
        .ok_or_else(|| ApiError::NotFound(format!("run '{run_id}' not found")))
}

/// `GET /runs/{run_id}`.
pub async fn get_one(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let run = load(&st, &p.tenant, &run_id).await?;
    Ok(Json(render_run(&run)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    dag_id: Option<String>,
    state: Option<String>,
    run_type: Option<String>,
    /// Windows starting at or after this (date or RFC 3339, UTC).
    from: Option<String>,
    /// Windows ending at or before this.
    to: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /runs?dag_id=&state=&run_type=&from=&to=&limit=&cursor=`: newest first.
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
    let mut before = decode_cursor(q.cursor.as_deref())?;
    st.node.linearizable_barrier().await?;
    let (table, prefix) = match &q.dag_id {
        Some(d) => (
            Table::RunsByDag,
            keys::prefix(&[p.tenant.as_bytes(), d.as_bytes()]),
        ),
        None => (Table::RunsByTenant, keys::prefix(&[p.tenant.as_bytes()])),
    };
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
                out.push(json!({
                    "run_id": run.run_id, "dag_id": run.dag_id, "dag_version": run.dag_version, "state": run.state, "run_type": run.run_type,
                    "window": {"from": fmt_ms(run.window.start_ms), "to": fmt_ms(run.window.end_ms)},
                    "created_at": fmt_ms(run.created_ms), "ended_at": run.ended_ms.map(fmt_ms),
                    "sla_missed": run.sla_missed,
                    "tasks": task_states(&run),
                }));
            }
        }
    }
    let next = if more { before.map(hex::encode) } else { None };
    Ok(Json(json!({"runs": out, "next_cursor": next})).into_response())
}

/// `POST /runs/{run_id}/cancel`: unfinished tasks are cancelled, running attempts killed.
pub async fn cancel(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
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
            Outcome::RunCancelled { run_id, state } => {
                Ok(json!({"run_id": run_id, "state": state}))
            }
            o => Err(o),
        },
    )
    .await
}

/// `POST /runs/{run_id}/retry`: re-run failed and upstream-failed tasks as new attempts.
pub async fn retry(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
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
            Outcome::RunRetried { run_id, tasks } => {
                Ok(json!({"run_id": run_id, "state": "queued", "retried_tasks": tasks}))
            }
            o => Err(o),
        },
    )
    .await
}

/// `GET /runs/{run_id}/tasks/{task_id}/attempts/{attempt}/log`: the attempt's output,
/// fetched from the node that ran it.
pub async fn attempt_log(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path((run_id, task_id, attempt)): Path<(String, String, String)>,
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
    let text = st
        .node
        .attempt_log(node, &run_id, &task_id, attempt)
        .await
        .map_err(|e| {
            ApiError::DependencyDown(format!("node {node} holding the log is unreachable: {e}"))
        })?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no log kept for attempt {attempt} of '{task_id}' (no output, or purged)"
            ))
        })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

//! DAG endpoints: submit (create or update), list, get, pause, unpause, delete.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::routes::{
    act, commit, decode_cursor, fmt_ms, json_body, now_ms, page_limit, stamp, with_replay, ApiState,
};
use crate::auth::{Access, Principal};
use crate::dag::{self, DagInput};
use crate::schedule::Schedule;
use crate::state::machine::keys;
use crate::state::model::{Dag, DagSpec, Run, TaskKind};
use crate::state::{Command, Outcome, Table};

fn status_of(dag: &Dag) -> &'static str {
    if dag.deleted {
        "deleted"
    } else if dag.spec.paused {
        "paused"
    } else {
        "active"
    }
}

/// `POST /dags`: create or update. `version` in the body or `If-Match` guards updates.
pub async fn submit(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    p.require(Access::Write)?;
    let raw = json_body(body)?;
    let input: DagInput = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::InvalidRequest(format!("invalid DAG: {e}")))?;
    let spec = dag::validate(&input)?;
    if spec
        .tasks
        .iter()
        .any(|t| matches!(t.kind, TaskKind::Shell { .. }))
    {
        if !st.node.config().executor.shell_enabled {
            return Err(ApiError::Forbidden(
                "shell tasks are disabled on this cluster (executor.shell_enabled)".into(),
            ));
        }
        p.require(Access::Shell)?;
    }
    check_limits(&st, &p.tenant, &spec)?;
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').parse::<u64>())
        .transpose()
        .map_err(|_| ApiError::InvalidRequest("If-Match must be a DAG version number".into()))?;
    let paused = spec.paused;
    let cmd = Command::PutDag {
        tenant: p.tenant.clone(),
        spec,
        expected_version: input.version.or(if_match),
    };
    let (outcome, replayed) = commit(&st, stamp(&p, &headers, "POST /dags", &raw, cmd)).await?;
    let Outcome::DagPut {
        dag_id, version, ..
    } = outcome
    else {
        return Err(ApiError::Internal(format!(
            "unexpected outcome {outcome:?}"
        )));
    };
    let status = if paused { "paused" } else { "active" };
    Ok(with_replay(
        Json(json!({"dag_id": dag_id, "status": status, "version": version})).into_response(),
        replayed,
    ))
}

/// Per-tenant quotas (`limits.*`): the shortest schedule interval and, for a new DAG, the
/// number of live DAGs. The count is read here, not in apply: concurrent creates may
/// overshoot it by the number in flight.
fn check_limits(st: &ApiState, tenant: &str, spec: &DagSpec) -> Result<(), ApiError> {
    let limits = &st.node.config().limits;
    if let Some(expr) = &spec.schedule {
        if let Ok(schedule) = Schedule::parse(expr, &spec.timezone) {
            let times = schedule.upcoming(now_ms(), 32);
            let gap = times.windows(2).map(|w| w[1] - w[0]).min();
            if let Some(gap) = gap.filter(|g| (*g as u64) < limits.min_schedule_interval_ms) {
                return Err(ApiError::InvalidRequest(format!(
                    "schedule '{expr}' fires every {} ms; limits.min_schedule_interval_ms allows at most one run every {} ms",
                    gap, limits.min_schedule_interval_ms
                )));
            }
        }
    }
    let exists = st
        .node
        .db
        .get(Table::Dags.name(), &keys::dag(tenant, &spec.dag_id))?
        .and_then(|b| serde_json::from_slice::<Dag>(&b).ok())
        .is_some_and(|d| !d.deleted);
    if !exists {
        let max = limits.max_dags_per_tenant;
        let prefix = keys::prefix(&[tenant.as_bytes()]);
        let mut live = 0u64;
        let mut last: Option<Vec<u8>> = None;
        loop {
            let page = st
                .node
                .db
                .scan_prefix(Table::Dags, &prefix, last.as_deref(), 500)?;
            let done = page.len() < 500;
            for (k, v) in page {
                last = Some(k);
                if serde_json::from_slice::<Dag>(&v).is_ok_and(|d| !d.deleted) {
                    live += 1;
                }
            }
            if live >= max {
                return Err(ApiError::InvalidRequest(format!(
                    "tenant '{tenant}' already has {live} DAGs, the limit (limits.max_dags_per_tenant = {max})"
                )));
            }
            if done {
                break;
            }
        }
    }
    Ok(())
}

/// A tenant's live DAG, read after a linearizable barrier, or 404.
pub(super) async fn load(st: &ApiState, tenant: &str, dag_id: &str) -> Result<Dag, ApiError> {
    st.node.linearizable_barrier().await?;
    st.actors
        .registry
        .dag(tenant, dag_id)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::NotFound(format!("dag '{dag_id}' not found")))
}

fn summary(dag: &Dag) -> Value {
    json!({
        "dag_id": dag.spec.dag_id,
        "status": status_of(dag),
        "version": dag.version,
        "owner": dag.spec.owner,
        "schedule": dag.spec.schedule,
        "timezone": dag.spec.timezone,
        "tasks": dag.spec.tasks.len(),
        "updated_at": fmt_ms(dag.updated_ms),
    })
}

/// A DAG in the list: its summary, the next time its schedule fires and its newest run
/// (what an overview page shows without a request per DAG).
fn list_item(st: &ApiState, tenant: &str, dag: &Dag) -> Result<Value, ApiError> {
    let mut v = summary(dag);
    let next = dag
        .spec
        .schedule
        .as_deref()
        .and_then(|s| Schedule::parse(s, &dag.spec.timezone).ok())
        .and_then(|s| s.upcoming(now_ms(), 1).into_iter().next());
    v["next_fire_time"] = json!(next.map(fmt_ms));
    let prefix = keys::prefix(&[tenant.as_bytes(), dag.spec.dag_id.as_bytes()]);
    let newest = st
        .node
        .db
        .scan_prefix_rev(Table::RunsByDag, &prefix, None, 1)?
        .into_iter()
        .next();
    let last_run = match newest {
        Some((k, _)) => st
            .node
            .db
            .get_json::<Run>(Table::Runs.name(), keys::last_part(&k))?
            .map(|r| json!({"run_id": r.run_id, "state": r.state, "created_at": fmt_ms(r.created_ms)})),
        None => None,
    };
    v["last_run"] = json!(last_run);
    Ok(v)
}

/// `GET /dags/{dag_id}`: the current definition, version and next scheduled windows.
pub async fn get_one(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(dag_id): Path<String>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let dag = load(&st, &p.tenant, &dag_id).await?;
    let next: Vec<String> = dag
        .spec
        .schedule
        .as_deref()
        .and_then(|s| Schedule::parse(s, &dag.spec.timezone).ok())
        .map(|s| s.upcoming(now_ms(), 3).into_iter().map(fmt_ms).collect())
        .unwrap_or_default();
    let cursor = st
        .node
        .db
        .get(Table::Cursors.name(), &keys::dag(&p.tenant, &dag_id))?
        .and_then(|b| keys::from_ordered_i64(&b));
    let mut v = summary(&dag);
    v["definition"] =
        serde_json::to_value(&dag.spec).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["created_at"] = json!(fmt_ms(dag.created_ms));
    v["next_fire_times"] = json!(next);
    v["last_fired_window_end"] = json!(cursor.map(fmt_ms));
    Ok(Json(v).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /dags?limit=&cursor=`: the tenant's DAGs in id order.
pub async fn list(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let Query(q) = q.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = page_limit(q.limit)?;
    let after = decode_cursor(q.cursor.as_deref())?;
    st.node.linearizable_barrier().await?;
    let prefix = keys::prefix(&[p.tenant.as_bytes()]);
    let mut out = Vec::new();
    let mut last = after.clone();
    let mut more = false;
    loop {
        let page = st
            .node
            .db
            .scan_prefix(Table::Dags, &prefix, last.as_deref(), limit + 1)?;
        let exhausted = page.len() <= limit;
        for (k, v) in page {
            if out.len() == limit {
                more = true;
                break;
            }
            last = Some(k);
            let dag: Dag =
                serde_json::from_slice(&v).map_err(|e| ApiError::Internal(e.to_string()))?;
            if !dag.deleted {
                out.push(list_item(&st, &p.tenant, &dag)?);
            }
        }
        if more || exhausted {
            break;
        }
    }
    let next = if more { last.map(hex::encode) } else { None };
    Ok(Json(json!({"dags": out, "next_cursor": next})).into_response())
}

async fn set_paused(
    st: ApiState,
    p: Principal,
    headers: HeaderMap,
    dag_id: String,
    paused: bool,
) -> Result<Response, ApiError> {
    let route = if paused {
        "POST /dags/pause"
    } else {
        "POST /dags/unpause"
    };
    let cmd = Command::SetPaused {
        tenant: p.tenant.clone(),
        dag_id: dag_id.clone(),
        paused,
    };
    act(&st, &p, &headers, route, &dag_id, cmd, |o| match o {
        Outcome::DagPaused {
            dag_id,
            version,
            paused,
        } => {
            let status = if paused { "paused" } else { "active" };
            Ok(json!({"dag_id": dag_id, "status": status, "version": version}))
        }
        o => Err(o),
    })
    .await
}

/// `POST /dags/{dag_id}/pause`: stop firing its schedule (runs in flight continue).
pub async fn pause(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(dag_id): Path<String>,
) -> Result<Response, ApiError> {
    set_paused(st, p, headers, dag_id, true).await
}

/// `POST /dags/{dag_id}/unpause`.
pub async fn unpause(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(dag_id): Path<String>,
) -> Result<Response, ApiError> {
    set_paused(st, p, headers, dag_id, false).await
}

/// `DELETE /dags/{dag_id}`: stops scheduling; its runs stay readable.
pub async fn delete(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(dag_id): Path<String>,
) -> Result<Response, ApiError> {
    let cmd = Command::DeleteDag {
        tenant: p.tenant.clone(),
        dag_id: dag_id.clone(),
    };
    act(
        &st,
        &p,
        &headers,
        "DELETE /dags",
        &dag_id,
        cmd,
        |o| match o {
            Outcome::DagDeleted { dag_id } => Ok(json!({"dag_id": dag_id, "status": "deleted"})),
            o => Err(o),
        },
    )
    .await
}

//! DAG endpoints: submit (create or update) and its dry run (plan), list, get, pause,
//! unpause, delete, and the definition of every version.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::routes::{
    act, commit, decode_cursor, fmt_ms, json_body, page_limit, stamp, version_conflict,
    with_replay, ApiState,
};
use crate::auth::{Access, Principal};
use crate::dag::{self, DagInput};
use crate::schedule::Schedule;
use crate::state::machine::{keys, put_decision, version_of_key, PutDecision};
use crate::state::model::{Dag, DagSpec, Run, TaskKind};
use crate::state::{Command, Outcome, Table};

/// Whether a DAG's schedule fires.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DagStatus {
    Active,
    Paused,
    Deleted,
}

fn status_of(dag: &Dag) -> DagStatus {
    if dag.deleted {
        DagStatus::Deleted
    } else if dag.spec.paused {
        DagStatus::Paused
    } else {
        DagStatus::Active
    }
}

fn paused_status(paused: bool) -> DagStatus {
    if paused {
        DagStatus::Paused
    } else {
        DagStatus::Active
    }
}

/// The answer to a write on a DAG.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"dag_id": "sales_gdp", "status": "active", "version": 1}))]
pub struct DagAck {
    #[schema(schema_with = super::schema::id)]
    pub dag_id: String,
    pub status: DagStatus,
    /// The DAG's version after the write (absent after a delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// A DAG in a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct DagSummary {
    #[schema(schema_with = super::schema::id)]
    pub dag_id: String,
    pub status: DagStatus,
    pub version: u64,
    pub owner: Option<String>,
    pub schedule: Option<String>,
    pub timezone: String,
    /// How many tasks the DAG has.
    pub tasks: usize,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// The token subject that created the DAG (recorded from protocol 3).
    pub created_by: Option<String>,
    /// The token subject of the latest change (recorded from protocol 3).
    pub updated_by: Option<String>,
}

/// A DAG in the list: its summary, the next time its schedule fires and its newest run
/// (what an overview page shows without a request per DAG).
#[derive(Debug, Serialize, ToSchema)]
pub struct DagListItem {
    #[serde(flatten)]
    pub summary: DagSummary,
    /// The next window end the schedule fires at (null without a schedule).
    #[schema(format = DateTime)]
    pub next_fire_time: Option<String>,
    /// The DAG's newest run, if any.
    pub last_run: Option<LastRun>,
}

/// The newest run of a DAG, in the list.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastRun {
    #[schema(schema_with = super::schema::run_id)]
    pub run_id: String,
    pub state: crate::state::model::RunState,
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// A page of DAGs in id order.
#[derive(Debug, Serialize, ToSchema)]
pub struct DagList {
    pub dags: Vec<DagListItem>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One DAG: its summary, current definition and next fire times.
#[derive(Debug, Serialize, ToSchema)]
pub struct DagDetail {
    #[serde(flatten)]
    pub summary: DagSummary,
    /// The stored definition (validated, defaults filled in, durations in ms).
    pub definition: DagSpec,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The next (up to 3) scheduled window ends; empty without a schedule.
    pub next_fire_times: Vec<String>,
    /// The end of the last window the scheduler fired, if any.
    #[schema(format = DateTime)]
    pub last_fired_window_end: Option<String>,
}

/// The `{dag_id}` of a DAG path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DagPath {
    /// The DAG's id.
    #[param(schema_with = super::schema::id)]
    pub dag_id: String,
}

/// Optional headers of `POST /dags`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct SubmitHeaders {
    /// Optimistic concurrency: apply the update only if the DAG's version is this one
    /// (as `version` in the body; when both are sent they must agree). An optionally
    /// quoted number.
    #[param(rename = "If-Match", value_type = String, required = false, pattern = r#"^"*[0-9]{1,19}"*$"#)]
    pub if_match: Option<String>,
}

impl SubmitHeaders {
    fn read(headers: &HeaderMap) -> Result<SubmitHeaders, ApiError> {
        let if_match = headers
            .get(header::IF_MATCH)
            .map(|v| v.to_str().map(str::to_string))
            .transpose()
            .map_err(|_| {
                ApiError::InvalidRequest("If-Match must be a DAG version number".into())
            })?;
        Ok(SubmitHeaders { if_match })
    }
}

/// The version an `If-Match` names: an optionally quoted run of 1 to 19 digits (what its
/// schema pattern says; `+1` or 20 digits, which `u64::from_str` would take, are refused).
fn if_match_version(v: &str) -> Result<u64, ApiError> {
    if v.trim() == "*" {
        return Err(ApiError::InvalidRequest(
            "If-Match: * is not supported; send the DAG version the update is based on".into(),
        ));
    }
    let digits = v.trim_matches('"');
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::InvalidRequest(
            "If-Match must be a DAG version number".into(),
        ));
    }
    digits
        .parse()
        .map_err(|_| ApiError::InvalidRequest("If-Match must be a DAG version number".into()))
}

/// `POST /dags`: create or update. `version` in the body or `If-Match` guards updates.
#[utoipa::path(
    post,
    path = "/dags",
    tag = "dags",
    operation_id = "submit_dag",
    summary = "Create or update a DAG",
    description = "Validates the definition (ids, schedule, timezone, durations, dates, task kinds, \
known and acyclic dependencies) before anything is stored. A new DAG starts at version 1; \
each update adds one. `version` in the body (or `If-Match`) makes the update conditional.",
    params(SubmitHeaders),
    request_body(
        content = DagInput,
        description = "The DAG definition; unknown fields are rejected by name.",
        example = json!({"dag_id": "sales_gdp", "schedule": "0 2 * * *", "owner": "team-data"}),
    ),
    responses(
        (status = 200, description = "Stored. A replay of an idempotent request says `Idempotent-Replayed: true`.",
            body = DagAck, example = json!({"dag_id": "sales_gdp", "status": "active", "version": 1})),
        (status = 400, description = "Malformed JSON, or a definition that does not validate: a bad id, \
a cron expression whose fields are out of range, an end_date not after start_date, two tasks with one \
`task_id`, a dependency on an unknown task, a cycle, a timeout of 0, an `If-Match` that is not a version number or that disagrees with `version` \
in the body; or a tenant quota (`limits.min_schedule_interval_ms`, `limits.max_dags_per_tenant`). The message \
names the field.", body = ErrorBody),
        (status = 403, description = "The token lacks `orchestrator:write`; or the DAG has a shell task and the \
token lacks `orchestrator:shell` or the cluster runs without `executor.shell_enabled`.", body = ErrorBody),
        (status = 409, description = "`version_conflict`: the DAG is not at the version the update is based on; \
`idempotency_key_reused`: this `X-Request-Id` was used with another body.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn submit(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Submission {
        raw,
        spec,
        expected_version,
    } = checked_submission(&st, &p, &headers, body)?;
    let paused = spec.paused;
    let cmd = Command::PutDag {
        tenant: p.tenant.clone(),
        spec,
        expected_version,
    };
    let (outcome, replayed) =
        commit(&st, stamp(&st, &p, &headers, "POST /dags", &raw, cmd)).await?;
    let Outcome::DagPut {
        dag_id, version, ..
    } = outcome
    else {
        return Err(ApiError::Internal(format!(
            "unexpected outcome {outcome:?}"
        )));
    };
    let ack = DagAck {
        dag_id,
        status: paused_status(paused),
        version: Some(version),
    };
    Ok(with_replay(Json(ack).into_response(), replayed))
}

/// A `POST /dags` body that passed every check before the commit.
struct Submission {
    raw: Value,
    spec: DagSpec,
    expected_version: Option<u64>,
}

/// The checks of a DAG write before its commit (a dry run makes the same): the write
/// scope, a valid definition, the shell capability, the tenant's limits, and the version
/// the write is based on.
fn checked_submission(
    st: &ApiState,
    p: &Principal,
    headers: &HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Submission, ApiError> {
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
    check_limits(st, &p.tenant, &spec)?;
    let if_match = SubmitHeaders::read(headers)?
        .if_match
        .map(|v| if_match_version(&v))
        .transpose()?;
    let expected_version = match (input.version, if_match) {
        (Some(body), Some(header)) if body != header => {
            return Err(ApiError::InvalidRequest(format!(
                "version {body} in the body and If-Match {header} disagree; send one of them"
            )))
        }
        (body, header) => body.or(header),
    };
    Ok(Submission {
        raw,
        spec,
        expected_version,
    })
}

/// What a DAG write would do (see [`DagPlan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DagChange {
    /// No live DAG has this id: version 1, or the next version of a deleted one.
    Created,
    /// A new version of the live DAG.
    Updated,
    /// The live DAG already has this definition: nothing would be written.
    Unchanged,
}

/// The answer to a dry run of a DAG write.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"dag_id": "sales_gdp", "change": "updated", "status": "active", "version": 3, "current_version": 2}))]
pub struct DagPlan {
    #[schema(schema_with = super::schema::id)]
    pub dag_id: String,
    pub change: DagChange,
    /// The DAG's status after the write.
    pub status: DagStatus,
    /// The DAG's version after the write.
    pub version: u64,
    /// The live DAG's version now (absent: no live DAG has this id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

/// `POST /dags/{dag_id}/plan`: a dry run of `POST /dags`.
#[utoipa::path(
    post,
    path = "/dags/{dag_id}/plan",
    tag = "dags",
    operation_id = "plan_dag",
    summary = "Dry-run a DAG write",
    description = "Makes every check `POST /dags` makes (the same body, `If-Match` and scopes) against \
the current state, and says what the write would do, without writing anything. The body's `dag_id` must \
be the path's. A separate path rather than a flag on `POST /dags`, so that a server without it answers \
404 or 405 instead of writing. The DAG quota is checked against this node's replica after a linearizable \
read barrier; a write made afterwards may still be refused if other writes came between.",
    params(DagPath, SubmitHeaders),
    request_body(
        content = DagInput,
        description = "The DAG definition, as for `POST /dags`.",
        example = json!({"dag_id": "sales_gdp", "schedule": "0 2 * * *", "owner": "team-data"}),
    ),
    responses(
        (status = 200, description = "What the write would do; nothing was written.", body = DagPlan),
        (status = 400, description = "What `POST /dags` would refuse with 400, or a body whose `dag_id` \
is not the path's.", body = ErrorBody),
        (status = 403, description = "What `POST /dags` would refuse with 403.", body = ErrorBody),
        (status = 409, description = "`version_conflict`: the DAG is not at the version the write is based on.",
            body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn plan(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(DagPath { dag_id }): Path<DagPath>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<DagPlan>, ApiError> {
    p.require(Access::Write)?;
    // The limits and the decision read this replica: make it as new as a write would see.
    st.node.linearizable_barrier().await?;
    let Submission {
        spec,
        expected_version,
        ..
    } = checked_submission(&st, &p, &headers, body)?;
    if spec.dag_id != dag_id {
        return Err(ApiError::InvalidRequest(format!(
            "dag_id: '{}' in the body is not '{dag_id}' in the path",
            spec.dag_id
        )));
    }
    let existing = st
        .node
        .db
        .get_json::<Dag>(Table::Dags.name(), &keys::dag(&p.tenant, &dag_id))?;
    let decision = put_decision(existing.as_ref(), &spec, expected_version);
    let change = match decision {
        PutDecision::Conflict { expected, current } => {
            return Err(version_conflict(expected, current))
        }
        PutDecision::Unchanged { .. } => DagChange::Unchanged,
        PutDecision::Write { creates: true, .. } => DagChange::Created,
        PutDecision::Write { .. } => DagChange::Updated,
    };
    Ok(Json(DagPlan {
        dag_id,
        change,
        status: paused_status(spec.paused),
        version: decision.version(),
        current_version: existing.filter(|d| !d.deleted).map(|d| d.version),
    }))
}

/// Per-tenant quotas (`limits.*`, with the tenant's overrides): tasks per DAG, the
/// shortest schedule interval and, for a new DAG, the number of live DAGs. The DAG
/// count is checked here against this replica only to spare a doomed write; apply
/// enforces it race-free ([`crate::quota`]).
fn check_limits(st: &ApiState, tenant: &str, spec: &DagSpec) -> Result<(), ApiError> {
    let limits = st.node.config().limits.for_tenant(tenant);
    if let Some(t) = spec.tasks.iter().find(|t| {
        t.timeout_ms
            .is_some_and(|ms| ms > limits.max_task_timeout_ms)
    }) {
        return Err(ApiError::InvalidRequest(format!(
            "tasks: task '{}' has a timeout of {} ms; limits.max_task_timeout_ms allows {} ms",
            t.task_id,
            t.timeout_ms.unwrap_or_default(),
            limits.max_task_timeout_ms
        )));
    }
    if spec.tasks.len() as u64 > limits.max_tasks_per_dag {
        return Err(ApiError::InvalidRequest(format!(
            "tasks: has {} tasks; limits.max_tasks_per_dag allows {}",
            spec.tasks.len(),
            limits.max_tasks_per_dag
        )));
    }
    if let Some(expr) = &spec.schedule {
        if let Ok(schedule) = Schedule::parse(expr, &spec.timezone) {
            let times = schedule.upcoming(st.node.clock.now_ms(), 32);
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
        let usage = st.node.sm.tenant_counts().usage(tenant, &spec.dag_id);
        crate::quota::check_new_dag(usage, tenant, &(&limits).into())
            .map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
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

fn summary(dag: &Dag) -> DagSummary {
    DagSummary {
        dag_id: dag.spec.dag_id.clone(),
        status: status_of(dag),
        version: dag.version,
        owner: dag.spec.owner.clone(),
        schedule: dag.spec.schedule.clone(),
        timezone: dag.spec.timezone.clone(),
        tasks: dag.spec.tasks.len(),
        updated_at: fmt_ms(dag.updated_ms),
        created_by: dag.created_by.clone(),
        updated_by: dag.updated_by.clone(),
    }
}

/// A DAG in the list (see [`DagListItem`]).
fn list_item(st: &ApiState, tenant: &str, dag: &Dag) -> Result<DagListItem, ApiError> {
    let next = dag
        .spec
        .schedule
        .as_deref()
        .and_then(|s| Schedule::parse(s, &dag.spec.timezone).ok())
        .and_then(|s| s.upcoming(st.node.clock.now_ms(), 1).into_iter().next());
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
            .map(|r| LastRun {
                run_id: r.run_id,
                state: r.state,
                created_at: fmt_ms(r.created_ms),
            }),
        None => None,
    };
    Ok(DagListItem {
        summary: summary(dag),
        next_fire_time: next.map(fmt_ms),
        last_run,
    })
}

/// `GET /dags/{dag_id}`: the current definition, version and next scheduled windows.
#[utoipa::path(
    get,
    path = "/dags/{dag_id}",
    tag = "dags",
    operation_id = "get_dag",
    summary = "Get a DAG",
    description = "The current definition and version, the next fire times and the last fired window.",
    params(DagPath),
    responses(
        (status = 200, description = "The DAG.", body = DagDetail),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn get_one(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(DagPath { dag_id }): Path<DagPath>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let dag = load(&st, &p.tenant, &dag_id).await?;
    let next: Vec<String> = dag
        .spec
        .schedule
        .as_deref()
        .and_then(|s| Schedule::parse(s, &dag.spec.timezone).ok())
        .map(|s| {
            s.upcoming(st.node.clock.now_ms(), 3)
                .into_iter()
                .map(fmt_ms)
                .collect()
        })
        .unwrap_or_default();
    let cursor = st
        .node
        .db
        .get(Table::Cursors.name(), &keys::dag(&p.tenant, &dag_id))?
        .and_then(|b| keys::from_ordered_i64(&b));
    let detail = DagDetail {
        summary: summary(&dag),
        created_at: fmt_ms(dag.created_ms),
        next_fire_times: next,
        last_fired_window_end: cursor.map(fmt_ms),
        definition: dag.spec,
    };
    Ok(Json(detail).into_response())
}

/// Paging of `GET /dags` and `GET /dags/{dag_id}/versions`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(schema_with = super::schema::cursor)]
    cursor: Option<String>,
}

/// One version of a DAG's definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct DagVersionOut {
    pub dag_id: String,
    /// 1 for the first definition; every change (update, pause, unpause) adds one, and a
    /// DAG re-created after a delete goes on from its last version.
    pub version: u64,
    /// The definition as stored at that version (defaults filled in, durations in ms).
    pub definition: DagSpec,
}

/// A page of a DAG's versions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DagVersionList {
    pub versions: Vec<DagVersionOut>,
    /// Pass as `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// The `{dag_id}` and `{version}` of a DAG version path.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DagVersionPath {
    #[param(schema_with = super::schema::id)]
    pub dag_id: String,
    /// The version number (1 for the first definition).
    #[param(value_type = u64, minimum = 1, maximum = 18446744073709551615_u64)]
    pub version: String,
}

/// `GET /dags/{dag_id}/versions?limit=&cursor=`: every definition, newest first.
#[utoipa::path(
    get,
    path = "/dags/{dag_id}/versions",
    tag = "dags",
    operation_id = "list_dag_versions",
    summary = "List a DAG's versions",
    description = "Every kept definition of a live DAG, newest first, a page at a time: what each run \
ran with (a run's `dag_version`) and what each change changed. The newest `limits.max_dag_versions` \
are kept, and any older one an unfinished run still executes.",
    params(DagPath, ListQuery),
    responses(
        (status = 200, description = "A page of versions.", body = DagVersionList),
        (status = 400, description = "A query parameter this endpoint does not take, a `limit` outside \
1-500, or a `cursor` this API did not return.", body = ErrorBody),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn list_versions(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(DagPath { dag_id }): Path<DagPath>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let Query(q) = q.map_err(|e| ApiError::InvalidRequest(e.body_text()))?;
    let limit = page_limit(q.limit)?;
    let prefix = keys::prefix(&[p.tenant.as_bytes(), dag_id.as_bytes()]);
    let before = decode_cursor(q.cursor.as_deref(), &prefix)?;
    load(&st, &p.tenant, &dag_id).await?;
    let page =
        st.node
            .db
            .scan_prefix_rev(Table::DagVersions, &prefix, before.as_deref(), limit + 1)?;
    let more = page.len() > limit;
    let mut versions = Vec::with_capacity(limit.min(page.len()));
    let mut last = None;
    for (k, v) in page.into_iter().take(limit) {
        let version = version_of_key(&prefix, &k)
            .ok_or_else(|| ApiError::Internal("a DAG version key without its version".into()))?;
        let definition: DagSpec =
            serde_json::from_slice(&v).map_err(|e| ApiError::Internal(e.to_string()))?;
        versions.push(DagVersionOut {
            dag_id: dag_id.clone(),
            version,
            definition,
        });
        last = Some(k);
    }
    let next_cursor = if more { last.map(hex::encode) } else { None };
    Ok(Json(DagVersionList {
        versions,
        next_cursor,
    })
    .into_response())
}

/// `GET /dags/{dag_id}/versions/{version}`: one definition.
#[utoipa::path(
    get,
    path = "/dags/{dag_id}/versions/{version}",
    tag = "dags",
    operation_id = "get_dag_version",
    summary = "Get one version of a DAG",
    description = "The definition a live DAG had at `version`, for example the one a run ran with.",
    params(DagVersionPath),
    responses(
        (status = 200, description = "The version.", body = DagVersionOut),
        (status = 400, description = "`version` is not a number from 1 up.", body = ErrorBody),
        (status = 404, description = "No live DAG with this id in the caller's tenant, or no such version \
(never written, or older than the versions kept).",
            body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:read"]))
)]
pub async fn get_version(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    Path(DagVersionPath { dag_id, version }): Path<DagVersionPath>,
) -> Result<Response, ApiError> {
    p.require(Access::Read)?;
    let version: u64 = version
        .parse()
        .ok()
        .filter(|v| *v >= 1 && version.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!("version '{version}' is not a number from 1 up"))
        })?;
    let dag = load(&st, &p.tenant, &dag_id).await?;
    let definition = st
        .node
        .db
        .get_json::<DagSpec>(
            Table::DagVersions.name(),
            &keys::dag_version(&p.tenant, &dag_id, version),
        )?
        .ok_or_else(|| {
            ApiError::NotFound(if version < dag.version {
                let kept = st
                    .node
                    .config()
                    .limits
                    .for_tenant(&p.tenant)
                    .max_dag_versions;
                format!(
                    "version {version} of dag '{dag_id}' is no longer kept \
                     (limits.max_dag_versions keeps the newest {kept})"
                )
            } else {
                format!(
                    "dag '{dag_id}' has no version {version} (its newest is {})",
                    dag.version
                )
            })
        })?;
    Ok(Json(DagVersionOut {
        dag_id,
        version,
        definition,
    })
    .into_response())
}

/// `GET /dags?limit=&cursor=`: the tenant's DAGs in id order.
#[utoipa::path(
    get,
    path = "/dags",
    tag = "dags",
    operation_id = "list_dags",
    summary = "List DAGs",
    description = "The caller's tenant's live DAGs in id order, a page at a time.",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of DAGs.", body = DagList),
        (status = 400, description = "A query parameter this endpoint does not take, a `limit` outside \
1-500, or a `cursor` this API did not return.", body = ErrorBody),
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
    let prefix = keys::prefix(&[p.tenant.as_bytes()]);
    let after = decode_cursor(q.cursor.as_deref(), &prefix)?;
    st.node.linearizable_barrier().await?;
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
    Ok(Json(DagList {
        dags: out,
        next_cursor: next,
    })
    .into_response())
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
        } => Ok(json!(DagAck {
            dag_id,
            status: paused_status(paused),
            version: Some(version),
        })),
        o => Err(o),
    })
    .await
}

/// `POST /dags/{dag_id}/pause`: stop firing its schedule (runs in flight continue).
#[utoipa::path(
    post,
    path = "/dags/{dag_id}/pause",
    tag = "dags",
    operation_id = "pause_dag",
    summary = "Pause a DAG's schedule",
    description = "Its schedule stops firing; runs in flight go on. Pausing a paused DAG is not an error. \
Takes no body (one sent is ignored).",
    params(DagPath),
    responses(
        (status = 200, description = "Paused.", body = DagAck,
            example = json!({"dag_id": "sales_gdp", "status": "paused", "version": 2})),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: this `X-Request-Id` was used for another request.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn pause(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(DagPath { dag_id }): Path<DagPath>,
) -> Result<Response, ApiError> {
    set_paused(st, p, headers, dag_id, true).await
}

/// `POST /dags/{dag_id}/unpause`.
#[utoipa::path(
    post,
    path = "/dags/{dag_id}/unpause",
    tag = "dags",
    operation_id = "unpause_dag",
    summary = "Unpause a DAG's schedule",
    description = "Its schedule fires again (missed windows are fired only with `catchup`). \
Takes no body (one sent is ignored).",
    params(DagPath),
    responses(
        (status = 200, description = "Active.", body = DagAck,
            example = json!({"dag_id": "sales_gdp", "status": "active", "version": 3})),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: this `X-Request-Id` was used for another request.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn unpause(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(DagPath { dag_id }): Path<DagPath>,
) -> Result<Response, ApiError> {
    set_paused(st, p, headers, dag_id, false).await
}

/// `DELETE /dags/{dag_id}`: stops scheduling; its runs stay readable.
#[utoipa::path(
    delete,
    path = "/dags/{dag_id}",
    tag = "dags",
    operation_id = "delete_dag",
    summary = "Delete a DAG",
    description = "Scheduling stops and the DAG leaves the list; its runs stay readable. \
Submitting the same id again creates it anew.",
    params(DagPath),
    responses(
        (status = 200, description = "Deleted.", body = DagAck,
            example = json!({"dag_id": "sales_gdp", "status": "deleted"})),
        (status = 404, description = "No live DAG with this id in the caller's tenant.", body = ErrorBody),
        (status = 409, description = "`idempotency_key_reused`: this `X-Request-Id` was used for another request.", body = ErrorBody),
    ),
    security(("bearer" = ["orchestrator:write"]))
)]
pub async fn delete(
    State(st): State<ApiState>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    Path(DagPath { dag_id }): Path<DagPath>,
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
            Outcome::DagDeleted { dag_id } => Ok(json!(DagAck {
                dag_id,
                status: DagStatus::Deleted,
                version: None,
            })),
            o => Err(o),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_takes_what_its_pattern_says_and_nothing_else() {
        for (v, want) in [("7", 7), ("\"7\"", 7), ("\"\"12\"", 12), ("0000", 0)] {
            assert_eq!(if_match_version(v).ok(), Some(want), "{v}");
        }
        let twenty = "1".repeat(20);
        for v in [
            "", "\"\"", "+1", "\"+1\"", "-1", " 1", "1.0", "null", "W/\"1\"", &twenty,
        ] {
            assert!(if_match_version(v).is_err(), "{v:?} must be refused");
        }
    }
}

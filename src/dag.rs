//! DAG definitions as users write them ([`DagInput`]) and their validation into a
//! [`DagSpec`]: ids, schedule, timezone, durations, task kinds, dependencies and
//! acyclicity. Every error names the field and says how to fix it. Validation happens
//! before anything is proposed; the state machine trusts a validated spec.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, TimeZone};
use petgraph::graph::DiGraph;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::schedule::{parse_timezone, Schedule};
use crate::state::model::{DagSpec, TaskKind, TaskSpec};

pub const MAX_TASKS: usize = 1000;
pub const MAX_ID_LEN: usize = 128;
/// What [`check_id`] accepts, as a JSON Schema (ECMA-262) pattern: 1-128 of
/// `[A-Za-z0-9_.-]`, but not `.` or `..`. The length is also given as `maxLength`.
pub const ID_PATTERN: &str = r"^([A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,126}|\.\.[A-Za-z0-9_.-]{1,126})$";
/// What [`parse_duration`] accepts: `30s`, `5m`, `1h30m`, `250ms`, `2d`; numbers of up to
/// 9 digits, in at most [`MAX_DURATION_LEN`] characters (so no accepted duration
/// overflows: the schema's bounds are the parser's).
/// Spaces, tabs and line breaks may surround it: only these, as ECMA-262's `\s` and
/// Rust's `trim` disagree on the rest of Unicode's white space.
pub const DURATION_PATTERN: &str = r"^[ \t\r\n]*([0-9]{1,9}(ms|s|m|h|d))+[ \t\r\n]*$";
/// Longest duration, in characters.
pub const MAX_DURATION_LEN: usize = 64;
/// The longest duration a DAG may declare (`sla`, a task's `timeout`, `retry_delay`,
/// `max_retry_delay`): a year and a day. Deadlines and retry times derived from them stay within what RFC 3339 writes
/// (four-digit years), and none of them means anything longer.
pub const MAX_DAG_DURATION_MS: u64 = 366 * 86_400_000;
/// Longest `owner`, in characters.
pub const MAX_OWNER_CHARS: usize = 256;
/// Longest URL of an http task or a webhook.
pub const MAX_URL_LEN: usize = 2048;

/// A validation failure: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Error {
    pub field: String,
    pub message: String,
}

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Error> {
    Err(Error {
        field: field.into(),
        message: message.into(),
    })
}

/// A DAG as submitted to `POST /dags`. Unknown fields are rejected by name. The schema
/// attributes are the OpenAPI document's description of what [`validate`] accepts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"dag_id": "sales_gdp", "schedule": "0 2 * * *", "owner": "team-data"}))]
pub struct DagInput {
    /// The DAG's id, unique in the tenant.
    #[schema(schema_with = crate::api::schema::id)]
    pub dag_id: String,
    /// A 5-field cron expression (`0 2 * * *`), 6 fields with seconds first, or a macro
    /// (`@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`),
    /// read in `timezone`. Without one the DAG only runs when triggered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::cron)]
    pub schedule: Option<String>,
    /// The IANA timezone the schedule and dates are read in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::timezone)]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub owner: Option<String>,
    /// Fire the windows missed while the DAG was paused or before it existed (from
    /// `start_date`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = false)]
    pub catchup: Option<bool>,
    /// Runs of this DAG in flight at once.
    #[serde(default)]
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 10000, default = 16)]
    pub max_active_runs: Option<u32>,
    /// A run not finished this long after its window closed misses its SLA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::duration)]
    pub sla: Option<String>,
    /// Create the DAG paused (its schedule does not fire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = false)]
    pub paused: Option<bool>,
    /// First window to schedule: a date (midnight in `timezone`) or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::instant)]
    pub start_date: Option<String>,
    /// No window after this (must be after `start_date`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::instant_end)]
    pub end_date: Option<String>,
    /// Called (POST, JSON) when a run finishes or misses its SLA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::url)]
    pub webhook: Option<String>,
    /// The tasks, their kinds and dependencies (acyclic; ids unique).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 1000)]
    pub tasks: Vec<TaskInput>,
    /// Optimistic concurrency: the version this update is based on (0 = create only).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schema(minimum = 0)]
    pub version: Option<u64>,
}

/// A task as submitted. Which fields a kind takes (`command` for shell, `url` for http,
/// neither for noop) is stated in the OpenAPI document by `crate::api::openapi`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskInput {
    /// Unique in the DAG.
    #[schema(schema_with = crate::api::schema::id)]
    pub task_id: String,
    /// `shell` runs `command` with /bin/sh -c (needs the orchestrator:shell scope and a
    /// cluster with executor.shell_enabled); `http` calls `url`; `noop` does nothing.
    #[schema(schema_with = crate::api::schema::task_kind)]
    pub kind: String,
    /// shell: the command; `{{ run_id }}`, `{{ window_start }}`, ... are templated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"\S")]
    pub command: Option<String>,
    /// http: the method, in any case (default GET).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// http: the URL to call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::url)]
    pub url: Option<String>,
    /// http: request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// http: the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// http: the status (100-599) that counts as success (default: any 2xx).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schema(maximum = 65535)]
    pub expect_status: Option<u16>,
    /// Ids of tasks of this DAG that must be done first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = crate::api::schema::id_list)]
    pub depends_on: Vec<String>,
    /// Attempts after the first failure.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole"
    )]
    #[schema(minimum = 0, maximum = 100, default = 0)]
    pub retries: Option<u32>,
    /// Wait before a retry (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::duration)]
    pub retry_delay: Option<String>,
    /// Double the delay at each retry, up to `max_retry_delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = false)]
    pub retry_exponential: Option<bool>,
    /// Longest delay between retries (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::duration)]
    pub max_retry_delay: Option<String>,
    /// Kill an attempt after this long (more than 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::api::schema::duration)]
    pub timeout: Option<String>,
}

/// serde: an optional whole number, which JSON may spell `16` or `16.0` (JSON Schema's
/// `integer` admits both, so a schema-valid body may hold either). A fraction, a negative
/// number or one out of the field's range is refused.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error as _;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    let Some(v) = whole else {
        return Err(D::Error::custom(format!(
            "{n} is not a whole number from 0"
        )));
    };
    T::try_from(v)
        .map_err(|_| D::Error::custom(format!("{n} is out of range")))
        .map(Some)
}

/// Parse `90s`, `5m`, `1h30m`, `250ms`, `2d` into milliseconds.
pub fn parse_duration(field: &str, s: &str) -> Result<u64, Error> {
    if s.chars().count() > MAX_DURATION_LEN {
        return err(
            field,
            format!("a duration has at most {MAX_DURATION_LEN} characters"),
        );
    }
    let s = s.trim_matches([' ', '\t', '\r', '\n']);
    if s.is_empty() {
        return err(field, "empty duration; write e.g. 30s, 5m, 1h30m");
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return err(
                field,
                format!("'{s}' is not a duration; write e.g. 30s, 5m, 1h30m"),
            );
        }
        if digits > 9 {
            return err(field, format!("'{s}' has a number of more than 9 digits"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| Error {
            field: field.into(),
            message: format!("'{s}' is too large"),
        })?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return err(
                    field,
                    format!("'{s}' has unit '{unit}'; use ms, s, m, h or d"),
                )
            }
        };
        total = n
            .checked_mul(ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| Error {
                field: field.into(),
                message: format!("'{s}' is too large"),
            })?;
    }
    Ok(total)
}

/// [`parse_duration`], at most [`MAX_DAG_DURATION_MS`].
fn bounded_duration(field: &str, s: &str) -> Result<u64, Error> {
    let ms = parse_duration(field, s)?;
    if ms > MAX_DAG_DURATION_MS {
        return err(
            field,
            format!("'{s}' is longer than a year and a day (366d)"),
        );
    }
    Ok(ms)
}

/// Parse a date (`2025-10-01`, midnight in `tz`) or an RFC 3339 instant into epoch ms.
pub fn parse_instant(field: &str, s: &str, tz: &str) -> Result<i64, Error> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| Error {
        field: field.into(),
        message: format!(
            "'{s}' is neither a date (2025-10-01) nor an RFC 3339 time (2025-10-01T02:00:00Z)"
        ),
    })?;
    let tz = parse_timezone(tz).map_err(|m| Error {
        field: "timezone".into(),
        message: m,
    })?;
    let midnight = date.and_hms_opt(0, 0, 0).ok_or_else(|| Error {
        field: field.into(),
        message: format!("'{s}' has no midnight"),
    })?;
    tz.from_local_datetime(&midnight)
        .earliest()
        .map(|t| t.timestamp_millis())
        .ok_or_else(|| Error {
            field: field.into(),
            message: format!("midnight of '{s}' does not exist in this timezone"),
        })
}

/// Check an identifier: 1-128 characters of letters, digits, `_`, `-`, `.`.
pub fn check_id(field: &str, id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return err(field, format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return err(
            field,
            format!("'{id}' contains '{c}'; use letters, digits, '_', '-' and '.'"),
        );
    }
    // Ids name directories (logs, work dirs): '.' and '..' would step out of them.
    if id == "." || id == ".." {
        return err(field, format!("'{id}' is not a usable id"));
    }
    Ok(())
}

fn check_url(field: &str, url: &str) -> Result<(), Error> {
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.chars().count() > MAX_URL_LEN
    {
        return err(field, format!("'{url}' must be an http:// or https:// URL"));
    }
    // A templated URL (`{{ }}`, rendered per attempt) is parsed when it runs; here it
    // must at least name a host.
    if url.contains("{{") {
        let authority = url.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?', '#']).next().unwrap_or("")
        });
        return if authority.is_empty() {
            err(field, format!("'{url}' names no host"))
        } else {
            Ok(())
        };
    }
    match reqwest::Url::parse(url) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        Ok(_) => err(field, format!("'{url}' names no host")),
        Err(e) => err(field, format!("'{url}' is not a usable URL: {e}")),
    }
}

fn task_kind(prefix: &str, t: &TaskInput) -> Result<TaskKind, Error> {
    let unexpected = |name: &str, present: bool| -> Result<(), Error> {
        if present {
            err(
                format!("{prefix}.{name}"),
                format!("is not used by kind '{}'", t.kind),
            )
        } else {
            Ok(())
        }
    };
    match t.kind.as_str() {
        "shell" => {
            let command = t.command.clone().unwrap_or_default();
            if command.trim().is_empty() {
                return err(format!("{prefix}.command"), "a shell task needs a command");
            }
            unexpected("url", t.url.is_some())?;
            Ok(TaskKind::Shell { command })
        }
        "http" => {
            let url = t.url.clone().unwrap_or_default();
            check_url(&format!("{prefix}.url"), &url)?;
            unexpected("command", t.command.is_some())?;
            let method = t
                .method
                .clone()
                .unwrap_or_else(|| "GET".into())
                .to_ascii_uppercase();
            if !matches!(
                method.as_str(),
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD"
            ) {
                return err(
                    format!("{prefix}.method"),
                    format!("'{method}' is not GET, POST, PUT, PATCH, DELETE or HEAD"),
                );
            }
            if let Some(s) = t.expect_status {
                if !(100..=599).contains(&s) {
                    return err(
                        format!("{prefix}.expect_status"),
                        "must be an HTTP status 100-599",
                    );
                }
            }
            Ok(TaskKind::Http {
                method,
                url,
                headers: t.headers.clone(),
                body: t.body.clone(),
                expect_status: t.expect_status,
            })
        }
        "noop" => {
            unexpected("command", t.command.is_some())?;
            unexpected("url", t.url.is_some())?;
            Ok(TaskKind::Noop)
        }
        other => err(
            format!("{prefix}.kind"),
            format!("'{other}' is not one of shell, http, noop"),
        ),
    }
}

/// Validate a submitted DAG into the spec the state machine stores.
pub fn validate(input: &DagInput) -> Result<DagSpec, Error> {
    check_id("dag_id", &input.dag_id)?;
    let timezone = input.timezone.clone().unwrap_or_else(|| "UTC".into());
    parse_timezone(&timezone).map_err(|m| Error {
        field: "timezone".into(),
        message: m,
    })?;
    if let Some(s) = &input.schedule {
        Schedule::parse(s, &timezone).map_err(|m| Error {
            field: "schedule".into(),
            message: m,
        })?;
    }
    if let Some(o) = &input.owner {
        if o.chars().count() > MAX_OWNER_CHARS {
            return err(
                "owner",
                format!("must be at most {MAX_OWNER_CHARS} characters"),
            );
        }
    }
    let max_active_runs = input.max_active_runs.unwrap_or(16);
    if max_active_runs == 0 || max_active_runs > 10_000 {
        return err("max_active_runs", "must be between 1 and 10000");
    }
    let sla_ms = input
        .sla
        .as_deref()
        .map(|s| bounded_duration("sla", s))
        .transpose()?;
    let start_date_ms = input
        .start_date
        .as_deref()
        .map(|s| parse_instant("start_date", s, &timezone))
        .transpose()?;
    let end_date_ms = input
        .end_date
        .as_deref()
        .map(|s| parse_instant("end_date", s, &timezone))
        .transpose()?;
    if let (Some(a), Some(b)) = (start_date_ms, end_date_ms) {
        if a >= b {
            return err("end_date", "must be after start_date");
        }
    }
    if let Some(w) = &input.webhook {
        check_url("webhook", w)?;
    }
    if input.tasks.len() > MAX_TASKS {
        return err(
            "tasks",
            format!(
                "has {} tasks; at most {MAX_TASKS} are allowed",
                input.tasks.len()
            ),
        );
    }
    let mut tasks = Vec::with_capacity(input.tasks.len());
    let mut seen = HashSet::new();
    for (i, t) in input.tasks.iter().enumerate() {
        let prefix = format!("tasks[{i}]");
        check_id(&format!("{prefix}.task_id"), &t.task_id)?;
        if !seen.insert(t.task_id.as_str()) {
            return err(
                format!("{prefix}.task_id"),
                format!("'{}' is used by two tasks", t.task_id),
            );
        }
        let kind = task_kind(&prefix, t)?;
        let dur = |name: &str, v: &Option<String>| -> Result<Option<u64>, Error> {
            v.as_deref()
                .map(|s| bounded_duration(&format!("{prefix}.{name}"), s))
                .transpose()
        };
        let retries = t.retries.unwrap_or(0);
        if retries > 100 {
            return err(format!("{prefix}.retries"), "must be at most 100");
        }
        let timeout_ms = dur("timeout", &t.timeout)?;
        if timeout_ms == Some(0) {
            return err(format!("{prefix}.timeout"), "must be more than 0");
        }
        tasks.push(TaskSpec {
            task_id: t.task_id.clone(),
            kind,
            depends_on: t.depends_on.clone(),
            retries,
            retry_delay_ms: dur("retry_delay", &t.retry_delay)?.unwrap_or(10_000),
            retry_exponential: t.retry_exponential.unwrap_or(false),
            max_retry_delay_ms: dur("max_retry_delay", &t.max_retry_delay)?.unwrap_or(3_600_000),
            timeout_ms,
        });
    }
    check_graph(&tasks)?;
    Ok(DagSpec {
        dag_id: input.dag_id.clone(),
        schedule: input.schedule.clone(),
        timezone,
        owner: input.owner.clone(),
        catchup: input.catchup.unwrap_or(false),
        max_active_runs,
        sla_ms,
        paused: input.paused.unwrap_or(false),
        start_date_ms,
        end_date_ms,
        webhook: input.webhook.clone(),
        tasks,
    })
}

/// Known dependencies, no self-dependency, no cycle (the error shows one cycle path).
fn check_graph(tasks: &[TaskSpec]) -> Result<(), Error> {
    let mut graph = DiGraph::<&str, ()>::new();
    let idx: HashMap<&str, _> = tasks
        .iter()
        .map(|t| (t.task_id.as_str(), graph.add_node(t.task_id.as_str())))
        .collect();
    for (i, t) in tasks.iter().enumerate() {
        for dep in &t.depends_on {
            let Some(&from) = idx.get(dep.as_str()) else {
                return err(
                    format!("tasks[{i}].depends_on"),
                    format!("'{}' depends on unknown task '{dep}'", t.task_id),
                );
            };
            if dep == &t.task_id {
                return err(
                    format!("tasks[{i}].depends_on"),
                    format!("'{dep}' depends on itself"),
                );
            }
            graph.add_edge(from, idx[t.task_id.as_str()], ());
        }
    }
    if petgraph::algo::toposort(&graph, None).is_ok() {
        return Ok(());
    }
    // Find one cycle and show it: the first strongly connected component with >1 node.
    for scc in petgraph::algo::tarjan_scc(&graph) {
        if scc.len() > 1 {
            let members: HashSet<_> = scc.iter().copied().collect();
            let start = scc[0];
            let mut path = vec![graph[start]];
            let mut cur = start;
            let mut visited = HashSet::new();
            visited.insert(start);
            loop {
                let next = graph
                    .neighbors(cur)
                    .find(|n| members.contains(n))
                    .unwrap_or_else(|| {
                        panic!("every node of a cycle component has a successor in it")
                    });
                path.push(graph[next]);
                if next == start || !visited.insert(next) {
                    break;
                }
                cur = next;
            }
            return err(
                "tasks",
                format!("dependencies form a cycle: {}", path.join(" -> ")),
            );
        }
    }
    err("tasks", "dependencies form a cycle")
}

impl DagInput {
    /// A stored definition as a DAG file would say it: `POST /dags`'s field names,
    /// durations as `1h30m`, dates as RFC 3339 in the DAG's timezone, a task's kind
    /// fields beside its id, and nothing that only repeats a default. [`validate`] of the
    /// result gives `spec` back, so two definitions differ here exactly when they differ
    /// (`dag apply` diffs this form).
    pub fn from_spec(spec: &DagSpec) -> DagInput {
        let tz = parse_timezone(&spec.timezone).ok();
        let instant = |ms: i64| instant_text(ms, tz);
        DagInput {
            dag_id: spec.dag_id.clone(),
            schedule: spec.schedule.clone(),
            timezone: (spec.timezone != "UTC").then(|| spec.timezone.clone()),
            owner: spec.owner.clone(),
            catchup: spec.catchup.then_some(true),
            max_active_runs: (spec.max_active_runs != 16).then_some(spec.max_active_runs),
            sla: spec.sla_ms.map(format_duration),
            paused: spec.paused.then_some(true),
            start_date: spec.start_date_ms.map(instant),
            end_date: spec.end_date_ms.map(instant),
            webhook: spec.webhook.clone(),
            tasks: spec.tasks.iter().map(TaskInput::from_spec).collect(),
            version: None,
        }
    }
}

impl TaskInput {
    fn from_spec(t: &TaskSpec) -> TaskInput {
        let mut out = TaskInput {
            task_id: t.task_id.clone(),
            kind: String::new(),
            command: None,
            method: None,
            url: None,
            headers: BTreeMap::new(),
            body: None,
            expect_status: None,
            depends_on: t.depends_on.clone(),
            retries: (t.retries != 0).then_some(t.retries),
            retry_delay: (t.retry_delay_ms != 10_000).then(|| format_duration(t.retry_delay_ms)),
            retry_exponential: t.retry_exponential.then_some(true),
            max_retry_delay: (t.max_retry_delay_ms != 3_600_000)
                .then(|| format_duration(t.max_retry_delay_ms)),
            timeout: t.timeout_ms.map(format_duration),
        };
        match &t.kind {
            TaskKind::Shell { command } => {
                out.kind = "shell".into();
                out.command = Some(command.clone());
            }
            TaskKind::Http {
                method,
                url,
                headers,
                body,
                expect_status,
            } => {
                out.kind = "http".into();
                out.method = (method != "GET").then(|| method.clone());
                out.url = Some(url.clone());
                out.headers = headers.clone();
                out.body = body.clone();
                out.expect_status = *expect_status;
            }
            TaskKind::Noop => out.kind = "noop".into(),
        }
        out
    }
}

/// `ms` as RFC 3339 that reads back as exactly `ms`: in the DAG's timezone where that
/// can say it (RFC 3339 offsets are whole minutes, local mean times before standard
/// time are not), else in UTC, else (a year past 9999 in UTC) at the farthest offset.
fn instant_text(ms: i64, tz: Option<chrono_tz::Tz>) -> String {
    use chrono::{FixedOffset, SecondsFormat, Utc};
    let Some(t) = Utc.timestamp_millis_opt(ms).single() else {
        return ms.to_string();
    };
    let exact = |s: String| {
        DateTime::parse_from_rfc3339(&s)
            .is_ok_and(|p| p.timestamp_millis() == ms)
            .then_some(s)
    };
    let far = |secs| FixedOffset::east_opt(secs).map(|o| t.with_timezone(&o));
    tz.and_then(|tz| exact(t.with_timezone(&tz).to_rfc3339()))
        .or_else(|| exact(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        .or_else(|| far(-86_340).and_then(|t| exact(t.to_rfc3339())))
        .or_else(|| far(86_340).and_then(|t| exact(t.to_rfc3339())))
        .unwrap_or_else(|| t.to_rfc3339())
}

/// Milliseconds as [`parse_duration`] reads them, largest units first: `1h30m`, `250ms`,
/// `0s`.
pub fn format_duration(ms: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
        (1, "ms"),
    ];
    if ms == 0 {
        return "0s".into();
    }
    let mut rest = ms;
    let mut out = String::new();
    for (size, unit) in UNITS {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: serde_json::Value) -> Result<DagSpec, String> {
        let i: DagInput = serde_json::from_value(json).map_err(|e| e.to_string())?;
        validate(&i).map_err(|e| e.to_string())
    }

    #[test]
    fn file_form_of_a_spec_reads_back_as_the_same_spec() {
        let full = serde_json::json!({
            "dag_id": "etl", "schedule": "0 2 * * *", "timezone": "Europe/Paris",
            "owner": "team", "catchup": true, "max_active_runs": 3, "sla": "90m",
            "paused": true, "start_date": "2025-10-01", "end_date": "2026-01-01T10:00:00Z",
            "webhook": "https://hooks.example.com/x",
            "tasks": [
                {"task_id": "a", "kind": "shell", "command": "echo hi", "retries": 2,
                 "retry_delay": "1500ms", "retry_exponential": true,
                 "max_retry_delay": "2h", "timeout": "1d2h3m4s5ms"},
                {"task_id": "b", "kind": "http", "method": "post",
                 "url": "https://api.example.com/", "headers": {"X-A": "1"},
                 "body": "{}", "expect_status": 201, "depends_on": ["a"]},
                {"task_id": "c", "kind": "noop", "depends_on": ["a", "b"]}
            ]
        });
        for body in [
            full,
            serde_json::json!({"dag_id": "d", "tasks": [{"task_id": "x", "kind": "noop"}]}),
        ] {
            let spec = input(body).unwrap();
            let form = serde_json::to_value(DagInput::from_spec(&spec)).unwrap();
            let again = input(form.clone()).unwrap();
            assert_eq!(again, spec, "{form}");
            // File names only: nothing of the stored form leaks into what people read.
            let text = form.to_string();
            for stored in ["_ms\"", "null", "{\"kind\":{"] {
                assert!(!text.contains(stored), "{stored} in {text}");
            }
        }
        let spec = input(
            serde_json::json!({"dag_id": "d", "start_date": "2025-10-01",
            "timezone": "Europe/Paris", "tasks": [{"task_id": "x", "kind": "shell",
            "command": "true", "timeout": "90m"}]}),
        )
        .unwrap();
        let form = serde_json::to_value(DagInput::from_spec(&spec)).unwrap();
        assert_eq!(form["start_date"], "2025-10-01T00:00:00+02:00");
        // Dates RFC 3339 cannot say in the DAG's timezone (an offset of seconds, local
        // mean time) or in UTC (a year past 9999) still read back as themselves.
        for (tz, start, end) in [
            ("Europe/Paris", "1900-01-01", "1900-01-02T00:00:00.250Z"),
            ("UTC", "2025-01-01", "9999-12-31T23:00:00-05:00"),
        ] {
            let spec = input(serde_json::json!({"dag_id": "d", "timezone": tz,
                "start_date": start, "end_date": end}))
            .unwrap();
            let form = serde_json::to_value(DagInput::from_spec(&spec)).unwrap();
            assert_eq!(input(form.clone()).unwrap(), spec, "{form}");
        }
        assert_eq!(form["tasks"][0]["timeout"], "1h30m");
        assert!(form["tasks"][0].get("retries").is_none(), "{form}");
    }

    #[test]
    fn durations_format_as_they_parse() {
        for ms in [
            0,
            1,
            999,
            1_000,
            61_000,
            5_400_000,
            86_400_001,
            MAX_DAG_DURATION_MS,
        ] {
            assert_eq!(parse_duration("f", &format_duration(ms)).unwrap(), ms);
        }
        assert_eq!(format_duration(5_400_000), "1h30m");
        assert_eq!(format_duration(250), "250ms");
    }

    #[test]
    fn spec_example_is_valid() {
        let s = input(
            serde_json::json!({"dag_id":"sales_gdp","schedule":"0 2 * * *","owner":"team-data"}),
        )
        .unwrap();
        assert_eq!(s.timezone, "UTC");
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn typos_cycles_and_unknown_deps_are_named() {
        let e = input(
            serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"noop","retires":3}]}),
        )
        .unwrap_err();
        assert!(e.contains("retires"), "{e}");
        let e = input(serde_json::json!({"dag_id":"d","tasks":[
            {"task_id":"a","kind":"noop","depends_on":["c"]},
            {"task_id":"b","kind":"noop","depends_on":["a"]},
            {"task_id":"c","kind":"noop","depends_on":["b"]}]}))
        .unwrap_err();
        assert!(e.contains("cycle") && e.contains("->"), "{e}");
        let e = input(serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"noop","depends_on":["x"]}]})).unwrap_err();
        assert!(e.contains("unknown task 'x'"), "{e}");
        for dots in [".", ".."] {
            let e =
                input(serde_json::json!({"dag_id":"d","tasks":[{"task_id":dots,"kind":"noop"}]}))
                    .unwrap_err();
            assert!(e.to_string().contains("usable id"), "{e}");
        }
        let e = input(serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"noop"},{"task_id":"a","kind":"noop"}]})).unwrap_err();
        assert!(e.contains("used by two tasks"), "{e}");
        for bad in [
            "https://",
            "http://:80/x",
            "https://exa mple.com",
            "https://a:99999",
        ] {
            let e = input(serde_json::json!({"dag_id":"d","webhook":bad})).unwrap_err();
            assert!(e.starts_with("webhook"), "{bad}: {e}");
            let e = input(
                serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"http","url":bad}]}),
            )
            .unwrap_err();
            assert!(e.contains(".url"), "{bad}: {e}");
        }
        input(serde_json::json!({"dag_id":"d","webhook":"https://h.example:8443/p?q=1#f"}))
            .unwrap();
        // Templated: parsed when rendered; a host is still required.
        let templated = "https://{{ dag_id }}.example/x?r={{ run_id }}";
        input(serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"http","url":templated}]}))
            .unwrap();
        let e = input(serde_json::json!({"dag_id":"d","tasks":[{"task_id":"a","kind":"http","url":"https:///{{ run_id }}"}]}))
            .unwrap_err();
        assert!(e.contains("names no host"), "{e}");
        let e = input(serde_json::json!({"dag_id":"bad id!"})).unwrap_err();
        assert!(e.starts_with("dag_id"), "{e}");
        let e = input(serde_json::json!({"dag_id":"d","schedule":"0 2 * *"})).unwrap_err();
        assert!(e.contains("4 fields"), "{e}");
    }

    #[test]
    fn whole_numbers_may_be_written_as_integral_floats() {
        let dag = |v: serde_json::Value| serde_json::from_value::<DagInput>(v);
        let d = dag(serde_json::json!({"dag_id": "d", "max_active_runs": 16.0,
            "tasks": [{"task_id": "t", "kind": "noop", "retries": 2.0}]}))
        .unwrap();
        assert_eq!((d.max_active_runs, d.tasks[0].retries), (Some(16), Some(2)));
        for bad in [
            serde_json::json!(16.5),
            serde_json::json!(-1),
            serde_json::json!(-1.0),
            serde_json::json!(4294967296u64),
            serde_json::json!("16"),
        ] {
            let e = dag(serde_json::json!({"dag_id": "d", "max_active_runs": bad})).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("f", "1h30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration("f", "250ms").unwrap(), 250);
        assert!(parse_duration("f", "5 minutes").is_err());
        assert!(parse_duration("f", "").is_err());
        // White space around it: what the schema's pattern allows, and nothing else.
        assert_eq!(parse_duration("f", " \t30s\r\n").unwrap(), 30_000);
        for odd in ["\u{feff}30s", "30s\u{a0}", "\u{2028}30s", "\u{b}30s"] {
            assert!(parse_duration("f", odd).is_err(), "{odd:?}");
        }
        // The schema's bounds are the parser's: 9 digits a number, 64 characters in all.
        assert_eq!(
            parse_duration("f", "999999999d").unwrap(),
            86_399_999_913_600_000
        );
        assert!(parse_duration("f", "1000000000s").is_err());
        assert!(parse_duration("f", &"1s".repeat(33)).is_err());
        let longest = "999999999d".repeat(6);
        assert_eq!(
            parse_duration("f", &longest).unwrap(),
            6 * 86_399_999_913_600_000
        );
    }

    #[test]
    fn a_dag_s_durations_are_at_most_a_year_and_a_day() {
        let with = |sla: &str, delay: &str| {
            input(serde_json::json!({"dag_id": "d", "sla": sla, "tasks": [
                {"task_id": "t", "kind": "noop", "retry_delay": delay}]}))
        };
        assert!(with("366d", "366d").is_ok());
        let e = with("366d1ms", "1s").unwrap_err().to_string();
        assert!(e.contains("sla") && e.contains("366d"), "{e}");
        let e = with("1h", "999999999d").unwrap_err().to_string();
        assert!(e.contains("retry_delay"), "{e}");
    }

    #[test]
    fn dates_are_midnight_in_the_timezone() {
        let utc = parse_instant("from", "2025-10-01", "UTC").unwrap();
        let paris = parse_instant("from", "2025-10-01", "Europe/Paris").unwrap();
        assert_eq!(utc - paris, 2 * 3_600_000);
        assert!(parse_instant("from", "yesterday", "UTC").is_err());
    }
}

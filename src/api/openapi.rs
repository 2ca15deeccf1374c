//! The endpoint table: every public operation once, with the handler that serves it and
//! what the OpenAPI document says about it. The router and the document served at
//! `/openapi.json` are both built from [`endpoints`], so they cannot disagree.

use axum::routing::{delete, get, post, MethodRouter};
use serde_json::{json, Map, Value};

use super::routes::ApiState;
use super::{cluster, dags, runs, BASE};

/// One operation of the public API.
pub struct Endpoint {
    pub method: &'static str,
    /// Relative to [`BASE`], with `{param}` placeholders.
    pub path: &'static str,
    pub handler: MethodRouter<ApiState>,
    pub summary: &'static str,
    /// The scope the caller needs.
    pub scope: &'static str,
    /// The request body schema, if the operation takes one.
    pub body: Option<Value>,
    /// The success response schema.
    pub response: Value,
    /// Error statuses this operation can answer besides 401, 429, 500 and 503.
    pub errors: &'static [u16],
}

fn obj(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

fn dag_schema() -> Value {
    let task = obj(
        json!({
            "task_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"},
            "kind": {"type": "string", "enum": ["shell", "http", "noop"]},
            "command": {"type": "string", "description": "shell: run with /bin/sh -c; {{ run_id }}, {{ window_start }} … are templated"},
            "method": {"type": "string"}, "url": {"type": "string"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {"type": "string"}, "expect_status": {"type": "integer"},
            "depends_on": {"type": "array", "items": {"type": "string"}},
            "retries": {"type": "integer", "minimum": 0, "maximum": 100},
            "retry_delay": {"type": "string", "example": "30s"},
            "retry_exponential": {"type": "boolean"},
            "max_retry_delay": {"type": "string", "example": "1h"},
            "timeout": {"type": "string", "example": "10m"}
        }),
        &["task_id", "kind"],
    );
    obj(
        json!({
            "dag_id": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"},
            "schedule": {"type": "string", "description": "5-field cron, 6 fields with seconds, or @daily-style macros", "example": "0 2 * * *"},
            "timezone": {"type": "string", "default": "UTC"},
            "owner": {"type": "string"},
            "catchup": {"type": "boolean", "default": false},
            "max_active_runs": {"type": "integer", "default": 16},
            "sla": {"type": "string", "example": "2h"},
            "paused": {"type": "boolean"},
            "start_date": {"type": "string"}, "end_date": {"type": "string"},
            "webhook": {"type": "string", "format": "uri"},
            "tasks": {"type": "array", "items": task},
            "version": {"type": "integer", "description": "optimistic concurrency: the version this update is based on"}
        }),
        &["dag_id"],
    )
}

fn dag_ack() -> Value {
    json!({"type": "object", "properties": {"dag_id": {"type": "string"}, "status": {"type": "string", "enum": ["active", "paused", "deleted"]}, "version": {"type": "integer"}}})
}

fn run_ack() -> Value {
    json!({"type": "object", "properties": {"run_id": {"type": "string"}, "state": {"type": "string"}}, "required": ["run_id", "state"]})
}

fn any_object() -> Value {
    json!({"type": "object"})
}

/// Every public operation under [`BASE`].
pub fn endpoints() -> Vec<Endpoint> {
    let ep = |method, path, handler, summary, scope, body, response, errors| Endpoint {
        method,
        path,
        handler,
        summary,
        scope,
        body,
        response,
        errors,
    };
    vec![
        ep(
            "post",
            "/dags",
            post(dags::submit),
            "Create or update a DAG (validated: acyclic, known dependencies, schedule)",
            "orchestrator:write",
            Some(dag_schema()),
            dag_ack(),
            &[400, 403, 409, 413, 415],
        ),
        ep(
            "get",
            "/dags",
            get(dags::list),
            "List the tenant's DAGs (cursor pagination: limit, cursor)",
            "orchestrator:read",
            None,
            any_object(),
            &[400, 403],
        ),
        ep(
            "get",
            "/dags/{dag_id}",
            get(dags::get_one),
            "A DAG: current definition, version, next fire times",
            "orchestrator:read",
            None,
            any_object(),
            &[403, 404],
        ),
        ep(
            "delete",
            "/dags/{dag_id}",
            delete(dags::delete),
            "Delete a DAG: scheduling stops, history is kept",
            "orchestrator:write",
            None,
            dag_ack(),
            &[403, 404],
        ),
        ep(
            "post",
            "/dags/{dag_id}/pause",
            post(dags::pause),
            "Pause a DAG's schedule",
            "orchestrator:write",
            None,
            dag_ack(),
            &[403, 404],
        ),
        ep(
            "post",
            "/dags/{dag_id}/unpause",
            post(dags::unpause),
            "Unpause a DAG's schedule",
            "orchestrator:write",
            None,
            dag_ack(),
            &[403, 404],
        ),
        ep(
            "post",
            "/runs",
            post(runs::trigger),
            "Trigger a manual or backfill run (idempotent by dag_id and window)",
            "orchestrator:write",
            Some(obj(
                json!({"dag_id": {"type": "string"}, "run_type": {"type": "string", "enum": ["manual", "backfill"]}, "from": {"type": "string"}, "to": {"type": "string"}}),
                &["dag_id"],
            )),
            run_ack(),
            &[400, 403, 404, 409, 413, 415],
        ),
        ep(
            "get",
            "/runs",
            get(runs::list),
            "List runs, newest first (filters: dag_id, state, run_type, from, to; limit, cursor)",
            "orchestrator:read",
            None,
            any_object(),
            &[400, 403],
        ),
        ep(
            "get",
            "/runs/{run_id}",
            get(runs::get_one),
            "A run: state, tasks map, SLA deadline, attempts and timings",
            "orchestrator:read",
            None,
            json!({"type": "object", "properties": {"run_id": {"type": "string"}, "state": {"type": "string"}, "tasks": {"type": "object", "additionalProperties": {"type": "string"}}, "sla_deadline": {"type": ["string", "null"]}, "sla_missed": {"type": "boolean"}, "task_details": {"type": "object"}}}),
            &[403, 404],
        ),
        ep(
            "post",
            "/runs/{run_id}/cancel",
            post(runs::cancel),
            "Cancel a run; running attempts are killed",
            "orchestrator:write",
            None,
            run_ack(),
            &[403, 404],
        ),
        ep(
            "post",
            "/runs/{run_id}/retry",
            post(runs::retry),
            "Re-run a finished run's failed and upstream-failed tasks",
            "orchestrator:write",
            None,
            any_object(),
            &[403, 404, 409],
        ),
        ep(
            "get",
            "/runs/{run_id}/tasks/{task_id}/attempts/{attempt}/log",
            get(runs::attempt_log),
            "An attempt's output (text/plain), from the node that ran it",
            "orchestrator:read",
            None,
            json!({"type": "string"}),
            &[400, 403, 404],
        ),
        ep(
            "get",
            "/cluster/status",
            get(cluster::status),
            "Members, leader, term, indexes, replication lag, state digest",
            "orchestrator:read",
            None,
            any_object(),
            &[403],
        ),
        ep(
            "post",
            "/cluster/members",
            post(cluster::add_member),
            "Add a node (learner, caught up, then voter)",
            "orchestrator:admin",
            Some(obj(
                json!({"node_id": {"type": "integer"}, "api_addr": {"type": "string"}, "peer_addr": {"type": "string"}}),
                &["node_id", "api_addr", "peer_addr"],
            )),
            any_object(),
            &[400, 403],
        ),
        ep(
            "delete",
            "/cluster/members/{node_id}",
            delete(cluster::remove_member),
            "Remove a node from the cluster",
            "orchestrator:admin",
            None,
            any_object(),
            &[400, 403],
        ),
        ep(
            "post",
            "/cluster/snapshot",
            post(cluster::snapshot),
            "Build a snapshot on this node now and purge the log behind it",
            "orchestrator:admin",
            None,
            any_object(),
            &[403],
        ),
    ]
}

fn error_response(code: u16) -> (String, Value) {
    let (name, desc) = match code {
        400 => ("invalid_request", "Bad Request"),
        401 => ("unauthorized", "Unauthorized"),
        403 => ("forbidden", "Forbidden"),
        404 => ("not_found", "Not Found"),
        409 => (
            "version_conflict | idempotency_key_reused | invalid_state",
            "Conflict",
        ),
        413 => ("payload_too_large", "Payload Too Large"),
        415 => ("unsupported_media_type", "Unsupported Media Type"),
        429 => (
            "rate_limited | quota_exceeded",
            "Too Many Requests (rate limit, with Retry-After; or a tenant quota)",
        ),
        500 => ("internal_error", "Internal Error"),
        _ => (
            "dependency_down",
            "Service Unavailable: no leader or quorum",
        ),
    };
    (
        code.to_string(),
        json!({"description": format!("{desc}: error {name}"), "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
    )
}

/// The OpenAPI 3 document of [`endpoints`].
pub fn document() -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for e in endpoints() {
        let full = format!("{BASE}{}", e.path);
        let params: Vec<Value> = e
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut responses: Map<String, Value> = Map::new();
        responses.insert(
            "200".into(),
            json!({"description": "OK", "content": {"application/json": {"schema": e.response}}}),
        );
        for code in e.errors.iter().chain(&[401, 429, 500, 503]) {
            let (k, v) = error_response(*code);
            responses.insert(k, v);
        }
        let mut op = json!({
            "summary": e.summary,
            "security": [{"bearer": [e.scope]}],
            "parameters": params,
            "responses": responses,
        });
        if let Some(p) = op["parameters"].as_array_mut() {
            p.push(json!({"name": "X-Request-Id", "in": "header", "required": false, "schema": {"type": "string"}, "description": "idempotency key for writes; echoed on every response"}));
        }
        if let Some(body) = e.body {
            op["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": body}}});
        }
        if let Some(m) = paths
            .entry(full)
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            m.insert(e.method.to_string(), op);
        }
    }
    for (path, summary) in [
        ("/healthz", "Process alive (no token)"),
        ("/readyz", "Knows a leader and has caught up (no token)"),
        ("/metrics", "Prometheus metrics (no token)"),
    ] {
        paths.insert(path.into(), json!({"get": {"summary": summary, "responses": {"200": {"description": "OK"}, "503": {"description": "Not ready"}}}}));
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "orchestrator", "version": env!("CARGO_PKG_VERSION"), "description": "Distributed DAG workflow scheduler. Additive changes only."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "string"}, "message": {"type": "string"}}, "required": ["error", "message"]}}
        }
    })
}

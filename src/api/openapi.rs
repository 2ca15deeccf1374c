//! The OpenAPI 3.1 document served at `/openapi.json` and browsed at `/docs`. utoipa
//! generates it from each handler's `#[utoipa::path]` annotation and its request and
//! response types, as the route table (`routes::table`) collects them, so the router and
//! the document cannot disagree. [`complete`] then adds, in one place, what every
//! operation under [`BASE`] shares (bearer auth, `X-Request-Id`, the rate-limit headers,
//! the 401/403/413/429/500/503 answers), narrows each error answer to the codes its
//! status carries (from [`ApiError`]'s table), and states what derive macros cannot:
//! which task fields each task kind takes and when a run needs `from` and `to`.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use super::error::{ApiError, ErrorBody};
use super::BASE;

/// The document's fixed parts; the paths come from the route table.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "orchestrator",
        description = "A distributed DAG workflow scheduler: cron and backfill runs replicated with Raft. \
Every node serves the whole API; writes are forwarded to the leader. Public paths live under \
`/api/v1/runtime/orchestrator` and take a bearer JWT; `/healthz`, `/readyz`, `/metrics`, `/openapi.json` \
and `/docs` take none. Errors are `{\"error\": code, \"message\": text}`. Additive changes only.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "dags", description = "DAG definitions: create or update, list, get, pause, unpause, delete."),
        (name = "runs", description = "Runs: trigger (manual or backfill), list, get, cancel, retry, attempt logs."),
        (name = "cluster", description = "Cluster membership and status (operators only)."),
        (name = "health", description = "Probes, metrics and this document (no token)."),
    )
)]
pub struct ApiDoc;

/// The document, shared by the `/openapi.json` handler.
pub type Document = Arc<Value>;

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    operation_id = "openapi",
    summary = "This OpenAPI document",
    description = "The OpenAPI 3.1 description of this API. No token.",
    responses((status = 200, description = "The document.", content_type = "application/json",
        body = Object)),
)]
pub async fn serve(Extension(doc): Extension<Document>) -> Response {
    Json(doc.as_ref().clone()).into_response()
}

fn error_schema(status: u16) -> Value {
    json!({
        "allOf": [{"$ref": "#/components/schemas/ErrorBody"}],
        "properties": {"error": {"enum": ApiError::codes_for(status)}},
    })
}

fn error_response(status: u16, description: &str) -> Value {
    let mut headers = json!({"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}});
    match status {
        401 => {
            headers["WWW-Authenticate"] = json!({"$ref": "#/components/headers/WWW-Authenticate"})
        }
        429 => {
            headers["Retry-After"] = json!({"$ref": "#/components/headers/Retry-After"});
            for h in ["RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"] {
                headers[h] = json!({"$ref": format!("#/components/headers/{h}")});
            }
        }
        _ => {}
    }
    json!({
        "description": description,
        "headers": headers,
        "content": {"application/json": {"schema": error_schema(status)}},
    })
}

/// The answers every operation under [`BASE`] can give, by status.
const SHARED_ERRORS: [(u16, &str, &str); 6] = [
    (
        401,
        "Unauthorized",
        "No bearer token, or one that does not verify: bad signature, expired, not yet valid, \
wrong issuer or audience, an unknown key id or algorithm.",
    ),
    (
        403,
        "Forbidden",
        "The token lacks the scope this operation needs (see its security requirement).",
    ),
    (
        413,
        "PayloadTooLarge",
        "The request body is larger than 1 MiB (refused before it is read when Content-Length says so).",
    ),
    (
        429,
        "RateLimited",
        "The tenant's rate limit is spent (shared by all nodes; `RateLimit-*` headers say \
         how it stands), or the caller's address made too many failed authentications (refused \
         before its token is read; no `RateLimit-*` headers); retry after `Retry-After` seconds.",
    ),
    (
        500,
        "Internal",
        "The server hit an internal error; it has been logged.",
    ),
    (
        503,
        "DependencyDown",
        "`dependency_down`: the cluster has no reachable leader or quorum, or the request did not \
finish within the node's bound. Safe to retry (with the same `X-Request-Id` for writes).",
    ),
];

fn components_extra() -> (Value, Value, Value, Value) {
    let int = json!({"type": "integer", "minimum": 0});
    let headers = json!({
        "X-Request-Id": {"description": "The request's id: the client's `X-Request-Id` (1 to 200 characters) \
    echoed, or one the node minted.", "schema": {"type": "string"}},
        "RateLimit-Limit": {"description": "Requests the tenant may make per window.", "schema": int},
        "RateLimit-Remaining": {"description": "Requests left in this window.", "schema": int},
        "RateLimit-Reset": {"description": "Seconds until the window refills.", "schema": int},
        "X-RateLimit-Limit": {"description": "Same as RateLimit-Limit (older clients).", "schema": int},
        "X-RateLimit-Remaining": {"description": "Same as RateLimit-Remaining (older clients).", "schema": int},
        "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}},
        "WWW-Authenticate": {"description": "`Bearer realm=\"orchestrator\"`.", "schema": {"type": "string"}},
        "Idempotent-Replayed": {"description": "`true` when this answer replays the one given to an earlier \
    request with the same `X-Request-Id` and body.", "schema": {"type": "string", "enum": ["true"]}},
    });
    let mut responses = Map::new();
    for (status, name, description) in SHARED_ERRORS {
        responses.insert(name.into(), error_response(status, description));
    }
    responses.insert(
        "UnsupportedMediaType".into(),
        error_response(
            415,
            "The body is not sent as `Content-Type: application/json`.",
        ),
    );
    let parameters = json!({
        "X-Request-Id": {
            "name": "X-Request-Id", "in": "header", "required": false,
            "description": "Idempotency key for writes: the same key with the same body returns the first \
    answer (with `Idempotent-Replayed: true`) instead of acting twice; the same key with another body is \
    refused with 409 `idempotency_key_reused`. Echoed on every response. At most 200 bytes (400 beyond).",
            // An empty one is ignored; one over 200 bytes is refused (it would be kept for
            // 24 h as a key).
            "schema": {"type": "string", "maxLength": 200},
        }
    });
    let security = json!({
        "bearer": {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
            "description": "A JWT (HS256 with the cluster's secret, or RS256/ES256 from a JWKS) with `tenant`, \
    `scope` (space-separated: `orchestrator:read`, `orchestrator:write`, `orchestrator:admin`, \
    `orchestrator:shell`), `exp`, and the configured `iss`/`aud`. `orchestrator token` mints one.",
        }
    });
    (Value::Object(responses), headers, parameters, security)
}

/// Which task fields each kind takes, and what the http kind checks (derive macros cannot
/// say "if kind is http, url is required").
fn task_kind_rules() -> Value {
    let absent = json!({"type": "null"});
    let methods = super::schema::http_method();
    json!([
        {"if": {"properties": {"kind": {"const": "shell"}}, "required": ["kind"]},
         "then": {"required": ["command"],
                  "properties": {"command": {"type": "string", "pattern": "\\S"}, "url": absent}}},
        {"if": {"properties": {"kind": {"const": "http"}}, "required": ["kind"]},
         "then": {"required": ["url"],
                  "properties": {
                      "url": {"type": "string"},
                      "command": absent,
                      "method": methods,
                      "expect_status": {"type": ["integer", "null"], "minimum": 100, "maximum": 599},
                  }}},
        {"if": {"properties": {"kind": {"const": "noop"}}, "required": ["kind"]},
         "then": {"properties": {"command": absent, "url": absent}}},
    ])
}

/// When a run request needs `from` and `to`: both or neither, and both for a backfill.
fn run_window_rules() -> Value {
    let given = |f: &str| json!({"properties": {f: {"type": "string"}}, "required": [f]});
    let both = json!({"properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                      "required": ["from", "to"]});
    json!([
        {"if": given("from"), "then": both},
        {"if": given("to"), "then": both},
        {"if": {"properties": {"run_type": {"const": "backfill"}}, "required": ["run_type"]}, "then": both},
    ])
}

fn ref_to(kind: &str, name: &str) -> Value {
    json!({"$ref": format!("#/components/{kind}/{name}")})
}

/// Complete the generated document (see the module docs) into what `/openapi.json` serves.
pub fn complete(doc: utoipa::openapi::OpenApi) -> Value {
    let mut doc = match serde_json::to_value(&doc) {
        Ok(v) => v,
        // Serialising the generated document is infallible (plain maps and strings).
        Err(e) => json!({"openapi": "3.1.0", "info": {"title": "orchestrator", "version": "0",
            "description": format!("the document could not be built: {e}")}, "paths": {}}),
    };
    let (responses, headers, parameters, security) = components_extra();
    let components = &mut doc["components"];
    components["responses"] = responses;
    components["headers"] = headers;
    components["parameters"] = parameters;
    components["securitySchemes"] = security;
    if let Some(task) = components["schemas"]["TaskInput"].as_object_mut() {
        task.insert("allOf".into(), task_kind_rules());
    }
    // Maps keyed by node id: JSON object keys are strings of digits.
    for map in ["members", "replication_lag"] {
        let at = format!("/schemas/Status/properties/{map}");
        if let Some(m) = components.pointer_mut(&at).and_then(Value::as_object_mut) {
            m.insert(
                "propertyNames".into(),
                json!({"type": "string", "pattern": "^[0-9]+$"}),
            );
        }
    }
    if let Some(run) = components["schemas"]["RunInput"].as_object_mut() {
        run.insert("allOf".into(), run_window_rules());
    }
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                complete_operation(path.starts_with(BASE), method, op);
            }
        }
    }
    doc
}

fn complete_operation(under_base: bool, method: &str, op: &mut Value) {
    let has_body = op.get("requestBody").is_some();
    let write = matches!(method, "post" | "put" | "patch" | "delete");
    // A path parameter is always required (utoipa cannot tell for `schema_with` fields).
    let params = op.get_mut("parameters").and_then(Value::as_array_mut);
    for param in params.into_iter().flatten() {
        if param["in"] == "path" {
            param["required"] = json!(true);
        }
    }
    if under_base {
        let params = op["parameters"].as_array_mut().map(std::mem::take);
        let mut params = params.unwrap_or_default();
        params.push(ref_to("parameters", "X-Request-Id"));
        op["parameters"] = Value::Array(params);
    }
    let Some(responses) = op["responses"].as_object_mut() else {
        return;
    };
    if under_base && !responses.contains_key("400") {
        // Every operation under the base refuses an `X-Request-Id` beyond its bound.
        responses.insert(
            "400".into(),
            json!({
                "description": "`invalid_request`: `X-Request-Id` is longer than 200 bytes.",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }),
        );
    }
    for (status, resp) in responses.iter_mut() {
        let code: u16 = status.parse().unwrap_or(0);
        // Narrow error bodies (not `/readyz`'s 503, which is its readiness report).
        let error_body = json!({"$ref": "#/components/schemas/ErrorBody"});
        if code >= 400 && resp["content"]["application/json"]["schema"] == error_body {
            if let Some(media) = resp["content"]["application/json"].as_object_mut() {
                media.insert("schema".into(), error_schema(code));
            }
        }
        if resp.get("$ref").is_none() {
            let h = &mut resp["headers"];
            h["X-Request-Id"] = ref_to("headers", "X-Request-Id");
            if under_base && (200..300).contains(&code) {
                for name in [
                    "RateLimit-Limit",
                    "RateLimit-Remaining",
                    "RateLimit-Reset",
                    "X-RateLimit-Limit",
                    "X-RateLimit-Remaining",
                ] {
                    h[name] = ref_to("headers", name);
                }
                if write {
                    h["Idempotent-Replayed"] = ref_to("headers", "Idempotent-Replayed");
                }
            }
        }
    }
    let shared: Vec<(u16, &str)> = if under_base {
        SHARED_ERRORS.iter().map(|(s, n, _)| (*s, *n)).collect()
    } else {
        // Probes take no token and no rate limit; a body over the limit and a panic can
        // still happen anywhere.
        vec![(413, "PayloadTooLarge"), (500, "Internal")]
    };
    for (status, name) in shared {
        responses
            .entry(status.to_string())
            .or_insert_with(|| ref_to("responses", name));
    }
    if under_base && has_body {
        responses
            .entry("415".to_string())
            .or_insert_with(|| ref_to("responses", "UnsupportedMediaType"));
        responses.entry("400".to_string()).or_insert_with(|| {
            error_response(
                400,
                "The body is not JSON, or not the JSON this operation takes.",
            )
        });
    }
}

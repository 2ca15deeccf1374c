//! The route table (the API under [`BASE`], the probes, and the web UI of [`ui`]), the
//! middleware every response passes (request id, JSON errors, panics caught), and what
//! handlers share: caller verification, body decoding,
//! stamping a request, committing it and mapping its outcome.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request as HttpRequest, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use http_body::Body as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::Instrument;

use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::{cluster, dags, docs_ui, metrics, openapi, runs, ui, BASE};
use crate::actors::Actors;
use crate::admission::AuthFailures;
use crate::auth::{Access, Principal, Verifier};
use crate::raft::RaftNode;
use crate::rate_limit::RateLimiter;
use crate::state::{Command, IdempotencyKey, Outcome, Request};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
const REQUEST_ID: &str = "x-request-id";

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    pub node: RaftNode,
    pub actors: Actors,
    pub verifier: Arc<Verifier>,
    pub limiter: Arc<RateLimiter>,
    /// Failed authentications per client address (refused unread past a burst).
    pub auth_failures: Arc<AuthFailures>,
    /// Renders `/metrics` (the process's Prometheus recorder).
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// The route table: every route once, with its handler. Each handler's `#[utoipa::path]`
/// annotation is its documentation, so the router and `/openapi.json` are one source.
/// Returns the routes without a token and those under [`BASE`].
fn table() -> (OpenApiRouter<ApiState>, OpenApiRouter<ApiState>) {
    let public = OpenApiRouter::new()
        .routes(routes!(cluster::healthz))
        .routes(routes!(cluster::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::serve))
        .routes(routes!(docs_ui::page))
        .routes(routes!(docs_ui::asset));
    let api = OpenApiRouter::new()
        .routes(routes!(dags::submit, dags::list))
        .routes(routes!(dags::get_one, dags::delete))
        .routes(routes!(dags::plan))
        .routes(routes!(dags::pause))
        .routes(routes!(dags::unpause))
        .routes(routes!(dags::list_versions))
        .routes(routes!(dags::get_version))
        .routes(routes!(runs::trigger, runs::list))
        .routes(routes!(runs::get_one))
        .routes(routes!(runs::cancel))
        .routes(routes!(runs::retry))
        .routes(routes!(runs::attempt_log))
        .routes(routes!(cluster::status))
        .routes(routes!(cluster::add_member))
        .routes(routes!(cluster::remove_member))
        .routes(routes!(cluster::snapshot));
    (public, api)
}

/// The OpenAPI document of the route table, as `/openapi.json` serves it.
pub fn document() -> serde_json::Value {
    let (public, api) = table();
    let doc = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(public)
        .nest(BASE, api)
        .into_openapi();
    openapi::complete(doc)
}

/// The public router.
pub fn router(state: ApiState) -> Router {
    let (public, api) = table();
    let api = api.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let (routes, doc) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(public)
        .nest(BASE, api)
        .split_for_parts();
    let doc: openapi::Document = Arc::new(openapi::complete(doc));
    let bound = state.node.request_bound();
    routes
        .merge(ui::routes())
        .route_layer(middleware::from_fn(tag_route))
        .layer(Extension(doc))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(
            move |req: HttpRequest<axum::body::Body>, next: Next| bounded(bound, req, next),
        ))
        .layer(middleware::from_fn(request_id_and_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::Internal("the server hit an internal error; it has been logged".into())
                    .into_response()
            },
        ))
        .with_state(state)
}

/// The longest `X-Request-Id` accepted.
const MAX_REQUEST_ID: usize = 200;

/// Echo (or mint) `X-Request-Id` on every response, turn axum's plain-text rejections
/// (oversized body and the like) into JSON errors, and time the request for the metrics
/// (labelled by the route template the router matched, see [`tag_route`]).
async fn request_id_and_errors(req: HttpRequest<axum::body::Body>, next: Next) -> Response {
    let given = req.headers().get(REQUEST_ID);
    // A request id is kept (24 h, with the answer it dedups): a bounded one only.
    let too_long = given.is_some_and(|v| v.len() > MAX_REQUEST_ID);
    let id = given
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{}", hex::encode(rand::random::<[u8; 8]>())));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", request_id = %id, %method, %path);
    // A body announced larger than the limit is refused before any of it is read (the
    // extractor's limit would wait for the bytes first).
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (req, body_read) = track_body(req);
    let mut resp = match declared {
        Some(n) if n > MAX_BODY_BYTES as u64 => ApiError::PayloadTooLarge(format!(
            "request body of {n} bytes exceeds {MAX_BODY_BYTES} bytes"
        ))
        .into_response(),
        _ if too_long => ApiError::InvalidRequest(format!(
            "X-Request-Id is longer than {MAX_REQUEST_ID} bytes"
        ))
        .into_response(),
        _ => next.run(req).instrument(span).await,
    };
    if !body_read.load(Ordering::Acquire) {
        // Answered before the body was read to its end (401, 413, 429, ...): the rest of
        // the body is still on the wire, so this connection cannot carry another request.
        // Say so, or a pooling client reuses it and loses its next request.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json && (resp.status().is_client_error() || resp.status().is_server_error()) {
        let status = resp.status();
        resp = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::PayloadTooLarge(format!("request body exceeds {MAX_BODY_BYTES} bytes"))
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::UnsupportedMediaType("send Content-Type: application/json".into())
            }
            s if s.is_server_error() => ApiError::Internal(format!("{s}")),
            s => ApiError::InvalidRequest(format!("{s}")),
        }
        .into_response();
    }
    tracing::debug!(request_id = %id, %method, %path, status = resp.status().as_u16(), "request");
    let route = resp
        .extensions()
        .get::<RouteTemplate>()
        .map_or("unmatched", |r| r.0.as_str())
        .to_string();
    super::metrics::record_request(&method, &route, resp.status().as_u16(), started);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The route template a request matched (e.g. `/api/v1/runtime/orchestrator/runs/{run_id}`),
/// never the raw path: it labels the latency metrics.
#[derive(Clone)]
struct RouteTemplate(String);

/// Tag the response with the matched route template for [`request_id_and_errors`].
/// Every request ends within the node's bound (a backstop: 503), except a membership
/// change, which may wait for a new node to catch up ([`crate::raft::MEMBERSHIP_BOUND`];
/// operators only, everyone else is refused at once).
async fn bounded(bound: Duration, req: HttpRequest<axum::body::Body>, next: Next) -> Response {
    let limit = if req
        .uri()
        .path()
        .starts_with(&format!("{BASE}/cluster/members"))
    {
        crate::raft::MEMBERSHIP_BOUND
    } else {
        bound
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            ApiError::DependencyDown("the request did not finish within the node's bound".into())
                .into_response()
        }
    }
}

async fn tag_route(
    matched: Option<MatchedPath>,
    req: HttpRequest<axum::body::Body>,
    next: Next,
) -> Response {
    let template = matched.map(|m| m.as_str().to_string());
    let mut resp = next.run(req).await;
    if let Some(t) = template {
        resp.extensions_mut().insert(RouteTemplate(t));
    }
    resp
}

/// Wrap the request body so the middleware learns whether it was read to its end (an
/// empty body counts as read).
fn track_body(
    req: HttpRequest<axum::body::Body>,
) -> (HttpRequest<axum::body::Body>, Arc<AtomicBool>) {
    let (parts, inner) = req.into_parts();
    let read = Arc::new(AtomicBool::new(inner.is_end_stream()));
    let body = axum::body::Body::new(TrackedBody {
        inner,
        read: read.clone(),
    });
    (HttpRequest::from_parts(parts, body), read)
}

/// A request body that records reaching its end.
struct TrackedBody {
    inner: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Verify the bearer token once, apply the tenant's rate limit, and hand the
/// [`Principal`] to the handler (which checks the scope it needs).
async fn authenticate(
    State(st): State<ApiState>,
    mut req: HttpRequest<axum::body::Body>,
    next: Next,
) -> Response {
    // An address that keeps failing to authenticate is refused before its token is read.
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = client {
        if let Err(wait) = st.auth_failures.check(ip, Instant::now()) {
            ::metrics::counter!(crate::telemetry::metrics::HTTP_RATE_LIMITED, "limit" => "auth_failures")
                .increment(1);
            return ApiError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                why: "too many failed authentications from this address",
            }
            .into_response();
        }
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let p = match st.verifier.verify_header(auth.as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            if let Some(ip) = client {
                st.auth_failures.failed(ip, Instant::now());
            }
            return ApiError::from(e).into_response();
        }
    };
    let d = st.limiter.check(&p.tenant, st.node.clock.now_ms());
    let mut resp = if d.allowed {
        req.extensions_mut().insert(p);
        next.run(req).await
    } else {
        ::metrics::counter!(crate::telemetry::metrics::HTTP_RATE_LIMITED, "limit" => "tenant")
            .increment(1);
        ApiError::RateLimited {
            retry_after_secs: d.reset_secs.max(1),
            why: "rate limit exceeded",
        }
        .into_response()
    };
    let h = resp.headers_mut();
    for (name, value) in [
        ("ratelimit-limit", d.limit as u64),
        ("ratelimit-remaining", d.remaining as u64),
        ("ratelimit-reset", d.reset_secs),
        ("x-ratelimit-limit", d.limit as u64),
        ("x-ratelimit-remaining", d.remaining as u64),
    ] {
        h.insert(name, HeaderValue::from(value));
    }
    resp
}

pub(super) fn fmt_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

pub(super) fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Json<T>, JsonRejection>,
) -> Result<T, ApiError> {
    match body {
        Ok(Json(v)) => Ok(v),
        Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType(
            "send Content-Type: application/json".into(),
        )),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge(
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )),
        Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
    }
}

/// Build a request for `command`, with the client's idempotency key if it sent one and
/// the tenant's quota (which apply enforces).
pub(super) fn stamp(
    st: &ApiState,
    p: &Principal,
    headers: &HeaderMap,
    route: &str,
    body: &Value,
    command: Command,
) -> Request {
    let idempotency = headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(|key| {
            let mut h = Sha256::new();
            h.update(route.as_bytes());
            h.update([0]);
            // serde_json's Value keeps keys sorted: the same JSON gives the same bytes.
            h.update(body.to_string().as_bytes());
            IdempotencyKey {
                tenant: p.tenant.clone(),
                key: key.to_string(),
                fingerprint: hex::encode(h.finalize()),
            }
        });
    Request {
        request_id: hex::encode(rand::random::<[u8; 16]>()),
        // Restamped by the node that proposes it, on every try (`RaftNode::stamped`).
        proposed_at_ms: crate::raft::clock::wall_ms(),
        idempotency,
        command,
        subject: Some(p.subject.clone()),
        quota: Some((&st.node.config().limits.for_tenant(&p.tenant)).into()),
        shell_scope: p.allows(Access::Shell),
    }
}

/// The error of a write based on a version that is not the current one.
pub(super) fn version_conflict(expected: u64, current: u64) -> ApiError {
    ApiError::VersionConflict(format!(
        "expected version {expected} but the current version is {current}"
    ))
}

/// Commit and render: known failures become their API errors.
pub(super) async fn commit(st: &ApiState, req: Request) -> Result<(Outcome, bool), ApiError> {
    // One DAG too many is a 400 (waiting does not help); one run too many a 429 (runs end).
    let creates_dag = matches!(req.command, Command::PutDag { .. });
    let resp = st.actors.proposer.propose(req).await?;
    match resp.outcome {
        Outcome::NotFound { what } => Err(ApiError::NotFound(format!("{what} not found"))),
        Outcome::Forbidden { message } => Err(ApiError::Forbidden(message)),
        Outcome::VersionConflict { expected, current } => Err(version_conflict(expected, current)),
        Outcome::IdempotencyKeyReused { key } => Err(ApiError::IdempotencyKeyReused(key)),
        Outcome::InvalidState { message } => Err(ApiError::InvalidState(message)),
        Outcome::QuotaExceeded { message } if creates_dag => Err(ApiError::InvalidRequest(message)),
        Outcome::QuotaExceeded { message } => Err(ApiError::QuotaExceeded(message)),
        o => Ok((o, resp.replayed)),
    }
}

/// An action on one resource (`id`): check the write scope, commit `cmd` (with the
/// client's idempotency key), and render the expected outcome with `render`.
pub(super) async fn act(
    st: &ApiState,
    p: &Principal,
    headers: &HeaderMap,
    route: &str,
    id: &str,
    cmd: Command,
    render: impl FnOnce(Outcome) -> Result<Value, Outcome>,
) -> Result<Response, ApiError> {
    p.require(Access::Write)?;
    let (outcome, replayed) = commit(
        st,
        stamp(st, p, headers, route, &Value::String(id.into()), cmd),
    )
    .await?;
    let body =
        render(outcome).map_err(|o| ApiError::Internal(format!("unexpected outcome {o:?}")))?;
    Ok(with_replay(Json(body).into_response(), replayed))
}

/// Page size for list endpoints: `limit` (default 50, at most 500).
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::InvalidRequest(format!(
            "limit: {n} is not between 1 and 500"
        ))),
    }
}

/// Decode an opaque list cursor (the hex of the last key returned). A cursor is bound to
/// the listing that returned it: its key must lie under `prefix` (the caller's tenant,
/// and the DAG when filtered), so another tenant's cursor is refused, not followed. An
/// empty one (`?cursor=`, from a client that passes on a null `next_cursor`) asks for
/// the first page.
pub(super) fn decode_cursor(
    cursor: Option<&str>,
    prefix: &[u8],
) -> Result<Option<Vec<u8>>, ApiError> {
    cursor
        .filter(|c| !c.is_empty())
        .map(|c| match hex::decode(c) {
            Ok(key) if key.starts_with(prefix) => Ok(key),
            _ => Err(ApiError::InvalidRequest(
                "cursor: not a cursor this listing returned (cursors belong to one tenant and one query)"
                    .into(),
            )),
        })
        .transpose()
}

pub(super) fn with_replay(mut resp: Response, replayed: bool) -> Response {
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

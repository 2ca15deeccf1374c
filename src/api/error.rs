//! The one table from failures to HTTP: every error the API returns is
//! `{"error": code, "message": text}` with the spec's codes and status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::raft::node;
use crate::{auth, dag};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("X-Request-Id '{0}' was already used with a different request; use a new key")]
    IdempotencyKeyReused(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A per-tenant quota (`limits.*`) a new run would exceed.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{why}; retry after {retry_after_secs} s")]
    RateLimited {
        retry_after_secs: u64,
        why: &'static str,
    },
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    DependencyDown(String),
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "not_found", "message": "run 'run_9' not found"}))]
pub struct ErrorBody {
    /// The machine-readable code; the OpenAPI document lists the codes each status carries.
    #[schema(schema_with = error_codes)]
    pub error: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

fn error_codes() -> utoipa::openapi::schema::Object {
    let mut codes: Vec<&'static str> = ApiError::every_kind()
        .iter()
        .map(|e| e.status_and_code().1)
        .collect();
    codes.dedup();
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(codes))
        .build()
}

impl ApiError {
    /// One error of each kind (their messages are placeholders): the OpenAPI document
    /// derives from these which codes each HTTP status carries.
    pub fn every_kind() -> Vec<ApiError> {
        let m = String::new;
        vec![
            ApiError::InvalidRequest(m()),
            ApiError::Unauthorized(m()),
            ApiError::Forbidden(m()),
            ApiError::NotFound(m()),
            ApiError::VersionConflict(m()),
            ApiError::IdempotencyKeyReused(m()),
            ApiError::InvalidState(m()),
            ApiError::MethodNotAllowed(m()),
            ApiError::PayloadTooLarge(m()),
            ApiError::UnsupportedMediaType(m()),
            ApiError::QuotaExceeded(m()),
            ApiError::RateLimited {
                retry_after_secs: 1,
                why: "rate limit exceeded",
            },
            ApiError::Internal(m()),
            ApiError::DependencyDown(m()),
        ]
    }

    /// The machine codes an answer with `status` can carry.
    pub fn codes_for(status: u16) -> Vec<&'static str> {
        Self::every_kind()
            .iter()
            .map(|e| e.status_and_code())
            .filter(|(s, _)| s.as_u16() == status)
            .map(|(_, c)| c)
            .collect()
    }

    /// Status and machine code, in one place.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::VersionConflict(_) => (StatusCode::CONFLICT, "version_conflict"),
            ApiError::IdempotencyKeyReused(_) => (StatusCode::CONFLICT, "idempotency_key_reused"),
            ApiError::InvalidState(_) => (StatusCode::CONFLICT, "invalid_state"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            ApiError::DependencyDown(_) => (StatusCode::SERVICE_UNAVAILABLE, "dependency_down"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, code, "request failed");
        }
        let body = ErrorBody {
            error: code,
            message: self.to_string(),
        };
        let mut resp = (status, Json(body)).into_response();
        match &self {
            ApiError::Unauthorized(_) => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"orchestrator\""),
                );
            }
            ApiError::RateLimited {
                retry_after_secs, ..
            } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        resp
    }
}

impl From<auth::Error> for ApiError {
    fn from(e: auth::Error) -> Self {
        match e {
            auth::Error::MissingScope { .. } | auth::Error::NotOperator => {
                ApiError::Forbidden(e.to_string())
            }
            auth::Error::Mint(m) => ApiError::Internal(m),
            _ => ApiError::Unauthorized(e.to_string()),
        }
    }
}

impl From<dag::Error> for ApiError {
    fn from(e: dag::Error) -> Self {
        ApiError::InvalidRequest(e.to_string())
    }
}

impl From<node::Error> for ApiError {
    fn from(e: node::Error) -> Self {
        match e {
            node::Error::NoLeader { .. } | node::Error::NotLeader { .. } => {
                ApiError::DependencyDown(format!("cluster has no reachable leader: {e}"))
            }
            node::Error::Membership(m) => ApiError::InvalidRequest(m),
            node::Error::Stopped(m) => ApiError::DependencyDown(format!("raft stopped: {m}")),
        }
    }
}

impl From<crate::raft::db::DbError> for ApiError {
    fn from(e: crate::raft::db::DbError) -> Self {
        ApiError::Internal(format!("storage: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented codes of a status are every code an answer with it can carry
    /// (Schemathesis found `quota_exceeded` missing from the 429 schemas).
    #[test]
    fn every_code_is_documented_under_its_status() {
        assert_eq!(
            ApiError::codes_for(429),
            vec!["quota_exceeded", "rate_limited"]
        );
        let listed: std::collections::HashSet<_> = ApiError::every_kind()
            .iter()
            .map(std::mem::discriminant)
            .collect();
        assert_eq!(
            listed.len(),
            ApiError::every_kind().len(),
            "a kind listed twice"
        );
    }
}

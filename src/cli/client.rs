//! The HTTP client for a node's API, and the failures a client command can end with,
//! each mapped to its exit code in one place ([`exit_code`]).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::ClientFlags;

/// A failure with a documented exit code (see [`super::EXIT_CODES_HELP`]).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad invocation that clap cannot see (e.g. no token).
    #[error("{0}")]
    Usage(String),
    /// The API answered with an error body `{"error", "message"}`.
    #[error("{code}: {message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The API could not be reached.
    #[error("cannot reach {api}: {detail}")]
    Connect { api: String, detail: String },
    /// A watched run ended without success.
    #[error("run {run_id} ended {state}")]
    RunEnded { run_id: String, state: String },
}

/// The process exit code for an error returned by a command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<Failure>() {
        Some(Failure::Usage(_)) => 2,
        Some(Failure::Api { .. }) => 3,
        Some(Failure::Connect { .. }) => 4,
        Some(Failure::RunEnded { .. }) => 5,
        None => 1,
    }
}

/// A client for one node's API under the versioned base path.
pub struct Client {
    http: reqwest::Client,
    api: String,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(flags: &ClientFlags) -> anyhow::Result<Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        if let Some(path) = &flags.ca_file {
            builder = builder.add_root_certificate(read_ca(path)?);
        }
        let api = flags.api.trim_end_matches('/').to_string();
        Ok(Client {
            http: builder.build().context("cannot build the HTTP client")?,
            base: format!("{api}{}", orchestrator::api::BASE),
            api,
            token: flags.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The API base the user gave (without the versioned path).
    pub fn api(&self) -> &str {
        &self.api
    }

    fn token(&self) -> Result<&str, Failure> {
        self.token.as_deref().ok_or_else(|| {
            Failure::Usage(
                "no token: pass --token or set ORCHESTRATOR_TOKEN (mint one with `orchestrator token`)"
                    .into(),
            )
        })
    }

    /// Send a request to `path` under the API base; the body on success, or a [`Failure`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let text = self.send_text(method, path, query, body).await?;
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("the API answered non-JSON: {text}"))
    }

    /// Like [`Client::send`], the body as text (attempt logs are plain text).
    pub async fn send_text(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> anyhow::Result<String> {
        let token = self.token()?;
        let mut tries = 0;
        loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(token);
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| Failure::Connect {
                api: self.api.clone(),
                detail: error_chain(&e),
            })?;
            let status = resp.status();
            // Rate limited: wait as told (briefly) and try again, a few times.
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| *s <= 10);
            let text = resp.text().await.map_err(|e| Failure::Connect {
                api: self.api.clone(),
                detail: error_chain(&e),
            })?;
            if status.is_success() {
                return Ok(text);
            }
            match retry_after {
                Some(secs) if status == StatusCode::TOO_MANY_REQUESTS && tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_secs(secs.max(1))).await;
                }
                _ => return Err(api_failure(status, &text).into()),
            }
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.send(Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(Method::POST, path, &[], Some(body)).await
    }

    /// GET a full URL without a token (a member's `/readyz`), with a short timeout.
    pub async fn probe(&self, url: &str) -> Option<Value> {
        let resp = self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }
}

fn read_ca(path: &Path) -> anyhow::Result<reqwest::Certificate> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    reqwest::Certificate::from_pem(&pem).context("--ca-file is not a PEM certificate")
}

fn api_failure(status: StatusCode, text: &str) -> Failure {
    let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let code = body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    let message = body["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().to_string());
    Failure::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

/// reqwest's error with its sources ("error sending request: ... Connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_keep_code_and_message() {
        let f = api_failure(
            StatusCode::NOT_FOUND,
            r#"{"error":"not_found","message":"dag 'x' not found"}"#,
        );
        assert_eq!(f.to_string(), "not_found: dag 'x' not found (HTTP 404)");
        assert_eq!(exit_code(&f.into()), 3);
        let f = api_failure(StatusCode::BAD_GATEWAY, "upstream");
        assert_eq!(f.to_string(), "Bad Gateway: upstream (HTTP 502)");
    }
}

//! `/metrics` in Prometheus text format: this node's Raft state, HTTP answers by class,
//! scheduler fire lag, executor slots, and the replicated counters (SLA misses, runs by
//! outcome, lost attempts), which read the same on every node.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::routes::ApiState;
use crate::state::machine::counters;
use crate::state::Table;

/// HTTP answers counted by the request middleware.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub by_class: [AtomicU64; 5],
}

impl HttpStats {
    pub fn record(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Relaxed);
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// `GET /metrics`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    summary = "Prometheus metrics",
    description = "This node's metrics in the Prometheus text exposition format. No token.",
    responses(
        (status = 200, description = "The metrics.", body = String, content_type = "text/plain; version=0.0.4",
            example = "# HELP orchestrator_raft_term Current Raft term.\n# TYPE orchestrator_raft_term gauge\norchestrator_raft_term{node=\"1\"} 3\n"),
    ),
)]
pub async fn metrics(State(st): State<ApiState>) -> Response {
    let s = st.node.status().await;
    let mut out = String::new();
    let node = format!("{{node=\"{}\"}}", s.node_id);
    let g = |v: Option<u64>| v.map_or(0.0, |x| x as f64);
    metric(
        &mut out,
        "orchestrator_raft_term",
        "gauge",
        "Current Raft term.",
        &[(&node, s.term as f64)],
    );
    metric(
        &mut out,
        "orchestrator_raft_is_leader",
        "gauge",
        "1 on the leader.",
        &[(
            &node,
            if s.leader == Some(s.node_id) {
                1.0
            } else {
                0.0
            },
        )],
    );
    metric(
        &mut out,
        "orchestrator_raft_applied_index",
        "gauge",
        "Last applied log index.",
        &[(&node, g(s.applied_index))],
    );
    metric(
        &mut out,
        "orchestrator_raft_last_log_index",
        "gauge",
        "Last log index.",
        &[(&node, g(s.last_log_index))],
    );
    metric(
        &mut out,
        "orchestrator_raft_snapshot_index",
        "gauge",
        "Log index of the last snapshot.",
        &[(&node, g(s.snapshot_index))],
    );
    metric(
        &mut out,
        "orchestrator_raft_log_size_bytes",
        "gauge",
        "Approximate size of the Raft log.",
        &[(&node, s.log_size_bytes as f64)],
    );
    let lag: Vec<(String, f64)> = s
        .replication_lag
        .iter()
        .map(|(id, l)| {
            (
                format!("{{node=\"{}\",follower=\"{id}\"}}", s.node_id),
                g(*l),
            )
        })
        .collect();
    let lag_refs: Vec<(&str, f64)> = lag.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        &mut out,
        "orchestrator_raft_replication_lag_entries",
        "gauge",
        "Leader only: entries each member is behind.",
        &lag_refs,
    );
    let classes: Vec<(String, f64)> = st
        .http
        .by_class
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                format!("{{node=\"{}\",class=\"{}xx\"}}", s.node_id, i + 1),
                c.load(Relaxed) as f64,
            )
        })
        .collect();
    let class_refs: Vec<(&str, f64)> = classes.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        &mut out,
        "orchestrator_http_responses_total",
        "counter",
        "HTTP responses by status class.",
        &class_refs,
    );
    let sch = &st.actors.scheduler.stats;
    let fired = sch.windows_fired.load(Relaxed) as f64;
    metric(
        &mut out,
        "orchestrator_scheduler_windows_fired_total",
        "counter",
        "Windows this node fired as leader.",
        &[(&node, fired)],
    );
    metric(
        &mut out,
        "orchestrator_scheduler_fire_lag_ms_sum",
        "counter",
        "Sum of fire lags (commit time - window end).",
        &[(&node, sch.lag_sum_ms.load(Relaxed) as f64)],
    );
    metric(
        &mut out,
        "orchestrator_scheduler_fire_lag_ms_max",
        "gauge",
        "Largest fire lag seen.",
        &[(&node, sch.max_lag_ms.load(Relaxed) as f64)],
    );
    metric(
        &mut out,
        "orchestrator_scheduler_fire_lag_ms_last",
        "gauge",
        "Fire lag of the last window.",
        &[(&node, sch.last_lag_ms.load(Relaxed) as f64)],
    );
    if let Some((running, slots, _)) = st.actors.executor.slots().await {
        metric(
            &mut out,
            "orchestrator_executor_running",
            "gauge",
            "Attempts running on this node.",
            &[(&node, running as f64)],
        );
        metric(
            &mut out,
            "orchestrator_executor_slots",
            "gauge",
            "Attempt slots of this node.",
            &[(&node, slots as f64)],
        );
    }
    let active = st
        .node
        .db
        .scan_prefix(Table::ActiveRuns, b"", None, usize::MAX)
        .map_or(0, |v| v.len());
    metric(
        &mut out,
        "orchestrator_runs_active",
        "gauge",
        "Runs queued or running (cluster-wide).",
        &[("", active as f64)],
    );
    for name in counters::ALL {
        let v = st
            .node
            .db
            .get(Table::Counters.name(), name)
            .ok()
            .flatten()
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let n = format!("orchestrator_{}_total", String::from_utf8_lossy(name));
        metric(
            &mut out,
            &n,
            "counter",
            "Replicated counter (cluster-wide).",
            &[("", v as f64)],
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

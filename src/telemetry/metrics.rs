//! Every metric the node exports, in one place, and the process's recorder.
//!
//! Crate choice: the `metrics` facade with `metrics-exporter-prometheus` (both maintained
//! by the metrics-rs project). The facade's macros let the proposer, the Raft node, the
//! state machine, the scheduler and the executor record where the event happens, with no
//! registry handle threaded through actors; the exporter keeps histograms with fixed
//! buckets (real `_bucket`/`_sum`/`_count` series, so `histogram_quantile` works across
//! nodes) and renders the Prometheus text format itself. One node runs per process, so a
//! process-global recorder is one recorder per node; its global `node` label marks every
//! series.
//!
//! Cardinality: labels are bounded enumerations only (route templates, status classes,
//! states, results, member ids). No label ever carries a run, task, DAG or tenant id.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

// Raft (this node's view; gauges set at scrape time from openraft's metrics).
pub const RAFT_TERM: &str = "orchestrator_raft_term";
pub const RAFT_IS_LEADER: &str = "orchestrator_raft_is_leader";
pub const RAFT_CURRENT_LEADER: &str = "orchestrator_raft_current_leader";
pub const RAFT_LAST_LOG_INDEX: &str = "orchestrator_raft_last_log_index";
pub const RAFT_COMMITTED_INDEX: &str = "orchestrator_raft_committed_index";
pub const RAFT_APPLIED_INDEX: &str = "orchestrator_raft_applied_index";
pub const RAFT_SNAPSHOT_INDEX: &str = "orchestrator_raft_snapshot_index";
pub const RAFT_LOG_SIZE: &str = "orchestrator_raft_log_size_bytes";
pub const RAFT_REPLICATION_LAG: &str = "orchestrator_raft_replication_lag_entries";
pub const RAFT_SNAPSHOTS: &str = "orchestrator_raft_snapshots_total";
pub const RAFT_COMMIT_SECONDS: &str = "orchestrator_raft_commit_seconds";
pub const RAFT_APPLY_BATCH: &str = "orchestrator_raft_apply_batch_size";
pub const NODE_READY: &str = "orchestrator_node_ready";

// HTTP.
pub const HTTP_DURATION: &str = "orchestrator_http_request_duration_seconds";
pub const HTTP_RESPONSES: &str = "orchestrator_http_responses_total";
pub const HTTP_RATE_LIMITED: &str = "orchestrator_http_rate_limited_total";
pub const CONNECTIONS_REFUSED: &str = "orchestrator_connections_refused_total";

// Scheduler (the leader that fired).
pub const WINDOWS_FIRED: &str = "orchestrator_scheduler_windows_fired_total";
pub const FIRE_LAG_SECONDS: &str = "orchestrator_scheduler_fire_lag_seconds";

// Executor (this node's slots and attempts).
pub const EXECUTOR_RUNNING: &str = "orchestrator_executor_running";
pub const EXECUTOR_SLOTS: &str = "orchestrator_executor_slots";
pub const ATTEMPT_SECONDS: &str = "orchestrator_task_attempt_duration_seconds";
pub const ATTEMPTS: &str = "orchestrator_executor_attempts_total";
pub const LEASES_LOST: &str = "orchestrator_executor_leases_lost_total";

// Runs and tasks, from the replicated state (the same on every node).
pub const RUNS: &str = "orchestrator_runs";
pub const RUNS_ACTIVE: &str = "orchestrator_runs_active";
pub const TASKS: &str = "orchestrator_tasks";
pub const RUN_SECONDS: &str = "orchestrator_run_duration_seconds";
pub const TASK_RETRIES: &str = "orchestrator_task_retries_total";
/// The replicated counters (`crate::state::machine::counters`) are exported as
/// `orchestrator_<name>_total`, e.g. `orchestrator_sla_missed_total`.
pub const COUNTER_PREFIX: &str = "orchestrator_";

/// Latencies of requests, commits and fires: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Durations of attempts and runs: 10 ms to an hour.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Requests per applied batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A gauge nobody set for this long leaves the scrape.
const GAUGE_IDLE: Duration = Duration::from_secs(30);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct InstallError(String);

/// Install the process's recorder (once; later calls return the same handle) with
/// `node` as a label on every series, and describe every metric.
pub fn install(node: u64) -> Result<PrometheusHandle, InstallError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let err = |e: metrics_exporter_prometheus::BuildError| InstallError(e.to_string());
    let builder = PrometheusBuilder::new()
        .add_global_label("node", node.to_string())
        // Gauges are set at every scrape: one not set for 30 s is gone (a former
        // leader's replication lag, a removed member's), not a stale value for alerts.
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), LATENCY_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(RAFT_COMMIT_SECONDS.into()), LATENCY_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(FIRE_LAG_SECONDS.into()), LATENCY_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.into()), DURATION_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(RUN_SECONDS.into()), DURATION_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(RAFT_APPLY_BATCH.into()), BATCH_BUCKETS)
        .map_err(err)?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            describe();
            register_counters();
            register_histograms();
            let _ = HANDLE.set(handle.clone());
            Ok(handle)
        }
        Err(e) => Err(InstallError(e.to_string())),
    }
}

/// Drain histogram buffers now and then even when nobody scrapes (bounded memory).
pub async fn upkeep(handle: PrometheusHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Event counters exist from the start at 0 (a dashboard's `rate()` and an alert's
/// `increase()` then see a series before the first event).
fn register_counters() {
    for name in [WINDOWS_FIRED, LEASES_LOST, TASK_RETRIES] {
        metrics::counter!(name).increment(0);
    }
    for limit in ["tenant", "auth_failures"] {
        metrics::counter!(HTTP_RATE_LIMITED, "limit" => limit).increment(0);
    }
    for (listener, reason) in [
        ("api", "listener_full"),
        ("api", "address_full"),
        ("peer", "listener_full"),
        ("peer", "address_full"),
        ("peer", "foreign_address"),
    ] {
        metrics::counter!(CONNECTIONS_REFUSED, "listener" => listener, "reason" => reason)
            .increment(0);
    }
    for kind in ["built", "installed"] {
        metrics::counter!(RAFT_SNAPSHOTS, "kind" => kind).increment(0);
    }
}

/// Histograms exist from the start with no observations, on every node: a fire lag
/// only a leader records, an attempt result that has not happened yet.
fn register_histograms() {
    for name in [FIRE_LAG_SECONDS, RAFT_COMMIT_SECONDS, RAFT_APPLY_BATCH] {
        let _ = metrics::histogram!(name);
    }
    for result in ["success", "failed", "timed_out", "lost"] {
        let _ = metrics::histogram!(ATTEMPT_SECONDS, "result" => result);
        metrics::counter!(ATTEMPTS, "result" => result).increment(0);
    }
    for state in ["done", "failed", "cancelled"] {
        let _ = metrics::histogram!(RUN_SECONDS, "state" => state);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(RAFT_TERM, "Current Raft term.");
    describe_gauge!(RAFT_IS_LEADER, "1 on the leader, else 0.");
    describe_gauge!(
        RAFT_CURRENT_LEADER,
        "Id of the leader this node knows (0: none)."
    );
    describe_gauge!(RAFT_LAST_LOG_INDEX, "Last log index.");
    describe_gauge!(RAFT_COMMITTED_INDEX, "Last committed log index.");
    describe_gauge!(RAFT_APPLIED_INDEX, "Last applied log index.");
    describe_gauge!(RAFT_SNAPSHOT_INDEX, "Log index of the last snapshot.");
    describe_gauge!(
        RAFT_LOG_SIZE,
        Unit::Bytes,
        "Approximate size of the Raft log."
    );
    describe_gauge!(
        RAFT_REPLICATION_LAG,
        "Leader only: entries each member (label follower) is behind."
    );
    describe_counter!(
        RAFT_SNAPSHOTS,
        "Snapshots this node built or installed (label kind)."
    );
    describe_histogram!(
        RAFT_COMMIT_SECONDS,
        Unit::Seconds,
        "Leader: proposal of an entry until it is applied."
    );
    describe_histogram!(
        RAFT_APPLY_BATCH,
        "Requests applied per state-machine apply call."
    );
    describe_gauge!(
        NODE_READY,
        "1 when /readyz answers 200 (leader known, caught up, quorum)."
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "API request latency by method, route template and status class."
    );
    describe_counter!(HTTP_RESPONSES, "HTTP responses by status class.");
    describe_counter!(
        HTTP_RATE_LIMITED,
        "Requests refused with 429 by a rate limit: `limit` is `tenant` (the tenant's \
         request rate) or `auth_failures` (failed authentications from the address)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed as they arrived, by listener (`api`, `peer`) and reason \
         (`listener_full`, `address_full`, `foreign_address`: not from the peer networks, \
         `no_peer_address`)."
    );
    describe_counter!(WINDOWS_FIRED, "Windows this node fired as leader.");
    describe_histogram!(
        FIRE_LAG_SECONDS,
        Unit::Seconds,
        "Window end until its run's creation was committed (this node as leader)."
    );
    describe_gauge!(
        EXECUTOR_RUNNING,
        "Attempts running on this node (slots in use)."
    );
    describe_gauge!(EXECUTOR_SLOTS, "Attempt slots of this node.");
    describe_histogram!(
        ATTEMPT_SECONDS,
        Unit::Seconds,
        "Duration of the attempts this node ran, by result."
    );
    describe_counter!(ATTEMPTS, "Attempts this node ran, by result.");
    describe_counter!(
        LEASES_LOST,
        "Attempts this node stopped because it could not renew their lease."
    );
    describe_gauge!(RUNS, "Runs kept in the replicated state, by state.");
    describe_gauge!(RUNS_ACTIVE, "Runs queued or running (cluster-wide).");
    describe_gauge!(
        TASKS,
        "Task instances of the runs kept in the replicated state, by state."
    );
    describe_histogram!(
        RUN_SECONDS,
        Unit::Seconds,
        "Run creation until it finished, by final state (applied on every node)."
    );
    describe_counter!(
        TASK_RETRIES,
        "Task instances that went to retrying (applied on every node)."
    );
}

/// A status code's class label: "2xx" … "5xx".
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(200), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(101), "1xx");
    }
}

//! Scheduling and supervision (issue 4) on real processes: cron windows fire exactly
//! once across leader kills, a killed executor's attempt is retried elsewhere, retries,
//! timeouts, upstream failure, http tasks, cancel, retry-run, SLA misses and webhooks.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::{Json, Router};
use common::{wait_for, Cluster, ALL_SCOPES, BASE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// Fast leases and heartbeats so failure detection fits in a test.
const FAST: &[(&str, &str)] = &[
    ("ORCHESTRATOR_EXECUTOR__HEARTBEAT_MS", "300"),
    ("ORCHESTRATOR_EXECUTOR__LEASE_MS", "2500"),
    ("ORCHESTRATOR_SCHEDULER__TICK_MS", "100"),
    ("ORCHESTRATOR_SCHEDULER__SUPERVISE_MS", "150"),
];

/// A real HTTP server in the test process: `/ok` answers 200, `/fail` 500, `/hook`
/// records webhook bodies.
async fn test_server() -> (String, Arc<Mutex<Vec<Value>>>) {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let h = hooks.clone();
    let app = Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .route(
            "/hook",
            post(move |Json(v): Json<Value>| {
                let h = h.clone();
                async move {
                    h.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hooks)
}

async fn submit(c: &Cluster, t: &str, body: Value) {
    let (s, v) = c.post(1, "/dags", t, &body).await;
    assert_eq!(s, StatusCode::OK, "submit dag: {v}");
}

async fn manual(c: &Cluster, via: u64, t: &str, dag: &str) -> String {
    let (s, v) = c
        .post(
            via,
            "/runs",
            t,
            &json!({"dag_id": dag, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    v["run_id"].as_str().unwrap().to_string()
}

async fn run_json(c: &Cluster, via: u64, t: &str, run: &str) -> Value {
    let (s, v) = c.get(via, &format!("/runs/{run}"), t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn wait_finished(c: &Cluster, via: u64, t: &str, run: &str) -> Value {
    wait_for(LONG, &format!("{run} to finish"), || async {
        let (s, v) = c.get(via, &format!("/runs/{run}"), t).await;
        (s == StatusCode::OK && ["done", "failed", "cancelled"].contains(&v["state"].as_str()?))
            .then_some(v)
    })
    .await
}

/// Ready on all nodes including executors (which announce themselves after start).
async fn up(c: &mut Cluster) {
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let n = c.nodes.len();
    wait_for(LONG, "every executor ready", || async {
        let s = c.status(1).await?;
        let _ = s;
        for id in 1..=n as u64 {
            if c.status(id).await?["executor"]["ready"] != true {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The windows of every scheduled run of `tick`, as read through a running node (`None`
/// while it cannot answer).
async fn scheduled_windows(c: &Cluster, t: &str) -> Option<Vec<(i64, i64)>> {
    let node = (1..=3).find(|&id| c.is_running(id))?;
    let (s, v) = c
        .get(node, "/runs?dag_id=tick&run_type=scheduled&limit=500", t)
        .await;
    if s != StatusCode::OK {
        return None;
    }
    let time = |r: &Value, k: &str| {
        chrono::DateTime::parse_from_rfc3339(r["window"][k].as_str()?)
            .ok()
            .map(|t| t.timestamp_millis())
    };
    v["runs"]
        .as_array()?
        .iter()
        .map(|r| Some((time(r, "from")?, time(r, "to")?)))
        .collect()
}

/// Wait until `tick` has at least `n` scheduled runs; returns how many it has.
async fn more_windows(c: &Cluster, t: &str, n: usize) -> usize {
    wait_for(LONG, &format!("{n} scheduled windows"), || async {
        let have = scheduled_windows(c, t).await?.len();
        (have >= n).then_some(have)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_fires_exactly_once_across_leader_kills() {
    let mut c = Cluster::new(3, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    submit(
        &c,
        &t,
        json!({"dag_id": "tick", "schedule": "*/2 * * * * *",
        "tasks": [{"task_id": "n", "kind": "noop"}]}),
    )
    .await;
    let started = Instant::now();
    // Pace the faults by what fired, not by the clock: each round waits for two new
    // windows, kills the leader, and waits for the successor to fire one before the
    // killed node comes back.
    let mut seen = 0;
    for round in 0..2 {
        seen = more_windows(&c, &t, seen + 2).await;
        let leader = c.wait_leader(LONG).await;
        println!("round {round}: SIGKILL leader node {leader} after {seen} windows");
        c.kill(leader);
        c.wait_leader(LONG).await;
        seen = more_windows(&c, &t, seen + 1).await;
        c.start(leader);
        c.wait_ready(LONG).await;
    }
    seen = more_windows(&c, &t, seen + 2).await;
    // Every window that ended 3 s ago or earlier is due; wait until the last of them is
    // committed, then read every scheduled run once.
    let observed_until = chrono::Utc::now().timestamp_millis() - 3000;
    println!(
        "observed {} s of a 2 s schedule, {seen} windows so far",
        started.elapsed().as_secs()
    );
    let mut windows = wait_for(LONG, "the windows due by now", || async {
        let w = scheduled_windows(&c, &t).await?;
        (w.iter().map(|w| w.1).max()? >= observed_until - 2000).then_some(w)
    })
    .await;
    windows.sort();
    let total = windows.len();
    windows.dedup();
    assert_eq!(windows.len(), total, "no window has two runs");
    assert!(total >= 8, "windows fired: {total}");
    for pair in windows.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "no window skipped between {:?} and {:?}",
            pair[0], pair[1]
        );
    }
    for w in &windows {
        assert_eq!(w.1 - w.0, 2000, "each window is one 2 s interval");
    }
    let last_end = windows.last().unwrap().1;
    assert!(last_end >= observed_until - 2000, "windows up to the end of the period fired (last {last_end}, observed until {observed_until})");
    println!("FIGURE {total} windows, none twice, none missing, across 2 leader kills");
    let mut fired = 0.0;
    for id in 1..=3 {
        let m = c
            .http
            .get(format!("{}/metrics", c.api(id)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| {
            m.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let n = value("orchestrator_scheduler_windows_fired_total");
        if n > 0.0 {
            assert_eq!(
                value("orchestrator_scheduler_fire_lag_seconds_count"),
                n,
                "one fire lag observed per fired window"
            );
            println!(
                "FIGURE node {id} fired {n} windows, mean fire lag {:.0} ms",
                value("orchestrator_scheduler_fire_lag_seconds_sum") * 1000.0 / n,
            );
        }
        fired += n;
    }
    assert!(fired >= 1.0, "fire lag exported");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executor_node_loses_its_attempt_to_another_node() {
    let mut c = Cluster::new(3, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    submit(&c, &t, json!({"dag_id": "long", "tasks": [
        {"task_id": "work", "kind": "shell", "command": "sleep 4; echo finished attempt $ORCHESTRATOR_ATTEMPT"}]})).await;
    let run = manual(&c, 1, &t, "long").await;
    let victim = wait_for(LONG, "attempt 1 to start", || async {
        let v = run_json(&c, 1, &t, &run).await;
        v["task_details"]["work"]["attempts"][0]["node"].as_u64()
    })
    .await;
    println!("attempt 1 runs on node {victim}; SIGKILL it");
    c.kill(victim);
    let reader = if victim == 1 { 2 } else { 1 };
    let v = wait_finished(&c, reader, &t, &run).await;
    assert_eq!(v["state"], "done", "{v}");
    let attempts = v["task_details"]["work"]["attempts"].as_array().unwrap();
    assert!(attempts.len() >= 2, "{v}");
    assert_eq!(attempts[0]["state"], "failed");
    let last = attempts.last().unwrap();
    assert_ne!(
        last["node"].as_u64(),
        Some(victim),
        "retried on another node"
    );
    assert_eq!(last["state"], "done");
    assert!(last["attempt"].as_u64().unwrap() >= 2);
    // The attempt's output is readable through any live node (fetched from the runner).
    let last_no = last["attempt"].as_u64().unwrap();
    for n in (1..=3).filter(|n| *n != victim) {
        let path = format!("{BASE}/runs/{run}/tasks/work/attempts/{last_no}/log");
        let (s, log, _) = c
            .request(n, reqwest::Method::GET, &path, Some(&t), None, &[])
            .await;
        assert_eq!(s, StatusCode::OK, "node {n}: {log}");
        assert!(
            log.as_str()
                .unwrap_or_default()
                .contains(&format!("finished attempt {last_no}")),
            "{log}"
        );
    }
    // The restarted node reports nothing stale, and the run stays done.
    c.start(victim);
    c.wait_ready(LONG).await;
    let v = run_json(&c, victim, &t, &run).await;
    assert_eq!(v["state"], "done");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_timeouts_upstream_failure_http_tasks_and_retry_run() {
    let mut c = Cluster::new(1, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    let (srv, _) = test_server().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // Accepts connections (the kernel's backlog) and never answers: a request times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    submit(&c, &t, json!({"dag_id": "mix", "tasks": [
        {"task_id": "quiet", "kind": "noop"},
        {"task_id": "http_silent", "kind": "http", "url": format!("http://{silent_addr}/"), "timeout": "500ms"},
        {"task_id": "flaky", "kind": "shell", "retries": 2, "retry_delay": "200ms", "retry_exponential": true,
         "command": format!("if [ -f {d}/marker ]; then echo second try; else touch {d}/marker; exit 3; fi")},
        {"task_id": "slow", "kind": "shell", "timeout": "700ms",
         "command": format!("sleep 30 & echo $! > {d}/pid; wait")},
        {"task_id": "after_slow", "kind": "noop", "depends_on": ["slow"]},
        {"task_id": "http_ok", "kind": "http", "url": format!("{srv}/ok")},
        {"task_id": "http_bad", "kind": "http", "url": format!("{srv}/fail")},
        {"task_id": "once", "kind": "shell", "command": format!("echo ran >> {d}/once")},
        {"task_id": "env", "kind": "shell", "depends_on": ["flaky"],
         "command": "echo \"{{ run_id }}/{{task_id}} $ORCHESTRATOR_TASK_ID attempt=$ORCHESTRATOR_ATTEMPT window=$ORCHESTRATOR_WINDOW_START\""}
    ]})).await;
    let run = manual(&c, 1, &t, "mix").await;
    let v = wait_finished(&c, 1, &t, &run).await;
    let task = |n: &str| v["tasks"][n].as_str().unwrap().to_string();
    assert_eq!(v["state"], "failed", "{v}");
    assert_eq!(task("flaky"), "done");
    assert_eq!(
        v["task_details"]["flaky"]["attempt"], 2,
        "succeeded on retry: {v}"
    );
    assert_eq!(v["task_details"]["flaky"]["attempts"][0]["exit_code"], 3);
    assert_eq!(task("slow"), "failed");
    assert!(
        v["task_details"]["slow"]["attempts"][0]["error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{v}"
    );
    assert_eq!(task("after_slow"), "upstream_failed");
    assert_eq!(task("http_ok"), "done");
    assert_eq!(task("http_bad"), "failed");
    assert_eq!(task("env"), "done");
    assert_eq!(task("http_silent"), "failed");
    // Every attempt runs exactly once: wait until no node runs anything, then count.
    wait_for(LONG, "all executors idle", || async {
        (c.status(1).await?["executor"]["running"] == 0).then_some(())
    })
    .await;
    let once = std::fs::read_to_string(dir.path().join("once")).unwrap();
    assert_eq!(once.lines().count(), 1, "the attempt ran once: {once:?}");
    // The timed-out task's whole process group was killed: its background sleep too.
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the timed-out child to be gone",
        || async move {
            // SAFETY: signal 0 only checks whether the pid exists.
            (unsafe { libc::kill(pid, 0) } != 0).then_some(())
        },
    )
    .await;
    // Templating and environment, read through the log endpoint.
    let (s, log, _) = c
        .request(
            1,
            reqwest::Method::GET,
            &format!("{BASE}/runs/{run}/tasks/env/attempts/1/log"),
            Some(&t),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let log = log.as_str().unwrap_or_default().to_string();
    assert!(
        log.contains(&format!("{run}/env env attempt=1 window=")),
        "{log}"
    );
    // A noop's log is empty, not missing; an http request that got no answer logs why.
    let log_of = |task: &'static str| {
        let (c, t, run) = (&c, &t, &run);
        async move {
            let path = format!("{BASE}/runs/{run}/tasks/{task}/attempts/1/log");
            let (s, log, _) = c
                .request(1, reqwest::Method::GET, &path, Some(t.as_str()), None, &[])
                .await;
            (s, log.as_str().unwrap_or_default().to_string())
        }
    };
    assert_eq!(log_of("quiet").await, (StatusCode::OK, String::new()));
    let (s, log) = log_of("http_silent").await;
    assert_eq!(s, StatusCode::OK, "{log}");
    assert!(log.contains("timed out"), "{log}");
    drop(silent);
    // Retry re-runs the failed and upstream-failed tasks as new attempts.
    let (s, r) = c
        .post(1, &format!("/runs/{run}/retry"), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["retried_tasks"], 4);
    let v = wait_finished(&c, 1, &t, &run).await;
    assert_eq!(v["task_details"]["slow"]["attempt"], 2, "{v}");
    assert_eq!(
        v["task_details"]["flaky"]["attempt"], 2,
        "done tasks are not re-run"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_running_attempts_and_sla_misses_fire_webhooks() {
    let mut c = Cluster::new(1, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    let (srv, hooks) = test_server().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    submit(&c, &t, json!({"dag_id": "stuck", "tasks": [
        {"task_id": "sleep", "kind": "shell", "command": format!("echo $$ > {d}/pid; exec sleep 60")}]})).await;
    let run = manual(&c, 1, &t, "stuck").await;
    let pidfile = dir.path().join("pid");
    let pid: i32 = wait_for(LONG, "the task to start", || {
        let p = pidfile.clone();
        async move { std::fs::read_to_string(p).ok()?.trim().parse().ok() }
    })
    .await;
    let (s, v) = c
        .post(1, &format!("/runs/{run}/cancel"), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "cancelled");
    let v = run_json(&c, 1, &t, &run).await;
    assert_eq!(v["tasks"]["sleep"], "cancelled");
    wait_for(
        Duration::from_secs(10),
        "the cancelled process to be killed",
        || async move {
            // SAFETY: signal 0 only checks whether the pid exists.
            (unsafe { libc::kill(pid, 0) } != 0).then_some(())
        },
    )
    .await;

    submit(
        &c,
        &t,
        json!({"dag_id": "late", "sla": "1s", "webhook": format!("{srv}/hook"), "tasks": [
        {"task_id": "slow", "kind": "shell", "command": "sleep 2"}]}),
    )
    .await;
    let run = manual(&c, 1, &t, "late").await;
    let v = wait_finished(&c, 1, &t, &run).await;
    assert_eq!(v["state"], "done");
    assert_eq!(v["sla_missed"], true, "{v}");
    assert!(v["sla_deadline"].is_string());
    let events = wait_for(LONG, "webhooks for the SLA miss and the success", || {
        let hooks = hooks.clone();
        let run = run.clone();
        async move {
            let got: Vec<String> = hooks
                .lock()
                .unwrap()
                .iter()
                .filter(|h| h["run_id"] == run.as_str())
                .map(|h| h["event"].as_str().unwrap_or_default().to_string())
                .collect();
            (got.contains(&"sla_miss".to_string()) && got.contains(&"success".to_string()))
                .then_some(got)
        }
    })
    .await;
    println!("webhook events: {events:?}");
    let metrics = c
        .http
        .get(format!("{}/metrics", c.api(1)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("orchestrator_sla_missed_total{node=\"1\"} 1\n"),
        "SLA miss counted:\n{metrics}"
    );
    assert!(
        metrics.contains("orchestrator_runs_cancelled_total{node=\"1\"} 1\n"),
        "{metrics}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_40_task_chain_and_a_fan_complete_on_three_nodes() {
    let mut c = Cluster::new(3, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    let chain: Vec<Value> = (0..40)
        .map(|i| {
            let deps: Vec<String> = if i == 0 {
                vec![]
            } else {
                vec![format!("t{}", i - 1)]
            };
            json!({"task_id": format!("t{i}"), "kind": "noop", "depends_on": deps})
        })
        .collect();
    submit(&c, &t, json!({"dag_id": "chain", "tasks": chain})).await;
    let mut fan = vec![json!({"task_id": "start", "kind": "noop"})];
    for i in 0..40 {
        fan.push(json!({"task_id": format!("f{i}"), "kind": "noop", "depends_on": ["start"]}));
    }
    fan.push(json!({"task_id": "end", "kind": "noop", "depends_on": (0..40).map(|i| format!("f{i}")).collect::<Vec<_>>()}));
    submit(&c, &t, json!({"dag_id": "fan", "tasks": fan})).await;
    for dag in ["chain", "fan"] {
        let started = Instant::now();
        let run = manual(&c, 2, &t, dag).await;
        let v = wait_finished(&c, 2, &t, &run).await;
        assert_eq!(v["state"], "done", "{v}");
        let created =
            chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
        let ended = chrono::DateTime::parse_from_rfc3339(v["ended_at"].as_str().unwrap()).unwrap();
        println!(
            "FIGURE {dag}: {} ms from creation to done (state machine), {} ms observed by the client",
            (ended - created).num_milliseconds(),
            started.elapsed().as_millis()
        );
    }
    c.assert_no_panics();
}

/// A window fires when it ends, not at the scheduler's next tick: with a 5 s tick and a
/// DAG due every second, each window's run is created well within a second of its end
/// (before the scheduler woke at due times, windows fired in bursts up to 5 s late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_fires_when_it_ends_not_at_the_next_tick() {
    let mut c = Cluster::new(1, &[("ORCHESTRATOR_SCHEDULER__TICK_MS", "5000")]);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    submit(
        &c,
        &t,
        json!({"dag_id": "tick", "schedule": "* * * * * *",
               "tasks": [{"task_id": "a", "kind": "noop"}]}),
    )
    .await;
    // The first pass (up to a tick after the submit) fires every window due since
    // creation at once: those ended before the first run was created. The windows that
    // end after it show whether the scheduler waits for its tick.
    let later = wait_for(LONG, "8 windows after the first pass", || async {
        let (s, v) = c
            .get(1, "/runs?dag_id=tick&run_type=scheduled&limit=500", &t)
            .await;
        if s != StatusCode::OK {
            return None;
        }
        let ms = |r: &Value, path: &[&str]| {
            let text = path.iter().fold(r, |v, k| &v[*k]).as_str()?;
            Some(
                chrono::DateTime::parse_from_rfc3339(text)
                    .ok()?
                    .timestamp_millis(),
            )
        };
        let runs: Vec<(i64, i64)> = v["runs"]
            .as_array()?
            .iter()
            .map(|r| Some((ms(r, &["window", "to"])?, ms(r, &["created_at"])?)))
            .collect::<Option<_>>()?;
        let first_created = runs.iter().map(|&(_, created)| created).min()?;
        let mut later: Vec<(i64, i64)> = runs
            .into_iter()
            .filter(|&(end, _)| end > first_created)
            .map(|(end, created)| (end, created - end))
            .collect();
        later.sort();
        (later.len() >= 8).then_some(later)
    })
    .await;
    println!("FIGURE fire lag of the windows after the first pass (window end, ms): {later:?}");
    assert!(
        later.iter().all(|&(_, lag)| (0..1_000).contains(&lag)),
        "a window fired a second or more after its end (or before it): {later:?}"
    );
    c.assert_no_panics();
}

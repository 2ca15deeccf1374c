//! Observability (issue 11) on real processes: `/metrics` parses as Prometheus text, has
//! real histograms (API latency by route template, fire lag, run and attempt durations,
//! Raft commit latency), Raft gauges that agree across nodes, no per-run series (a scrape
//! costs the same at 10 and 500 runs), and every metric the Grafana dashboard and the
//! alert rules under `cluster/` use exists in a real scrape.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{wait_for, Cluster, ALL_SCOPES, BASE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

const FAST: &[(&str, &str)] = &[
    ("ORCHESTRATOR_EXECUTOR__HEARTBEAT_MS", "300"),
    ("ORCHESTRATOR_EXECUTOR__LEASE_MS", "2500"),
    ("ORCHESTRATOR_SCHEDULER__TICK_MS", "100"),
    ("ORCHESTRATOR_SCHEDULER__SUPERVISE_MS", "150"),
];

/// One sample of a scrape.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape: its samples and each family's declared type.
#[derive(Debug, Default)]
struct Scrape {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// Samples named `name` whose labels include every pair of `with`.
    fn find(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && with
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    fn value(&self, name: &str, with: &[(&str, &str)]) -> Option<f64> {
        self.find(name, with).first().map(|s| s.value)
    }
}

/// Parse the Prometheus text exposition format (0.0.4) strictly enough to catch a
/// malformed line: `# HELP`/`# TYPE` comments, and `name{label="value",...} number`.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut out = Scrape::default();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(bad("unknown type"));
                    }
                    if out.types.insert(name.into(), kind.into()).is_some() {
                        return Err(bad("type declared twice"));
                    }
                }
                (Some("HELP"), Some(_), _) => {}
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find('=').ok_or_else(|| bad("label without ="))?;
                let key = r[..eq].trim_start_matches(',').to_string();
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad("bad label name"));
                }
                let mut chars = r[eq + 1..].char_indices();
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut value = String::new();
                let mut end = None;
                let mut escaped = false;
                for (i, c) in chars {
                    match (escaped, c) {
                        (true, 'n') => {
                            value.push('\n');
                            escaped = false
                        }
                        (true, c) => {
                            value.push(c);
                            escaped = false
                        }
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(eq + 1 + i + 1);
                            break;
                        }
                        (false, c) => value.push(c),
                    }
                }
                let end = end.ok_or_else(|| bad("unterminated label value"))?;
                labels.insert(key, value);
                r = &r[end..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let mut fields = rest.split_whitespace();
        let raw = fields.next().ok_or_else(|| bad("no value"))?;
        let value = match raw {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().map_err(|_| bad("value is not a number"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| bad("bad timestamp"))?;
        }
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Every sample belongs to a declared family; histogram series are well formed.
    for s in &out.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                let base = s.name.strip_suffix(suf)?;
                (out.types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&s.name);
        if !out.types.contains_key(family) {
            return Err(format!("sample {} has no # TYPE", s.name));
        }
        if s.name.ends_with("_bucket") && !s.labels.contains_key("le") {
            return Err(format!("bucket without le: {s:?}"));
        }
    }
    check_histograms(&out)?;
    Ok(out)
}

/// Buckets are cumulative and the `+Inf` bucket equals `_count`, per series.
fn check_histograms(s: &Scrape) -> Result<(), String> {
    for (family, kind) in &s.types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for b in s
            .samples
            .iter()
            .filter(|x| x.name == format!("{family}_bucket"))
        {
            let mut key = b.labels.clone();
            let le = key.remove("le").unwrap_or_default();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().map_err(|_| format!("bad le {le}"))?
            };
            series.entry(key).or_default().push((le, b.value));
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            for w in buckets.windows(2) {
                if w[1].1 < w[0].1 {
                    return Err(format!("{family} {labels:?}: buckets not cumulative"));
                }
            }
            let inf = buckets.last().filter(|b| b.0.is_infinite()).map(|b| b.1);
            let count = s
                .samples
                .iter()
                .find(|x| x.name == format!("{family}_count") && x.labels == labels)
                .map(|x| x.value);
            if inf.is_none() || inf != count {
                return Err(format!(
                    "{family} {labels:?}: +Inf bucket {inf:?} != count {count:?}"
                ));
            }
        }
    }
    Ok(())
}

async fn scrape_text(c: &Cluster, id: u64) -> String {
    let r = c
        .http
        .get(format!("{}/metrics", c.api(id)))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), StatusCode::OK);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain"), "content type {ct}");
    r.text().await.expect("scrape body")
}

async fn scrape(c: &Cluster, id: u64) -> Scrape {
    let text = scrape_text(c, id).await;
    parse(&text)
        .unwrap_or_else(|e| panic!("node {id}: /metrics is not Prometheus text: {e}\n{text}"))
}

/// Ready on all nodes including their executors.
async fn up(c: &mut Cluster) {
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let n = c.nodes.len() as u64;
    wait_for(LONG, "every executor ready", || async {
        for id in 1..=n {
            if c.status(id).await?["executor"]["ready"] != true {
                return None;
            }
        }
        Some(())
    })
    .await;
}

async fn trigger(c: &Cluster, t: &str, dag: &str) -> String {
    let (s, v) = c
        .post(1, "/runs", t, &json!({"dag_id": dag, "run_type": "manual"}))
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    v["run_id"].as_str().expect("run_id").to_string()
}

/// Every `orchestrator_*` metric name an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("orchestrator_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The expressions of the dashboard's panels and of the alert rules.
fn dashboard_and_alert_exprs() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{root}/cluster/grafana/orchestrator-dashboard.json"
        ))
        .expect("dashboard file"),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            exprs.push((format!("panel {:?}", p["title"]), e.to_string()));
        }
    }
    let alerts: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(format!("{root}/cluster/prometheus/alerts.yml"))
            .expect("alerts file"),
    )
    .expect("alerts.yml is valid YAML");
    for g in alerts["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let e = r["expr"].as_str().expect("every rule has an expr");
            exprs.push((format!("alert {:?}", r["alert"]), e.to_string()));
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_histograms_consistent_raft_gauges_and_back_the_dashboard() {
    let mut c = Cluster::new(3, FAST);
    up(&mut c).await;
    // Before any run, every node already exports its histograms (a dashboard's quantile
    // and an alert see a series from the start, on followers too).
    for id in 1..=3 {
        let s = scrape(&c, id).await;
        for (name, labels) in [
            ("orchestrator_scheduler_fire_lag_seconds_count", vec![]),
            ("orchestrator_raft_commit_seconds_count", vec![]),
            (
                "orchestrator_task_attempt_duration_seconds_count",
                vec![("result", "failed")],
            ),
            (
                "orchestrator_run_duration_seconds_count",
                vec![("state", "cancelled")],
            ),
        ] {
            assert!(
                s.value(name, &labels).is_some(),
                "node {id}: no {name} {labels:?}"
            );
        }
    }
    let t = c.token("acme", ALL_SCOPES);
    // A scheduled DAG (fire lag) and a manual one whose run finishes (run and attempt
    // durations).
    for body in [
        json!({"dag_id": "tick", "schedule": "*/2 * * * * *",
               "tasks": [{"task_id": "n", "kind": "noop"}]}),
        json!({"dag_id": "etl", "tasks": [
            {"task_id": "extract", "kind": "noop"},
            {"task_id": "load", "kind": "noop", "depends_on": ["extract"]}]}),
    ] {
        let (s, v) = c.post(1, "/dags", &t, &body).await;
        assert_eq!(s, StatusCode::OK, "submit: {v}");
    }
    let run_id = trigger(&c, &t, "etl").await;
    wait_for(LONG, "the manual run to finish", || async {
        let (s, v) = c.get(2, &format!("/runs/{run_id}"), &t).await;
        (s == StatusCode::OK && v["state"] == "done").then_some(())
    })
    .await;
    // A few more API calls: a 404 on an unknown route and one on an unknown run.
    let (s, _) = c.get(3, "/dags", &t).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = c.get(1, "/runs/no-such-run", &t).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let r = c
        .http
        .get(format!("{}/no/such/path/{run_id}", c.api(1)))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // A scheduled window fired (its lag is recorded on the leader that fired it).
    wait_for(LONG, "a scheduled window to fire", || async {
        let (s, v) = c
            .get(1, "/runs?dag_id=tick&run_type=scheduled&limit=5", &t)
            .await;
        (s == StatusCode::OK && !v["runs"].as_array()?.is_empty()).then_some(())
    })
    .await;

    // Every node converged on the same state: the replicated gauges agree.
    c.wait_converged(LONG).await;
    let scrapes = wait_for(LONG, "raft gauges to agree on every node", || async {
        let mut all = Vec::new();
        for id in 1..=3 {
            all.push(scrape(&c, id).await);
        }
        let terms: BTreeSet<u64> = all
            .iter()
            .map(|s| s.value("orchestrator_raft_term", &[]).unwrap_or(-1.0) as u64)
            .collect();
        let leaders: BTreeSet<u64> = all
            .iter()
            .map(|s| {
                s.value("orchestrator_raft_current_leader", &[])
                    .unwrap_or(0.0) as u64
            })
            .collect();
        let is_leader: f64 = all
            .iter()
            .map(|s| s.value("orchestrator_raft_is_leader", &[]).unwrap_or(0.0))
            .sum();
        (terms.len() == 1 && leaders.len() == 1 && !leaders.contains(&0) && is_leader == 1.0)
            .then_some(all)
    })
    .await;
    let leader = scrapes[0]
        .value("orchestrator_raft_current_leader", &[])
        .expect("leader gauge") as u64;
    let leader_scrape = &scrapes[leader as usize - 1];
    assert_eq!(
        leader_scrape.value("orchestrator_raft_is_leader", &[]),
        Some(1.0),
        "the node every node names as leader says it leads"
    );
    for (i, s) in scrapes.iter().enumerate() {
        let id = (i + 1).to_string();
        for sample in &s.samples {
            assert_eq!(
                sample.labels.get("node"),
                Some(&id),
                "every series of node {id} carries node=\"{id}\": {sample:?}"
            );
            assert!(
                !sample.labels.values().any(|v| v.contains(&run_id)),
                "no series is labelled with a run id: {sample:?}"
            );
        }
        assert_eq!(
            s.value("orchestrator_node_ready", &[]),
            Some(1.0),
            "node {id} ready"
        );
        // Applied on every node: the finished run's duration and the run census.
        assert!(
            s.value(
                "orchestrator_run_duration_seconds_count",
                &[("state", "done")]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "node {id}: run duration observed"
        );
        assert!(
            s.value("orchestrator_runs", &[("state", "done")])
                .unwrap_or(0.0)
                >= 1.0,
            "node {id}: runs by state"
        );
        assert!(
            s.value("orchestrator_raft_commit_seconds_count", &[])
                .is_some()
                || (i + 1) as u64 != leader,
            "the leader records commit latency"
        );
    }
    // API latency is a histogram labelled by the route template, never the raw path.
    let run_route = format!("{BASE}/runs/{{run_id}}");
    let mut by_route = BTreeSet::new();
    for s in &scrapes {
        for x in s.find("orchestrator_http_request_duration_seconds_count", &[]) {
            by_route.insert((
                x.labels["route"].clone(),
                x.labels["method"].clone(),
                x.labels["class"].clone(),
            ));
        }
    }
    assert!(
        by_route.contains(&(run_route.clone(), "GET".into(), "2xx".into())),
        "GET {run_route} 2xx recorded: {by_route:?}"
    );
    assert!(
        by_route.contains(&(run_route.clone(), "GET".into(), "4xx".into())),
        "404 on an unknown run recorded under its route template: {by_route:?}"
    );
    assert!(
        by_route.contains(&("unmatched".into(), "GET".into(), "4xx".into())),
        "a path no route matches is recorded as unmatched: {by_route:?}"
    );
    assert!(
        scrapes.iter().any(|s| !s
            .find(
                "orchestrator_http_request_duration_seconds_bucket",
                &[("route", &run_route)]
            )
            .is_empty()),
        "latency buckets by route"
    );
    // Fire lag: recorded where the window was fired (the leader then).
    let fired: f64 = scrapes
        .iter()
        .filter_map(|s| s.value("orchestrator_scheduler_fire_lag_seconds_count", &[]))
        .sum();
    assert!(fired >= 1.0, "fire lag histogram has observations");
    let attempts: f64 = scrapes
        .iter()
        .flat_map(|s| {
            s.find(
                "orchestrator_task_attempt_duration_seconds_count",
                &[("result", "success")],
            )
        })
        .map(|x| x.value)
        .sum();
    assert!(
        attempts >= 2.0,
        "attempt durations of both tasks: {attempts}"
    );
    assert_eq!(
        leader_scrape
            .find("orchestrator_raft_replication_lag_entries", &[])
            .len(),
        3,
        "the leader exports the lag of every member"
    );
    for ty in [
        "orchestrator_http_request_duration_seconds",
        "orchestrator_scheduler_fire_lag_seconds",
        "orchestrator_run_duration_seconds",
        "orchestrator_task_attempt_duration_seconds",
        "orchestrator_raft_commit_seconds",
        "orchestrator_raft_apply_batch_size",
    ] {
        assert_eq!(
            leader_scrape.types.get(ty).map(String::as_str),
            Some("histogram"),
            "{ty} is a histogram"
        );
    }

    // The dashboard and the alert rules use only metrics a node exports.
    let exported: BTreeSet<String> = scrapes.iter().flat_map(|s| s.names()).collect();
    let exprs = dashboard_and_alert_exprs();
    assert!(exprs.len() >= 20, "dashboard and alerts have expressions");
    let mut missing = Vec::new();
    for (what, e) in &exprs {
        for name in metric_names(e) {
            if !exported.contains(&name) {
                missing.push(format!("{what}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics used by the dashboard or alerts but not exported:\n{}",
        missing.join("\n")
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_costs_the_same_at_10_and_500_runs() {
    let mut c = Cluster::new(1, FAST);
    up(&mut c).await;
    let t = c.token("acme", ALL_SCOPES);
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &json!({"dag_id": "many", "tasks": [{"task_id": "n", "kind": "noop"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut run_ids = BTreeSet::new();
    // One after the other: manual runs triggered in the same millisecond share their
    // window, and so their run.
    let trigger_many = |n: usize| {
        let c = &c;
        let t = &t;
        async move {
            let mut ids = BTreeSet::new();
            for _ in 0..n {
                ids.insert(trigger(c, t, "many").await);
            }
            ids
        }
    };
    run_ids.extend(trigger_many(10).await);
    // Measure once every run is finished (no series appears or goes between the two).
    let settle = |want: usize| {
        let c = &c;
        async move {
            wait_for(LONG, &format!("{want} runs done"), || async {
                let s = scrape(c, 1).await;
                let done = s.value("orchestrator_runs", &[("state", "done")]);
                (done == Some(want as f64)).then_some(())
            })
            .await
        }
    };
    settle(run_ids.len()).await;
    let measure = || async {
        let mut bytes = 0;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            bytes = scrape_text(&c, 1).await.len();
            times.push(t0.elapsed());
        }
        times.sort();
        (bytes, times[2])
    };
    let (bytes_10, time_10) = measure().await;
    run_ids.extend(trigger_many(490).await);
    assert!(run_ids.len() >= 450, "runs created: {}", run_ids.len());
    settle(run_ids.len()).await;
    let (bytes_500, time_500) = measure().await;
    println!(
        "FIGURE scrape at 10 runs: {bytes_10} bytes, median {time_10:?}; \
         at 500 runs: {bytes_500} bytes, median {time_500:?}"
    );
    // The same series at both sizes: only numbers change (a few more digits).
    let text = scrape_text(&c, 1).await;
    let s = parse(&text).expect("Prometheus text");
    for sample in &s.samples {
        assert!(
            !sample
                .labels
                .values()
                .any(|v| run_ids.iter().any(|id| v.contains(id.as_str()))),
            "no per-run series: {sample:?}"
        );
    }
    assert!(
        bytes_500 <= bytes_10 + bytes_10 / 10,
        "scrape size does not grow with runs: {bytes_10} -> {bytes_500}"
    );
    assert!(
        time_500 <= time_10 * 10 + Duration::from_millis(200),
        "scrape time does not grow with runs: {time_10:?} -> {time_500:?}"
    );
    assert_eq!(
        s.value("orchestrator_runs_active", &[]),
        Some(0.0),
        "all runs finished"
    );
    c.assert_no_panics();
}

#[test]
fn the_parser_refuses_malformed_exposition_text() {
    assert!(parse("# TYPE a counter\na 1\n").is_ok());
    assert!(parse("a 1\n").is_err(), "sample without a TYPE");
    assert!(
        parse("# TYPE a gauge\na{x=1} 1\n").is_err(),
        "unquoted label"
    );
    assert!(
        parse("# TYPE a gauge\na one\n").is_err(),
        "value not a number"
    );
    let hist =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n";
    assert!(parse(hist).is_err(), "buckets not cumulative");
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (le) (rate(orchestrator_x_bucket[5m]))) / orchestrator_y"),
        ["orchestrator_x_bucket", "orchestrator_y"].iter().map(|s| s.to_string()).collect()
    );
}

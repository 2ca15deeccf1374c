//! The edges of the replicated core on real processes: a leader cut off from its quorum
//! by a real iptables partition answers every write with 503 within one second more
//! than `leader_wait_ms` while the majority goes on, and nodes whose wall clocks are
//! skewed (a real libfaketime preload) still get work, never get a lease that is born
//! expired, and a leader whose clock runs a minute fast fires no window early.

mod common;

use std::time::{Duration, Instant};

use common::netfilter::Partition;
use common::{wait_for, Cluster, ALL_SCOPES, BASE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);
const LEADER_WAIT_MS: u64 = 2000;

/// Wait until run `run_id`, read through `node`, satisfies `pred`; returns the run.
async fn wait_run(
    c: &Cluster,
    node: u64,
    t: &str,
    run_id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(LONG, what, || async {
        let (s, v) = c.get(node, &format!("/runs/{run_id}"), t).await;
        (s == StatusCode::OK && pred(&v)).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_answers_503_and_the_majority_goes_on() {
    let wait = LEADER_WAIT_MS.to_string();
    let mut c = Cluster::new(3, &[("ORCHESTRATOR_LEADER_WAIT_MS", &wait)]);
    c.start_all();
    let old = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);

    // A run that stays active, to cancel during the partition.
    let (s, v) = c
        .post(
            old,
            "/dags",
            &t,
            &json!({"dag_id": "long", "tasks": [
            {"task_id": "wait", "kind": "shell", "command": "sleep 60"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = c
        .post(
            old,
            "/runs",
            &t,
            &json!({"dag_id": "long", "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    wait_run(&c, old, &t, &run, "the run to start", |v| {
        v["tasks"]["wait"] == "running"
    })
    .await;

    let cut = Partition::isolate(&c, old);
    println!("cut node {old} (the leader) off from both followers");
    let bound = Duration::from_millis(LEADER_WAIT_MS + 1000);
    let writes: [(&str, Method, String, Option<Value>); 3] = [
        (
            "POST /dags",
            Method::POST,
            format!("{BASE}/dags"),
            Some(json!({"dag_id": "during"})),
        ),
        (
            "POST /runs",
            Method::POST,
            format!("{BASE}/runs"),
            Some(json!({"dag_id": "long", "run_type": "manual"})),
        ),
        (
            "POST /runs/{id}/cancel",
            Method::POST,
            format!("{BASE}/runs/{run}/cancel"),
            None,
        ),
    ];
    for (what, method, path, body) in &writes {
        let started = Instant::now();
        let (s, v, _) = c
            .request(old, method.clone(), path, Some(&t), body.as_ref(), &[])
            .await;
        let took = started.elapsed();
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what} to the cut-off leader: {v}"
        );
        assert_eq!(v["error"], "dependency_down", "{what}: {v}");
        assert!(
            took <= bound,
            "{what} answered in {took:?}, more than leader_wait + 1 s"
        );
        println!(
            "FIGURE {what} to the cut-off leader: 503 in {} ms",
            took.as_millis()
        );
    }
    // It no longer calls itself ready: it stopped acting as leader.
    wait_for(LONG, "the cut-off leader to stop serving", || async {
        c.readyz(old)
            .await
            .filter(|r| r["ready"] == false)
            .map(|_| ())
    })
    .await;

    // The majority elects a leader and takes the same writes, directly and forwarded.
    let others: Vec<u64> = (1..=3).filter(|&n| n != old).collect();
    let new = wait_for(LONG, "a leader on the majority side", || {
        c.leader_among(&others)
    })
    .await;
    let follower = others
        .iter()
        .copied()
        .find(|&n| n != new)
        .expect("a follower");
    for node in [new, follower] {
        let id = format!("after{node}");
        let (s, v) = c.post(node, "/dags", &t, &json!({"dag_id": id})).await;
        assert_eq!(s, StatusCode::OK, "POST /dags to node {node}: {v}");
        let (s, v) = c
            .post(
                node,
                "/runs",
                &t,
                &json!({"dag_id": "long", "run_type": "manual"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "POST /runs to node {node}: {v}");
    }
    let (s, v) = c
        .post(follower, &format!("/runs/{run}/cancel"), &t, &json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "cancel on the majority side: {v}");
    println!(
        "FIGURE node {new} leads the majority; writes through nodes {new} and {follower} succeed"
    );

    // Healed, the old leader catches up with everything the majority acknowledged.
    drop(cut);
    c.wait_converged(LONG).await;
    for node in [new, follower] {
        let (s, v) = c.get(old, &format!("/dags/after{node}"), &t).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "the old leader has the majority's writes: {v}"
        );
    }
    wait_run(
        &c,
        old,
        &t,
        &run,
        "the cancelled run, on the old leader",
        |v| v["state"] == "cancelled",
    )
    .await;
    c.assert_no_panics();
}

/// libfaketime's preload library, as Debian installs it (scripts/prereqs.sh).
fn libfaketime() -> String {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .expect("libfaketime (Debian's faketime package; scripts/prereqs.sh installs it)")
}

/// How far node `id`'s wall clock is from ours, read off the `Date` header of its answer
/// (one-second resolution).
async fn clock_offset_ms(c: &Cluster, id: u64) -> Option<i64> {
    let r = c
        .http
        .get(format!("{}/healthz", c.api(id)))
        .send()
        .await
        .ok()?;
    let date = r.headers().get("date")?.to_str().ok()?;
    let stamp = chrono::DateTime::parse_from_rfc2822(date).ok()?;
    Some(stamp.timestamp_millis() - chrono::Utc::now().timestamp_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_neither_starve_a_node_nor_expire_a_lease() {
    let lib = libfaketime();
    let mut c = Cluster::new(3, &[]);
    // Node 2 runs 6 s behind, node 3 a minute ahead; node 1 (which bootstraps and
    // leads) is right. Only wall time is faked: monotonic clocks stay true.
    for (id, offset) in [(2, "-6s"), (3, "+60s")] {
        c.set_node_env(id, "LD_PRELOAD", &lib);
        c.set_node_env(id, "FAKETIME", offset);
        c.set_node_env(id, "FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    for (id, want) in [(2, -6_000), (3, 60_000)] {
        let off = clock_offset_ms(&c, id).await.expect("a Date header");
        assert!(
            (off - want).abs() < 3_000,
            "node {id}'s clock is off by {off} ms, want {want}"
        );
        println!("FIGURE node {id} clock offset {off} ms");
    }
    let t = c.token("acme", ALL_SCOPES);
    let tasks: Vec<Value> = (0..12)
        .map(|i| json!({"task_id": format!("t{i}"), "kind": "shell", "command": "sleep 1"}))
        .collect();
    let (s, v) = c
        .post(1, "/dags", &t, &json!({"dag_id": "wide", "tasks": tasks}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut nodes = std::collections::BTreeMap::<u64, u32>::new();
    for _ in 0..3 {
        let (s, v) = c
            .post(
                1,
                "/runs",
                &t,
                &json!({"dag_id": "wide", "run_type": "manual"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let run = v["run_id"].as_str().expect("run_id").to_string();
        let ended =
            |v: &Value| matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled"));
        let deadline = Instant::now() + LONG;
        let v = loop {
            let (_, v) = c.get(1, &format!("/runs/{run}"), &t).await;
            if ended(&v) {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "the run did not end: {v}\nnode 2 log:\n{}\nnode 3 log:\n{}",
                c.log(2),
                c.log(3)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(v["state"], "done", "{v}");
        for (task, d) in v["task_details"].as_object().expect("task details") {
            let attempts = d["attempts"].as_array().expect("attempts");
            assert_eq!(
                attempts.len(),
                1,
                "{task}: one attempt, none lost to an expired lease: {d}"
            );
            assert_eq!(attempts[0]["state"], "done", "{task}: {d}");
            *nodes
                .entry(attempts[0]["node"].as_u64().expect("node"))
                .or_default() += 1;
        }
    }
    println!("FIGURE attempts per node with clocks at 0, -6 s, +60 s: {nodes:?}");
    for id in 1..=3 {
        assert!(nodes.contains_key(&id), "node {id} got work: {nodes:?}");
    }
    a_fast_leader_fires_nothing_early(&mut c, &t).await;
    c.assert_no_panics();
}

/// Make the node whose clock is a minute fast (3) the leader, then schedule a DAG every
/// second: no window may end after the real time it was read at. The cluster reads the
/// voters' median clock, so node 3's minute does not count (its purge cutoffs come from
/// the same clock).
async fn a_fast_leader_fires_nothing_early(c: &mut Cluster, t: &str) {
    // Node 3 gets the shortest election timeout (0.4-0.6 s against 0.8-1.6 s), so when
    // the leader stops it times out first. (Unpatched openraft 0.9 drew each node's
    // randomized election timeout once, at start, so a node 3 that drew the longest never
    // led in 20 rounds, fresh-clone suite at 963f2c0; the vendored patch now draws per
    // election, and the short range still makes the rounds quick.)
    c.kill(3);
    c.set_node_env(3, "ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MIN_MS", "400");
    c.set_node_env(3, "ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MAX_MS", "600");
    c.start(3);
    c.wait_ready(LONG).await;
    c.make_leader(3, LONG).await;
    c.wait_ready(LONG).await;
    let (s, status) = c.get(3, "/cluster/status", &c.admin_token()).await;
    assert_eq!(s, StatusCode::OK, "{status}");
    println!(
        "FIGURE node 3 (+60 s) measures the other clocks at {}",
        status["clock_offsets_ms"]
    );
    let (s, v) = c
        .post(
            3,
            "/dags",
            t,
            &json!({"dag_id": "early", "schedule": "* * * * * *",
                    "tasks": [{"task_id": "a", "kind": "noop"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let latest_end = |v: &Value| -> Option<(usize, i64)> {
        let runs = v["runs"].as_array()?;
        let ends = runs.iter().map(|r| {
            chrono::DateTime::parse_from_rfc3339(r["window"]["to"].as_str()?)
                .ok()
                .map(|t| t.timestamp_millis())
        });
        Some((
            runs.len(),
            ends.collect::<Option<Vec<i64>>>()?.into_iter().max()?,
        ))
    };
    let (count, end, read_at) = wait_for(LONG, "three fired windows", || async {
        let (s, v) = c
            .get(3, "/runs?dag_id=early&run_type=scheduled&limit=500", t)
            .await;
        let read_at = chrono::Utc::now().timestamp_millis();
        let (count, end) = latest_end(&v).filter(|_| s == StatusCode::OK)?;
        (count >= 3).then_some((count, end, read_at))
    })
    .await;
    println!(
        "FIGURE with node 3 leading, {count} windows fired; the latest ends {} ms after it was read",
        end - read_at
    );
    assert!(
        end <= read_at + 1_000,
        "a window ending {} ms in the future was fired",
        end - read_at
    );
}

/// Milliseconds since the epoch of an RFC 3339 time from the API.
fn epoch_ms(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("a time, got {v}"));
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .timestamp_millis()
}

/// Chaos Run 6's overlap: a fresh cluster's leader was running a long task when it was
/// cut off, before it had raised the replicated protocol; protocol 1's apply has no
/// term rule, so its successor gave the task away as soon as the cluster clock passed the
/// lease, and only the fence margin stood between the two attempts. At every protocol,
/// a new leader gives no task away within a lease of its term: the cut-off node has
/// stopped its attempt (a margin before its lease ran out) long before. The cluster is
/// held at protocol 1 with `raft.max_protocol`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_protocol_1_a_new_leader_gives_no_task_away_within_a_lease_of_its_term() {
    const LEASE_MS: i64 = 3000;
    let lease = LEASE_MS.to_string();
    let mut c = Cluster::new(
        3,
        &[
            ("ORCHESTRATOR_RAFT__MAX_PROTOCOL", "1"),
            ("ORCHESTRATOR_EXECUTOR__LEASE_MS", &lease),
            ("ORCHESTRATOR_EXECUTOR__FENCE_MARGIN_MS", "600"),
            ("ORCHESTRATOR_EXECUTOR__HEARTBEAT_MS", "300"),
        ],
    );
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let dag = json!({"dag_id": "long", "tasks": [
        {"task_id": "l", "kind": "shell", "command": "sleep 60", "retries": 2}]});
    let (s, v) = c.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = c
        .post(
            1,
            "/runs",
            &t,
            &json!({"dag_id": "long", "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run_id = v["run_id"].as_str().expect("run_id").to_string();
    let v = wait_run(&c, 1, &t, &run_id, "attempt 1 running", |v| {
        v["task_details"]["l"]["attempts"][0]["state"] == "running"
    })
    .await;
    let holder = v["task_details"]["l"]["attempts"][0]["node"]
        .as_u64()
        .expect("attempt 1's node");
    // The holder leads, as node 1 did in Run 6.
    c.make_leader(holder, LONG).await;
    let status = c.status(holder).await.expect("the holder's status");
    assert_eq!(status["protocol"], 1, "held at protocol 1: {status}");

    let cut = Partition::isolate(&c, holder);
    let others: Vec<u64> = (1..=3).filter(|&n| n != holder).collect();
    // When a new leader serves, as seen from here (polled often: it began no later).
    let deadline = Instant::now() + LONG;
    let serving_ms = loop {
        if c.leader_among(&others).await.is_some() {
            break chrono::Utc::now().timestamp_millis();
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let v = wait_run(&c, others[0], &t, &run_id, "attempt 1 lost", |v| {
        v["task_details"]["l"]["attempts"][0]["state"] == "failed"
    })
    .await;
    drop(cut);
    let error = &v["task_details"]["l"]["attempts"][0]["error"];
    assert!(
        error.as_str().is_some_and(|e| e.contains("lease expired")),
        "attempt 1 ended by its lease: {error}"
    );
    let expired_ms = epoch_ms(&v["task_details"]["l"]["attempts"][0]["ended_at"]);
    let after = expired_ms - serving_ms;
    println!("FIGURE the new leader expired the cut-off leader's lease {after} ms after it began serving (lease {LEASE_MS} ms)");
    // Polling and the clock reading cost up to ~200 ms of slack; without the rule the
    // lease ran out about a lease after the cut, an election (~1 s) before this bound.
    assert!(
        after >= LEASE_MS - 250,
        "attempt 1 was given away {after} ms into the new term, before a full lease ({LEASE_MS} ms)"
    );
    c.assert_no_panics();
}

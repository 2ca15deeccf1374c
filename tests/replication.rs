//! Replicated core (issue 2): real three-node clusters of `orchestrator` processes.
//! Writes through any node (read at once on the others), leader SIGKILL and restart, whole-cluster crash, a wiped node
//! rejoining through a snapshot, a paused minority, no quorum, elections that every node
//! can win, and bad peer calls.

mod common;

use std::time::{Duration, Instant};

use common::{dag_body, wait_for, Cluster, ALL_SCOPES, BASE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// `DELETE /cluster/members/{node}` through `via`, as an operator.
async fn remove_member(c: &Cluster, via: u64, admin: &str, node: u64) {
    let path = format!("{BASE}/cluster/members/{node}");
    let (s, v, _) = c
        .request(via, reqwest::Method::DELETE, &path, Some(admin), None, &[])
        .await;
    assert_eq!(s, StatusCode::OK, "remove node {node}: {v}");
}

/// `POST /cluster/members` of `node` at its addresses through `via`; the status after.
async fn add_member(c: &Cluster, via: u64, admin: &str, node: u64) -> Value {
    let add = json!({"node_id": node, "api_addr": c.api(node).trim_start_matches("http://"),
                     "peer_addr": c.peer_addr(node)});
    let (s, v) = c.post(via, "/cluster/members", admin, &add).await;
    assert_eq!(s, StatusCode::OK, "add node {node}: {v}");
    v
}

/// A ready three-node cluster with DAG `d` of tenant acme: the cluster, its leader and
/// acme's token.
async fn three_nodes_with_dag_d() -> (Cluster, u64, String) {
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    let leader = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    put_dag(&c, leader, &t, "d").await;
    (c, leader, t)
}

async fn put_dag(c: &Cluster, via: u64, token: &str, dag_id: &str) {
    let (s, v) = c.post(via, "/dags", token, &dag_body(dag_id)).await;
    assert_eq!(s, StatusCode::OK, "submit {dag_id} via node {via}: {v}");
}

/// Trigger a backfill run for day `day` (2025-10-{day}) and return its run id.
async fn trigger(
    c: &Cluster,
    via: u64,
    token: &str,
    dag_id: &str,
    day: u32,
) -> Result<String, (StatusCode, Value)> {
    let body = json!({"dag_id": dag_id, "run_type": "backfill",
                      "from": format!("2025-10-{day:02}"), "to": format!("2025-10-{:02}", day + 1)});
    let (s, v) = c.post(via, "/runs", token, &body).await;
    if s == StatusCode::OK {
        Ok(v["run_id"].as_str().expect("run_id").to_string())
    } else {
        Err((s, v))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_are_read_on_all_others() {
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let mut runs = Vec::new();
    for via in 1..=3 {
        let dag = format!("dag{via}");
        put_dag(&c, via, &t, &dag).await;
        runs.push((
            dag.clone(),
            trigger(&c, via, &t, &dag, 1).await.expect("trigger"),
        ));
    }
    for (dag, run) in &runs {
        for read_on in 1..=3 {
            let (s, v) = c.get(read_on, &format!("/runs/{run}"), &t).await;
            assert_eq!(s, StatusCode::OK, "node {read_on} reading {run}: {v}");
            assert_eq!(v["dag_id"], dag.as_str());
            assert_eq!(v["run_id"], run.as_str());
            assert!(v["tasks"]["extract"].is_string(), "{v}");
        }
    }
    // Many at once: each write, once acknowledged, is read at once on the two other
    // nodes, whose reads share their requests for the leader's read index.
    let each = (0..30u64).map(|i| {
        let (c, t) = (&c, &t);
        async move {
            let dag = format!("many{i}");
            let via = i % 3 + 1;
            put_dag(c, via, t, &dag).await;
            for read_on in (1..=3).filter(|n| *n != via) {
                let (s, v) = c.get(read_on, &format!("/dags/{dag}"), t).await;
                assert_eq!(
                    s,
                    StatusCode::OK,
                    "node {read_on} reading {dag} written via {via}: {v}"
                );
            }
        }
    });
    futures::future::join_all(each).await;
    c.wait_converged(LONG).await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_fails_over_and_the_node_catches_up_on_restart() {
    let (mut c, leader, t) = three_nodes_with_dag_d().await;
    let before = trigger(&c, leader, &t, "d", 1).await.expect("first run");

    c.kill(leader);
    let killed_at = Instant::now();
    let survivor = if leader == 1 { 2 } else { 1 };
    // Keep writing through a survivor until a write is acknowledged again.
    let mut day = 2;
    let after = wait_for(LONG, "a write after the leader was killed", || {
        day += 1;
        let d = day;
        let c = &c;
        let t = &t;
        async move { trigger(c, survivor, t, "d", d).await.ok() }
    })
    .await;
    let failover = killed_at.elapsed();
    println!(
        "FIGURE leader SIGKILL -> next acknowledged write: {} ms",
        failover.as_millis()
    );
    let new_leader = c.wait_leader(LONG).await;
    assert_ne!(new_leader, leader, "a new leader is elected");

    c.start(leader);
    c.wait_ready(LONG).await;
    c.wait_converged(LONG).await;
    for run in [&before, &after] {
        let (s, v) = c.get(leader, &format!("/runs/{run}"), &t).await;
        assert_eq!(s, StatusCode::OK, "restarted node serves {run}: {v}");
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_crash_keeps_every_acknowledged_write() {
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    put_dag(&c, 2, &t, "d").await;
    // Concurrent writes through all nodes: these also exercise proposer batching.
    let mut handles = Vec::new();
    for i in 0..60u32 {
        let via = (i % 3) as u64 + 1;
        let api = c.api(via);
        let t = t.clone();
        let http = c.http.clone();
        handles.push(tokio::spawn(async move {
            let body = json!({"dag_id": "d", "run_type": "manual",
                              "from": format!("2025-01-01T00:{:02}:00Z", i), "to": format!("2025-01-01T00:{:02}:30Z", i)});
            let r = http.post(format!("{api}{BASE}/runs")).bearer_auth(&t).json(&body).send().await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            let v: Value = r.json().await.ok()?;
            Some(v["run_id"].as_str()?.to_string())
        }));
    }
    let mut acked = Vec::new();
    for h in handles {
        if let Some(id) = h.await.expect("join") {
            acked.push(id);
        }
    }
    assert_eq!(
        acked.len(),
        60,
        "all writes acknowledged on a healthy cluster"
    );
    for id in 1..=3 {
        c.kill(id);
    }
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    for run in &acked {
        for node in 1..=3 {
            let (s, _) = c.get(node, &format!("/runs/{run}"), &t).await;
            assert_eq!(
                s,
                StatusCode::OK,
                "acknowledged {run} survives on node {node}"
            );
        }
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_is_re_added_and_catches_up_through_a_snapshot() {
    let mut c = Cluster::new(
        3,
        &[
            ("ORCHESTRATOR_RAFT__SNAPSHOT_AFTER_LOGS", "20"),
            ("ORCHESTRATOR_RAFT__LOGS_KEPT_AFTER_SNAPSHOT", "5"),
        ],
    );
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let admin = c.admin_token();
    put_dag(&c, 1, &t, "d").await;
    c.kill(3);
    c.wait_leader(LONG).await;
    put_dag(&c, 2, &t, "d2").await;
    let mut runs = Vec::new();
    for day in 1..=28 {
        runs.push(trigger(&c, 1, &t, "d", day).await.expect("trigger"));
        runs.push(trigger(&c, 2, &t, "d2", day).await.expect("trigger"));
    }
    let leader = c.wait_leader(LONG).await;
    let purged = wait_for(
        LONG,
        "the leader to purge its log behind a snapshot",
        || async {
            let s = c.status(leader).await?;
            s["purged_index"].as_u64().filter(|p| *p > 5)
        },
    )
    .await;
    println!("leader purged its log up to index {purged}");

    // Replace the dead node: remove it, wipe its disk, start it empty, add it back.
    remove_member(&c, leader, &admin, 3).await;
    std::fs::remove_dir_all(c.node(3).dir.join("data")).expect("wipe node 3");
    c.start(3);
    let v = add_member(&c, leader, &admin, 3).await;
    assert!(
        v["voters"].as_array().expect("voters").contains(&json!(3)),
        "node 3 is a voter again: {v}"
    );
    c.wait_converged(LONG).await;
    let s3 = c.status(3).await.expect("node 3 status");
    assert!(
        s3["snapshot_index"].as_u64().is_some(),
        "node 3 installed a snapshot: {s3}"
    );
    for run in &runs {
        let (s, _) = c.get(3, &format!("/runs/{run}"), &t).await;
        assert_eq!(s, StatusCode::OK, "node 3 serves {run}");
    }
    c.assert_no_panics();
}

/// A node started again on a wiped data dir, without being removed first, must take no
/// part in the cluster: with an empty log it granted votes (a stale node could win an
/// election with it and lose an acknowledged write) and took the leader's log again (the
/// leader's debug build panicked on the "log reversion"). It refuses the cluster's Raft
/// calls (they name the disk the cluster knows it by) until an operator removes it and
/// adds it again; then it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_on_a_wiped_disk_takes_no_part_until_it_is_removed_and_added() {
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    let leader = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let admin = c.admin_token();
    put_dag(&c, leader, &t, "d").await;
    let victim = (1..=3).find(|n| *n != leader).expect("a follower");
    c.kill(victim);
    std::fs::remove_dir_all(c.node(victim).dir.join("data")).expect("wipe");
    c.start(victim);
    wait_for(
        LONG,
        "the wiped node to refuse the cluster's Raft calls",
        || async {
            c.log(victim)
                .contains("its data dir was wiped or replaced")
                .then_some(())
        },
    )
    .await;
    // It took nothing: no log, no membership, not ready; the others go on without it.
    let s = c.status(victim).await.expect("the wiped node's status");
    assert_eq!(s["initialized"], false, "{s}");
    assert!(s["last_log_index"].is_null(), "{s}");
    for day in 1..=5 {
        trigger(&c, leader, &t, "d", day)
            .await
            .expect("the majority writes");
    }
    let leader = c.wait_leader(LONG).await;
    let ls = c.status(leader).await.expect("leader status");
    assert!(
        ls["voters"]
            .as_array()
            .expect("voters")
            .contains(&json!(victim)),
        "{ls}"
    );
    // Nor does it vote: with the leader gone, the other follower and the wiped node elect
    // no one for several election timeouts (1.6 s at most here); before, the wiped node's
    // vote made a leader of the first to ask, whatever its log lacked.
    let other = (1..=3)
        .find(|n| *n != leader && *n != victim)
        .expect("the other follower");
    c.kill(leader);
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        for n in [other, victim] {
            let state = c.readyz(n).await.map(|r| r["state"].clone());
            assert_ne!(
                state,
                Some(json!("leader")),
                "node {n} leads with the wiped node's vote"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.start(leader);
    let leader = c.wait_leader(LONG).await;
    c.assert_no_panics();
    // The runbook's way back: remove it, add it (the add learns its new disk).
    remove_member(&c, leader, &admin, victim).await;
    add_member(&c, leader, &admin, victim).await;
    c.wait_converged(LONG).await;
    let (s, v) = c.get(victim, "/dags/d", &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    c.assert_no_panics();
}

/// The runbook's whole-cluster restore: node 1's data dir copied over every node, then
/// `orchestrator restore-identity` on each. Without it the copies hold node 1's disk,
/// which the membership does not know them by, and refuse the cluster's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restored_from_one_node_s_archive_runs_after_restore_identity() {
    let (mut c, _, t) = three_nodes_with_dag_d().await;
    c.wait_converged(LONG).await;
    for n in 1..=3 {
        c.terminate(n);
    }
    let archive = c.node(1).dir.join("data");
    for n in [2, 3] {
        let data = c.node(n).dir.join("data");
        std::fs::remove_dir_all(&data).expect("clear the node's data dir");
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(&archive)
            .arg(&data)
            .status()
            .expect("cp");
        assert!(copied.success());
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args(["restore-identity", "--node-id", &n.to_string()])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .expect("restore-identity");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("now holds its member's disk"), "{said}");
    }
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_converged(LONG).await;
    for n in 1..=3 {
        let (s, v) = c.get(n, "/dags/d", &t).await;
        assert_eq!(s, StatusCode::OK, "node {n}: {v}");
    }
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_minority_does_not_stop_the_majority_and_converges_after() {
    let (c, leader, t) = three_nodes_with_dag_d().await;
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");
    c.pause(follower);
    let other = (1..=3)
        .find(|n| *n != leader && *n != follower)
        .expect("third");
    for day in 1..=10 {
        let via = if day % 2 == 0 { leader } else { other };
        trigger(&c, via, &t, "d", day)
            .await
            .expect("majority keeps accepting writes");
    }
    c.resume(follower);
    c.wait_converged(LONG).await;
    let (s, v) = c.get(follower, "/dags/d", &t).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    c.assert_no_panics();
}

/// A leader paused for longer than an election timeout has lost its leadership. The moment
/// it runs again its `/readyz` must not call it a ready leader. It did: the answer took
/// "leader" from metrics read before the node caught up and "no quorum needed" from a
/// read after it had stepped down, and the test harness (and any load balancer) then
/// took it for the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_leader_does_not_call_itself_ready() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    for round in 1..=3 {
        let (old, _) = c.pause_leader_until_another_leads(LONG).await;
        // Ask while it is still stopped: the kernel queues the request and the node
        // answers it as soon as it runs again.
        let addr = c
            .api(old)
            .split("://")
            .nth(1)
            .expect("host:port")
            .to_string();
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        c.resume(old);
        let mut answer = String::new();
        tokio::time::timeout(LONG, s.read_to_string(&mut answer))
            .await
            .expect("an answer")
            .expect("read");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert!(
            !(v["state"] == "leader" && v["ready"] == true),
            "round {round}: node {old} called itself a ready leader right after it resumed: {v}"
        );
        c.wait_ready(LONG).await;
    }
    c.assert_no_panics();
}

/// openraft 0.9 draws a node's randomized election timeout once, at start: whenever the
/// leader stopped, the follower with the shorter draw won, and the node with the longest
/// draw never led again. The vendored patch (vendor/README.md) draws again each time the
/// timer starts, so every node wins its share. Before the patch this failed 2 runs of 3
/// (one node lost all 16 rounds; it passes only when two draws happen to be close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_wins_elections_when_leaders_keep_stopping() {
    let mut c = Cluster::new(
        3,
        &[
            ("ORCHESTRATOR_RAFT__HEARTBEAT_MS", "100"),
            ("ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MIN_MS", "300"),
            ("ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MAX_MS", "900"),
        ],
    );
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    // A node that is a candidate in every round and wins each with probability 1/2 loses
    // all 16 with probability 2^-16; three nodes, about 1 in 20,000.
    let mut wins = std::collections::BTreeMap::<u64, u32>::new();
    for _round in 1..=16 {
        let (old, new) = c.pause_leader_until_another_leads(LONG).await;
        *wins.entry(new).or_default() += 1;
        c.resume(old);
        c.wait_ready(LONG).await;
        // Every candidate of the next round must start from the same footing: a resumed
        // node that has not yet taken an append from the new leader holds its vote
        // uncommitted, and openraft times an uncommitted vote's election without the
        // leader lease, so it would win the next round every time (seen: {2: 8, 3: 8}).
        wait_for(
            LONG,
            "the resumed node to follow the new leader",
            || async {
                let lag = c.status(new).await?["replication_lag"][old.to_string()].as_u64()?;
                let follows = c.status(old).await?["leader"] == new;
                (lag == 0 && follows).then_some(())
            },
        )
        .await;
        if wins.len() == 3 {
            break;
        }
    }
    assert_eq!(
        wins.len(),
        3,
        "every node should win an election when leaders keep stopping; wins per node: {wins:?}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_answer_503_within_the_bounded_wait() {
    let mut c = Cluster::new(3, &[("ORCHESTRATOR_LEADER_WAIT_MS", "2000")]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    put_dag(&c, 1, &t, "d").await;
    c.kill(2);
    c.kill(3);
    let started = Instant::now();
    let err = trigger(&c, 1, &t, "d", 5)
        .await
        .expect_err("no quorum, no write");
    assert_eq!(err.0, StatusCode::SERVICE_UNAVAILABLE, "{:?}", err.1);
    assert_eq!(err.1["error"], "dependency_down");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "answered within the bounded wait"
    );
    let (s, v) = c.get(1, "/runs/run_1", &t).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "a current read without quorum: {v}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_port_rejects_bad_secret_wrong_node_and_garbage() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    let peer = format!("http://{}", c.peer_addr(1));
    let send = |secret: &str, target: &str, body: &'static str| {
        c.http
            .post(format!("{peer}/raft/vote"))
            .header("x-cluster-secret", secret)
            .header("x-target-node", target)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send("wrong", "1", "{}").await.expect("answer");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send(&c.secret, "2", "{}").await.expect("answer");
    assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    let r = send(&c.secret, "1", "{not json").await.expect("answer");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send(&c.secret, "1", "{\"vote\": 12}")
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Raft RPCs are not on the public port.
    let r = c
        .http
        .post(format!("{}/raft/vote", c.api(1)))
        .body("{}")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Still healthy and serving.
    let t = c.token("acme", ALL_SCOPES);
    put_dag(&c, 1, &t, "still-alive").await;
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_serves_the_spec_examples_and_survives_sigterm() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &json!({"dag_id":"sales_gdp","schedule":"0 2 * * *","owner":"team-data"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["dag_id"], "sales_gdp");
    assert_eq!(v["status"], "active");
    let body =
        json!({"dag_id":"sales_gdp","run_type":"backfill","from":"2025-10-01","to":"2025-10-04"});
    let (s, v) = c.post(1, "/runs", &t, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "queued");
    let run_id = v["run_id"].as_str().expect("run id").to_string();
    assert!(run_id.starts_with("run_"));
    // Idempotent by (dag_id, window).
    let (_, again) = c.post(1, "/runs", &t, &body).await;
    assert_eq!(again["run_id"], run_id.as_str());
    let (s, v) = c.get(1, &format!("/runs/{run_id}"), &t).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["run_id"], run_id.as_str());
    assert!(v["tasks"].is_object());
    assert_eq!(v["window"]["from"], "2025-10-01T00:00:00.000Z");

    let status = c.terminate(1);
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    assert!(c.log(1).contains("stopped"), "logged an orderly stop");
    c.start(1);
    c.wait_leader(LONG).await;
    let (s, _) = c.get(1, &format!("/runs/{run_id}"), &t).await;
    assert_eq!(s, StatusCode::OK, "data survives a restart");
    c.assert_no_panics();
}

/// An operator's add of a node that does not answer (a typo in its address, a node not
/// started yet) is refused before anything changes: before, openraft's blocking add gave
/// up waiting for the learner and the node became a voter anyway, and a one-node cluster
/// lost its quorum (Schemathesis found it with the documented example). Conflicting
/// re-adds and removing a non-member are refused too; a retried add is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_never_made_a_voter() {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let admin = c.admin_token();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = unused.local_addr().expect("its address").port();
    drop(unused);
    let ghost = json!({"node_id": 4, "api_addr": format!("127.0.0.1:{port}"), "peer_addr": format!("127.0.0.1:{port}")});
    let started = Instant::now();
    let (s, v) = c.post(1, "/cluster/members", &admin, &ghost).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("does not answer")),
        "{v}"
    );
    println!(
        "FIGURE an unreachable node refused in {:?}",
        started.elapsed()
    );
    let status = c.status(1).await.expect("status");
    assert_eq!(status["voters"], json!([1]), "{status}");
    assert_eq!(status["learners"], json!([]), "{status}");
    put_dag(&c, 1, &t, "still-writable").await;

    // Node 4 at an address where node 1 answers: it answers, as another node.
    let impostor = json!({"node_id": 4, "api_addr": c.api(1).trim_start_matches("http://"), "peer_addr": c.peer_addr(1)});
    let (s, v) = c.post(1, "/cluster/members", &admin, &impostor).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused the call") && m.contains("not node 4")),
        "{v}"
    );

    // Whoever listens at the address given answers like a node, as node 4, but cannot
    // prove it holds the cluster secret: refused, and it was never sent the secret.
    let stranger = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stranger_addr = stranger.local_addr().expect("its address").to_string();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let answer = json!({"node_id": 4, "peer_addr": stranger_addr, "initialized": false,
                        "protocol_supported": 8, "proof": "00".repeat(32)})
    .to_string();
    let listening = {
        let heard = heard.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut conn, _)) = stranger.accept().await else {
                    return;
                };
                // The whole request: its headers, then as much body as they announce.
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        body.len() >= len
                    });
                    if n == 0 || complete {
                        break;
                    }
                }
                heard.lock().unwrap().extend_from_slice(&got);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
        })
    };
    let at_stranger = json!({"node_id": 4, "api_addr": stranger_addr, "peer_addr": stranger_addr});
    let (s, v) = c.post(1, "/cluster/members", &admin, &at_stranger).await;
    listening.abort();
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot prove it holds this cluster's secret")),
        "{v}"
    );
    let heard = String::from_utf8_lossy(&heard.lock().unwrap()).to_string();
    assert!(
        heard.contains("POST /cluster/hello"),
        "it was asked: {heard}"
    );
    assert!(
        !heard.contains(&c.secret) && !heard.to_lowercase().contains("x-cluster-secret"),
        "the cluster secret went to whoever listens at the address: {heard}"
    );
    let status = c.status(1).await.expect("status");
    assert_eq!(status["voters"], json!([1]), "{status}");

    // Node 1 at other addresses: refused; at its own: already done.
    let me = json!({"node_id": 1, "api_addr": c.api(1).trim_start_matches("http://"), "peer_addr": c.peer_addr(1)});
    let (s, v) = c.post(1, "/cluster/members", &admin, &me).await;
    assert_eq!(s, StatusCode::OK, "a retried add of a voter: {v}");
    let moved = json!({"node_id": 1, "api_addr": "127.0.0.1:1", "peer_addr": "127.0.0.1:2"});
    let (s, v) = c.post(1, "/cluster/members", &admin, &moved).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("already a member")),
        "{v}"
    );
    let (s, v, _) = c
        .request(
            1,
            reqwest::Method::DELETE,
            &format!("{BASE}/cluster/members/5"),
            Some(&admin),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a member")),
        "{v}"
    );
    let status = c.status(1).await.expect("status");
    assert_eq!(status["voters"], json!([1]), "{status}");
    put_dag(&c, 1, &t, "still-writable-2").await;
    c.assert_no_panics();
}

/// A fresh cluster's leader raises the replicated protocol before it commits anything
/// else: writes sent from the moment the API listens never apply under version 1's rules
/// (read back from the node's own Raft log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_cluster_commits_no_write_before_its_first_protocol_raise() {
    use openraft::storage::RaftLogStorage;
    use openraft::{EntryPayload, RaftLogReader};
    use orchestrator::raft::db::Db;
    use orchestrator::raft::log_store::LogStore;
    use orchestrator::state::Command;

    let mut c = Cluster::new(1, &[]);
    let t = c.token("acme", ALL_SCOPES);
    c.start_all();
    // Write from the first moment the API answers until one write commits.
    let deadline = Instant::now() + LONG;
    let mut tries = 0;
    let url = format!("{}{BASE}/dags", c.api(1));
    loop {
        tries += 1;
        let sent = c
            .http
            .post(&url)
            .bearer_auth(&t)
            .json(&dag_body(&format!("d{tries}")))
            .send()
            .await;
        // Refused connections until the node listens, then 503s until it leads.
        if sent.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "no write committed in {LONG:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.terminate(1);

    let db = Db::open(&c.node(1).dir.join("data").join("db")).expect("open the node's db");
    let mut log = LogStore::new(db);
    let entries = log
        .get_log_reader()
        .await
        .try_get_log_entries(0..u64::MAX)
        .await
        .expect("read the log");
    // Where in the log (entry, and place in its batch) the first such command applied.
    let first = |is: fn(&Command) -> bool| {
        entries.iter().find_map(|e| match &e.payload {
            EntryPayload::Normal(b) => b
                .requests
                .iter()
                .position(|r| is(&r.command))
                .map(|at| (e.log_id.index, at)),
            _ => None,
        })
    };
    let raise = first(|c| matches!(c, Command::RaiseProtocol { .. })).expect("a raise");
    let write = first(|c| matches!(c, Command::PutDag { .. })).expect("a dag written");
    assert!(
        raise < write,
        "the first write (entry, place) {write:?} applied before the raise {raise:?}, \
         after {tries} tries"
    );
    // Nor anything else: the executor's first heartbeat, proposed before there was a
    // leader, waits for the raise too.
    let any = first(|_| true).expect("requests");
    assert_eq!(any, raise, "a request applied before the raise");
}

/// A follower that keeps up with a steady write load answers `/readyz` 200 every time:
/// it trails what it knows to be committed only by the entries it is applying. Before,
/// a probe that came while a follower applied answered 503 (about one in 300 under the
/// chaos workload; far more often under this load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_that_keep_up_under_a_write_load_stay_ready() {
    let mut c = Cluster::new(
        3,
        &[
            ("ORCHESTRATOR_RATE_LIMIT__RPS", "100000"),
            ("ORCHESTRATOR_RATE_LIMIT__BURST", "100000"),
            ("ORCHESTRATOR_LIMITS__MAX_DAGS_PER_TENANT", "100000"),
        ],
    );
    c.start_all();
    let leader = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    let t = c.token("acme", ALL_SCOPES);
    let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let probing = std::sync::atomic::AtomicBool::new(true);
    let written = std::sync::atomic::AtomicUsize::new(0);
    let writer = |w: usize| {
        let (c, t, probing, written) = (&c, &t, &probing, &written);
        async move {
            let mut i = 0;
            while probing.load(std::sync::atomic::Ordering::Relaxed) {
                let (s, _) = c
                    .post(leader, "/dags", t, &dag_body(&format!("w{w}-{i}")))
                    .await;
                if s == StatusCode::OK {
                    written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                i += 1;
            }
        }
    };
    let prober = async {
        let mut refused = Vec::new();
        let deadline = Instant::now() + LONG;
        let mut round = 0;
        // At least 300 rounds, and on until the writers have written 300 DAGs: the
        // probes run beside the load, whatever the machine's speed.
        while round < 300 || written.load(std::sync::atomic::Ordering::Relaxed) < 300 {
            assert!(Instant::now() < deadline, "no 300 writes within {LONG:?}");
            for &n in &followers {
                match c.readyz(n).await {
                    Some(r) if r["ready"] == true => {}
                    other => refused.push((round, n, other)),
                }
            }
            round += 1;
        }
        probing.store(false, std::sync::atomic::Ordering::Relaxed);
        (refused, round * followers.len())
    };
    let ((refused, probes), ..) = tokio::join!(prober, writer(0), writer(1), writer(2), writer(3));
    let written = written.into_inner();
    println!(
        "FIGURE {written} DAGs written while {probes} probes ran; {} not ready",
        refused.len()
    );
    assert!(
        written >= 300,
        "too little load to show anything: {written} writes"
    );
    assert!(
        refused.is_empty(),
        "followers answered not ready: {refused:?}"
    );
    c.assert_no_panics();
}

/// The leader can be removed through itself: it leaves the voters, steps down, and the
/// next leader drops it. Before, the leader went on to the second step itself, no longer
/// leader, and panicked in openraft ("Only leader is allowed to call
/// update_effective_membership()"), answering 400 `panicked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_removed_through_itself_steps_down_and_the_others_go_on() {
    let (c, leader, t) = three_nodes_with_dag_d().await;
    let admin = c.admin_token();
    remove_member(&c, leader, &admin, leader).await;
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let next = wait_for(LONG, "a leader among the others", || {
        c.leader_among(&others)
    })
    .await;
    let status = c.status(next).await.expect("status");
    let members: Vec<u64> = status["members"]
        .as_object()
        .expect("members")
        .keys()
        .filter_map(|id| id.parse().ok())
        .collect();
    assert_eq!(members, others, "{status}");
    // Out of the cluster, it serves nothing: not ready (before, it answered 200 from the
    // leader it last knew).
    let gone = c.readyz(leader).await.expect("the removed node answers");
    assert_eq!(gone["ready"], false, "{gone}");
    trigger(&c, next, &t, "d", 1)
        .await
        .expect("the others write");
    c.assert_no_panics();
}

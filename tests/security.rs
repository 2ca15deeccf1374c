//! The attack matrix: each test mounts one attack from issue 9 against real nodes and
//! asserts the refusal.

mod common;

use std::time::Duration;

use common::{wait_for, Cluster, BASE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

async fn up(n: u64, env: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::new(n, env);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    c
}

fn shell_dag(dag_id: &str, command: &str) -> Value {
    json!({"dag_id": dag_id, "tasks": [{"task_id": "t", "kind": "shell", "command": command}]})
}

/// Trigger a manual run of `dag_id` and wait for it to finish; returns its task's log.
async fn run_and_log(c: &Cluster, t: &str, dag_id: &str) -> (Value, String) {
    let (s, v) = c
        .post(
            1,
            "/runs",
            t,
            &json!({"dag_id": dag_id, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    let v = wait_for(LONG, "the run to finish", || async {
        let (s, v) = c.get(1, &format!("/runs/{run}"), t).await;
        (s == StatusCode::OK && ["done", "failed", "cancelled"].contains(&v["state"].as_str()?))
            .then_some(v)
    })
    .await;
    let (s, log) = c
        .get(1, &format!("/runs/{run}/tasks/t/attempts/1/log"), t)
        .await;
    assert_eq!(s, StatusCode::OK, "log: {log}");
    let log = match log {
        Value::String(s) => s,
        other => other.to_string(),
    };
    (v, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_tasks_need_the_shell_scope_and_an_enabled_node() {
    let c = up(1, &[]).await;
    // Write and admin do not imply the shell capability.
    let admin = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:admin",
    );
    let (s, v) = c.post(1, "/dags", &admin, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "forbidden", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("orchestrator:shell"),
        "{v}"
    );
    // The same DAG without shell tasks is fine, and shell with the scope is too.
    let (s, v) = c
        .post(
            1,
            "/dags",
            &admin,
            &json!({"dag_id": "sh", "tasks": [{"task_id": "t", "kind": "noop"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let shell = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:shell",
    );
    let (s, v) = c.post(1, "/dags", &shell, &shell_dag("sh2", "id")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The admin cannot add a shell task to an existing DAG either.
    let (s, v) = c.post(1, "/dags", &admin, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A node with shell off refuses shell DAGs whatever the scopes.
    let off = up(1, &[("ORCHESTRATOR_EXECUTOR__SHELL_ENABLED", "false")]).await;
    let all = off.admin_token();
    let (s, v) = off.post(1, "/dags", &all, &shell_dag("sh", "id")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("shell_enabled"),
        "{v}"
    );
    c.assert_no_panics();
    off.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_task_sees_no_secrets_and_cannot_read_the_data_dir() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_EXECUTOR__SHELL_USER", "nobody"),
            ("ORCHESTRATOR_EXECUTOR__SHELL_DEFAULT_TIMEOUT_MS", "20000"),
        ],
    )
    .await;
    let t = c.admin_token();
    let data = c.node(1).dir.join("data");
    let data = data.display();
    let command = format!(
        "echo ENV; env; echo CWD=$(pwd); echo UID=$(id -u); \
         echo NODE_ENVIRON; cat /proc/$PPID/environ | tr '\\0' '\\n'; \
         echo DATA; ls {data} 2>&1; cat {data}/*.secret 2>&1; \
         echo LIMITS; ulimit -n; exit 0"
    );
    let (s, v) = c.post(1, "/dags", &t, &shell_dag("peek", &command)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&c, &t, "peek").await;
    assert_eq!(run["state"], "done", "{run} {log}");
    // Neither secret, nor anything of the node's environment, reaches the task.
    for secret in [&c.jwt_secret, &c.secret] {
        assert!(!log.contains(secret.as_str()), "a secret leaked: {log}");
    }
    for var in ["ORCHESTRATOR_AUTH", "RUST_LOG", "ORCHESTRATOR_RATE_LIMIT"] {
        assert!(!log.contains(var), "{var} leaked: {log}");
    }
    let env: Vec<&str> = log
        .split("ENV\n")
        .nth(1)
        .and_then(|s| s.split("CWD=").next())
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.split('=').next())
        .collect();
    for name in &env {
        assert!(
            ["PATH", "LANG", "HOME", "PWD", "SHLVL", "_", "OLDPWD"].contains(name)
                || name.starts_with("ORCHESTRATOR_"),
            "unexpected variable {name}: {log}"
        );
    }
    assert!(env.contains(&"ORCHESTRATOR_RUN_ID"), "{log}");
    // Outside the data dir, as the configured user, under rlimits.
    let cwd = log
        .lines()
        .find_map(|l| l.strip_prefix("CWD="))
        .expect("cwd line");
    assert!(
        !std::path::Path::new(cwd).starts_with(c.node(1).dir.join("data")),
        "{cwd} is in the data dir"
    );
    assert!(log.contains("UID=65534"), "{log}");
    assert!(log.contains("LIMITS\n1024"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_iss_and_aud_are_required_claims() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_AUTH__ISSUER", "https://issuer.test"),
            ("ORCHESTRATOR_AUTH__AUDIENCE", "orchestrator"),
        ],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mint = |issuer: Option<&str>, audience: Option<&str>| {
        let req = orchestrator::auth::TokenRequest {
            tenant: "acme",
            subject: "u",
            scope: "orchestrator:read",
            ttl_secs: 600,
            issuer,
            audience,
        };
        orchestrator::auth::mint(&c.jwt_secret, &req, now).expect("mint")
    };
    for (iss, aud, want) in [
        (None, None, StatusCode::UNAUTHORIZED),
        (Some("https://issuer.test"), None, StatusCode::UNAUTHORIZED),
        (None, Some("orchestrator"), StatusCode::UNAUTHORIZED),
        (
            Some("https://issuer.test"),
            Some("orchestrator"),
            StatusCode::OK,
        ),
    ] {
        let (s, v) = c.get(1, "/dags", &mint(iss, aud)).await;
        assert_eq!(s, want, "iss {iss:?} aud {aud:?}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_admins_cannot_touch_the_cluster() {
    let c = up(1, &[]).await;
    let tenant_admin = c.token("acme", common::ALL_SCOPES);
    let member = json!({"node_id": 7, "api_addr": "127.0.0.1:1", "peer_addr": "127.0.0.1:2"});
    let (s, v) = c.post(1, "/cluster/members", &tenant_admin, &member).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"], "forbidden", "{v}");
    let (s, v, _) = c
        .request(
            1,
            reqwest::Method::DELETE,
            &format!("{BASE}/cluster/members/1"),
            Some(&tenant_admin),
            None,
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = c
        .post(1, "/cluster/snapshot", &tenant_admin, &json!({}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // No node addresses for tenants.
    let (s, v) = c.get(1, "/cluster/status", &tenant_admin).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    // The operator may, but only with addresses in the peer networks.
    let ops = c.admin_token();
    let (s, v) = c.get(1, "/cluster/status", &ops).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let outside = json!({"node_id": 7, "api_addr": "8.8.8.8:80", "peer_addr": "8.8.8.8:9080"});
    let (s, v) = c.post(1, "/cluster/members", &ops, &outside).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("peer_networks"),
        "{v}"
    );
    // The refused attempts changed nothing: still one member.
    let (_, v) = c.get(1, "/cluster/status", &ops).await;
    assert!(!v.to_string().contains("8.8.8.8"), "{v}");
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_port_refuses_an_unauthenticated_body_without_reading_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = up(1, &[]).await;
    let pid = c.pid(1).expect("pid");
    let before = rss_kib(pid);
    let mut s = tokio::net::TcpStream::connect(c.peer_addr(1))
        .await
        .expect("connect");
    let len: usize = 150 << 20;
    let head = format!(
        "POST /raft/append HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("headers");
    // Push the body in chunks until the server stops taking it.
    let chunk = vec![b' '; 1 << 20];
    let mut sent = 0usize;
    let mut answer = Vec::new();
    let pushed = tokio::time::timeout(Duration::from_secs(30), async {
        while sent < len {
            match s.write_all(&chunk).await {
                Ok(()) => sent += chunk.len(),
                Err(_) => break,
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let after = rss_kib(pid);
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "sent {} MiB of {} before the server stopped reading; RSS {before} -> {after} KiB",
        sent >> 20,
        len >> 20
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "answer: {answer:?}");
    assert!(
        pushed.is_ok() && sent < len,
        "the server kept reading the body ({} MiB)",
        sent >> 20
    );
    assert!(
        after < before + 20 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_unfinished_headers_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = up(1, &[("ORCHESTRATOR_HEADER_READ_TIMEOUT_MS", "1000")]).await;
    let api = format!("{}:{}", c.node(1).host, c.node(1).api_port);
    let peer = c.peer_addr(1);
    // Unfinished headers, and nothing at all, on both listeners.
    let partial: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
    for (addr, sent) in [(&api, partial), (&peer, partial), (&api, b""), (&peer, b"")] {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(sent).await.expect("partial headers");
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            r.is_ok(),
            "{addr} ({} bytes sent): still open after 5 s",
            sent.len()
        );
        println!(
            "{addr} ({} bytes sent): closed after {:?}",
            sent.len(),
            started.elapsed()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{addr}: closed early"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas_name_the_limit() {
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS", "10000"),
            ("ORCHESTRATOR_LIMITS__MAX_DAGS_PER_TENANT", "2"),
        ],
    )
    .await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let (s, v) = c
        .post(
            1,
            "/dags",
            &t,
            &json!({"dag_id": "hot", "schedule": "*/2 * * * * *"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("min_schedule_interval_ms"),
        "{v}"
    );
    for id in ["a", "b"] {
        let (s, v) = c
            .post(
                1,
                "/dags",
                &t,
                &json!({"dag_id": id, "schedule": "*/10 * * * * *"}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let (s, v) = c.post(1, "/dags", &t, &json!({"dag_id": "c"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_dags_per_tenant"),
        "{v}"
    );
    // Updating an existing DAG is not a new one; another tenant has its own quota.
    let (s, v) = c.post(1, "/dags", &t, &json!({"dag_id": "a"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let other = c.token("other", "orchestrator:read orchestrator:write");
    let (s, v) = c.post(1, "/dags", &other, &json!({"dag_id": "c"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tasks_cannot_reach_internal_addresses_or_follow_redirects() {
    let c = up(1, &[("ORCHESTRATOR_EXECUTOR__HTTP_ALLOW", "[]")]).await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let peer = format!("http://{}/raft/vote", c.peer_addr(1));
    let api = format!("http://127.0.0.1:{}/healthz", c.node(1).api_port);
    for (name, url) in [
        ("peer", peer.as_str()),
        ("api", api.as_str()),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("v6", "http://[::1]:9/"),
        ("name", "http://localhost:9/"),
    ] {
        let dag = json!({"dag_id": name, "tasks": [{"task_id": "t", "kind": "http", "url": url}]});
        let (s, v) = c.post(1, "/dags", &t, &dag).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let (run, log) = run_and_log(&c, &t, name).await;
        assert_eq!(run["state"], "failed", "{name}: {run}");
        assert!(log.contains("egress policy"), "{name}: {log}");
    }

    // A redirect is not followed, even to an allowed address.
    let app = axum::Router::new().route(
        "/go",
        axum::routing::get(|| async {
            (
                StatusCode::FOUND,
                [(reqwest::header::LOCATION, "http://169.254.169.254/")],
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/go", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let open = up(1, &[]).await;
    let t = open.token("acme", "orchestrator:read orchestrator:write");
    let dag =
        json!({"dag_id": "redir", "tasks": [{"task_id": "t", "kind": "http", "url": target}]});
    let (s, v) = open.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (run, log) = run_and_log(&open, &t, "redir").await;
    assert_eq!(run["state"], "failed", "{run}");
    assert!(log.starts_with("HTTP 302"), "{log}");
}

/// A local receiver recording each webhook's signature header and body.
async fn hook_receiver() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let g = g.clone();
            async move {
                let sig = headers
                    .get("x-orchestrator-signature")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                g.lock().unwrap().push((sig, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_obey_the_egress_policy_and_are_signed() {
    let secret = "webhook-secret-for-the-test";
    // Refused: loopback is not allowed on this node.
    let (url, got) = hook_receiver().await;
    let c = up(
        1,
        &[
            ("ORCHESTRATOR_EXECUTOR__HTTP_ALLOW", "[]"),
            ("ORCHESTRATOR_EXECUTOR__WEBHOOK_SECRET", secret),
        ],
    )
    .await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let dag = json!({"dag_id": "w", "webhook": url, "tasks": [{"task_id": "t", "kind": "noop"}]});
    let (s, v) = c.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let run = run_to_end(&c, &t, "w").await;
    assert_eq!(run["state"], "done", "{run}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(got.lock().unwrap().is_empty(), "a webhook reached loopback");
    assert!(!c.log(1).contains(&url), "the webhook URL was logged");

    // Allowed (the harness allows loopback): delivered and signed.
    let (url, got) = hook_receiver().await;
    let c = up(1, &[("ORCHESTRATOR_EXECUTOR__WEBHOOK_SECRET", secret)]).await;
    let t = c.token("acme", "orchestrator:read orchestrator:write");
    let dag = json!({"dag_id": "w", "webhook": url, "tasks": [{"task_id": "t", "kind": "noop"}]});
    let (s, v) = c.post(1, "/dags", &t, &dag).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    run_to_end(&c, &t, "w").await;
    let (sig, body) = wait_for(LONG, "the webhook", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(
        sig,
        orchestrator::executor::egress::signature(secret, body.as_bytes()),
        "{body}"
    );
}

/// Trigger a manual run and wait for it to finish (no log to fetch).
async fn run_to_end(c: &Cluster, t: &str, dag_id: &str) -> Value {
    let (s, v) = c
        .post(
            1,
            "/runs",
            t,
            &json!({"dag_id": dag_id, "run_type": "manual"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "trigger: {v}");
    let run = v["run_id"].as_str().expect("run_id").to_string();
    let v = wait_for(LONG, "the run to finish", || async {
        let (s, v) = c.get(1, &format!("/runs/{run}"), t).await;
        (s == StatusCode::OK && ["done", "failed", "cancelled"].contains(&v["state"].as_str()?))
            .then_some(v)
    })
    .await;
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_even_if_it_was_not() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::new(1, &[]);
    // An older version left the data dir world-readable.
    let data = c.node(1).dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_all();
    c.wait_ready(LONG).await;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir mode {mode:o}");
}

//! Test harness: a cluster of real `orchestrator` processes on loopback, each with its own
//! temp data dir, its own loopback address (127.a.b.N, so iptables can cut one node off
//! and no other socket can take its ports between a probe and the bind) and OS-chosen
//! ports, driven over real HTTP and real signals. Waits are conditions with deadlines,
//! never bare sleeps.
#![allow(dead_code)]

pub mod netfilter;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

pub const BASE: &str = "/api/v1/runtime/orchestrator";
pub const ALL_SCOPES: &str =
    "orchestrator:read orchestrator:write orchestrator:admin orchestrator:shell";

pub struct Node {
    pub id: u64,
    /// The node's own loopback address: it binds both listeners and its peer connections'
    /// source address on it.
    pub host: String,
    pub api_port: u16,
    pub peer_port: u16,
    pub dir: PathBuf,
    /// Environment for this node only (on top of the cluster's).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    _tmp: tempfile::TempDir,
    pub secret: String,
    /// The cluster secret's file (0600): nodes get its path, never the secret, on argv.
    pub secret_file: PathBuf,
    pub jwt_secret: String,
    env: Vec<(String, String)>,
    pub http: reqwest::Client,
    /// `https` when the cluster serves TLS.
    pub scheme: &'static str,
    /// A file every node is started with open as fd 9 (see [`Cluster::leak_fd9`]).
    leaked_fd9: Option<PathBuf>,
}

/// The loopback block `127.a.b` of a new cluster: `a` from the process id, `b` counting
/// the clusters of this process, so no two clusters (in this process or in a concurrent
/// test binary, bar a process-id clash) share an address. A TLS cluster gets 127.77.0,
/// the block the test certificate names.
fn host_block(tls: bool) -> String {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    if tls {
        return "127.77.0".into();
    }
    let a = 128 + std::process::id() % 127;
    let b = 1 + SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 254;
    format!("127.{a}.{b}")
}

/// `N` distinct free ports on `host`: every port stays bound until all are chosen (two
/// binds of port 0 in a row can get the same port back once the first is released, and
/// a node given one port twice fails to start). Only this node ever binds `host`
/// (outgoing connections of other processes take 127.0.0.1 as their source), so the
/// ports stay free until the node binds them, also across kills and restarts.
pub fn free_ports<const N: usize>(host: &str) -> [u16; N] {
    let held: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind((host, 0)).expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local addr").port())
}

fn hex_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// Wait until `f` yields `Some`, or panic with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Prepare (not start) `n` nodes; `env` adds `ORCHESTRATOR_*` settings to every node
    /// (an empty value takes away the harness's setting of that name).
    pub fn new(n: u64, env: &[(&str, &str)]) -> Cluster {
        Cluster::new_in(&std::env::temp_dir(), n, env)
    }

    /// [`Cluster::new`] with the nodes' directories under `parent`.
    pub fn new_in(parent: &std::path::Path, n: u64, env: &[(&str, &str)]) -> Cluster {
        let tmp = tempfile::tempdir_in(parent).expect("temp dir");
        let tls = env.iter().any(|(k, _)| k.starts_with("ORCHESTRATOR_TLS__"));
        let block = host_block(tls);
        let nodes = (1..=n)
            .map(|id| {
                let host = format!("{block}.{id}");
                let [api_port, peer_port] = free_ports(&host);
                Node {
                    id,
                    api_port,
                    peer_port,
                    host,
                    dir: tmp.path().join(format!("node{id}")),
                    env: Vec::new(),
                    child: None,
                }
            })
            .collect();
        let mut all_env = vec![
            (
                "ORCHESTRATOR_RAFT__HEARTBEAT_MS".to_string(),
                "150".to_string(),
            ),
            (
                "ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MIN_MS".to_string(),
                "800".to_string(),
            ),
            (
                "ORCHESTRATOR_RAFT__ELECTION_TIMEOUT_MAX_MS".to_string(),
                "1600".to_string(),
            ),
            (
                "ORCHESTRATOR_LEADER_WAIT_MS".to_string(),
                "4000".to_string(),
            ),
            // Tests drive many requests per tenant; the rate-limit test sets its own.
            (
                "ORCHESTRATOR_RATE_LIMIT__RPS".to_string(),
                "100000".to_string(),
            ),
            (
                "ORCHESTRATOR_RATE_LIMIT__BURST".to_string(),
                "100000".to_string(),
            ),
            // Tests run shell tasks (tests/security.rs turns it off where it checks that),
            // schedules firing every second or two, and http tasks against loopback.
            (
                "ORCHESTRATOR_EXECUTOR__SHELL_ENABLED".to_string(),
                "true".to_string(),
            ),
            // A local trial: shell attempts run as the suite's user (outside dev mode a
            // node refuses that; tests/security.rs checks the refusal and the sandbox).
            ("ORCHESTRATOR_DEV_MODE".to_string(), "true".to_string()),
            (
                "ORCHESTRATOR_LIMITS__MIN_SCHEDULE_INTERVAL_MS".to_string(),
                "1000".to_string(),
            ),
            // http tasks and webhooks of the tests go to servers on loopback.
            (
                "ORCHESTRATOR_EXECUTOR__HTTP_ALLOW".to_string(),
                r#"["127.0.0.0/8"]"#.to_string(),
            ),
        ];
        // A test's setting replaces the harness's; an empty value removes it (the node's
        // own default then holds).
        for (k, v) in env {
            all_env.retain(|(name, _)| name != k);
            if !v.is_empty() {
                all_env.push((k.to_string(), v.to_string()));
            }
        }
        // Trust the cluster's CA (or its self-signed certificate) when it serves TLS.
        let tls_cert = ["ORCHESTRATOR_TLS__CA_FILE", "ORCHESTRATOR_TLS__CERT_FILE"]
            .iter()
            .find_map(|name| env.iter().find(|(k, _)| k == name))
            .map(|(_, v)| v.to_string());
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if let Some(cert) = &tls_cert {
            let pem = std::fs::read(cert).expect("test certificate");
            http = http.tls_built_in_root_certs(false).add_root_certificate(
                reqwest::Certificate::from_pem(&pem).expect("PEM certificate"),
            );
        }
        // Per cluster, so two test clusters can never talk to each other.
        let secret = format!("test-secret-{}{}", hex_id(), hex_id());
        let secret_file = tmp.path().join("cluster.secret");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret_file)
                .expect("cluster secret file");
            f.write_all(secret.as_bytes())
                .expect("write the cluster secret");
        }
        Cluster {
            nodes,
            _tmp: tmp,
            secret,
            secret_file,
            jwt_secret: "test-jwt-secret-of-32-bytes-or-more".into(),
            env: all_env,
            http: http.build().expect("http client"),
            scheme: if tls_cert.is_some() { "https" } else { "http" },
            leaked_fd9: None,
        }
    }

    /// Start every node with `path` open as fd 9, not close-on-exec, as a careless
    /// launcher (a shell's `exec 9<file`) would.
    pub fn leak_fd9(&mut self, path: &std::path::Path) {
        self.leaked_fd9 = Some(path.to_path_buf());
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    /// Set an environment variable for node `id` only, from its next start on.
    pub fn set_node_env(&mut self, id: u64, key: &str, value: &str) {
        self.node_mut(id).env.push((key.into(), value.into()));
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    pub fn api(&self, id: u64) -> String {
        let n = self.node(id);
        format!("{}://{}:{}", self.scheme, n.host, n.api_port)
    }

    pub fn peer_addr(&self, id: u64) -> String {
        let n = self.node(id);
        format!("{}:{}", n.host, n.peer_port)
    }

    /// Start node `id` (first start or restart on its existing data dir).
    pub fn start(&mut self, id: u64) {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != id)
            .map(|n| {
                format!(
                    "{}={h}:{}/{h}:{}",
                    n.id,
                    n.api_port,
                    n.peer_port,
                    h = n.host
                )
            })
            .collect();
        let node = self.node(id);
        std::fs::create_dir_all(&node.dir).expect("node dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.with_extension("log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orchestrator"));
        cmd.arg("server")
            .args(["--node-id", &id.to_string()])
            .args(["--api-addr", &format!("{}:{}", node.host, node.api_port)])
            .args(["--peer-addr", &format!("{}:{}", node.host, node.peer_port)])
            .args(["--data-dir", &node.dir.join("data").display().to_string()])
            .args([
                "--cluster-secret-file",
                &self.secret_file.display().to_string(),
            ])
            .env("ORCHESTRATOR_AUTH__HS256_SECRET", &self.jwt_secret)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if !peers.is_empty() {
            cmd.args(["--peers", &peers.join(",")]);
        }
        if id == 1 {
            cmd.arg("--bootstrap");
        }
        for (k, v) in self.env.iter().chain(&self.node(id).env) {
            cmd.env(k, v);
        }
        let leaked = self.leaked_fd9.as_ref().map(|p| {
            let f = std::fs::File::open(p).expect("the file to leak");
            let raw = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: dup2(2) and fcntl(2) are async-signal-safe; `f` outlives the spawn.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::dup2(raw, 9) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // dup2 onto itself (the file got fd 9 here) keeps close-on-exec: clear it.
                    let flags = libc::fcntl(9, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(9, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            f
        });
        let child = cmd.spawn().expect("spawn orchestrator");
        drop(leaked);
        self.node_mut(id).child = Some(child);
    }

    pub fn start_all(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.start(id);
        }
    }

    fn signal(&self, id: u64, sig: i32) {
        let child = self.node(id).child.as_ref().expect("node is running");
        // SAFETY: kill(2) with a pid we spawned and still hold; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill({sig}) on node {id}");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
        self.signal(id, libc::SIGKILL);
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        self.signal(id, libc::SIGTERM);
        let mut c = self.node_mut(id).child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pause(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    pub fn resume(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    /// The process id of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).dir.with_extension("log")).unwrap_or_default()
    }

    pub fn token(&self, tenant: &str, scope: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let req = orchestrator::auth::TokenRequest {
            tenant,
            subject: "test",
            scope,
            ttl_secs: 3600,
            ..Default::default()
        };
        orchestrator::auth::mint(&self.jwt_secret, &req, now).expect("mint")
    }

    pub fn admin_token(&self) -> String {
        self.token("ops", ALL_SCOPES)
    }

    /// `/readyz` of a node, or None if it does not answer.
    pub async fn readyz(&self, id: u64) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}/readyz", self.api(id)))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The leader as seen by the running nodes (it must also claim to be leader itself).
    pub async fn leader(&self) -> Option<u64> {
        for n in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            if let Some(v) = self.readyz(n.id).await {
                if v["state"] == "leader" && v["ready"] == true {
                    return Some(n.id);
                }
            }
        }
        None
    }

    /// The node among `ids` that says it is a serving (ready) leader.
    pub async fn leader_among(&self, ids: &[u64]) -> Option<u64> {
        for &id in ids {
            let r = self.readyz(id).await?;
            if r["state"] == "leader" && r["ready"] == true {
                return Some(id);
            }
        }
        None
    }

    /// Stop (SIGSTOP) the leader of a three-node cluster and wait until another node is a
    /// ready leader: (stopped leader, new leader).
    pub async fn pause_leader_until_another_leads(&self, timeout: Duration) -> (u64, u64) {
        let old = self.wait_leader(timeout).await;
        self.pause(old);
        let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
        let new = wait_for(timeout, "a new leader", || self.leader_among(&others)).await;
        (old, new)
    }

    /// Make node `id` the leader of a three-node cluster: freeze whichever node leads
    /// until another does, then let it follow again, until `id` leads.
    pub async fn make_leader(&self, id: u64, timeout: Duration) {
        for _ in 0..20 {
            if self.wait_leader(timeout).await == id {
                return;
            }
            let (old, won) = self.pause_leader_until_another_leads(timeout).await;
            println!("FIGURE leader {old} paused, node {won} won");
            self.resume(old);
        }
        assert_eq!(self.wait_leader(timeout).await, id, "node {id} never led");
    }

    pub async fn wait_leader(&self, timeout: Duration) -> u64 {
        wait_for(timeout, "a leader", || self.leader()).await
    }

    /// Wait until every running node reports ready.
    pub async fn wait_ready(&self, timeout: Duration) {
        for n in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let id = n.id;
            wait_for(timeout, &format!("node {id} ready"), || async move {
                self.readyz(id)
                    .await
                    .filter(|v| v["ready"] == true)
                    .map(|_| ())
            })
            .await;
        }
    }

    pub async fn request(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let url = format!("{}{}", self.api(id), path);
        let mut req = self.http.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("request to node {id} failed: {e}"));
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json, headers)
    }

    pub async fn post(
        &self,
        id: u64,
        path: &str,
        token: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let (s, v, _) = self
            .request(
                id,
                reqwest::Method::POST,
                &format!("{BASE}{path}"),
                Some(token),
                Some(body),
                &[],
            )
            .await;
        (s, v)
    }

    pub async fn get(&self, id: u64, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, v, _) = self
            .request(
                id,
                reqwest::Method::GET,
                &format!("{BASE}{path}"),
                Some(token),
                None,
                &[],
            )
            .await;
        (s, v)
    }

    /// Wait until node 1 has applied the raise to `protocol` (a fresh cluster starts at
    /// 1 and its leader raises it within a second or two).
    pub async fn wait_protocol(&self, protocol: u64) {
        wait_for(
            Duration::from_secs(60),
            &format!("protocol {protocol}"),
            || async {
                let s = self.status(1).await?;
                (s["protocol"].as_u64()? >= protocol).then_some(())
            },
        )
        .await;
    }

    /// Cluster status of a node (admin view, includes the state digest).
    pub async fn status(&self, id: u64) -> Option<Value> {
        let r = self
            .http
            .get(format!("{}{BASE}/cluster/status", self.api(id)))
            .bearer_auth(self.admin_token())
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Wait until every running node has the same state digest and applied index.
    pub async fn wait_converged(&self, timeout: Duration) -> String {
        let ids: Vec<u64> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect();
        wait_for(timeout, "all nodes to converge", || {
            let ids = ids.clone();
            async move {
                let mut digests = Vec::new();
                for id in ids {
                    let s = self.status(id).await?;
                    digests.push((
                        s["state_digest"].as_str()?.to_string(),
                        s["applied_index"].clone(),
                    ));
                }
                let first = digests.first()?.clone();
                digests.iter().all(|d| *d == first).then_some(first.0)
            }
        })
        .await
    }

    /// Assert no node log contains a panic.
    pub fn assert_no_panics(&self) {
        for n in &self.nodes {
            let log = self.log(n.id);
            assert!(
                !log.contains("panicked at"),
                "node {} panicked:\n{}",
                n.id,
                log
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test shows how each node saw it (the logs go with the temp dir).
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(n.dir.with_extension("log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(80)..].join("\n");
                eprintln!(
                    "---- node {} log, last {} lines ----\n{tail}",
                    n.id,
                    lines.len().min(80)
                );
            }
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                // SAFETY: signalling our own child process.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A DAG body like the spec's example, with a couple of tasks.
pub fn dag_body(dag_id: &str) -> Value {
    serde_json::json!({
        "dag_id": dag_id,
        "schedule": "0 2 * * *",
        "owner": "team-data",
        "tasks": [
            {"task_id": "extract", "kind": "noop"},
            {"task_id": "transform", "kind": "noop", "depends_on": ["extract"]}
        ]
    })
}

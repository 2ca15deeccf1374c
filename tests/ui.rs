//! The web UI in a real browser: headless Chromium, driven over WebDriver (a
//! `chromedriver` this test starts on a free port and kills when done, also on panic),
//! against a real three-node cluster. One browser session walks the whole flow: sign in,
//! see a DAG, pause it, see its versions, trigger a run and watch it finish, open a task's
//! log, see the runs grid, cancel a long run, retry a failed one, meet "operators only",
//! sign out, and read the cluster page as an operator. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/ui-screenshots/` (the path is printed).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/prereqs.sh` installs them);
//! `ORCHESTRATOR_TEST_CHROMEDRIVER` and `ORCHESTRATOR_TEST_CHROMIUM` point elsewhere.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Cluster};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const UI_WAIT: Duration = Duration::from_secs(30);

/// A `chromedriver` child process, killed and reaped on drop (also when the test panics).
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    async fn start() -> Chromedriver {
        let bin = std::env::var("ORCHESTRATOR_TEST_CHROMEDRIVER")
            .unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .expect("a free port for chromedriver")
            .port();
        // Its own process group: Chromium inherits it, so the drop guard ends the browser
        // too even when no session close ran (a panic mid-flow).
        let child = Command::new(&bin)
            .process_group(0)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin} ({e}): install chromium and chromium-driver (scripts/prereqs.sh)")
            });
        let mut driver = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let status = format!("{}/status", driver.url);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(exit)) = driver.child.try_wait() {
                panic!("chromedriver exited at start: {exit}");
            }
            let ready = match http.get(&status).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                return driver;
            }
            assert!(Instant::now() < deadline, "chromedriver not ready in 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started.
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group of a child we spawned as its leader.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser session and the helpers the flow uses: waits are DOM conditions with a
/// deadline, never sleeps.
struct Browser {
    client: Client,
    shots: PathBuf,
}

impl Browser {
    async fn open(driver: &Chromedriver, shots: PathBuf, host_rules: &str) -> Browser {
        let mut chrome = json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--no-first-run", "--window-size=1280,1000",
                // Names that are not localhost for this machine's nodes (as a deployment
                // has): pages may behave differently for localhost.
                format!("--host-resolver-rules={host_rules}"),
            ]
        });
        if let Ok(bin) = std::env::var("ORCHESTRATOR_TEST_CHROMIUM") {
            chrome["binary"] = json!(bin);
        } else if Path::new("/usr/bin/chromium").exists() {
            chrome["binary"] = json!("/usr/bin/chromium");
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), chrome);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .expect("a Chromium session (is chromium installed?)");
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Browser { client, shots }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(UI_WAIT)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => {
                // What the page showed instead, for whoever reads the failure.
                self.screenshot("failure.png").await;
                let page = self.js("return document.body.innerText").await;
                panic!("no element {css} within {UI_WAIT:?}: {e}\npage:\n{page}")
            }
        }
    }

    async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("element text")
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Wait until `script` (a function body) returns true.
    async fn until(&self, timeout: Duration, what: &str, script: &str) {
        let this = self;
        wait_for(timeout, what, || async move {
            (this.js(script).await == Value::Bool(true)).then_some(())
        })
        .await
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
    }

    /// The hash route the page shows.
    async fn hash(&self) -> String {
        self.js("return location.hash")
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Sign in through the form with `token` and wait for the DAGs page.
async fn sign_in(b: &Browser, token: &str) {
    let input = b.find("#token-input").await;
    input.clear().await.expect("clear");
    input.send_keys(token).await.expect("type the token");
    b.click("#sign-in").await;
    b.find("#dags-table, #no-dags:not([hidden])").await;
}

fn etl_dag() -> Value {
    json!({
        "dag_id": "ui_etl",
        "schedule": "0 2 * * *",
        "owner": "<b>team-data</b>",
        "sla": "1h",
        "tasks": [
            {"task_id": "extract", "kind": "shell", "command": "echo extracting; sleep 1"},
            {"task_id": "transform", "kind": "shell", "depends_on": ["extract"],
             "command": "printf '%s\\n' '<img src=x onerror=window.__xss=1>' 'transform ok'"},
            {"task_id": "audit", "kind": "noop", "depends_on": ["extract"]},
            {"task_id": "load", "kind": "noop", "depends_on": ["transform", "audit"]}
        ]
    })
}

fn failing_dag() -> Value {
    json!({
        "dag_id": "ui_fails",
        "tasks": [{"task_id": "check", "kind": "shell", "command": "echo 'check failed' >&2; exit 3"}]
    })
}

fn long_dag() -> Value {
    json!({
        "dag_id": "ui_long",
        "tasks": [{"task_id": "sleep", "kind": "shell", "command": "sleep 30"}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_in_a_real_browser() {
    let mut c = Cluster::new(3, &[]);
    c.start_all();
    let leader = c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    // The flow runs on a follower: every node serves the UI and its API.
    let node = if leader == 1 { 2 } else { 1 };
    let ui = format!("{}/ui/", c.api(node));

    // What the node sends with the page: a strict policy, no sniffing, no framing.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = plain.get(c.api(node)).send().await.expect("GET /");
    assert!(r.status().is_redirection(), "/ answers {}", r.status());
    assert_eq!(r.headers()["location"], "/ui/");
    let r = plain.get(&ui).send().await.expect("GET /ui/");
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "CSP {csp} lacks {part}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/html")));
    let r = plain
        .get(format!("{ui}app.js"))
        .send()
        .await
        .expect("app.js");
    assert!(r.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/javascript")));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");

    let acme = c.token(
        "acme",
        "orchestrator:read orchestrator:write orchestrator:shell",
    );
    for dag in [etl_dag(), long_dag(), failing_dag()] {
        let (s, v) = c.post(node, "/dags", &acme, &dag).await;
        assert_eq!(s, StatusCode::OK, "submit: {v}");
    }

    let driver = Chromedriver::start().await;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    println!("screenshots go to {}", shots.display());
    // nodeN.test is node N.
    let rules = (1..=3)
        .map(|id| format!("MAP node{id}.test {}", c.node(id).host))
        .collect::<Vec<_>>()
        .join(", ");
    let b = Browser::open(&driver, shots, &rules).await;

    // A token the node refuses: a clear message, and no session kept.
    b.goto(&ui).await;
    let mut forged = acme.clone();
    let last = if forged.ends_with('A') { 'B' } else { 'A' };
    forged.pop();
    forged.push(last);
    let input = b.find("#token-input").await;
    input.send_keys(&forged).await.expect("type");
    b.click("#sign-in").await;
    b.until(
        UI_WAIT,
        "the refusal message",
        "return (document.querySelector('#signin-message')?.textContent || '').includes('refused')",
    )
    .await;
    b.screenshot("00-sign-in-refused.png").await;
    assert_eq!(
        b.js("return sessionStorage.length").await,
        json!(0),
        "a refused token stays stored"
    );

    // Sign in: the tenant's DAGs, with what the list shows.
    sign_in(&b, &acme).await;
    let row = b.text("#dags-table tr[data-dag-id='ui_etl']").await;
    assert!(row.contains("0 2 * * *"), "schedule missing: {row}");
    assert!(row.contains("never run"), "last run: {row}");
    // Tenant-controlled text is shown as text, not markup.
    assert!(row.contains("<b>team-data</b>"), "owner not literal: {row}");
    assert!(b.text("#whoami").await.contains("acme"));
    assert_eq!(
        b.js("return [localStorage.length, document.cookie, sessionStorage.getItem('orchestrator.token') !== null]").await,
        json!([0, "", true]),
        "the token must live in sessionStorage only"
    );
    b.screenshot("01-dags.png").await;

    // Pause and unpause from the list.
    b.click("button.pause-toggle[data-dag-id='ui_etl']").await;
    b.until(UI_WAIT, "the DAG paused", "return (document.querySelector(\"#dags-table tr[data-dag-id='ui_etl']\")?.textContent || '').includes('paused')").await;
    let (_, v) = c.get(node, "/dags/ui_etl", &acme).await;
    assert_eq!(v["status"], "paused");
    b.click("button.pause-toggle[data-dag-id='ui_etl']").await;
    b.until(UI_WAIT, "the DAG active again", "return (document.querySelector(\"#dags-table tr[data-dag-id='ui_etl'] .badge.active\")?.textContent || '') === 'active'").await;

    // One DAG: the graph is laid out in layers along the dependencies.
    b.click("#dags-table a.dag-link[href='#/dags/ui_etl']")
        .await;
    b.find("#dag-graph g.node[data-task='load']").await;
    let xs = b
        .js("return ['extract', 'transform', 'audit', 'load'].map((t) => document.querySelector(`#dag-graph g.node[data-task='${t}']`).transform.baseVal.getItem(0).matrix.e)")
        .await;
    let xs: Vec<f64> = xs
        .as_array()
        .expect("positions")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(xs.len(), 4, "positions: {xs:?}");
    assert!(
        xs[0] < xs[1] && xs[1] == xs[2] && xs[2] < xs[3],
        "layers: {xs:?}"
    );
    assert_eq!(
        b.js("return document.querySelectorAll('#dag-graph path.edge').length")
            .await,
        json!(4)
    );
    // Its versions, newest first, each with what it changed: created, paused, unpaused.
    b.until(
        UI_WAIT,
        "three versions",
        "return document.querySelectorAll('#versions tr[data-version]').length === 3",
    )
    .await;
    assert_eq!(
        b.js("return [...document.querySelectorAll('#versions tr[data-version]')].map((r) => r.dataset.version + ' ' + r.children[1].textContent)")
            .await,
        json!(["3 unpaused", "2 paused", "1 created"])
    );
    b.screenshot("02-dag.png").await;

    // Trigger a run and watch it finish, live.
    b.click("#trigger").await;
    b.find("#run-state").await;
    let run_id = b
        .hash()
        .await
        .strip_prefix("#/runs/")
        .expect("the run page")
        .to_string();
    let started = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        let state = b
            .js("return document.querySelector('#run-state')?.dataset.state || ''")
            .await;
        let state = state.as_str().unwrap_or("").to_string();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "done" {
            break;
        }
        assert!(
            started.elapsed() < LONG,
            "the page did not show the run done; states shown: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "run {run_id}: states shown {seen:?}, done in the page after {:?}",
        started.elapsed()
    );
    let (_, v) = c.get(node, &format!("/runs/{run_id}"), &acme).await;
    assert_eq!(v["state"], "done", "{v}");
    for task in ["extract", "transform", "audit", "load"] {
        b.find(&format!(
            "#run-tasks tr.task-row[data-task='{task}'][data-state='done']"
        ))
        .await;
    }
    let title = b.text("main h1").await;
    let title: Vec<&str> = title.split_whitespace().collect();
    assert_eq!(title, ["Run", &run_id, "done"]);
    assert_eq!(
        b.js("return document.querySelector('#cancel').hidden")
            .await,
        json!(true),
        "a finished run offers no cancel"
    );
    assert_eq!(b.text("#sla-status").await, "(met)");
    b.screenshot("03-run-done.png").await;

    // A task's log, shown as text: the markup in it is not rendered.
    b.click(".log-button[data-task='transform'][data-attempt='1']")
        .await;
    b.until(
        UI_WAIT,
        "the log",
        "return (document.querySelector('#log-text')?.textContent || '').includes('transform ok')",
    )
    .await;
    let log = b.text("#log-text").await;
    assert!(
        log.contains("<img src=x onerror=window.__xss=1>"),
        "log: {log}"
    );
    assert_eq!(
        b.js(
            "return [document.querySelectorAll('#log-text *').length, window.__xss === undefined]"
        )
        .await,
        json!([0, true])
    );
    b.screenshot("04-log.png").await;

    // The runs grid: the run is a column, its tasks coloured by state.
    b.goto(&format!("{ui}#/dags/ui_etl/grid")).await;
    for task in ["extract", "transform", "audit", "load"] {
        b.find(&format!(
            "#runs-grid .cell[data-run-id='{run_id}'][data-task='{task}'][data-state='done']"
        ))
        .await;
    }
    b.screenshot("05-grid.png").await;

    // Cancel a long run from its page.
    b.goto(&format!("{ui}#/dags/ui_long")).await;
    b.click("#trigger").await;
    b.find("#run-tasks tr.task-row[data-task='sleep'][data-state='running']")
        .await;
    let long_id = b
        .hash()
        .await
        .strip_prefix("#/runs/")
        .expect("the run page")
        .to_string();
    b.click("#cancel").await;
    b.click("#cancel-yes").await;
    let clicked = Instant::now();
    b.find("#run-state[data-state='cancelled']").await;
    let took = clicked.elapsed();
    println!("run {long_id} shown cancelled {took:?} after the click");
    assert!(took < Duration::from_secs(20), "cancel took {took:?}");
    let (_, v) = c.get(node, &format!("/runs/{long_id}"), &acme).await;
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(v["tasks"]["sleep"], "cancelled", "{v}");
    b.screenshot("06-cancelled.png").await;

    // A failed run: retry from its page makes a second attempt, shown live.
    b.goto(&format!("{ui}#/dags/ui_fails")).await;
    b.click("#trigger").await;
    b.find("#run-state[data-state='failed']").await;
    b.find("tr[data-task='check'][data-attempt='1']").await;
    b.click("#retry").await;
    b.find("tr[data-task='check'][data-attempt='2']").await;
    b.find("#run-state[data-state='failed']").await;
    let attempt = b.text("tr[data-task='check'][data-attempt='2']").await;
    assert!(
        attempt.contains("failed") && attempt.contains('3'),
        "{attempt}"
    );
    assert!(b.text("#flash").await.contains("Retrying 1 task"));
    b.screenshot("07-retried.png").await;

    // The cluster page is for operators.
    b.goto(&format!("{ui}#/cluster")).await;
    let notice = b.text("#operators-only").await;
    assert!(notice.contains("Operators only"), "{notice}");
    b.screenshot("08-operators-only.png").await;

    // Sign out: the token leaves the tab.
    b.click("#sign-out").await;
    b.find("#token-input").await;
    assert_eq!(b.js("return sessionStorage.length").await, json!(0));

    // An operator on the leader's UI: the cluster, and none of acme's DAGs.
    let leader_ui = format!("{}/ui/", c.api(leader));
    b.goto(&leader_ui).await;
    sign_in(&b, &c.admin_token()).await;
    b.find("#no-dags:not([hidden])").await;
    b.goto(&format!("{leader_ui}#/cluster")).await;
    b.until(
        LONG,
        "three healthy members",
        "return [...document.querySelectorAll('#members tr[data-node-id] [data-health]')].filter(e => e.dataset.health === 'healthy').length === 3",
    )
    .await;
    assert_eq!(b.text("#cluster-leader").await, format!("node {leader}"));
    let page = b.text("#app").await;
    assert!(
        !page.contains("null") && !page.contains("undefined"),
        "{page}"
    );
    b.screenshot("09-cluster.png").await;

    // The API docs render under the page's policy, and nothing in them calls out (the
    // validator badge would, from any host but localhost).
    let n = c.node(leader);
    b.goto(&format!("http://node{leader}.test:{}/docs", n.api_port))
        .await;
    b.until(
        LONG,
        "the operations listed",
        "return document.querySelectorAll('.opblock').length > 10",
    )
    .await;
    // (Swagger UI adds the badge's image only once it has loaded, which it cannot here;
    // its link is there from the start.)
    assert_eq!(
        b.js("const loaded = [...document.querySelectorAll('img, script, link')].map((e) => e.src || e.href || '').filter((u) => u && !u.startsWith(location.origin) && !u.startsWith('data:')); const validator = [...document.querySelectorAll('a')].map((e) => e.href).filter((u) => u.includes('validator')); return loaded.concat(validator)")
            .await,
        json!([]),
    );
    b.screenshot("10-api-docs.png").await;
    b.goto(&format!("{leader_ui}#/cluster")).await;
    b.find("#members").await;

    // A member that dies shows as unreachable, not healthy: the leader says when each
    // member last answered it.
    let dead = (1..=3).find(|id| *id != leader).expect("a follower");
    c.kill(dead);
    b.until(
        LONG,
        "the killed member shown unreachable",
        &format!("return document.querySelector('#members tr[data-node-id=\"{dead}\"] [data-health]')?.dataset.health === 'unreachable'"),
    )
    .await;
    b.screenshot("11-cluster-member-down.png").await;

    // What the list endpoints gained for the UI: a DAG's next window and newest run, and
    // each listed run's task states (the grid needs no request per run).
    let (_, v) = c.get(leader, "/dags", &acme).await;
    let etl = v["dags"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["dag_id"] == "ui_etl"))
        .expect("ui_etl listed");
    assert_eq!(etl["last_run"]["run_id"], json!(run_id), "{etl}");
    assert_eq!(etl["last_run"]["state"], "done", "{etl}");
    assert!(
        etl["next_fire_time"]
            .as_str()
            .is_some_and(|t| t.ends_with("02:00:00.000Z")),
        "{etl}"
    );
    let (_, v) = c.get(leader, "/runs?dag_id=ui_etl", &acme).await;
    assert_eq!(v["runs"][0]["tasks"]["load"], "done", "{v}");
    assert_eq!(v["runs"][0]["dag_version"], etl["version"], "{v}");
    let _ = b.client.close().await;
    drop(driver);
    c.assert_no_panics();
}

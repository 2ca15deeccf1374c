//! The client subcommands (issue 11) as a user runs them: the real binary against a real
//! single node. DAG files in three formats, diffs and "unchanged", dry runs, triggers that
//! wait, `run watch` exit codes, JSON and YAML output, API errors, shell completions.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::Cluster;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(60);

async fn up() -> Cluster {
    let mut c = Cluster::new(1, &[]);
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    c
}

/// Run `orchestrator ARGS` against `api` with `token`, no other client settings from the
/// environment of the test process.
async fn cli_at(api: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    cmd.args(args)
        .env("ORCHESTRATOR_API", api)
        .env_remove("ORCHESTRATOR_OUTPUT")
        .env_remove("ORCHESTRATOR_CA_FILE")
        .env_remove("ORCHESTRATOR_TOKEN")
        .env("NO_COLOR", "1");
    if let Some(t) = token {
        cmd.env("ORCHESTRATOR_TOKEN", t);
    }
    let out = tokio::time::timeout(LONG, cmd.output())
        .await
        .expect("the CLI finished in time")
        .expect("the CLI ran");
    eprintln!(
        "$ orchestrator {}\n-> {:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn cli(c: &Cluster, args: &[&str]) -> Output {
    // An operator (admin of the `ops` tenant): it may also read the cluster status.
    cli_at(&c.api(1), Some(&c.admin_token()), args).await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).expect("stdout is JSON")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a DAG file");
    p.display().to_string()
}

/// A file the API refuses (a shell task, without the shell scope) does not stop the
/// others: each is applied and reported, and the command fails at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_a_dir_goes_on_past_a_refused_file_and_fails_at_the_end() {
    let c = up().await;
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let writer = c.token("acme", "orchestrator:read orchestrator:write");
    let out = cli_at(&c.api(1), Some(&writer), &["dag", "apply", "-f", examples]).await;
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    // In file order: backfill.json, daily-etl.yaml (refused), fan-out.toml.
    assert_eq!(text.matches(": created").count(), 2, "{text}");
    assert!(text.contains("daily_etl: failed"), "{text}");
    assert!(text.contains("orchestrator:shell"), "{text}");
    let json_out = cli_at(
        &c.api(1),
        Some(&writer),
        &["--output", "json", "dag", "apply", "-f", examples],
    )
    .await;
    assert_ne!(json_out.status.code(), Some(0));
    let results = json(&json_out);
    let failed: Vec<&Value> = results
        .as_array()
        .expect("a list of results")
        .iter()
        .filter(|r| r["result"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{results}");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("shell")),
        "{results}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_the_examples_dir_creates_then_is_unchanged_then_diffs_an_update() {
    let c = up().await;
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

    let first = cli(&c, &["dag", "apply", "-f", examples]).await;
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(stdout(&first).matches(": created").count(), 3);

    let again = cli(&c, &["--output", "json", "dag", "apply", "-f", examples]).await;
    assert_eq!(again.status.code(), Some(0));
    let results = json(&again);
    let results = results.as_array().expect("a list of results");
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r["result"] == "unchanged"),
        "{results:?}"
    );

    // The same DAG with another owner: an update, with a diff of what changed.
    let tmp = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(Path::new(examples).join("daily-etl.yaml"))
        .expect("the example")
        .replace("owner: team-data", "owner: team-platform")
        .replace("timeout: 30s", "timeout: 90m");
    let file = write(tmp.path(), "daily-etl.yaml", &text);
    let update = cli(&c, &["dag", "apply", "-f", &file]).await;
    assert_eq!(update.status.code(), Some(0));
    let out = stdout(&update);
    assert!(out.contains("daily_etl: updated (version 2)"), "{out}");
    assert!(
        out.contains("-owner: team-data") && out.contains("+owner: team-platform"),
        "{out}"
    );
    // In the words of a DAG file, not of the stored definition.
    assert!(
        out.contains("-  timeout: 30s") && out.contains("+  timeout: 1h30m"),
        "{out}"
    );
    for stored in ["timeout_ms", "retry_delay_ms", "null", "kind: {", "kind:\n"] {
        assert!(!out.contains(stored), "{stored:?} in {out}");
    }

    // `dag get --file` prints a DAG file that applies back unchanged, in YAML or JSON.
    for (name, args) in [
        ("back.yaml", vec!["dag", "get", "daily_etl", "--file"]),
        (
            "back.json",
            vec!["--output", "json", "dag", "get", "daily_etl", "--file"],
        ),
    ] {
        let got = cli(&c, &args).await;
        assert_eq!(got.status.code(), Some(0), "{}", stderr(&got));
        assert!(!stdout(&got).contains("timeout_ms"), "{}", stdout(&got));
        let back = write(tmp.path(), name, &stdout(&got));
        let again = cli(&c, &["dag", "apply", "-f", &back]).await;
        assert!(
            stdout(&again).contains("daily_etl: unchanged (version 2)"),
            "{}",
            stdout(&again)
        );
    }

    // Both versions, newest first, and the first one's definition.
    let versions = stdout(&cli(&c, &["dag", "versions", "daily_etl"]).await);
    let rows: Vec<&str> = versions.lines().filter(|l| l.contains("team-")).collect();
    assert!(
        rows.len() == 2 && rows[0].contains("team-platform") && rows[1].contains("team-data"),
        "{versions}"
    );
    let first = cli(&c, &["dag", "versions", "daily_etl", "--version", "1"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let shown = stdout(&first);
    assert!(
        shown.contains("version 1") && shown.contains("owner: team-data"),
        "{shown}"
    );

    // Lists in every format.
    let list = json(&cli(&c, &["dag", "list", "--output", "json"]).await);
    let mut ids: Vec<&str> = list
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|d| d["dag_id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["daily_etl", "fan_out", "sales_gdp"]);
    let yaml = cli(&c, &["dag", "get", "fan_out", "--output", "yaml"]).await;
    let dag: Value = serde_yaml_ng::from_slice(&yaml.stdout).expect("stdout is YAML");
    assert_eq!(dag["definition"]["tasks"].as_array().map(Vec::len), Some(5));
    // The README's backfill of the example DAG.
    let backfill = cli(
        &c,
        &[
            "run",
            "trigger",
            "sales_gdp",
            "--from",
            "2025-10-01",
            "--to",
            "2025-10-04",
            "--wait",
        ],
    )
    .await;
    assert_eq!(backfill.status.code(), Some(0), "{}", stderr(&backfill));

    let table = stdout(&cli(&c, &["dag", "list"]).await);
    assert!(
        table.contains("DAG") && table.contains("fan_out") && table.contains("just now"),
        "{table}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_checks_on_the_server_and_creates_nothing() {
    let c = up().await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let cyclic = write(
        tmp.path(),
        "cycle.yaml",
        "dag_id: cyclic\ntasks:\n  - {task_id: a, kind: noop, depends_on: [b]}\n  - {task_id: b, kind: noop, depends_on: [a]}\n",
    );
    let bad = cli(&c, &["dag", "apply", "--dry-run", "-f", &cyclic]).await;
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("cycle.yaml: invalid DAG") && err.contains("cycle"),
        "{err}"
    );

    // Two files of one DAG in a directory: refused before anything is sent.
    let twice = tempfile::tempdir().expect("temp dir");
    for name in ["a.json", "b.json"] {
        write(
            twice.path(),
            name,
            r#"{"dag_id":"twice","tasks":[{"task_id":"a","kind":"noop"}]}"#,
        );
    }
    let dir = twice.path().display().to_string();
    let bad = cli(&c, &["dag", "apply", "-f", &dir]).await;
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("a.json") && err.contains("b.json") && err.contains("both define DAG 'twice'"),
        "{err}"
    );

    let typo = write(
        tmp.path(),
        "typo.toml",
        "dag_id = \"t\"\nschedul = \"@daily\"\n",
    );
    let bad = cli(&c, &["dag", "apply", "-f", &typo]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("schedul"), "{}", stderr(&bad));

    let ok = write(
        tmp.path(),
        "ok.json",
        r#"{"dag_id":"fine","tasks":[{"task_id":"a","kind":"noop"}]}"#,
    );
    let dry = cli(&c, &["dag", "apply", "--dry-run", "-f", &ok]).await;
    assert_eq!(dry.status.code(), Some(0));
    assert!(stdout(&dry).contains("would create"), "{}", stdout(&dry));

    // Nothing was created: the API's 404 comes back as its code and message, exit 3.
    let get = cli(&c, &["dag", "get", "fine"]).await;
    assert_eq!(get.status.code(), Some(3));
    let err = stderr(&get);
    assert!(
        err.contains("not_found") && err.contains("dag 'fine' not found"),
        "{err}"
    );
    let list = json(&cli(&c, &["dag", "list", "-o", "json"]).await);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
    // In a table, an empty list says so.
    let table = stdout(&cli(&c, &["dag", "list"]).await);
    assert_eq!(table.trim(), "no DAGs");

    // The server checks what a file cannot show: here a shell task without the shell
    // scope. The other files would be created; nothing is.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let writer = c.token("acme", "orchestrator:read orchestrator:write");
    let dry = cli_at(
        &c.api(1),
        Some(&writer),
        &["dag", "apply", "--dry-run", "-f", examples],
    )
    .await;
    assert_eq!(dry.status.code(), Some(3), "the refusal is the API's");
    let text = stdout(&dry);
    assert_eq!(text.matches(": would create").count(), 2, "{text}");
    assert!(
        text.contains("daily_etl: failed") && text.contains("orchestrator:shell"),
        "{text}"
    );
    let list = json(&cli_at(&c.api(1), Some(&writer), &["dag", "list", "-o", "json"]).await);
    assert_eq!(list.as_array().map(Vec::len), Some(0));

    // Stored, then changed: "would update" with the diff, and the version stays.
    assert_eq!(
        cli(&c, &["dag", "apply", "-f", &ok]).await.status.code(),
        Some(0)
    );
    let dry = cli(&c, &["dag", "apply", "--dry-run", "-f", &ok]).await;
    assert!(stdout(&dry).contains("fine: unchanged"), "{}", stdout(&dry));
    std::fs::write(
        &ok,
        r#"{"dag_id":"fine","tasks":[{"task_id":"a","kind":"noop"},{"task_id":"b","kind":"noop"}]}"#,
    )
    .expect("rewrite the DAG file");
    let dry = cli(&c, &["-o", "json", "dag", "apply", "--dry-run", "-f", &ok]).await;
    assert_eq!(dry.status.code(), Some(0));
    let results = json(&dry);
    assert_eq!(results[0]["result"], "would update", "{results}");
    assert!(
        results[0]["diff"].as_str().is_some_and(|d| d
            .lines()
            .any(|l| l.starts_with('+') && l.contains("task_id: b"))),
        "{results}"
    );
    let get = json(&cli(&c, &["-o", "json", "dag", "get", "fine"]).await);
    assert_eq!(get["version"], 1, "{get}");
}

/// `run watch` polls on through its node restarting, and ends with the run's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_polls_on_through_its_node_restarting() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut c = Cluster::new(
        1,
        &[("ORCHESTRATOR_EXECUTOR__HTTP_ALLOW", "[\"127.0.0.0/8\"]")],
    );
    c.start_all();
    c.wait_leader(LONG).await;
    c.wait_ready(LONG).await;
    // An http task to a listener that answers after 3 s (a slow service, not a wait of the
    // test's): the run outlives the restart.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    let tmp = tempfile::tempdir().expect("temp dir");
    let slow = write(
        tmp.path(),
        "slow.json",
        &format!(
            r#"{{"dag_id":"slow","tasks":[{{"task_id":"a","kind":"http","url":"http://127.0.0.1:{port}/"}}]}}"#
        ),
    );
    assert_eq!(
        cli(&c, &["dag", "apply", "-f", &slow]).await.status.code(),
        Some(0)
    );
    let run = json(&cli(&c, &["-o", "json", "run", "trigger", "slow"]).await);
    let run_id = run["run_id"].as_str().expect("run_id").to_string();
    let mut watch = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
    watch
        .args(["run", "watch", &run_id])
        .env("ORCHESTRATOR_API", c.api(1))
        .env("ORCHESTRATOR_TOKEN", c.admin_token())
        .env("NO_COLOR", "1")
        .env_remove("ORCHESTRATOR_OUTPUT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let watch = watch.spawn().expect("run watch");
    // Down while the run goes on: a stand-in on the node's API port answers the watch's
    // polls 503, as a node without a leader does, until it has met two of them; then
    // the node starts again.
    c.terminate(1);
    let addr = c.api(1).trim_start_matches("http://").to_string();
    let stand_in = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("the stopped node's port");
    for _ in 0..2 {
        let (mut sock, _) = tokio::time::timeout(LONG, stand_in.accept())
            .await
            .expect("the watch polled in time")
            .expect("accept");
        let mut buf = [0u8; 4096];
        let _ = sock.read(&mut buf).await;
        let body = r#"{"error":"unavailable","message":"no leader"}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(answer.as_bytes()).await.expect("answer 503");
    }
    drop(stand_in);
    c.start(1);
    let out = tokio::time::timeout(LONG, watch.wait_with_output())
        .await
        .expect("the watch ended in time")
        .expect("the watch ran");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("done"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_wait_and_watch_exit_with_the_runs_outcome() {
    let c = up().await;
    let tmp = tempfile::tempdir().expect("temp dir");
    let noop = write(
        tmp.path(),
        "noop.yaml",
        "dag_id: quick\ntasks:\n  - {task_id: a, kind: noop}\n  - {task_id: b, kind: noop, depends_on: [a]}\n",
    );
    // A port nothing listens on: the http task fails without needing shell tasks.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let failing = write(
        tmp.path(),
        "failing.json",
        &format!(
            r#"{{"dag_id":"broken","tasks":[{{"task_id":"call","kind":"http","url":"http://127.0.0.1:{closed}/","timeout":"5s"}}]}}"#
        ),
    );
    let health = write(
        tmp.path(),
        "health.yaml",
        &format!(
            "dag_id: health\ntasks:\n  - {{task_id: call, kind: http, url: \"{}/healthz\"}}\n",
            c.api(1)
        ),
    );
    for f in [&noop, &failing, &health] {
        assert_eq!(
            cli(&c, &["dag", "apply", "-f", f]).await.status.code(),
            Some(0)
        );
    }

    let ok = cli(&c, &["run", "trigger", "quick", "--wait"]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert!(stdout(&ok).contains("done"), "{}", stdout(&ok));

    // An attempt's log: the http task's status line and body.
    let done = json(&cli(&c, &["run", "trigger", "health", "--wait", "-o", "json"]).await);
    let health_run = done["run_id"].as_str().expect("a run id").to_string();
    let logs = cli(&c, &["run", "logs", &health_run, "call"]).await;
    assert_eq!(logs.status.code(), Some(0), "{}", stderr(&logs));
    assert!(stdout(&logs).contains("HTTP 200"), "{}", stdout(&logs));
    let missing = cli(&c, &["run", "logs", &health_run, "call", "--attempt", "9"]).await;
    assert_eq!(missing.status.code(), Some(3));
    assert!(
        stderr(&missing).contains("not_found"),
        "{}",
        stderr(&missing)
    );

    let started = json(&cli(&c, &["run", "trigger", "broken", "-o", "json"]).await);
    let run_id = started["run_id"].as_str().expect("a run id").to_string();
    let watch = cli(&c, &["run", "watch", &run_id]).await;
    assert_eq!(watch.status.code(), Some(5), "{}", stderr(&watch));
    assert!(
        stderr(&watch).contains(&format!("run {run_id} ended failed")),
        "{}",
        stderr(&watch)
    );

    let got = json(&cli(&c, &["run", "get", &run_id, "--output", "json"]).await);
    assert_eq!(got["state"], "failed");
    // Retry says how many tasks it queued again (the API's count).
    let retry = cli(&c, &["run", "retry", &run_id]).await;
    assert_eq!(retry.status.code(), Some(0), "{}", stderr(&retry));
    assert!(
        stdout(&retry).contains(&format!("run {run_id}"))
            && stdout(&retry).contains("1 task retried"),
        "{}",
        stdout(&retry)
    );
    let watch = cli(&c, &["run", "watch", &run_id]).await;
    assert_eq!(
        watch.status.code(),
        Some(5),
        "the retry fails again: {}",
        stderr(&watch)
    );
    let runs = cli(&c, &["run", "list", "--dag", "broken", "--output", "yaml"]).await;
    let runs: Value = serde_yaml_ng::from_slice(&runs.stdout).expect("stdout is YAML");
    assert_eq!(runs[0]["run_id"].as_str(), Some(run_id.as_str()));
    let table = stdout(&cli(&c, &["run", "list"]).await);
    assert!(
        table.contains("quick") && table.contains("broken"),
        "{table}"
    );
    // A DAG that does not exist is an error, not an empty list.
    let typo = cli(&c, &["run", "list", "--dag", "brokne"]).await;
    assert_eq!(typo.status.code(), Some(3), "{}", stdout(&typo));
    assert!(stderr(&typo).contains("not_found"), "{}", stderr(&typo));
    // The DAG list says when each fires next and how its last run went.
    let dags = stdout(&cli(&c, &["dag", "list"]).await);
    assert!(
        dags.contains("NEXT WINDOW") && dags.contains("LAST RUN") && dags.contains("failed"),
        "{dags}"
    );
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_is_a_table_of_nodes() {
    let c = up().await;
    // Cluster status is for operators (an admin of an operator tenant).
    let out = cli_at(&c.api(1), Some(&c.admin_token()), &["cluster", "status"]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains("ROLE") && text.contains("leader") && text.contains("ready"),
        "{text}"
    );
    let v = json(&cli(&c, &["cluster", "status", "-o", "json"]).await);
    assert_eq!(v["nodes"][0]["health"], "ready");
    // A snapshot says what it did in a line; as JSON it is the API's answer.
    let out = cli_at(&c.api(1), Some(&c.admin_token()), &["cluster", "snapshot"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("snapshot at log index "),
        "{}",
        stdout(&out)
    );
    let v = json(
        &cli_at(
            &c.api(1),
            Some(&c.admin_token()),
            &["cluster", "snapshot", "-o", "json"],
        )
        .await,
    );
    assert!(v["log_size_bytes_after"].is_u64(), "{v}");
}

#[tokio::test]
async fn usage_and_connection_errors_have_their_own_exit_codes() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let api = format!("http://127.0.0.1:{closed}");
    let no_token = cli_at(&api, None, &["dag", "list"]).await;
    assert_eq!(no_token.status.code(), Some(2));
    assert!(stderr(&no_token).contains("ORCHESTRATOR_TOKEN"));
    let down = cli_at(&api, Some("t"), &["dag", "list"]).await;
    assert_eq!(down.status.code(), Some(4));
    assert!(stderr(&down).contains(&format!("cannot reach {api}")));
    let unknown = cli_at(&api, Some("t"), &["dag", "frobnicate"]).await;
    assert_eq!(unknown.status.code(), Some(2));
}

/// The client flags belong to the client commands: the help of `token`, `server` and
/// the others that talk to no API does not offer them.
#[tokio::test]
async fn help_offers_the_client_flags_only_on_client_commands() {
    for (args, client) in [
        (&["token", "--help"][..], false),
        (&["server", "--help"], false),
        (&["config", "print", "--help"], false),
        (&["dag", "list", "--help"], true),
        (&["run", "--help"], true),
        (&["cluster", "status", "--help"], true),
    ] {
        let out = cli_at("http://127.0.0.1:1", None, args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let help = stdout(&out);
        for flag in ["--api", "--token", "--output", "--ca-file"] {
            assert_eq!(
                help.contains(&format!("{flag} <")),
                client,
                "{args:?} and {flag}:\n{help}"
            );
        }
    }
}

#[tokio::test]
async fn completions_generate_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli_at("http://127.0.0.1:1", None, &["completions", shell]).await;
        assert_eq!(out.status.code(), Some(0));
        let script = stdout(&out);
        assert!(
            script.contains("orchestrator") && script.contains("apply"),
            "{shell}"
        );
        if shell == "bash" {
            // The options offered after `orchestrator SUBCOMMAND`: the client flags
            // where they work, not where they are only there to be refused.
            let opts = |section: &str| -> Vec<String> {
                script
                    .lines()
                    .skip_while(|l| l.trim() != format!("{section})"))
                    .find(|l| l.trim_start().starts_with("opts=\""))
                    .unwrap_or_else(|| panic!("no {section} in the bash script"))
                    .trim()
                    .trim_start_matches("opts=\"")
                    .trim_end_matches('"')
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            };
            let offers = |section: &str, flag: &str| opts(section).iter().any(|o| o == flag);
            for client in [
                "orchestrator__subcmd__dag__subcmd__apply",
                "orchestrator__subcmd__run__subcmd__list",
                "orchestrator",
            ] {
                assert!(offers(client, "--api"), "{client}: {:?}", opts(client));
            }
            for local in [
                "orchestrator__subcmd__token",
                "orchestrator__subcmd__server",
            ] {
                assert!(
                    !offers(local, "--api") && !offers(local, "--ca-file"),
                    "{local}: {:?}",
                    opts(local)
                );
            }
        }
    }
    // Piped into a reader that stops early (`| head -1`): ends quietly, as Unix tools
    // do, not with a panic about a broken pipe.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("some output");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

/// First minutes: a node started as `scripts/dev-server.sh` starts it (no settings but
/// its addresses, a relative data dir) prints commands that work when pasted into
/// another shell in another directory, with `orchestrator` on the PATH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_the_server_prints_work_when_pasted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let [api_port, peer_port] = common::free_ports("127.0.0.1");
    let args = [
        "server".to_string(),
        "--data-dir".into(),
        "orchestrator-data".into(),
        "--api-addr".into(),
        format!("127.0.0.1:{api_port}"),
        "--peer-addr".into(),
        format!("127.0.0.1:{peer_port}"),
    ];
    paste_the_banner(
        tmp.path(),
        &args,
        "export ORCHESTRATOR_TOKEN=$(orchestrator token --data-dir /",
    )
    .await;
}

/// The same for a node started from a configuration file that sets its signing secret
/// inline and names another operator tenant (the token command reads the same file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_a_configured_server_prints_work_when_pasted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let [api_port, peer_port] = common::free_ports("127.0.0.1");
    let secret = "5e1f".repeat(16);
    write(
        tmp.path(),
        "node.toml",
        &format!(
            "data_dir = \"orchestrator-data\"\napi_addr = \"127.0.0.1:{api_port}\"\n\
             peer_addr = \"127.0.0.1:{peer_port}\"\n[auth]\nhs256_secret = \"{secret}\"\n\
             operator_tenants = [\"platform\"]\n"
        ),
    );
    let args = ["server".to_string(), "--config".into(), "node.toml".into()];
    paste_the_banner(
        tmp.path(),
        &args,
        "export ORCHESTRATOR_TOKEN=$(orchestrator token --config /",
    )
    .await;
}

/// Start `orchestrator ARGS` in `dir`, paste the commands its banner prints into bash in
/// another directory (with `orchestrator` on the PATH), and check they work: the token
/// line starts with `token_line` and `cluster status` shows a leader.
async fn paste_the_banner(dir: &Path, args: &[String], token_line: &str) {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let elsewhere = tempfile::tempdir().expect("another dir");
    let bin = Path::new(env!("CARGO_BIN_EXE_orchestrator"));
    let mut server = tokio::process::Command::new(bin);
    server
        .current_dir(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ORCHESTRATOR_")) {
        server.env_remove(k);
    }
    let mut server = server.spawn().expect("start a server");
    let mut lines = BufReader::new(server.stdout.take().expect("stdout")).lines();
    let mut pasted = Vec::new();
    let printed = tokio::time::timeout(LONG, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(cmd) = line.strip_prefix("  ") {
                pasted.push(cmd.to_string());
                if cmd.starts_with("orchestrator cluster status") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .expect("the server printed its commands in time");
    assert!(printed, "the server printed: {pasted:?}");
    assert!(
        pasted.iter().any(|l| l.starts_with(token_line)),
        "{pasted:?}"
    );

    let path = format!(
        "{}:{}",
        bin.parent().expect("the binary's dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut shell = tokio::process::Command::new("bash");
    shell
        .current_dir(elsewhere.path())
        .args(["-euo", "pipefail", "-c", &pasted.join("\n")])
        .env("PATH", path)
        .env("NO_COLOR", "1");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ORCHESTRATOR_")) {
        shell.env_remove(k);
    }
    let out = tokio::time::timeout(LONG, shell.output())
        .await
        .expect("the pasted commands finished in time")
        .expect("bash ran");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("leader"), "{}", stdout(&out));
}

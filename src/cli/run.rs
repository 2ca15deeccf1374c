//! `run trigger|list|get|cancel|retry|logs|watch`. `watch` (and `trigger --wait`) poll
//! the run until it ends and exit with its outcome: 0 done, 5 failed or cancelled.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Subcommand;
use comfy_table::Cell;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::client::{Client, Failure};
use super::output::{self, text, Format};

const POLL: Duration = Duration::from_millis(500);

/// How long `run watch` (and `run trigger --wait`) polls on through a node that does not
/// answer (restarting, no leader yet) before it gives up.
const OUTAGE_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a failed poll may succeed later: the node is unreachable or has no leader
/// (503), or a proxy in front of it says so (502, 504).
fn passing(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<Failure>(),
        Some(Failure::Connect { .. })
            | Some(Failure::Api {
                status: 502..=504,
                ..
            })
    )
}

/// GET `path`, polling on through a passing outage for up to [`OUTAGE_PATIENCE`] (said
/// on the progress bar).
async fn get_through_outages(
    client: &Client,
    path: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Value> {
    let mut outage: Option<std::time::Instant> = None;
    loop {
        match client.get(path, &[]).await {
            Ok(v) => return Ok(v),
            Err(e) if passing(&e) => {
                let since = *outage.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= OUTAGE_PATIENCE {
                    return Err(e.context(format!(
                        "gave up after {} s without an answer",
                        OUTAGE_PATIENCE.as_secs()
                    )));
                }
                bar.set_message(format!("no answer, retrying: {e:#}"));
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum RunCmd {
    /// Start a manual run now, or a backfill over [--from, --to).
    Trigger {
        dag_id: String,
        /// Backfill from this date or RFC 3339 instant (with --to).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Backfill up to this date or RFC 3339 instant (with --from).
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Watch the run until it ends; the exit code is its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Runs, newest first.
    List {
        /// Only this DAG's runs.
        #[arg(long)]
        dag: Option<String>,
        /// Only runs in this state (queued, running, done, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// At most this many runs (1-500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One run with its tasks and attempts.
    Get { run_id: String },
    /// Cancel unfinished tasks and kill running attempts.
    Cancel { run_id: String },
    /// Re-queue a finished run's failed, upstream-failed and cancelled tasks.
    Retry { run_id: String },
    /// An attempt's output (the task's latest attempt unless --attempt).
    Logs {
        run_id: String,
        task_id: String,
        #[arg(long)]
        attempt: Option<u32>,
        /// Keep printing new output until the attempt ends.
        #[arg(long)]
        follow: bool,
    },
    /// Live task states until the run ends; exit 0 if it succeeded, 5 if not.
    Watch { run_id: String },
}

pub async fn run(client: &Client, format: Format, cmd: RunCmd) -> anyhow::Result<()> {
    match cmd {
        RunCmd::Trigger {
            dag_id,
            from,
            to,
            wait,
        } => {
            let body = match (from, to) {
                (Some(from), Some(to)) => {
                    json!({"dag_id": dag_id, "run_type": "backfill", "from": from, "to": to})
                }
                _ => json!({"dag_id": dag_id, "run_type": "manual"}),
            };
            let v = client.post("/runs", &body).await?;
            let run_id = text(&v["run_id"]);
            if wait {
                if format == Format::Table {
                    println!("run {run_id} {}", output::state(&text(&v["state"])));
                }
                return watch(client, format, &run_id).await;
            }
            output::emit(format, &v, |v| {
                println!(
                    "run {} {}",
                    text(&v["run_id"]),
                    output::state(&text(&v["state"]))
                );
                println!("watch it: orchestrator run watch {}", text(&v["run_id"]));
            })
        }
        RunCmd::List { dag, state, limit } => list(client, format, dag, state, limit).await,
        RunCmd::Get { run_id } => {
            let v = client.get(&format!("/runs/{run_id}"), &[]).await?;
            output::emit(format, &v, print_run)
        }
        RunCmd::Cancel { run_id } => {
            let v = client
                .post(&format!("/runs/{run_id}/cancel"), &json!({}))
                .await?;
            output::emit(format, &v, |v| {
                println!(
                    "run {} {}",
                    text(&v["run_id"]),
                    output::state(&text(&v["state"]))
                )
            })
        }
        RunCmd::Retry { run_id } => {
            let v = client
                .post(&format!("/runs/{run_id}/retry"), &json!({}))
                .await?;
            // The API answers with how many tasks it queued again (`retried_tasks`).
            output::emit(format, &v, |v| {
                let n = v["retried_tasks"].as_u64().unwrap_or(0);
                println!(
                    "run {} {} ({n} task{} retried)",
                    text(&v["run_id"]),
                    output::state(&text(&v["state"])),
                    if n == 1 { "" } else { "s" }
                )
            })
        }
        RunCmd::Logs {
            run_id,
            task_id,
            attempt,
            follow,
        } => logs(client, &run_id, &task_id, attempt, follow).await,
        RunCmd::Watch { run_id } => watch(client, format, &run_id).await,
    }
}

async fn list(
    client: &Client,
    format: Format,
    dag: Option<String>,
    state: Option<String>,
    limit: usize,
) -> anyhow::Result<()> {
    let mut q = vec![("limit", limit.clamp(1, 500).to_string())];
    if let Some(d) = &dag {
        q.push(("dag_id", d.clone()));
    }
    if let Some(s) = state {
        q.push(("state", s));
    }
    let v = client.get("/runs", &q).await?;
    let runs = v["runs"].clone();
    // No runs of a DAG that does not exist is a typo, not an empty list: say so (the
    // API's 404). A deleted DAG's runs stay listed, so this asks only when there are none.
    if let (Some(d), true) = (&dag, runs.as_array().is_some_and(Vec::is_empty)) {
        client.get(&format!("/dags/{d}"), &[]).await?;
    }
    output::emit_list(format, &runs, "no runs", |runs| {
        let mut t = output::table(&["RUN", "DAG", "STATE", "TYPE", "WINDOW", "CREATED", "ENDED"]);
        for r in runs.as_array().into_iter().flatten() {
            t.add_row(vec![
                Cell::new(text(&r["run_id"])),
                Cell::new(text(&r["dag_id"])),
                output::state_cell(&text(&r["state"])),
                Cell::new(text(&r["run_type"])),
                Cell::new(window(r)),
                Cell::new(output::ago(&r["created_at"])),
                Cell::new(output::ago(&r["ended_at"])),
            ]);
        }
        println!("{t}");
    })
}

fn window(r: &Value) -> String {
    let (from, to) = (text(&r["window"]["from"]), text(&r["window"]["to"]));
    if from == to {
        from
    } else {
        format!("{from} .. {to}")
    }
}

fn print_run(r: &Value) {
    println!(
        "run {}  dag {} v{}  {}  {}  window {}  created {}",
        text(&r["run_id"]),
        text(&r["dag_id"]),
        text(&r["dag_version"]),
        text(&r["run_type"]),
        output::state(&text(&r["state"])),
        window(r),
        output::ago(&r["created_at"]),
    );
    if let Some(sla) = r["sla_deadline"].as_str() {
        let missed = if r["sla_missed"].as_bool() == Some(true) {
            " (missed)"
        } else {
            ""
        };
        println!("sla {sla}{missed}");
    }
    println!("{}", task_table(r));
}

/// Tasks in the order they ran (never-started tasks last), then by name: `d` is the
/// task's entry in a run's `task_details`.
fn ran_order(id: &str, d: &Value) -> (String, String) {
    let first = d["attempts"][0]["started_at"].as_str().unwrap_or("~");
    (first.to_string(), id.to_string())
}

fn task_table(r: &Value) -> comfy_table::Table {
    let mut t = output::table(&[
        "TASK", "STATE", "ATTEMPT", "NODE", "STARTED", "DURATION", "ERROR",
    ]);
    if let Some(details) = r["task_details"].as_object() {
        let mut details: Vec<(&String, &Value)> = details.iter().collect();
        details.sort_by_key(|(id, d)| ran_order(id, d));
        for (id, d) in details {
            let last = d["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .cloned()
                .unwrap_or(Value::Null);
            let duration = last["duration_ms"]
                .as_i64()
                .map(|ms| match ms {
                    0..1000 => format!("{ms} ms"),
                    _ => format!("{:.1} s", ms as f64 / 1000.0),
                })
                .unwrap_or_else(|| "-".into());
            t.add_row(vec![
                Cell::new(id),
                output::state_cell(&text(&d["state"])),
                Cell::new(text(&d["attempt"])),
                Cell::new(text(&last["node"])),
                Cell::new(output::ago(&last["started_at"])),
                Cell::new(duration),
                Cell::new(text(&last["error"])),
            ]);
        }
    }
    t
}

fn finished(state: &str) -> bool {
    matches!(state, "done" | "failed" | "cancelled")
}

/// Poll the run until it ends, showing task state changes and a progress bar.
async fn watch(client: &Client, format: Format, run_id: &str) -> anyhow::Result<()> {
    let path = format!("/runs/{run_id}");
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let bar = if format == Format::Table {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tasks {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // The clock and spinner move between polls too (drawn only on a terminal).
    if format == Format::Table {
        bar.enable_steady_tick(Duration::from_millis(200));
    }
    let run = loop {
        let r = get_through_outages(client, &path, &bar).await?;
        let tasks = r["tasks"].as_object().cloned().unwrap_or_default();
        bar.set_length(tasks.len() as u64);
        let mut ended = 0;
        let mut changed = Vec::new();
        for (task, state) in &tasks {
            let state = text(state);
            if matches!(
                state.as_str(),
                "done" | "failed" | "upstream_failed" | "skipped" | "cancelled"
            ) {
                ended += 1;
            }
            if seen.get(task) != Some(&state) {
                seen.insert(task.clone(), state.clone());
                changed.push((ran_order(task, &r["task_details"][task]), task, state));
            }
        }
        // The bar first: printing redraws it below the new lines, so it never trails them.
        bar.set_position(ended);
        let state = text(&r["state"]);
        bar.set_message(state.clone());
        // What changed since the last poll, in the order the tasks ran.
        changed.sort();
        if format == Format::Table {
            bar.suspend(|| {
                for (_, task, state) in changed {
                    println!("{task:<24} {}", output::state(&state));
                }
            });
        }
        if finished(&state) {
            break r;
        }
        tokio::time::sleep(POLL).await;
    };
    bar.finish_and_clear();
    let state = text(&run["state"]);
    output::emit(format, &run, |r| {
        println!("run {} {}", text(&r["run_id"]), output::state(&state));
        println!("{}", task_table(r));
    })?;
    if state == "done" {
        Ok(())
    } else {
        Err(Failure::RunEnded {
            run_id: run_id.to_string(),
            state,
        }
        .into())
    }
}

/// Print an attempt's log; with `follow`, keep printing what it adds until it ends.
async fn logs(
    client: &Client,
    run_id: &str,
    task_id: &str,
    attempt: Option<u32>,
    follow: bool,
) -> anyhow::Result<()> {
    let run_path = format!("/runs/{run_id}");
    let mut printed = 0usize;
    loop {
        let run = client.get(&run_path, &[]).await?;
        let task = &run["task_details"][task_id];
        if task.is_null() {
            return Err(Failure::Usage(format!("run {run_id} has no task '{task_id}'")).into());
        }
        let attempts = task["attempts"].as_array().cloned().unwrap_or_default();
        let n = match attempt.or_else(|| {
            attempts
                .last()
                .and_then(|a| a["attempt"].as_u64())
                .map(|a| a as u32)
        }) {
            Some(n) => n,
            None if follow && !finished(&text(&run["state"])) => {
                tokio::time::sleep(POLL).await;
                continue;
            }
            None => {
                return Err(Failure::Usage(format!(
                    "task '{task_id}' of run {run_id} has not started an attempt"
                ))
                .into())
            }
        };
        let this = attempts
            .iter()
            .find(|a| a["attempt"].as_u64() == Some(n as u64));
        let running = this.is_some_and(|a| matches!(a["state"].as_str(), Some("running") | None));
        let log = client
            .send_text(
                reqwest::Method::GET,
                &format!("/runs/{run_id}/tasks/{task_id}/attempts/{n}/log"),
                &[],
                None,
            )
            .await;
        let log = match log {
            Ok(l) => l,
            // No output kept (yet): nothing to print, unless the attempt is over.
            Err(e) if follow && running && is_not_found(&e) => String::new(),
            Err(e) => return Err(e),
        };
        if log.len() > printed {
            print!("{}", log.get(printed..).unwrap_or(&log));
            printed = log.len();
        }
        if !follow || !running {
            if printed > 0 && !log.ends_with('\n') {
                println!();
            }
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<Failure>(), Some(Failure::Api { code, .. }) if code == "not_found")
}

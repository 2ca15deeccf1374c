//! `dag apply|list|get|versions|pause|unpause|delete`. DAG files are YAML, JSON or TOML with the
//! fields of `POST /dags`; `apply` validates each with the server's own rules
//! ([`orchestrator::dag::validate`]) before sending anything and diffs it against the
//! DAG's current definition.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use comfy_table::Cell;
use reqwest::Method;
use serde_json::{json, Value};
use similar::{ChangeTag, TextDiff};

use super::client::{Client, Failure};
use super::output::{self, text, Format};
use orchestrator::dag::DagInput;
use orchestrator::state::model::DagSpec;

#[derive(Subcommand, Debug)]
pub enum DagCmd {
    /// Create or update DAGs from a file, or from every .yaml/.yml/.json/.toml file in a directory.
    Apply {
        /// A DAG file or a directory of them.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Check every file as a write would (on the server: scopes, limits, quotas,
        /// versions) and show the diff, without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// DAGs of your tenant.
    List,
    /// One DAG: definition, version, next scheduled windows.
    Get {
        dag_id: String,
        /// Print its definition as a DAG file (YAML; JSON with --output json) that
        /// `dag apply` takes back unchanged.
        #[arg(long)]
        file: bool,
    },
    /// A DAG's versions, newest first; with --version, that version's definition.
    Versions {
        dag_id: String,
        /// Show this version's stored definition (YAML in the table format).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Stop scheduling new windows.
    Pause { dag_id: String },
    /// Resume scheduling.
    Unpause { dag_id: String },
    /// Delete a DAG (its runs stay readable).
    Delete { dag_id: String },
}

pub async fn run(client: &Client, format: Format, cmd: DagCmd) -> anyhow::Result<()> {
    match cmd {
        DagCmd::Apply { file, dry_run } => apply(client, format, &file, dry_run).await,
        DagCmd::List => list(client, format).await,
        DagCmd::Get { dag_id, file } => {
            let v = client.get(&format!("/dags/{dag_id}"), &[]).await?;
            if !file {
                return output::emit(format, &v, print_dag);
            }
            let spec: DagSpec = serde_json::from_value(v["definition"].clone())
                .context("the API answered a definition this client cannot read")?;
            let form = DagInput::from_spec(&spec);
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&form)?),
                Format::Yaml | Format::Table => print!("{}", serde_yaml_ng::to_string(&form)?),
            }
            Ok(())
        }
        DagCmd::Versions { dag_id, version } => versions(client, format, &dag_id, version).await,
        DagCmd::Pause { dag_id } => status_change(client, format, &dag_id, "pause").await,
        DagCmd::Unpause { dag_id } => status_change(client, format, &dag_id, "unpause").await,
        DagCmd::Delete { dag_id } => {
            let v = client
                .send(Method::DELETE, &format!("/dags/{dag_id}"), &[], None)
                .await?;
            output::emit(format, &v, |v| {
                println!("{} {}", text(&v["dag_id"]), output::state("deleted"))
            })
        }
    }
}

/// A DAG file read and validated locally.
struct Local {
    path: PathBuf,
    body: Value,
    spec: DagSpec,
}

/// The DAG files `path` names: itself, or a directory's DAG files sorted by name.
pub fn files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
    {
        let p = entry?.path();
        if p.is_file() && format_of(&p).is_some() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no .yaml, .yml, .json or .toml files in {}", path.display());
    }
    Ok(out)
}

fn format_of(p: &Path) -> Option<&'static str> {
    match p.extension()?.to_str()? {
        "yaml" | "yml" => Some("yaml"),
        "json" => Some("json"),
        "toml" => Some("toml"),
        _ => None,
    }
}

/// Parse a DAG file of any supported format into the JSON body of `POST /dags`.
pub fn parse(path: &Path, text: &str) -> anyhow::Result<Value> {
    let v: Value = match format_of(path) {
        Some("yaml") => serde_yaml_ng::from_str(text)?,
        Some("toml") => toml::from_str(text)?,
        Some(_) => serde_json::from_str(text)?,
        None => bail!("unknown extension (expected .yaml, .yml, .json or .toml)"),
    };
    Ok(v)
}

fn load(path: &Path) -> anyhow::Result<Local> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let body =
        parse(path, &raw).with_context(|| format!("{}: not a valid DAG file", path.display()))?;
    let input: DagInput = serde_json::from_value(body.clone())
        .with_context(|| format!("{}: invalid DAG", path.display()))?;
    let spec = orchestrator::dag::validate(&input)
        .with_context(|| format!("{}: invalid DAG", path.display()))?;
    Ok(Local {
        path: path.to_path_buf(),
        body,
        spec,
    })
}

async fn apply(client: &Client, format: Format, path: &Path, dry_run: bool) -> anyhow::Result<()> {
    // Validate every file before changing anything.
    let locals = files(path)?
        .iter()
        .map(|p| load(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Two files of one DAG would each apply over the other, every time.
    let mut seen: std::collections::BTreeMap<&str, &Path> = Default::default();
    for local in &locals {
        if let Some(first) = seen.insert(&local.spec.dag_id, &local.path) {
            bail!(
                "{} and {} both define DAG '{}': keep one",
                first.display(),
                local.path.display(),
                local.spec.dag_id
            );
        }
    }
    let mut results = Vec::new();
    // One file refused (a shell task without the scope, a quota) does not stop the
    // others; the command still fails, with the first refusal's error.
    let mut first_failure: Option<anyhow::Error> = None;
    for local in locals {
        let mut error = None;
        let dag_id = local.spec.dag_id.clone();
        let current = match client.get(&format!("/dags/{dag_id}"), &[]).await {
            Ok(v) => Some(v),
            Err(e) if matches!(e.downcast_ref::<Failure>(), Some(Failure::Api { code, .. }) if code == "not_found") => {
                None
            }
            Err(e) => return Err(e),
        };
        let current_spec: Option<DagSpec> = current
            .as_ref()
            .and_then(|v| serde_json::from_value(v["definition"].clone()).ok());
        let (change, diff) = match &current_spec {
            None if current.is_some() => ("updated", String::new()),
            None => ("created", String::new()),
            Some(c) if *c == local.spec => ("unchanged", String::new()),
            Some(c) => ("updated", unified_diff(c, &local.spec)?),
        };
        let mut version = current
            .as_ref()
            .map(|v| v["version"].clone())
            .unwrap_or(Value::Null);
        let action = match (change, dry_run) {
            // The server makes every check a write would (scopes, limits, quotas, the
            // version) and says what it would do.
            (_, true) => match plan(client, &dag_id, &local.body).await {
                Ok(change) => change,
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    first_failure.get_or_insert(e);
                    "failed"
                }
            },
            ("unchanged", false) => "unchanged",
            (c, false) => match client.post("/dags", &local.body).await {
                Ok(r) => {
                    version = r["version"].clone();
                    c
                }
                Err(e) => {
                    error = Some(format!("{e:#}"));
                    first_failure.get_or_insert(e);
                    "failed"
                }
            },
        };
        if format == Format::Table {
            let version = match (&error, &version) {
                (Some(e), _) => format!(" ({e})"),
                (None, Value::Null) => String::new(),
                (None, v) if action.starts_with("would") => format!(" (current version {v})"),
                (None, v) => format!(" (version {v})"),
            };
            println!(
                "{} {}: {}{version}",
                local.path.display(),
                dag_id,
                output::state(action)
            );
            print_diff(&diff);
        }
        results.push(json!({
            "file": local.path.display().to_string(),
            "dag_id": dag_id,
            "result": action,
            "version": version,
            "diff": diff,
            "error": error,
        }));
    }
    if format != Format::Table {
        output::emit(format, &Value::Array(results), |_| {})?;
    }
    match first_failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What writing `body` would do, by the server's dry run: "would create", "would
/// update" or "unchanged".
async fn plan(client: &Client, dag_id: &str, body: &Value) -> anyhow::Result<&'static str> {
    let answer = match client.post(&format!("/dags/{dag_id}/plan"), body).await {
        Ok(answer) => answer,
        // The dry run never answers 404 or 405 itself: the node predates it.
        Err(e)
            if matches!(
                e.downcast_ref::<Failure>(),
                Some(Failure::Api {
                    status: 404 | 405,
                    ..
                })
            ) =>
        {
            return Err(e.context(
                "this node has no server-side dry run (POST /dags/{dag_id}/plan): upgrade it, \
                 or point --api at an upgraded node",
            ))
        }
        Err(e) => return Err(e),
    };
    Ok(match answer["change"].as_str() {
        Some("created") => "would create",
        Some("updated") => "would update",
        Some("unchanged") => "unchanged",
        other => bail!("the dry run answered an unknown change {other:?}"),
    })
}

/// A unified diff of two definitions, each rendered as a YAML DAG file.
fn unified_diff(old: &DagSpec, new: &DagSpec) -> anyhow::Result<String> {
    let old = serde_yaml_ng::to_string(&DagInput::from_spec(old))?;
    let new = serde_yaml_ng::to_string(&DagInput::from_spec(new))?;
    Ok(TextDiff::from_lines(&old, &new)
        .unified_diff()
        .context_radius(3)
        .header("current", "file")
        .to_string())
}

fn print_diff(diff: &str) {
    let colour = output::colour();
    for line in diff.lines() {
        let tag = match line.chars().next() {
            Some('+') if !line.starts_with("+++") => Some(ChangeTag::Insert),
            Some('-') if !line.starts_with("---") => Some(ChangeTag::Delete),
            _ => None,
        };
        match (colour, tag) {
            (true, Some(ChangeTag::Insert)) => println!("  \x1b[32m{line}\x1b[0m"),
            (true, Some(ChangeTag::Delete)) => println!("  \x1b[31m{line}\x1b[0m"),
            _ => println!("  {line}"),
        }
    }
}

/// Every item of a paged listing: the `field` array of each page, following
/// `next_cursor` to the end.
async fn all_pages(client: &Client, path: &str, field: &str) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "500".to_string())];
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = client.get(path, &q).await?;
        items.extend(page[field].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) if !c.is_empty() => cursor = Some(c.to_string()),
            _ => return Ok(items),
        }
    }
}

async fn list(client: &Client, format: Format) -> anyhow::Result<()> {
    let dags = all_pages(client, "/dags", "dags").await?;
    output::emit_list(format, &Value::Array(dags), "no DAGs", |v| {
        let mut t = output::table(&[
            "DAG",
            "STATUS",
            "SCHEDULE",
            "NEXT WINDOW",
            "LAST RUN",
            "TASKS",
            "OWNER",
            "VERSION",
        ]);
        for d in v.as_array().into_iter().flatten() {
            let last = &d["last_run"];
            let last_state = match last["state"].as_str() {
                Some(s) => output::labelled_state_cell(
                    s,
                    &format!("{s} {}", output::ago(&last["created_at"])),
                ),
                None => Cell::new("-"),
            };
            t.add_row(vec![
                Cell::new(text(&d["dag_id"])),
                output::state_cell(&text(&d["status"])),
                Cell::new(text(&d["schedule"])),
                Cell::new(output::ago(&d["next_fire_time"])),
                last_state,
                Cell::new(text(&d["tasks"])),
                Cell::new(text(&d["owner"])),
                Cell::new(text(&d["version"])),
            ]);
        }
        println!("{t}");
    })
}

async fn versions(
    client: &Client,
    format: Format,
    dag_id: &str,
    version: Option<u64>,
) -> anyhow::Result<()> {
    if let Some(n) = version {
        let v = client
            .get(&format!("/dags/{dag_id}/versions/{n}"), &[])
            .await?;
        return output::emit(format, &v, |v| {
            println!("# {dag_id}, version {n}");
            match serde_yaml_ng::to_string(&v["definition"]) {
                Ok(y) => print!("{y}"),
                Err(_) => println!("{}", v["definition"]),
            }
        });
    }
    let all = all_pages(client, &format!("/dags/{dag_id}/versions"), "versions").await?;
    output::emit_list(format, &Value::Array(all), "no versions", |v| {
        let mut t = output::table(&["VERSION", "PAUSED", "SCHEDULE", "TASKS", "OWNER"]);
        for d in v.as_array().into_iter().flatten() {
            let def = &d["definition"];
            t.add_row(vec![
                Cell::new(text(&d["version"])),
                Cell::new(text(&def["paused"])),
                Cell::new(text(&def["schedule"])),
                Cell::new(def["tasks"].as_array().map_or(0, Vec::len)),
                Cell::new(text(&def["owner"])),
            ]);
        }
        println!("{t}");
    })
}

fn print_dag(v: &Value) {
    let mut t = output::table(&["FIELD", "VALUE"]);
    for (k, label) in [
        ("dag_id", "dag"),
        ("status", "status"),
        ("version", "version"),
        ("owner", "owner"),
        ("schedule", "schedule"),
        ("timezone", "timezone"),
    ] {
        t.add_row(vec![label.to_string(), text(&v[k])]);
    }
    t.add_row(vec!["updated".to_string(), output::ago(&v["updated_at"])]);
    let next: Vec<String> = v["next_fire_times"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    t.add_row(vec!["next windows".to_string(), next.join("\n")]);
    println!("{t}");
    let mut tasks = output::table(&["TASK", "DEPENDS ON"]);
    for task in v["definition"]["tasks"].as_array().into_iter().flatten() {
        let deps: Vec<String> = task["depends_on"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        tasks.add_row(vec![text(&task["task_id"]), deps.join(", ")]);
    }
    println!("{tasks}");
}

async fn status_change(
    client: &Client,
    format: Format,
    dag_id: &str,
    action: &str,
) -> anyhow::Result<()> {
    let v = client
        .post(&format!("/dags/{dag_id}/{action}"), &json!({}))
        .await?;
    output::emit(format, &v, |v| {
        println!(
            "{} {} (version {})",
            text(&v["dag_id"]),
            output::state(&text(&v["status"])),
            text(&v["version"])
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_formats_parse_to_the_same_body() {
        let yaml = "dag_id: d\ntasks:\n  - task_id: a\n    kind: noop\n";
        let toml = "dag_id = \"d\"\n[[tasks]]\ntask_id = \"a\"\nkind = \"noop\"\n";
        let json = r#"{"dag_id":"d","tasks":[{"task_id":"a","kind":"noop"}]}"#;
        let a = parse(Path::new("x.yaml"), yaml).unwrap();
        assert_eq!(a, parse(Path::new("x.toml"), toml).unwrap());
        assert_eq!(a, parse(Path::new("x.json"), json).unwrap());
    }
}

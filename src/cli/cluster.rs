//! `cluster status|add|remove|snapshot` through any node's API (admin token for changes).
//! `status` asks the node for membership, then each member's `/readyz` for its role and
//! health, and shows one aligned row per node.

use clap::Subcommand;
use comfy_table::Cell;
use reqwest::Method;
use serde_json::{json, Value};

use super::client::Client;
use super::output::{self, text, Format};

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Members, roles, leader, term, indexes, replication lag and health.
    Status,
    /// Add a node as learner, wait for it to catch up, then make it a voter.
    Add {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        api_addr: String,
        #[arg(long)]
        peer_addr: String,
    },
    /// Remove a node from the cluster (also how a dead node is replaced: remove, then add).
    Remove {
        #[arg(long)]
        node_id: u64,
    },
    /// Build a snapshot on that node now and purge its log behind it.
    Snapshot,
}

pub async fn run(client: &Client, format: Format, cmd: ClusterCmd) -> anyhow::Result<()> {
    let v = match cmd {
        ClusterCmd::Status => return status(client, format).await,
        ClusterCmd::Add {
            node_id,
            api_addr,
            peer_addr,
        } => {
            let body = json!({"node_id": node_id, "api_addr": api_addr, "peer_addr": peer_addr});
            client.post("/cluster/members", &body).await?
        }
        ClusterCmd::Remove { node_id } => {
            client
                .send(
                    Method::DELETE,
                    &format!("/cluster/members/{node_id}"),
                    &[],
                    None,
                )
                .await?
        }
        ClusterCmd::Snapshot => {
            let v = client.post("/cluster/snapshot", &json!({})).await?;
            return output::emit(format, &v, |v| {
                println!(
                    "snapshot at log index {}: log {} → {} bytes",
                    text(&v["snapshot_index"]),
                    text(&v["log_size_bytes_before"]),
                    text(&v["log_size_bytes_after"])
                )
            });
        }
    };
    // A membership change answers the cluster's status after it: shown as `status` is
    // (a table of nodes, or the answer itself as JSON or YAML).
    match format {
        Format::Table => status(client, format).await,
        _ => output::emit(format, &v, |_| {}),
    }
}

async fn status(client: &Client, format: Format) -> anyhow::Result<()> {
    let mut s = client.get("/cluster/status", &[]).await?;
    let scheme = if client.api().starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let members = s["members"].as_object().cloned().unwrap_or_default();
    let mut nodes = Vec::new();
    for (id, m) in &members {
        let api_addr = text(&m["api_addr"]);
        let ready = client.probe(&format!("{scheme}://{api_addr}/readyz")).await;
        let id_num: u64 = id.parse().unwrap_or_default();
        let voter = s["voters"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x.as_u64() == Some(id_num)));
        nodes.push(json!({
            "node_id": id_num,
            "api_addr": api_addr,
            "voter": voter,
            "role": ready.as_ref().map(|r| r["state"].clone()).unwrap_or(Value::Null),
            "term": ready.as_ref().map(|r| r["term"].clone()).unwrap_or(Value::Null),
            "applied_index": ready.as_ref().map(|r| r["applied_index"].clone()).unwrap_or(Value::Null),
            "lag": s["replication_lag"][id].clone(),
            "health": match &ready {
                None => "down",
                Some(r) if r["ready"].as_bool() == Some(true) => "ready",
                Some(_) => "not ready",
            },
        }));
    }
    s["nodes"] = Value::Array(nodes);
    output::emit(format, &s, |s| {
        println!(
            "leader {}  term {}  committed {}  (asked node {})",
            text(&s["leader"]),
            text(&s["term"]),
            text(&s["committed_index"]),
            text(&s["node_id"])
        );
        let mut t = output::table(&[
            "NODE", "API", "ROLE", "VOTER", "TERM", "APPLIED", "LAG", "HEALTH",
        ]);
        for n in s["nodes"].as_array().into_iter().flatten() {
            let voter = if n["voter"].as_bool() == Some(true) {
                "yes"
            } else {
                "learner"
            };
            t.add_row(vec![
                Cell::new(text(&n["node_id"])),
                Cell::new(text(&n["api_addr"])),
                output::state_cell(&text(&n["role"])),
                Cell::new(voter),
                Cell::new(text(&n["term"])),
                Cell::new(text(&n["applied_index"])),
                Cell::new(text(&n["lag"])),
                output::state_cell(&text(&n["health"])),
            ]);
        }
        println!("{t}");
    })
}

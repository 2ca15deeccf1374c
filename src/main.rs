//! The `orchestrator` binary: `server` runs a node; `token` mints a dev token;
//! `config print` shows the effective configuration; `cluster` administers membership.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use orchestrator::config::Config;

#[derive(Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Distributed DAG workflow scheduler"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node (with no configuration: a single-node cluster on 127.0.0.1:8080).
    Server(NodeFlags),
    /// Mint a dev token signed with the configured (or generated) HS256 secret.
    Token {
        #[command(flatten)]
        node: NodeFlags,
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "orchestrator:read orchestrator:write")]
        scope: String,
        #[arg(long, default_value = "dev")]
        subject: String,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Cluster administration through a node's API (needs an admin token).
    Cluster {
        /// Any node's API base, e.g. http://127.0.0.1:8081
        #[arg(
            long,
            env = "ORCHESTRATOR_API",
            default_value = "http://127.0.0.1:8080"
        )]
        api: String,
        #[arg(long, env = "ORCHESTRATOR_TOKEN")]
        token: String,
        /// PEM CA to trust for an https API (besides the system's roots).
        #[arg(long, env = "ORCHESTRATOR_CA_FILE")]
        ca_file: Option<PathBuf>,
        #[command(subcommand)]
        command: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective configuration with secrets redacted.
    Print(NodeFlags),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, indexes and replication lag.
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

/// Flags that override the configuration (after the file and the environment).
#[derive(Args, Default)]
struct NodeFlags {
    /// TOML config file (also ORCHESTRATOR_CONFIG).
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<u64>,
    #[arg(long)]
    api_addr: Option<String>,
    #[arg(long)]
    peer_addr: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Other members: `2=127.0.0.1:8082/127.0.0.1:9082,3=...`
    #[arg(long)]
    peers: Option<String>,
    #[arg(long)]
    cluster_secret: Option<String>,
    /// This node forms the cluster on first start.
    #[arg(long)]
    bootstrap: bool,
}

impl NodeFlags {
    fn load(&self) -> anyhow::Result<Config> {
        let mut o: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                o.push((k.to_string(), v));
            }
        };
        set("node_id", self.node_id.map(|v| v.to_string()));
        set("api_addr", self.api_addr.clone());
        set("peer_addr", self.peer_addr.clone());
        set(
            "data_dir",
            self.data_dir.as_ref().map(|p| p.display().to_string()),
        );
        set("peers", self.peers.clone());
        set("cluster_secret", self.cluster_secret.clone());
        set("bootstrap", self.bootstrap.then(|| "true".to_string()));
        Ok(Config::load(self.config.as_deref(), std::env::vars(), &o)?)
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn cluster_cmd(
    api: &str,
    token: &str,
    ca_file: Option<&std::path::Path>,
    cmd: ClusterCmd,
) -> anyhow::Result<()> {
    let base = format!("{}{}", api.trim_end_matches('/'), orchestrator::api::BASE);
    let mut builder = reqwest::Client::builder();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(&pem).context("--ca-file is not a PEM certificate")?,
        );
    }
    let client = builder.build().context("cannot build the HTTP client")?;
    let req = match cmd {
        ClusterCmd::Status => client.get(format!("{base}/cluster/status")),
        ClusterCmd::Add {
            node_id,
            api_addr,
            peer_addr,
        } => client
            .post(format!("{base}/cluster/members"))
            .json(&serde_json::json!({
                "node_id": node_id, "api_addr": api_addr, "peer_addr": peer_addr
            })),
        ClusterCmd::Remove { node_id } => {
            client.delete(format!("{base}/cluster/members/{node_id}"))
        }
        ClusterCmd::Snapshot => client.post(format!("{base}/cluster/snapshot")),
    };
    let resp = req
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {api}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("response was not JSON")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("{status}");
    }
    Ok(())
}

fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    orchestrator::dag::parse_duration("ttl", s)
        .map(|ms| ms / 1000)
        .map_err(|e| anyhow::anyhow!(e))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Cmd::Server(NodeFlags::default()));
    let result = (|| -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        match command {
            Cmd::Server(flags) => {
                let config = flags.load()?;
                init_logging(&config.log_level);
                rt.block_on(orchestrator::server::run(config, shutdown_signal()))?;
            }
            Cmd::Token {
                node,
                tenant,
                scope,
                subject,
                ttl,
            } => {
                let mut config = node.load()?;
                let secret = config.resolve_hs256_secret()?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("clock before 1970")?
                    .as_secs();
                let request = orchestrator::auth::TokenRequest {
                    tenant: &tenant,
                    subject: &subject,
                    scope: &scope,
                    ttl_secs: parse_ttl(&ttl)?,
                    issuer: config.auth.issuer.as_deref(),
                    audience: config.auth.audience.as_deref(),
                };
                let token = orchestrator::auth::mint(&secret, &request, now)?;
                println!("{token}");
            }
            Cmd::Config {
                command: ConfigCmd::Print(flags),
            } => print!("{}", flags.load()?.redacted_toml()),
            Cmd::Cluster {
                api,
                token,
                ca_file,
                command,
            } => rt.block_on(cluster_cmd(&api, &token, ca_file.as_deref(), command))?,
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 70 (EX_SOFTWARE): Raft stopped on a fatal error; supervisors restart on it.
            let fatal = matches!(
                e.downcast_ref::<orchestrator::server::Error>(),
                Some(orchestrator::server::Error::RaftFatal(_))
            );
            ExitCode::from(if fatal { 70 } else { 1 })
        }
    }
}

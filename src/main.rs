//! The `orchestrator` binary: `server` runs a node; `token` mints a dev token;
//! `config print` shows the effective configuration; `dag`, `run` and `cluster` are the
//! API client ([`cli`]); `completions` prints a shell completion script.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use orchestrator::config::Config;

#[derive(Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Distributed DAG workflow scheduler",
    after_help = cli::EXIT_CODES_HELP
)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientFlags,
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
    /// DAGs: apply DAG files (YAML, JSON, TOML), list, get, versions, pause, unpause, delete.
    Dag {
        #[command(subcommand)]
        command: cli::dag::DagCmd,
    },
    /// Runs: trigger, list, get, cancel, retry, logs, watch.
    Run {
        #[command(subcommand)]
        command: cli::run::RunCmd,
    },
    /// Cluster status and administration through a node's API (changes need an admin token).
    Cluster {
        #[command(subcommand)]
        command: cli::cluster::ClusterCmd,
    },
    /// The node's fence keeper (started by `server`; reads its pipe on stdin).
    #[command(name = "fence-keeper", hide = true)]
    FenceKeeper {
        /// The node's parent cgroup of its attempts: a killed group's cgroup dies too.
        #[arg(long)]
        cgroup_parent: Option<std::path::PathBuf>,
    },
    /// After restoring this stopped node's data dir from another node's archive (the whole
    /// cluster from one backup, docs/runbook.md): take the disk identity the restored
    /// membership records for this node, so the cluster accepts its calls again.
    #[command(name = "restore-identity")]
    RestoreIdentity(NodeFlags),
    /// Print a shell completion script, e.g. `mkdir -p ~/.local/share/bash-completion/completions && orchestrator completions bash > ~/.local/share/bash-completion/completions/orchestrator`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The subcommands that talk to an API and take the client flags.
const CLIENT_COMMANDS: [&str; 3] = ["dag", "run", "cluster"];

/// The client flags (`--api`, `--token`, `--output`, `--ca-file`), global as declared.
fn client_flags() -> Vec<clap::Arg> {
    cli::ClientFlags::augment_args(clap::Command::new("c"))
        .get_arguments()
        .cloned()
        .collect()
}

/// The command line: [`Cli`], with the client flags (global, for `dag`, `run` and
/// `cluster`) hidden from the commands that do not talk to an API, so their help does
/// not offer them.
fn cli_command() -> clap::Command {
    let client_flags = client_flags();
    let mut cmd = Cli::command();
    let local: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|n| !CLIENT_COMMANDS.contains(&n.as_str()))
        .collect();
    for name in local {
        cmd = cmd.mut_subcommand(name, |sub| {
            // clap gives a subcommand a global argument only when it has none of that
            // id: a hidden local one of its own shadows it.
            sub.args(
                client_flags
                    .iter()
                    .map(|a| a.clone().global(false).hide(true)),
            )
        });
    }
    cmd
}

/// The command line as completion scripts describe it: the client flags on the root
/// (`orchestrator --api URL dag list`) and under the client commands, and nowhere else
/// (the bash generator lists hidden arguments too, so the shadows of [`cli_command`]
/// would be offered).
fn completion_command() -> clap::Command {
    let client_flags = client_flags();
    let mut cmd = Cli::command();
    for flag in &client_flags {
        cmd = cmd.mut_arg(flag.get_id(), |a| a.global(false));
    }
    for name in CLIENT_COMMANDS {
        cmd = cmd.mut_subcommand(name, |sub| sub.args(client_flags.iter().cloned()));
    }
    cmd
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the effective configuration with secrets redacted.
    Print(NodeFlags),
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
    /// A file holding the cluster secret (or set ORCHESTRATOR_CLUSTER_SECRET).
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// Refused: argv is readable by every local user. Kept only to say so.
    #[arg(long, hide = true)]
    cluster_secret: Option<String>,
    /// This node forms the cluster on first start.
    #[arg(long)]
    bootstrap: bool,
    /// Log lines as `pretty` text or `json` objects (config `log_format`).
    #[arg(long, value_parser = ["pretty", "json"])]
    log_format: Option<String>,
}

impl NodeFlags {
    fn load(&self) -> anyhow::Result<Config> {
        if self.cluster_secret.is_some() {
            // Refused rather than warned about: by the time a warning is printed the
            // secret is already in /proc/PID/cmdline and `ps` for the node's whole life.
            anyhow::bail!(
                "--cluster-secret is refused: a secret on the command line is readable by \
                 every local user (ps, /proc/PID/cmdline); use --cluster-secret-file PATH, \
                 ORCHESTRATOR_CLUSTER_SECRET, or cluster_secret in the config file"
            );
        }
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
        set(
            "cluster_secret_file",
            self.cluster_secret_file
                .as_ref()
                .map(|p| p.display().to_string()),
        );
        set("bootstrap", self.bootstrap.then(|| "true".to_string()));
        set("log_format", self.log_format.clone());
        Ok(Config::load(self.config.as_deref(), std::env::vars(), &o)?)
    }
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

fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    orchestrator::dag::parse_duration("ttl", s)
        .map(|ms| ms / 1000)
        .map_err(|e| anyhow::anyhow!(e))
}

fn main() -> ExitCode {
    // Exec'd above an isolated shell attempt: reap it and nothing else (no runtime, no
    // configuration, no logging).
    if let Some(child) = orchestrator::executor::isolation::reaper_of(std::env::args_os()) {
        orchestrator::executor::isolation::reap(child);
    }
    let Cli {
        client: flags,
        command,
    } = match Cli::from_arg_matches(&cli_command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let command = command.unwrap_or(Cmd::Server(NodeFlags::default()));
    if let Cmd::FenceKeeper { cgroup_parent } = command {
        // No runtime, no config: a loop on a pipe (orchestrator::executor::fencing).
        let cgroups = cgroup_parent.map(orchestrator::executor::cgroup::Cgroups::at);
        let code = orchestrator::executor::fencing::serve_stdin(cgroups);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if matches!(command, Cmd::Server(_)) {
        orchestrator::server::limit_malloc_arenas();
    } else {
        // A client command piped into `head` ends quietly when the pipe closes, as Unix
        // tools do, instead of panicking in println!. Rust ignores SIGPIPE for every
        // program; only the server needs that (a peer closing a socket is an error there).
        // SAFETY: restoring a signal's default disposition at start, before any thread.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = (|| -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        match command {
            Cmd::Server(flags) => {
                let config = flags.load()?;
                orchestrator::telemetry::logging::init(
                    &config.log_level,
                    config.log_format,
                    config.node_id,
                );
                rt.block_on(orchestrator::server::run(config, shutdown_signal()))?;
            }
            Cmd::Token {
                node,
                tenant,
                scope,
                subject,
                ttl,
            } => {
                let config = node.load()?;
                let secret = config.existing_hs256_secret()?;
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
            Cmd::Dag { command } => {
                let client = cli::Client::new(&flags)?;
                rt.block_on(cli::dag::run(&client, flags.output, command))?
            }
            Cmd::Run { command } => {
                let client = cli::Client::new(&flags)?;
                rt.block_on(cli::run::run(&client, flags.output, command))?
            }
            Cmd::Cluster { command } => {
                let client = cli::Client::new(&flags)?;
                rt.block_on(cli::cluster::run(&client, flags.output, command))?
            }
            Cmd::RestoreIdentity(node) => {
                let config = node.load()?;
                let done =
                    orchestrator::raft::node::restore_identity(&config.data_dir, config.node_id)?;
                println!("{done}");
            }
            Cmd::FenceKeeper { .. } => {
                unreachable!("the fence keeper is dispatched before the runtime starts")
            }
            Cmd::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut completion_command(),
                    "orchestrator",
                    &mut std::io::stdout(),
                );
            }
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
            ExitCode::from(if fatal { 70 } else { cli::exit_code(&e) })
        }
    }
}

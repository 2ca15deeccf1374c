//! The client half of the `orchestrator` binary: subcommands that talk to any node's
//! REST API. One file per command group; this file only declares them and the flags
//! and exit codes they share.
//!
//! - [`client`]: the HTTP client, API errors and the exit code each failure maps to.
//! - [`output`]: tables, JSON/YAML output, relative times, colour on a TTY only.
//! - [`dag`]: `dag apply|list|get|pause|unpause|delete` (DAG files in YAML, JSON, TOML).
//! - [`run`]: `run trigger|list|get|cancel|retry|logs|watch`.
//! - [`cluster`]: `cluster status|add|remove|snapshot`.

pub mod client;
pub mod cluster;
pub mod dag;
pub mod output;
pub mod run;

pub use client::{exit_code, Client};

/// Flags every client subcommand shares (also read from the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientFlags {
    /// Any node's API base URL.
    #[arg(
        long,
        global = true,
        env = "ORCHESTRATOR_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// Bearer token (mint one with `orchestrator token`).
    #[arg(
        long,
        global = true,
        env = "ORCHESTRATOR_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Output format of client commands.
    #[arg(
        short = 'o',
        long,
        global = true,
        env = "ORCHESTRATOR_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: output::Format,
    /// PEM CA to trust for an https API (besides the system's roots).
    #[arg(long, global = true, env = "ORCHESTRATOR_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// Shown at the end of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  local error (unreadable or invalid file, bad input)
  2  usage error (unknown flag, missing argument, no token)
  3  the API answered with an error (its code and message are printed)
  4  cannot reach the API (connection refused, TLS, timeout)
  5  the run ended failed or cancelled (run watch, run trigger --wait)";

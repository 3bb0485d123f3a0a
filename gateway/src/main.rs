//! `portcullis`: the gateway daemon (`serve`) and the operator CLI that talks to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "The data-path gateway that AI agents cannot go around"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the CLI finds a running gateway.
#[derive(Args, Clone)]
struct AdminArgs {
    /// The gateway's admin socket.
    #[arg(long, env = "PORTCULLIS_ADMIN_SOCKET", default_value = portcullis::config::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Box<portcullis::config::ServeArgs>),
    /// Version, uptime, listeners and session counts of the running gateway.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live sessions of the running gateway; `kill` ends some.
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<SessionsCommand>,
    },
    /// Pending and recent just-in-time approval requests.
    Approvals {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held statement.
    Approve {
        /// The request id (from `portcullis approvals` or the client's notice).
        id: u64,
        /// With `--scope fingerprint`: how long statements with the same fingerprint pass without
        /// a new approval (e.g. 10m).
        #[arg(long = "for", value_parser = parse_duration)]
        for_: Option<std::time::Duration>,
        /// What the approval covers.
        #[arg(long, value_enum, default_value = "statement")]
        scope: portcullis::policy::approval::Scope,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Deny a held statement; the client gets SQLSTATE 42501 with the reason.
    Deny {
        id: u64,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Validate a policy, or explain the verdict it gives a statement.
    Policy {
        #[command(subcommand)]
        command: portcullis::policy::cli::PolicyCommand,
    },
    /// Run a command as an intercepted agent, in a new cgroup under the agent root.
    Run(portcullis::redirect::cli::RunArgs),
    /// List agents with their connections, or place a cgroup under interception (`attach`).
    Agents(portcullis::redirect::cli::AgentsArgs),
    /// Recorded sessions: list, show, replay, verify, export, prune.
    Recordings(portcullis::record::cli::RecordingsArgs),
    /// Remove every pinned eBPF map and link: interception stops.
    Uninstall(portcullis::redirect::cli::UninstallArgs),
    /// Check what this host offers against what the configuration needs, with a fix for each gap.
    Doctor {
        /// TOML configuration file [default: the embedded default].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the path of the local CA certificate that agents trust for the local TLS leg
    /// (`sslrootcert`), or with --pem the certificate itself.
    LocalCa {
        /// TOML configuration file [default: the embedded default].
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory, overriding the configuration's.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print the PEM certificate instead of its path.
        #[arg(long)]
        pem: bool,
    },
    /// Reload the running gateway (SIGHUP) and wait for the outcome: the unit's ExecReload.
    Reload {
        /// The gateway's pid (systemd passes $MAINPID).
        #[arg(long)]
        pid: i32,
        /// How long to wait for the gateway to report.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Write man pages and shell completions into a directory (used to build the package).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// End live sessions: each client gets FATAL 57P01 naming the operator who killed it.
    Kill {
        /// Every live session of this subject (the verified token's `sub`).
        #[arg(long, required_unless_present = "session", conflicts_with = "session")]
        subject: Option<String>,
        /// One session, by the id `portcullis sessions` shows.
        #[arg(long)]
        session: Option<u64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `portcullis.1`, one `portcullis-<command>.1` per command, and bash, zsh and fish completions.
fn generate_docs(out: &std::path::Path) -> anyhow::Result<()> {
    use clap_complete::Shell;
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "portcullis", &completions)?;
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 10m or 1h: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => portcullis::daemon::serve(*args, portcullis::admin::server::start),
        Command::Status { admin, json } => {
            portcullis::admin::client::status(&admin.admin_socket, json)
        }
        Command::Sessions {
            admin,
            json,
            command: None,
        } => portcullis::admin::client::sessions(&admin.admin_socket, json),
        Command::Sessions {
            command:
                Some(SessionsCommand::Kill {
                    subject,
                    session,
                    json,
                    admin,
                }),
            ..
        } => portcullis::admin::client::kill_sessions(&admin.admin_socket, subject, session, json),
        Command::Approvals { admin, json } => {
            portcullis::admin::client::approvals(&admin.admin_socket, json)
        }
        Command::Approve {
            id,
            for_,
            scope,
            admin,
        } => portcullis::admin::client::approve(&admin.admin_socket, id, for_, scope),
        Command::Deny { id, reason, admin } => {
            portcullis::admin::client::deny(&admin.admin_socket, id, reason)
        }
        Command::Policy { command } => portcullis::policy::cli::run(command),
        Command::Run(args) => portcullis::redirect::cli::run(args),
        Command::Agents(args) => portcullis::redirect::cli::agents(args),
        Command::Uninstall(args) => portcullis::redirect::cli::uninstall(args),
        Command::Recordings(args) => portcullis::record::cli::run(args),
        Command::Doctor { config, json } => {
            let args = portcullis::config::ServeArgs {
                config,
                ..Default::default()
            };
            portcullis::service::doctor::run(&args, json)
        }
        Command::LocalCa {
            config,
            state_dir,
            pem,
        } => {
            let args = portcullis::config::ServeArgs {
                config,
                state_dir,
                ..Default::default()
            };
            portcullis::forward::local_tls::ca_command(&args, pem)
        }
        Command::Reload {
            pid,
            timeout,
            admin,
        } => portcullis::service::reload_command(
            pid,
            &portcullis::service::reload_status_path(&admin.admin_socket),
            timeout,
        ),
        Command::GenerateDocs { out } => generate_docs(&out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

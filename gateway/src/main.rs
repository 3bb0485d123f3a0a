//! `portcullis`: the gateway daemon (`serve`) and the operator CLI that talks to it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
    /// Live sessions of the running gateway.
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a command as an intercepted agent, in a new cgroup under the agent root.
    Run(portcullis::redirect::cli::RunArgs),
    /// List agents with their connections, or place a cgroup under interception (`attach`).
    Agents(portcullis::redirect::cli::AgentsArgs),
    /// Remove every pinned eBPF map and link: interception stops.
    Uninstall(portcullis::redirect::cli::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => portcullis::forward::serve(*args),
        Command::Status { admin, json } => {
            portcullis::admin::client::status(&admin.admin_socket, json)
        }
        Command::Sessions { admin, json } => {
            portcullis::admin::client::sessions(&admin.admin_socket, json)
        }
        Command::Run(args) => portcullis::redirect::cli::run(args),
        Command::Agents(args) => {
            portcullis::redirect::cli::agents(args, &std::collections::HashMap::new())
        }
        Command::Uninstall(args) => portcullis::redirect::cli::uninstall(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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
    /// Validate a policy, or explain the verdict it gives a statement.
    Policy {
        #[command(subcommand)]
        command: portcullis::policy::cli::PolicyCommand,
    },
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
        Command::Policy { command } => portcullis::policy::cli::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

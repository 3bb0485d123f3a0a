//! Configuration: the TOML file, the quick-start flags, and the embedded default.

use std::path::PathBuf;

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/portcullis/admin.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// `portcullis serve`: a config file, or a single target given as flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML configuration file. Without it, the embedded default configuration is used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to accept PostgreSQL clients on (quick start: one explicit listener).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Upstream PostgreSQL, as postgres://USER@HOST:PORT/DB[?sslmode=MODE&sslrootcert=FILE].
    #[arg(long)]
    pub target: Option<String>,
    /// File holding the upstream password (refused when group- or world-readable).
    #[arg(long, conflicts_with = "password_env")]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the upstream password.
    #[arg(long)]
    pub password_env: Option<String>,
    /// Admin API Unix socket.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// State directory (approvals store, recordings).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Policy: a built-in name (`default`, `observe`) or a TOML file.
    #[arg(long)]
    pub policy: Option<String>,
    /// Log format: `plain` (journald-friendly lines) or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
    /// I/O worker threads, one io_uring runtime each (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
}

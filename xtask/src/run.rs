//! `cargo xtask run [-- SERVE_ARGS]`: set up, build the release gateway, and serve.
//!
//! Given arguments, or a PostgreSQL on the embedded default's upstream (127.0.0.1:5432), it
//! serves that. Otherwise it shows the product: a throwaway PostgreSQL with a small schema that
//! holds PII, the gateway in front of it with the `default` policy, and the exact commands that
//! show a masked SELECT, a blocked DROP and a DELETE held until `portcullis approve`. Ctrl-C
//! stops the gateway and removes the database.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{cmd, setup};

#[derive(Args)]
pub struct RunArgs {
    /// Passed to `portcullis serve`, e.g. `-- --config /etc/portcullis/portcullis.toml`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    serve_args: Vec<String>,
}

/// The embedded default's upstream and listener (gateway/src/default.toml).
const DEFAULT_UPSTREAM: ([u8; 4], u16) = ([127, 0, 0, 1], 5432);
const DEMO_LISTEN: &str = "127.0.0.1:6432";
const DEMO_METRICS: &str = "127.0.0.1:9477";

const DEMO_SCHEMA: &str = "
CREATE TABLE customers (
    id int PRIMARY KEY, name text, email text, phone text, ssn text, card_number text, notes text
);
INSERT INTO customers VALUES
 (1, 'Ada Lovelace',  'ada@example.com',    '+44 20 7946 0018', '078-05-1120', '4111 1111 1111 1111', 'prefers email'),
 (2, 'Alan Turing',   'alan@example.org',   '+44 161 496 0734', '219-09-9999', '5500 0000 0000 0004', 'call ada@example.com first'),
 (3, 'Grace Hopper',  'grace@example.net',  '+1 202 555 0143',  '457-55-5462', '3400 0000 0000 009',  'VIP');
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, total numeric);
INSERT INTO orders VALUES (10, 1, 120.50), (11, 2, 99.00), (12, 3, 15.25);
ALTER TABLE customers OWNER TO app;
ALTER TABLE orders OWNER TO app;
";

pub fn run(args: &RunArgs) -> Result<()> {
    setup::setup()?;
    cmd::run(cmd::cargo()?.args(["build", "--release", "-p", "portcullis"]))?;
    let bin = cmd::target_dir()?.join("release").join("portcullis");
    let upstream = SocketAddr::from(DEFAULT_UPSTREAM);
    if !args.serve_args.is_empty() || listening(upstream) {
        return cmd::run(Command::new(bin).arg("serve").args(&args.serve_args));
    }
    eprintln!(
        "xtask: nothing listens on {upstream} and no upstream is configured: starting the demo"
    );
    demo(&bin)
}

fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

fn demo(bin: &Path) -> Result<()> {
    let listen: SocketAddr = DEMO_LISTEN.parse()?;
    if listening(listen) {
        bail!("{listen} is taken: stop what listens there (another gateway?) and run again");
    }
    // SIGINT reaches the whole foreground group; the gateway drains on its own, and we tidy up.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let pg = testkit::Postgres::start().context("starting the demo PostgreSQL")?;
    pg.app_superuser_sql(DEMO_SCHEMA)?;
    let dir = tempfile::Builder::new()
        .prefix("portcullis-demo-")
        .tempdir()?;
    let password = pg.write_password_file(dir.path())?;
    let admin = dir.path().join("admin.sock");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"# The demo: the gateway in front of a throwaway PostgreSQL, with the default policy.
[gateway]
admin_socket = "{admin}"
state_dir = "{state}"
policy = "default"
drain_timeout = "2s"

[metrics]
listen = "{DEMO_METRICS}"

[[listener]]
listen = "{listen}"
target = "demo"

[[target]]
name = "demo"
upstream = "{url}?sslmode=disable"
password_file = "{password}"
"#,
            admin = admin.display(),
            state = dir.path().join("state").display(),
            url = pg.url(),
            password = password.display(),
        ),
    )?;
    let mut gateway = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .spawn()
        .context("starting the gateway")?;
    let ready = wait_listening(&mut gateway, listen, Duration::from_secs(20));
    if let Err(e) = ready {
        let _ = gateway.kill();
        return Err(e);
    }
    print!("{}", instructions(bin, &admin, listen));
    while !stop.load(Ordering::Relaxed) {
        if let Some(status) = gateway.try_wait()? {
            bail!("the gateway exited: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("xtask: stopping the demo");
    // SAFETY: kill with a child's pid and a signal number has no memory-safety preconditions.
    unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
    let _ = gateway.wait();
    drop(pg);
    drop(dir);
    eprintln!("xtask: demo gateway stopped, database removed");
    Ok(())
}

fn wait_listening(gateway: &mut Child, addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !listening(addr) {
        if let Some(status) = gateway.try_wait()? {
            bail!("the gateway exited before listening on {addr}: {status}");
        }
        if Instant::now() > deadline {
            bail!("the gateway did not listen on {addr} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn instructions(bin: &Path, admin: &Path, listen: SocketAddr) -> String {
    let psql = format!(
        "psql \"host={} port={} user=agent dbname=app\"",
        listen.ip(),
        listen.port()
    );
    let cli = |sub: &str| format!("{} {sub} --admin-socket {}", bin.display(), admin.display());
    format!(
        "
Portcullis is serving {listen} in front of a throwaway PostgreSQL that holds PII,
with the `default` policy: reads pass with PII masked, schema changes are blocked, writes wait
for a human. Any user name works; the gateway holds the database's credential.

1. A masked SELECT (emails, phones, card numbers and SSNs never reach the agent):
     {psql} -c 'SELECT name, email, phone, ssn, card_number, notes FROM customers'

2. A blocked DROP (SQLSTATE 42501, naming the rule that fired):
     {psql} -c 'DROP TABLE customers'

3. A DELETE held for approval (it waits, printing the request id):
     {psql} -c 'DELETE FROM orders WHERE id = 12'
   then, in another terminal:
     {approvals}
     {approve}
   (or `deny <ID>`; the held statement then runs, or fails with 42501)

Also: {status}   and   curl -s http://{DEMO_METRICS}/metrics

Ctrl-C stops the gateway and removes the database.
",
        approvals = cli("approvals"),
        approve = cli("approve <ID>"),
        status = cli("sessions"),
    )
}

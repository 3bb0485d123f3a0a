//! Connect latency through the gateway, with identity at connect and without, in one run: the
//! real gateway (shipped default policy), a real PostgreSQL and the real test IdP (npm's
//! oidc-provider, `cargo xtask setup`). Each connect is TCP, startup, the token as the password
//! where the target asks for one, the gateway's upstream login, up to the first ReadyForQuery.
//!
//! - `without identity`: a target with no `[target.identity]`, the baseline.
//! - `exchange, cold`: a new subject token: the RFC 8693 exchange at the IdP and our validation.
//! - `validate, cold`: a new token validated against the cached JWKS (no exchange).
//! - `exchange, cached`: the same subject token again: the identity cache answers.
//!
//! The four kinds take turns, one connect each per round, so they share the machine's noise.
//! Tokens are minted before timing starts; discovery and the JWKS are warmed first.
//!
//! `cargo run --release -p portcullis-bench --bin identity_connect [-- --iterations N]`

#[path = "../pgclient.rs"]
#[allow(
    dead_code,
    reason = "the harness's client, of which this bench only connects"
)]
mod pgclient;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgclient::{Conn, ConnectParams};
use testkit::idp::Idp;
use testkit::{Gateway, GatewayOptions, Postgres, free_port};

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200);
    let pg = Postgres::start()?;
    let idp = Idp::start()?;
    let dir = tempfile::tempdir()?;
    let pw = pg.write_password_file(dir.path())?;
    let addr =
        || -> anyhow::Result<SocketAddr> { Ok(format!("127.0.0.1:{}", free_port()).parse()?) };
    let (plain, exchange, validate) = (addr()?, addr()?, addr()?);
    let config = format!(
        r#"
[[listener]]
listen = "{exchange}"
target = "exchange"

[[listener]]
listen = "{validate}"
target = "validate"

[[target]]
name = "plain"
upstream = "{url}"
password_file = "{pw}"

[[target]]
name = "exchange"
upstream = "{url}"
password_file = "{pw}"
protect = ["192.0.2.1:5432"]

[target.identity]
issuer = "{issuer}"
audience = "pg-bench"
client_id = "portcullis"
client_secret_file = "{secret}"

[[target]]
name = "validate"
upstream = "{url}"
password_file = "{pw}"
protect = ["192.0.2.1:5433"]

[target.identity]
issuer = "{issuer}"
audience = "pg-bench-validate"
mode = "validate"
"#,
        url = pg.url(),
        pw = pw.display(),
        issuer = idp.issuer(),
        secret = idp.client_secret_file().display(),
    );
    let body = format!("[[listener]]\nlisten = \"{plain}\"\ntarget = \"plain\"\n{config}");
    let gw = Gateway::start(
        GatewayOptions::with_config(plain, body)
            .arg("--policy")
            .arg("default"),
    )
    .context("starting the gateway")?;

    let subjects: Vec<String> = (0..iterations)
        .map(|i| idp.mint(&format!("user-{i}"), &["dba"], "portcullis"))
        .collect::<anyhow::Result<_>>()?;
    let presented: Vec<String> = (0..iterations)
        .map(|i| idp.mint(&format!("user-{i}"), &["dba"], "pg-bench-validate"))
        .collect::<anyhow::Result<_>>()?;
    let warm = (
        idp.mint("warm", &[], "portcullis")?,
        idp.mint("warm", &[], "pg-bench-validate")?,
    );
    connect(plain, None).context("through the gateway, without identity")?;
    connect(exchange, Some(&warm.0)).with_context(|| gw.log_tail(20))?;
    connect(validate, Some(&warm.1)).with_context(|| gw.log_tail(20))?;

    let mut samples: [Vec<Duration>; 4] = Default::default();
    for i in 0..iterations {
        samples[0].push(connect(plain, None)?);
        samples[1].push(connect(exchange, Some(&subjects[i]))?);
        samples[2].push(connect(validate, Some(&presented[i]))?);
        samples[3].push(connect(exchange, Some(&subjects[i]))?);
    }
    println!(
        "connect through the gateway, {iterations} connects each (median / p99 / median ratio \
         to without identity):"
    );
    let base = median(&mut samples[0]);
    let labels = [
        "without identity",
        "exchange, cold",
        "validate, cold",
        "exchange, cached",
    ];
    for (label, s) in labels.iter().zip(samples.iter_mut()) {
        let m = median(s);
        println!(
            "  {label:<18} {:>9.0} µs {:>9.0} µs {:>7.2}x",
            m.as_secs_f64() * 1e6,
            quantile(s, 0.99).as_secs_f64() * 1e6,
            m.as_secs_f64() / base.as_secs_f64()
        );
    }
    Ok(())
}

/// One connect up to ReadyForQuery, timed; the session then ends cleanly.
fn connect(at: SocketAddr, token: Option<&str>) -> anyhow::Result<Duration> {
    let params = ConnectParams {
        host: at.ip().to_string(),
        port: at.port(),
        user: "agent".into(),
        database: "app".into(),
        password: token.map(str::to_owned),
        timeout: Duration::from_secs(30),
    };
    let start = Instant::now();
    let conn = Conn::connect(&params)?;
    let took = start.elapsed();
    conn.terminate();
    Ok(took)
}

fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q) as usize]
}

fn median(samples: &mut [Duration]) -> Duration {
    quantile(samples, 0.5)
}

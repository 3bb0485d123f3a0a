//! Identity at connect against the real test IdP (npm's oidc-provider, `cargo xtask setup`):
//! the RFC 8693 exchange cold (a new subject token: HTTP round trip, IdP signing, our
//! validation), validate mode cold (signature and claims only, JWKS cached), and cached (a
//! repeat connect: the identity cache answering on the caller's thread).
//!
//! `cargo run --release -p portcullis-bench --bin idp_exchange [-- --iterations N]`
//!
//! Figures are medians and 99th percentiles per connect. Tokens are minted before timing starts.

use std::time::{Duration, Instant};

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use portcullis::idp::config::TargetIdentity;
use portcullis::idp::{IdentityError, IdentityService, Token, TokenSource, VerifiedIdentity};
use testkit::idp::Idp;

fn main() -> anyhow::Result<()> {
    let iterations: usize = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200);
    let idp = Idp::start()?;
    let base = format!("issuer = {:?}\naudience = \"pg-orders\"\n", idp.issuer());
    let exchange = IdentityService::start(toml::from_str::<TargetIdentity>(&format!(
        "{base}client_id = \"portcullis\"\nclient_secret_file = {:?}\n",
        idp.client_secret_file()
    ))?)?;
    let validate = IdentityService::start(toml::from_str::<TargetIdentity>(&format!(
        "{base}mode = \"validate\"\n"
    ))?)?;

    let subjects: Vec<String> = (0..iterations)
        .map(|i| idp.mint(&format!("user-{i}"), &["dba"], "portcullis"))
        .collect::<anyhow::Result<_>>()?;
    let presented: Vec<String> = (0..iterations)
        .map(|i| idp.mint(&format!("user-{i}"), &["dba"], "pg-orders"))
        .collect::<anyhow::Result<_>>()?;
    let source = |t: &str| TokenSource::Presented(Token::new(t.to_owned()));
    // Warm discovery and the JWKS so "cold" means a new token, not a new gateway.
    block(&exchange, source(&idp.mint("warm", &[], "portcullis")?))?;
    block(&validate, source(&idp.mint("warm", &[], "pg-orders")?))?;

    let mut cold = Vec::new();
    for t in &subjects {
        let start = Instant::now();
        block(&exchange, source(t))?;
        cold.push(start.elapsed());
    }
    let mut validated = Vec::new();
    for t in &presented {
        let start = Instant::now();
        block(&validate, source(t))?;
        validated.push(start.elapsed());
    }
    let mut cached = Vec::new();
    for _ in 0..20 {
        for t in &subjects {
            let start = Instant::now();
            std::hint::black_box(block(&exchange, source(t))?);
            cached.push(start.elapsed());
        }
    }
    println!("identity at connect, {iterations} subjects (median / p99):");
    report("exchange, cold", &mut cold);
    report("validate, cold", &mut validated);
    report("cached", &mut cached);
    Ok(())
}

/// A minimal `block_on`: polls the future, parking this thread until its waker unparks it (a
/// compio task would be woken the same way by the channel).
fn block(
    service: &IdentityService,
    source: TokenSource,
) -> Result<Arc<VerifiedIdentity>, IdentityError> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(service.identify(source, None));
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
        std::thread::park();
    }
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "  {label:<16} {:>10.1} µs {:>10.1} µs",
        at(0.5).as_secs_f64() * 1e6,
        at(0.99).as_secs_f64() * 1e6
    );
}

//! Prometheus metrics at `[metrics] listen`, documented in docs/operations.md.
//!
//! The data path records into process-wide families through the small functions below (one
//! atomic add each, no allocation once a label set exists); per-target session and byte counts
//! are read from the live [`crate::metrics::Registry`] at scrape time. Labels are only values
//! the operator configured (target and rule names) or small fixed sets: no SQL text, no
//! session ids, no client addresses.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{debug, info};

use crate::daemon::Shared;
use crate::metrics::SessionState;
use crate::policy::Action;

type Labels = Vec<(&'static str, String)>;

struct Families {
    statements: Family<Labels, Counter>,
    verdicts: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    overhead: Histogram,
    connect: Family<Labels, Histogram>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    statements: Family::default(),
    verdicts: Family::default(),
    errors: Family::default(),
    reloads: Family::default(),
    // 10 µs .. ~84 ms: the gateway's own share of a statement.
    overhead: Histogram::new(exponential_buckets(1e-5, 2.0, 14)),
    // 1 ms .. ~8 s: TCP, TLS and authentication to the upstream.
    connect: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-3, 2.0, 14))),
});

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Block => "block",
        Action::Approve => "approve",
    }
}

/// A session's verdict counters, found in the families once per rule and verdict: after that a
/// decided request costs two atomic adds, not a label set built and looked up under a lock.
#[derive(Default)]
pub struct VerdictCounters(Vec<(Arc<str>, Action, Counter, Counter)>);

/// Distinct (rule, verdict) pairs a session keeps; a reload that renames rules cannot grow it
/// past this.
const VERDICT_COUNTERS_MAX: usize = 64;

impl VerdictCounters {
    /// One decided request (a simple query, a Parse or a function call).
    pub fn count(&mut self, target: &str, rule: &Arc<str>, action: Action) {
        let known = self
            .0
            .iter()
            .find(|(r, a, ..)| *a == action && (Arc::ptr_eq(r, rule) || r == rule));
        if let Some((.., statements, verdicts)) = known {
            statements.inc();
            verdicts.inc();
        } else {
            let name = action_name(action);
            let f = &*FAMILIES;
            let statements = f
                .statements
                .get_or_create(&vec![
                    ("target", target.to_owned()),
                    ("verdict", name.into()),
                ])
                .clone();
            let verdicts = f
                .verdicts
                .get_or_create(&vec![("rule", rule.to_string()), ("verdict", name.into())])
                .clone();
            statements.inc();
            verdicts.inc();
            if self.0.len() >= VERDICT_COUNTERS_MAX {
                self.0.clear();
            }
            self.0.push((rule.clone(), action, statements, verdicts));
        }
        if action == Action::Block {
            // The client gets 42501 insufficient_privilege from the session core.
            error_sent("42501");
        }
    }
}

/// An ErrorResponse the gateway itself sent a client, counted by SQLSTATE class.
pub fn error_sent(sqlstate: &str) {
    FAMILIES
        .errors
        .get_or_create(&vec![("class", sqlstate_class(sqlstate).to_owned())])
        .inc();
}

/// The two-character class of a SQLSTATE; anything malformed is `other`, so a bad code cannot
/// grow the label set.
fn sqlstate_class(sqlstate: &str) -> &str {
    match sqlstate.as_bytes() {
        [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => &sqlstate[..2],
        _ => "other",
    }
}

/// Time the gateway spent on a client's requests before they went upstream: framing, policy,
/// and the write.
pub fn statement_overhead(d: Duration) {
    FAMILIES.overhead.observe(d.as_secs_f64());
}

/// Time from accepting a client to an authenticated upstream session.
pub fn connected(target: &str, d: Duration) {
    FAMILIES
        .connect
        .get_or_create(&vec![("target", target.to_owned())])
        .observe(d.as_secs_f64());
}

pub(super) fn reload(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    FAMILIES
        .reloads
        .get_or_create(&vec![("result", result.to_owned())])
        .inc();
}

/// Values read from the session registry at scrape time.
struct Live {
    shared: Arc<Shared>,
    /// Bytes move from a live session to its target's totals when it ends; the largest value
    /// shown so far keeps the counter from dipping in between.
    shown: Mutex<HashMap<(String, &'static str), u64>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let registry = &self.shared.registry;
        let targets = registry.target_snapshots(&self.shared.routes());
        let sessions = registry.sessions();

        let held = sessions
            .iter()
            .filter(|s| s.state == SessionState::Holding)
            .count();
        let g = ConstGauge::new(held as i64);
        g.encode(encoder.encode_descriptor(
            "portcullis_approvals_pending",
            "Statements held waiting for an operator's approval.",
            None,
            g.metric_type(),
        )?)?;

        let mut m = encoder.encode_descriptor(
            "portcullis_sessions",
            "Client sessions accepted, per target.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for t in &targets {
            ConstCounter::new(t.sessions_total)
                .encode(m.encode_family(&[("target", &*t.target)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "portcullis_sessions_active",
            "Client sessions open now, per target.",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for t in &targets {
            ConstGauge::new(t.sessions_active as i64)
                .encode(m.encode_family(&[("target", &*t.target)])?)?;
        }

        let rec = self.shared.recorder.status();
        for (name, help, value) in [
            (
                "portcullis_recording_records",
                "Records the recorder has written.",
                rec.records,
            ),
            (
                "portcullis_recording_bytes_written",
                "Bytes the recorder appended to segments (compressed).",
                rec.bytes_written,
            ),
            (
                "portcullis_recording_syncs",
                "Segment syncs (fdatasync) that succeeded.",
                rec.syncs,
            ),
            (
                "portcullis_recording_refused",
                "Statements and records refused because recording failed or its queue was full.",
                rec.refused,
            ),
            (
                "portcullis_recording_write_failures",
                "Failed segment writes or syncs.",
                rec.write_failures,
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let g = ConstGauge::new(i64::from(rec.state != "ok"));
        g.encode(encoder.encode_descriptor(
            "portcullis_recording_failing",
            "1 while recording fails and new statements are refused.",
            None,
            g.metric_type(),
        )?)?;

        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = encoder.encode_descriptor(
            "portcullis_bytes",
            "Bytes relayed, per target and direction (client_to_server, server_to_client).",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for t in &targets {
            let live = sessions.iter().filter(|s| s.target == t.target);
            let (live_in, live_out) =
                live.fold((0, 0), |(i, o), s| (i + s.bytes_in, o + s.bytes_out));
            for (direction, now) in [
                ("client_to_server", t.bytes_in + live_in),
                ("server_to_client", t.bytes_out + live_out),
            ] {
                let v = shown.entry((t.target.clone(), direction)).or_default();
                *v = (*v).max(now);
                ConstCounter::new(*v).encode(
                    m.encode_family(&[("target", &*t.target), ("direction", direction)])?,
                )?;
            }
        }
        drop(shown);
        encode_upstream(&targets, &mut encoder)?;
        encode_identity(&self.shared, &mut encoder)
    }
}

/// Each target's upstream connections, over all I/O workers: those open against
/// `max_upstream_connections`, and what its pool (`[target.pool]`) did.
fn encode_upstream(
    targets: &[crate::metrics::TargetSnapshot],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    for (name, help, value) in [
        (
            "portcullis_pool_idle",
            "Idle upstream connections kept warm now, per target.",
            (|t| t.pool.idle) as fn(&crate::metrics::TargetSnapshot) -> u64,
        ),
        (
            "portcullis_upstream_connections",
            "Upstream connections open now, busy and idle, per target.",
            |t| t.upstream_open,
        ),
        (
            "portcullis_upstream_waiting",
            "Sessions waiting now for an upstream connection at max_upstream_connections.",
            |t| t.upstream_waiting,
        ),
    ] {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for t in targets {
            ConstGauge::new(value(t) as i64).encode(m.encode_family(&[("target", &*t.target)])?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "portcullis_upstream_longest_wait_seconds",
        "How long the session waiting longest at max_upstream_connections has waited, per target; 0 when none waits.",
        None,
        MetricType::Gauge,
    )?;
    for t in targets {
        ConstGauge::new(t.upstream_longest_wait_ms as f64 / 1000.0)
            .encode(m.encode_family(&[("target", &*t.target)])?)?;
    }
    let mut m = encoder.encode_descriptor(
        "portcullis_pool_sessions",
        "Sessions of a pooled target by how they got their upstream connection: reused (warm) \
         or dialed (none idle, or none passed its check).",
        None,
        MetricType::Counter,
    )?;
    for t in targets {
        for (served, n) in [("reused", t.pool.reused), ("dialed", t.pool.dialed)] {
            ConstCounter::new(n)
                .encode(m.encode_family(&[("target", &*t.target), ("served", served)])?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "portcullis_pool_dialed_ahead",
        "Upstream connections dialled ahead of any session, for min_idle.",
        None,
        MetricType::Counter,
    )?;
    for t in targets {
        ConstCounter::new(t.pool.dialed_ahead)
            .encode(m.encode_family(&[("target", &*t.target)])?)?;
    }
    let mut m = encoder.encode_descriptor(
        "portcullis_pool_closed",
        "Upstream connections closed instead of kept or reused, per target and reason.",
        None,
        MetricType::Counter,
    )?;
    for t in targets {
        for (reason, n) in &t.pool.closed {
            ConstCounter::new(*n)
                .encode(m.encode_family(&[("target", &*t.target), ("reason", reason)])?)?;
        }
    }
    Ok(())
}

/// The identity services' counters, per target with `[target.identity]` (they restart from zero
/// when a reload rebuilds the service).
fn encode_identity(
    shared: &Shared,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let routes = shared.routes();
    let stats: Vec<_> = routes
        .targets()
        .iter()
        .filter_map(|t| Some((t.config.name.as_str(), t.identity.as_ref()?.service.stats())))
        .collect();
    if stats.is_empty() {
        return Ok(());
    }
    type Pick = fn(&crate::idp::Stats) -> u64;
    let families: [(&str, &str, Pick); 3] = [
        (
            "portcullis_identity_exchanges",
            "RFC 8693 exchanges the IdP answered with a token, per target.",
            |s| s.exchanges,
        ),
        (
            "portcullis_identity_cache_hits",
            "Connections and renewals answered from the identity cache, per target.",
            |s| s.cache_hits,
        ),
        (
            "portcullis_identity_jwks_fetches",
            "JWKS fetches from the IdP, per target.",
            |s| s.jwks_fetches,
        ),
    ];
    for (name, help, pick) in families {
        let mut m = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (target, s) in &stats {
            ConstCounter::new(pick(s)).encode(m.encode_family(&[("target", *target)])?)?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "portcullis_identity_failures",
        "Identities refused, per target and failed check (token_missing, expired, audience, \
         idp_unreachable, ...).",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (target, s) in &stats {
        for (reason, n) in &s.failures {
            ConstCounter::new(*n)
                .encode(m.encode_family(&[("target", *target), ("reason", *reason)])?)?;
        }
    }
    Ok(())
}

fn registry(shared: Arc<Shared>) -> Registry {
    let f = &*FAMILIES;
    let mut r = Registry::default();
    r.register(
        "portcullis_statements",
        "Requests decided by the policy, per target and verdict (allow, block, approve).",
        f.statements.clone(),
    );
    r.register(
        "portcullis_verdicts",
        "Policy verdicts per rule that decided and verdict.",
        f.verdicts.clone(),
    );
    r.register(
        "portcullis_errors",
        "ErrorResponses the gateway sent clients, per SQLSTATE class.",
        f.errors.clone(),
    );
    r.register(
        "portcullis_reloads",
        "Configuration reloads (SIGHUP), per result (ok, failed).",
        f.reloads.clone(),
    );
    r.register(
        "portcullis_statement_overhead_seconds",
        "Time the gateway adds to client requests before they go upstream.",
        f.overhead.clone(),
    );
    r.register(
        "portcullis_connect_seconds",
        "Time from accepting a client to an authenticated upstream session, per target.",
        f.connect.clone(),
    );
    r.register_collector(Box::new(Live {
        shared,
        shown: Mutex::default(),
    }));
    r
}

/// The `/metrics` listener; one thread, scrapes are answered one at a time.
pub struct Endpoint {
    pub addr: SocketAddr,
}

impl Endpoint {
    pub fn start(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<Endpoint> {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("binding [metrics] listen {addr}"))?;
        let addr = listener.local_addr()?;
        let registry = registry(shared);
        std::thread::Builder::new()
            .name("portcullis-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if let Err(e) = answer(conn, &registry) {
                        debug!("metrics request: {e}");
                    }
                }
            })?;
        info!(%addr, "serving Prometheus metrics at /metrics");
        Ok(Endpoint { addr })
    }
}

fn answer(mut conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    let (status, body) = loop {
        let n = conn.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break match (req.method, req.path) {
                    (Some("GET"), Some("/metrics")) => {
                        let mut text = String::new();
                        match prometheus_client::encoding::text::encode(&mut text, registry) {
                            Ok(()) => ("200 OK", text),
                            Err(_) => ("500 Internal Server Error", "encoding failed\n".into()),
                        }
                    }
                    (Some("GET"), _) => ("404 Not Found", "metrics are at /metrics\n".into()),
                    _ => ("405 Method Not Allowed", "GET /metrics\n".into()),
                };
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => break ("400 Bad Request", "bad request\n".into()),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::sqlstate_class;

    #[test]
    fn sqlstate_classes_stay_a_small_set() {
        assert_eq!(sqlstate_class("42501"), "42");
        assert_eq!(sqlstate_class("08P01"), "08");
        assert_eq!(sqlstate_class("é1"), "other");
        assert_eq!(sqlstate_class("4"), "other");
        assert_eq!(sqlstate_class(""), "other");
    }
}

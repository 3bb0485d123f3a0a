//! The session pipeline: one client connection through the stages, read top to bottom in `run`.
//!
//! accept (`accept.rs`) → identify (`identify.rs`) → frame (`protocol/`, driven by the protocol's
//! driver here, `postgres.rs`) → decide (`gate.rs` over `policy/`) → mask (`mask_filter.rs` over
//! `mask/`) → record (`record.rs` over `record/`) → forward (`forward/`). The pumps that carry a
//! session's traffic through those stages are protocol-neutral (`pump.rs`, generic over
//! [`pump::Driver`]). A new protocol adds its driver beside `postgres.rs` and a sans-IO core
//! under `protocol/`.

pub mod gate;
pub mod lineage;
pub mod mask_filter;
pub mod postgres;
pub mod pump;
pub mod record;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use compio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::daemon::Shared;
use crate::forward::conn::Stream;
use crate::forward::upstream::Login;
use crate::identify::{self, Identity, SessionIdentity};
use crate::idp::UpstreamRole;
use crate::metrics::{NewSession, PoolClose, SessionState};
use crate::protocol::Protocol;
use crate::protocol::core::Core;
use crate::protocol::postgres::session::Session;
use crate::route::Target;
use gate::PolicyGate;
use mask_filter::MaskFilter;
use postgres::Postgres;

pub async fn handle(tcp: TcpStream, identity: Identity, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let client = Rc::new(Stream::tcp_stream(tcp));
    let peer = identity.client_addr;
    if let Err(e) = run(client, identity, &shared).await {
        debug!(client = %peer, "session ended: {e:#}");
    }
}

/// The data path of one connection, in the order it meets the stages.
async fn run(client: Rc<Stream>, identity: Identity, shared: &Arc<Shared>) -> anyhow::Result<()> {
    // Route: the target the client dialled, and so the protocol it speaks. A connection with no
    // target still gets a refusal it can read, in the default protocol.
    let target = shared.route(identity.original_dst);
    let Protocol::Postgres = target
        .as_ref()
        .map_or_else(Protocol::default, |t| t.config.protocol);

    // Frame: the client's startup, in its protocol.
    let local_tls = target.as_ref().and_then(|t| t.local_tls.as_ref());
    let (client, startup) = postgres::client_startup(
        client,
        local_tls,
        shared,
        identity.client_addr,
        identity.original_dst,
    )
    .await?;
    let Some(startup) = startup else {
        return Ok(());
    };
    let Some(target) = target else {
        let why = format!("no target is configured for {}", identity.original_dst);
        postgres::refuse(&client, "08004", &why).await;
        anyhow::bail!("no route for {}", identity.original_dst);
    };

    // Identify: who the IdP says the session is, where the target asks, and so the upstream
    // login or role it gets.
    let mut startup = startup;
    let who = match &target.identity {
        Some(idp) => {
            match identify_session(&client, &mut startup, &identity, &idp.service, shared).await {
                Ok(who) => who,
                Err(e) => {
                    warn!(client = %identity.client_addr, target = %target.config.name, check = e.check(), "identity refused: {e}");
                    pump::refuse_error::<Postgres>(&client, &e).await;
                    anyhow::bail!("identity refused: {e}");
                }
            }
        }
        None => None,
    };
    let login = upstream_login(&target, who.as_ref());
    let guard = shared.registry.open(NewSession {
        client_addr: identity.client_addr,
        original_dst: identity.original_dst,
        target: target.config.name.clone(),
        upstream_user: login.user.to_owned(),
        database: target.config.upstream.database.clone(),
        peer: identity.peer.clone(),
        worker: crate::accept::current_worker(),
    });
    let info = guard.info.clone();
    if let Some(who) = &who {
        info.set_identity(who.verified.clone());
    }
    let _active = ActiveSession::open(&target);

    // Record: the session's recording begins before anything reaches the server, and a
    // session that cannot be recorded does not start.
    let recording = match record::begin(
        shared,
        &identity,
        who.as_ref().map(|w| &*w.verified),
        &target,
        login.set_role.unwrap_or(login.user),
    ) {
        Ok(r) => r,
        Err(e) => {
            pump::refuse_error::<Postgres>(&client, &e).await;
            anyhow::bail!("session refused: {e}");
        }
    };

    // Forward: the upstream leg (warm from the pool, or dialled), then the client's startup
    // answer.
    let (conn, pool_key, cancel_key) =
        match postgres::open_upstream(&client, &target, login, &startup, shared, &info).await {
            Ok(up) => up,
            Err(e) => {
                recording.borrow_mut().end("upstream connection failed");
                return Err(e);
            }
        };
    let (server, conn) = (Rc::new(conn.stream), conn.state);
    info.set_upstream(conn.backend_pid, conn.reused);
    info.set_state(SessionState::Idle);
    info!(
        session = info.id,
        client = %identity.client_addr,
        original_dst = %identity.original_dst,
        subject = who.as_ref().map_or("-", |w| w.verified.subject.as_str()),
        upstream_user = login.user,
        target = %target.config.name,
        agent = identity.peer.agent.as_deref().unwrap_or("-"),
        client_tls = client.is_tls(),
        tls = server.is_tls(),
        reused = conn.reused,
        recording = recording.borrow().id().unwrap_or(0),
        "session started"
    );

    // Decide and mask: the gate the core asks per request, the filter it runs per result.
    let generation = shared.policy_generation();
    // Lineage needs the catalog: read it (or take a fresh shared snapshot) on this session's own
    // upstream connection before the agent's first byte goes through.
    let masker = shared.masker();
    let key = (
        target.config.name.clone(),
        target.config.upstream.database.clone(),
        login.set_role.unwrap_or(login.user).to_owned(),
    );
    let freshness = lineage::Freshness::new(key.clone(), shared, &masker, generation);
    let lineage = lineage::session_lineage(shared, &server, &masker, &key, info.id).await;
    let filter = MaskFilter::new(masker, Some(lineage.clone()));
    let mut gate = PolicyGate::new(shared, info.id, &identity, &target, Some(lineage.clone()))
        .with_catalog(target.clone(), freshness);
    if let Some(who) = who.clone() {
        gate = gate.with_identity(who, info.clone());
    }
    let gate = record::RecordGate::new(gate, recording.clone());
    let tap = record::ResponseTap::new(recording.clone());

    // The pumps: both directions through the protocol core until one side ends.
    let core = Rc::new(RefCell::new(Session::new(shared.max_message())));
    core.borrow_mut().keep_statements();
    if target.config.pool.enabled {
        core.borrow_mut().keep_upstream();
    }
    // The upstream stays open until the client has been told how the session ended.
    let pumps = pump::pump::<Postgres>(
        client.clone(),
        server.clone(),
        core.clone(),
        startup.pending,
        info.clone(),
        gate,
        (filter, tap),
        (shared.clone(), generation),
    );
    let end = pumps.await;
    recording.borrow_mut().end(&pump::end_reason(&end));

    // The ending: counted, and told to the client in its protocol.
    info.set_state(SessionState::Closing);
    count_session(&target, &core.borrow(), info.id);
    pump::report_end::<Postgres>(&client, &end, &target, &info).await;

    // Pool: a session that ended at rest leaves its connection, reset, for the next. Its cancel
    // key goes first, and a cancel still being forwarded keeps the connection out of the pool,
    // so that no cancel of this session can reach the next one's statement.
    let no_cancel_pending = cancel_key.retire();
    let clean = no_cancel_pending
        && matches!(
            end,
            Ok(pump::End::ClientClosed | pump::End::Terminated | pump::End::Idle(_))
        );
    let (at_rest, tx_status) = {
        let c = core.borrow();
        (c.at_rest(), c.transaction_status())
    };
    let pooled = target.config.pool.enabled;
    let reusable = clean && at_rest;
    if pooled && !reusable {
        target.counters.pool.closed(PoolClose::NotAtRest, 1);
    }
    if pooled
        && reusable
        && let Ok(stream) = Rc::try_unwrap(server)
    {
        drop(client);
        let now = shared.routes();
        let current = now.target(&target.config.name);
        let conn = crate::forward::pool::Conn {
            stream,
            state: conn,
        };
        let max_message = shared.max_message();
        crate::forward::pool::release(
            conn,
            pool_key,
            current.map(|t| &**t),
            &target.counters,
            tx_status,
            max_message,
        )
        .await;
    }
    Ok(())
}

/// The session's identity, from its agent's token file or the token it sends as its password
/// (asked for only where the client leg may carry one), or both: a person's token as the password
/// and the agent's file as the actor, where the target takes delegation.
async fn identify_session(
    client: &Stream,
    startup: &mut postgres::Startup,
    identity: &Identity,
    service: &crate::idp::IdentityService,
    shared: &Shared,
) -> Result<Option<SessionIdentity>, crate::idp::IdentityError> {
    let config = shared.config();
    let agents = shared.token_files.with_configured(&config.agents);
    let agent = identity.peer.agent.as_deref();
    let leg_ok = identify::leg_may_carry_password(identity.client_addr, client.is_tls());
    // An agent with a token file is asked for a password only where the target takes a
    // person's token from it (delegation).
    let has_file = identify::token_file(&agents, agent).is_some();
    let presented = if leg_ok && (!has_file || service.settings().delegation) {
        let pending = &mut startup.pending;
        Some(postgres::ask_password(client, pending, config.startup_timeout).await?)
    } else {
        None
    };
    identify::at_connect(service, &agents, agent, presented, leg_ok).await
}

/// Who the gateway logs in as upstream: the target's own login, or the identity's mapped role.
pub(crate) fn upstream_login<'a>(
    target: &'a Target,
    who: Option<&'a SessionIdentity>,
) -> Login<'a> {
    let mut login = Login::of(target);
    match who.map(|w| &w.role) {
        None | Some(UpstreamRole::TargetLogin) => {}
        Some(UpstreamRole::SetRole(role)) => login.set_role = Some(role),
        Some(UpstreamRole::Login { user, .. }) => {
            login.user = user;
            login.password = target
                .identity
                .as_ref()
                .and_then(|i| i.role_passwords.get(user))
                .map(|s| s.expose());
        }
    }
    login
}

/// Adds a finished session's traffic to its target's counters and logs it.
fn count_session(target: &Target, core: &Session, session: u64) {
    let (queries, blocked) = (core.queries, core.blocked);
    let (bytes_in, bytes_out) = (core.from_client.bytes, core.from_server.bytes);
    let counters = &target.counters;
    counters.queries.fetch_add(queries, Relaxed);
    counters.blocked.fetch_add(blocked, Relaxed);
    counters.bytes_in.fetch_add(bytes_in, Relaxed);
    counters.bytes_out.fetch_add(bytes_out, Relaxed);
    info!(
        session,
        queries, blocked, bytes_in, bytes_out, "session ended"
    );
}

/// Counts a session as active on its target for as long as it lives.
struct ActiveSession<'a>(&'a Target);

impl<'a> ActiveSession<'a> {
    fn open(target: &'a Target) -> Self {
        target.counters.sessions_total.fetch_add(1, Relaxed);
        target.counters.sessions_active.fetch_add(1, Relaxed);
        ActiveSession(target)
    }
}

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.counters.sessions_active.fetch_sub(1, Relaxed);
    }
}

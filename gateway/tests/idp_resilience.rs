//! The IdP changes under the gateway: keys rotate, the IdP dies and comes back. The gateway keeps
//! what it verified until it expires, refuses what it cannot verify, and recovers.

use std::time::Duration;

use serde_json::json;

use portcullis::idp::config::TargetIdentity;
use portcullis::idp::{IdentityService, Token, TokenSource};
use testkit::idp::Idp;

const AUDIENCE: &str = "pg-orders";

fn service(idp: &Idp, mode_lines: &str) -> IdentityService {
    let cfg: TargetIdentity = toml::from_str(&format!(
        "issuer = {:?}\naudience = {AUDIENCE:?}\ntimeout = \"10s\"\n{mode_lines}",
        idp.issuer()
    ))
    .unwrap();
    IdentityService::start(cfg).unwrap()
}

fn exchange_lines(idp: &Idp) -> String {
    format!(
        "client_id = \"portcullis\"\nclient_secret_file = {:?}\n",
        idp.client_secret_file()
    )
}

fn presented(t: &str) -> TokenSource {
    TokenSource::Presented(Token::new(t.to_owned()))
}

fn jwks_fetches(idp: &Idp) -> u64 {
    idp.stats().unwrap()["jwks"].as_u64().unwrap()
}

#[tokio::test]
async fn a_rotated_signing_key_is_picked_up_by_its_new_kid() {
    let idp = Idp::start().unwrap();
    let s = service(
        &idp,
        &format!("{}jwks_min_refresh = \"1s\"\n", exchange_lines(&idp)),
    );
    let alice = idp.mint("alice", &[], "portcullis").unwrap();
    s.identify(presented(&alice), None).await.unwrap();
    assert_eq!(jwks_fetches(&idp), 1);

    let kids = idp.rotate_keys(false).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    // The old subject token is signed by a key the IdP no longer has: its exchange refuses.
    let e = s.identify(presented(&alice), None).await;
    assert!(e.is_ok(), "alice's identity is cached: {e:?}");
    let bob = idp.mint("bob", &[], "portcullis").unwrap();
    let id = s.identify(presented(&bob), None).await.unwrap();
    assert_eq!(id.subject, "bob");
    assert_eq!(
        jwks_fetches(&idp),
        2,
        "one refresh for the new kid {kids:?}"
    );
}

#[tokio::test]
async fn unknown_kids_refresh_the_jwks_at_most_once_per_interval() {
    let idp = Idp::start().unwrap();
    let s = service(&idp, "mode = \"validate\"\njwks_min_refresh = \"60s\"\n");
    let good = idp
        .mint_with(json!({"claims": {"sub": "alice", "aud": AUDIENCE}}))
        .unwrap();
    s.identify(presented(&good), None).await.unwrap();
    assert_eq!(jwks_fetches(&idp), 1);
    // An agent spraying random kids cannot make the gateway hammer the IdP.
    for i in 0..20 {
        let t = idp
            .mint_with(json!({"header": {"kid": format!("spray-{i}")},
                              "claims": {"sub": "alice", "aud": AUDIENCE}}))
            .unwrap();
        assert_eq!(
            s.identify(presented(&t), None).await.unwrap_err().check(),
            "unknown_kid"
        );
    }
    assert_eq!(jwks_fetches(&idp), 1);
    // A rotation within the interval is not seen yet; the last good set still verifies old
    // tokens.
    idp.rotate_keys(true).unwrap();
    let fresh = idp
        .mint_with(json!({"claims": {"sub": "bob", "aud": AUDIENCE}}))
        .unwrap();
    assert_eq!(
        s.identify(presented(&fresh), None)
            .await
            .unwrap_err()
            .check(),
        "unknown_kid"
    );
    s.forget_all();
    assert_eq!(
        s.identify(presented(&good), None).await.unwrap().subject,
        "alice"
    );
}

#[tokio::test]
async fn when_the_idp_dies_cached_identities_last_new_ones_are_refused_and_it_recovers() {
    let idp = Idp::start().unwrap();
    let s = service(&idp, &exchange_lines(&idp));
    let alice = idp.mint("alice", &["dba"], "portcullis").unwrap();
    let bob = idp.mint("bob", &[], "portcullis").unwrap();
    s.identify(presented(&alice), None).await.unwrap();

    idp.kill();
    let started = std::time::Instant::now();
    let id = s.identify(presented(&alice), None).await.unwrap();
    assert_eq!(id.subject, "alice", "cached until shortly before expiry");
    let e = s.identify(presented(&bob), None).await.unwrap_err();
    assert_eq!(e.check(), "idp_unreachable", "{e}");
    assert_eq!(e.sqlstate(), "28000");
    assert!(e.to_string().contains("token endpoint"), "{e}");
    // A refused connection is answered at once; only a hang (no timeout) would come near this.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "refused, not hung"
    );

    idp.restart().unwrap();
    assert_eq!(
        s.identify(presented(&bob), None).await.unwrap().subject,
        "bob"
    );
}

#[tokio::test]
async fn with_no_jwks_ever_loaded_every_token_is_refused() {
    let idp = Idp::start().unwrap();
    let s = service(&idp, "mode = \"validate\"\njwks_min_refresh = \"0s\"\n");
    let t = idp
        .mint_with(json!({"claims": {"sub": "alice", "aud": AUDIENCE}}))
        .unwrap();
    idp.kill();
    let e = s.identify(presented(&t), None).await.unwrap_err();
    assert_eq!(e.check(), "no_jwks", "{e}");
    assert_eq!(e.sqlstate(), "28000");
    assert!(e.to_string().contains("discovery"), "{e}");
    idp.restart().unwrap();
    assert_eq!(
        s.identify(presented(&t), None).await.unwrap().subject,
        "alice"
    );
}

#[tokio::test]
async fn a_gateway_started_while_the_idp_is_down_refuses_then_works() {
    let idp = Idp::start().unwrap();
    idp.kill();
    let s = service(&idp, &exchange_lines(&idp));
    let e = s.identify(presented("a.b.c"), None).await.unwrap_err();
    assert_eq!(e.check(), "idp_unreachable", "{e}");
    assert!(e.to_string().contains("discovery"), "{e}");
    idp.restart().unwrap();
    let alice = idp.mint("alice", &[], "portcullis").unwrap();
    assert_eq!(
        s.identify(presented(&alice), None).await.unwrap().subject,
        "alice"
    );
}

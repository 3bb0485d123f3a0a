//! RFC 8693 exchange against a real IdP (npm's oidc-provider, see testkit::idp): both client
//! authentication methods, delegation, the identity cache, token files.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use portcullis::idp::config::{ClientAuthMethod, IdentityMode, TargetIdentity};
use portcullis::idp::{IdentityError, IdentityService, Token, TokenSource};
use testkit::idp::Idp;

const AUDIENCE: &str = "pg-orders";

fn settings(idp: &Idp) -> TargetIdentity {
    let mut cfg: TargetIdentity = toml::from_str(&format!(
        "issuer = {:?}\naudience = {AUDIENCE:?}\nclient_id = \"portcullis\"\n\
         client_secret_file = {:?}\njwks_min_refresh = \"0s\"\n",
        idp.issuer(),
        idp.client_secret_file(),
    ))
    .unwrap();
    cfg.check().unwrap();
    cfg.mode = IdentityMode::Exchange;
    cfg
}

fn presented(token: &str) -> TokenSource {
    TokenSource::Presented(Token::new(token.to_owned()))
}

fn exchanges(idp: &Idp) -> u64 {
    idp.stats().unwrap()["exchanges"].as_u64().unwrap()
}

#[tokio::test]
async fn exchange_yields_subject_groups_and_a_short_token_bound_to_the_target() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    let subject = idp.mint("alice", &["dba", "oncall"], "portcullis").unwrap();
    let id = service.identify(presented(&subject), None).await.unwrap();
    assert_eq!(id.subject, "alice");
    assert_eq!(id.groups, ["dba", "oncall"]);
    assert_eq!(id.audience, AUDIENCE);
    assert_eq!(id.issuer, idp.issuer());
    assert!(id.actors.is_empty());
    assert!(id.jti.is_some());
    assert_eq!(id.client_id.as_deref(), Some("portcullis"));
    // The IdP's exchange issues two-minute tokens: the session is bounded by that, not by the
    // five-minute subject token.
    // (The lower bound only says the token is not already spent; a loaded machine may take a
    // while between the IdP's answer and this line.)
    let left = id.expires_at.duration_since(SystemTime::now()).unwrap();
    assert!(
        left <= Duration::from_secs(121) && left > Duration::from_secs(30),
        "{left:?}"
    );
    assert_eq!(exchanges(&idp), 1);
}

#[tokio::test]
async fn private_key_jwt_authenticates_the_gateway() {
    let idp = Idp::start().unwrap();
    let mut cfg = settings(&idp);
    cfg.client_id = Some("portcullis-jwt".into());
    cfg.client_auth = ClientAuthMethod::PrivateKeyJwt;
    cfg.client_secret_file = None;
    cfg.private_key_file = Some(idp.client_key_file());
    let service = IdentityService::start(cfg).unwrap();
    let subject = idp.mint("bob", &["analysts"], "portcullis").unwrap();
    let id = service.identify(presented(&subject), None).await.unwrap();
    assert_eq!(id.subject, "bob");
    assert_eq!(id.client_id.as_deref(), Some("portcullis-jwt"));
}

#[tokio::test]
async fn a_wrong_client_secret_is_the_gateway_s_fault_not_the_agent_s() {
    let idp = Idp::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = settings(&idp);
    cfg.client_secret_file =
        Some(testkit::write_secret(dir.path(), "secret", "not-the-secret").unwrap());
    let service = IdentityService::start(cfg).unwrap();
    let subject = idp.mint("alice", &[], "portcullis").unwrap();
    let e = service
        .identify(presented(&subject), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, IdentityError::ExchangeRefused { error, .. } if error == "invalid_client"),
        "{e}"
    );
    assert_eq!(e.sqlstate(), "28000");
}

#[tokio::test]
async fn the_idp_refuses_a_bad_subject_token_and_the_error_says_why() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    let expired = idp
        .mint_with(serde_json::json!({"claims": {"sub": "alice", "exp": 1_000_000}}))
        .unwrap();
    let e = service
        .identify(presented(&expired), None)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), "28P01", "{e}");
    assert!(e.to_string().contains("invalid_grant"), "{e}");
    assert!(e.to_string().contains("subject_token"), "{e}");
    assert!(!e.to_string().contains(&expired), "{e}");
    let e = service.identify(presented("  "), None).await.unwrap_err();
    assert_eq!(e.check(), "token_missing");
}

#[tokio::test]
async fn delegation_records_the_actor_chain() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    let person = idp.mint("alice", &["analysts"], "portcullis").unwrap();
    let agent = idp.mint("agent-7", &["agents"], "portcullis").unwrap();
    let id = service
        .identify(presented(&person), Some(presented(&agent)))
        .await
        .unwrap();
    assert_eq!(id.subject, "alice");
    assert_eq!(
        id.groups,
        ["analysts"],
        "groups are the person's, not the agent's"
    );
    assert_eq!(id.actors, ["agent-7"]);

    // A subject token that is itself delegated: the new actor goes first.
    let delegated = idp
        .mint_with(serde_json::json!({"claims": {
            "sub": "alice", "aud": "portcullis", "act": {"sub": "orchestrator"}
        }}))
        .unwrap();
    let id = service
        .identify(presented(&delegated), Some(presented(&agent)))
        .await
        .unwrap();
    assert_eq!(id.actors, ["agent-7", "orchestrator"]);

    // The same person without the agent is a different cache entry and a different identity.
    let id = service.identify(presented(&person), None).await.unwrap();
    assert!(id.actors.is_empty());
    assert_eq!(exchanges(&idp), 3);
}

#[tokio::test]
async fn exchanged_identities_are_cached_until_shortly_before_they_expire() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    // Two-minute tokens: cached for at least a minute and a half, far longer than this takes.
    let subject = idp.mint("alice", &[], "portcullis").unwrap();
    let first = service.identify(presented(&subject), None).await.unwrap();
    for _ in 0..5 {
        let again = service.identify(presented(&subject), None).await.unwrap();
        assert_eq!(again.jti, first.jti, "served from the cache");
    }
    assert_eq!(exchanges(&idp), 1);
    assert_eq!(service.stats().cache_hits, 5);
    // The actor is part of the key.
    let agent = idp.mint("agent-7", &[], "portcullis").unwrap();
    service
        .identify(presented(&subject), Some(presented(&agent)))
        .await
        .unwrap();
    assert_eq!(exchanges(&idp), 2);

    // Four-second tokens are kept three (a quarter of the lifetime is the margin): once three
    // seconds have certainly passed, the next connect exchanges again.
    idp.set_behaviour(serde_json::json!({"ttl": 4})).unwrap();
    let short = idp.mint("carol", &[], "portcullis").unwrap();
    let first = service.identify(presented(&short), None).await.unwrap();
    assert_eq!(exchanges(&idp), 3);
    std::thread::sleep(Duration::from_millis(3100));
    let renewed = service.identify(presented(&short), None).await.unwrap();
    assert_ne!(renewed.jti, first.jti, "exchanged again, not served stale");
    assert_eq!(exchanges(&idp), 4);
}

#[tokio::test]
async fn an_agent_token_file_is_read_at_every_connect() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("agent.token");
    let source = TokenSource::File(file.clone());

    let e = service.identify(source.clone(), None).await.unwrap_err();
    assert_eq!(e.check(), "token_missing");
    assert_eq!(e.sqlstate(), "28000");
    assert!(e.to_string().contains("agent.token"), "{e}");

    std::fs::write(
        &file,
        idp.mint("agent-a", &["agents"], "portcullis").unwrap() + "\n",
    )
    .unwrap();
    assert_eq!(
        service
            .identify(source.clone(), None)
            .await
            .unwrap()
            .subject,
        "agent-a"
    );
    // A workload-identity helper rotated the file: the next connect sees the new token.
    std::fs::write(
        &file,
        idp.mint("agent-b", &["agents"], "portcullis").unwrap(),
    )
    .unwrap();
    assert_eq!(
        service
            .identify(source.clone(), None)
            .await
            .unwrap()
            .subject,
        "agent-b"
    );
    // Removed: refused, even though an identity for the old content is cached.
    std::fs::remove_file(&file).unwrap();
    let e = service.identify(source, None).await.unwrap_err();
    assert_eq!(e.check(), "token_missing");
}

#[tokio::test]
async fn concurrent_connects_all_get_an_answer() {
    let idp = Idp::start().unwrap();
    let service = IdentityService::start(settings(&idp)).unwrap();
    let tokens: Vec<String> = (0..12)
        .map(|i| idp.mint(&format!("user-{i}"), &[], "portcullis").unwrap())
        .collect();
    let answers =
        futures_util::future::join_all(tokens.iter().map(|t| service.identify(presented(t), None)))
            .await;
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a.unwrap().subject, format!("user-{i}"));
    }
}

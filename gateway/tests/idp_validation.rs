//! Strict validation against a real IdP's JWKS: what an agent might present to get around the
//! identity check, each refused with the check it failed.

use serde_json::json;

use portcullis::idp::config::TargetIdentity;
use portcullis::idp::{IdentityError, IdentityService, Token, TokenSource};
use testkit::idp::Idp;

const AUDIENCE: &str = "pg-orders";

fn validate_mode(idp: &Idp, extra: &str) -> IdentityService {
    let cfg: TargetIdentity = toml::from_str(&format!(
        "issuer = {:?}\naudience = {AUDIENCE:?}\nmode = \"validate\"\n{extra}",
        idp.issuer()
    ))
    .unwrap();
    IdentityService::start(cfg).unwrap()
}

fn exchange_mode(idp: &Idp) -> IdentityService {
    let cfg: TargetIdentity = toml::from_str(&format!(
        "issuer = {:?}\naudience = {AUDIENCE:?}\nclient_id = \"portcullis\"\n\
         client_secret_file = {:?}\n",
        idp.issuer(),
        idp.client_secret_file()
    ))
    .unwrap();
    IdentityService::start(cfg).unwrap()
}

async fn check(service: &IdentityService, token: &str) -> Result<String, IdentityError> {
    service
        .identify(TokenSource::Presented(Token::new(token.into())), None)
        .await
        .map(|id| id.subject.clone())
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({"sub": "alice", "aud": AUDIENCE, "groups": ["dba"]});
    c.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    c
}

#[tokio::test]
async fn a_valid_token_passes_with_rs256_and_es256() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "");
    for alg in ["RS256", "ES256"] {
        let t = idp
            .mint_with(json!({"alg": alg, "claims": claims(json!({}))}))
            .unwrap();
        assert_eq!(check(&service, &t).await.unwrap(), "alice", "{alg}");
    }
}

#[tokio::test]
async fn alg_none_and_hs256_keyed_with_the_public_key_are_refused() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "");
    for alg in ["none", "HS256-public-key"] {
        let t = idp
            .mint_with(json!({"alg": alg, "claims": claims(json!({}))}))
            .unwrap();
        let e = check(&service, &t).await.unwrap_err();
        assert_eq!(e.check(), "algorithm", "{alg}: {e}");
        assert_eq!(e.sqlstate(), "28P01");
    }
    // HS256 with an RSA kid but the header claiming RS256 in the JWK: still refused, by family.
    let t = idp
        .mint_with(
            json!({"alg": "HS256-public-key", "header": {"alg": "RS256"},
                          "claims": claims(json!({}))}),
        )
        .unwrap();
    assert_eq!(check(&service, &t).await.unwrap_err().check(), "signature");
}

#[tokio::test]
async fn tampered_claims_break_the_signature() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "");
    let t = idp.mint_with(json!({"claims": claims(json!({}))})).unwrap();
    let other = idp
        .mint_with(json!({"claims": claims(json!({"sub": "root", "groups": ["superuser"]}))}))
        .unwrap();
    let mut parts: Vec<&str> = t.split('.').collect();
    parts[1] = other.split('.').nth(1).unwrap();
    let e = check(&service, &parts.join(".")).await.unwrap_err();
    assert_eq!(e.check(), "signature", "{e}");
}

#[tokio::test]
async fn wrong_audience_or_issuer_is_refused() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "");
    let t = idp
        .mint_with(json!({"claims": claims(json!({"aud": ["pg-billing"]}))}))
        .unwrap();
    let e = check(&service, &t).await.unwrap_err();
    assert_eq!(e.check(), "audience");
    assert!(e.to_string().contains(AUDIENCE), "{e}");
    let t = idp
        .mint_with(json!({"claims": claims(json!({"iss": format!("{}/", idp.issuer())}))}))
        .unwrap();
    assert_eq!(check(&service, &t).await.unwrap_err().check(), "issuer");

    // The same checks apply to what the IdP's exchange returns.
    let service = exchange_mode(&idp);
    let subject = idp.mint("alice", &[], "portcullis").unwrap();
    idp.set_behaviour(json!({"aud": "pg-billing"})).unwrap();
    let e = check(&service, &subject).await.unwrap_err();
    assert_eq!(e.check(), "audience", "{e}");
    idp.set_behaviour(json!({"aud": null, "iss": "https://evil.example"}))
        .unwrap();
    assert_eq!(
        check(&service, &subject).await.unwrap_err().check(),
        "issuer"
    );
    idp.set_behaviour(json!({"iss": null})).unwrap();
    assert_eq!(check(&service, &subject).await.unwrap(), "alice");
}

#[tokio::test]
async fn expired_not_yet_valid_and_future_tokens_are_refused() {
    let idp = Idp::start().unwrap();
    // Offsets far beyond the leeway, and a within-leeway case far inside it: a slow machine
    // cannot move a case across the line.
    let service = validate_mode(&idp, "leeway = \"60s\"\n");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let cases = [
        (json!({"exp": now - 600}), "expired"),
        (json!({"nbf": now + 600}), "nbf"),
        (json!({"iat": now + 600}), "iat"),
        (json!({"exp": null}), "claim"),
        (json!({"sub": null}), "claim"),
        (json!({"aud": null}), "claim"),
    ];
    for (extra, expected) in cases {
        let t = idp
            .mint_with(json!({"claims": claims(extra.clone())}))
            .unwrap();
        let e = check(&service, &t).await.unwrap_err();
        assert_eq!(e.check(), expected, "{extra}: {e}");
    }
    // Within the leeway: accepted.
    let t = idp
        .mint_with(json!({"claims": claims(json!({"exp": now - 5}))}))
        .unwrap();
    assert!(check(&service, &t).await.is_ok());
}

#[tokio::test]
async fn unknown_critical_headers_and_unknown_keys_are_refused() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "jwks_min_refresh = \"0s\"\n");
    let t = idp
        .mint_with(json!({"header": {"crit": ["exp"], "exp": 1}, "claims": claims(json!({}))}))
        .unwrap();
    assert_eq!(check(&service, &t).await.unwrap_err().check(), "crit");
    let t = idp
        .mint_with(json!({"header": {"kid": "not-a-key"}, "claims": claims(json!({}))}))
        .unwrap();
    let e = check(&service, &t).await.unwrap_err();
    assert_eq!(e.check(), "unknown_kid", "{e}");
    assert!(e.to_string().contains("not-a-key"), "{e}");
}

#[tokio::test]
async fn the_groups_claim_is_configurable() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "groups_claim = \"roles\"\n");
    let t = idp
        .mint_with(json!({"claims": claims(json!({"roles": ["reporting"]}))}))
        .unwrap();
    let id = service
        .identify(TokenSource::Presented(Token::new(t)), None)
        .await
        .unwrap();
    assert_eq!(id.groups, ["reporting"], "from `roles`, not `groups`");
}

#[tokio::test]
async fn validate_mode_delegation_takes_the_actor_from_the_actor_token() {
    let idp = Idp::start().unwrap();
    let service = validate_mode(&idp, "");
    let person = idp.mint_with(json!({"claims": claims(json!({}))})).unwrap();
    let agent = idp
        .mint_with(json!({"claims": claims(json!({"sub": "agent-7"}))}))
        .unwrap();
    let id = service
        .identify(
            TokenSource::Presented(Token::new(person)),
            Some(TokenSource::Presented(Token::new(agent))),
        )
        .await
        .unwrap();
    assert_eq!(
        (id.subject.as_str(), id.actors.as_slice()),
        ("alice", &["agent-7".to_string()][..])
    );
}

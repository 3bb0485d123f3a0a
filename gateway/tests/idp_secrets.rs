//! Tokens and the client secret never reach a log line, an error or a Debug dump: every path of
//! the identity service runs at TRACE (with the `log` bridge, so ureq's own logging is included)
//! and the output is searched for a canary token and the secret.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;

use portcullis::idp::config::TargetIdentity;
use portcullis::idp::{IdentityService, Token, TokenSource};
use testkit::idp::Idp;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_or_secret_in_any_log_error_or_debug_output() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .try_init()
        .unwrap();

    let idp = Idp::start().unwrap();
    let cfg: TargetIdentity = toml::from_str(&format!(
        "issuer = {:?}\naudience = \"pg-orders\"\nclient_id = \"portcullis\"\n\
         client_secret_file = {:?}\njwks_min_refresh = \"0s\"\ntimeout = \"10s\"\n",
        idp.issuer(),
        idp.client_secret_file()
    ))
    .unwrap();
    let service = IdentityService::start(cfg.clone()).unwrap();
    // A token whose claims carry a recognisable canary, so a decoded dump is caught too.
    let canary = idp
        .mint_with(json!({"claims": {"sub": "alice", "aud": "portcullis",
                                     "note": "CANARY-7f3e"}}))
        .unwrap();
    let agent = idp.mint("agent-7", &[], "portcullis").unwrap();
    let expired = idp
        .mint_with(json!({"claims": {"sub": "alice", "exp": 1, "note": "CANARY-7f3e"}}))
        .unwrap();
    let mut shown = Vec::new();
    let presented = |t: &str| TokenSource::Presented(Token::new(t.to_owned()));

    let mut run = |result: Result<Arc<portcullis::idp::VerifiedIdentity>, _>| match result {
        Ok(id) => shown.push(format!("{id:?}")),
        Err(e) => shown.push(format!("{e} / {e:?}")),
    };
    run(service.identify(presented(&canary), None).await);
    run(service
        .identify(presented(&canary), Some(presented(&agent)))
        .await);
    run(service.identify(presented(&expired), None).await);
    run(service
        .identify(presented(&format!("{canary}x")), None)
        .await);
    idp.set_behaviour(json!({"aud": "elsewhere"})).unwrap();
    run(service.identify(presented(&agent), None).await);
    idp.set_behaviour(json!({"aud": null})).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, &canary).unwrap();
    run(service
        .identify(TokenSource::File(file.clone()), None)
        .await);
    std::fs::write(&file, format!("{canary}\0garbage")).unwrap();
    run(service.identify(TokenSource::File(file), None).await);
    // A wrong secret, then the IdP gone.
    let mut wrong = cfg.clone();
    wrong.client_secret_file =
        Some(testkit::write_secret(dir.path(), "s", "CANARY-secret-2").unwrap());
    let wrong = IdentityService::start(wrong).unwrap();
    run(wrong.identify(presented(&canary), None).await);
    idp.kill();
    let fresh = IdentityService::start(cfg.clone()).unwrap();
    run(fresh.identify(presented(&canary), None).await);
    shown.push(format!("{cfg:?}"));
    shown.push(format!("{:?}", Token::new(canary.clone())));
    shown.push(format!("{:?}", presented(&canary)));

    let mut all = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    all.push_str(&shown.join("\n"));
    assert!(
        all.contains("identity refused"),
        "the failures were logged:\n{all}"
    );
    assert!(all.contains("alice"), "subjects may be shown:\n{all}");
    for secret in [
        canary.as_str(),
        agent.as_str(),
        expired.as_str(),
        idp.client_secret(),
        "CANARY-7f3e",
        "CANARY-secret-2",
        // The middle of a token, in case something logs a slice of one.
        &canary[canary.len() / 2..canary.len() / 2 + 24],
        canary.split('.').nth(1).unwrap(),
        canary.split('.').nth(2).unwrap(),
    ] {
        assert!(
            !all.contains(secret),
            "secret material found in output:\n{all}"
        );
    }
}

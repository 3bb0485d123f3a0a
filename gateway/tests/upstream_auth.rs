//! `UpstreamAuth` against a real PostgreSQL for every method the gateway supports: a tiny
//! blocking client (here in the test only) writes the StartupMessage, feeds each backend message
//! to the sans-IO state machine, sends what it produces, and then proves the session works by
//! asking the server who it is.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use portcullis::protocol::postgres::auth::{
    AuthError, AuthStep, ChannelBinding, PasswordChannel, UpstreamAuth, tls_server_end_point,
};
use portcullis::protocol::postgres::messages::{
    encode_query, encode_terminate, parse_error_fields,
};
use portcullis::protocol::postgres::startup::{encode_ssl_request, encode_startup};
use rustls::pki_types::{CertificateDer, ServerName};
use testkit::{HbaAuth, Postgres, ServerTls};

/// One backend message, framed by hand: type byte, Int32 length including itself, body.
fn read_message(s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).expect("read message header");
    let len = i32::from_be_bytes(header[1..5].try_into().unwrap());
    assert!(
        (4..1 << 20).contains(&len),
        "implausible length {len} for message {:?}",
        header[0] as char
    );
    let mut body = vec![0; len as usize - 4];
    s.read_exact(&mut body).expect("read message body");
    (header[0], body)
}

/// What a successful login looked like.
#[derive(Debug)]
struct Session {
    method: Option<&'static str>,
    negotiated_minor: Option<u16>,
    current_user: String,
}

/// Logs in as `pg.user` over `stream`, asking for protocol 3.`minor`, then runs
/// `SELECT current_user`.
fn login<S: Read + Write>(
    stream: &mut S,
    pg: &Postgres,
    minor: u16,
    password: Option<&str>,
    binding: ChannelBinding,
) -> Result<Session, AuthError> {
    let mut out = Vec::new();
    encode_startup(
        3,
        minor,
        &[("user", &pg.user), ("database", &pg.database)],
        &mut out,
    );
    stream.write_all(&out).unwrap();

    // Loopback: the driver would count it protected too.
    let mut auth = UpstreamAuth::new(&pg.user, password.map(str::as_bytes), binding)
        .on_channel(PasswordChannel::Protected);
    let mut negotiated_minor = None;
    loop {
        let (tag, body) = read_message(stream);
        out.clear();
        match auth.on_message(tag, &body, &mut out)? {
            AuthStep::Continue => stream.write_all(&out).unwrap(),
            AuthStep::Negotiated { minor } => negotiated_minor = Some(minor),
            AuthStep::Authenticated => break,
        }
    }
    // ParameterStatus and BackendKeyData until ReadyForQuery.
    while read_message(stream).0 != b'Z' {}

    out.clear();
    encode_query("SELECT current_user", &mut out);
    stream.write_all(&out).unwrap();
    let mut current_user = None;
    loop {
        match read_message(stream) {
            (b'D', row) => {
                // Int16 column count, then Int32 length and the value.
                assert_eq!(&row[..2], &[0, 1]);
                current_user = Some(String::from_utf8(row[6..].to_vec()).unwrap());
            }
            (b'E', body) => panic!("query failed: {:?}", parse_error_fields(&body)),
            (b'Z', _) => break,
            _ => {}
        }
    }
    out.clear();
    encode_terminate(&mut out);
    stream.write_all(&out).unwrap();
    Ok(Session {
        method: auth.method(),
        negotiated_minor,
        current_user: current_user.expect("a row from SELECT current_user"),
    })
}

fn tcp(pg: &Postgres) -> TcpStream {
    let s = TcpStream::connect(pg.addr()).expect("connect to PostgreSQL");
    // A safety net so a protocol bug fails the test instead of hanging it; not a timing assertion.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Logs in with the right password, then with a wrong one, which must fail with 28P01 and a
/// message that names the failure but never either password.
fn right_then_wrong_password(auth: HbaAuth, method: &str) {
    let pg = Postgres::builder()
        .auth(auth)
        .start()
        .expect("start PostgreSQL");
    let s = login(
        &mut tcp(&pg),
        &pg,
        0,
        Some(&pg.password),
        ChannelBinding::None,
    )
    .expect("login with the right password");
    assert_eq!(s.method, Some(method));
    assert_eq!(s.current_user, "app");
    assert_eq!(s.negotiated_minor, None);

    let wrong = format!("{}-wrong", pg.password);
    let err = login(&mut tcp(&pg), &pg, 0, Some(&wrong), ChannelBinding::None).unwrap_err();
    match &err {
        AuthError::Server {
            severity,
            code,
            message,
            ..
        } => {
            assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "28P01"));
            assert!(
                message.contains("password authentication failed"),
                "{message}"
            );
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(err.sqlstate(), "28P01");
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(&pg.password),
        "error shows the password: {shown}"
    );
}

#[test]
fn scram_sha_256() {
    right_then_wrong_password(HbaAuth::Scram, "SCRAM-SHA-256");
}

#[test]
fn md5() {
    right_then_wrong_password(HbaAuth::Md5, "md5");
}

#[test]
fn cleartext_password() {
    right_then_wrong_password(HbaAuth::Password, "password");
}

#[test]
fn trust_needs_no_password() {
    let pg = Postgres::builder()
        .auth(HbaAuth::Trust)
        .start()
        .expect("start PostgreSQL");
    let s = login(&mut tcp(&pg), &pg, 0, None, ChannelBinding::None).expect("trust login");
    assert_eq!(s.method, Some("trust"));
    assert_eq!(s.current_user, "app");
}

#[test]
fn missing_password_is_a_clear_error() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let err = login(&mut tcp(&pg), &pg, 0, None, ChannelBinding::None).unwrap_err();
    assert_eq!(
        err,
        AuthError::NoPassword {
            method: "SCRAM-SHA-256"
        }
    );
}

/// PostgreSQL 15 speaks only 3.0: asked for 3.2 it answers NegotiateProtocolVersion, and
/// authentication carries on.
#[test]
fn protocol_3_2_request_is_negotiated_down() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let s = login(
        &mut tcp(&pg),
        &pg,
        2,
        Some(&pg.password),
        ChannelBinding::None,
    )
    .expect("login asking for 3.2");
    assert_eq!(s.negotiated_minor, Some(0));
    assert_eq!(s.method, Some("SCRAM-SHA-256"));
}

/// A CA with the given key algorithm, and a `localhost` server certificate it signed (so the
/// server certificate's signature algorithm is the CA's).
fn pki(alg: &'static rcgen::SignatureAlgorithm) -> (CertificateDer<'static>, ServerTls) {
    let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (
        ca.der().clone(),
        ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            require: true,
        },
    )
}

/// SSLRequest, then a rustls session that trusts only `ca`.
fn tls(
    pg: &Postgres,
    ca: CertificateDer<'static>,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut tcp = tcp(pg);
    let mut out = Vec::new();
    encode_ssl_request(&mut out);
    tcp.write_all(&out).unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], b'S', "server refused TLS");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake");
    }
    stream
}

fn peer_end_point(stream: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> Vec<u8> {
    let cert = &stream.conn.peer_certificates().expect("server certificate")[0];
    tls_server_end_point(cert).expect("channel binding hash for the server certificate")
}

/// SCRAM-SHA-256-PLUS over TLS, for a certificate signed with SHA-256 and one with SHA-384 (the
/// binding hash must follow the signature algorithm, or PostgreSQL refuses it). A wrong binding
/// hash is refused by the server, which shows the binding really is checked.
#[test]
fn scram_sha_256_plus_channel_binding() {
    for (alg, hash_len) in [
        (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
        (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
    ] {
        let (ca, server_tls) = pki(alg);
        let pg = Postgres::builder()
            .tls(server_tls)
            .start()
            .expect("start PostgreSQL with TLS");

        let mut stream = tls(&pg, ca.clone());
        let hash = peer_end_point(&stream);
        assert_eq!(hash.len(), hash_len);
        let s = login(
            &mut stream,
            &pg,
            0,
            Some(&pg.password),
            ChannelBinding::TlsServerEndPoint(hash.clone()),
        )
        .expect("SCRAM-SHA-256-PLUS login");
        assert_eq!(s.method, Some("SCRAM-SHA-256-PLUS"));
        assert_eq!(s.current_user, "app");

        // Without binding data the gateway falls back to SCRAM-SHA-256 ("n" flag).
        let mut stream = tls(&pg, ca.clone());
        let s = login(
            &mut stream,
            &pg,
            0,
            Some(&pg.password),
            ChannelBinding::None,
        )
        .expect("SCRAM-SHA-256 over TLS");
        assert_eq!(s.method, Some("SCRAM-SHA-256"));

        let mut stream = tls(&pg, ca);
        let mut forged = hash;
        forged[0] ^= 0xff;
        let err = login(
            &mut stream,
            &pg,
            0,
            Some(&pg.password),
            ChannelBinding::TlsServerEndPoint(forged),
        )
        .unwrap_err();
        assert!(
            matches!(&err, AuthError::Server { code, .. } if code.starts_with("28")),
            "{err:?}"
        );
    }
}

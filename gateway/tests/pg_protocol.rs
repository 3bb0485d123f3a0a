//! The startup phase on the raw wire: SSLRequest and GSSENCRequest on the loopback leg,
//! protocol 3.2, unsupported versions, a PostgreSQL 17 direct-TLS ClientHello, and a cancel
//! with the key of a 3.2 session.

use std::time::Duration;

use testkit::Harness;
use testkit::wire::{self, Message, RawConn};

fn harness() -> Harness {
    let h = Harness::start().expect("start PostgreSQL (and the gateway unless direct)");
    h.must(h.sanity(), "direct sanity check");
    h
}

/// `SELECT 1` on a connection that completed startup.
fn assert_select_1(h: &Harness, conn: &mut RawConn) {
    let msgs = h.must(conn.simple_query("SELECT 1"), "SELECT 1");
    assert_eq!(
        RawConn::first_column(&msgs),
        vec![Some("1".to_string())],
        "{:?}\n{}",
        msgs.iter().map(Message::describe).collect::<Vec<_>>(),
        h.context()
    );
}

#[test]
fn ssl_request_refused_then_plaintext_startup() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    conn.send(&wire::request_code(wire::SSL_REQUEST_CODE))
        .unwrap();
    let answer = h.must(conn.read_byte(), "answer to SSLRequest");
    assert_eq!(
        answer,
        Some(b'N'),
        "the loopback leg refuses TLS with 'N'\n{}",
        h.context()
    );
    h.must(
        conn.startup(&ep, wire::PROTOCOL_3_0),
        "startup after a refused SSLRequest",
    );
    assert_select_1(&h, &mut conn);
}

#[test]
fn psql_sslmode_on_the_loopback_leg() {
    let h = harness();
    let mut prefer = h.endpoint();
    prefer.params = vec![("sslmode".into(), "prefer".into())];
    let out = h.must(
        prefer.psql(h.bindir(), "SELECT 'plain'"),
        "psql sslmode=prefer",
    );
    assert!(
        out.success && out.stdout.trim() == "plain",
        "sslmode=prefer falls back to plaintext: {}\n{}",
        out.stderr,
        h.context()
    );

    let mut require = h.endpoint();
    require.params = vec![("sslmode".into(), "require".into())];
    let out = h.must(require.psql(h.bindir(), "SELECT 1"), "psql sslmode=require");
    assert!(!out.success, "sslmode=require must fail: no TLS offered");
    assert!(
        out.stderr.contains("server does not support SSL"),
        "libpq's clear refusal: {}\n{}",
        out.stderr,
        h.context()
    );
}

#[test]
fn gssenc_request_refused_then_plaintext_startup() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    conn.send(&wire::request_code(wire::GSSENC_REQUEST_CODE))
        .unwrap();
    let answer = h.must(conn.read_byte(), "answer to GSSENCRequest");
    if h.is_direct() && answer == Some(b'G') {
        eprintln!(
            "direct: this PostgreSQL offers GSS encryption ('G'); the gateway must answer 'N'"
        );
        return;
    }
    assert_eq!(answer, Some(b'N'), "GSSENCRequest refused\n{}", h.context());
    h.must(
        conn.startup(&ep, wire::PROTOCOL_3_0),
        "startup after a refused GSSENCRequest",
    );
    assert_select_1(&h, &mut conn);

    // Both requests in a row, as libpq does with gssencmode=prefer and sslmode=prefer.
    let mut conn = h.must(RawConn::to(&ep), "connect");
    conn.send(&wire::request_code(wire::GSSENC_REQUEST_CODE))
        .unwrap();
    assert_eq!(h.must(conn.read_byte(), "GSS answer"), Some(b'N'));
    conn.send(&wire::request_code(wire::SSL_REQUEST_CODE))
        .unwrap();
    assert_eq!(h.must(conn.read_byte(), "SSL answer"), Some(b'N'));
    h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
    assert_select_1(&h, &mut conn);
}

/// A client asking for protocol 3.2 gets a working session: either 3.2 itself or a
/// NegotiateProtocolVersion down to what the server speaks. Its cancel key, whatever its length,
/// cancels its query.
#[test]
fn protocol_3_2_startup_and_cancel() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    h.must(conn.startup(&ep, wire::PROTOCOL_3_2), "3.2 startup");
    if let Some(v) = &conn.negotiated {
        let minor = u32::from_be_bytes(v.body[..4].try_into().unwrap());
        assert!(
            minor == 196608 || minor == 196609,
            "NegotiateProtocolVersion offers {minor:#x}"
        );
    }
    let (pid, key) = conn.backend_key.clone().expect("BackendKeyData");
    assert!(
        (4..=256).contains(&key.len()),
        "cancel key length {}",
        key.len()
    );
    assert!(
        conn.parameters.contains_key("server_version"),
        "ParameterStatus server_version: {:?}",
        conn.parameters
    );
    assert_select_1(&h, &mut conn);

    conn.send(&wire::query("SELECT pg_sleep(60)")).unwrap();
    h.must(
        h.pg.wait_active("pg_sleep(60)", Duration::from_secs(20)),
        "sleep running",
    );
    let mut cancel = h.must(RawConn::to(&ep), "cancel connection");
    cancel.send(&wire::cancel_request(pid, &key)).unwrap();
    let msgs = h.must(conn.read_until_ready(), "the cancelled query ends");
    let states: Vec<Option<String>> = msgs.iter().map(Message::sqlstate).collect();
    assert!(
        states.contains(&Some("57014".to_string())),
        "query_canceled expected: {:?}\n{}",
        msgs.iter().map(Message::describe).collect::<Vec<_>>(),
        h.context()
    );
    assert_select_1(&h, &mut conn);
}

#[test]
fn unsupported_protocol_version_gets_an_error() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    conn.send(&wire::startup_message(
        4 << 16,
        &[("user", "agent"), ("database", "app")],
    ))
    .unwrap();
    let msgs = h.must(conn.read_until_closed(), "answer to protocol 4.0");
    let err = msgs.iter().find(|m| m.is_error()).unwrap_or_else(|| {
        panic!(
            "no ErrorResponse for protocol 4.0: {msgs:?}\n{}",
            h.context()
        )
    });
    let code = err.sqlstate().unwrap_or_default();
    assert!(
        code == "0A000" || code == "08P01",
        "feature_not_supported or protocol_violation: {}",
        err.describe()
    );
    assert_eq!(err.fields().get(&b'S').map(String::as_str), Some("FATAL"));
}

/// PostgreSQL 17 clients may open with a TLS ClientHello (sslnegotiation=direct). With no TLS
/// on the loopback leg, that is refused promptly rather than read as a length.
#[test]
fn direct_tls_client_hello_is_refused() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    // A TLS 1.2 record header for a ClientHello, then the start of the handshake body.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xf0, 0x01, 0x00, 0x00, 0xec, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0x42; 32]);
    conn.send(&hello).unwrap();
    let msgs = h.must(conn.read_until_closed(), "answer to a ClientHello");
    for m in &msgs {
        assert!(
            m.is_error(),
            "only an ErrorResponse may answer a refused ClientHello: {m:?}"
        );
    }
    // Others are unaffected.
    let mut other = h.must(RawConn::to(&ep), "connect");
    h.must(other.startup(&ep, wire::PROTOCOL_3_0), "startup");
    assert_select_1(&h, &mut other);
}

/// The extended protocol message by message: Flush gets answers before any Sync, a row limit
/// suspends the portal, Close frees statements, and Sync-terminated groups can be pipelined.
#[test]
fn extended_protocol_flush_close_and_portal_suspension() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
    let tags = |msgs: &[Message]| msgs.iter().map(|m| m.tag as char).collect::<String>();

    conn.send(
        &[
            wire::parse("s1", "SELECT g FROM generate_series(1, $1::int4) g"),
            wire::describe(b'S', "s1"),
            wire::flush(),
        ]
        .concat(),
    )
    .unwrap();
    let msgs = h.must(conn.read_n(3), "answers to Parse/Describe after Flush");
    assert_eq!(
        tags(&msgs),
        "1tT",
        "ParseComplete, ParameterDescription, RowDescription"
    );

    conn.send(
        &[
            wire::bind("p1", "s1", &[Some("5")]),
            wire::execute("p1", 2),
            wire::flush(),
        ]
        .concat(),
    )
    .unwrap();
    let mut rows = Vec::new();
    let msgs = h.must(conn.read_n(4), "first page");
    assert_eq!(
        tags(&msgs),
        "2DDs",
        "BindComplete, 2 rows, PortalSuspended\n{}",
        h.context()
    );
    rows.extend(RawConn::first_column(&msgs));
    conn.send(&[wire::execute("p1", 2), wire::flush()].concat())
        .unwrap();
    let msgs = h.must(conn.read_n(3), "second page");
    assert_eq!(tags(&msgs), "DDs");
    rows.extend(RawConn::first_column(&msgs));
    conn.send(&[wire::execute("p1", 2), wire::flush()].concat())
        .unwrap();
    let msgs = h.must(conn.read_n(2), "last page");
    assert_eq!(tags(&msgs), "DC", "last row and CommandComplete");
    rows.extend(RawConn::first_column(&msgs));
    let expected: Vec<Option<String>> = (1..=5).map(|i| Some(i.to_string())).collect();
    assert_eq!(rows, expected);

    conn.send(
        &[
            wire::close(b'P', "p1"),
            wire::close(b'S', "s1"),
            wire::sync(),
        ]
        .concat(),
    )
    .unwrap();
    let msgs = h.must(conn.read_until_ready(), "Close");
    assert_eq!(tags(&msgs), "33", "two CloseComplete");
    conn.send(
        &[
            wire::bind("", "s1", &[Some("1")]),
            wire::execute("", 0),
            wire::sync(),
        ]
        .concat(),
    )
    .unwrap();
    let msgs = h.must(conn.read_until_ready(), "Bind to a closed statement");
    assert_eq!(
        msgs.iter().find_map(Message::sqlstate).as_deref(),
        Some("26000"),
        "invalid_sql_statement_name: {:?}",
        msgs.iter().map(Message::describe).collect::<Vec<_>>()
    );

    // Fifty Sync-terminated groups written at once, one of them failing; a NULL parameter too.
    let mut batch = Vec::new();
    for i in 0..50 {
        let sql = if i == 25 {
            "SELECT 1 / ($1::int4 - 25)"
        } else {
            "SELECT $1::int4 + 1"
        };
        batch.extend(wire::parse("", sql));
        batch.extend(wire::bind("", "", &[Some(&i.to_string())]));
        batch.extend(wire::execute("", 0));
        batch.extend(wire::sync());
    }
    batch.extend(wire::parse("", "SELECT $1::text IS NULL"));
    batch.extend(wire::bind("", "", &[None]));
    batch.extend(wire::execute("", 0));
    batch.extend(wire::sync());
    conn.send(&batch).unwrap();
    for i in 0..50 {
        let msgs = h.must(conn.read_until_ready(), "pipelined group");
        if i == 25 {
            assert_eq!(
                msgs.iter().find_map(Message::sqlstate).as_deref(),
                Some("22012")
            );
        } else {
            assert_eq!(
                RawConn::first_column(&msgs),
                vec![Some((i + 1).to_string())],
                "group {i}\n{}",
                h.context()
            );
        }
    }
    let msgs = h.must(conn.read_until_ready(), "NULL parameter");
    assert_eq!(RawConn::first_column(&msgs), vec![Some("t".to_string())]);
    assert_select_1(&h, &mut conn);
}

/// A reported setting changed by SET reaches the client as ParameterStatus.
#[test]
fn parameter_status_follows_set() {
    let h = harness();
    let ep = h.endpoint();
    let mut conn = h.must(RawConn::to(&ep), "connect");
    h.must(conn.startup(&ep, wire::PROTOCOL_3_0), "startup");
    for key in ["server_version", "client_encoding", "integer_datetimes"] {
        assert!(
            conn.parameters.contains_key(key),
            "startup ParameterStatus {key}: {:?}\n{}",
            conn.parameters,
            h.context()
        );
    }
    let msgs = h.must(
        conn.simple_query("SET application_name = 'ps-test'; SET TimeZone = 'Asia/Tokyo'"),
        "SET",
    );
    let statuses: Vec<(String, String)> = msgs
        .iter()
        .filter(|m| m.tag == b'S')
        .map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let k = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            let v = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            (k, v)
        })
        .collect();
    assert!(
        statuses.contains(&("application_name".into(), "ps-test".into())),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("TimeZone".into(), "Asia/Tokyo".into())),
        "{statuses:?}"
    );
}

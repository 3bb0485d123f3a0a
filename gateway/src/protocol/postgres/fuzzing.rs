//! Entry points for the cargo-fuzz targets in `fuzz/`: each `fuzz/fuzzers/NAME.rs` is one line
//! calling the function of the same name here. Each takes arbitrary bytes and must neither panic
//! nor break the invariants it asserts. A new target is a function here, a one-line file there
//! and a `[[bin]]` entry in `fuzz/Cargo.toml`.

use super::auth::{ChannelBinding, UpstreamAuth};
use super::messages::{
    encode_row_description, parse_auth_request, parse_backend_key_data, parse_error_fields,
    parse_negotiate_protocol_version, parse_parameter_status, parse_ready_for_query,
    parse_row_description,
};
use super::startup::{
    Initial, MAX_STARTUP_PACKET_LEN, encode_cancel, encode_startup, parse_initial,
};

/// `parse_initial` on arbitrary bytes; whatever it accepts must re-encode to the same message.
pub fn startup(data: &[u8]) {
    let Ok(Some((initial, used))) = parse_initial(data, MAX_STARTUP_PACKET_LEN) else {
        return;
    };
    assert!(used <= data.len());
    let mut again = Vec::new();
    match &initial {
        Initial::Startup(s) => encode_startup(s.major, s.minor, &s.params, &mut again),
        Initial::Cancel { pid, key } => encode_cancel(*pid, key, &mut again),
        Initial::DirectTls => return assert_eq!(used, 0),
        Initial::SslRequest | Initial::GssEncRequest => again.extend_from_slice(&data[..used]),
    }
    assert_eq!(&again[..], &data[..used], "re-encoding changed {initial:?}");
}

/// Splits the input into backend messages (`tag`, `u16` body length, body, with the length
/// capped by what is left), runs every backend parser on each body, and feeds the sequence to
/// an [`UpstreamAuth`] whose configuration the first byte picks.
pub fn backend_messages(data: &[u8]) {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let password = (config & 1 == 0).then_some(&b"fuzz-password"[..]);
    let binding = if config & 2 == 0 {
        ChannelBinding::None
    } else {
        ChannelBinding::TlsServerEndPoint(vec![config; 32])
    };
    let mut auth = UpstreamAuth::new("fuzz", password, binding);
    let mut out = Vec::new();
    let mut auth_over = false;
    while let [tag, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (body, next) = tail.split_at(len);
        rest = next;

        let _ = parse_error_fields(body);
        let _ = parse_backend_key_data(body);
        let _ = parse_parameter_status(body);
        let _ = parse_negotiate_protocol_version(body);
        let _ = parse_auth_request(body);
        let _ = parse_ready_for_query(body);
        if let Ok(fields) = parse_row_description(body) {
            let mut again = Vec::new();
            encode_row_description(&fields, &mut again);
            assert_eq!(&again[5..], body, "row description did not round-trip");
        }

        if !auth_over {
            out.clear();
            auth_over = auth.on_message(*tag, body, &mut out).is_err();
        }
    }
}

//! Strict JWT validation: a pure function of the token, the key set, the expectations and `now`.
//!
//! `jsonwebtoken` checks only the signature, with exactly one algorithm allowed: the one the
//! header names, after this module has refused `none`, HS* and anything else symmetric, and
//! checked that the key the `kid` picks is of that algorithm's family (so an RSA public key can
//! never be used as an HMAC secret). Every claim is checked here, against the `now` passed in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::token::hex8;
use super::{IdentityError, VerifiedIdentity};

/// Longest `act` chain followed; deeper nesting is refused as malformed.
const MAX_ACT_DEPTH: usize = 8;

/// What a token must say to be accepted for a target.
#[derive(Clone, Debug)]
pub struct Expectations<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    pub groups_claim: &'a str,
}

/// The parts of a JOSE header the gateway acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoseHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Reads and vets the header: three segments, an asymmetric `alg`, no `crit`.
pub fn parse_header(token: &str) -> Result<JoseHeader, IdentityError> {
    let parts: Vec<&str> = token.split('.').collect();
    match parts.len() {
        3 => {}
        5 => {
            return Err(IdentityError::Malformed(
                "encrypted tokens (JWE) are not accepted".into(),
            ));
        }
        n => return Err(IdentityError::Malformed(format!("{n} segments, not 3"))),
    }
    let header: Map<String, Value> = decode_segment(parts[0], "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        _ => return Err(IdentityError::Malformed("header has no alg".into())),
    };
    let alg = match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        other => return Err(IdentityError::AlgorithmRefused(printable(other))),
    };
    if let Some(crit) = header.get("crit") {
        return Err(IdentityError::UnknownCrit(printable(&crit.to_string())));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(IdentityError::Malformed("kid is not a string".into())),
    };
    Ok(JoseHeader { alg, kid })
}

/// Picks the key for a header from a key set: by `kid`, or the only key of the right family
/// when the token names none. `Ok(None)` means the `kid` is unknown (refresh the set and retry).
pub fn select_key<'k>(
    keys: &'k [Jwk],
    header: &JoseHeader,
) -> Result<Option<&'k Jwk>, IdentityError> {
    let signing = keys
        .iter()
        .filter(|k| k.common.public_key_use != Some(PublicKeyUse::Encryption));
    let key = match &header.kid {
        Some(kid) => signing
            .into_iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid)),
        None => {
            let mut fitting = signing.filter(|k| fits(k, header.alg));
            match (fitting.next(), fitting.next()) {
                (Some(k), None) => Some(k),
                (None, _) => None,
                (Some(_), Some(_)) => {
                    return Err(IdentityError::Malformed(
                        "token names no kid and the JWKS has several keys".into(),
                    ));
                }
            }
        }
    };
    match key {
        Some(k) if !fits(k, header.alg) => Err(IdentityError::KeyMismatch {
            kid: header.kid.clone().unwrap_or_default(),
            alg: format!("{:?}", header.alg),
        }),
        k => Ok(k),
    }
}

/// Whether a JWK may verify `alg`: same family and curve, and the JWK's own `alg`, if set, equal.
fn fits(key: &Jwk, alg: Algorithm) -> bool {
    if let Some(ka) = key.common.key_algorithm
        && ka.to_string() != format!("{alg:?}")
    {
        return false;
    }
    match &key.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(okp) => {
            okp.curve == EllipticCurve::Ed25519 && alg == Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => false,
    }
}

/// Verifies the signature with `key` (chosen by [`select_key`]) and checks every claim.
pub fn verify(
    token: &str,
    header: &JoseHeader,
    key: &Jwk,
    expect: &Expectations,
    now: SystemTime,
) -> Result<VerifiedIdentity, IdentityError> {
    let decoding =
        jsonwebtoken::DecodingKey::from_jwk(key).map_err(|e| IdentityError::IdpProtocol {
            what: "JWKS",
            reason: format!("unusable key: {e}"),
        })?;
    let mut sig_only = jsonwebtoken::Validation::new(header.alg);
    sig_only.required_spec_claims.clear();
    sig_only.validate_exp = false;
    sig_only.validate_aud = false;
    let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &decoding, &sig_only)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => IdentityError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => IdentityError::KeyMismatch {
                kid: header.kid.clone().unwrap_or_default(),
                alg: format!("{:?}", header.alg),
            },
            _ => IdentityError::Malformed(format!("signature or payload: {e}")),
        })?
        .claims;
    check_claims(&claims, expect, now, token)
}

fn check_claims(
    claims: &Map<String, Value>,
    expect: &Expectations,
    now: SystemTime,
    token: &str,
) -> Result<VerifiedIdentity, IdentityError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let leeway = expect.leeway.as_secs_f64();
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == expect.issuer => {}
        Some(_) => {
            return Err(IdentityError::WrongIssuer {
                expected: expect.issuer.to_owned(),
            });
        }
        None => return Err(IdentityError::MissingClaim("iss".into())),
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == expect.audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expect.audience)),
        Some(_) => false,
        None => return Err(IdentityError::MissingClaim("aud".into())),
    };
    if !audience_ok {
        return Err(IdentityError::WrongAudience {
            expected: expect.audience.to_owned(),
        });
    }
    let exp = numeric(claims, "exp")?.ok_or_else(|| IdentityError::MissingClaim("exp".into()))?;
    if now > exp + leeway {
        return Err(IdentityError::Expired);
    }
    if let Some(nbf) = numeric(claims, "nbf")?
        && now + leeway < nbf
    {
        return Err(IdentityError::NotYetValid);
    }
    let iat = numeric(claims, "iat")?;
    if let Some(iat) = iat
        && now + leeway < iat
    {
        return Err(IdentityError::IssuedInFuture);
    }
    let subject = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(IdentityError::MissingClaim("sub".into())),
    };
    let groups = match claims.get(expect.groups_claim) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(g)) => vec![g.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .map(|g| g.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                IdentityError::Malformed(format!(
                    "claim {:?} is not a list of strings",
                    expect.groups_claim
                ))
            })?,
        Some(_) => {
            return Err(IdentityError::Malformed(format!(
                "claim {:?} is not a list of strings",
                expect.groups_claim
            )));
        }
    };
    let actors = act_chain(claims.get("act"))?;
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
    Ok(VerifiedIdentity {
        subject,
        groups,
        actors,
        jti: text("jti"),
        client_id: text("client_id").or_else(|| text("azp")),
        issuer: expect.issuer.to_owned(),
        audience: expect.audience.to_owned(),
        token_hash: hex8(&Sha256::digest(token.as_bytes())),
        issued_at: iat.map(secs_to_time),
        expires_at: secs_to_time(exp),
    })
}

/// The `act` claim (RFC 8693 §4.1) as a list: the current actor first, then the one it acted
/// for, and so on.
fn act_chain(mut act: Option<&Value>) -> Result<Vec<String>, IdentityError> {
    let mut actors = Vec::new();
    while let Some(value) = act {
        if actors.len() == MAX_ACT_DEPTH {
            return Err(IdentityError::Malformed(format!(
                "act chain deeper than {MAX_ACT_DEPTH}"
            )));
        }
        let Value::Object(obj) = value else {
            return Err(IdentityError::Malformed("act is not an object".into()));
        };
        match obj.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => actors.push(s.clone()),
            _ => return Err(IdentityError::Malformed("act has no sub".into())),
        }
        act = obj.get("act");
    }
    Ok(actors)
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(Some)
            .ok_or_else(|| IdentityError::Malformed(format!("{name} is not a time"))),
        Some(_) => Err(IdentityError::Malformed(format!("{name} is not a number"))),
    }
}

fn secs_to_time(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(secs.min(1e12))
}

fn decode_segment<T: serde::de::DeserializeOwned>(
    segment: &str,
    what: &str,
) -> Result<T, IdentityError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| IdentityError::Malformed(format!("{what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| IdentityError::Malformed(format!("{what} is not a JSON object")))
}

/// A header value for an error message: short, and printable ASCII only.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(40)
        .collect()
}

/// Parses a JWKS document, keeping every key `jsonwebtoken` understands and skipping the rest
/// (an IdP may publish encryption keys or newer key types beside its signing keys).
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    Ok(set
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<Jwk>(k).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&claims))
    }

    #[test]
    fn refuses_none_hmac_crit_and_jwe() {
        let claims = serde_json::json!({"sub": "a"});
        for alg in ["none", "HS256", "HS384", "HS512", "RSA-OAEP"] {
            let t = token(serde_json::json!({"alg": alg}), claims.clone());
            assert_eq!(parse_header(&t).unwrap_err().check(), "algorithm", "{alg}");
        }
        let t = token(
            serde_json::json!({"alg": "RS256", "crit": ["exp"], "exp": 1}),
            claims,
        );
        assert_eq!(parse_header(&t).unwrap_err().check(), "crit");
        assert_eq!(parse_header("a.b.c.d.e").unwrap_err().check(), "malformed");
        assert_eq!(parse_header("a.b").unwrap_err().check(), "malformed");
    }

    #[test]
    fn an_rsa_key_never_verifies_an_hmac_or_ec_token() {
        let jwks = parse_jwks(
            br#"{"keys":[{"kty":"RSA","kid":"r1","n":"AQAB","e":"AQAB"},
                         {"kty":"oct","kid":"o1","k":"c2VjcmV0"},
                         {"kty":"unknown","kid":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(jwks.len(), 2, "the unknown key type is skipped");
        let es = JoseHeader {
            alg: Algorithm::ES256,
            kid: Some("r1".into()),
        };
        assert_eq!(select_key(&jwks, &es).unwrap_err().check(), "key_mismatch");
        let rs_on_oct = JoseHeader {
            alg: Algorithm::RS256,
            kid: Some("o1".into()),
        };
        assert_eq!(
            select_key(&jwks, &rs_on_oct).unwrap_err().check(),
            "key_mismatch"
        );
        let unknown = JoseHeader {
            alg: Algorithm::RS256,
            kid: Some("new".into()),
        };
        assert!(select_key(&jwks, &unknown).unwrap().is_none());
    }

    fn expect() -> Expectations<'static> {
        Expectations {
            issuer: "https://idp.example",
            audience: "pg-prod",
            leeway: Duration::from_secs(30),
            groups_claim: "roles",
        }
    }

    fn check(claims: Value, now: u64) -> Result<VerifiedIdentity, IdentityError> {
        let Value::Object(map) = claims else { panic!() };
        check_claims(&map, &expect(), UNIX_EPOCH + Duration::from_secs(now), "t")
    }

    #[test]
    fn claims_are_checked_exactly() {
        let good = serde_json::json!({
            "iss": "https://idp.example", "aud": ["other", "pg-prod"], "sub": "alice",
            "exp": 1000, "iat": 900, "nbf": 900, "roles": ["dba", "oncall"], "jti": "j1",
            "act": {"sub": "agent-7", "act": {"sub": "orchestrator"}}
        });
        let id = check(good.clone(), 950).unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.groups, ["dba", "oncall"]);
        assert_eq!(id.actors, ["agent-7", "orchestrator"]);
        assert_eq!(id.jti.as_deref(), Some("j1"));
        // Leeway: 30 s either side.
        assert!(check(good.clone(), 1029).is_ok());
        assert_eq!(check(good.clone(), 1031).unwrap_err().check(), "expired");
        assert_eq!(check(good.clone(), 869).unwrap_err().check(), "nbf");
        let mut g = good.clone();
        g["nbf"] = Value::Null;
        g.as_object_mut().unwrap().remove("nbf");
        assert_eq!(check(g, 869).unwrap_err().check(), "iat");

        let with = |k: &str, v: Value| {
            let mut c = good.clone();
            c[k] = v;
            check(c, 950).unwrap_err().check()
        };
        assert_eq!(with("iss", "https://idp.example/".into()), "issuer");
        assert_eq!(with("aud", "pg-pro".into()), "audience");
        assert_eq!(with("aud", serde_json::json!(["PG-PROD"])), "audience");
        assert_eq!(with("sub", "".into()), "claim");
        assert_eq!(with("exp", "1000".into()), "malformed");
        assert_eq!(with("roles", serde_json::json!([1])), "malformed");
        assert_eq!(with("act", serde_json::json!({"iss": "x"})), "malformed");
        for k in ["iss", "aud", "exp", "sub"] {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            assert_eq!(check(c, 950).unwrap_err().check(), "claim", "{k}");
        }
    }
}

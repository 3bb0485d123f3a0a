//! Exact detectors. Each verifier is called by the prefilter at a candidate position (an anchor
//! literal, a digit, `@`, `:` or `=`) and returns the byte span to replace, or `None`.
//!
//! Verifiers never allocate and never index out of bounds: every read goes through `get` or a checked
//! range. Boundaries are checked on both sides, so a match never starts or ends inside a longer word
//! or number.

use super::config::DetectorKind;

/// A verifier: the span of a match at a candidate position.
pub(crate) type Verifier = fn(&[u8], usize) -> Option<(usize, usize)>;

/// A detector match: `text[start..end]` is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub start: usize,
    pub end: usize,
    pub kind: DetectorKind,
}

#[inline]
fn at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

#[inline]
fn digit(b: u8) -> bool {
    b.is_ascii_digit()
}

#[inline]
fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Count of ASCII digits at `s[i..]`, at most `max`.
#[inline]
fn digits_at(s: &[u8], i: usize, max: usize) -> usize {
    s.get(i..).map_or(0, |rest| {
        rest.iter().take(max).take_while(|b| digit(**b)).count()
    })
}

fn number(s: &[u8], i: usize, len: usize) -> u32 {
    s[i..i + len]
        .iter()
        .fold(0, |n, &b| n * 10 + u32::from(b - b'0'))
}

/// A number-like match may start at `start`: not inside a word or a longer number (`12-` or `3.`).
#[inline]
fn left_ok_num(s: &[u8], start: usize) -> bool {
    if start == 0 {
        return true;
    }
    let p = s[start - 1];
    !(alnum(p) || matches!(p, b'-' | b'.') && start >= 2 && digit(s[start - 2]))
}

/// A number-like match may end at `end`: not followed by a letter, digit, or `-5` / `.5`.
#[inline]
fn right_ok_num(s: &[u8], end: usize) -> bool {
    match s.get(end) {
        None => true,
        Some(&n) => !(alnum(n) || matches!(n, b'-' | b'.') && digit(at(s, end + 1))),
    }
}

pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Payment card starting at digit `g`: 13–19 digits, optionally grouped by one consistent separator
/// (space or dash) between groups of 3+ digits, leading digit 2–6 (the networks that issue cards),
/// Luhn-valid. The longest valid
/// prefix ending at a group boundary wins, so `4111 1111 1111 1111 2025` masks the card only.
pub(crate) fn card(s: &[u8], g: usize) -> Option<(usize, usize)> {
    if !matches!(at(s, g), b'2'..=b'6') || !left_ok_num(s, g) {
        return None;
    }
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut ends = [(0usize, 0usize); 19];
    let mut n_ends = 0;
    let mut sep = None;
    let mut i = g;
    loop {
        let group_start = i;
        while let Some(&b) = s.get(i).filter(|b| digit(**b)) {
            if n == digits.len() {
                // Longer than any card: only a shorter prefix ending at a group boundary can match.
                return best_card_end(s, g, &digits, &ends[..n_ends]);
            }
            digits[n] = b - b'0';
            n += 1;
            i += 1;
        }
        if i - group_start < 3 {
            // Card groups have 3 digits or more; `…1111-3` is something else.
            return best_card_end(s, g, &digits, &ends[..n_ends]);
        }
        ends[n_ends] = (i, n);
        n_ends += 1;
        let b = at(s, i);
        if matches!(b, b' ' | b'-') && digit(at(s, i + 1)) && sep.is_none_or(|c| c == b) {
            sep = Some(b);
            i += 1;
        } else {
            return best_card_end(s, g, &digits, &ends[..n_ends]);
        }
    }
}

fn best_card_end(
    s: &[u8],
    g: usize,
    digits: &[u8; 19],
    ends: &[(usize, usize)],
) -> Option<(usize, usize)> {
    ends.iter()
        .rev()
        .find(|&&(end, n)| (13..=19).contains(&n) && right_ok_num(s, end) && luhn(&digits[..n]))
        .map(|&(end, _)| (g, end))
}

/// US SSN at digit `g`: `AAA-GG-SSSS` (or with spaces), area not 000/666/9xx, group and serial not 0.
pub(crate) fn ssn(s: &[u8], g: usize) -> Option<(usize, usize)> {
    let b = s.get(g..g + 11)?;
    let sep = b[3];
    if !matches!(sep, b'-' | b' ')
        || b[6] != sep
        || digits_at(b, 0, 3) != 3
        || digits_at(b, 4, 2) != 2
        || digits_at(b, 7, 4) != 4
    {
        return None;
    }
    let (area, group, serial) = (number(b, 0, 3), number(b, 4, 2), number(b, 7, 4));
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return None;
    }
    (left_ok_num(s, g) && right_ok_num(s, g + 11)).then_some((g, g + 11))
}

/// Phone number whose first digit is at `g` (a `+` or `(` right before it belongs to the number).
pub(crate) fn phone(s: &[u8], g: usize) -> Option<(usize, usize)> {
    match g.checked_sub(1).map(|p| s[p]) {
        Some(b'+') => international(s, g - 1),
        Some(b'(') => nanp(s, g - 1),
        _ => nanp(s, g),
    }
}

/// `+` country code and groups: 8–15 digits, separated by at most two of ` -.()` at a time.
fn international(s: &[u8], plus: usize) -> Option<(usize, usize)> {
    if plus > 0 && alnum(s[plus - 1]) || !matches!(at(s, plus + 1), b'1'..=b'9') {
        return None;
    }
    let (mut i, mut n, mut end) = (plus + 1, 0, plus + 1);
    loop {
        let run = digits_at(s, i, 16);
        if run == 0 {
            break;
        }
        n += run;
        i += run;
        end = i;
        if n > 15 {
            return None;
        }
        let seps = s[i..]
            .iter()
            .take(2)
            .take_while(|b| matches!(b, b' ' | b'-' | b'.' | b'(' | b')'))
            .count();
        if seps == 0 || !digit(at(s, i + seps)) {
            // A closing parenthesis directly after digits belongs to the number only if more follow.
            break;
        }
        i += seps;
    }
    ((8..=15).contains(&n) && right_ok_num(s, end)).then_some((plus, end))
}

/// North American numbers: `[1-](NXX) NXX-XXXX`, `NXX-NXX-XXXX`, `NXX.NXX.XXXX`, `NXX NXX XXXX`.
fn nanp(s: &[u8], start: usize) -> Option<(usize, usize)> {
    if !left_ok_num(s, start) {
        return None;
    }
    let sep = |b: u8| matches!(b, b'-' | b'.' | b' ');
    let mut i = start;
    if at(s, i) == b'1' && sep(at(s, i + 1)) {
        i += 2;
    }
    let paren = at(s, i) == b'(';
    i += usize::from(paren);
    if digits_at(s, i, 4) != 3 || !matches!(s[i], b'2'..=b'9') {
        return None;
    }
    i += 3;
    if paren {
        if at(s, i) != b')' {
            return None;
        }
        i += 1;
        i += usize::from(at(s, i) == b' ');
    } else if sep(at(s, i)) {
        i += 1;
    } else {
        return None;
    }
    if digits_at(s, i, 4) != 3 || !matches!(s[i], b'2'..=b'9') {
        return None;
    }
    i += 3;
    if !sep(at(s, i)) {
        return None;
    }
    i += 1;
    if digits_at(s, i, 5) != 4 {
        return None;
    }
    i += 4;
    right_ok_num(s, i).then_some((start, i))
}

/// Dotted-quad IPv4 at digit `g`, octets ≤ 255, with an optional `/0`–`/32` suffix.
pub(crate) fn ipv4(s: &[u8], g: usize) -> Option<(usize, usize)> {
    if g > 0 && (alnum(s[g - 1]) || s[g - 1] == b'.') {
        return None;
    }
    let mut i = g;
    for octet in 0..4 {
        if octet > 0 {
            if at(s, i) != b'.' {
                return None;
            }
            i += 1;
        }
        let len = digits_at(s, i, 4);
        if len == 0 || len > 3 || number(s, i, len) > 255 {
            return None;
        }
        i += len;
    }
    if at(s, i) == b'/' {
        let len = digits_at(s, i + 1, 3);
        if (1..=2).contains(&len) && number(s, i + 1, len) <= 32 {
            i += 1 + len;
        }
    }
    right_ok_num(s, i).then_some((g, i))
}

/// IPv6 around the colon at `p`: the candidate is the run of hex digits, colons and dots around it,
/// parsed by the standard library. Needs `::` or all eight groups, so times and MAC addresses do not match.
pub(crate) fn ipv6(s: &[u8], p: usize) -> Option<(usize, usize)> {
    let v6 = |b: u8| b.is_ascii_hexdigit() || b == b':';
    let mut a = p;
    while a > 0 && p - a < 40 && v6(s[a - 1]) {
        a -= 1;
    }
    if a > 0 && (alnum(s[a - 1]) || s[a - 1] == b'.') {
        return None;
    }
    let mut e = p;
    while e < s.len() && e - a < 45 && (v6(s[e]) || s[e] == b'.') {
        e += 1;
    }
    while e > p && s[e - 1] == b'.' {
        e -= 1;
    }
    let cand = &s[a..e];
    let colons = cand.iter().filter(|&&b| b == b':').count();
    let compressed = memchr::memmem::find(cand, b"::").is_some();
    if colons < 2 || !(compressed || colons == 7) || !cand.iter().any(u8::is_ascii_hexdigit) {
        return None;
    }
    std::str::from_utf8(cand)
        .ok()?
        .parse::<std::net::Ipv6Addr>()
        .ok()?;
    if at(s, e) == b'/' {
        let len = digits_at(s, e + 1, 4);
        if (1..=3).contains(&len) && number(s, e + 1, len) <= 128 {
            e += 1 + len;
        }
    }
    (!alnum(at(s, e))).then_some((a, e))
}

/// Email around the `@` at `p`.
pub(crate) fn email(s: &[u8], p: usize) -> Option<(usize, usize)> {
    let local = |b: u8| alnum(b) || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let mut a = p;
    while a > 0 && local(s[a - 1]) {
        a -= 1;
    }
    while a < p && s[a] == b'.' {
        a += 1;
    }
    if a == p {
        return None;
    }
    let mut i = p + 1;
    let mut labels = 0;
    let mut last = None;
    loop {
        let start = i;
        while i < s.len() && (alnum(s[i]) || s[i] == b'-') {
            i += 1;
        }
        if i == start {
            break;
        }
        labels += 1;
        last = Some((start, i));
        if at(s, i) == b'.' && alnum(at(s, i + 1)) {
            i += 1;
        } else {
            break;
        }
    }
    let (tld_start, end) = last?;
    let tld = &s[tld_start..end];
    (labels >= 2 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic)).then_some((a, end))
}

/// IBAN starting at `start` (two upper-case letters, then the check digits): 15–34 characters, compact
/// or in groups of four separated by single spaces, mod-97 = 1. The longest valid form wins.
pub(crate) fn iban(s: &[u8], start: usize) -> Option<(usize, usize)> {
    let upper_alnum = |b: u8| b.is_ascii_uppercase() || digit(b);
    if (start > 0 && alnum(s[start - 1]))
        || !at(s, start).is_ascii_uppercase()
        || !at(s, start + 1).is_ascii_uppercase()
        || digits_at(s, start + 2, 2) != 2
    {
        return None;
    }
    let mut chars = [0u8; 34];
    let mut n = 0;
    let mut ends = [(0usize, 0usize); 10];
    let mut n_ends = 0;
    let mut i = start;
    loop {
        while n < chars.len() && upper_alnum(at(s, i)) {
            chars[n] = s[i];
            n += 1;
            i += 1;
        }
        if n_ends < ends.len() {
            ends[n_ends] = (i, n);
            n_ends += 1;
        }
        // Only a complete group of four may be followed by a space and another group.
        if n % 4 == 0 && at(s, i) == b' ' && upper_alnum(at(s, i + 1)) && n < chars.len() {
            i += 1;
        } else {
            break;
        }
    }
    ends[..n_ends]
        .iter()
        .rev()
        .find(|&&(end, n)| (15..=34).contains(&n) && !alnum(at(s, end)) && mod97(&chars[..n]) == 1)
        .map(|&(end, _)| (start, end))
}

fn mod97(iban: &[u8]) -> u32 {
    let (head, tail) = iban.split_at(4);
    tail.iter().chain(head).fold(0u32, |r, &c| {
        if digit(c) {
            (r * 10 + u32::from(c - b'0')) % 97
        } else {
            (r * 100 + u32::from(c - b'A') + 10) % 97
        }
    })
}

/// JWT at the `eyJ` at `p`: three base64url parts (the signature may be empty for `alg: none`).
pub(crate) fn jwt(s: &[u8], p: usize) -> Option<(usize, usize)> {
    let b64 = |b: u8| alnum(b) || b == b'-' || b == b'_';
    if p > 0 && (b64(s[p - 1]) || s[p - 1] == b'.') {
        return None;
    }
    let run = |i: usize| {
        s.get(i..)
            .map_or(0, |r| r.iter().take_while(|b| b64(**b)).count())
    };
    let h = run(p);
    if h < 10 || at(s, p + h) != b'.' {
        return None;
    }
    let body = p + h + 1;
    let b = run(body);
    if b < 10 || at(s, body + b) != b'.' {
        return None;
    }
    let sig = body + b + 1;
    let end = sig + run(sig);
    (at(s, end) != b'.').then_some((p, end))
}

/// PEM private key block at the `-----BEGIN` at `p`, through the END line; to the end of the text
/// when the END line is missing (a truncated key is still a key).
pub(crate) fn private_key(s: &[u8], p: usize) -> Option<(usize, usize)> {
    let label_start = p + b"-----BEGIN".len();
    let head = s.get(label_start..(label_start + 80).min(s.len()))?;
    let close = memchr::memmem::find(head, b"-----")?;
    let label = &head[..close];
    if !(label.ends_with(b"PRIVATE KEY") || label.ends_with(b"PRIVATE KEY BLOCK")) {
        return None;
    }
    let body = label_start + close + 5;
    let Some(end_at) = memchr::memmem::find(&s[body..], b"-----END") else {
        return Some((p, s.len()));
    };
    let after_end = body + end_at + b"-----END".len();
    let tail = &s[after_end..(after_end + 80).min(s.len())];
    let end = memchr::memmem::find(tail, b"-----").map_or(s.len(), |c| after_end + c + 5);
    Some((p, end))
}

fn token_char(b: u8) -> bool {
    alnum(b) || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// `Bearer <token>` at `p` (the scheme word): the token is masked.
pub(crate) fn bearer(s: &[u8], p: usize) -> Option<(usize, usize)> {
    if p > 0 && alnum(s[p - 1]) {
        return None;
    }
    let mut i = p + b"Bearer".len();
    let spaces = s
        .get(i..)
        .map_or(0, |r| r.iter().take(4).take_while(|&&b| b == b' ').count());
    if spaces == 0 {
        return None;
    }
    i += spaces;
    let len = s[i..].iter().take_while(|b| token_char(**b)).count();
    (len >= 8).then_some((i, i + len))
}

/// Character class of a well-known token's body.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TokenChars {
    Alnum,
    UpperAlnum,
    /// Letters, digits, `-` and `_`.
    Word,
}

/// A token with a known prefix (`ghp_`, `xoxb-`, `AKIA`, ...): at least `min` body characters, at most
/// `max` when the format fixes the length.
pub(crate) fn prefixed_token(
    s: &[u8],
    p: usize,
    prefix_len: usize,
    chars: TokenChars,
    min: usize,
    max: usize,
) -> Option<(usize, usize)> {
    if p > 0 && alnum(s[p - 1]) {
        return None;
    }
    let ok = |b: u8| match chars {
        TokenChars::Alnum => alnum(b),
        TokenChars::UpperAlnum => b.is_ascii_uppercase() || digit(b),
        TokenChars::Word => alnum(b) || b == b'-' || b == b'_',
    };
    let body = p + prefix_len;
    let len = s
        .get(body..)
        .map_or(0, |r| r.iter().take_while(|b| ok(**b)).count());
    (len >= min && len <= max && !alnum(at(s, body + len))).then_some((p, body + len))
}

/// What a `key: value` / `key=value` setting name says about its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Password,
    Secret,
    AwsSecret,
    Authorization,
}

/// Every keyword of [`setting_kind`] holds one of these letter pairs; most names have none. Per
/// first letter (`a` to `z`), a bit per second letter: a table lookup rather than a `match`, which
/// compiles to a jump that names mispredict.
const KEYWORD_PAIRS: [u32; 26] = {
    let pairs: [(u8, &[u8]); 5] = [
        (b'p', b"awr"),
        (b's', b"e"),
        (b't', b"o"),
        (b'a', b"pcuw"),
        (b'c', b"r"),
    ];
    let mut table = [0u32; 26];
    let mut i = 0;
    while i < pairs.len() {
        let (first, seconds) = pairs[i];
        let mut k = 0;
        while k < seconds.len() {
            table[(first - b'a') as usize] |= 1 << (seconds[k] - b'a');
            k += 1;
        }
        i += 1;
    }
    table
};

/// Whether two name bytes, case-folded, are one of [`KEYWORD_PAIRS`].
fn keyword_pair(first: u8, second: u8) -> bool {
    // `| 0x20` lowers ASCII letters and maps no other byte onto one.
    let (a, b) = (
        (first | 0x20).wrapping_sub(b'a'),
        (second | 0x20).wrapping_sub(b'a'),
    );
    (a < 26) & (b < 26) && (KEYWORD_PAIRS[usize::from(a)] >> b) & 1 != 0
}

/// The bytes of a setting's name: ASCII letters and digits, `_`, `-` and `.`.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.');
        b += 1;
    }
    table
};

/// What a setting's name says, for a name that holds a keyword pair (the caller checks).
fn setting_kind(name: &[u8]) -> Option<Setting> {
    if name.len() < 3 || name.len() > 64 {
        return None;
    }
    let mut buf = [0u8; 64];
    let lower = &mut buf[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    let has = |k: &[u8]| lower.windows(k.len()).any(|w| w == k);
    if has(b"aws_secret") || has(b"secret_access_key") {
        Some(Setting::AwsSecret)
    } else if lower.ends_with(b"authorization") {
        Some(Setting::Authorization)
    } else if has(b"password") || has(b"passwd") || has(b"pwd") || has(b"passphrase") {
        Some(Setting::Password)
    } else if has(b"secret")
        || has(b"token")
        || has(b"api_key")
        || has(b"apikey")
        || has(b"api-key")
        || has(b"access_key")
        || has(b"private_key")
        || has(b"credential")
    {
        Some(Setting::Secret)
    } else {
        None
    }
}

/// The value of a `name: value` / `name = value` / `"name": "value"` setting whose name says it is a
/// secret, around the separator at `p`. Returns the value span and the detector it belongs to.
pub(crate) fn setting_value(s: &[u8], p: usize) -> Option<(usize, usize, DetectorKind)> {
    // The name: skip spaces and a closing quote (maybe backslash-escaped) before the separator.
    let mut j = p;
    while j > 0 && p - j < 3 && matches!(s[j - 1], b' ' | b'\t') {
        j -= 1;
    }
    if j > 0 && matches!(s[j - 1], b'"' | b'\'') {
        j -= 1;
        if j > 0 && s[j - 1] == b'\\' {
            j -= 1;
        }
    }
    let name_end = j;
    // Most names hold none of the keywords' letter pairs: that is checked on the walk back over
    // the name, not in a second pass.
    let mut paired = false;
    while j > 0 && name_end - j <= 64 && NAME_BYTES[usize::from(s[j - 1])] {
        paired |= j < name_end && keyword_pair(s[j - 1], s[j]);
        j -= 1;
    }
    if !paired {
        return None;
    }
    let setting = setting_kind(&s[j..name_end])?;

    let mut i = p + 1;
    if matches!(at(s, i), b'>' | b'=') {
        i += 1; // `=>`, `:=`, `==`
    }
    while i < s.len() && i - p < 8 && matches!(s[i], b' ' | b'\t') {
        i += 1;
    }
    // An escaped quote (`\"`, JSON text inside text) opens a value that the same escape closes.
    let escaped = at(s, i) == b'\\' && matches!(at(s, i + 1), b'"' | b'\'');
    i += usize::from(escaped);
    let (mut vs, mut ve) = match at(s, i) {
        q @ (b'"' | b'\'') => {
            let body = &s[i + 1..(i + 1 + 1024).min(s.len())];
            let close = body.iter().position(|&b| b == q || b == b'\n')?;
            if body[close] != q {
                return None;
            }
            let close = if escaped && close > 0 && body[close - 1] == b'\\' {
                close - 1
            } else {
                close
            };
            (i + 1, i + 1 + close)
        }
        _ => {
            let len = s[i..]
                .iter()
                .take_while(|&&b| {
                    !b.is_ascii_whitespace()
                        && !matches!(
                            b,
                            b'"' | b'\''
                                | b','
                                | b';'
                                | b'&'
                                | b'<'
                                | b'>'
                                | b')'
                                | b']'
                                | b'}'
                                | b'\\'
                        )
                })
                .count();
            (i, i + len)
        }
    };
    let kind = match setting {
        Setting::Password => {
            if vs == ve {
                return None;
            }
            DetectorKind::Secret
        }
        Setting::Secret | Setting::AwsSecret => {
            let v = &s[vs..ve];
            if v.len() < 8 || v.iter().all(|b| digit(*b)) {
                return None;
            }
            if setting == Setting::AwsSecret {
                DetectorKind::AwsKey
            } else {
                DetectorKind::Secret
            }
        }
        Setting::Authorization => {
            // `Authorization: Basic dXNlcjpwYXNz`: keep the scheme, mask the credentials.
            let v = &s[vs..ve];
            let scheme = v.iter().take_while(|b| b.is_ascii_alphabetic()).count();
            if scheme == v.len() && at(s, ve) == b' ' {
                let cred = s[ve + 1..].iter().take_while(|b| token_char(**b)).count();
                vs = ve + 1;
                ve = vs + cred;
            }
            if ve - vs < 8 {
                return None;
            }
            DetectorKind::Bearer
        }
    };
    Some((vs, ve, kind))
}

/// The password of `scheme://user:password@host` around the `:` at `p` that starts `://`.
pub(crate) fn url_password(s: &[u8], p: usize) -> Option<(usize, usize)> {
    if s.get(p..p + 3)? != b"://" {
        return None;
    }
    let auth_start = p + 3;
    let auth_len = s[auth_start..]
        .iter()
        .take(512)
        .take_while(|&&b| {
            !b.is_ascii_whitespace()
                && !matches!(b, b'/' | b'?' | b'#' | b'"' | b'\'' | b'<' | b'>')
        })
        .count();
    let auth = &s[auth_start..auth_start + auth_len];
    let at_sign = memchr::memrchr(b'@', auth)?;
    let colon = memchr::memchr(b':', &auth[..at_sign])?;
    (colon + 1 < at_sign).then_some((auth_start + colon + 1, auth_start + at_sign))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The span a verifier finds when called at the first occurrence of `at_str` in `text`.
    fn found(f: Verifier, text: &str, at_str: &str) -> Option<String> {
        let p = text.find(at_str).expect("anchor in test text");
        f(text.as_bytes(), p).map(|(a, b)| text[a..b].to_owned())
    }

    #[test]
    fn keyword_pairs_are_exactly_the_pairs_of_the_keywords() {
        let keywords = [
            "aws_secret",
            "secret_access_key",
            "authorization",
            "password",
            "passwd",
            "pwd",
            "passphrase",
            "secret",
            "token",
            "api_key",
            "apikey",
            "api-key",
            "access_key",
            "private_key",
            "credential",
        ];
        // Each keyword holds a pair, so the pair test never hides one.
        for k in keywords {
            let upper = k.to_ascii_uppercase();
            for name in [k, upper.as_str()] {
                assert!(
                    name.as_bytes().windows(2).any(|w| keyword_pair(w[0], w[1])),
                    "{name}"
                );
            }
        }
        // The table holds exactly the listed pairs, case-folded, and nothing for other bytes.
        let listed = |a: u8, b: u8| {
            matches!(
                (a.to_ascii_lowercase(), b.to_ascii_lowercase()),
                (b'p', b'a' | b'w' | b'r')
                    | (b's', b'e')
                    | (b't', b'o')
                    | (b'a', b'p' | b'c' | b'u' | b'w')
                    | (b'c', b'r')
            )
        };
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(keyword_pair(a, b), listed(a, b), "{a:#x} {b:#x}");
            }
        }
    }

    #[test]
    fn luhn_checks() {
        let d = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn(&d("4111111111111111")));
        assert!(luhn(&d("378282246310005")));
        assert!(!luhn(&d("4111111111111112")));
    }

    #[test]
    fn cards() {
        assert_eq!(
            found(card, "pay 4111111111111111 now", "4").as_deref(),
            Some("4111111111111111")
        );
        assert_eq!(
            found(card, "4111 1111 1111 1111", "4").as_deref(),
            Some("4111 1111 1111 1111")
        );
        assert_eq!(
            found(card, "x 4111-1111-1111-1111.", "4").as_deref(),
            Some("4111-1111-1111-1111")
        );
        assert_eq!(
            found(card, "amex 3782 822463 10005", "3").as_deref(),
            Some("3782 822463 10005")
        );
        assert_eq!(
            found(card, "4111 1111 1111 1111 2025", "4").as_deref(),
            Some("4111 1111 1111 1111"),
            "trailing group is not part of the card"
        );
        // Luhn-invalid, too short, too long, inside a word, mixed separators, other leading digits.
        assert_eq!(found(card, "4111111111111112", "4"), None);
        assert_eq!(found(card, "411111111111", "4"), None);
        assert_eq!(found(card, "41111111111111111111", "4"), None);
        assert_eq!(found(card, "id4111111111111111", "4"), None);
        assert_eq!(found(card, "4111 1111-1111 1111", "4"), None);
        assert_eq!(found(card, "9111111111111111", "9"), None);
        assert_eq!(found(card, "4111111111111111-3", "4"), None);
    }

    #[test]
    fn ssns() {
        assert_eq!(
            found(ssn, "ssn 123-45-6789.", "1").as_deref(),
            Some("123-45-6789")
        );
        assert_eq!(
            found(ssn, "123 45 6789", "1").as_deref(),
            Some("123 45 6789")
        );
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "912-34-5678",
            "123-00-4567",
            "123-45-0000",
            "123-45-67890",
            "123-45 6789",
            "123456789",
        ] {
            assert_eq!(found(ssn, bad, &bad[..1]), None, "{bad}");
        }
        assert_eq!(found(ssn, "1-123-45-6789", "123"), None);
    }

    #[test]
    fn phones() {
        assert_eq!(
            found(phone, "call +14155550123 now", "1").as_deref(),
            Some("+14155550123")
        );
        assert_eq!(
            found(phone, "call (415) 555-0123.", "4").as_deref(),
            Some("(415) 555-0123")
        );
        assert_eq!(
            found(phone, "415-555-0123", "4").as_deref(),
            Some("415-555-0123")
        );
        assert_eq!(
            found(phone, "415.555.0123", "4").as_deref(),
            Some("415.555.0123")
        );
        assert_eq!(
            found(phone, "1-800-555-0199", "1").as_deref(),
            Some("1-800-555-0199")
        );
        assert_eq!(
            found(phone, "uk +44 20 7946 0958!", "4").as_deref(),
            Some("+44 20 7946 0958")
        );
        assert_eq!(
            found(phone, "+1 (415) 555-0123", "1").as_deref(),
            Some("+1 (415) 555-0123")
        );
        // Dates, short numbers, bare digit runs, too many digits, invalid area codes.
        assert_eq!(found(phone, "2024-03-02", "2"), None);
        assert_eq!(found(phone, "555-0123", "5"), None);
        assert_eq!(found(phone, "4155550123", "4"), None);
        assert_eq!(found(phone, "+1234567", "1"), None);
        assert_eq!(found(phone, "+1234567890123456", "1"), None);
        assert_eq!(found(phone, "015-555-0123", "0"), None);
        assert_eq!(found(phone, "415-555-01234", "4"), None);
        assert_eq!(found(phone, "a+14155550123", "1"), None);
    }

    #[test]
    fn ipv4s() {
        assert_eq!(
            found(ipv4, "from 192.168.1.20, ok", "1").as_deref(),
            Some("192.168.1.20")
        );
        assert_eq!(
            found(ipv4, "net 10.0.0.0/8 ", "1").as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(
            found(ipv4, "host 8.8.8.8.", "8").as_deref(),
            Some("8.8.8.8")
        );
        assert_eq!(found(ipv4, "256.1.1.1", "2"), None);
        assert_eq!(found(ipv4, "1.2.3", "1"), None);
        assert_eq!(found(ipv4, "1.2.3.4.5", "1"), None);
        assert_eq!(found(ipv4, "v1.2.3.4", "1"), None);
    }

    #[test]
    fn ipv6s() {
        assert_eq!(
            found(ipv6, "from 2001:db8::1 ok", ":").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            found(ipv6, "fe80::1ff:fe23:4567:890a/64,", ":").as_deref(),
            Some("fe80::1ff:fe23:4567:890a/64")
        );
        assert_eq!(
            found(ipv6, "2001:0db8:85a3:0000:0000:8a2e:0370:7334.", ":").as_deref(),
            Some("2001:0db8:85a3:0000:0000:8a2e:0370:7334")
        );
        assert_eq!(
            found(ipv6, "::ffff:192.0.2.128", ":").as_deref(),
            Some("::ffff:192.0.2.128")
        );
        assert_eq!(found(ipv6, "at 10:30:45", ":"), None);
        assert_eq!(found(ipv6, "mac 00:1a:2b:3c:4d:5e", ":"), None);
        assert_eq!(found(ipv6, "std::vector", ":"), None);
        assert_eq!(found(ipv6, "a ::", ":"), None);
    }

    #[test]
    fn emails() {
        assert_eq!(
            found(email, "mail alice.smith+x@mail.example.com.", "@").as_deref(),
            Some("alice.smith+x@mail.example.com")
        );
        assert_eq!(
            found(email, "<bob@example.org>", "@").as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(found(email, "user@localhost", "@"), None);
        assert_eq!(found(email, "@example.com", "@"), None);
        assert_eq!(found(email, "a@b.c", "@"), None);
        assert_eq!(found(email, "me @ example.com", "@"), None);
        assert_eq!(found(email, "a@1.23", "@"), None);
    }

    #[test]
    fn ibans() {
        assert_eq!(
            found(iban, "to GB82WEST12345698765432 now", "GB").as_deref(),
            Some("GB82WEST12345698765432")
        );
        assert_eq!(
            found(iban, "GB82 WEST 1234 5698 7654 32 EUR", "GB").as_deref(),
            Some("GB82 WEST 1234 5698 7654 32")
        );
        assert_eq!(
            found(iban, "DE89 3704 0044 0532 0130 00", "DE").as_deref(),
            Some("DE89 3704 0044 0532 0130 00")
        );
        assert_eq!(
            found(iban, "GB82WEST12345698765433", "GB"),
            None,
            "checksum"
        );
        assert_eq!(found(iban, "GB82 WEST", "GB"), None);
        assert_eq!(found(iban, "XGB82WEST12345698765432", "GB"), None);
    }

    #[test]
    fn jwts() {
        let t =
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            found(jwt, &format!("token {t} end"), "eyJ").as_deref(),
            Some(t)
        );
        assert_eq!(
            found(jwt, "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", "eyJ").as_deref(),
            Some("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.")
        );
        assert_eq!(found(jwt, "eyJhbGciOiJIUzI1NiJ9 alone", "eyJ"), None);
        assert_eq!(
            found(jwt, "xeyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abc", "eyJ"),
            None
        );
    }

    #[test]
    fn private_keys() {
        let k = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----";
        assert_eq!(
            found(private_key, &format!("key: {k}\nrest"), "-----BEGIN").as_deref(),
            Some(k)
        );
        let escaped = "-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----";
        assert_eq!(
            found(private_key, escaped, "-----BEGIN").as_deref(),
            Some(escaped)
        );
        let truncated = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk";
        assert_eq!(
            found(private_key, truncated, "-----BEGIN").as_deref(),
            Some(truncated)
        );
        assert_eq!(
            found(
                private_key,
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
                "-----BEGIN"
            ),
            None
        );
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            found(bearer, "Bearer abcdef123456.xyz", "Bearer").as_deref(),
            Some("abcdef123456.xyz")
        );
        assert_eq!(found(bearer, "Bearer short", "Bearer"), None);
        assert_eq!(found(bearer, "xBearer abcdef123456", "Bearer"), None);
    }

    #[test]
    fn prefixed_tokens() {
        let gh = "ghp_0123456789abcdefghijABCDEFGHIJ012345";
        assert_eq!(
            prefixed_token(gh.as_bytes(), 0, 4, TokenChars::Alnum, 30, 255),
            Some((0, gh.len()))
        );
        assert_eq!(
            prefixed_token(b"ghp_short", 0, 4, TokenChars::Alnum, 30, 255),
            None
        );
        let aws = b"key AKIAIOSFODNN7EXAMPLE.";
        assert_eq!(
            prefixed_token(aws, 4, 4, TokenChars::UpperAlnum, 16, 16),
            Some((4, 24))
        );
        assert_eq!(
            prefixed_token(
                b"AKIAIOSFODNN7EXAMPLEX",
                0,
                4,
                TokenChars::UpperAlnum,
                16,
                16
            ),
            None
        );
        assert_eq!(
            prefixed_token(b"AKIAIOSFODNN7EXAMPL", 0, 4, TokenChars::UpperAlnum, 16, 16),
            None
        );
    }

    fn setting(text: &str) -> Option<(String, DetectorKind)> {
        let p = text.find([':', '=']).expect("separator");
        setting_value(text.as_bytes(), p).map(|(a, b, k)| (text[a..b].to_owned(), k))
    }

    #[test]
    fn settings() {
        assert_eq!(
            setting("password=hunter2&x=1"),
            Some(("hunter2".into(), DetectorKind::Secret))
        );
        assert_eq!(
            setting("DB_PASSWORD: 's3cr et'"),
            Some(("s3cr et".into(), DetectorKind::Secret))
        );
        assert_eq!(
            setting(r#"{"api_key": "abcd1234efgh"}"#),
            Some(("abcd1234efgh".into(), DetectorKind::Secret))
        );
        assert_eq!(
            setting("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
            Some((
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
                DetectorKind::AwsKey
            ))
        );
        assert_eq!(
            setting("Authorization: Basic dXNlcjpwYXNz"),
            Some(("dXNlcjpwYXNz".into(), DetectorKind::Bearer))
        );
        assert_eq!(setting("max_tokens=1500"), None, "numbers are not secrets");
        assert_eq!(
            setting("token: expired"),
            None,
            "short words are not secrets"
        );
        assert_eq!(setting("note: password"), None);
        assert_eq!(setting("password="), None);
        assert_eq!(
            setting("password\t:\thunter2"),
            Some(("hunter2".into(), DetectorKind::Secret))
        );
        assert_eq!(
            setting(r#"{\"password\": \"hunter2\"}"#),
            Some(("hunter2".into(), DetectorKind::Secret)),
            "JSON escaped inside text"
        );
    }

    #[test]
    fn url_passwords() {
        let s = "postgres://app:s3cret@db.internal:5432/prod";
        let p = s.find("://").unwrap();
        assert_eq!(
            url_password(s.as_bytes(), p).map(|(a, b)| &s[a..b]),
            Some("s3cret")
        );
        let s = "https://example.com/a@b";
        assert_eq!(url_password(s.as_bytes(), s.find("://").unwrap()), None);
        let s = "https://user@example.com/";
        assert_eq!(url_password(s.as_bytes(), s.find("://").unwrap()), None);
    }
}

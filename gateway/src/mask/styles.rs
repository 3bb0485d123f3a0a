//! Replacement values: redaction, partial, keyed hash.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::config::Style;
use super::prefilter::ascii_alnum_bits;

/// What replaces a redacted text value or span.
pub(crate) const REDACTED: &[u8] = b"****";

/// HMAC-SHA256 under the mask key. The keyed state is computed once and cloned per value.
#[derive(Clone)]
pub(crate) struct Hasher(Hmac<Sha256>);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(<key>)")
    }
}

impl Hasher {
    pub fn new(key: &[u8]) -> Hasher {
        Hasher(Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length"))
    }

    pub fn digest(&self, value: &[u8]) -> [u8; 32] {
        let mut mac = self.0.clone();
        mac.update(value);
        mac.finalize().into_bytes().into()
    }

    /// The first 64 bits of the digest as 16 lower-case hex digits.
    pub fn hex16(&self, value: &[u8]) -> [u8; 16] {
        let digest = self.digest(value);
        let mut out = [0u8; 16];
        hex(&digest[..8], &mut out);
        out
    }

    /// The first 64 bits of the digest as a number.
    pub fn u64(&self, value: &[u8]) -> u64 {
        let digest = self.digest(value);
        u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

pub(crate) fn hex(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// Writes what replaces `value` (a detector span, or a whole text value) under `style`. `Null` is
/// decided by the caller, which owns the field; here it redacts.
pub(crate) fn replace_text(style: Style, value: &[u8], hasher: &Hasher, out: &mut Vec<u8>) {
    match style {
        Style::Redact | Style::Null => out.extend_from_slice(REDACTED),
        Style::Partial => partial(value, out),
        Style::KeyedHash => out.extend_from_slice(&hasher.hex16(value)),
    }
}

/// `text` with each span in `hits` (sorted, disjoint) replaced under `style`.
pub(crate) fn rewrite_spans(
    text: &[u8],
    hits: impl IntoIterator<Item = (usize, usize)>,
    style: Style,
    hasher: &Hasher,
    out: &mut Vec<u8>,
) {
    let mut last = 0;
    for (start, end) in hits {
        out.extend_from_slice(&text[last..start]);
        replace_text(style, &text[start..end], hasher, out);
        last = end;
    }
    out.extend_from_slice(&text[last..]);
}

/// Keep the last 4 letters/digits/non-ASCII characters, star the others, keep ASCII punctuation and
/// spaces. With fewer than 8 maskable characters everything is starred.
pub(crate) fn partial(value: &[u8], out: &mut Vec<u8>) {
    // Most values masked this way (emails, card and phone numbers) are short and ASCII: one
    // classification gives a bit per maskable byte, and the stars follow from the bits.
    if value.len() <= 64
        && let Some(maskable) = ascii_alnum_bits(value)
    {
        let mut starred = maskable;
        if maskable.count_ones() >= 8 {
            // The four highest bits are the last four maskable bytes: keep them.
            for _ in 0..4 {
                starred &= !(1 << (63 - starred.leading_zeros()));
            }
        }
        let start = out.len();
        out.extend_from_slice(value);
        let copy = &mut out[start..];
        while starred != 0 {
            copy[starred.trailing_zeros() as usize] = b'*';
            starred &= starred - 1;
        }
        return;
    }
    partial_any(value, out);
}

/// [`partial`] for any value.
fn partial_any(value: &[u8], out: &mut Vec<u8>) {
    // A character is maskable when it is an ASCII letter or digit, or a non-ASCII character (counted
    // at its UTF-8 lead byte; continuation bytes follow their lead).
    let maskable = |b: u8| b.is_ascii_alphanumeric() || b >= 0xC0;
    let total = value.iter().filter(|&&b| maskable(b)).count();
    let first_kept = if total >= 8 { total - 4 } else { total };
    if value.is_ascii() {
        // A byte out per byte in: the kept characters start at the `first_kept`-th maskable byte
        // (counted from 0), so everything before it is starred or kept by its own class and
        // everything from it on is copied; neither loop carries state from byte to byte.
        let kept_from = if first_kept == total {
            value.len()
        } else {
            let mut from_end = total - first_kept;
            value
                .iter()
                .rposition(|&b| {
                    from_end -= usize::from(maskable(b));
                    from_end == 0
                })
                // Always found (`total` counted the same bytes); were it not, star everything.
                .unwrap_or(value.len())
        };
        // Copied whole, then starred in place: a loop over a slice the compiler vectorizes,
        // where pushing a mapped byte at a time does not.
        let start = out.len();
        out.extend_from_slice(value);
        for b in &mut out[start..start + kept_from] {
            if maskable(*b) {
                *b = b'*';
            }
        }
        return;
    }
    out.reserve(value.len());
    let mut seen = 0;
    let mut keeping = false;
    for &b in value {
        if (0x80..0xC0).contains(&b) {
            // Continuation byte: follows its lead byte's fate.
            if keeping {
                out.push(b);
            }
            continue;
        }
        if maskable(b) {
            keeping = seen >= first_kept;
            seen += 1;
            out.push(if keeping { b } else { b'*' });
        } else {
            keeping = false;
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial_of(s: &str) -> String {
        let mut out = Vec::new();
        partial(s.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn partial_keeps_last_four() {
        assert_eq!(partial_of("4111 1111 1111 1111"), "**** **** **** 1111");
        assert_eq!(partial_of("(415) 555-0123"), "(***) ***-0123");
        assert_eq!(partial_of("alice@example.com"), "*****@******e.com");
        assert_eq!(
            partial_of("Zoë Müller-Lüdenscheidt"),
            "*** ******-********eidt"
        );
        assert_eq!(
            partial_of("1234567"),
            "*******",
            "short values are starred entirely"
        );
        assert_eq!(partial_of("ünïcödé!"), "*******!");
        assert_eq!(partial_of("ünïcödéxyz"), "******éxyz");
    }

    #[test]
    fn partial_of_ascii_keeps_exactly_the_last_four_of_eight_or_more() {
        const BYTES: &[u8] = b"ab9Z@.- _(";
        let mut next = crate::testing::xorshift(0x5eed_0084);
        for _ in 0..20_000 {
            let value: Vec<u8> = (0..next(24)).map(|_| BYTES[next(BYTES.len())]).collect();
            let maskable: Vec<usize> = (0..value.len())
                .filter(|&k| value[k].is_ascii_alphanumeric())
                .collect();
            let kept = if maskable.len() >= 8 {
                &maskable[maskable.len() - 4..]
            } else {
                &[]
            };
            let starred = |k: usize| value[k].is_ascii_alphanumeric() && !kept.contains(&k);
            let expected: Vec<u8> = (0..value.len())
                .map(|k| if starred(k) { b'*' } else { value[k] })
                .collect();
            let mut out = b"x".to_vec();
            partial(&value, &mut out);
            assert_eq!(out[1..], expected, "{:?}", String::from_utf8_lossy(&value));
        }
    }

    /// The short-ASCII path gives what the general one does, for any bytes (NUL, other controls,
    /// bytes around each class's edges, non-ASCII) at any length around its 64-byte limit.
    #[test]
    fn partial_gives_the_same_by_either_path() {
        const BYTES: &[u8] = b"\0\x01/09:@AZ[`az{\x7f .-*\x80\xbf\xc0\xff";
        const ASCII: usize = 19;
        let mut next = crate::testing::xorshift(0x5eed_0085);
        let mut short_ascii = 0;
        for _ in 0..50_000 {
            let pool = if next(2) == 0 { &BYTES[..ASCII] } else { BYTES };
            let value: Vec<u8> = (0..next(80)).map(|_| pool[next(pool.len())]).collect();
            let (mut fast, mut general) = (b"x".to_vec(), b"x".to_vec());
            partial(&value, &mut fast);
            partial_any(&value, &mut general);
            assert_eq!(fast, general, "{value:?}");
            short_ascii += usize::from(value.len() <= 64 && value.is_ascii());
        }
        assert!(short_ascii > 15_000, "{short_ascii} short ASCII values");
    }

    #[test]
    fn keyed_hash_is_deterministic_and_keyed() {
        let a = Hasher::new(b"0123456789abcdef");
        let b = Hasher::new(b"fedcba9876543210");
        assert_eq!(a.hex16(b"alice@example.com"), a.hex16(b"alice@example.com"));
        assert_ne!(a.hex16(b"alice@example.com"), a.hex16(b"bob@example.com"));
        assert_ne!(a.hex16(b"alice@example.com"), b.hex16(b"alice@example.com"));
        assert!(a.hex16(b"x").iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn spans_are_replaced_in_place() {
        let h = Hasher::new(b"k");
        let mut out = Vec::new();
        rewrite_spans(
            b"a 1234 b 5678 c",
            [(2, 6), (9, 13)],
            Style::Redact,
            &h,
            &mut out,
        );
        assert_eq!(out, b"a **** b **** c");
    }
}

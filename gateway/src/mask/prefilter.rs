//! The scan that decides, fast, whether a text value holds anything to mask.
//!
//! Two passes, both vectorized, and only their candidates reach the exact detectors:
//! - **anchors**: Aho-Corasick (its SIMD "Teddy" prefilter) over the literal prefixes of token formats
//!   (`eyJ`, `AKIA`, `-----BEGIN`, `Bearer`, `ghp_`, `xoxb-`, ...);
//! - **trigger bytes**: digits, `@`, `:` and `=`, found 64 bytes at a time with a loop the compiler
//!   turns into SIMD compares. A digit starts a number-like run (phone, card, SSN, IBAN, IPv4), which is
//!   checked as a whole and skipped; `@` is an email candidate; `:`/`=` a setting (`password=`), a URL
//!   with a password, or an IPv6 address.
//!
//! Text with none of these bytes costs two SIMD passes and nothing else; typical prose costs a few
//! cheap rejections per number. Nothing here allocates unless a detector matches.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};

use super::config::DetectorKind;
use super::detectors::{self, Hit, TokenChars};

/// Which detectors are on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Enabled(u16);

impl Enabled {
    fn bit(kind: DetectorKind) -> u16 {
        1 << (kind as u16)
    }
    fn has(self, kind: DetectorKind) -> bool {
        self.0 & Self::bit(kind) != 0
    }
    fn any(self, kinds: &[DetectorKind]) -> bool {
        kinds.iter().any(|&k| self.has(k))
    }
}

/// What an anchor literal starts.
#[derive(Debug, Clone, Copy)]
enum Anchor {
    Jwt,
    PrivateKey,
    Bearer,
    Token {
        kind: DetectorKind,
        chars: TokenChars,
        min: usize,
        max: usize,
    },
}

const fn token(kind: DetectorKind, chars: TokenChars, min: usize, max: usize) -> Anchor {
    Anchor::Token {
        kind,
        chars,
        min,
        max,
    }
}

const ANCHORS: &[(&str, DetectorKind, Anchor)] = {
    use DetectorKind::{AwsKey, Bearer, Jwt, PrivateKey, Secret};
    use TokenChars::{Alnum, UpperAlnum, Word};
    &[
        ("eyJ", Jwt, Anchor::Jwt),
        ("-----BEGIN", PrivateKey, Anchor::PrivateKey),
        ("Bearer", Bearer, Anchor::Bearer),
        ("bearer", Bearer, Anchor::Bearer),
        ("BEARER", Bearer, Anchor::Bearer),
        ("AKIA", AwsKey, token(AwsKey, UpperAlnum, 16, 16)),
        ("ASIA", AwsKey, token(AwsKey, UpperAlnum, 16, 16)),
        ("ghp_", Secret, token(Secret, Alnum, 30, 255)),
        ("gho_", Secret, token(Secret, Alnum, 30, 255)),
        ("ghu_", Secret, token(Secret, Alnum, 30, 255)),
        ("ghs_", Secret, token(Secret, Alnum, 30, 255)),
        ("ghr_", Secret, token(Secret, Alnum, 30, 255)),
        ("github_pat_", Secret, token(Secret, Word, 22, 255)),
        ("xoxb-", Secret, token(Secret, Word, 10, 255)),
        ("xoxp-", Secret, token(Secret, Word, 10, 255)),
        ("xoxa-", Secret, token(Secret, Word, 10, 255)),
        ("xoxr-", Secret, token(Secret, Word, 10, 255)),
        ("xoxs-", Secret, token(Secret, Word, 10, 255)),
        ("xapp-", Secret, token(Secret, Word, 10, 255)),
        ("sk_live_", Secret, token(Secret, Alnum, 16, 255)),
        ("rk_live_", Secret, token(Secret, Alnum, 16, 255)),
        ("sk-", Secret, token(Secret, Word, 20, 255)),
        ("AIza", Secret, token(Secret, Word, 35, 35)),
        ("glpat-", Secret, token(Secret, Word, 20, 255)),
    ]
};

/// Detectors found through a digit (`NUMERIC`), `@`, or `:`/`=`.
const NUMERIC: [DetectorKind; 5] = [
    DetectorKind::Phone,
    DetectorKind::Card,
    DetectorKind::Ssn,
    DetectorKind::Iban,
    DetectorKind::Ipv4,
];
const SETTINGS: [DetectorKind; 3] = [
    DetectorKind::Secret,
    DetectorKind::AwsKey,
    DetectorKind::Bearer,
];

/// Compiled content detectors. Immutable, shared by every session.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    on: Enabled,
    anchors: Option<(AhoCorasick, Vec<Anchor>)>,
    triggers: bool,
}

impl Scanner {
    pub fn new(kinds: &[DetectorKind]) -> Scanner {
        let on = Enabled(kinds.iter().fold(0, |bits, &k| bits | Enabled::bit(k)));
        let (patterns, anchors): (Vec<&str>, Vec<Anchor>) = ANCHORS
            .iter()
            .filter(|(_, kind, _)| on.has(*kind))
            .map(|&(lit, _, anchor)| (lit, anchor))
            .unzip();
        let anchors = (!patterns.is_empty()).then(|| {
            let ac = AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostFirst)
                .kind(Some(AhoCorasickKind::DFA))
                .build(&patterns)
                .expect("anchor literals are a small fixed set");
            (ac, anchors)
        });
        let triggers = on.any(&NUMERIC)
            || on.any(&SETTINGS)
            || on.has(DetectorKind::Email)
            || on.has(DetectorKind::Ipv6);
        Scanner {
            on,
            anchors,
            triggers,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.on.0 == 0
    }

    /// Appends the hits in `text` to `hits`, sorted, overlapping hits merged into one span.
    pub fn scan(&self, text: &[u8], hits: &mut Vec<Hit>) {
        let base = hits.len();
        if let Some((ac, anchors)) = &self.anchors {
            let mut covered = 0;
            for m in ac.find_iter(text) {
                if m.start() < covered {
                    continue;
                }
                if let Some(hit) =
                    verify_anchor(anchors[m.pattern().as_usize()], text, m.start(), m.len())
                {
                    covered = hit.end;
                    hits.push(hit);
                }
            }
        }
        if self.triggers {
            self.scan_triggers(text, hits, base);
        }
        if hits.len() - base > 1 {
            merge(&mut *hits, base);
        }
    }

    /// True when `text` holds something to mask (no hit list kept).
    pub fn finds_any(&self, text: &[u8]) -> bool {
        let mut hits = Vec::new();
        self.scan(text, &mut hits);
        !hits.is_empty()
    }

    fn scan_triggers(&self, s: &[u8], hits: &mut Vec<Hit>, base: usize) {
        // Anchor hits found so far are sorted; triggers inside them are already masked.
        let anchor_end = hits.len();
        let mut next_anchor = base;
        let mut resume = 0;
        let mut on_trigger = |j: usize, hits: &mut Vec<Hit>, resume: &mut usize| {
            while next_anchor < anchor_end && hits[next_anchor].end <= j {
                next_anchor += 1;
            }
            if next_anchor < anchor_end && hits[next_anchor].start <= j {
                *resume = hits[next_anchor].end;
                return;
            }
            *resume = self.at_trigger(s, j, hits);
        };
        let mut i = 0;
        while i + 64 <= s.len() {
            if resume > i {
                i = resume;
                continue;
            }
            let block: &[u8; 64] = s[i..i + 64].try_into().expect("64-byte block");
            let mut mask = trigger_mask(block);
            while mask != 0 {
                let j = i + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                if j >= resume {
                    on_trigger(j, hits, &mut resume);
                }
            }
            i += 64;
        }
        for (j, &b) in s.iter().enumerate().skip(i) {
            if j >= resume && is_trigger(b) {
                on_trigger(j, hits, &mut resume);
            }
        }
    }

    /// Runs the detectors for the trigger byte at `j`; returns where scanning resumes.
    fn at_trigger(&self, s: &[u8], j: usize, hits: &mut Vec<Hit>) -> usize {
        let on = self.on;
        let mut push = |(start, end): (usize, usize), kind: DetectorKind| {
            hits.push(Hit { start, end, kind });
            end
        };
        if s[j].is_ascii_digit() {
            return self.at_number(s, j, hits);
        }
        match s[j] {
            b'@' => match on
                .has(DetectorKind::Email)
                .then(|| detectors::email(s, j))
                .flatten()
            {
                Some(span) => push(span, DetectorKind::Email),
                None => j + 1,
            },
            sep => {
                if sep == b':'
                    && on.has(DetectorKind::Secret)
                    && let Some(span) = detectors::url_password(s, j)
                {
                    return push(span, DetectorKind::Secret);
                }
                if on.any(&SETTINGS)
                    && let Some((a, b, kind)) = detectors::setting_value(s, j)
                    && on.has(kind)
                {
                    return push((a, b), kind);
                }
                if sep == b':'
                    && on.has(DetectorKind::Ipv6)
                    && let Some(span) = detectors::ipv6(s, j)
                {
                    return push(span, DetectorKind::Ipv6);
                }
                j + 1
            }
        }
    }

    /// A run of digits and separators starting at digit `i`: try each number-like detector at each
    /// group start, then skip the whole run.
    fn at_number(&self, s: &[u8], i: usize, hits: &mut Vec<Hit>) -> usize {
        let on = self.on;
        if on.has(DetectorKind::Iban)
            && i >= 2
            && s[i - 2].is_ascii_uppercase()
            && s[i - 1].is_ascii_uppercase()
            && let Some((a, b)) = detectors::iban(s, i - 2)
        {
            hits.push(Hit {
                start: a,
                end: b,
                kind: DetectorKind::Iban,
            });
            return b;
        }
        // Extent of the run: digits, with up to two of ` -.()` between them.
        let mut end = i;
        let mut digits = 0;
        let mut dots = false;
        let mut k = i;
        while k < s.len() {
            let b = s[k];
            if b.is_ascii_digit() {
                digits += 1;
                k += 1;
                end = k;
                continue;
            }
            let seps = s[k..]
                .iter()
                .take(2)
                .take_while(|b| matches!(b, b' ' | b'-' | b'.' | b'(' | b')'))
                .count();
            if seps == 0 || !s.get(k + seps).is_some_and(u8::is_ascii_digit) {
                break;
            }
            dots |= s[k..k + seps].contains(&b'.');
            k += seps;
        }
        // The cheapest match needs 4 digits (IPv4), the others 8 or more.
        let ip_possible = dots && on.has(DetectorKind::Ipv4);
        if digits < 4 || (digits < 8 && !ip_possible) {
            return end;
        }
        let mut resume = end;
        let mut g = i;
        while g < end {
            let found = self.at_group(s, g, digits, ip_possible);
            let next = match found {
                Some((start, stop, kind)) => {
                    hits.push(Hit {
                        start,
                        end: stop,
                        kind,
                    });
                    resume = resume.max(stop);
                    stop
                }
                None => g + s[g..end].iter().take_while(|b| b.is_ascii_digit()).count(),
            };
            g = next
                + s.get(next..end)
                    .map_or(0, |r| r.iter().take_while(|b| !b.is_ascii_digit()).count());
        }
        resume
    }

    fn at_group(
        &self,
        s: &[u8],
        g: usize,
        digits: usize,
        ip_possible: bool,
    ) -> Option<(usize, usize, DetectorKind)> {
        let on = self.on;
        let tag = |kind| move |(a, b)| (a, b, kind);
        let try_if = |cond: bool, kind, f: detectors::Verifier| {
            if cond && on.has(kind) {
                f(s, g).map(tag(kind))
            } else {
                None
            }
        };
        try_if(digits >= 9, DetectorKind::Ssn, detectors::ssn)
            .or_else(|| try_if(digits >= 13, DetectorKind::Card, detectors::card))
            .or_else(|| try_if(digits >= 8, DetectorKind::Phone, detectors::phone))
            .or_else(|| try_if(ip_possible, DetectorKind::Ipv4, detectors::ipv4))
    }
}

fn verify_anchor(anchor: Anchor, s: &[u8], p: usize, prefix_len: usize) -> Option<Hit> {
    let (span, kind) = match anchor {
        Anchor::Jwt => (detectors::jwt(s, p)?, DetectorKind::Jwt),
        Anchor::PrivateKey => (detectors::private_key(s, p)?, DetectorKind::PrivateKey),
        Anchor::Bearer => (detectors::bearer(s, p)?, DetectorKind::Bearer),
        Anchor::Token {
            kind,
            chars,
            min,
            max,
        } => (
            detectors::prefixed_token(s, p, prefix_len, chars, min, max)?,
            kind,
        ),
    };
    Some(Hit {
        start: span.0,
        end: span.1,
        kind,
    })
}

#[inline(always)]
fn is_trigger(b: u8) -> bool {
    // '0'..='9' and ':' are contiguous (0x30..=0x3A).
    b.wrapping_sub(b'0') <= 10 || b == b'@' || b == b'='
}

/// Bit k set when `block[k]` is a trigger byte; compiles to SIMD compares and movemask.
#[inline(always)]
fn trigger_mask(block: &[u8; 64]) -> u64 {
    let mut mask = 0u64;
    for (k, &b) in block.iter().enumerate() {
        mask |= u64::from(is_trigger(b)) << k;
    }
    mask
}

/// Sorts `hits[base..]` and merges overlapping spans (a detector may find a span inside another's).
fn merge(hits: &mut Vec<Hit>, base: usize) {
    hits[base..].sort_unstable_by_key(|h| (h.start, std::cmp::Reverse(h.end)));
    let mut w = base;
    for r in base + 1..hits.len() {
        if hits[r].start < hits[w].end {
            hits[w].end = hits[w].end.max(hits[r].end);
        } else {
            w += 1;
            hits[w] = hits[r];
        }
    }
    hits.truncate(w + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(text: &str) -> Vec<(String, DetectorKind)> {
        let scanner = Scanner::new(&DetectorKind::ALL);
        let mut hits = Vec::new();
        scanner.scan(text.as_bytes(), &mut hits);
        hits.iter()
            .map(|h| (text[h.start..h.end].to_owned(), h.kind))
            .collect()
    }

    #[test]
    fn clean_prose_has_no_hits() {
        let text = "Customer called about order 48213 on 2024-03-02 at 10:30; refund of $45.99 approved. \
                    Version 1.2.3 deployed, ticket #4521 closed. Note: the bearer of bad news = me. \
                    std::vector<int> is fine; ratio 3:2; see https://example.com/docs?id=42.";
        assert_eq!(scan_all(text), vec![]);
        let long = text.repeat(40);
        assert_eq!(scan_all(&long), vec![]);
    }

    #[test]
    fn finds_each_kind_in_prose() {
        let text = "Contact alice@example.com or (415) 555-0123; card 4111 1111 1111 1111, ssn 123-45-6789, \
                    IBAN GB82 WEST 1234 5698 7654 32, from 10.1.2.3 and 2001:db8::7, key AKIAIOSFODNN7EXAMPLE, \
                    jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk, \
                    Authorization: Bearer abcdefgh12345678, password=hunter2 and ghp_0123456789abcdefghijABCDEFGHIJ012345.";
        let kinds: Vec<_> = scan_all(text).into_iter().map(|(_, k)| k).collect();
        use DetectorKind::*;
        assert_eq!(
            kinds,
            vec![
                Email, Phone, Card, Ssn, Iban, Ipv4, Ipv6, AwsKey, Jwt, Bearer, Secret, Secret
            ]
        );
    }

    #[test]
    fn hits_at_block_edges_and_in_the_tail() {
        for pad in [0, 1, 40, 60, 63, 64, 65, 127, 130] {
            let text = format!(
                "{}bob@example.com",
                "x ".repeat(pad / 2) + if pad % 2 == 1 { "y" } else { "" }
            );
            assert_eq!(scan_all(&text).len(), 1, "pad {pad}");
            let text = format!("{} 4111111111111111 {}", "a".repeat(pad), "b".repeat(pad));
            assert_eq!(
                scan_all(&text),
                vec![("4111111111111111".to_owned(), DetectorKind::Card)],
                "pad {pad}"
            );
        }
    }

    #[test]
    fn only_enabled_detectors_run() {
        let scanner = Scanner::new(&[DetectorKind::Email]);
        let mut hits = Vec::new();
        scanner.scan(b"4111111111111111 a@b.io AKIAIOSFODNN7EXAMPLE", &mut hits);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].kind, DetectorKind::Email);
        assert!(Scanner::new(&[]).is_empty());
    }

    #[test]
    fn overlapping_hits_merge() {
        // The URL password and the "email" after it overlap: one span covers both.
        let hits = scan_all("postgres://app:s3cret@db.example.com/prod");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].0, "s3cret@db.example.com");
    }

    #[test]
    fn two_cards_in_one_run() {
        let hits = scan_all("4111111111111111 5555555555554444");
        assert_eq!(hits.len(), 2);
    }
}

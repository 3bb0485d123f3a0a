//! The scan that decides, fast, whether a text value holds anything to mask.
//!
//! Two vectorized passes find candidates, and only candidates reach the exact detectors:
//! - **anchors**: Aho-Corasick's packed searcher (SIMD "Teddy") over a few distinctive literals that
//!   start token formats: `eyJ` (JWT), `rer ` (`Bearer `), `AKIA`/`ASIA` (AWS), `AIza` (Google);
//! - **trigger bytes**: digits, `@`, `:`, `=`, `-` and `_`. Each 64-byte block is classified with
//!   SIMD and move-masks: where the CPU has AVX2 (found at run time), by two nibble lookups that
//!   give most byte classes at once, 32 bytes at a time; a value's last bytes, and every block on
//!   other CPUs, by 16-byte compares. Blocks without a trigger are skipped at once, and in the
//!   others a bit per byte leads straight to each trigger. Numbers too short for any number detector
//!   and the colons of clock times are cleared from those bits for the whole block with bit
//!   operations, so number-dense text does not visit them one by one. A digit starts a number-like
//!   run (phone, card, SSN, IBAN, IPv4), checked as a whole and then skipped; `@` is an email
//!   candidate; `:`/`=` a setting (`password=`), a URL with a password, or an IPv6 address; `_`/`-`
//!   after a lower-case letter a token prefix (`ghp_`, `xoxb-`, `sk-`), and `-----BEGIN` a PEM block.
//!
//! Each trigger is rejected in a few comparisons in the common case (a short number, a word before a
//! colon). A value that is one lower-case word (a hex digest, an id) is cleared before either
//! pass. Nothing here allocates unless a detector matches.

use aho_corasick::packed;
use wide::{u8x16, u64x2};

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
    /// `rer `: the match is three bytes into `Bearer ` in any case.
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

/// Literal anchors for the packed searcher. Few and distinctive, so it rarely stops on ordinary text
/// (`Bearer ` is found as `rer `: `bea…` and `ear…` are common in English); token formats whose prefix ends in
/// `_` or `-` are found through those trigger bytes instead.
///
/// Each has a needle, so a text without any enabled anchor's needle holds no anchor, and the
/// packed searcher is not set up for it (hex digests, ids, SQL, most short values).
const ANCHORS: &[(&str, DetectorKind, Anchor, Needle)] = {
    use DetectorKind::{AwsKey, Bearer, Jwt, Secret};
    use Needle::{Byte, Rer};
    use TokenChars::{UpperAlnum, Word};
    &[
        ("eyJ", Jwt, Anchor::Jwt, Byte(b'J')),
        // The scheme's name is case-insensitive (RFC 6750, RFC 9110): every case of `rer `.
        ("rer ", Bearer, Anchor::Bearer, Rer),
        ("reR ", Bearer, Anchor::Bearer, Rer),
        ("rEr ", Bearer, Anchor::Bearer, Rer),
        ("rER ", Bearer, Anchor::Bearer, Rer),
        ("Rer ", Bearer, Anchor::Bearer, Rer),
        ("ReR ", Bearer, Anchor::Bearer, Rer),
        ("REr ", Bearer, Anchor::Bearer, Rer),
        ("RER ", Bearer, Anchor::Bearer, Rer),
        (
            "AKIA",
            AwsKey,
            token(AwsKey, UpperAlnum, 16, 16),
            Byte(b'I'),
        ),
        (
            "ASIA",
            AwsKey,
            token(AwsKey, UpperAlnum, 16, 16),
            Byte(b'I'),
        ),
        ("AIza", Secret, token(Secret, Word, 35, 35), Byte(b'I')),
    ]
};

/// What rules a text out before the anchor search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needle {
    /// A byte of the literal, rare in prose, SQL and digests; two in all, for one `memchr2`.
    Byte(u8),
    /// `rer ` itself, in either case: each of its bytes is common (every text with a space
    /// would go to the search), the four together are not.
    Rer,
}

/// Token formats with a `_` or `-` in their prefix (all `Secret`): (prefix, body chars, min, max).
const SEPARATED_TOKENS: &[(&str, TokenChars, usize, usize)] = {
    use TokenChars::{Alnum, Word};
    &[
        ("ghp_", Alnum, 30, 255),
        ("gho_", Alnum, 30, 255),
        ("ghu_", Alnum, 30, 255),
        ("ghs_", Alnum, 30, 255),
        ("ghr_", Alnum, 30, 255),
        ("github_pat_", Word, 22, 255),
        ("xoxb-", Word, 10, 255),
        ("xoxp-", Word, 10, 255),
        ("xoxa-", Word, 10, 255),
        ("xoxr-", Word, 10, 255),
        ("xoxs-", Word, 10, 255),
        ("xapp-", Word, 10, 255),
        ("sk_live_", Alnum, 16, 255),
        ("rk_live_", Alnum, 16, 255),
        ("sk-", Word, 20, 255),
        ("glpat-", Word, 20, 255),
    ]
};

/// The shortest text an anchor's detector can match: `Bearer ` and an 8-character token. JWTs take
/// at least 22 bytes, AWS keys 20, Google keys 39. Shorter values (most short text columns) skip the
/// anchor search.
const MIN_ANCHORED_HIT: usize = 15;

/// Detectors found through a digit.
const NUMERIC: [DetectorKind; 5] = [
    DetectorKind::Phone,
    DetectorKind::Card,
    DetectorKind::Ssn,
    DetectorKind::Iban,
    DetectorKind::Ipv4,
];
/// Detectors found through `:`/`=` settings.
const SETTINGS: [DetectorKind; 3] = [
    DetectorKind::Secret,
    DetectorKind::AwsKey,
    DetectorKind::Bearer,
];

/// Compiled content detectors. Immutable, shared by every session.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    on: Enabled,
    anchors: Option<(packed::Searcher, Vec<Anchor>)>,
    /// The enabled anchors' [`Needle::Byte`]s (the first repeated to fill two), if any.
    needle_bytes: Option<[u8; 2]>,
    /// `Bearer ` is enabled: short texts are checked for its [`Needle::Rer`].
    rer: bool,
    triggers: bool,
    /// Full blocks are classified 32 bytes at a time where the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    avx2: avx2::Avx2,
}

impl Scanner {
    pub fn new(kinds: &[DetectorKind]) -> Scanner {
        let on = Enabled(kinds.iter().fold(0, |bits, &k| bits | Enabled::bit(k)));
        let enabled = || ANCHORS.iter().filter(|a| on.has(a.1));
        let (patterns, anchors): (Vec<&str>, Vec<Anchor>) =
            enabled().map(|&(lit, _, anchor, _)| (lit, anchor)).unzip();
        let mut bytes: Vec<u8> = (enabled())
            .filter_map(|a| match a.3 {
                Needle::Byte(b) => Some(b),
                Needle::Rer => None,
            })
            .collect();
        bytes.sort_unstable();
        bytes.dedup();
        let needle_bytes = (!bytes.is_empty()).then(|| [bytes[0], bytes[bytes.len() - 1]]);
        let rer = enabled().any(|a| a.3 == Needle::Rer);
        let anchors = (!patterns.is_empty()).then(|| {
            let searcher = packed::Config::new()
                .match_kind(packed::MatchKind::LeftmostFirst)
                .builder()
                .extend(&patterns)
                .build()
                .expect("the packed searcher takes a few short literals");
            (searcher, anchors)
        });
        let triggers = on.any(&NUMERIC)
            || on.any(&SETTINGS)
            || on.has(DetectorKind::PrivateKey)
            || on.has(DetectorKind::Email)
            || on.has(DetectorKind::Ipv6);
        Scanner {
            on,
            anchors,
            needle_bytes,
            rer,
            triggers,
            #[cfg(target_arch = "x86_64")]
            avx2: avx2::detect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.on.0 == 0
    }

    /// Appends the hits in `text` to `hits`, sorted, overlapping hits merged into one span.
    #[inline]
    pub fn scan(&self, text: &[u8], hits: &mut Vec<Hit>) {
        if text.len() > 16 && is_lowercase_word(text) && digit_run(text, 0) < 8 {
            return;
        }
        if text.len() >= 64 {
            return self.scan_long(text, hits);
        }
        self.scan_short(text, hits);
    }

    /// [`Self::scan`] for a text of a block or more: `memchr` for the needles, then the blocks.
    #[inline(never)]
    fn scan_long(&self, text: &[u8], hits: &mut Vec<Hit>) {
        let base = hits.len();
        self.scan_anchors(text, hits);
        if self.triggers {
            self.scan_triggers(text, hits, base);
        }
        if hits.len() - base > 1 {
            merge(&mut *hits, base);
        }
    }

    /// [`Self::scan`] for a text shorter than a block (most values: names, cities, ids, digests),
    /// loaded once into the 16-byte vectors that both the needle check and the trigger bits read.
    /// For such a text `memchr`'s call and dispatch cost more than the compares.
    #[inline(never)]
    fn scan_short(&self, text: &[u8], hits: &mut Vec<Hit>) {
        if text.is_empty() {
            return;
        }
        let base = hits.len();
        let chunks = tail_chunks(text);
        let used = text.len().div_ceil(16);
        if text.len() >= MIN_ANCHORED_HIT
            && self.anchors.is_some()
            && self.short_text_has_needle(&chunks, used)
        {
            self.search_anchors(text, hits);
        }
        if self.triggers {
            // The value starts and ends in this block: no run or colon window goes on past it.
            let edges = Edges {
                before: false,
                after: false,
            };
            let bits = tail_trigger_bits(&chunks, used, edges);
            let mut cursor = TriggerCursor::new(hits, base);
            self.visit_triggers(text, 0, bits, hits, &mut cursor);
        }
        if hits.len() - base > 1 {
            merge(&mut *hits, base);
        }
    }

    /// True when the first `used` chunks of a short text may hold an enabled anchor: they hold
    /// a needle byte, or `rer ` in any mix of case. NUL padding matches neither: it is not
    /// printable.
    #[inline(always)]
    fn short_text_has_needle(&self, chunks: &Chunks, used: usize) -> bool {
        // The needle bytes and the space in one pass: a text without a space (a digest, an id)
        // costs what one-byte needles alone did.
        let space = u8x16::splat(b' ');
        let chunks_used = chunks.iter().take(used);
        let (found, spaced) = match self.needle_bytes.map(|n| n.map(u8x16::splat)) {
            Some([a, b]) => chunks_used.fold((u8x16::ZERO, u8x16::ZERO), |(found, spaced), &v| {
                (found | v.cmp_eq(a) | v.cmp_eq(b), spaced | v.cmp_eq(space))
            }),
            None => (
                u8x16::ZERO,
                chunks_used.fold(u8x16::ZERO, |spaced, &v| spaced | v.cmp_eq(space)),
            ),
        };
        if found.move_mask() != 0 {
            return true;
        }
        if !self.rer || spaced.move_mask() == 0 {
            return false;
        }
        // Chunks past `used` are NUL padding, in none of these classes.
        let r = byte_bits::<4>(chunks, |v| eq(v | u8x16::splat(0x20), b'r'));
        let e = byte_bits::<4>(chunks, |v| eq(v | u8x16::splat(0x20), b'e'));
        let spaces = byte_bits::<4>(chunks, |v| eq(v, b' '));
        r & (e >> 1) & (r >> 2) & (spaces >> 3) != 0
    }

    /// True when a text of any length may hold an enabled anchor: it holds a needle byte, or
    /// `Bearer ` is enabled. Over a long text the search finds `rer ` faster than a `memmem`
    /// pass for it would rule it out (`callgrind`: prose's `r`, `e` and spaces keep a
    /// `memmem` verifying candidates where the search's three-byte fingerprints do not).
    fn has_needle(&self, text: &[u8]) -> bool {
        self.rer || (self.needle_bytes).is_some_and(|[a, b]| memchr::memchr2(a, b, text).is_some())
    }

    /// Appends the anchored hits in `text`, sorted and disjoint.
    fn scan_anchors(&self, text: &[u8], hits: &mut Vec<Hit>) {
        if text.len() >= MIN_ANCHORED_HIT && self.has_needle(text) {
            self.search_anchors(text, hits);
        }
    }

    /// [`Self::scan_anchors`] without the checks that rule a text out before the search.
    fn search_anchors(&self, text: &[u8], hits: &mut Vec<Hit>) {
        if let Some((searcher, anchors)) = &self.anchors {
            let mut covered = 0;
            for m in searcher.find_iter(text) {
                if m.start() < covered {
                    continue;
                }
                let anchor = anchors[m.pattern().as_usize()];
                if let Some(hit) = verify_anchor(anchor, text, m.start(), m.len()) {
                    covered = hit.end;
                    hits.push(hit);
                }
            }
        }
    }

    /// True when `text` holds something to mask (no hit list kept).
    pub fn finds_any(&self, text: &[u8]) -> bool {
        let mut hits = Vec::new();
        self.scan(text, &mut hits);
        !hits.is_empty()
    }

    fn scan_triggers(&self, s: &[u8], hits: &mut Vec<Hit>, base: usize) {
        let mut cursor = TriggerCursor::new(hits, base);
        let mut i = 0;
        while i < s.len() {
            if cursor.resume > i {
                i = cursor.resume;
                continue;
            }
            let bits = match s.get(i..i + 64) {
                // A full block's edges are kept open (the text may go on past either) as
                // constants: deciding per block costs long texts more than it saves.
                Some(block) => {
                    self.full_block_trigger_bits(block.try_into().expect("64-byte block"))
                }
                // The text's last bytes: padded with NUL (in no byte class), they take the same
                // vector path rather than a byte-at-a-time loop.
                None => {
                    let tail = &s[i..];
                    let chunks = tail_chunks(tail);
                    // The value ends in this block, and starts in it unless `i` is past 0: no
                    // run or colon window goes on past an edge with nothing beyond it.
                    let edges = Edges {
                        before: i > 0,
                        after: false,
                    };
                    tail_trigger_bits(&chunks, tail.len().div_ceil(16), edges)
                }
            };
            self.visit_triggers(s, i, bits, hits, &mut cursor);
            i += 64;
        }
    }

    /// Runs the detectors for each trigger in `bits` (bit k: byte `i + k` of `s`), skipping those
    /// inside anchor hits and those a detector consumed.
    #[inline(always)]
    fn visit_triggers(
        &self,
        s: &[u8],
        i: usize,
        mut bits: u64,
        hits: &mut Vec<Hit>,
        cursor: &mut TriggerCursor,
    ) {
        while bits != 0 {
            let j = i + bits.trailing_zeros() as usize;
            let TriggerCursor {
                anchor_end,
                next_anchor,
                resume,
            } = cursor;
            if *next_anchor < *anchor_end {
                while *next_anchor < *anchor_end && hits[*next_anchor].end <= j {
                    *next_anchor += 1;
                }
            }
            *resume = if *next_anchor < *anchor_end && hits[*next_anchor].start <= j {
                hits[*next_anchor].end
            } else {
                self.at_trigger(s, j, hits)
            };
            // Drop the triggers the detector consumed (e.g. the rest of a number).
            bits = match *resume - i {
                skip if skip >= 64 => 0,
                skip => bits & (u64::MAX << skip),
            };
        }
    }

    /// [`trigger_bits`] for a full block with text on both sides.
    #[inline(always)]
    fn full_block_trigger_bits(&self, block: &[u8; 64]) -> u64 {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.avx2 {
            return avx2::trigger_bits(simd, block);
        }
        trigger_bits::<4>(&block_chunks(block), Edges::OPEN)
    }

    /// Runs the detectors for the trigger byte at `j`; returns where scanning resumes. The common
    /// rejections (a short number, a word before a colon, a hyphenated word) are decided here, inline;
    /// anything else goes to the out-of-line detectors.
    #[inline(always)]
    fn at_trigger(&self, s: &[u8], j: usize, hits: &mut Vec<Hit>) -> usize {
        let b = s[j];
        if b.is_ascii_digit() {
            let iban_possible =
                j >= 2 && s[j - 1].is_ascii_uppercase() && s[j - 2].is_ascii_uppercase();
            let run = digit_run(s, j);
            let end = j + run;
            let sep = |k: usize| matches!(s.get(k), Some(b' ' | b'-' | b'.' | b'(' | b')'));
            let continues = sep(end)
                && s.get(end + 1)
                    .is_some_and(|b| b.is_ascii_digit() || sep(end + 1));
            // Every number detector refuses to start inside a word (`a12345678b` in a hex id).
            let in_word = || j > 0 && s[j - 1].is_ascii_alphabetic();
            if !iban_possible && !continues && (run < 8 || in_word()) {
                return end;
            }
            return self.at_number(s, j, hits);
        }
        let prev = if j > 0 { s[j - 1] } else { 0 };
        let quiet = match b {
            // A token prefix: the letter before its first separator (`ghp_`, `sk-`, `xoxb-`, ...).
            b'_' | b'-' => {
                let token = matches!(
                    prev,
                    b'p' | b'o' | b'u' | b's' | b'r' | b'b' | b'a' | b'k' | b't'
                );
                let pem = b == b'-' && s[j..].starts_with(b"-----BEGIN");
                !(token || pem)
            }
            b':' => {
                let url = s.get(j + 1) == Some(&b'/');
                let setting = prev.is_ascii_alphabetic()
                    || matches!(prev, b'_' | b'"' | b'\'' | b' ' | b'\t');
                // IPv6 has another colon within a group's length (4 hex digits) on one side.
                let near = &s[j.saturating_sub(5)..(j + 6).min(s.len())];
                let ipv6 = near.iter().filter(|&&c| c == b':').count() >= 2;
                !(url || setting || ipv6)
            }
            b'=' => {
                !(prev.is_ascii_alphabetic() || matches!(prev, b'_' | b'"' | b'\'' | b' ' | b'\t'))
            }
            _ => false,
        };
        if quiet {
            return j + 1;
        }
        self.at_symbol(s, j, hits)
    }

    #[inline(never)]
    fn at_symbol(&self, s: &[u8], j: usize, hits: &mut Vec<Hit>) -> usize {
        let on = self.on;
        let mut push = |(start, end): (usize, usize), kind: DetectorKind| {
            hits.push(Hit { start, end, kind });
            end
        };
        match s[j] {
            b'@' => match on.has(DetectorKind::Email).then(|| detectors::email(s, j)) {
                Some(Some(span)) => push(span, DetectorKind::Email),
                _ => j + 1,
            },
            b'-' if s[j..].starts_with(b"-----BEGIN") => {
                match on
                    .has(DetectorKind::PrivateKey)
                    .then(|| detectors::private_key(s, j))
                {
                    Some(Some(span)) => push(span, DetectorKind::PrivateKey),
                    _ => j + 5,
                }
            }
            sep @ (b'_' | b'-') => {
                if on.has(DetectorKind::Secret)
                    && let Some(span) = separated_token(s, j, sep)
                {
                    return push(span, DetectorKind::Secret);
                }
                j + 1
            }
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
    #[inline(never)]
    fn at_number(&self, s: &[u8], i: usize, hits: &mut Vec<Hit>) -> usize {
        let on = self.on;
        if i >= 2
            && s[i - 1].is_ascii_uppercase()
            && s[i - 2].is_ascii_uppercase()
            && on.has(DetectorKind::Iban)
            && let Some((a, b)) = detectors::iban(s, i - 2)
        {
            hits.push(Hit {
                start: a,
                end: b,
                kind: DetectorKind::Iban,
            });
            return b;
        }
        let first_run = digit_run(s, i);
        let mut end = i + first_run;
        // Common case: a short number on its own (`48213`, `2024`, `42%`).
        let sep = |k: usize| matches!(s.get(k), Some(b' ' | b'-' | b'.' | b'(' | b')'));
        let digit = |k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
        let continues = sep(end) && (digit(end + 1) || (sep(end + 1) && digit(end + 2)));
        if !continues && (first_run < 8 || !on.any(&NUMERIC)) {
            return end;
        }
        // Extent of the run: digits, with up to two of ` -.()` between them.
        let mut digits = first_run;
        let mut dots = 0;
        let mut k = end;
        while k < s.len() {
            if s[k].is_ascii_digit() {
                digits += 1;
                k += 1;
                end = k;
                continue;
            }
            let seps = if sep(k) {
                1 + usize::from(sep(k + 1))
            } else {
                0
            };
            if seps == 0 || !digit(k + seps) {
                break;
            }
            dots += usize::from(s[k] == b'.') + usize::from(seps == 2 && s[k + 1] == b'.');
            k += seps;
        }
        // What the run can hold at all: an SSN has 9 digits, a card 13, a phone 10 (8 after `+`),
        // an IPv4 address 3 dots.
        let plus = i > 0 && s[i - 1] == b'+';
        let can = Possible {
            ssn: digits >= 9 && on.has(DetectorKind::Ssn),
            card: digits >= 13 && on.has(DetectorKind::Card),
            phone: (digits >= 10 || (plus && digits >= 8)) && on.has(DetectorKind::Phone),
            ipv4: dots >= 3 && on.has(DetectorKind::Ipv4),
        };
        if !(can.ssn || can.card || can.phone || can.ipv4) {
            return end;
        }
        let mut resume = end;
        let mut g = i;
        while g < end {
            let next = match at_group(s, g, can) {
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
}

/// Which number-like detectors a run of digits can match.
#[derive(Debug, Clone, Copy)]
struct Possible {
    ssn: bool,
    card: bool,
    phone: bool,
    ipv4: bool,
}

fn at_group(s: &[u8], g: usize, can: Possible) -> Option<(usize, usize, DetectorKind)> {
    let try_one = |cond: bool, kind, f: detectors::Verifier| {
        if cond {
            f(s, g).map(|(a, b)| (a, b, kind))
        } else {
            None
        }
    };
    try_one(can.ssn, DetectorKind::Ssn, detectors::ssn)
        .or_else(|| try_one(can.card, DetectorKind::Card, detectors::card))
        .or_else(|| try_one(can.phone, DetectorKind::Phone, detectors::phone))
        .or_else(|| try_one(can.ipv4, DetectorKind::Ipv4, detectors::ipv4))
}

fn verify_anchor(anchor: Anchor, s: &[u8], p: usize, len: usize) -> Option<Hit> {
    let (span, kind) = match anchor {
        Anchor::Jwt => (detectors::jwt(s, p)?, DetectorKind::Jwt),
        Anchor::Bearer => {
            let start = p
                .checked_sub(3)
                .filter(|&b| s[b..p].eq_ignore_ascii_case(b"bea"))?;
            (detectors::bearer(s, start)?, DetectorKind::Bearer)
        }
        Anchor::Token {
            kind,
            chars,
            min,
            max,
        } => (detectors::prefixed_token(s, p, len, chars, min, max)?, kind),
    };
    Some(Hit {
        start: span.0,
        end: span.1,
        kind,
    })
}

/// A token whose prefix holds the separator at `j` (`ghp_…`, `xoxb-…`, `github_pat_…`).
fn separated_token(s: &[u8], j: usize, sep: u8) -> Option<(usize, usize)> {
    SEPARATED_TOKENS
        .iter()
        .find_map(|&(prefix, chars, min, max)| {
            let prefix = prefix.as_bytes();
            let k = prefix.iter().position(|&b| b == sep)?;
            let start = j.checked_sub(k)?;
            if prefix[k - 1] != s[j - 1] || !s[start..].starts_with(prefix) {
                return None;
            }
            detectors::prefixed_token(s, start, prefix.len(), chars, min, max)
        })
}

/// Length of the run of ASCII digits at `s[j..]`. Runs shorter than 8 (nearly all of them) are
/// measured branch-free on one 8-byte word: the high bit of each digit byte, then the first zero.
#[inline(always)]
fn digit_run(s: &[u8], j: usize) -> usize {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The last few bytes of a value are padded with NUL (not a digit): still one word.
    let v = padded_word(&s[j..]);
    // For bytes below 0x80, (y | 0x80) - n keeps the high bit exactly when y >= n: no borrow crosses
    // a byte. Bytes at or above 0x80 are excluded by `!v`.
    let y = (v & !HIGH) | HIGH;
    let digits = (y - LOW * u64::from(b'0')) & !(y - LOW * u64::from(b'9' + 1)) & !v & HIGH;
    let run = ((!digits & HIGH).trailing_zeros() / 8) as usize;
    if run < 8 {
        run
    } else {
        8 + s[j + 8..].iter().take_while(|b| b.is_ascii_digit()).count()
    }
}

/// Bit k set when `block[k]` is a trigger byte the scalar path has to look at. Triggers it would drop
/// at once are cleared here for the whole block (see [`quiet_triggers`]), so number-dense text does
/// not pay a trip through [`Scanner::at_trigger`] for every short number.
#[inline(always)]
fn trigger_bits<const CHUNKS: usize>(block: &Chunks, edges: Edges) -> u64 {
    classified_trigger_bits(&Sse2Chunks::<CHUNKS>(block), edges)
}

/// [`trigger_bits`] over any classification of the block.
#[inline(always)]
fn classified_trigger_bits(block: &impl BlockClasses, edges: Edges) -> u64 {
    let triggers = block.triggers();
    // With one run of triggers or none, the scalar path's single visit costs less than the masks.
    if (triggers & !(triggers << 1)).count_ones() < 2 {
        return triggers;
    }
    triggers & !quiet_triggers(block, edges)
}

/// A block's byte classes as bit masks, bit k for byte k, each computed when asked for.
trait BlockClasses {
    /// Digits, `:`, `@`, `=`, `-` and `_`.
    fn triggers(&self) -> u64;
    fn digits(&self) -> u64;
    fn colons(&self) -> u64;
    fn number_classes(&self) -> NumberClasses;
    fn colon_classes(&self) -> ColonClasses;
}

/// The first `CHUNKS` 16-byte vectors of a block (see [`byte_bits`]).
struct Sse2Chunks<'a, const CHUNKS: usize>(&'a Chunks);

impl<const CHUNKS: usize> BlockClasses for Sse2Chunks<'_, CHUNKS> {
    #[inline(always)]
    fn triggers(&self) -> u64 {
        all_triggers::<CHUNKS>(self.0)
    }

    #[inline(always)]
    fn digits(&self) -> u64 {
        byte_bits::<CHUNKS>(self.0, |v| in_range(v, b'0', b'9'))
    }

    #[inline(always)]
    fn colons(&self) -> u64 {
        byte_bits::<CHUNKS>(self.0, |v| eq(v, b':'))
    }

    #[inline(always)]
    fn number_classes(&self) -> NumberClasses {
        let bits = |class: fn(u8x16) -> u8x16| byte_bits::<CHUNKS>(self.0, class);
        NumberClasses {
            seps: bits(|v| eq(v, b' ') | eq(v, b'-') | eq(v, b'.') | eq(v, b'(') | eq(v, b')')),
            dots: bits(|v| eq(v, b'.')),
            plus: bits(|v| eq(v, b'+')),
            upper: bits(|v| in_range(v, b'A', b'Z')),
        }
    }

    #[inline(always)]
    fn colon_classes(&self) -> ColonClasses {
        let bits = |class: fn(u8x16) -> u8x16| byte_bits::<CHUNKS>(self.0, class);
        ColonClasses {
            slashes: bits(|v| eq(v, b'/')),
            setting_name_ends: bits(|v| {
                in_range(v | u8x16::splat(0x20), b'a', b'z')
                    | eq(v, b'_')
                    | eq(v, b'"')
                    | eq(v, b'\'')
                    | eq(v, b' ')
                    | eq(v, b'\t')
            }),
        }
    }
}

/// Byte classes by nibble, for `pshufb` lookups (full blocks on the AVX2 path): a byte is in
/// class `k` when the entries of both its low and its high nibble hold bit `k`. Each class here is
/// exactly such a product of nibble sets, so one lookup of each nibble and an AND classify a
/// vector for all of them at once, where compares take one or more per class.
mod nibble {
    /// `0`-`9`: high nibble 3, low 0-9.
    pub(super) const DIGIT: u8 = 1 << 0;
    /// `:`: 3, A.
    pub(super) const COLON: u8 = 1 << 1;
    /// `-` and `=`: 2 and 3, D.
    pub(super) const DASH_EQ: u8 = 1 << 2;
    /// `@`: 4, 0.
    pub(super) const AT: u8 = 1 << 3;
    /// `_`: 5, F.
    pub(super) const UNDERSCORE: u8 = 1 << 4;
    /// The number separators ` -.()`: 2; 0, 8, 9, D and E.
    pub(super) const SEP: u8 = 1 << 5;
    /// `.`: 2, E.
    pub(super) const DOT: u8 = 1 << 6;
    /// `+`: 2, B.
    pub(super) const PLUS: u8 = 1 << 7;
    /// The trigger bytes: digits, `:`, `@`, `=`, `-` and `_`.
    pub(super) const TRIGGER: u8 = DIGIT | COLON | DASH_EQ | AT | UNDERSCORE;

    /// Indexed by a byte's low nibble.
    pub(super) const LOW: [u8; 16] = {
        let mut t = [DIGIT; 16];
        t[0x0] |= AT | SEP;
        t[0x8] |= SEP;
        t[0x9] |= SEP;
        t[0xA] = COLON;
        t[0xB] = PLUS;
        t[0xC] = 0;
        t[0xD] = DASH_EQ | SEP;
        t[0xE] = SEP | DOT;
        t[0xF] = UNDERSCORE;
        t
    };

    /// Indexed by a byte's high nibble.
    pub(super) const HIGH: [u8; 16] = {
        let mut t = [0; 16];
        t[0x2] = DASH_EQ | SEP | DOT | PLUS;
        t[0x3] = DIGIT | COLON | DASH_EQ;
        t[0x4] = AT;
        t[0x5] = UNDERSCORE;
        t
    };
}

/// [`trigger_bits`] for a full block with AVX2: the same classes, 32 bytes at a time.
///
/// Everything here is `#[inline(always)]` and closure-free down to `pulp`'s intrinsics, so that it
/// all lands in the one function `V3::vectorize` compiles with AVX2 enabled: an intrinsic left in a
/// function without it is an out-of-line call per vector operation.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use pulp::x86::V3;
    use std::arch::x86_64::__m256i;

    use super::{
        BlockClasses, ColonClasses, Edges, NumberClasses, classified_trigger_bits, nibble,
    };

    /// The CPU's AVX2 (with the rest of x86-64-v3), where it has it.
    pub(super) type Avx2 = Option<V3>;

    pub(super) fn detect() -> Avx2 {
        V3::try_new()
    }

    /// [`super::trigger_bits`] over a full block with the text going on at both edges.
    #[inline(always)]
    pub(super) fn trigger_bits(simd: V3, block: &[u8; 64]) -> u64 {
        simd.vectorize(FullBlock { simd, block })
    }

    struct FullBlock<'a> {
        simd: V3,
        block: &'a [u8; 64],
    }

    impl pulp::NullaryFnOnce for FullBlock<'_> {
        type Output = u64;

        #[inline(always)]
        fn call(self) -> u64 {
            let simd = self.simd;
            let halves: [__m256i; 2] = bytemuck::cast(*self.block);
            let vectors = Vectors {
                simd,
                halves,
                classes: [
                    nibble_classes(simd, halves[0]),
                    nibble_classes(simd, halves[1]),
                ],
            };
            classified_trigger_bits(&vectors, Edges::OPEN)
        }
    }

    /// [`super::nibble`]'s classes of each byte of `x`.
    #[inline(always)]
    fn nibble_classes(simd: V3, x: __m256i) -> __m256i {
        let (avx, avx2) = (simd.avx, simd.avx2);
        let table = |t: [u8; 16]| -> __m256i { bytemuck::cast([t, t]) };
        let low_nibble = avx._mm256_set1_epi8(0x0F);
        let low = avx2._mm256_and_si256(x, low_nibble);
        let high = avx2._mm256_and_si256(avx2._mm256_srli_epi16::<4>(x), low_nibble);
        avx2._mm256_and_si256(
            avx2._mm256_shuffle_epi8(table(nibble::LOW), low),
            avx2._mm256_shuffle_epi8(table(nibble::HIGH), high),
        )
    }

    /// A block as two 32-byte vectors and their nibble classes, with the token that proves AVX2.
    struct Vectors {
        simd: V3,
        halves: [__m256i; 2],
        classes: [__m256i; 2],
    }

    #[derive(Clone, Copy)]
    enum Class {
        Trigger,
        Digit,
        Colon,
        Sep,
        Dot,
        Plus,
        Upper,
        Slash,
        SettingNameEnd,
    }

    impl BlockClasses for Vectors {
        #[inline(always)]
        fn triggers(&self) -> u64 {
            self.bits(Class::Trigger)
        }

        #[inline(always)]
        fn digits(&self) -> u64 {
            self.bits(Class::Digit)
        }

        #[inline(always)]
        fn colons(&self) -> u64 {
            self.bits(Class::Colon)
        }

        #[inline(always)]
        fn number_classes(&self) -> NumberClasses {
            NumberClasses {
                seps: self.bits(Class::Sep),
                dots: self.bits(Class::Dot),
                plus: self.bits(Class::Plus),
                upper: self.bits(Class::Upper),
            }
        }

        #[inline(always)]
        fn colon_classes(&self) -> ColonClasses {
            ColonClasses {
                slashes: self.bits(Class::Slash),
                setting_name_ends: self.bits(Class::SettingNameEnd),
            }
        }
    }

    impl Vectors {
        #[inline(always)]
        fn bits(&self, class: Class) -> u64 {
            let avx2 = self.simd.avx2;
            // Each mask holds 32 lane bits; `as u32` keeps exactly those.
            let low = avx2._mm256_movemask_epi8(self.lanes(0, class)) as u32;
            let high = avx2._mm256_movemask_epi8(self.lanes(1, class)) as u32;
            u64::from(low) | u64::from(high) << 32
        }

        /// Lanes of half `half` whose top bit says the byte is in `class`, as the 16-byte
        /// definitions in [`super::Sse2Chunks`].
        #[inline(always)]
        fn lanes(&self, half: usize, class: Class) -> __m256i {
            let (avx, avx2) = (self.simd.avx, self.simd.avx2);
            let (x, classes) = (self.halves[half], self.classes[half]);
            // A 16-bit shift left by 7 - k brings each byte's bit k to its top bit: the bits
            // that cross from the low byte into the high one land below its top.
            match class {
                Class::Trigger => avx2._mm256_cmpgt_epi8(
                    avx2._mm256_and_si256(classes, avx._mm256_set1_epi8(nibble::TRIGGER as i8)),
                    avx._mm256_setzero_si256(),
                ),
                Class::Digit => avx2._mm256_slli_epi16::<7>(classes),
                Class::Colon => avx2._mm256_slli_epi16::<6>(classes),
                Class::Sep => avx2._mm256_slli_epi16::<2>(classes),
                Class::Dot => avx2._mm256_slli_epi16::<1>(classes),
                Class::Plus => classes,
                Class::Upper => self.in_range(x, b'A', b'Z'),
                Class::Slash => self.any_of(x, b"/"),
                Class::SettingNameEnd => {
                    let lower = self.or(x, self.simd.avx._mm256_set1_epi8(0x20));
                    self.or(self.in_range(lower, b'a', b'z'), self.any_of(x, b"_\"' \t"))
                }
            }
        }

        /// Lanes equal to any of `bytes`.
        #[inline(always)]
        fn any_of(&self, x: __m256i, bytes: &[u8]) -> __m256i {
            let (avx, avx2) = (self.simd.avx, self.simd.avx2);
            let mut lanes = avx._mm256_setzero_si256();
            for &b in bytes {
                lanes = self.or(
                    lanes,
                    avx2._mm256_cmpeq_epi8(x, avx._mm256_set1_epi8(b as i8)),
                );
            }
            lanes
        }

        /// Lanes with `lo <= byte <= hi`, as in [`super::in_range`].
        #[inline(always)]
        fn in_range(&self, x: __m256i, lo: u8, hi: u8) -> __m256i {
            let (avx, avx2) = (self.simd.avx, self.simd.avx2);
            let d = avx2._mm256_sub_epi8(x, avx._mm256_set1_epi8(lo as i8));
            avx2._mm256_cmpeq_epi8(
                avx2._mm256_min_epu8(d, avx._mm256_set1_epi8((hi - lo) as i8)),
                d,
            )
        }

        #[inline(always)]
        fn or(&self, a: __m256i, b: __m256i) -> __m256i {
            self.simd.avx2._mm256_or_si256(a, b)
        }
    }
}

/// Whether the text goes on before a block's first byte and after its last.
#[derive(Clone, Copy)]
struct Edges {
    before: bool,
    after: bool,
}

impl Edges {
    /// Text on both sides: every edge guard on.
    const OPEN: Edges = Edges {
        before: true,
        after: true,
    };
}

/// Digits, `:`, `@`, `=`, `-` and `_`.
#[inline(always)]
fn all_triggers<const CHUNKS: usize>(block: &Chunks) -> u64 {
    byte_bits::<CHUNKS>(block, |v| {
        // '0'..='9' and ':' are contiguous (0x30..=0x3A).
        in_range(v, b'0', b':') | eq(v, b'@') | eq(v, b'=') | eq(v, b'-') | eq(v, b'_')
    })
}

/// A 64-byte block as four 16-byte vectors.
type Chunks = [u8x16; 4];

#[inline(always)]
fn block_chunks(block: &[u8; 64]) -> Chunks {
    std::array::from_fn(|k| {
        u8x16::new(
            block[16 * k..16 * k + 16]
                .try_into()
                .expect("16-byte chunk"),
        )
    })
}

/// Where the trigger scan of one text stands: anchor hits (sorted, at `hits[next_anchor..anchor_end]`)
/// are masked already, so triggers inside them are skipped; `resume` is where scanning goes on.
struct TriggerCursor {
    anchor_end: usize,
    next_anchor: usize,
    resume: usize,
}

impl TriggerCursor {
    fn new(hits: &[Hit], base: usize) -> TriggerCursor {
        TriggerCursor {
            anchor_end: hits.len(),
            next_anchor: base,
            resume: 0,
        }
    }
}

/// [`trigger_bits`] over the first `used` chunks of a text's last bytes: only the chunks that hold
/// text are classified (one for a name, a city or a status).
#[inline(always)]
fn tail_trigger_bits(chunks: &Chunks, used: usize, edges: Edges) -> u64 {
    match used {
        1 => trigger_bits::<1>(chunks, edges),
        2 => trigger_bits::<2>(chunks, edges),
        3 => trigger_bits::<3>(chunks, edges),
        _ => trigger_bits::<4>(chunks, edges),
    }
}

/// True when `text` is all ASCII digits and lower-case letters: a hex digest, an id, a slug without
/// separators. Such a text holds nothing to find unless it starts with a number of 8 digits or
/// more, so [`Scanner::scan`] skips the rest of its work for it, where the triggers of a digest's
/// many digits cost the most:
/// - no anchor: each needle (`J`, `I`, `rer `) has a capital or a space;
/// - no trigger but digits, and no separator after them for a number to go on;
/// - no IBAN: its country code is two capitals;
/// - every digit run but one at the start follows a letter, and [`Scanner::at_trigger`] turns a
///   number glued to a word away; a run at the start shorter than 8 digits is too short.
///
/// Checked 16 bytes at a time: prose and most other texts are ruled out by their first chunk.
fn is_lowercase_word(text: &[u8]) -> bool {
    let word = |v: u8x16| (in_range(v, b'0', b'9') | in_range(v, b'a', b'z')).move_mask() as u16;
    let mut chunks = text.chunks_exact(16);
    let full = chunks.all(|c| word(u8x16::new(c.try_into().expect("16-byte chunk"))) == u16::MAX);
    let rest = chunks.remainder();
    // NUL padding is in neither class, so the bits past the rest are clear.
    full && u32::from(word(tail_chunk(rest, 0))) == (1 << rest.len()) - 1
}

/// The last bytes of a text (fewer than 64) as a block, NUL after them. Each vector is built from
/// loads of the text itself: a copy into a zeroed buffer, loaded back 16 bytes at a time, stalls
/// store forwarding (the wide load waits for the copy's narrower stores to retire), and that wait
/// was the largest single cost of a short value's scan.
#[inline(always)]
fn tail_chunks(s: &[u8]) -> Chunks {
    // Four calls rather than `array::from_fn`, which the compiler leaves out of line.
    [
        tail_chunk(s, 0),
        tail_chunk(s, 1),
        tail_chunk(s, 2),
        tail_chunk(s, 3),
    ]
}

/// Chunk `k` of [`tail_chunks`].
#[inline(always)]
fn tail_chunk(s: &[u8], k: usize) -> u8x16 {
    match s.get(16 * k..) {
        Some(rest) if rest.len() >= 16 => u8x16::new(rest[..16].try_into().expect("16-byte chunk")),
        Some(rest) if rest.len() > 8 => {
            let n = rest.len();
            let word =
                |at: usize| u64::from_le_bytes(rest[at..at + 8].try_into().expect("8 bytes"));
            // The high half from the last 8 bytes, shifted down past the ones the low half has.
            bytemuck::cast(u64x2::new([word(0), word(n - 8) >> (8 * (16 - n))]))
        }
        Some(rest) if !rest.is_empty() => bytemuck::cast(u64x2::new([padded_word(rest), 0])),
        _ => u8x16::ZERO,
    }
}

/// For a text of at most 64 bytes: bit k set when byte k is an ASCII letter or digit, or `None`
/// when the text has a non-ASCII byte (for the partial style's short path).
pub(super) fn ascii_alnum_bits(s: &[u8]) -> Option<u64> {
    debug_assert!(s.len() <= 64);
    let chunks = tail_chunks(s);
    let (mut alnum, mut non_ascii) = (0u64, 0u16);
    for (k, &v) in chunks.iter().enumerate().take(s.len().div_ceil(16)) {
        // NUL padding is neither.
        non_ascii |= v.move_mask() as u16;
        let lanes = in_range(v, b'0', b'9') | in_range(v | u8x16::splat(0x20), b'a', b'z');
        alnum |= u64::from(lanes.move_mask() as u16) << (16 * k);
    }
    (non_ascii == 0).then_some(alnum)
}

/// The first 8 bytes of `s` as a little-endian word, NUL past its end, from (overlapping) loads
/// of `s` itself, for the same reason as [`tail_chunks`].
#[inline(always)]
fn padded_word(s: &[u8]) -> u64 {
    let n = s.len();
    let at = |k: usize| u64::from(s[k]) << (8 * k);
    let u32_at = |k: usize| u64::from(u32::from_le_bytes(s[k..k + 4].try_into().expect("4 bytes")));
    match n {
        8.. => u64::from_le_bytes(s[..8].try_into().expect("8 bytes")),
        4..=7 => u32_at(0) | u32_at(n - 4) << (8 * (n - 4)),
        1..=3 => at(0) | at(n / 2) | at(n - 1),
        0 => 0,
    }
}

/// Bit k set when `class` holds for byte k of the block: 16-byte compares and a move-mask each
/// (`wide` maps them to SSE2 or NEON, and to plain code elsewhere). Only the first `CHUNKS`
/// chunks are classified: the others' bits are 0, as they are for NUL padding in every class here.
#[inline(always)]
fn byte_bits<const CHUNKS: usize>(block: &Chunks, class: impl Fn(u8x16) -> u8x16) -> u64 {
    block
        .iter()
        .take(CHUNKS)
        .enumerate()
        .fold(0, |bits, (k, &v)| {
            // The mask holds 16 lane bits; `as u16` keeps exactly those.
            bits | (u64::from(class(v).move_mask() as u16) << (16 * k))
        })
}

#[inline(always)]
fn eq(v: u8x16, b: u8) -> u8x16 {
    v.cmp_eq(u8x16::splat(b))
}

/// Lanes with `lo <= byte <= hi`: the wrapping difference is at most `hi - lo` exactly then.
#[inline(always)]
fn in_range(v: u8x16, lo: u8, hi: u8) -> u8x16 {
    let d = v - u8x16::splat(lo);
    d.min(u8x16::splat(hi - lo)).cmp_eq(d)
}

/// The classes [`quiet_triggers`] needs where a block has digits: ` -.()`, `.`, `+` and `A`-`Z`.
struct NumberClasses {
    seps: u64,
    dots: u64,
    plus: u64,
    upper: u64,
}

/// The classes [`quiet_triggers`] needs where a block has colons: `/`, and the bytes a setting's
/// name ends in (letters, `_`, quotes, space and tab).
struct ColonClasses {
    slashes: u64,
    setting_name_ends: u64,
}

/// The triggers in `block` whose trip through [`Scanner::at_trigger`] would end without a hit, and
/// without consuming anything past them; found with bit operations over the block's byte classes:
/// - a number-like run too short for any number detector, and all its triggers: digits joined by
///   one or two of ` -.()` (the run [`Scanner::at_number`] measures: `12`, `1.5`, `10`, `$19.99`,
///   `v4.19.2`, `7-8`). A phone takes 10 digits (8 after `+`), an SSN 9, a card 13 and an IPv4
///   address three dots, so a run of at most 8 bytes can hold none of them unless `+` comes before
///   it or three of its bytes are dots; where the block has two dots close together, the bound is 6
///   bytes. Two capitals before the run (an IBAN's country code) keep it;
/// - a colon that is neither a setting (`name:`), a URL (`://`) nor IPv6 (another colon within 5
///   bytes): `10:30`, `3:2`.
///
/// Where the answer depends on bytes outside the block (a run or a colon's window at its edges) the
/// trigger is kept and the scalar path decides, so the scan finds exactly what it would without this.
///
/// The classes beyond digits and colons are computed only where those are there.
#[inline(always)]
fn quiet_triggers(block: &impl BlockClasses, edges: Edges) -> u64 {
    let mut quiet = 0;
    let digits = block.digits();
    if digits != 0 {
        let NumberClasses {
            seps,
            dots,
            plus,
            upper,
        } = block.number_classes();
        // One separator between digits, or two (both marked).
        let one = seps & (digits << 1) & (digits >> 1);
        let two = seps & (digits << 1) & (seps >> 1) & (digits >> 2);
        let runs = digits | one | two | (two << 1);
        let starts = runs & !(runs << 1);
        // Bit k: the run holds bytes k..k+7 (k..k+9 for `longer`).
        let mut long = runs & (runs >> 1);
        long &= long >> 2;
        let longer = long & (long >> 4) & (runs >> 8);
        long &= long >> 3;
        let close_dots = dots & ((dots >> 1) | (dots >> 2)) != 0;
        let too_long = if close_dots { long } else { longer };
        let iban = (upper << 1) & (upper << 2);
        // Where the text goes on before the block, runs starting in its first two bytes may
        // have begun there, or have their country code there; where it goes on after, runs
        // reaching byte 61 may go on past it.
        let mut open = if edges.before { 0b11 } else { 0 };
        if edges.after {
            open |= 0b111 << 61;
        }
        let mut bad_starts = starts & (too_long | iban | (plus << 1) | open);
        if edges.after && runs & (1 << 61) != 0 {
            bad_starts |= 1 << (64 - (!runs & ((1 << 61) - 1)).leading_zeros());
        }
        // Adding a run's start carries through its bits.
        let bad = (runs.wrapping_add(bad_starts) ^ runs) & runs;
        quiet |= runs & !bad;
    }
    let colons = block.colons();
    if colons != 0 {
        let ColonClasses {
            slashes,
            setting_name_ends,
        } = block.colon_classes();
        let near = (1..=5).fold(0, |near, d| near | (colons << d) | (colons >> d));
        // Colons whose 5-byte windows lie inside the text the block holds.
        let mut inside = u64::MAX;
        if edges.before {
            inside &= !((1 << 5) - 1);
        }
        if edges.after {
            inside &= (1 << 59) - 1;
        }
        quiet |= colons & !(slashes >> 1) & !(setting_name_ends << 1) & !near & inside;
    }
    quiet
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

    /// The trigger bytes, one at a time: the definition the block masks must match.
    fn is_trigger(b: u8) -> bool {
        b.is_ascii_digit() || matches!(b, b':' | b'@' | b'=' | b'-' | b'_')
    }

    /// A byte class: its name, the scalar definition and the block mask.
    type Class = (&'static str, fn(u8) -> bool, fn(&[u8; 64]) -> u64);

    #[test]
    fn byte_classes_are_exact_for_every_byte() {
        let classes: [Class; 4] = [
            ("trigger", is_trigger, |block| {
                all_triggers::<4>(&block_chunks(block))
            }),
            (
                "digit",
                |b| b.is_ascii_digit(),
                |block| byte_bits::<4>(&block_chunks(block), |v| in_range(v, b'0', b'9')),
            ),
            (
                "upper",
                |b| b.is_ascii_uppercase(),
                |block| byte_bits::<4>(&block_chunks(block), |v| in_range(v, b'A', b'Z')),
            ),
            (
                "alpha",
                |b| b.is_ascii_alphabetic(),
                |block| {
                    byte_bits::<4>(&block_chunks(block), |v| {
                        in_range(v | u8x16::splat(0x20), b'a', b'z')
                    })
                },
            ),
        ];
        for (name, scalar, bits) in classes {
            for b in 0..=255u8 {
                for pos in [0, 7, 8, 15, 16, 31, 48, 63] {
                    let mut block = [b'!'; 64];
                    block[pos] = b;
                    let expected = if scalar(b) { 1u64 << pos } else { 0 };
                    assert_eq!(bits(&block), expected, "{name}: byte {b:#x} at {pos}");
                }
            }
        }
    }

    /// The AVX2 classification of a full block gives the bits the 16-byte one does: every byte value
    /// at each position among digits and colons (so every class is computed), then random blocks
    /// dense in every class.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn full_blocks_classify_alike_with_avx2_and_without() {
        let Some(simd) = avx2::detect() else {
            eprintln!(
                "SKIPPED: this CPU has no AVX2, so only the 16-byte classification runs here"
            );
            return;
        };
        let both = |block: &[u8; 64]| {
            (
                avx2::trigger_bits(simd, block),
                trigger_bits::<4>(&block_chunks(block), Edges::OPEN),
            )
        };
        let background: [u8; 64] =
            *b"a1 b2:c3 d4 +5 GB6 7.8 (9) x_y z=1 10:30 /:/ 'k': \"v\"\t12-34 Q:90";
        for b in 0..=255u8 {
            for pos in [0, 1, 7, 15, 16, 31, 32, 33, 47, 48, 62, 63] {
                let mut block = background;
                block[pos] = b;
                let (wide, narrow) = both(&block);
                assert_eq!(wide, narrow, "byte {b:#x} at {pos}");
            }
        }
        const BYTES: &[u8] = b"0123456789 -.()+:/@=_AZaz\"'\tGBx";
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut quieted = 0;
        for _ in 0..100_000 {
            let block: [u8; 64] = std::array::from_fn(|_| match next(8) {
                0 => next(256) as u8,
                _ => BYTES[next(BYTES.len())],
            });
            let (wide, narrow) = both(&block);
            assert_eq!(wide, narrow, "{:?}", String::from_utf8_lossy(&block));
            quieted += usize::from(wide != all_triggers::<4>(&block_chunks(&block)));
        }
        // The blocks do reach the quiet masks, not only the trigger class.
        assert!(quieted > 10_000, "{quieted} blocks with quiet triggers");
    }

    /// Every class [`nibble`]'s tables define is the byte set its scalar definition names.
    #[test]
    fn nibble_classes_are_exact_for_every_byte() {
        type NibbleClass = (&'static str, u8, fn(u8) -> bool);
        let classes: [NibbleClass; 9] = [
            ("digit", nibble::DIGIT, |b| b.is_ascii_digit()),
            ("colon", nibble::COLON, |b| b == b':'),
            ("dash or equals", nibble::DASH_EQ, |b| {
                matches!(b, b'-' | b'=')
            }),
            ("at", nibble::AT, |b| b == b'@'),
            ("underscore", nibble::UNDERSCORE, |b| b == b'_'),
            ("separator", nibble::SEP, |b| {
                matches!(b, b' ' | b'-' | b'.' | b'(' | b')')
            }),
            ("dot", nibble::DOT, |b| b == b'.'),
            ("plus", nibble::PLUS, |b| b == b'+'),
            ("trigger", nibble::TRIGGER, is_trigger),
        ];
        for b in 0..=255u8 {
            let class = nibble::LOW[usize::from(b & 0x0F)] & nibble::HIGH[usize::from(b >> 4)];
            for (name, bits, scalar) in classes {
                assert_eq!(class & bits != 0, scalar(b), "{name}: byte {b:#x}");
            }
        }
    }

    #[test]
    fn a_texts_last_bytes_load_as_their_nul_padded_copy() {
        let text: Vec<u8> = (1..=64).collect();
        for len in 0..64 {
            let mut block = [0u8; 64];
            block[..len].copy_from_slice(&text[..len]);
            assert_eq!(
                tail_chunks(&text[..len]).map(|v| v.to_array()),
                block_chunks(&block).map(|v| v.to_array()),
                "{len} bytes"
            );
            let word = u64::from_le_bytes(block[..8].try_into().unwrap());
            assert_eq!(padded_word(&text[..len]), word, "{len} bytes");
        }
    }

    #[test]
    fn quiet_triggers_are_the_ones_dropped_at_once() {
        let mut block = [b' '; 64];
        let text = b"so (41) a1b 42% 10:30 ref: 123456789 GB1 y 1.5 y 7-8 a:b +12.";
        block[..text.len()].copy_from_slice(text);
        let bits = trigger_bits::<4>(&block_chunks(&block), Edges::OPEN);
        let mut kept = Vec::new();
        let mut k = 0;
        while k < text.len() {
            let run = (bits >> k).trailing_ones() as usize;
            if run > 0 {
                kept.push(std::str::from_utf8(&text[k..k + run]).unwrap());
            }
            k += run.max(1);
        }
        // Dropped: numbers too short for any number detector (`41`, the `1` of `a1b`, `42`, `10`,
        // `30`, `1.5`, `7-8`) and the colon of a time. Kept for the detectors: a setting's colons,
        // a 9-digit number, the digit after a country code and a number after `+`.
        assert_eq!(kept, vec![":", "123456789", "1", ":", "12"]);
    }

    /// The scan one trigger byte at a time, in order, each through `at_trigger`: what the block
    /// loop and its bit tricks must reproduce exactly.
    fn scan_byte_by_byte(scanner: &Scanner, s: &[u8]) -> Vec<Hit> {
        let mut hits = Vec::new();
        scanner.scan_anchors(s, &mut hits);
        let anchors = hits.clone();
        let mut j = 0;
        while scanner.triggers && j < s.len() {
            j = if let Some(a) = anchors.iter().find(|a| a.start <= j && j < a.end) {
                a.end
            } else if is_trigger(s[j]) {
                scanner.at_trigger(s, j, &mut hits)
            } else {
                j + 1
            };
        }
        if hits.len() > 1 {
            merge(&mut hits, 0);
        }
        hits
    }

    /// `scanner.scan` of `text`, asserted equal to [`scan_byte_by_byte`].
    fn scan_checked(scanner: &Scanner, text: &[u8]) -> Vec<Hit> {
        let mut hits = Vec::new();
        scanner.scan(text, &mut hits);
        let text_lossy = String::from_utf8_lossy(text);
        assert_eq!(hits, scan_byte_by_byte(scanner, text), "{text_lossy:?}");
        hits
    }

    #[test]
    fn the_inline_number_rejections_agree_with_at_number() {
        // `at_trigger` turns some numbers away without `at_number`'s detectors: short ones, and
        // ones glued to a word. Each must be one the detectors would refuse too.
        const BYTES: &[u8] = b"0123456789012345678901234567890123456789abcfXGB -.()+:";
        let mut next = crate::testing::xorshift(0x5eed_0013);
        let scanner = Scanner::new(&DetectorKind::ALL);
        let mut detector_hits = 0;
        for _ in 0..50_000 {
            let text: Vec<u8> = (0..next(40)).map(|_| BYTES[next(BYTES.len())]).collect();
            for j in 0..text.len() {
                if !text[j].is_ascii_digit() || j > 0 && text[j - 1].is_ascii_digit() {
                    continue;
                }
                let (mut inline, mut full) = (Vec::new(), Vec::new());
                let resume = scanner.at_trigger(&text, j, &mut inline);
                assert_eq!(
                    (resume, &inline),
                    (scanner.at_number(&text, j, &mut full), &full),
                    "{:?} at {j}",
                    String::from_utf8_lossy(&text)
                );
                detector_hits += full.len();
            }
        }
        assert!(detector_hits > 100, "{detector_hits} hits");
    }

    #[test]
    fn block_scan_matches_the_byte_by_byte_scan() {
        // Number-like text with every separator, capitals, colons, URLs and real detector hits,
        // at every alignment against the 64-byte blocks.
        const PIECES: &[&str] = &[
            "4111 1111 1111 1111",
            "4111111111111111",
            "(415) 555-0123",
            "+44 20 7946 0958",
            "123-45-6789",
            "GB82 WEST 1234 5698 7654 32",
            "GB82WEST12345698765432",
            "10.1.2.3",
            "2001:db8::7",
            "fe80::1:2",
            "password: hunter2",
            "token=abcdefgh1234",
            "https://u:pw@h.io/x",
            "alice@example.com",
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_0123456789abcdefghijABCDEFGHIJ012345",
            "Bearer abcdefgh12345678",
            "2024-03-05",
            "10:30",
            "v1.2.3",
            "$12.50",
        ];
        const BYTES: &[u8] = b"0123456789012345678901234567  ..--()::/@=_+AZGBxa\"'\t\xc3";
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
        let scanner = Scanner::new(&DetectorKind::ALL);
        // And with the 16-byte compares where the CPU would take AVX2.
        #[cfg(target_arch = "x86_64")]
        let compares = Scanner {
            avx2: None,
            ..scanner.clone()
        };
        let mut found = 0;
        for _ in 0..20_000 {
            let mut text = Vec::new();
            let len = next(300);
            while text.len() < len {
                if next(12) == 0 {
                    text.extend_from_slice(PIECES[next(PIECES.len())].as_bytes());
                } else {
                    text.push(BYTES[next(BYTES.len())]);
                }
            }
            let hits = scan_checked(&scanner, &text);
            #[cfg(target_arch = "x86_64")]
            {
                let mut by_compares = Vec::new();
                compares.scan(&text, &mut by_compares);
                assert_eq!(by_compares, hits, "{:?}", String::from_utf8_lossy(&text));
            }
            found += hits.len();
        }
        // The texts do hold things to find, not only quiet triggers.
        assert!(found > 20_000, "{found} hits");
    }

    /// Lower-case words skip the scan's work unless they start with a long number: random words
    /// dense in digits (so runs of 8 and more come at every position), and numbers an agent might
    /// glue into one to get it past the mask, each scanned as the byte-by-byte scan would.
    #[test]
    fn lowercase_words_find_what_the_byte_by_byte_scan_finds() {
        const BYTES: &[u8] = b"0123456789012345678901234567890123456789abcdefxyz";
        const NUMBERS: &[&str] = &[
            "4111111111111111",
            "378282246310005",
            "4155550123",
            "123456789",
            "12345678",
            "1234567",
        ];
        let mut next = crate::testing::xorshift(0x1c0f_fee5);
        let scanner = Scanner::new(&DetectorKind::ALL);
        let mut skipped = 0;
        for _ in 0..50_000 {
            // One in four past a block (SHA-256 and SHA-512 digests are 64 and 128).
            let longest = if next(4) == 0 { 240 } else { 47 };
            let len = 17 + next(longest);
            let mut text = Vec::new();
            if next(4) == 0 {
                text.extend_from_slice(NUMBERS[next(NUMBERS.len())].as_bytes());
            }
            while text.len() < len {
                text.push(BYTES[next(BYTES.len())]);
            }
            text.truncate(len);
            assert!(is_lowercase_word(&text));
            scan_checked(&scanner, &text);
            skipped += usize::from(digit_run(&text, 0) < 8);
        }
        // Both sides of the shortcut are taken.
        assert!(
            (10_000..40_000).contains(&skipped),
            "{skipped} of 50,000 skipped"
        );
        // A card of 17 to 19 digits is a word too, and is still found.
        for text in ["4111111111111111656", "37828224631000583"] {
            assert_eq!(scan_all(text), [(text.to_owned(), DetectorKind::Card)]);
        }
        // Anything but digits and lower-case letters is not a word: the full scan runs.
        for text in [
            "deadbeefdeadbeef4111 1111 1111 1111",
            "deadbeefdeadbeefDE89370400440532013000",
            "deadbeefdeadbeef alice@example.com",
            "Deadbeefdeadbeef",
            "deadbeefdeadbeefcaf\u{e9}",
        ] {
            assert!(!is_lowercase_word(text.as_bytes()), "{text:?}");
            // And past a block, in the middle of a digest or at its end.
            let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
            for long in [format!("{digest}{text}"), format!("{text}{digest}")] {
                assert!(!is_lowercase_word(long.as_bytes()), "{long:?}");
            }
        }
    }

    #[test]
    fn each_anchor_holds_its_needle_and_the_needle_bytes_fit_one_memchr2() {
        let mut bytes = Vec::new();
        for (lit, _, _, needle) in ANCHORS {
            match needle {
                Needle::Byte(b) => {
                    assert!(lit.as_bytes().contains(b), "{lit:?} lacks {:?}", *b as char);
                    bytes.push(*b);
                }
                Needle::Rer => assert!(lit.eq_ignore_ascii_case("rer "), "{lit:?}"),
            }
        }
        bytes.sort_unstable();
        bytes.dedup();
        assert!(bytes.len() <= 2, "{bytes:?}");
    }

    /// Short SQL and prose have spaces, `r` and `e` everywhere: only `rer ` sends them to the
    /// search.
    #[test]
    fn short_statements_and_prose_without_a_needle_skip_the_anchor_search() {
        let scanner = Scanner::new(&DetectorKind::ALL);
        for text in [
            "SELECT id, status, total FROM orders WHERE id = 42",
            "select abalance from pgbench_accounts where aid = 4242",
            "the order was delivered to the customer here yesterday",
        ] {
            let chunks = tail_chunks(text.as_bytes());
            let used = text.len().div_ceil(16);
            assert!(!scanner.short_text_has_needle(&chunks, used), "{text}");
        }
        for text in [
            "Authorization: Bearer abcdefgh12345678",
            "AUTHORIZATION: BEARER abcdefgh12345678",
            "authorization: BeaReR abcdefgh12345678",
            "authorization: bEArEr abcdefgh12345678",
        ] {
            assert!(scanner.has_needle(text.as_bytes()), "{text}");
            let chunks = tail_chunks(text.as_bytes());
            assert!(scanner.short_text_has_needle(&chunks, text.len().div_ceil(16)));
            assert_eq!(scan_all(text).len(), 1, "{text}");
        }
    }

    /// Ruling a text out by its needles never drops a hit the anchor search finds, for every
    /// set of enabled anchors; texts mix anchors, near misses and digests without a needle.
    #[test]
    fn texts_ruled_out_by_needles_hold_no_anchor_hit() {
        const PIECES: &[&str] = &[
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlX2hlcmU",
            "Bearer abcdefgh12345678",
            "BEARER abcdefgh12345678",
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAIOSFODNN7EXAMPLE",
            "AIzaSyA1234567890abcdefghijklmnopqrstuv",
            "eyj",
            "rer",
            "AKI",
            "0cc175b9c0f1b6a831c399e269772661",
            " ",
            "bearer ",
            "Bea rer",
            "BeaRER ",
            "where order ",
        ];
        const BYTES: &[u8] = b"0123456789abcdefAEIJKRSyzr .-_";
        let mut next = crate::testing::xorshift(0x2545_f491_4f6c_dd1d);
        let sets: [&[DetectorKind]; 5] = [
            &DetectorKind::ALL,
            &[DetectorKind::Jwt],
            &[DetectorKind::Bearer],
            &[DetectorKind::AwsKey, DetectorKind::Secret],
            &[DetectorKind::Jwt, DetectorKind::AwsKey],
        ];
        let scanners: Vec<Scanner> = sets.iter().map(|kinds| Scanner::new(kinds)).collect();
        let (mut found, mut ruled_out) = (0, 0);
        for _ in 0..20_000 {
            let mut text = Vec::new();
            let len = 15 + next(120);
            while text.len() < len {
                if next(6) == 0 {
                    text.extend_from_slice(PIECES[next(PIECES.len())].as_bytes());
                } else {
                    text.push(BYTES[next(BYTES.len())]);
                }
            }
            for scanner in &scanners {
                let (mut scanned, mut searched) = (Vec::new(), Vec::new());
                scanner.scan_anchors(&text, &mut scanned);
                scanner.search_anchors(&text, &mut searched);
                assert_eq!(scanned, searched, "{:?}", String::from_utf8_lossy(&text));
                found += searched.len();
                let mut ruled_out_here = !scanner.has_needle(&text);
                // A short text's own check, in its vectors.
                if text.len() < 64 {
                    let used = text.len().div_ceil(16);
                    let short = scanner.short_text_has_needle(&tail_chunks(&text), used);
                    assert!(
                        short || searched.is_empty(),
                        "{:?}",
                        String::from_utf8_lossy(&text)
                    );
                    ruled_out_here |= !short;
                }
                ruled_out += usize::from(ruled_out_here);
            }
        }
        assert!(
            found > 5_000 && ruled_out > 5_000,
            "{found} hits, {ruled_out} ruled out"
        );
    }

    #[test]
    fn digit_runs() {
        let text = b"12345x 7 123456789012 ab9/:0";
        for j in 0..text.len() {
            let expected = text[j..].iter().take_while(|b| b.is_ascii_digit()).count();
            assert_eq!(digit_run(text, j), expected, "at {j}");
        }
        assert_eq!(digit_run(b"1\xb2", 0), 1);
        assert_eq!(digit_run(b"12345678\xb1\xb2\xb3", 0), 8);
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
    fn values_too_short_for_an_anchor_skip_nothing_an_anchor_finds() {
        // The shortest text each anchor's detector accepts: a value this long is still searched.
        let shortest = [
            ("Bearer abcdefgh", DetectorKind::Bearer),
            ("eyJhbGciOi.eyJzdWIiOi.", DetectorKind::Jwt),
            ("AKIAIOSFODNN7EXAMPLE", DetectorKind::AwsKey),
            (
                "AIzaSyA1234567890abcdefghijklmnopqrstuv",
                DetectorKind::Secret,
            ),
        ];
        for (text, kind) in shortest {
            assert!(text.len() >= MIN_ANCHORED_HIT, "{text}");
            assert!(scan_all(text).iter().any(|(_, k)| *k == kind), "{text}");
            // One byte shorter, no detector accepts it.
            let cut = &text[..text.len() - 1];
            assert!(scan_all(cut).iter().all(|(_, k)| *k != kind), "{cut}");
        }
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
    fn token_formats_and_key_blocks_in_prose() {
        let text = "use bearer abcdefgh12345678 or BEARER ABCDEFGH12345678; slack xoxb-1234567890-abcdef, \
                    openai sk-proj-abcdefghijklmnopqrstu, github_pat_11ABCDEFG0123456789_abcdefghijkl, \
                    key -----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY----- done";
        let hits = scan_all(text);
        let found: Vec<&str> = hits.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            found,
            vec![
                "abcdefgh12345678",
                "ABCDEFGH12345678",
                "xoxb-1234567890-abcdef",
                "sk-proj-abcdefghijklmnopqrstu",
                "github_pat_11ABCDEFG0123456789_abcdefghijkl",
                "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----",
            ]
        );
        // Near misses: hyphenated words, a certificate, "bearer" as a word.
        assert_eq!(
            scan_all(
                "a follow-up, task-force, ask-me; -----BEGIN CERTIFICATE----- x; the bearer of news"
            ),
            vec![]
        );
    }

    #[test]
    fn two_cards_in_one_run() {
        let hits = scan_all("4111111111111111 5555555555554444");
        assert_eq!(hits.len(), 2);
    }
}

//! Masking scan throughput, single thread: `ResultPlan::mask_data_row` over an in-memory result set,
//! against a plain `regex`-crate implementation of the same detectors (one regex per detector, run
//! over every text field, checksums where the detector has one) in the same run.
//!
//! The result set looks like a support-ticket table read by an agent: per row an id, a name, a
//! timestamp, a status, an amount, a contact, and a long free-text comment with order numbers, prices,
//! dates, times, versions, URLs and `key: value` notes (~10 KB per row, batches of 100 rows).
//! - `clean`: a number-like token every 12 words of comment, no PII;
//! - `pii`: the same, plus an email in the contact and 1–3 detector hits (phone, card, SSN, IBAN, IP,
//!   AWS key, JWT, bearer token, password) in the comment of ~10% of rows;
//! - `clean, sparse numbers`: a number-like token every 40 words.
//!
//! A fourth set has the harness's `wide-rows` shape (`bench_wide`): short fields, ~100 bytes a row, an
//! email and a card number in one row in ten. There the cost is per value rather than per byte, so it
//! is also given in µs per 100-row result, the gateway CPU the `wide-rows` workload spends masking.
//! It is masked twice: with the rules the other sets use, and with the built-in `default` policy's,
//! which the harness's `gateway-policy` target runs (emails and card numbers by column name).
//!
//! Figures are MB/s: 10^6 bytes of DataRow bodies per second of this thread's CPU time (so other load
//! on a shared machine does not count), the median over repetitions after one warm-up.
//!
//! `--cold` also times the wide rows' `default`-policy masking one 100-row result at a time, the
//! median over results: once warm, and once with the caches evicted before each result (a write
//! over a buffer larger than the CPU's L2, then the result's own rows read, as the kernel's copy
//! leaves them in the gateway). Between two results the gateway's CPU runs PostgreSQL and the
//! client, so a wide-row query there starts nearer the cold figure; the loops above are warm.
//!
//! `--core` times whole wide-row results through the session core (`Session::on_backend` with the
//! gateway's `MaskFilter`, and without a filter), then the gather of the output's pieces, or their
//! patch back over the response when rows kept their length, as the pump does before it writes:
//! what the gateway's own code spends on a wide-row query's response, without I/O.
//!
//! `cargo run --release -p portcullis-bench --bin mask_scan -- [--reps N] [--batches N] [--row-kb N]
//! [--only portcullis|regex] [--detectors email,card,...] [--wide-only] [--cold] [--core]`

#[path = "../wide.rs"]
mod wide;

use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis::mask::explain::catalog_from_specs;
use portcullis::mask::lineage::SessionLineage;
use portcullis::mask::{Column, MaskRules, Masker, ResultPlan};
use portcullis::pipeline::mask_filter::MaskFilter;
use portcullis::protocol::core::{AllowAll, Output};
use portcullis::protocol::postgres::messages::{
    FieldDesc, encode_ready_for_query, encode_row_description,
};
use portcullis::protocol::postgres::session::{NoFilter, ResultFilter, Session};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use regex::Regex;

const INT4: u32 = 23;
const INT8: u32 = 20;
const TEXT: u32 = 25;
const VARCHAR: u32 = 1043;
const NUMERIC: u32 = 1700;
const TIMESTAMPTZ: u32 = 1184;

/// (name, type, scanned by the regex baseline as text)
const COLUMNS: [(&str, u32, bool); 7] = [
    ("id", INT8, false),
    ("customer_name", TEXT, true),
    ("created_at", TIMESTAMPTZ, false),
    ("status", VARCHAR, true),
    ("amount", NUMERIC, false),
    ("contact", TEXT, true),
    ("comment", TEXT, true),
];

struct Args {
    /// Run only one side (`portcullis` or `regex`), e.g. under a profiler.
    only: Option<String>,
    /// Detectors for the portcullis side (default: the built-in PII rules, all of them).
    detectors: Option<String>,
    reps: usize,
    batches: usize,
    row_bytes: usize,
    /// Only the wide-row set (e.g. under a profiler).
    wide_only: bool,
    /// Only the text set with this label (`clean`, `pii`, `sparse`), and not the wide-row set.
    set: Option<String>,
    /// Also time the wide rows one result at a time, warm and with the caches evicted before
    /// each result, as the gateway meets them.
    cold: bool,
    /// Also time whole wide-row results through the session core, with and without masking.
    core: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        only: None,
        detectors: None,
        reps: 15,
        batches: 3,
        row_bytes: 10 * 1024,
        wide_only: false,
        set: None,
        cold: false,
        core: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| usage(&flag))
        };
        match flag.as_str() {
            "--reps" => args.reps = value(),
            "--batches" => args.batches = value(),
            "--row-kb" => args.row_bytes = value() * 1024,
            "--wide-only" => args.wide_only = true,
            "--cold" => args.cold = true,
            "--core" => args.core = true,
            "--set" => {
                args.set = it
                    .next()
                    .filter(|v| ["clean", "pii", "sparse"].contains(&v.as_str()))
                    .or_else(|| usage(&flag))
            }
            "--detectors" => args.detectors = it.next().or_else(|| usage(&flag)),
            "--only" => {
                args.only = it
                    .next()
                    .filter(|v| v == "portcullis" || v == "regex")
                    .or_else(|| usage(&flag))
            }
            _ => usage(&flag),
        }
    }
    // Each picks sets the other leaves out: together they would run nothing.
    if args.wide_only && args.set.is_some() {
        usage("--set with --wide-only");
    }
    args
}

fn usage(flag: &str) -> ! {
    eprintln!(
        "mask_scan: bad argument {flag}\nusage: mask_scan [--reps N] [--batches N] [--row-kb N] [--only portcullis|regex] [--wide-only | --set clean|pii|sparse] [--cold] [--core]"
    );
    std::process::exit(2);
}

/// xorshift64*: deterministic data, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const WORDS: &[&str] = &[
    "the",
    "customer",
    "reported",
    "that",
    "their",
    "order",
    "was",
    "delayed",
    "and",
    "asked",
    "for",
    "a",
    "refund",
    "we",
    "checked",
    "shipment",
    "status",
    "with",
    "carrier",
    "it",
    "is",
    "in",
    "transit",
    "warehouse",
    "confirmed",
    "package",
    "left",
    "on",
    "time",
    "agent",
    "escalated",
    "ticket",
    "to",
    "billing",
    "team",
    "who",
    "approved",
    "partial",
    "credit",
    "account",
    "updated",
    "notes",
    "added",
    "follow",
    "up",
    "scheduled",
    "next",
    "week",
    "product",
    "arrived",
    "damaged",
    "replacement",
    "sent",
    "subscription",
    "renewed",
    "plan",
    "upgraded",
    "invoice",
    "corrected",
    "tax",
    "exemption",
    "applied",
    "login",
    "issue",
    "resolved",
    "after",
    "cache",
    "cleared",
    "browser",
    "mobile",
    "app",
    "crashed",
    "during",
    "checkout",
    "logs",
    "attached",
    "engineering",
    "investigating",
    "root",
    "cause",
    "deploy",
    "rolled",
    "back",
    "latency",
    "spike",
    "region",
    "database",
    "migration",
    "completed",
    "without",
    "errors",
    "discount",
    "code",
    "expired",
    "manager",
    "approval",
    "pending",
    "review",
    "closed",
    "satisfied",
    "survey",
    "score",
    "positive",
    "feedback",
    "feature",
    "request",
    "logged",
    "roadmap",
    "quarterly",
    "report",
    "exported",
    "dashboard",
    "metrics",
    "show",
    "improvement",
    "retention",
    "churn",
    "risk",
    "low",
    "medium",
    "high",
    "priority",
    "support",
    "hours",
    "weekend",
    "holiday",
];

/// A piece of ordinary text that looks like data but is not sensitive.
fn benign_token(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => format!("order #{}", 10_000 + rng.below(90_000)),
        1 => format!("${}.{:02}", rng.below(2000), rng.below(100)),
        2 => format!("2024-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28)),
        3 => format!("at {:02}:{:02}", rng.below(24), rng.below(60)),
        4 => format!("v{}.{}.{}", rng.below(5), rng.below(20), rng.below(50)),
        5 => format!("{}%", rng.below(100)),
        6 => format!("https://help.example.com/articles/{}", rng.below(100_000)),
        7 => format!("Status: {}", rng.pick(&["open", "resolved", "pending"])),
        8 => format!("ref={}", rng.below(1_000_000)),
        _ => format!("qty {}", rng.below(50)),
    }
}

/// One sensitive item (each one is a detector hit).
fn pii_token(rng: &mut Rng) -> &'static str {
    rng.pick(&[
        "call me at (415) 555-0123",
        "card 4111 1111 1111 1111 exp 09/27",
        "SSN 123-45-6789",
        "wire to GB82 WEST 1234 5698 7654 32",
        "from 203.0.113.42",
        "client 2001:db8::42",
        "key AKIAIOSFODNN7EXAMPLE",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        "Authorization: Bearer abcdef0123456789",
        "password=hunter2",
        "mobile +44 20 7946 0958",
        "reach alice.smith@example.com",
    ])
}

fn comment(rng: &mut Rng, bytes: usize, pii: bool, number_every: usize) -> String {
    let mut text = String::with_capacity(bytes + 200);
    let mut hits = if pii { 1 + rng.below(3) } else { 0 };
    while text.len() < bytes {
        let sentence_words = 8 + rng.below(12);
        for w in 0..sentence_words {
            if w > 0 {
                text.push(' ');
            }
            if rng.below(number_every) == 0 {
                text.push_str(&benign_token(rng));
            } else if hits > 0 && rng.below(150) == 0 {
                text.push_str(pii_token(rng));
                hits -= 1;
            } else {
                text.push_str(rng.pick(WORDS));
            }
        }
        text.push_str(". ");
    }
    if hits > 0 {
        text.push_str(pii_token(rng));
    }
    text
}

fn data_row(fields: &[String]) -> Vec<u8> {
    let mut body = (fields.len() as u16).to_be_bytes().to_vec();
    for f in fields {
        body.extend_from_slice(&(f.len() as i32).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    body
}

/// DataRow bodies; `pii_every`: one row in N carries PII (0: none).
/// The shape of a generated result set.
struct Profile {
    /// One row in N carries PII (0: none).
    pii_every: usize,
    /// One word in N of a comment is a number-like token (order number, price, date, ...).
    number_every: usize,
    seed: u64,
}

fn result_set(rows: usize, row_bytes: usize, p: &Profile) -> Vec<Vec<u8>> {
    let (pii_every, seed) = (p.pii_every, p.seed);
    let mut rng = Rng(seed);
    (0..rows)
        .map(|i| {
            let pii = pii_every != 0 && rng.below(pii_every) == 0;
            let contact = if pii {
                format!("{}.{}@example.com", rng.pick(&["alice", "bob", "carol"]), i)
            } else {
                format!("{} support tier", rng.pick(&["gold", "silver", "basic"]))
            };
            data_row(&[
                (1_000_000 + i).to_string(),
                format!(
                    "{} {}",
                    rng.pick(&["Ada", "Grace", "Alan", "Edsger"]),
                    rng.pick(&["Lovelace", "Hopper", "Turing"])
                ),
                format!(
                    "2024-05-{:02} {:02}:{:02}:{:02}.123456+00",
                    1 + rng.below(28),
                    rng.below(24),
                    rng.below(60),
                    rng.below(60)
                ),
                rng.pick(&["open", "resolved", "pending"]).to_owned(),
                format!("{}.{:02}", rng.below(10_000), rng.below(100)),
                contact,
                comment(&mut rng, row_bytes.saturating_sub(150), pii, p.number_every),
            ])
        })
        .collect()
}

/// A checksum a regex match must also pass (Luhn, mod-97).
type Validator = fn(&str) -> bool;

/// The same detectors as plain regexes, one per detector; validators where the detector has a checksum.
struct RegexBaseline {
    detectors: Vec<(Regex, Option<Validator>)>,
}

fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    (13..=19).contains(&digits.len())
        && digits
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &d)| {
                if i % 2 == 1 {
                    if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
                } else {
                    d
                }
            })
            .sum::<u32>()
            % 10
            == 0
}

fn iban_ok(s: &str) -> bool {
    let c: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    let (head, tail) = c.split_at(4);
    tail.iter().chain(head).fold(0u32, |r, &c| {
        if c.is_ascii_digit() {
            (r * 10 + u32::from(c - b'0')) % 97
        } else {
            (r * 100 + u32::from(c - b'A') + 10) % 97
        }
    }) == 1
}

impl RegexBaseline {
    fn new() -> RegexBaseline {
        let re = |p: &str| Regex::new(p).expect("baseline regex");
        RegexBaseline {
            detectors: vec![
                (
                    re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
                    None,
                ),
                (
                    re(
                        r"\+[1-9][0-9 ().-]{6,20}[0-9]|(?:\b1[ .-])?(?:\([2-9][0-9]{2}\) ?|\b[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}\b",
                    ),
                    None,
                ),
                (re(r"\b[2-6][0-9]{2,}(?:[ -]?[0-9]{3,}){0,4}\b"), Some(luhn)),
                (re(r"\b[0-8][0-9]{2}[- ][0-9]{2}[- ][0-9]{4}\b"), None),
                (
                    re(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
                    Some(iban_ok),
                ),
                (
                    re(
                        r"\b(?:(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(?:/[0-9]{1,2})?\b",
                    ),
                    None,
                ),
                (
                    re(
                        r"(?i)\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|\b(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}(?::[0-9a-f]{1,4})*)?|::(?:[0-9a-f]{1,4}:){0,6}[0-9a-f]{1,4}\b",
                    ),
                    None,
                ),
                (re(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), None),
                (
                    re(r"\beyJ[A-Za-z0-9_-]{7,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"),
                    None,
                ),
                (
                    re(
                        r"-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY(?: BLOCK)?-----|$)",
                    ),
                    None,
                ),
                (
                    re(
                        r"(?i)\bbearer +[A-Za-z0-9._~+/=-]{8,}|(?i)authorization[\x22']?\s*[:=]\s*[A-Za-z]+ [A-Za-z0-9._~+/=-]{8,}",
                    ),
                    None,
                ),
                (
                    re(
                        r#"(?i)[A-Za-z0-9_.-]*(?:password|passwd|pwd|passphrase|secret|token|api_?key|api-key|access_key|private_key|credential)[A-Za-z0-9_.-]*["']?\s*[:=]\s*["']?[^\s"',;&]+|://[^/\s:@]+:[^/\s@]+@"#,
                    ),
                    None,
                ),
                (
                    re(
                        r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}|xox[baprs]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}|[sr]k_live_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{20,}|AIza[A-Za-z0-9_-]{35}|glpat-[A-Za-z0-9_-]{20,})",
                    ),
                    None,
                ),
            ],
        }
    }

    /// Same contract as `mask_data_row`: `Ok(true)` and a rewritten DataRow in `out` when anything matched.
    fn mask_data_row(&self, body: &[u8], out: &mut Vec<u8>) -> bool {
        const TEXT_COLUMNS: [bool; COLUMNS.len()] = {
            let mut text = [false; COLUMNS.len()];
            let mut i = 0;
            while i < COLUMNS.len() {
                text[i] = COLUMNS[i].2;
                i += 1;
            }
            text
        };
        self.mask_row(body, &TEXT_COLUMNS, out)
    }

    /// `mask_data_row` over the wide rows: every column but the id is text.
    fn mask_wide_row(&self, body: &[u8], out: &mut Vec<u8>) -> bool {
        self.mask_row(body, &[false, true, true, true, true, true], out)
    }

    /// Scans the fields flagged in `text_columns`.
    fn mask_row(&self, body: &[u8], text_columns: &[bool], out: &mut Vec<u8>) -> bool {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut fields = Vec::with_capacity(text_columns.len());
        let mut pos = 2;
        for &text in text_columns {
            let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
            let start = pos + 4;
            let end = start + len.max(0) as usize;
            fields.push((start, end, text && len >= 0));
            pos = end;
        }
        let mut changed = false;
        let mut rewritten: Vec<Option<String>> = vec![None; fields.len()];
        for (i, &(start, end, text)) in fields.iter().enumerate() {
            if !text {
                continue;
            }
            let Ok(value) = std::str::from_utf8(&body[start..end]) else {
                continue;
            };
            spans.clear();
            for (re, validate) in &self.detectors {
                spans.extend(
                    re.find_iter(value)
                        .filter(|m| validate.is_none_or(|v| v(m.as_str())))
                        .map(|m| (m.start(), m.end())),
                );
            }
            if spans.is_empty() {
                continue;
            }
            spans.sort_unstable();
            let mut masked = String::with_capacity(value.len());
            let mut last = 0;
            for &(a, b) in &spans {
                if a < last {
                    last = last.max(b);
                    continue;
                }
                masked.push_str(&value[last..a]);
                masked.push_str("****");
                last = b;
            }
            masked.push_str(&value[last..]);
            rewritten[i] = Some(masked);
            changed = true;
        }
        if changed {
            let start = out.len();
            out.push(b'D');
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&body[..2]);
            for (&(s, e, _), new) in fields.iter().zip(&rewritten) {
                let v = new.as_deref().map_or(&body[s..e], str::as_bytes);
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
            let len = (out.len() - start - 1) as u32;
            out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
        }
        changed
    }
}

struct Run {
    mb_per_s: f64,
    changed_rows: usize,
}

/// On-CPU time of this thread: MB/s per core stays meaningful on a machine shared with other work,
/// where wall time would also count time spent waiting for a CPU.
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Runs `mask` over every row `reps` times; returns the median throughput per CPU second.
fn measure(
    rows: &[Vec<u8>],
    reps: usize,
    mut mask: impl FnMut(&[u8], &mut Vec<u8>) -> bool,
) -> Run {
    let bytes: usize = rows.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut changed_rows = 0;
    let mut rates: Vec<f64> = (0..reps + 1)
        .map(|_| {
            changed_rows = 0;
            let (wall, cpu) = (Instant::now(), thread_cpu_time());
            for row in rows {
                out.clear();
                changed_rows += usize::from(mask(black_box(row), &mut out));
                black_box(&out);
            }
            let spent = match (cpu, thread_cpu_time()) {
                (Some(a), Some(b)) if b > a => b - a,
                _ => wall.elapsed(),
            };
            bytes as f64 / spent.as_secs_f64() / 1e6
        })
        .skip(1) // warm-up
        .collect();
    rates.sort_by(f64::total_cmp);
    Run {
        mb_per_s: rates[rates.len() / 2],
        changed_rows,
    }
}

fn main() {
    let args = parse_args();
    let rows = args.batches * 100;
    let profiles = [
        (
            "clean",
            Profile {
                pii_every: 0,
                number_every: 12,
                seed: 0x5eed_0001,
            },
        ),
        (
            "pii",
            Profile {
                pii_every: 10,
                number_every: 12,
                seed: 0x5eed_0002,
            },
        ),
        (
            "clean, sparse numbers",
            Profile {
                pii_every: 0,
                number_every: 40,
                seed: 0x5eed_0003,
            },
        ),
    ];
    // `--set sparse` names `clean, sparse numbers`.
    let chosen = |label: &str| {
        args.set
            .as_deref()
            .is_none_or(|set| label == set || (set == "sparse" && label == "clean, sparse numbers"))
    };
    let sets: Vec<(&str, Vec<Vec<u8>>)> = profiles
        .iter()
        .filter(|(label, _)| chosen(label))
        .map(|(label, p)| (*label, result_set(rows, args.row_bytes, p)))
        .collect();

    let rules = match &args.detectors {
        None => MaskRules::builtin_pii(),
        Some(list) => {
            let quoted: Vec<String> = list
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| format!("\"{d}\""))
                .collect();
            toml::from_str(&format!("detectors = [{}]", quoted.join(","))).unwrap_or_else(|e| {
                eprintln!("mask_scan: --detectors: {e}");
                std::process::exit(2)
            })
        }
    };
    let masker = Masker::new(&rules).expect("mask rules compile");
    let cols: Vec<Column<'_>> = COLUMNS
        .iter()
        .map(|&(name, type_oid, _)| Column {
            name: name.as_bytes(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            format: 0,
        })
        .collect();
    let plan: ResultPlan = masker.plan(&cols, &|_, _| None);
    let baseline = RegexBaseline::new();

    println!(
        "mask_scan: {rows} rows of ~{} KB per set (batches of 100), {} reps, one thread, MB/s per CPU-second",
        args.row_bytes / 1024,
        args.reps
    );
    println!(
        "  rules: {}; comments: a number-like token every 12 words (every 40 in the sparse set); pii: ~10% of rows",
        args.detectors.as_deref().map_or(
            "built-in PII (all 12 detectors, column names)".to_owned(),
            |d| format!("detectors {d}")
        )
    );
    println!(
        "{:<46} {:>13} {:>14}",
        "", "MB/s (median)", "rows rewritten"
    );
    let run = |side: &str| args.only.as_ref().is_none_or(|only| only == side);
    let mut results = Vec::new();
    for (label, set) in sets.iter().filter(|_| !args.wide_only) {
        let skipped = || Run {
            mb_per_s: f64::NAN,
            changed_rows: 0,
        };
        let ours = if run("portcullis") {
            // With a buffer for replaced values kept across rows, as the gateway's filter does.
            let mut values = Vec::new();
            measure(set, args.reps, |row, out| {
                plan.mask_data_row_in(row, out, &mut values)
                    .expect("well-formed rows")
            })
        } else {
            skipped()
        };
        let theirs = if run("regex") {
            measure(set, args.reps, |row, out| baseline.mask_data_row(row, out))
        } else {
            skipped()
        };
        println!(
            "{:<46} {:>13.0} {:>14}",
            format!("portcullis mask_data_row, {label}"),
            ours.mb_per_s,
            ours.changed_rows
        );
        println!(
            "{:<46} {:>13.0} {:>14}",
            format!("regex baseline, {label}"),
            theirs.mb_per_s,
            theirs.changed_rows
        );
        results.push((*label, ours.mb_per_s, theirs.mb_per_s));
    }
    if args.set.is_none() {
        wide_rows(&masker, &args, &baseline, &run);
    }
    for (label, ours, theirs) in results {
        let goal = if label == "pii" { 1000 } else { 2000 };
        println!(
            "{label}: portcullis {ours:.0} MB/s = {:.1}× regex (goal {goal} MB/s)",
            ours / theirs
        );
    }
}

/// Bigger than the L2 of the CPUs this runs on (1–2 MiB a core), so a write over it evicts it.
const EVICT_BYTES: usize = 8 << 20;

/// The median µs per 100-row result, timed one result at a time over `reps` passes (after a
/// warm-up pass). With `evict`, each result starts after [`EVICT_BYTES`] written and the result's
/// rows read back, outside the timed part.
fn per_result_us(
    set: &[Vec<u8>],
    reps: usize,
    evict: bool,
    mut mask: impl FnMut(&[u8], &mut Vec<u8>) -> bool,
) -> f64 {
    let mut out = Vec::with_capacity(64 * 1024);
    let mut junk = if evict {
        vec![0u8; EVICT_BYTES]
    } else {
        Vec::new()
    };
    let mut times: Vec<f64> = Vec::new();
    for rep in 0..=reps {
        for (i, result) in set.chunks(100).enumerate() {
            if evict {
                let stamp = (rep * 131 + i) as u8;
                for line in junk.chunks_mut(64) {
                    line[0] = stamp;
                }
                black_box(&junk);
                let touched: u64 = result.iter().flatten().map(|&b| u64::from(b)).sum();
                black_box(touched);
            }
            let start = Instant::now();
            for row in result {
                out.clear();
                mask(black_box(row), &mut out);
                black_box(&out);
            }
            let spent = start.elapsed();
            if rep > 0 {
                times.push(spent.as_secs_f64() * 1e6 * 100.0 / result.len() as f64);
            }
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The harness's `bench_wide` rows (`bench/src/runner.rs`): id, customer, email, card_number, city,
/// note; one row in ten has an email and a card number.
fn wide_result(rows: usize) -> Vec<Vec<u8>> {
    const CARDS: [&str; 5] = [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "4012888888881881",
    ];
    const CITIES: [&str; 6] = ["Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Quito"];
    let mut rng = Rng(0x5eed_0004);
    (1..=rows)
        .map(|g| {
            let note: String = (0..48)
                .map(|_| char::from(b"0123456789abcdef"[rng.below(16)]))
                .collect();
            let pii = g % 10 == 3;
            let mut body = 6u16.to_be_bytes().to_vec();
            let mut field = |v: Option<String>| match v {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v.as_bytes());
                }
            };
            field(Some(g.to_string()));
            field(Some(format!("customer {g}")));
            field(pii.then(|| format!("customer{g}@example.com")));
            field(pii.then(|| CARDS[(1 + g) % 5].to_owned()));
            field(Some(CITIES[(1 + g) % 6].to_owned()));
            field(Some(note));
            body
        })
        .collect()
}

/// The built-in `default` policy's `[mask]` rules, as the harness's `gateway-policy` target masks
/// with them: besides the detectors, emails and card numbers by column name, in `partial` style.
fn default_policy_masker() -> Masker {
    let policy = portcullis::policy::load("default").expect("the built-in default policy");
    let rules = MaskRules::from_policy(&policy).expect("the default policy's [mask] rules");
    Masker::new(&rules).expect("mask rules compile")
}

fn wide_rows(masker: &Masker, args: &Args, baseline: &RegexBaseline, run: &dyn Fn(&str) -> bool) {
    let cols: Vec<Column<'_>> = wide::COLUMNS
        .iter()
        .map(|&(name, type_oid)| Column {
            name: name.as_bytes(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            format: 0,
        })
        .collect();
    let plan = masker.plan(&cols, &|_, _| None);
    let policy_plan = default_policy_masker().plan(&cols, &|_, _| None);
    let set = wide_result(100 * args.batches.max(10));
    let bytes: usize = set.iter().map(Vec::len).sum();
    let per_result = |r: &Run| bytes as f64 / r.mb_per_s / (set.len() as f64 / 100.0);
    if run("portcullis") {
        let mut values = Vec::new();
        let ours = measure(&set, args.reps, |row, out| {
            plan.mask_data_row_in(row, out, &mut values)
                .expect("well-formed rows")
        });
        println!(
            "{:<46} {:>13.0} {:>14}   {:.1} µs per 100-row result",
            "portcullis mask_data_row, wide rows",
            ours.mb_per_s,
            ours.changed_rows,
            per_result(&ours)
        );
        let policy = measure(&set, args.reps, |row, out| {
            policy_plan
                .mask_data_row_in(row, out, &mut values)
                .expect("well-formed rows")
        });
        println!(
            "{:<46} {:>13.0} {:>14}   {:.1} µs per 100-row result",
            "portcullis, wide rows, `default` policy",
            policy.mb_per_s,
            policy.changed_rows,
            per_result(&policy)
        );
    }
    if run("portcullis") && args.cold {
        let mask = |row: &[u8], out: &mut Vec<u8>| {
            policy_plan
                .mask_data_row(row, out)
                .expect("well-formed rows")
        };
        for (label, evict) in [("warm", false), ("cold", true)] {
            println!(
                "{:<46} {:>13} {:>14}   {:.1} µs per 100-row result",
                format!("portcullis, wide rows, `default`, {label}"),
                "-",
                "-",
                per_result_us(&set, args.reps, evict, mask)
            );
        }
    }
    if run("portcullis") && args.core {
        core_results(&set, args.reps);
    }
    if run("regex") {
        // The baseline reads the ticket table's layout; give it the wide rows' text columns.
        let theirs = measure(&set, args.reps, |row, out| baseline.mask_wide_row(row, out));
        println!(
            "{:<46} {:>13.0} {:>14}   {:.1} µs per 100-row result",
            "regex baseline, wide rows",
            theirs.mb_per_s,
            theirs.changed_rows,
            per_result(&theirs)
        );
    }
}

/// `--core`: one wide-row result at a time through the session core's `on_backend`, as the
/// gateway's server→client pump drives it: BindComplete, RowDescription, 100 DataRows,
/// CommandComplete and ReadyForQuery, answering a prepared statement's Bind/Describe/Execute/Sync,
/// and then the output's segments gathered into one buffer to write, and patched back over the
/// response instead, as the pump does when masking cut the output into pieces. Once with no
/// filter, once with the `default` policy's masking and a lineage that knows `bench_wide`.
/// Median wall-clock µs per result.
fn core_results(set: &[Vec<u8>], reps: usize) {
    const SQL: &str = "SELECT id, customer, email, card_number, city, note FROM bench_wide \
                       WHERE id BETWEEN $1 AND $1 + 99";
    let masker = default_policy_masker();
    let catalog = catalog_from_specs(
        &masker,
        &["bench_wide(id int4, customer, email, card_number, city, note)".into()],
        &[],
    )
    .expect("the bench_wide spec");
    // The table `catalog_from_specs` made: the first oid it hands out.
    let table_oid = 16385;
    let fields: Vec<FieldDesc<'_>> = wide::COLUMNS
        .iter()
        .enumerate()
        .map(|(i, &(name, type_oid))| FieldDesc {
            name: name.as_bytes(),
            table_oid,
            attnum: i as i16 + 1,
            type_oid,
            type_len: if type_oid == INT4 { 4 } else { -1 },
            type_mod: -1,
            format: 0,
        })
        .collect();
    let mut row_description = Vec::new();
    encode_row_description(&fields, &mut row_description);
    let responses: Vec<Vec<u8>> = set
        .chunks(100)
        .map(|rows| {
            let mut wire = message(b'2', b"");
            wire.extend_from_slice(&row_description);
            for row in rows {
                wire.extend_from_slice(&message(b'D', row));
            }
            wire.extend_from_slice(&message(b'C', b"SELECT 100\0"));
            encode_ready_for_query(b'I', &mut wire);
            wire
        })
        .collect();
    // What pgbench -M prepared sends: Parse once, then Bind, Describe, Execute and Sync.
    let mut prepared = BytesMut::new();
    frontend::parse("s", SQL, std::iter::empty(), &mut prepared).expect("a Parse");
    frontend::sync(&mut prepared);
    let mut request = BytesMut::new();
    frontend::bind(
        "",
        "s",
        std::iter::empty(),
        ["1"],
        |v, buf| {
            buf.extend_from_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        Some(0),
        &mut request,
    )
    .unwrap_or_else(|_| unreachable!("one text parameter always binds"));
    frontend::describe(b'P', "", &mut request).expect("a Describe");
    frontend::execute("", 0, &mut request).expect("an Execute");
    frontend::sync(&mut request);
    let mut parsed = message(b'1', b"");
    encode_ready_for_query(b'I', &mut parsed);

    let lineage = Rc::new(RefCell::new(SessionLineage::new(Arc::new(catalog))));
    let mut masking = MaskFilter::new(masker, Some(lineage));
    for (label, filter, masks) in [
        ("no filter", &mut NoFilter as &mut dyn ResultFilter, false),
        ("`default` policy", &mut masking, true),
    ] {
        let mut session = Session::new(1 << 20);
        session.keep_statements();
        let mut out = Output::default();
        session
            .on_frontend(&prepared, &mut AllowAll, &mut out)
            .expect("a well-formed Parse");
        out.clear();
        session
            .on_backend(&parsed, filter, &mut out)
            .expect("a well-formed ParseComplete");
        let mut core = Vec::new();
        let mut gathered = Vec::new();
        let mut patched = Vec::new();
        let mut work = Vec::new();
        let mut all_patched = true;
        let mut segments = 0;
        for rep in 0..=reps {
            for response in &responses {
                out.clear();
                session
                    .on_frontend(&request, &mut AllowAll, &mut out)
                    .expect("a well-formed request");
                out.clear();
                let start = Instant::now();
                session
                    .on_backend(black_box(response), filter, &mut out)
                    .expect("a well-formed response");
                let framed = Instant::now();
                let mut whole = Vec::new();
                out.gather(response, &mut whole);
                black_box(&whole);
                let written = Instant::now();
                // What the pump does first: the rewritten rows back over the ones they replace,
                // on a copy of the response (this loop reads each response again).
                work.clear();
                work.extend_from_slice(response);
                let before_patch = Instant::now();
                let whole = out.patch_into(black_box(&mut work));
                let after_patch = Instant::now();
                segments = out.segments().len();
                all_patched &= whole.is_some();
                if rep > 0 {
                    core.push((framed - start).as_secs_f64() * 1e6);
                    gathered.push((written - framed).as_secs_f64() * 1e6);
                    patched.push((after_patch - before_patch).as_secs_f64() * 1e6);
                }
            }
        }
        // One row in ten holds an email and a card number: masked, the output is in pieces.
        assert_eq!(segments > 1, masks, "{label}: {segments} output pieces");
        // The `partial` style keeps a value's length, so every masked row goes back in place.
        assert!(
            all_patched,
            "{label}: an output that could not be patched in place"
        );
        for times in [&mut core, &mut gathered, &mut patched] {
            times.sort_by(f64::total_cmp);
        }
        println!(
            "{:<46} {:>13} {:>14}   {:.2} µs in the core + {:.2} µs to gather {segments} segments \
             (or {:.2} µs to patch them in place)",
            format!("session core, wide rows, {label}"),
            "-",
            "-",
            core[core.len() / 2],
            gathered[gathered.len() / 2],
            patched[patched.len() / 2],
        );
    }
}

/// A backend message the gateway has no encoder for: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

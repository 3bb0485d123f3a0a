//! `portcullis recordings ...`: read the recording directory directly, no gateway needed.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::checkpoint::{Signer, Verifier, pub_path};
use super::index::{Filter, Index, SessionRow};
use super::segment::{Segment, list_segments};
use super::texts::Texts;
use super::types::{Action, Entry, Record, Row};
use super::verify::{TOMBSTONES, Tombstone, tombstone_body, verify};

const DEFAULT_KEY: &str = "/var/lib/portcullis/keys/recording.key";

/// The public keys where the gateway keeps them for a recording directory `dir`: the state dir
/// holds both `recordings/` and `keys/`.
fn default_pubkey(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(state) if !state.as_os_str().is_empty() => {
            pub_path(&state.join("keys").join("recording.key"))
        }
        _ => pub_path(Path::new(DEFAULT_KEY)),
    }
}

#[derive(clap::Args, Debug)]
pub struct RecordingsArgs {
    /// The recording directory [default: where --config puts it: `[recording] dir`, or
    /// `recordings` in the state directory].
    #[arg(long, env = "PORTCULLIS_RECORDINGS_DIR", global = true)]
    dir: Option<PathBuf>,
    /// TOML configuration file, read for the recording directory and signing key
    /// [default: the embedded default].
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory, overriding the configuration's.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: RecordingsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum RecordingsCommand {
    /// Recorded sessions, oldest first.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// An RFC 3339 time or date, or an age like 2h.
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Sessions with a statement that got this verdict (allow, block, hold, approved, denied).
        #[arg(long)]
        verdict: Option<String>,
        /// Sessions with a statement decided by this rule.
        #[arg(long)]
        rule: Option<String>,
        /// Sessions with a statement containing this text, as a phrase (full-text search). The
        /// search first adds the statements recorded since the last one to its index.
        #[arg(long)]
        grep: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A session as a transcript: statements, verdicts, result tables (masked) and timings.
    Show { id: u64 },
    /// Plays a session back in real time.
    Replay {
        id: u64,
        /// 2 plays twice as fast; 0 does not wait.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Checks CRCs, Merkle roots, signatures and checkpoint consistency. Exit codes: 2 tampered,
    /// 3 truncated, 4 key missing.
    Verify {
        /// A checkpoint kept elsewhere (e.g. shipped off the host) the log must still contain.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The recorder's public keys (`<key_file>.pub`) [default: `keys/recording.key.pub`
        /// beside the recording directory, as `[recording] key_file` defaults].
        #[arg(long)]
        pubkey: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Every record as JSON lines, or as OCSF 6005 Datastore Activity events.
    Export {
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
    },
    /// Deletes whole segments older than a date, leaving a signed tombstone.
    Prune {
        /// An RFC 3339 time or date, or an age like 30d.
        #[arg(long, value_parser = parse_time)]
        before: i64,
        /// The signing key [default: `[recording] key_file` of --config].
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Makes a new signing key; the old public key stays in the `.pub` file. Restart the gateway
    /// to sign with the new key.
    RotateKey {
        /// The signing key [default: `[recording] key_file` of --config].
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The key name (the checkpoint origin).
        #[arg(long)]
        origin: Option<String>,
    },
    /// Writes synthetic sessions through the recorder until killed (crash tests and benches).
    #[command(hide = true)]
    Load {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long, default_value_t = u64::MAX)]
        sessions: u64,
        #[arg(long, default_value_t = 20)]
        rows: usize,
        #[arg(long, default_value_t = 1 << 20)]
        commit_bytes: usize,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Ocsf,
}

/// Where the recordings and the signing key are, as the gateway has them: from the configuration
/// (`--config`, `--state-dir`, else the embedded default), unless `--dir` alone names the
/// directory (then there is no configured key: `None`).
fn locate(args: &RecordingsArgs) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    if let Some(dir) = &args.dir
        && args.config.is_none()
        && args.state_dir.is_none()
    {
        return Ok((dir.clone(), None));
    }
    let cfg = crate::config::Config::from_args(&crate::config::ServeArgs {
        config: args.config.clone(),
        state_dir: args.state_dir.clone(),
        ..Default::default()
    })?;
    let rec = &cfg.recording;
    let dir = args.dir.clone().unwrap_or_else(|| rec.dir(&cfg.state_dir));
    Ok((dir, Some(rec.key_file(&cfg.state_dir))))
}

/// Runs a subcommand. `verify` exits the process with its own code when it finds a problem.
pub fn run(args: RecordingsArgs) -> anyhow::Result<()> {
    let (dir, key) = locate(&args)?;
    let dir = &dir;
    let key_or_default = |given: Option<PathBuf>| {
        given
            .or_else(|| key.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_KEY))
    };
    match args.command {
        RecordingsCommand::List {
            agent,
            subject,
            target,
            since,
            until,
            verdict,
            rule,
            grep,
            json,
        } => {
            let filter = Filter {
                agent,
                subject,
                target,
                since_us: since,
                until_us: until,
                verdict,
                rule,
            };
            let mut rows = open_index(dir)?.list(&filter)?;
            if let Some(text) = grep {
                let matching = search(dir, &text)?;
                rows.retain(|r| matching.contains(&r.id));
            }
            print!("{}", render_list(&rows, json));
            Ok(())
        }
        RecordingsCommand::Show { id } => play(dir, id, None),
        RecordingsCommand::Replay { id, speed } => play(dir, id, Some(speed)),
        RecordingsCommand::Verify {
            checkpoint,
            pubkey,
            json,
        } => {
            let pubkey = pubkey.unwrap_or_else(|| match &key {
                Some(key) => pub_path(key),
                None => default_pubkey(dir),
            });
            let verifiers = match Verifier::read_file(&pubkey) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("KEY MISSING: {}: {e:#}", pubkey.display());
                    std::process::exit(super::verify::Failure::KeyMissing.exit_code().into());
                }
            };
            let external = checkpoint
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            match verify(dir, &verifiers, external.as_deref())? {
                Ok(report) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", render_report(&report));
                    }
                    Ok(())
                }
                Err(p) => {
                    eprintln!("{p}");
                    std::process::exit(p.kind.exit_code().into());
                }
            }
        }
        RecordingsCommand::Export {
            format,
            since,
            until,
        } => export(dir, format, since, until, &mut std::io::stdout().lock()),
        RecordingsCommand::Prune { before, key_file } => {
            let (removed, first) = prune(dir, &key_or_default(key_file), before)?;
            println!("removed {removed} segment(s); the log now starts at record {first}");
            Ok(())
        }
        RecordingsCommand::RotateKey { key_file, origin } => {
            let key_file = key_or_default(key_file);
            let origin = origin.unwrap_or_else(|| super::RecordingConfig::default().origin());
            let signer = Signer::rotate(&key_file, &origin)?;
            println!(
                "new key {} ({}); public keys in {}",
                signer.key_id_hex(),
                key_file.display(),
                pub_path(&key_file).display()
            );
            Ok(())
        }
        RecordingsCommand::Load {
            key_file,
            sessions,
            rows,
            commit_bytes,
        } => load(dir, &key_file, sessions, rows, commit_bytes),
    }
}

fn open_index(dir: &Path) -> anyhow::Result<Index> {
    if !dir.join(super::index::INDEX_FILE).exists() {
        bail!(
            "{} holds no recording index (is `[recording] dir` right?)",
            dir.display()
        );
    }
    Index::open(dir).with_context(|| format!("opening the index in {}", dir.display()))
}

/// The sessions with a statement that holds `text`, after the full-text index takes in what
/// was recorded since the last search, as far as the session index got.
fn search(dir: &Path, text: &str) -> anyhow::Result<BTreeSet<u64>> {
    let until = open_index(dir)?.indexed_seq()?;
    let path = dir.join(super::texts::TEXTS_FILE);
    let mut texts = Texts::open(dir)
        .with_context(|| format!("opening the full-text index {}", path.display()))?;
    texts
        .catch_up(dir, until)
        .with_context(|| format!("bringing the full-text index {} up to date", path.display()))?;
    Ok(texts.sessions_matching(text)?)
}

/// RFC 3339 (or a bare date), or an age before now ("2h", "30d").
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(age) = humantime::parse_duration(s) {
        return Ok(super::now_us() - age.as_micros() as i64);
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    humantime::parse_rfc3339_weak(&full)
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64)
        })
        .map_err(|e| {
            format!("{s:?} is neither a time like 2026-11-30T14:00:00Z nor an age like 2h: {e}")
        })
}

pub(crate) fn time(us: i64) -> String {
    use std::fmt::Write as _;
    let t = std::time::UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    let mut out = String::new();
    // RFC 3339 stops at year 9999: only a forged or damaged record holds a later time.
    if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_err() {
        return format!("{us} µs after the epoch");
    }
    out
}

fn clock(us: i64) -> String {
    let t = time(us);
    t.get(11..23).map_or_else(|| t.clone(), str::to_owned)
}

fn render_list(rows: &[SessionRow], json: bool) -> String {
    if json {
        return serde_json::to_string_pretty(rows).expect("rows serialize") + "\n";
    }
    let mut out = format!(
        "{:<8} {:<24} {:<12} {:<16} {:<12} {:>6} {:>7}  {}\n",
        "ID", "STARTED", "AGENT", "SUBJECT", "TARGET", "STMTS", "BLOCKED", "END"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:<24} {:<12} {:<16} {:<12} {:>6} {:>7}  {}",
            r.id,
            time(r.started_us),
            r.agent.as_deref().unwrap_or("-"),
            r.subject.as_deref().unwrap_or("-"),
            r.target,
            r.statements,
            r.blocked,
            r.end_reason.as_deref().unwrap_or("(open)")
        );
    }
    out
}

fn render_report(r: &super::verify::Report) -> String {
    let mut out = format!(
        "OK: {} records in {} segment(s), {} bytes, {} checkpoint(s)\n",
        r.records, r.segments, r.bytes, r.checkpoints
    );
    if r.pruned_before > 0 {
        let _ = writeln!(
            out,
            "pruned: records before {} (signed tombstone)",
            r.pruned_before
        );
    }
    if r.unsigned_tail > 0 {
        let _ = writeln!(
            out,
            "{} record(s) after the last checkpoint",
            r.unsigned_tail
        );
    }
    for rec in &r.recoveries {
        let _ = writeln!(out, "recovery: {rec}");
    }
    if let Some(t) = &r.open_tail {
        let _ = writeln!(out, "open tail: {t}");
    }
    if let Some(n) = r.external_checkpoint {
        let _ = writeln!(out, "consistent with the given checkpoint at size {n}");
    }
    out
}

/// Every entry of one session.
pub fn session_entries(dir: &Path, id: u64) -> anyhow::Result<Vec<Entry>> {
    let range = open_index(dir)?
        .session(id)?
        .map_or((0, u64::MAX), |s| (s.first_seq, s.last_seq + 1));
    let mut out = Vec::new();
    super::read::for_each_entry(dir, range.0, range.1, |e| {
        if e.session == id {
            out.push(e);
        }
        Ok(true)
    })?;
    if out.is_empty() {
        bail!("no recording {id} in {}", dir.display());
    }
    Ok(out)
}

fn play(dir: &Path, id: u64, speed: Option<f64>) -> anyhow::Result<()> {
    let entries = session_entries(dir, id)?;
    let mut out = std::io::stdout().lock();
    let mut transcript = Transcript::default();
    let mut last_at = entries[0].at_us;
    for e in &entries {
        if let Some(speed) = speed.filter(|s| *s > 0.0) {
            let gap = (e.at_us - last_at).max(0) as f64 / speed;
            std::thread::sleep(Duration::from_micros(gap as u64).min(Duration::from_secs(10)));
        }
        last_at = e.at_us;
        let text = transcript.entry(e);
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    out.write_all(transcript.finish().as_bytes())?;
    Ok(())
}

/// Renders entries like a psql session; result tables are printed when complete.
#[derive(Default)]
pub struct Transcript {
    columns: Vec<String>,
    rows: Vec<Row>,
    /// The statement the lines above belong to: a reply to another one (pipelined) says whose.
    shown: u32,
}

fn cell(v: &Option<super::Bytes>) -> String {
    match v {
        None => String::new(),
        Some(b) => match std::str::from_utf8(&b.0) {
            Ok(s) => s.to_owned(),
            Err(_) => format!(
                "\\x{}",
                b.0.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
        },
    }
}

impl Transcript {
    pub fn entry(&mut self, e: &Entry) -> String {
        let mut out = String::new();
        let reply = !matches!(
            e.record,
            Record::SessionStart(_)
                | Record::Request(_)
                | Record::Verdict(_)
                | Record::CopyIn(_)
                | Record::SessionEnd { .. }
                | Record::Recovery { .. }
        );
        if let Record::Request(_) = e.record {
            self.shown = e.stmt;
        } else if reply && e.stmt != self.shown {
            self.shown = e.stmt;
            let _ = writeln!(out, "    -- reply to #{}", e.stmt);
        }
        match &e.record {
            Record::SessionStart(s) => {
                let _ = writeln!(
                    out,
                    "recording {} · {} · target {} · {}@{}\n  agent {} pid {} exe {} cgroup {}\n  \
                     subject {} groups [{}] actor {}\n  started {}",
                    e.session,
                    s.client_addr.as_deref().unwrap_or("-"),
                    s.target,
                    s.upstream_user,
                    s.database,
                    s.agent.as_deref().unwrap_or("-"),
                    s.pid.map_or("-".into(), |p| p.to_string()),
                    s.exe.as_deref().unwrap_or("-"),
                    s.cgroup.as_deref().unwrap_or("-"),
                    s.subject.as_deref().unwrap_or("-"),
                    s.groups.join(", "),
                    s.actor.as_deref().unwrap_or("-"),
                    time(e.at_us)
                );
            }
            Record::Request(r) => {
                let name = r
                    .statement
                    .as_deref()
                    .map(|n| format!(" [{n}]"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n{} #{} {:?}{name} => {}",
                    clock(e.at_us),
                    e.stmt,
                    r.kind,
                    r.text
                );
                if !r.params.is_empty() {
                    let p: Vec<String> = r
                        .params
                        .iter()
                        .map(|v| {
                            v.as_ref()
                                .map_or("NULL".into(), |_| format!("'{}'", cell(v)))
                        })
                        .collect();
                    let _ = writeln!(out, "    params: {}", p.join(", "));
                }
            }
            Record::Verdict(v) => {
                let _ = write!(out, "    {}", v.action.as_str());
                if let Some(r) = &v.rule {
                    let _ = write!(out, " (rule {r})");
                }
                if let Some(r) = &v.reason {
                    let _ = write!(out, ": {r}");
                }
                if let Some(id) = v.approval_id {
                    let _ = write!(out, " approval #{id}");
                }
                if let Some(a) = &v.approver {
                    let _ = write!(out, " by {a}");
                }
                if let Some(t) = v.decided_at_us {
                    let _ = write!(out, " at {}", time(t));
                }
                out.push('\n');
            }
            Record::Columns(c) => {
                self.columns = c.iter().map(|c| c.name.clone()).collect();
                self.rows.clear();
            }
            Record::Rows(r) => self.rows.extend(r.iter().cloned()),
            Record::CopyData(d) => {
                let _ = writeln!(out, "    COPY data: {}", cell(&Some(d.clone())).trim_end());
            }
            Record::CopyIn(d) => {
                let _ = writeln!(
                    out,
                    "    COPY data from the client: {}",
                    cell(&Some(d.clone())).trim_end()
                );
            }
            Record::Unrecorded {
                rows,
                messages,
                bytes,
            } => {
                let _ = writeln!(
                    out,
                    "    not recorded: {messages} message(s) over max_message_bytes, {rows} of \
                     them rows, {bytes} bytes in all"
                );
            }
            // `read::for_each_entry` hands a bundle's records over one by one.
            Record::Bundle(_) => {}
            Record::Notice(n) => {
                let _ = writeln!(out, "    {}: {} ({})", n.severity, n.message, n.code);
            }
            Record::Error(n) => {
                let _ = writeln!(
                    out,
                    "    {}: {} (SQLSTATE {})",
                    n.severity, n.message, n.code
                );
                if let Some(d) = &n.detail {
                    let _ = writeln!(out, "    DETAIL: {d}");
                }
            }
            Record::Notification {
                pid,
                channel,
                payload,
            } => {
                let _ = writeln!(
                    out,
                    "    Asynchronous notification \"{channel}\" with payload \"{payload}\" \
                     received from server process with PID {pid}."
                );
            }
            Record::Complete(c) => {
                out.push_str(&self.table());
                let _ = write!(
                    out,
                    "    {} · {:.3} ms · {} B in, {} B out",
                    if c.tag.is_empty() { "(failed)" } else { &c.tag },
                    c.latency_us as f64 / 1000.0,
                    c.bytes_in,
                    c.bytes_out
                );
                if let Some(t) = &c.truncated {
                    let _ = write!(
                        out,
                        " · recording cut at {} of {} rows ({} bytes, max_response_bytes)",
                        t.rows_recorded, c.rows, t.bytes_recorded
                    );
                }
                out.push('\n');
            }
            Record::SessionEnd { reason } => {
                out.push_str(&self.table());
                let _ = writeln!(out, "\n{} session ended: {reason}", clock(e.at_us));
            }
            Record::Recovery {
                segment,
                offset,
                bytes_dropped,
            } => {
                let _ = writeln!(
                    out,
                    "recorder recovered: cut {bytes_dropped} bytes at {segment}:{offset}"
                );
            }
        }
        out
    }

    pub fn finish(&mut self) -> String {
        self.table()
    }

    /// A psql-style aligned table of the rows gathered since the last column description.
    fn table(&mut self) -> String {
        if self.columns.is_empty() {
            return String::new();
        }
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(cell).collect())
            .collect();
        let mut widths: Vec<usize> = self.columns.iter().map(|c| c.chars().count()).collect();
        for r in &cells {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |vals: &[String]| {
            let parts: Vec<String> = vals
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!(" {v:<w$} "))
                .collect();
            format!("   {}\n", parts.join("|").trim_end())
        };
        let mut out = line(&self.columns);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(w + 2)).collect();
        let _ = writeln!(out, "   {}", rule.join("+"));
        for r in &cells {
            out.push_str(&line(r));
        }
        let n = cells.len();
        let _ = writeln!(out, "   ({n} row{})", if n == 1 { "" } else { "s" });
        self.columns.clear();
        self.rows.clear();
        out
    }
}

/// Writes the export to `out`.
pub fn export(
    dir: &Path,
    format: ExportFormat,
    since: Option<i64>,
    until: Option<i64>,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let in_range = |at: i64| since.is_none_or(|s| at >= s) && until.is_none_or(|u| at <= u);
    let mut ocsf = Ocsf::default();
    super::read::for_each_entry(dir, 0, u64::MAX, |e| {
        if !in_range(e.at_us) {
            return Ok(true);
        }
        match format {
            ExportFormat::Jsonl => {
                serde_json::to_writer(&mut *out, &jsonl(&e)?)?;
                out.write_all(b"\n")?;
            }
            ExportFormat::Ocsf => {
                if let Some(event) = ocsf.entry(&e) {
                    serde_json::to_writer(&mut *out, &event)?;
                    out.write_all(b"\n")?;
                }
            }
        }
        Ok(true)
    })?;
    Ok(())
}

/// One entry as `export --format jsonl` writes it.
pub(crate) fn jsonl(e: &Entry) -> serde_json::Result<serde_json::Value> {
    let mut v = serde_json::to_value(e)?;
    v["time"] = time(e.at_us).into();
    Ok(v)
}

/// Builds one OCSF 1.3 Datastore Activity (class 6005) event per statement, and one per session
/// start (Connect).
#[derive(Default)]
pub(crate) struct Ocsf {
    sessions: std::collections::HashMap<u64, super::SessionStart>,
    statements: std::collections::HashMap<(u64, u32), (i64, String, Option<super::Verdict>)>,
}

impl Ocsf {
    pub(crate) fn entry(&mut self, e: &Entry) -> Option<serde_json::Value> {
        match &e.record {
            Record::SessionStart(s) => {
                self.sessions.insert(e.session, s.clone());
                Some(self.event(e.session, e.at_us, 3, "Connect", None, None, None))
            }
            Record::Request(r) => {
                self.statements
                    .insert((e.session, e.stmt), (e.at_us, r.text.clone(), None));
                None
            }
            Record::Verdict(v) => {
                let s = self.statements.get_mut(&(e.session, e.stmt))?;
                s.2 = Some(v.clone());
                if matches!(v.action, Action::Block | Action::Denied) {
                    return self.statement_event(e, None);
                }
                None
            }
            Record::Complete(c) => self.statement_event(e, Some(c)),
            Record::SessionEnd { .. } => {
                self.sessions.remove(&e.session);
                None
            }
            _ => None,
        }
    }

    /// The event of a statement that is over: blocked, or complete.
    fn statement_event(
        &mut self,
        e: &Entry,
        complete: Option<&super::Complete>,
    ) -> Option<serde_json::Value> {
        let (at, text, verdict) = self.statements.remove(&(e.session, e.stmt))?;
        let (id, name) = activity(&text);
        Some(self.event(
            e.session,
            at,
            id,
            name,
            Some(&text),
            verdict.as_ref(),
            complete,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        session: u64,
        at_us: i64,
        activity_id: u32,
        activity_name: &str,
        query: Option<&str>,
        verdict: Option<&super::Verdict>,
        complete: Option<&super::Complete>,
    ) -> serde_json::Value {
        let s = self.sessions.get(&session).cloned().unwrap_or_default();
        let blocked = verdict.is_some_and(|v| matches!(v.action, Action::Block | Action::Denied));
        let failed = blocked || complete.is_some_and(|c| c.tag.is_empty());
        let mut ev = serde_json::json!({
            "class_uid": 6005,
            "class_name": "Datastore Activity",
            "category_uid": 6,
            "category_name": "Application Activity",
            "activity_id": activity_id,
            "activity_name": activity_name,
            "type_uid": 600500 + activity_id,
            "time": at_us / 1000,
            "severity_id": if blocked { 3 } else { 1 },
            "status_id": if failed { 2 } else { 1 },
            "status": if failed { "Failure" } else { "Success" },
            "disposition_id": if blocked { 2 } else { 1 },
            "disposition": if blocked { "Blocked" } else { "Allowed" },
            "metadata": {
                "version": "1.3.0",
                "product": { "name": "Portcullis", "vendor_name": "Portcullis" },
                "correlation_uid": session.to_string(),
            },
            "actor": {
                "user": { "name": s.subject.clone().or(s.agent.clone()), "groups": s.groups.iter().map(|g| serde_json::json!({"name": g})).collect::<Vec<_>>() },
                "process": { "pid": s.pid, "file": { "path": s.exe } },
                "session": { "uid": session.to_string() },
            },
            "database": { "name": s.database, "type": "PostgreSQL", "type_id": 99 },
            "dst_endpoint": { "name": s.target },
            "src_endpoint": { "ip": s.client_addr },
            "user": { "name": s.upstream_user },
        });
        if let Some(q) = query {
            ev["query_info"] = serde_json::json!({ "query_string": q });
        }
        if let Some(v) = verdict {
            ev["policy"] = serde_json::json!({ "name": v.rule, "desc": v.reason });
            if let Some(a) = &v.approver {
                ev["unmapped"] = serde_json::json!({ "approver": a, "approval_id": v.approval_id });
            }
        }
        if let Some(c) = complete {
            ev["duration"] = (c.latency_us / 1000).into();
            ev["count"] = c.rows.into();
            ev["message"] = c.tag.clone().into();
        }
        ev
    }
}

fn activity(text: &str) -> (u32, &'static str) {
    let verb = text
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    match verb.as_str() {
        "SELECT" | "WITH" | "SHOW" | "TABLE" | "VALUES" => (4, "Query"),
        "UPDATE" => (2, "Update"),
        "INSERT" | "COPY" => (5, "Write"),
        "CREATE" => (6, "Create"),
        "DELETE" | "DROP" | "TRUNCATE" => (7, "Delete"),
        _ => (99, "Other"),
    }
}

/// Deletes the oldest segments that ended before `before` (never the newest), after a clean
/// verify, and appends a signed tombstone first. Returns (segments removed, first kept seq).
pub fn prune(dir: &Path, key_file: &Path, before: i64) -> anyhow::Result<(usize, u64)> {
    if !key_file.exists() {
        bail!(
            "the signing key {} does not exist; pass --key-file",
            key_file.display()
        );
    }
    let verifiers = Verifier::read_file(&pub_path(key_file))
        .with_context(|| format!("reading {}", pub_path(key_file).display()))?;
    if let Err(p) = verify(dir, &verifiers, None)? {
        bail!("refusing to prune a recording that does not verify: {p}");
    }
    let segments = list_segments(dir)?;
    let mut doomed = Vec::new();
    let mut keep = None;
    for (i, (_, path)) in segments.iter().enumerate() {
        let seg = Segment::open(path).map_err(|(e, _)| e)?;
        let (blocks, _) = seg.blocks();
        let newest = blocks
            .iter()
            .map(|b| b.last_at_us)
            .max()
            .unwrap_or(seg.header.created_us);
        if i + 1 < segments.len() && newest < before && keep.is_none() {
            doomed.push((path.clone(), newest));
        } else {
            keep.get_or_insert(seg.header);
        }
    }
    let Some(first) = keep.filter(|_| !doomed.is_empty()) else {
        return Ok((0, 0));
    };
    let origin = std::fs::read_to_string(key_file)?
        .trim()
        .strip_prefix("PRIVATE+KEY+")
        .and_then(|r| r.split('+').next().map(str::to_owned))
        .context("the signing key is malformed")?;
    let signer = Signer::load_or_create(key_file, &origin)?;
    let names: Vec<String> = doomed
        .iter()
        .map(|(p, _)| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let detail = format!("before {}\nsegments {}", time(before), names.join(" "));
    let note = signer.sign(&tombstone_body(
        &origin,
        first.first_seq,
        &first.frontier,
        &detail,
    ));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join(TOMBSTONES))?;
    writeln!(f, "{}", serde_json::to_string(&Tombstone { note })?)?;
    f.sync_all()?;
    for (p, _) in &doomed {
        std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    if dir.join(super::index::INDEX_FILE).exists() {
        let mut index = Index::open(dir)?;
        index.forget_before(first.first_seq)?;
        if dir.join(super::texts::TEXTS_FILE).exists() {
            Texts::open(dir)?.forget_before(first.first_seq, &index.session_ids()?)?;
        }
    }
    Ok((doomed.len(), first.first_seq))
}

/// The hidden `load` writer: sessions of wide rows as fast as the recorder takes them.
fn load(
    dir: &Path,
    key_file: &Path,
    sessions: u64,
    rows: usize,
    commit_bytes: usize,
) -> anyhow::Result<()> {
    let cfg = super::RecordingConfig {
        dir: Some(dir.to_owned()),
        key_file: Some(key_file.to_owned()),
        commit_bytes,
        ..Default::default()
    };
    let recorder = super::Recorder::start(&cfg, dir.parent().unwrap_or(dir))?;
    let handle = recorder.handle();
    let row: Row = (0..16)
        .map(|i| {
            Some(super::Bytes(
                format!("value {i} {}", "x".repeat(40)).into_bytes(),
            ))
        })
        .collect();
    let mut stdout = std::io::stdout();
    for n in 0..sessions {
        let mut s = loop {
            match handle.begin(super::SessionStart {
                agent: Some("load".into()),
                target: "local".into(),
                ..Default::default()
            }) {
                Ok(s) => break s,
                Err(super::RecordError::Overloaded) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(e.into()),
            }
        };
        for q in 0..5 {
            let req = super::Request {
                kind: super::RequestKind::Query,
                statement: None,
                text: format!("SELECT * FROM wide WHERE id = {q}"),
                params: vec![],
            };
            // Under load the queue may fill: wait for room like a session would wait to retry.
            while let Err(super::RecordError::Overloaded) = s.request(req.clone()) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = s.verdict(super::Verdict::allow(None));
            let _ = s.rows(vec![row.clone(); rows]);
            let _ = s.complete(
                &format!("SELECT {rows}"),
                40,
                4000,
                Duration::from_micros(100),
            );
        }
        s.end("load done")?;
        if n == 0 {
            handle.flush().wait()?;
            writeln!(stdout, "ready")?;
        }
    }
    recorder.shutdown();
    Ok(())
}

#[cfg(test)]
mod default_key_tests {
    use super::*;

    #[test]
    fn verify_finds_the_key_beside_the_recording_directory() {
        assert_eq!(
            default_pubkey(Path::new("/tmp/demo/state/recordings")),
            PathBuf::from("/tmp/demo/state/keys/recording.key.pub")
        );
        assert_eq!(
            default_pubkey(Path::new("/var/lib/portcullis/recordings")),
            pub_path(Path::new(DEFAULT_KEY))
        );
        assert_eq!(
            default_pubkey(Path::new("recordings")),
            pub_path(Path::new(DEFAULT_KEY))
        );
    }
}

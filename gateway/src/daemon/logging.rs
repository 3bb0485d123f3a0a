//! Logs through tracing. Under journald (`JOURNAL_STREAM` names our stderr) events go natively,
//! each field its own journal field (SESSION, AGENT, TARGET, RULE, ...), so
//! `journalctl -u portcullis AGENT=claude` works. Elsewhere: plain lines or JSON lines on stderr.

use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let result = match (format, stderr_is_journal()) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Plain, true) => match tracing_journald::layer() {
            Ok(journald) => tracing_subscriber::registry()
                .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
                .with(journald.with_field_prefix(None))
                .try_init()
                .map_err(Into::into),
            // No journald socket after all: plain lines, which journald's stream still takes.
            Err(_) => builder.without_time().try_init(),
        },
        (LogFormat::Plain, false) => builder.try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=<dev>:<inode>`), not
/// merely inherited by a child whose stderr went elsewhere.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream
        .to_str()
        .and_then(|s| s.split_once(':'))
        .is_some_and(|(dev, ino)| dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino()))
}

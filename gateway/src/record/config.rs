//! The `[recording]` section of the gateway's config. Read at start; nothing here reloads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// ```toml
/// [recording]
/// dir = "/var/lib/portcullis/recordings"   # default: <state_dir>/recordings
/// key_file = "/var/lib/portcullis/keys/recording.key"  # default: <state_dir>/keys/recording.key
/// strict = false
/// [recording.target.local]
/// max_response_bytes = 10485760
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Record sessions. Default true. Turning it off needs `danger_disable = true` as well.
    pub enabled: bool,
    /// Acknowledges that `enabled = false` lets statements run unrecorded. Default false.
    pub danger_disable: bool,
    /// Where segments, checkpoints and the index live. Default `<state_dir>/recordings`.
    pub dir: Option<PathBuf>,
    /// The Ed25519 signing key; must not be inside `dir`. Made (0600) at first start.
    /// Default `<state_dir>/keys/recording.key`.
    pub key_file: Option<PathBuf>,
    /// The checkpoint origin line and key name. Default `<hostname>/portcullis`.
    pub origin: Option<String>,
    /// A segment is closed when it reaches this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// ...or this age. Default "1h".
    #[serde(with = "humantime_serde_compat")]
    pub segment_max_age: Duration,
    /// Group commit: the longest a record waits before it is written to its segment. Default
    /// "20ms". A written record survives the gateway's crash; it survives the host's once synced.
    #[serde(with = "humantime_serde_compat")]
    pub commit_interval: Duration,
    /// The longest a written record waits for `fdatasync`. Default "200ms"; "0s" syncs every
    /// group commit. Strict mode, a flush, a recording failure and a segment's end sync at once,
    /// and a checkpoint leaves the host (log, `ship_command`) only once what it covers is synced.
    #[serde(with = "humantime_serde_compat")]
    pub sync_interval: Duration,
    /// Group commit: write as soon as this much is pending. Default 1 MiB.
    pub commit_bytes: usize,
    /// A checkpoint is signed after this many records... Default 1000.
    pub checkpoint_records: u64,
    /// ...or this long after the last one, if records were added. Default "10s". Every session's
    /// end and every recovery also get one.
    #[serde(with = "humantime_serde_compat")]
    pub checkpoint_interval: Duration,
    /// A program each new checkpoint is piped to (argv), e.g. to ship it off the host: one run
    /// per checkpoint, its signed note on stdin. A failure is logged and recording goes on.
    /// Checkpoints always go to the log (the journal under systemd). Default none.
    pub ship_command: Vec<String>,
    /// How long one run of `ship_command` may take before it is killed (and logged). Default "10s".
    #[serde(with = "humantime_serde_compat")]
    pub ship_timeout: Duration,
    /// Forward a statement only once its request record is on disk. Default false.
    pub strict: bool,
    /// What happens to new statements when recording fails: "refuse" (the default).
    pub on_failure: OnFailure,
    /// The queue between sessions and the recorder, in bytes; beyond it statements are refused.
    /// Default 64 MiB.
    pub max_queue_bytes: usize,
    /// zstd level of the blocks. Default 1 (fast).
    pub zstd_level: i32,
    /// The cap on one statement's recorded result for targets without their own. Default none:
    /// responses are recorded whole.
    pub max_response_bytes: Option<u64>,
    /// Per-target settings, by target name.
    pub target: BTreeMap<String, TargetRecording>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetRecording {
    /// Cap on one statement's recorded rows, in value bytes; the record keeps the full counts.
    pub max_response_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Refuse new statements with SQLSTATE 53100/58030 while recording fails.
    #[default]
    Refuse,
    /// Let statements run unrecorded. Named so nobody picks it by accident.
    DangerAllowUnrecorded,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            enabled: true,
            danger_disable: false,
            dir: None,
            key_file: None,
            origin: None,
            segment_bytes: 64 << 20,
            segment_max_age: Duration::from_secs(3600),
            commit_interval: Duration::from_millis(20),
            sync_interval: Duration::from_millis(200),
            commit_bytes: 1 << 20,
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(10),
            ship_command: Vec::new(),
            ship_timeout: Duration::from_secs(10),
            strict: false,
            on_failure: OnFailure::Refuse,
            max_queue_bytes: 64 << 20,
            zstd_level: 1,
            max_response_bytes: None,
            target: BTreeMap::new(),
        }
    }
}

impl RecordingConfig {
    pub fn dir(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("recordings"))
    }

    pub fn key_file(&self, state_dir: &Path) -> PathBuf {
        self.key_file
            .clone()
            .unwrap_or_else(|| state_dir.join("keys").join("recording.key"))
    }

    pub fn origin(&self) -> String {
        self.origin.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            let host = if host.is_empty() {
                "localhost".into()
            } else {
                host
            };
            format!("{host}/portcullis")
        })
    }

    pub fn max_response_bytes(&self, target: &str) -> Option<u64> {
        self.target
            .get(target)
            .and_then(|t| t.max_response_bytes)
            .or(self.max_response_bytes)
    }

    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self, state_dir: &Path) -> Result<(), String> {
        if !self.enabled && !self.danger_disable {
            return Err(
                "key `recording.enabled`: turning recording off needs `danger_disable = true`"
                    .into(),
            );
        }
        let dir = self.dir(state_dir);
        let key = self.key_file(state_dir);
        if key.starts_with(&dir) {
            return Err(format!(
                "key `recording.key_file`: {} is inside the recording directory {}; keep the \
                 signing key apart from what it signs",
                key.display(),
                dir.display()
            ));
        }
        if self.segment_bytes < 4096 {
            return Err("key `recording.segment_bytes`: at least 4096".into());
        }
        if self.checkpoint_records == 0 {
            return Err("key `recording.checkpoint_records`: at least 1".into());
        }
        if self.ship_timeout.is_zero() {
            return Err("key `recording.ship_timeout`: more than 0s".into());
        }
        if !(-7..=22).contains(&self.zstd_level) {
            return Err("key `recording.zstd_level`: between -7 and 22".into());
        }
        Ok(())
    }
}

/// Durations as humantime strings ("20ms", "1h").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::Deserialize as _;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"20ms\": {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_unknown_keys_are_refused() {
        let c: RecordingConfig = toml::from_str("").unwrap();
        assert_eq!(c, RecordingConfig::default());
        assert_eq!(c.on_failure, OnFailure::Refuse);
        let c: RecordingConfig = toml::from_str(
            "commit_interval = \"5ms\"\nsync_interval = \"0s\"\nstrict = true\n\
             ship_timeout = \"250ms\"\n\
             [target.db]\nmax_response_bytes = 10\n",
        )
        .unwrap();
        assert_eq!(c.commit_interval, Duration::from_millis(5));
        assert_eq!(c.sync_interval, Duration::ZERO);
        assert_eq!(c.ship_timeout, Duration::from_millis(250));
        assert_eq!(c.max_response_bytes("db"), Some(10));
        assert_eq!(c.max_response_bytes("other"), None);
        let e = toml::from_str::<RecordingConfig>("stirct = true").unwrap_err();
        assert!(e.to_string().contains("stirct"), "{e}");
        let e = toml::from_str::<RecordingConfig>("on_failure = \"allow\"").unwrap_err();
        assert!(e.to_string().contains("danger_allow_unrecorded"), "{e}");
    }

    #[test]
    fn key_inside_the_recording_dir_and_silent_disable_are_refused() {
        let state = Path::new("/var/lib/portcullis");
        assert!(RecordingConfig::default().validate(state).is_ok());
        let c = RecordingConfig {
            key_file: Some(state.join("recordings/k")),
            ..Default::default()
        };
        assert!(
            c.validate(state)
                .unwrap_err()
                .contains("recording.key_file")
        );
        let c = RecordingConfig {
            enabled: false,
            ..Default::default()
        };
        assert!(c.validate(state).unwrap_err().contains("danger_disable"));
        let c = RecordingConfig {
            ship_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert!(c.validate(state).unwrap_err().contains("ship_timeout"));
    }
}

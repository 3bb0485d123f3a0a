//! Signed checkpoints in the C2SP `tlog-checkpoint` form, as `signed-note`s with Ed25519:
//!
//! ```text
//! <origin>
//! <size>
//! <base64 root hash>
//! [extension lines, e.g. "truncated 00000003.seg 4096 812"]
//!
//! — <key name> <base64(key id || signature)>
//! ```
//!
//! The key id is the first 4 bytes of SHA-256(name || "\n" || 0x01 || public key). The signing key
//! is a 0600 file in the Go `note` signer format, made at first start; its verifier lines
//! accumulate in `<key file>.pub` so checkpoints signed before a rotation still verify.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

const ALG_ED25519: u8 = 1;
const SIG_PREFIX: &str = "\u{2014} ";

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The recorder's signing key.
pub struct Signer {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}+{})", self.name, hex(&self.id))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where a key file's verifier lines live.
pub fn pub_path(key_file: &Path) -> PathBuf {
    let mut p = key_file.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

impl Signer {
    /// Loads the key, or makes one (0600, in a 0700 directory) if the file does not exist.
    /// A key readable by group or others is refused: anyone who can read it can forge history.
    pub fn load_or_create(key_file: &Path, name: &str) -> anyhow::Result<Signer> {
        match std::fs::read_to_string(key_file) {
            Ok(text) => {
                let mode = std::fs::metadata(key_file)?.permissions().mode();
                if mode & 0o077 != 0 {
                    bail!(
                        "recording key {} has mode {:o}; it must be 0600 (chmod 600 it)",
                        key_file.display(),
                        mode & 0o777
                    );
                }
                let signer = Signer::parse(text.trim())
                    .with_context(|| format!("reading recording key {}", key_file.display()))?;
                signer.publish(key_file)?;
                Ok(signer)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Signer::create(key_file, name),
            Err(e) => Err(e).with_context(|| format!("reading {}", key_file.display())),
        }
    }

    /// Replaces the key with a new one. The old verifier stays in the `.pub` file.
    pub fn rotate(key_file: &Path, name: &str) -> anyhow::Result<Signer> {
        let old = std::fs::read_to_string(key_file).ok();
        let tmp = key_file.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        let signer = Signer::create(&tmp, name)?;
        std::fs::rename(&tmp, key_file)?;
        sync_dir(key_file)?;
        if let Some(old) = old.and_then(|t| Signer::parse(t.trim()).ok()) {
            old.publish(key_file)?;
        }
        signer.publish(key_file)?;
        Ok(signer)
    }

    fn create(key_file: &Path, name: &str) -> anyhow::Result<Signer> {
        if name.contains(['+', ' ', '\n']) || name.is_empty() {
            bail!("key name {name:?} must be non-empty without '+', spaces or newlines");
        }
        if let Some(dir) = key_file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        let signer = Signer {
            name: name.to_owned(),
            key,
            id,
        };
        let mut body = vec![ALG_ED25519];
        body.extend_from_slice(&seed);
        let text = format!("PRIVATE+KEY+{}+{}+{}\n", name, hex(&id), B64.encode(&body));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_file)
            .with_context(|| format!("creating recording key {}", key_file.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        sync_dir(key_file)?;
        signer.publish(key_file)?;
        Ok(signer)
    }

    fn parse(text: &str) -> anyhow::Result<Signer> {
        let rest = text
            .strip_prefix("PRIVATE+KEY+")
            .context("not a signer key (PRIVATE+KEY+name+id+key)")?;
        // Names hold no '+'; the base64 key may.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(_id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("malformed signer key");
        };
        let raw = B64.decode(key).context("signer key is not base64")?;
        let [ALG_ED25519, seed @ ..] = raw.as_slice() else {
            bail!("signer key is not Ed25519");
        };
        let seed: [u8; 32] = seed.try_into().context("Ed25519 seed is not 32 bytes")?;
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        Ok(Signer {
            name: name.to_owned(),
            key,
            id,
        })
    }

    /// The verifier line: `<name>+<hex id>+<base64(0x01 || public key)>`.
    pub fn verifier_line(&self) -> String {
        let mut body = vec![ALG_ED25519];
        body.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}+{}+{}", self.name, hex(&self.id), B64.encode(&body))
    }

    pub fn key_id_hex(&self) -> String {
        hex(&self.id)
    }

    /// Adds this key's verifier to `<key file>.pub` unless it is there already.
    fn publish(&self, key_file: &Path) -> anyhow::Result<()> {
        let path = pub_path(key_file);
        let line = self.verifier_line();
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        if existing.lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(f, "{line}")?;
        f.sync_all()?;
        Ok(())
    }

    /// Signs a note body (which must end in a newline).
    pub fn sign(&self, text: &str) -> String {
        debug_assert!(text.ends_with('\n'));
        let sig = self.key.sign(text.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{text}\n{SIG_PREFIX}{} {}\n", self.name, B64.encode(blob))
    }
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => std::fs::File::open(d)?.sync_all(),
        _ => Ok(()),
    }
}

/// A signed note as one log line: newlines become `\n` (and `\` becomes `\\`), so a log
/// viewer shows one line per checkpoint and the exact note can still be recovered from it.
pub fn log_line(note: &str) -> String {
    note.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A public key that checks signatures.
#[derive(Debug, Clone)]
pub struct Verifier {
    name: String,
    id: [u8; 4],
    key: VerifyingKey,
}

impl Verifier {
    pub fn parse(line: &str) -> anyhow::Result<Verifier> {
        let mut parts = line.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("malformed verifier key {line:?}");
        };
        let raw = B64.decode(key).context("verifier key is not base64")?;
        let [ALG_ED25519, public @ ..] = raw.as_slice() else {
            bail!("verifier key is not Ed25519");
        };
        let public: [u8; 32] = public.try_into().context("Ed25519 key is not 32 bytes")?;
        let key = VerifyingKey::from_bytes(&public).context("invalid Ed25519 public key")?;
        let expected = key_id(name, &key);
        if hex(&expected) != id {
            bail!("verifier key id {id} does not match its key");
        }
        Ok(Verifier {
            name: name.to_owned(),
            id: expected,
            key,
        })
    }

    /// Every verifier line of a `.pub` file.
    pub fn read_file(path: &Path) -> anyhow::Result<Vec<Verifier>> {
        let text = std::fs::read_to_string(path)?;
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(Verifier::parse)
            .collect()
    }
}

/// A checkpoint's signed content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub extensions: Vec<String>,
}

impl Checkpoint {
    pub fn body(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("no signature by a known key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
}

/// Splits a signed note and checks that at least one signature is by a known key and valid.
/// Returns the note body.
pub fn open_note<'a>(note: &'a str, verifiers: &[Verifier]) -> Result<&'a str, NoteError> {
    let split = note
        .rfind("\n\n")
        .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
    let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
    let mut known = false;
    for line in sigs.lines() {
        let Some(rest) = line.strip_prefix(SIG_PREFIX) else {
            return Err(NoteError::Malformed(format!("bad signature line {line:?}")));
        };
        let Some((name, sig)) = rest.split_once(' ') else {
            return Err(NoteError::Malformed(format!("bad signature line {line:?}")));
        };
        let blob = B64
            .decode(sig)
            .map_err(|_| NoteError::Malformed("signature is not base64".into()))?;
        if blob.len() != 68 {
            return Err(NoteError::Malformed(
                "signature has the wrong length".into(),
            ));
        }
        for v in verifiers
            .iter()
            .filter(|v| v.name == name && v.id == blob[..4])
        {
            known = true;
            let sig = ed25519_dalek::Signature::from_slice(&blob[4..])
                .map_err(|_| NoteError::BadSignature)?;
            if v.key.verify(text.as_bytes(), &sig).is_ok() {
                return Ok(text);
            }
        }
    }
    Err(if known {
        NoteError::BadSignature
    } else {
        NoteError::UnknownKey
    })
}

/// Parses a checkpoint note after checking its signature.
pub fn open_checkpoint(note: &str, verifiers: &[Verifier]) -> Result<Checkpoint, NoteError> {
    let body = open_note(note, verifiers)?;
    parse_body(body)
}

pub fn parse_body(body: &str) -> Result<Checkpoint, NoteError> {
    let bad = |m: &str| NoteError::Malformed(m.to_owned());
    let mut lines = body.lines();
    let origin = lines.next().ok_or_else(|| bad("no origin"))?.to_owned();
    let size = lines
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| bad("no tree size"))?;
    let root = lines
        .next()
        .and_then(|l| B64.decode(l).ok())
        .and_then(|r| <Hash>::try_from(r.as_slice()).ok())
        .ok_or_else(|| bad("no root hash"))?;
    Ok(Checkpoint {
        origin,
        size,
        root,
        extensions: lines.map(str::to_owned).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_0600_signs_and_rotates_keeping_old_verifiers() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("keys/recording.key");
        let signer = Signer::load_or_create(&key_file, "host/portcullis").unwrap();
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Signer::load_or_create(&key_file, "host/portcullis").unwrap();
        assert_eq!(again.verifier_line(), signer.verifier_line());

        let cp = Checkpoint {
            origin: "host/portcullis".into(),
            size: 7,
            root: [9; 32],
            extensions: vec!["session-end 3".into()],
        };
        let note = signer.sign(&cp.body());
        let verifiers = Verifier::read_file(&pub_path(&key_file)).unwrap();
        assert_eq!(open_checkpoint(&note, &verifiers), Ok(cp.clone()));
        let forged = note.replace("\n7\n", "\n8\n");
        assert_eq!(
            open_checkpoint(&forged, &verifiers),
            Err(NoteError::BadSignature)
        );
        assert_eq!(open_checkpoint(&note, &[]), Err(NoteError::UnknownKey));

        let rotated = Signer::rotate(&key_file, "host/portcullis").unwrap();
        assert_ne!(rotated.verifier_line(), signer.verifier_line());
        let verifiers = Verifier::read_file(&pub_path(&key_file)).unwrap();
        assert_eq!(verifiers.len(), 2);
        assert!(open_checkpoint(&note, &verifiers).is_ok());
        assert!(open_checkpoint(&rotated.sign(&cp.body()), &verifiers).is_ok());

        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Signer::load_or_create(&key_file, "host/portcullis").unwrap_err();
        assert!(err.to_string().contains("0600"), "{err}");
    }

    #[test]
    fn a_note_logs_as_one_line_that_gives_the_note_back() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("recording.key");
        let signer = Signer::load_or_create(&key_file, "host/portcullis").unwrap();
        let cp = Checkpoint {
            origin: "host/portcullis".into(),
            size: 3,
            root: [1; 32],
            extensions: vec![r"truncated a\b.seg 4096 812".into()],
        };
        let note = signer.sign(&cp.body());
        let line = log_line(&note);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("host/portcullis\\n3\\n"), "{line}");
        let back = line
            .split("\\\\")
            .map(|part| part.replace("\\n", "\n"))
            .collect::<Vec<_>>()
            .join("\\");
        assert_eq!(back, note);
        let verifiers = Verifier::read_file(&pub_path(&key_file)).unwrap();
        assert_eq!(open_checkpoint(&back, &verifiers), Ok(cp));
    }
}

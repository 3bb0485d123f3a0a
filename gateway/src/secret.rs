//! Upstream credentials. The gateway holds them; nothing prints them.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

/// A password. Debug and Display never show it, and its bytes are wiped when it is dropped (a
/// reload that replaces it, a session's copy going away), so they do not linger in freed memory.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for Secret {}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a credential comes from, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    None,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "file {}", p.display()),
            SecretSource::Env(v) => write!(f, "environment variable {v}"),
            SecretSource::None => f.write_str("no password"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "password file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissive { path: PathBuf, mode: u32 },
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("{0} is empty")]
    Empty(String),
}

impl SecretSource {
    pub fn load(&self) -> Result<Option<Secret>, SecretError> {
        match self {
            SecretSource::None => Ok(None),
            SecretSource::File(path) => load_file(path).map(Some),
            SecretSource::Env(var) => {
                let v =
                    std::env::var_os(var).ok_or_else(|| SecretError::EnvMissing(var.clone()))?;
                let bytes = std::os::unix::ffi::OsStringExt::into_vec(v);
                if bytes.is_empty() {
                    return Err(SecretError::Empty(format!("environment variable {var}")));
                }
                Ok(Some(Secret(bytes)))
            }
        }
    }
}

fn load_file(path: &Path) -> Result<Secret, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Permissive {
            path: path.to_owned(),
            mode,
        });
    }
    let mut bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(read_err)?);
    // One trailing newline is an editor's, not the password's.
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(SecretError::Empty(format!(
            "password file {}",
            path.display()
        )));
    }
    Ok(Secret(std::mem::take(&mut *bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let s = Secret::new(b"hunter2".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn secrets_are_wiped_on_drop() {
        // Reading freed memory to check would be undefined behaviour; the marker trait is the
        // zeroize crate's promise, and the Drop above keeps it.
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<Secret>();
    }

    #[test]
    fn group_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "hunter2\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = SecretSource::File(p.clone()).load().unwrap_err();
        assert!(matches!(e, SecretError::Permissive { .. }), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = SecretSource::File(p).load().unwrap().unwrap();
        assert_eq!(s.expose(), b"hunter2");
    }
}

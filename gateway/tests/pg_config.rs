//! `portcullis serve` refuses bad configuration with an error naming the file, line and key, and
//! a non-zero exit; it refuses a password file that others can read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use testkit::{
    Gateway, GatewayOptions, Postgres, output_within, portcullis_bin, skip_in_direct, write_secret,
};

/// Runs `portcullis serve ARGS`, which must exit on its own.
fn serve(args: &[&str]) -> Output {
    let mut cmd = Command::new(portcullis_bin());
    cmd.arg("serve").args(args);
    output_within(&mut cmd, Duration::from_secs(20))
        .expect("run portcullis serve")
        .unwrap_or_else(|| {
            panic!("portcullis serve {args:?} kept running with a bad configuration")
        })
}

/// A config file whose line 5 is `line5`, inside `[[listener]]`.
fn config_with_line5(dir: &Path, line5: &str, listener_target: &str) -> PathBuf {
    let pw = write_secret(dir, "main.password", "secret-value").unwrap();
    let text = format!(
        "[gateway]\n\
         admin_socket = \"{admin}\"\n\
         state_dir = \"{state}\"\n\
         [[listener]]\n\
         {line5}\n\
         target = \"{listener_target}\"\n\
         \n\
         [[target]]\n\
         name = \"main\"\n\
         upstream = \"postgres://app@127.0.0.1:5432/app?sslmode=prefer\"\n\
         password_file = \"{pw}\"\n",
        admin = dir.join("admin.sock").display(),
        state = dir.join("state").display(),
        pw = pw.display(),
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_refused(out: &Output, what: &str, must_contain: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: serve must exit non-zero, got {}: {stderr}",
        out.status
    );
    for needle in must_contain {
        assert!(
            stderr.contains(needle),
            "{what}: the error must mention {needle:?}: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{what}: a panic: {stderr}");
    assert!(
        !stderr.contains("secret-value"),
        "{what}: the error shows the password"
    );
}

fn names_line_5(stderr: &str) -> bool {
    stderr.contains("line 5") || stderr.contains(":5:") || stderr.contains(":5 ")
}

#[test]
fn unknown_key_names_file_line_and_key() {
    if skip_in_direct(
        "unknown_key_names_file_line_and_key",
        "it tests the gateway binary",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_line5(dir.path(), "listne = \"127.0.0.1:6432\"", "main");
    let out = serve(&["--config", path.to_str().unwrap()]);
    assert_refused(&out, "unknown key", &[path.to_str().unwrap(), "listne"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(names_line_5(&stderr), "the error names line 5: {stderr}");
}

#[test]
fn wrong_type_names_file_line_and_key() {
    if skip_in_direct(
        "wrong_type_names_file_line_and_key",
        "it tests the gateway binary",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_line5(dir.path(), "listen = 6432", "main");
    let out = serve(&["--config", path.to_str().unwrap()]);
    assert_refused(&out, "wrong type", &[path.to_str().unwrap(), "listen"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(names_line_5(&stderr), "the error names line 5: {stderr}");
}

#[test]
fn toml_syntax_error_names_file_and_line() {
    if skip_in_direct(
        "toml_syntax_error_names_file_and_line",
        "it tests the gateway binary",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_line5(dir.path(), "listen = \"127.0.0.1:6432", "main");
    let out = serve(&["--config", path.to_str().unwrap()]);
    assert_refused(&out, "syntax error", &[path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(names_line_5(&stderr), "the error names line 5: {stderr}");
}

#[test]
fn listener_naming_an_unknown_target() {
    if skip_in_direct(
        "listener_naming_an_unknown_target",
        "it tests the gateway binary",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = config_with_line5(dir.path(), "listen = \"127.0.0.1:6432\"", "no-such-target");
    let out = serve(&["--config", path.to_str().unwrap()]);
    assert_refused(
        &out,
        "unknown target",
        &[path.to_str().unwrap(), "no-such-target"],
    );
}

#[test]
fn missing_config_file() {
    if skip_in_direct("missing_config_file", "it tests the gateway binary") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere.toml");
    let out = serve(&["--config", path.to_str().unwrap()]);
    assert_refused(&out, "missing file", &[path.to_str().unwrap()]);
}

#[test]
fn readable_password_file_is_refused() {
    if skip_in_direct(
        "readable_password_file_is_refused",
        "it tests the gateway binary",
    ) {
        return;
    }
    let pg = Postgres::start().expect("start PostgreSQL");
    let dir = tempfile::tempdir().unwrap();
    let pw = pg.write_password_file(dir.path()).unwrap();
    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let admin = dir.path().join("admin.sock");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let flags = |pw: &Path| {
        vec![
            "--listen".to_string(),
            listen.clone(),
            "--target".into(),
            pg.url(),
            "--password-file".into(),
            pw.display().to_string(),
            "--admin-socket".into(),
            admin.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ]
    };
    for mode in [0o644, 0o640, 0o604] {
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        let args = flags(&pw);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = serve(&args);
        assert_refused(
            &out,
            &format!("password file mode {mode:o}"),
            &[pw.to_str().unwrap()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("readable") || stderr.contains("permission") || stderr.contains("mode"),
            "the error says why the file is refused: {stderr}"
        );
        assert!(!stderr.contains(&pg.password.to_lowercase()));
    }

    // The same file at 0600 is accepted and used (so the refusals above were about the mode).
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let gw = Gateway::start(GatewayOptions::for_target(&pg, pw.clone())).expect("start with 0600");
    let (out, err, ok) = testkit::psql(pg.bindir(), &gw.conninfo("app"), "SELECT 'ok'").unwrap();
    assert!(ok, "psql through the gateway: {err}\n{}", gw.log_tail(30));
    assert_eq!(out.trim(), "ok");
}

#[test]
fn password_env_that_is_not_set() {
    if skip_in_direct(
        "password_env_that_is_not_set",
        "it tests the gateway binary",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let admin = dir.path().join("admin.sock").display().to_string();
    let state = dir.path().display().to_string();
    let out = serve(&[
        "--listen",
        &listen,
        "--target",
        "postgres://app@127.0.0.1:5432/app",
        "--password-env",
        "PORTCULLIS_TEST_UNSET_VARIABLE",
        "--admin-socket",
        &admin,
        "--state-dir",
        &state,
    ]);
    assert_refused(&out, "unset variable", &["PORTCULLIS_TEST_UNSET_VARIABLE"]);
}

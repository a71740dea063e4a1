//! The `photon-proxy` binary as an operator meets it: a missing setting stops it with a message
//! naming what to set; `--help` lists the operations settings. (Building this test also builds
//! the binary that the workspace's process-level tests start.)

use std::process::Command;

fn proxy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_photon-proxy"));
    cmd.env_clear();
    cmd
}

#[test]
fn a_missing_setting_is_named() {
    let out = proxy().env("PATH", "/usr/bin:/bin").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("BROKER_URL"), "{stderr}");
}

#[test]
fn a_bad_operations_setting_is_named() {
    let out = proxy()
        .args(["--broker-url", "http://broker:8080", "--proxy-id", "proxy1.broker"])
        .args(["--privkey-file", "k.pem", "--rootcert-file", "r.crt"])
        .env("APP_app1_KEY", "secret")
        .env("SHUTDOWN_GRACE", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SHUTDOWN_GRACE"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[test]
fn help_lists_the_operations_settings() {
    let out = proxy().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for setting in ["STATSD_HOST", "STATSD_PORT", "STATSD_PREFIX", "SHUTDOWN_GRACE", "LOG_FORMAT"] {
        assert!(help.contains(setting), "{setting} missing from --help");
    }
}

/// `keygen` does not replace a key already there (it may be the one the site runs with)
/// unless told to, and the key it writes is readable by its owner only, even over an
/// existing file that was not.
#[test]
fn keygen_keeps_an_existing_key_unless_forced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("photon-keygen-{}", std::process::id()));
    let keygen = |force: bool| {
        let mut cmd = proxy();
        cmd.args(["keygen", "--proxy-id", "site1.broker", "--out"]).arg(&dir);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    assert!(keygen(false).status.success());
    let key = dir.join("site1.broker.priv.pem");
    let first = std::fs::read_to_string(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = keygen(false);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), first, "the key is untouched");
    assert!(keygen(true).status.success());
    assert_ne!(std::fs::read_to_string(&key).unwrap(), first);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A worker count actix can't run with is a settings error, not a panic.
#[test]
fn a_bad_worker_count_is_named() {
    for workers in ["0", "513"] {
        let out = proxy()
            .args(["--broker-url", "http://broker:8080", "--proxy-id", "proxy1.broker"])
            .args(["--privkey-file", "k.pem", "--rootcert-file", "r.crt"])
            .env("APP_app1_KEY", "secret")
            .env("WORKERS", workers)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "WORKERS={workers}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("WORKERS must be from 1 to 512"), "{stderr}");
    }
}

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

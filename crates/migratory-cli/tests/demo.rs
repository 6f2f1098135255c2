//! `migratory demo` end to end: three server processes, a live transfer both
//! ways through every kind of migration, checked with SHA-256.

use std::process::Command;

#[test]
fn demo_with_server_processes_is_exact_both_ways() {
    let out = Command::new(env!("CARGO_BIN_EXE_migratory"))
        .args(["demo", "--size", "64MiB", "--migrations", "21", "--json"])
        .output()
        .expect("run migratory demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    let json = stdout.lines().last().expect("a JSON line");
    assert!(json.contains("\"ok\":true"), "{json}");
    assert!(json.contains("\"bytes_up\":67108864"), "{json}");
    assert!(json.contains("\"bytes_down\":67108864"), "{json}");
    assert!(json.contains("\"migrations\":21"), "{json}");
    for kind in ["client: 7", "server push: 7", "destination pull: 7"] {
        assert!(stderr.contains(kind), "missing {kind} in:\n{stderr}");
    }
}

#[test]
fn bad_flags_fail_with_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_migratory"))
        .args(["demo", "--size", "12parsecs"])
        .output()
        .expect("run migratory");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown size unit"), "{stderr}");
}

#[test]
fn an_address_that_does_not_parse_fails_with_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_migratory"))
        .args([
            "demo-server",
            "--id",
            "s1",
            "--service",
            "not-an-address",
            "--control",
            "127.0.0.1:0",
            "--key",
            "00",
        ])
        .output()
        .expect("run migratory");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--service") && stderr.contains("not-an-address"),
        "{stderr}"
    );
}

#[test]
fn every_flag_error_is_one_line_with_exit_status_2() {
    for args in [
        &["demo", "--size", "12parsecs"][..],
        &["serve", "--bogus"],
        &[
            "serve",
            "--config",
            "x.toml",
            "--id",
            "s1",
            "--service",
            "ftp",
        ],
        &[
            "migrate", "--config", "x.toml", "--from", "s1", "--to", "s2",
        ],
        &[
            "migrate",
            "--config",
            "x.toml",
            "--from",
            "s1",
            "--to",
            "s2",
            "--all",
            "--timeout",
            "1h",
        ],
        &["proxy", "--listen", "127.0.0.1:1", "--service", "nowhere"],
        &["servee"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_migratory"))
            .args(args)
            .output()
            .expect("run migratory");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("migratory: "), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
}

//! scripts/deploy.sh and scripts/rollback.sh: shellcheck-clean, `--help`,
//! argument checks, and the steps they print in `--dry-run` against a
//! deployment directory of the test's own, which must come out unchanged.

use std::{
    path::Path,
    process::{Command, Output},
};

use crate::{promql, run_ok};

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn scripts_are_shellcheck_clean() {
    run_ok(
        "shellcheck",
        &[
            "scripts/deploy.sh",
            "scripts/rollback.sh",
            ".ci/run",
            ".ci/fuzz",
        ],
        None,
    );
}

/// Run a script of the repository with APP_DIR set to `app_dir`.
fn script(name: &str, args: &[&str], app_dir: &Path) -> Output {
    Command::new(promql::repo().join("scripts").join(name))
        .args(args)
        .env("APP_DIR", app_dir)
        .env_remove("ROLLBACK_DIR")
        .env_remove("COMPOSE_FILE")
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deployment directory whose nginx sends traffic to `color`.
fn deployment(color: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("nginx/upstream")).unwrap();
    std::fs::write(
        dir.path().join("nginx/upstream/api.conf"),
        format!("upstream api {{\n    server api-{color}:8000;\n}}\n"),
    )
    .unwrap();
    dir
}

/// Every file under `dir` with its content, to show a dry run changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The indices of `needles` in `haystack`, asserting each is there and in order.
fn assert_in_order(haystack: &str, needles: &[&str]) {
    let mut from = 0;
    for needle in needles {
        let at = haystack[from..]
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing (or out of order) in:\n{haystack}"));
        from += at + needle.len();
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn help_and_bad_arguments() {
    let dir = deployment("blue");
    for name in ["deploy.sh", "rollback.sh"] {
        let out = script(name, &["--help"], dir.path());
        assert!(out.status.success(), "{name} --help");
        assert!(stdout(&out).contains("--dry-run"), "{name} --help");
        let out = script(name, &["--bogus"], dir.path());
        assert_eq!(out.status.code(), Some(2), "{name} --bogus");
        let out = script(name, &["--dry-run", "1.0; rm -rf /"], dir.path());
        assert_eq!(out.status.code(), Some(2), "{name} accepted a bad tag");
    }
    let out = script("deploy.sh", &["--dry-run"], dir.path());
    assert_eq!(out.status.code(), Some(2), "deploy.sh without VERSION");
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn deploy_dry_run_prints_the_blue_green_steps_and_changes_nothing() {
    for (live, new) in [("blue", "green"), ("green", "blue")] {
        let dir = deployment(live);
        let before = snapshot(dir.path());
        let out = script("deploy.sh", &["--dry-run", "1.4.0"], dir.path());
        let text = stdout(&out);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_in_order(
            &text,
            &[
                &format!("version 1.4.0 goes to api-{new} (api-{live} is live)"),
                &format!("set API_{}_VERSION=1.4.0", new.to_uppercase()),
                &format!("pull api-{new}"),
                &format!("up -d --no-deps api-{new}"),
                &format!("GET /ready = 200 on every api-{new} replica"),
                &format!("server api-{new}:8000"),
                "exec -T nginx nginx -t",
                "exec -T nginx nginx -s reload",
                "/health",
                "set VERSION=1.4.0",
                &format!("set COMPOSE_PROFILES={new}"),
                "up -d --no-deps relay projector replier",
                &format!("stop api-{live}"),
                "1.4.0.tar.gz",
                &format!("deployed 1.4.0 on api-{new}"),
            ],
        );
        assert_eq!(snapshot(dir.path()), before, "a dry run changed files");
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn deploy_refuses_an_upstream_it_cannot_read() {
    let dir = deployment("purple");
    let out = script("deploy.sh", &["--dry-run", "1.4.0"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot tell the active color"));
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn rollback_lists_versions_and_dry_runs_the_seed_steps() {
    let dir = deployment("green");
    let saved = dir.path().join("backups/rollback");
    std::fs::create_dir_all(&saved).unwrap();
    std::fs::write(saved.join("1.3.2.tar.gz"), b"").unwrap();
    std::fs::write(saved.join("current_20260101_000000.tar.gz"), b"").unwrap();

    // No VERSION: usage and the versions that can be rolled back to.
    let out = script("rollback.sh", &[], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let listed = String::from_utf8_lossy(&out.stderr);
    assert!(listed.contains("  1.3.2\n"), "{listed}");
    assert!(!listed.contains("current_"), "{listed}");

    // A version never deployed here is refused before anything happens.
    let out = script("rollback.sh", &["9.9.9"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no saved configuration for 9.9.9"));

    let before = snapshot(dir.path());
    let out = script("rollback.sh", &["--dry-run", "1.3.2"], dir.path());
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_in_order(
        &text,
        &[
            "starting rollback to 1.3.2",
            "keep the current configuration",
            "tar -czf",
            "current_",
            "restore the configuration of 1.3.2",
            "tar -xzf",
            "1.3.2.tar.gz",
            "deploy 1.3.2 blue-green",
            "version 1.3.2 goes to api-blue (api-green is live)",
            "stop api-green",
            "health check",
            "/ready",
            "rollback to 1.3.2 successful",
        ],
    );
    assert_eq!(snapshot(dir.path()), before, "a dry run changed files");
}

//! .github/workflows/ci.yml follows GitHub's schema, runs what .ci/run runs
//! (the same cargo commands, with the same servers and tools), and builds the
//! image on main only.

use serde_json::Value;

use crate::{Broken, passes_and_refuses, pypi_tool, read};

/// The workflow against GitHub's workflow schema (vendored in
/// `check-jsonschema`): keys, triggers, job and step forms.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn the_workflow_follows_githubs_schema() {
    passes_and_refuses(
        &pypi_tool("check-jsonschema"),
        &["--builtin-schema", "vendor.github-workflows"],
        &[".github/workflows/ci.yml"],
        Broken {
            what: "a misspelled workflow key",
            name: "ci.yml",
            text: "on: push\njobs:\n  test:\n    runs_on: ubuntu-24.04\n    steps:\n      - run: cargo test\n",
        },
    );
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn the_workflow_runs_the_same_checks_as_ci_run() {
    let workflow: Value = serde_norway::from_str(&read(".github/workflows/ci.yml")).unwrap();
    let test = &workflow["jobs"]["test"];
    let runs: Vec<&str> = test["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect();
    // Every cargo command of .ci/run is a step of the workflow.
    let local = read(".ci/run");
    let cargo: Vec<&str> = local
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("cargo "))
        .collect();
    assert!(cargo.len() >= 3, "{cargo:?}");
    for command in &cargo {
        assert!(
            runs.iter().any(|r| r.lines().any(|l| l.trim() == *command)),
            "the workflow does not run `{command}`"
        );
    }
    assert!(cargo.contains(&"cargo clippy --all-targets -- -D warnings"));
    assert!(
        local
            .lines()
            .any(|l| l.trim() == "make --no-print-directory ops-tools"),
        ".ci/run does not install the PyPI tools"
    );
    assert!(
        local
            .lines()
            .any(|l| l.trim() == ".ci/fuzz target/debug/ai-secretary"),
        ".ci/run does not fuzz the API"
    );
    // The servers the tests use.
    assert!(
        test["services"]["postgres"]["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:16")
    );
    let setup = runs.join("\n");
    for needle in [
        "redis-server",
        "nats-server",
        "-js",
        "prometheus",
        "nginx",
        "shellcheck",
        "make ops-tools",
        "chromium",
        ".ci/fuzz target/debug/ai-secretary",
    ] {
        assert!(
            setup.contains(needle),
            "the workflow does not set up {needle}"
        );
    }
    // The image: after the tests, on pushes to main only.
    let image = &workflow["jobs"]["image"];
    assert_eq!(image["needs"], "test");
    let condition = image["if"].as_str().unwrap();
    assert!(
        condition.contains("refs/heads/main") && condition.contains("push"),
        "{condition}"
    );
    assert!(image["steps"].as_array().unwrap().iter().any(|s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("docker/build-push-action"))
    }));
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn the_makefile_has_the_targets_a_developer_looks_for() {
    let makefile = read("Makefile");
    for target in [
        "dev", "test", "bench", "backup", "lint", "deploy", "rollback",
    ] {
        assert!(
            makefile
                .lines()
                .any(|l| l.starts_with(&format!("{target}:"))),
            "no make {target}"
        );
    }
    // `make -n` parses it and shows what a target would run.
    let out = crate::run_ok("make", &["-n", "lint"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cargo clippy --all-targets -- -D warnings"),
        "{text}"
    );
}

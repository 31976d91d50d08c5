//! The test suites' switch, as in the root crate's build.rs: with
//! `AI_SECRETARY_TEST_SERVERS=1` the tests that need Redis are built to run
//! (`cfg test_servers`); without it they are built ignored, with the reason.

fn main() {
    println!("cargo:rerun-if-env-changed=AI_SECRETARY_TEST_SERVERS");
    println!("cargo:rustc-check-cfg=cfg(test_servers)");
    if std::env::var("AI_SECRETARY_TEST_SERVERS").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=test_servers");
    }
}

//! Configuration the binary refuses to start with: in production, a JWT secret
//! under 32 characters, a non-hex `ENCRYPTION_KEY`, and the development
//! secrets. Each exits non-zero before it connects to anything (the database
//! named here does not answer; the embedded one is not even created), saying
//! which setting is wrong, and never printing the value.

use crate::{helpers::EventLog, process::configured};

const GOOD_JWT: &str = "a-production-jwt-secret-of-40-characters";

/// What is wrong, the secrets set, and the message that must name it.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

crate::on_both!(production_refuses_weak_or_default_secrets, spawns);
async fn production_refuses_weak_or_default_secrets<D: EventLog>() {
    let good_key = "5a".repeat(32);
    let non_hex = format!("{}zz", "5a".repeat(31));
    let short_jwt = "x".repeat(31);
    // The servers' database where nothing answers (a fixed low port, as for
    // the tests' other unreachable servers: a `free_port()` is free only until
    // another test binds it), or an embedded data directory.
    let nowhere = "postgres://postgres@127.0.0.1:9/nowhere";
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_string_lossy().into_owned();
    let database = if D::SERVERS {
        ("DATABASE_URL", nowhere)
    } else {
        ("DATA_DIR", data_dir.as_str())
    };
    let cases: [Case; 4] = [
        (
            "a JWT secret under 32 characters",
            vec![
                ("JWT_SECRET_KEY", &short_jwt),
                ("ENCRYPTION_KEY", &good_key),
            ],
            "JWT_SECRET_KEY must be at least 32 characters in production",
        ),
        (
            "a non-hex encryption key",
            vec![("JWT_SECRET_KEY", GOOD_JWT), ("ENCRYPTION_KEY", &non_hex)],
            "ENCRYPTION_KEY must be 32 bytes written as 64 hex characters",
        ),
        (
            "the development JWT secret",
            vec![("ENCRYPTION_KEY", &good_key)],
            "JWT_SECRET_KEY must be set in production",
        ),
        (
            "the development encryption key",
            vec![("JWT_SECRET_KEY", GOOD_JWT)],
            "ENCRYPTION_KEY must be set in production",
        ),
    ];
    for (what, secrets, message) in cases {
        let mut env = vec![("ENVIRONMENT", "production"), database];
        env.extend(secrets.iter().copied());
        let mut command = configured(&env);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap()
            .unwrap();
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.status.success(), "{what}: it started\n{printed}");
        assert!(
            printed.contains(message),
            "{what}: no clear message\n{printed}"
        );
        for (name, value) in secrets {
            assert!(
                !printed.contains(value),
                "{what}: the value of {name} was printed\n{printed}"
            );
        }
        let created: Vec<_> = std::fs::read_dir(data.path()).unwrap().collect();
        assert!(
            created.is_empty(),
            "{what}: it wrote to DATA_DIR: {created:?}"
        );
    }
}

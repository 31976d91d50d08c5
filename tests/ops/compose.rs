//! The compose files and the Dockerfile. The compose files are validated
//! against the Compose Specification's schema and the Dockerfile by hadolint;
//! then, for what no schema can see, the compose files are parsed as YAML
//! (merge keys applied) and held to what the other files expect: the services
//! and commands of docs/architecture.md, dependencies on services that exist, the mounts
//! that exist, the volumes declared, and Prometheus scraping every service on
//! the port it listens on. `docker compose config` runs only on request
//! (ignored test): no machine here has the compose plugin.

use std::{collections::BTreeSet, path::Path};

use serde_json::Value;

use crate::{Broken, passes_and_refuses, promql, pypi_tool, read};

/// A compose file as JSON, with `<<` merge keys applied (as compose does).
fn load(file: &str) -> Value {
    let mut yaml: serde_norway::Value =
        serde_norway::from_str(&read(file)).unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
    // A merged mapping can bring its own `<<` (x-api merges x-app): repeat.
    for _ in 0..4 {
        yaml.apply_merge().unwrap();
    }
    let json = serde_json::to_value(&yaml).unwrap();
    assert!(
        !json.to_string().contains("\"<<\""),
        "{file}: unmerged keys"
    );
    json
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("a services mapping")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The checks every compose file passes: depends_on names services, named
/// volumes are declared, bind-mounted files exist (runtime dirs aside).
fn check_common(file: &str, compose: &Value) {
    let services = services(compose);
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let volumes: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .map(|v| v.keys().map(String::as_str).collect())
        .unwrap_or_default();
    for (name, service) in services {
        assert!(
            service["image"].is_string() || service["build"].is_string(),
            "{file}: {name} has neither image nor build"
        );
        let depends: Vec<String> = match &service["depends_on"] {
            Value::Array(_) => strings(&service["depends_on"]),
            Value::Object(map) => map.keys().cloned().collect(),
            _ => vec![],
        };
        for dependency in depends {
            assert!(
                names.contains(dependency.as_str()),
                "{file}: {name} depends on unknown {dependency}"
            );
        }
        for mount in strings(&service["volumes"]) {
            let source = mount.split(':').next().unwrap();
            if let Some(path) = source.strip_prefix("./") {
                // Created at run time by the operator (certificates) or by backups.
                if !["ssl", "backups"].contains(&path) {
                    assert!(
                        Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
                        "{file}: {name} mounts missing ./{path}"
                    );
                }
            } else {
                assert!(
                    volumes.contains(source),
                    "{file}: {name} uses undeclared volume {source}"
                );
            }
        }
    }
}

fn environment<'a>(service: &'a Value, key: &str) -> &'a str {
    service["environment"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {service}"))
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn development_compose_has_the_stack_of_the_issue() {
    let compose = load("docker-compose.yml");
    check_common("docker-compose.yml", &compose);
    let s = services(&compose);
    assert_eq!(s["postgres"]["image"], "postgres:16-alpine");
    assert_eq!(s["redis"]["image"], "redis:7-alpine");
    let nats = &s["nats"];
    assert!(
        strings(&nats["command"]).contains(&"-js".to_owned()),
        "NATS without JetStream"
    );
    assert!(
        strings(&nats["volumes"])
            .iter()
            .any(|v| v.ends_with(":/data")),
        "JetStream store not in a volume"
    );
    let app = &s["app"];
    assert_eq!(app["build"], ".");
    assert!(
        app["command"].is_null(),
        "the development service runs all roles in one process"
    );
    assert!(strings(&app["ports"]).contains(&"8000:8000".to_owned()));
    assert!(environment(app, "DATABASE_URL").contains("@postgres:5432/"));
    assert_eq!(environment(app, "NATS_URL"), "nats://nats:4222");
    assert_eq!(environment(app, "REDIS_URL"), "redis://redis:6379");
    let nginx = strings(&s["nginx"]["volumes"]);
    assert!(nginx.contains(&"./nginx.conf:/etc/nginx/nginx.conf:ro".to_owned()));
    assert!(
        nginx.contains(&"./nginx/upstream-dev.conf:/etc/nginx/upstream/api.conf:ro".to_owned())
    );
    assert!(
        read("nginx/upstream-dev.conf").contains("server app:8000;"),
        "nginx does not point at the app service"
    );
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn production_compose_follows_the_seed_with_the_roles_split() {
    let compose = load("docker-compose.production.yml");
    check_common("docker-compose.production.yml", &compose);
    let s = services(&compose);
    for color in ["api-blue", "api-green"] {
        let api = &s[color];
        assert_eq!(strings(&api["command"]), ["serve"], "{color}");
        assert_eq!(api["deploy"]["replicas"], 2, "{color}");
        let limits = &api["deploy"]["resources"]["limits"];
        assert!(
            limits["memory"].is_string() && limits["cpus"].is_string(),
            "{color}: {limits}"
        );
        assert_eq!(api["restart"], "unless-stopped");
        assert_eq!(
            strings(&api["profiles"]),
            [color.trim_start_matches("api-")]
        );
        assert!(
            api["image"]
                .as_str()
                .unwrap()
                .contains(&format!("API_{}_VERSION", color[4..].to_uppercase()))
        );
        assert!(
            api["ports"].is_null(),
            "{color} must be reached through nginx only"
        );
    }
    for (service, command) in [
        ("relay", "relay"),
        ("projector", "project"),
        ("replier", "reply"),
    ] {
        assert_eq!(strings(&s[service]["command"]), [command], "{service}");
        assert_eq!(s[service]["restart"], "unless-stopped", "{service}");
        assert!(
            s[service]["deploy"]["resources"]["limits"]["memory"].is_string(),
            "{service}"
        );
    }
    for (name, service) in s {
        assert!(
            !service["restart"].is_null(),
            "{name} has no restart policy"
        );
        if service["command"].is_array()
            && service["image"]
                .as_str()
                .unwrap_or("")
                .contains("ai-secretary")
        {
            assert_eq!(environment(service, "ENVIRONMENT"), "production", "{name}");
            assert_eq!(environment(service, "LOG_FORMAT"), "json", "{name}");
            // Secrets come from .env and are required, never defaulted here.
            for secret in ["JWT_SECRET_KEY", "ENCRYPTION_KEY"] {
                assert!(
                    environment(service, secret).contains(":?"),
                    "{name}: {secret} must be required"
                );
            }
        }
    }
    let postgres = &s["postgres"];
    assert_eq!(postgres["image"], "postgres:16-alpine");
    assert!(strings(&postgres["volumes"]).contains(&"./backups:/backups".to_owned()));
    let nginx = strings(&s["nginx"]["volumes"]);
    assert!(nginx.contains(&"./nginx/upstream:/etc/nginx/upstream:ro".to_owned()));
    assert!(strings(&s["nginx"]["ports"]).contains(&"443:443".to_owned()));
    for port in strings(&s["prometheus"]["ports"])
        .iter()
        .chain(&strings(&s["grafana"]["ports"]))
    {
        assert!(
            port.starts_with("127.0.0.1:"),
            "monitoring published beyond localhost: {port}"
        );
    }
    // The upstream deploy.sh switches names one of the colors.
    let upstream = read("nginx/upstream/api.conf");
    assert!(
        upstream.contains("server api-blue:8000;") || upstream.contains("server api-green:8000;")
    );
}

/// `(host, port)` of every target a Prometheus config scrapes (static and DNS).
fn scrape_targets(config: &Value) -> Vec<(String, String)> {
    let mut targets = Vec::new();
    for job in config["scrape_configs"].as_array().expect("scrape_configs") {
        for sd in job["static_configs"].as_array().into_iter().flatten() {
            for target in strings(&sd["targets"]) {
                let (host, port) = target
                    .rsplit_once(':')
                    .unwrap_or_else(|| panic!("target {target} has no port"));
                targets.push((host.to_owned(), port.to_owned()));
            }
        }
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            let port = sd["port"].as_u64().expect("a dns_sd_config has a port");
            for name in strings(&sd["names"]) {
                targets.push((name, port.to_string()));
            }
        }
    }
    targets
}

/// A service running this repository's image (built here, or pulled by name).
fn runs_ai_secretary(service: &Value) -> bool {
    service["image"]
        .as_str()
        .is_some_and(|image| image.contains("ai-secretary"))
}

/// The port an ai-secretary container listens on: its `BIND`, else the image's.
fn listen_port(service: &Value) -> String {
    let dockerfile = read("Dockerfile");
    let image_bind = dockerfile
        .split_whitespace()
        .find_map(|word| word.strip_prefix("BIND="))
        .expect("the Dockerfile sets BIND");
    let bind = service["environment"]["BIND"]
        .as_str()
        .unwrap_or(image_bind);
    bind.rsplit_once(':')
        .expect("BIND is host:port")
        .1
        .to_owned()
}

/// Each Prometheus config scrapes what its compose file runs: every target is a
/// service of that file (on the port an ai-secretary container listens on),
/// every ai-secretary service is scraped, and the compose file's Prometheus
/// mounts this config and the rule files it names beside it.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn prometheus_configs_scrape_the_services_of_their_compose_file() {
    for (config_file, compose_file, at_least) in [
        (
            "monitoring/prometheus.yml",
            "docker-compose.production.yml",
            6,
        ),
        ("monitoring/prometheus.dev.yml", "docker-compose.yml", 1),
    ] {
        let compose = load(compose_file);
        let s = services(&compose);
        let config: Value = serde_norway::from_str(&read(config_file)).unwrap();
        let targets = scrape_targets(&config);
        assert!(
            targets.len() >= at_least,
            "{config_file}: too few targets: {targets:?}"
        );
        for (host, port) in targets.iter().filter(|(h, _)| h != "localhost") {
            let service = s.get(host).unwrap_or_else(|| {
                panic!("{config_file} scrapes {host}, which is no service of {compose_file}")
            });
            if runs_ai_secretary(service) {
                assert_eq!(
                    *port,
                    listen_port(service),
                    "{config_file}: {host} is scraped on another port than it listens on"
                );
            }
        }
        for (name, service) in s {
            if runs_ai_secretary(service) {
                assert!(
                    targets.iter().any(|(host, _)| host == name),
                    "{config_file}: {name} of {compose_file} is not scraped"
                );
            }
        }
        // The config Prometheus reads in that stack is this one, and the rule
        // files it names (relative to it) are mounted beside it.
        let prometheus = &s["prometheus"];
        assert!(
            strings(&prometheus["command"])
                .contains(&"--config.file=/etc/prometheus/prometheus.yml".to_owned()),
            "{compose_file}: Prometheus reads another config"
        );
        let mounts = strings(&prometheus["volumes"]);
        let mounted = |from: &str, to: &str| {
            assert!(
                mounts.contains(&format!("./{from}:{to}:ro")),
                "{compose_file}: Prometheus does not mount ./{from} at {to}: {mounts:?}"
            );
        };
        mounted(config_file, "/etc/prometheus/prometheus.yml");
        for rules in strings(&config["rule_files"]) {
            mounted(
                &format!("monitoring/{rules}"),
                &format!("/etc/prometheus/{rules}"),
            );
        }
    }
}

/// Both compose files against the Compose Specification's JSON schema, which
/// `check-jsonschema` vendors: every key, type and value form that
/// `docker compose config` would check, without a Docker engine.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn compose_files_follow_the_compose_specification() {
    passes_and_refuses(
        &pypi_tool("check-jsonschema"),
        &["--builtin-schema", "vendor.compose-spec"],
        &["docker-compose.yml", "docker-compose.production.yml"],
        Broken {
            what: "a misspelled compose key",
            name: "compose.yml",
            text: "services:\n  app:\n    image: ai-secretary:dev\n    depend_on: [postgres]\n",
        },
    );
}

/// `docker compose config` itself: it also interpolates the variables and
/// applies the merges. No machine of this project has the compose plugin, so
/// this runs only when asked (`cargo test --test ops -- --ignored`), and fails
/// there if docker compose is missing; the schema check above runs everywhere.
#[test]
#[ignore = "needs docker compose"]
fn compose_config_validates_with_docker_compose() {
    for file in ["docker-compose.yml", "docker-compose.production.yml"] {
        let out = std::process::Command::new("docker")
            .args([
                "compose",
                "-f",
                file,
                "--env-file",
                ".env.example",
                "config",
                "--quiet",
            ])
            .current_dir(promql::repo())
            .env("POSTGRES_PASSWORD", "x")
            .env("JWT_SECRET_KEY", "x".repeat(40))
            .env("ENCRYPTION_KEY", "ab".repeat(32))
            .env("GRAFANA_ADMIN_PASSWORD", "x")
            .output()
            .expect("docker is installed");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// hadolint, with the repository's settings (every finding fails); a rule is
/// ignored only with its reason, in .hadolint.yaml or beside the line.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn hadolint_finds_nothing_in_the_dockerfile() {
    passes_and_refuses(
        &pypi_tool("hadolint"),
        &["--no-color", "--config", ".hadolint.yaml"],
        &["Dockerfile"],
        Broken {
            what: "a shell-form CMD",
            name: "Dockerfile",
            text: "FROM debian:bookworm-slim\nUSER 10001:10001\nCMD /usr/local/bin/ai-secretary serve\n",
        },
    );
    assert_ignores_have_reasons("Dockerfile", |line| line.contains("hadolint ignore="));
    assert_ignores_have_reasons(".hadolint.yaml", |line| {
        let line = line.trim_start();
        line.starts_with("- DL") || line.starts_with("- SC")
    });
}

/// Every line of `file` that ignores a rule has its reason: a comment of its
/// own on the line above (not another pragma), or after it on the same line.
fn assert_ignores_have_reasons(file: &str, ignores: impl Fn(&str) -> bool) {
    let text = read(file);
    let lines: Vec<&str> = text.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        if !ignores(line) {
            continue;
        }
        let trailing = !line.trim_start().starts_with('#') && line.contains(" #");
        let above = n
            .checked_sub(1)
            .map(|p| lines[p].trim_start())
            .is_some_and(|p| p.starts_with('#') && !ignores(p));
        assert!(
            trailing || above,
            "{file}:{}: a rule is ignored without a reason: {line}",
            n + 1
        );
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck() {
    let dockerfile = read("Dockerfile");
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "not multi-stage");
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER instruction");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "runs as root: {user}"
    );
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/health"));
    assert!(dockerfile.contains("EXPOSE 8000"));
    assert!(
        dockerfile.contains("--locked"),
        "the build must use Cargo.lock"
    );
    // The build context keeps secrets and the target directory out.
    let ignore = read(".dockerignore");
    for entry in ["target", ".env", ".git"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            ".dockerignore lacks {entry}"
        );
    }
}

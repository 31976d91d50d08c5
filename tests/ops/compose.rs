//! The compose files and the Dockerfile. `docker compose config` validates the
//! compose files where the docker CLI has the compose plugin; everywhere, they
//! are parsed as YAML (merge keys applied) and held to what the other files
//! expect: the services and commands of DESIGN.md, the mounts that exist, the
//! volumes declared, the Prometheus targets that name real services.

use std::{collections::BTreeSet, path::Path};

use serde_json::Value;

use crate::{promql, read};

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
    let prometheus = read("monitoring/prometheus.dev.yml");
    assert!(prometheus.contains("'app:8000'"));
}

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

/// Every Prometheus target is a service of the production compose file.
#[test]
fn prometheus_targets_are_compose_services() {
    let compose = load("docker-compose.production.yml");
    let s = services(&compose);
    let config: Value = serde_norway::from_str(&read("monitoring/prometheus.yml")).unwrap();
    let mut hosts = Vec::new();
    for job in config["scrape_configs"].as_array().unwrap() {
        for sd in job["static_configs"].as_array().into_iter().flatten() {
            hosts.extend(
                strings(&sd["targets"])
                    .into_iter()
                    .map(|t| t.split(':').next().unwrap().to_owned()),
            );
        }
        for sd in job["dns_sd_configs"].as_array().into_iter().flatten() {
            hosts.extend(strings(&sd["names"]));
        }
    }
    assert!(hosts.len() >= 6, "{hosts:?}");
    for host in hosts.iter().filter(|h| *h != "localhost") {
        assert!(
            s.contains_key(host),
            "Prometheus scrapes {host}, which is no service"
        );
    }
    // And every ai-secretary service is scraped.
    for (name, service) in s {
        if service["command"].is_array()
            && service["image"]
                .as_str()
                .unwrap_or("")
                .contains("ai-secretary")
        {
            assert!(hosts.contains(name), "{name} is not scraped");
        }
    }
}

#[test]
fn compose_config_validates_where_docker_compose_exists() {
    let has_compose = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_compose {
        eprintln!(
            "docker compose is not available: the YAML checks above stand in for `docker compose config`"
        );
        return;
    }
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
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

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

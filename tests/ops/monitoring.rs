//! monitoring/: Prometheus config, alert rules (with their unit tests) and the
//! Grafana dashboard.

use std::collections::BTreeSet;

use crate::{promql, read, run_ok};

/// Both Prometheus configs (production's and the development stack's) pass
/// `promtool check config`, which also checks the rule files they name; what
/// they scrape is matched to their compose files in compose.rs.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn prometheus_configs_are_valid() {
    for config in ["monitoring/prometheus.yml", "monitoring/prometheus.dev.yml"] {
        run_ok("promtool", &["check", "config", config], None);
    }
    let config: serde_json::Value =
        serde_norway::from_str(&read("monitoring/prometheus.yml")).unwrap();
    let jobs: BTreeSet<&str> = config["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    for job in [
        "ai-secretary-api",
        "ai-secretary-relay",
        "ai-secretary-projector",
        "ai-secretary-replier",
        "postgres",
        "redis",
    ] {
        assert!(jobs.contains(job), "no scrape job {job}: {jobs:?}");
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn alert_rules_are_valid_and_fire_when_they_should() {
    run_ok(
        "promtool",
        &["check", "rules", "monitoring/alerts.yml"],
        None,
    );
    // The unit tests feed series and expect exactly these alerts at these times.
    run_ok(
        "promtool",
        &["test", "rules", "monitoring/alerts.test.yml"],
        None,
    );
    let names: BTreeSet<String> = promql::alert_exprs().into_iter().map(|(n, _)| n).collect();
    for alert in [
        "HighErrorRate",
        "HighLatencyP95",
        "ProjectionLagging",
        "RelayLagging",
        "TargetDown",
    ] {
        assert!(names.contains(alert), "no alert {alert}: {names:?}");
    }
}

/// Every dashboard query is valid PromQL (compiled by `promtool` as a recording
/// rule) and reads at least one metric; the seed's panels and the issue's are there.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn dashboard_parses_and_its_queries_compile() {
    let dashboards = promql::dashboards();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut titles = BTreeSet::new();
    for (file, dashboard) in &dashboards {
        for (n, (title, expr)) in promql::dashboard_exprs(dashboard).into_iter().enumerate() {
            assert!(
                !promql::metric_names(&expr).is_empty(),
                "{file}: panel {title:?} reads no metric: {expr}"
            );
            // JSON strings are valid YAML scalars: no escaping of our own.
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::Value::String(expr.clone())
            ));
            titles.insert(title);
        }
    }
    for title in [
        "API Response Time (p95)",
        "Error Rate",
        "Database Connections",
        "Events appended per second",
        "Projection lag (seconds)",
        "Cache hit ratio",
        "LLM latency",
        "LLM tokens per second",
    ] {
        assert!(titles.contains(title), "no panel {title:?}: {titles:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    run_ok(
        "promtool",
        &["check", "rules", file.to_str().unwrap()],
        None,
    );
}

/// The name extractor the dashboard checks rely on.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn metric_names_are_told_from_functions_labels_and_durations() {
    let names = promql::metric_names(
        r#"histogram_quantile(0.95, sum by (le, path) (rate(http_request_duration_seconds_bucket{path!~".*/stream", le!="x(y)"}[5m])))
           / on (job) group_left (instance) max without (pod) (up offset 5m) and bool llm_tokens_total"#,
    );
    let expected: BTreeSet<String> = [
        "http_request_duration_seconds_bucket",
        "up",
        "llm_tokens_total",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, expected);
    assert!(promql::metric_names("sum(rate(x_total[$__rate_interval]))").contains("x_total"));
    assert!(promql::metric_names("vector(1)").is_empty());
}

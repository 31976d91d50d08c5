//! Every Grafana panel query evaluated by a real Prometheus scraping the
//! running service: each must return a series, or the panel says "No data"
//! where it should show a number. `promtool` (tests/ops) only compiles the
//! queries; a query that is valid but selects nothing on a quiet service (the
//! Error Rate before any 5xx) is seen only here.
//!
//! The service is the real binary, all roles in one process, so that its
//! `/metrics` holds its own traffic alone: the in-process apps of the other
//! tests share this test binary's global metrics recorder, and their 5xx would
//! show on the Error Rate. Prometheus is the Debian package's binary (`.ci/run`
//! installs it), started privately on a free port with a one-second scrape
//! interval and its own scratch directory. Both stop when the test ends.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    helpers::eventually,
    process::{Service, print_tail_if_failing, until_ok},
    servers::free_port,
    support::promql,
};

/// A Prometheus of this test's own, scraping one target every second.
struct PrivatePrometheus {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
}

impl PrivatePrometheus {
    async fn scraping(target: &str) -> PrivatePrometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ai-secretary\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (Debian package `prometheus`; .ci/run installs it)");
        let prometheus = PrivatePrometheus {
            child: Some(child),
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        until_ok(&format!("{}/-/ready", prometheus.url)).await;
        prometheus
    }

    /// The instant vector `expr` evaluates to now: `(labels, value)` per series.
    async fn query(&self, expr: &str) -> Result<Vec<(Value, f64)>, String> {
        let response: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if response["status"] != "success" {
            return Err(format!("Prometheus refused {expr}: {response}"));
        }
        let result = &response["data"]["result"];
        let series = result
            .as_array()
            .ok_or_else(|| format!("not a vector: {response}"))?;
        series
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| format!("no value in {s}"))?;
                Ok((s["metric"].clone(), value))
            })
            .collect()
    }
}

impl Drop for PrivatePrometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        print_tail_if_failing(
            "the private Prometheus",
            &self.dir.path().join("prometheus.log"),
        );
    }
}

/// What a user does in a first session, while Prometheus watches: register,
/// create an assistant and a conversation, send a message and wait for the
/// reply (the LLM metrics), read the assistant back a few times (the cache).
/// Nothing fails, so no request answers 5xx.
async fn a_quiet_session(service: &Service) {
    let token = service.signed_up("watched@example.com").await;
    let create = async |path: &str, body: Value| {
        let (status, object) = service
            .call(Method::POST, path, Some(&token), Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{path}: {object}");
        object["id"].as_str().unwrap().to_owned()
    };
    let assistant = create("/api/v1/assistants", json!({ "name": "Watched" })).await;
    let conversation = create(
        "/api/v1/conversations",
        json!({ "assistant_id": assistant }),
    )
    .await;
    let messages = format!("/api/v1/conversations/{conversation}/messages");
    let (status, _) = service
        .call(
            Method::POST,
            &messages,
            Some(&token),
            Some(json!({ "content": "Hello" })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually("the reply is completed", async || {
        let (_, listed) = service
            .call(Method::GET, &messages, Some(&token), None)
            .await;
        match listed["data"][1]["status"].as_str() {
            Some("completed") => Ok(()),
            _ => Err(listed.to_string()),
        }
    })
    .await;
    for _ in 0..3 {
        let (status, _) = service
            .call(
                Method::GET,
                &format!("/api/v1/assistants/{assistant}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}

/// Panels that read only what an exporter exports (postgres-exporter's `pg_*`,
/// redis-exporter's `redis_*`): the production stack runs those exporters, this
/// test scrapes the service alone, so those queries have nothing to select here.
fn reads_only_exporters(expr: &str) -> bool {
    promql::metric_names(expr)
        .iter()
        .all(|name| promql::exported_by_an_exporter(name))
}

// Server-only: Grafana dashboards over the servers' exporters and a live Prometheus.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[tokio::test]
async fn every_dashboard_query_returns_a_series_from_a_live_prometheus() {
    let service = Service::start().await;
    let prometheus = PrivatePrometheus::scraping(&service.address).await;
    // The traffic comes after the first scrape, so every rate() sees it move.
    eventually("Prometheus scrapes the service", async || {
        if prometheus.query("up == 1").await?.is_empty() {
            Err("not scraped yet".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    a_quiet_session(&service).await;

    let mut queries = Vec::new();
    for (file, dashboard) in promql::dashboards() {
        for (title, expr) in promql::dashboard_exprs(&dashboard) {
            if !reads_only_exporters(&expr) {
                queries.push((format!("{file}: {title}"), title, expr));
            }
        }
    }
    assert!(queries.len() >= 20, "too few queries: {queries:?}");
    // Until a scrape after the session has landed, some rates may still be flat.
    let deadline = Instant::now() + Duration::from_secs(30);
    let results = loop {
        let mut results = Vec::new();
        let mut empty = Vec::new();
        for (origin, title, expr) in &queries {
            let series = prometheus.query(expr).await.unwrap();
            // A series that is NaN (0/0, a quantile of nothing) draws nothing either.
            if !series.iter().any(|(_, value)| value.is_finite()) {
                empty.push(format!("{origin}: {expr} -> {series:?}"));
            }
            results.push((title.clone(), expr.clone(), series));
        }
        if empty.is_empty() {
            break results;
        }
        assert!(
            Instant::now() < deadline,
            "panels with no data on a live service:\n{}",
            empty.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Nothing failed, and the Error Rate panel says so: 0, not "No data".
    let error_rate: Vec<_> = results
        .iter()
        .filter(|(title, _, _)| title == "Error Rate")
        .collect();
    assert_eq!(error_rate.len(), 2, "{error_rate:?}");
    for (_, expr, series) in error_rate {
        assert!(
            series.iter().all(|(_, value)| *value == 0.0),
            "the Error Rate reads other than 0 with no 5xx: {expr} -> {series:?}"
        );
    }
}

//! Part 1's HTTP caller: the bench user signed up and signed in, posting with
//! its bearer token.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use uuid::Uuid;

/// An HTTP caller signed in as the bench user.
#[derive(Clone)]
pub struct Api {
    pub base: Arc<str>,
    pub token: Arc<str>,
    pub client: reqwest::Client,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        self.client
            .post(self.url(path))
            .bearer_auth(&*self.token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))
    }

    /// A new conversation with `assistant`; its id.
    pub async fn conversation(&self, assistant: &str, n: usize) -> Result<Uuid> {
        let response = self
            .post(
                "/conversations",
                &json!({ "assistant_id": assistant, "title": format!("Bench conversation {n}") }),
            )
            .await?;
        created_id(response, "conversation").await
    }

    pub fn with_client(&self, client: reqwest::Client) -> Api {
        Api {
            client,
            ..self.clone()
        }
    }
}

pub async fn created_id(response: reqwest::Response, what: &str) -> Result<Uuid> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status != reqwest::StatusCode::CREATED {
        bail!("creating a {what} answered {status}: {body}");
    }
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the created {what} has no id: {body}"))
}

/// Register the bench user (`bench-<run_tag>@example.com`) and sign in.
pub async fn sign_up(base: &str, run_tag: &str) -> Result<Api> {
    let client = reqwest::Client::new();
    let email = format!("bench-{run_tag}@example.com");
    let password = "correct horse battery staple";
    let response = client
        .post(format!("{base}/api/v1/users"))
        .json(&json!({ "email": email, "password": password, "display_name": "Bench" }))
        .send()
        .await
        .context("registering the bench user")?;
    if response.status() != reqwest::StatusCode::CREATED {
        bail!(
            "registering answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let token: Value = client
        .post(format!("{base}/api/v1/auth/token"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .context("signing in")?
        .json()
        .await
        .context("the token response")?;
    let token = token["access_token"]
        .as_str()
        .ok_or_else(|| anyhow!("no access_token in {token}"))?;
    Ok(Api {
        base: base.into(),
        token: token.into(),
        client,
    })
}

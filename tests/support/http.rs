//! The query API as the tests and the benches call it: an authenticated GET,
//! with an `X-Consistency-Token` when the read must see a command, and the
//! token a command answers with.

use reqwest::{Client, RequestBuilder, Response};

/// The header a command answers with and a read may send back.
const CONSISTENCY: &str = "x-consistency-token";

/// GET `{base}/api/v1{path}` with `token` as the bearer and, if given, the
/// `consistency` token (the read then waits for the command it names); to send.
pub fn get(
    client: &Client,
    base: &str,
    path: &str,
    token: &str,
    consistency: Option<&str>,
) -> RequestBuilder {
    let request = client
        .get(format!("{base}/api/v1{path}"))
        .bearer_auth(token);
    match consistency {
        Some(at) => request.header(CONSISTENCY, at),
        None => request,
    }
}

/// A command's `X-Consistency-Token`, if the answer carries one.
pub fn consistency(response: &Response) -> Option<String> {
    Some(
        response
            .headers()
            .get(CONSISTENCY)?
            .to_str()
            .ok()?
            .to_owned(),
    )
}

//! Answers for what does not exist: an HTML 404 page for browsers, a JSON 404 for
//! scripts (`?format=json`, or any `/api/` path), and the router's fallback, which hands
//! gRPC requests (by their `content-type: application/grpc`) to the gRPC services and
//! answers every other unknown path with a 404 instead of an empty gRPC reply.

use std::convert::Infallible;

use askama::Template;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use tower::ServiceExt;

#[derive(Debug, Serialize, Template)]
#[template(path = "not_found.html")]
struct NotFoundPage<'a> {
    error: &'static str,
    path: &'a str,
    message: &'a str,
}

/// Whether `uri` asks for JSON: `/api/...` paths, or `format=json` in the query.
pub fn wants_json(uri: &Uri) -> bool {
    uri.path().starts_with("/api/")
        || uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "format=json"))
}

/// A 404 for `path` saying `message`, as JSON or as an HTML page.
pub fn not_found(path: &str, message: &str, json: bool) -> Response {
    let page = NotFoundPage {
        error: "not found",
        path,
        message,
    };
    if json {
        return (StatusCode::NOT_FOUND, axum::Json(page)).into_response();
    }
    match page.render() {
        Ok(html) => (StatusCode::NOT_FOUND, Html(html)).into_response(),
        // The template is fixed; if it ever fails, a plain 404 is still the right answer.
        Err(_) => (StatusCode::NOT_FOUND, format!("{message}\n")).into_response(),
    }
}

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`, ...).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// The fallback of the page router: gRPC goes to `grpc` (which answers unknown methods
/// with gRPC's own `UNIMPLEMENTED`), anything else that no page matched is a 404.
pub async fn fallback(grpc: Router, req: Request<Body>) -> Result<Response, Infallible> {
    if is_grpc(&req) {
        return grpc.oneshot(req).await;
    }
    let uri = req.uri().clone();
    Ok(not_found(
        uri.path(),
        "there is no page at this address",
        wants_json(&uri),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_chosen_for_api_paths_and_format_json() {
        let uri = |s: &str| s.parse::<Uri>().expect("uri");
        assert!(wants_json(&uri("/api/nope")));
        assert!(wants_json(&uri("/nope?x=1&format=json")));
        assert!(!wants_json(&uri("/nope?format=jsonx")));
        assert!(!wants_json(&uri("/apix")));
    }

    #[test]
    fn the_page_escapes_the_path() {
        let html = NotFoundPage {
            error: "not found",
            path: "/<script>",
            message: "m",
        }
        .render()
        .expect("render");
        assert!(html.contains("/&#60;script&#62;") || html.contains("/&lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }
}

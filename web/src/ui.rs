//! The dashboard: a few hand-written files (HTML, CSS, JavaScript modules) built into the binary,
//! served at `/` with no network, CDN or build step. They read the API under `/api/v1` with the
//! session cookie of `/login`; the files themselves hold no data, so they are served to anyone.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;

/// Each file: its name under `/ui/`, its type and its text.
const FILES: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript", include_str!("../ui/app.js")),
    ("dag.js", "text/javascript", include_str!("../ui/dag.js")),
    ("style.css", "text/css", include_str!("../ui/style.css")),
];

const INDEX: &str = include_str!("../ui/index.html");

/// Only this origin's scripts and styles; no frame may hold the dashboard.
const POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `/` and `/ui/{file}`.
pub fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX) }),
        )
        .route("/ui/{file}", get(file))
}

fn page(kind: &'static str, text: &'static str) -> Response {
    let mut response = text.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, text)) => page(kind, text),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("the dashboard has no file `{name}`"),
        )
        .into_response(),
    }
}

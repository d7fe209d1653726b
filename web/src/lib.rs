//! cairn's HTTP API (`cairn serve --http`): JSON under `/api/v1`, the same shapes as the command
//! line's `--json` (built once, in [`view`]), behind bearer tokens ([`token`]) that only the store's
//! hash of them lets in.

pub mod api;
mod error;
mod metrics;
mod openapi;
pub mod tls;
pub mod token;
pub mod view;

pub use api::{Config, ROUTES, router, serve, serve_router};
pub use axum::Router;
pub use openapi::document as openapi;

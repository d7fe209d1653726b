//! cairn's HTTP API (`cairn serve --http`): JSON under `/api/v1`, the same shapes as the command
//! line's `--json` (built once, in [`view`]), behind bearer tokens ([`token`]) that only the store's
//! hash of them lets in (or the session cookie [`session`] gives a browser); and the dashboard
//! that reads it, its files built into the binary.

pub mod api;
mod changes;
mod error;
mod metrics;
mod openapi;
mod session;
pub mod tls;
pub mod token;
mod ui;
pub mod view;

pub use api::{Config, ROUTES, router, serve, serve_router};
pub use axum::Router;
pub use openapi::document as openapi;

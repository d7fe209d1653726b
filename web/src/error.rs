//! The API's errors: a status and `{"code": "...", "message": "..."}`, the code stable for
//! programs, the message for people.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answered to a request.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// More, merged into the object (a plan's problems).
    pub more: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            more: None,
        }
    }

    /// Bad input: 400, naming what is wrong.
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let (Some(Value::Object(more)), Some(object)) = (self.more, body.as_object_mut()) {
            object.extend(more);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// The status and code of a store error, by what the caller can do.
fn of_store(e: &store::Error) -> (StatusCode, &'static str) {
    use store::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "unknown-op"),
        ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
        ErrorKind::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
        ErrorKind::Closed => (StatusCode::SERVICE_UNAVAILABLE, "closed"),
        ErrorKind::Unusable | ErrorKind::Write => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        let (status, code) = of_store(&e);
        Self::new(status, code, e.to_string())
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> Self {
        use engine::Error as E;
        let (status, code) = match &e {
            E::Store(inner) => of_store(inner),
            E::UnknownOp(_) => (StatusCode::NOT_FOUND, "unknown-op"),
            E::UnknownStep { .. } => (StatusCode::NOT_FOUND, "unknown-step"),
            E::Owned { .. } => (StatusCode::CONFLICT, "owned"),
            E::Final { .. } => (StatusCode::CONFLICT, "final"),
            E::Paused { .. } => (StatusCode::CONFLICT, "paused"),
            E::LockHeld { .. } => (StatusCode::CONFLICT, "lock-held"),
            E::CoolingDown { .. } => (StatusCode::CONFLICT, "cooling-down"),
            E::Refused(_) => (StatusCode::CONFLICT, "refused"),
            E::Snapshot(_) => (StatusCode::CONFLICT, "snapshot"),
            E::Render { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "render"),
            E::SubPlan(_) => (StatusCode::BAD_REQUEST, "sub-plan"),
            E::Secret(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<store::Error>() {
            Ok(e) => Self::from(e),
            Err(e) => Self::internal(format!("{e:#}")),
        }
    }
}

//! The browser's session: `POST /login` takes a pasted token and answers with an `HttpOnly`,
//! `SameSite=Strict` cookie that holds it, so the dashboard's scripts never see it; every route
//! takes that cookie as it takes the bearer header (the token is checked against the store on
//! each request, so a revoked token ends its sessions at once). `POST /logout` clears it.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::{App, Caller, Fields, body_object, find_caller, unauthorized};
use crate::error::ApiError;
use crate::token;

/// The cookie's name.
pub const COOKIE: &str = "cairn_session";
/// The header an action by cookie needs: a page of another site cannot set it without the
/// browser asking first (and `SameSite=Strict` already keeps the cookie from such requests).
pub const ACTION_HEADER: &str = "x-cairn-action";

/// The token the session cookie holds, if the request has one.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether a request by cookie carries [`ACTION_HEADER`].
pub fn same_origin(headers: &HeaderMap) -> bool {
    headers.contains_key(ACTION_HEADER)
}

fn set_cookie(response: &mut Response, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// `POST /login` (`{"token": "cairn_..."}`): the session cookie, and who the token is.
pub async fn login(State(app): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let map = body_object(&body)?;
    let given = Fields::new(&map, &["token"])?.text("token")?;
    let Some(given) = given.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) else {
        return Ok(unauthorized(
            "`token` is missing: paste a token of `cairn token create`",
        ));
    };
    let allowed = given
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !allowed {
        return Ok(unauthorized("this is not a token of `cairn token create`"));
    }
    let Some(caller) = find_caller(&app, token::hash(&given)).await? else {
        return Ok(unauthorized("this token is not known (revoked?)"));
    };
    tracing::info!(token = %caller.name, "a session begins on the dashboard");
    let mut response = axum::Json(whoami_json(&caller)).into_response();
    set_cookie(
        &mut response,
        &format!(
            "{COOKIE}={given}; HttpOnly; SameSite=Strict; Path=/{}",
            secure(&app)
        ),
    );
    Ok(response)
}

/// `POST /logout`: clears the session cookie.
pub async fn logout(State(app): State<App>) -> Response {
    let mut response = axum::Json(json!({"logged_out": true})).into_response();
    set_cookie(
        &mut response,
        &format!(
            "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
            secure(&app)
        ),
    );
    response
}

/// `; Secure` when the API is served over TLS: the browser then never sends the cookie in clear.
fn secure(app: &App) -> &'static str {
    if app.config.tls { "; Secure" } else { "" }
}

/// `GET /whoami`: the token's name and role (what the dashboard may offer).
pub async fn whoami(axum::Extension(caller): axum::Extension<Caller>) -> Response {
    axum::Json(whoami_json(&caller)).into_response()
}

fn whoami_json(caller: &Caller) -> serde_json::Value {
    json!({"name": caller.name, "role": caller.role.as_str()})
}

//! The routes under `/api/v1`, the token check in front of them, and the server.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use engine::owner::Rule;
use serde_json::{Map, Value, json};
use store::{Change, EventKind, OpFilter, OpId, OpStatus, Store};

use crate::error::ApiError;
use crate::token::{self, Role};
use crate::view;

/// What the API serves from.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: Store,
    /// How owners' liveness is judged on this store.
    pub rule: Rule,
    /// The options of the process the API runs in (for cancels and resumes it carries out).
    pub options: engine::Options,
    /// The stop of the process the API runs in: an op resumed through the API stops with it.
    pub stop: engine::StopHandle,
    /// The runtime ops run on (the engine's): an op resumed through the API runs there, not on
    /// the API's own.
    pub ops: tokio::runtime::Handle,
    /// Where a plan submitted as text has its relative paths start (sub-plans, files).
    pub workdir: PathBuf,
    /// Served over TLS: the session cookie is `Secure`.
    pub tls: bool,
}

/// The state each request sees.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub(crate) config: Arc<Config>,
    reader: Arc<store::Reader>,
    /// The watcher of moves that the clients of `/changes` share.
    pub(crate) watcher: crate::changes::Watcher,
    /// Answers of `GET /ops/{id}` and `GET /ops` made in the last [`SHOWN_FOR`], by op or
    /// filter: the dashboards re-read what they show whenever it moves, and share one read.
    shown: Arc<std::sync::Mutex<HashMap<String, Arc<Shown>>>>,
}

/// An answer of `GET /ops/{id}` or `GET /ops`, given again for [`SHOWN_FOR`]: its JSON, read once however
/// many ask meanwhile (the dashboards told of a move all ask at once), and that JSON gzipped once
/// a client asks for it (browsers do).
#[derive(Debug)]
struct Shown {
    at: std::time::Instant,
    body: tokio::sync::OnceCell<Bytes>,
    gzipped: std::sync::OnceLock<Bytes>,
}

impl Shown {
    fn gzipped(&self, body: &[u8]) -> Bytes {
        self.gzipped
            .get_or_init(|| {
                use std::io::Write as _;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                // Writing to memory cannot fail.
                let _ = gz.write_all(body);
                Bytes::from(gz.finish().unwrap_or_default())
            })
            .clone()
    }
}

/// How long an answer of `GET /ops/{id}` or `GET /ops` is given again: the feed of `/changes` looks for moves
/// this often, so a dashboard sees nothing older than it would anyway.
const SHOWN_FOR: Duration = Duration::from_millis(250);

/// Who calls: the token's name and role, found by its hash.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

impl Caller {
    /// As the op's events name them.
    fn by(&self) -> String {
        format!("token {}", self.name)
    }
}

type Answer = Result<Response, ApiError>;

/// The longest a request may take; a cancel waits for the op's owner at most [`CANCEL_WAIT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CANCEL_WAIT: Duration = Duration::from_secs(20);
/// The largest request body: a plan and its params.
const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// How many ops a page lists unless asked, and at most.
const PAGE: u32 = 50;
const PAGE_MAX: u32 = 500;

impl App {
    /// Drops the shared answers that show `ops` (each op's, and every page of ops): the next
    /// read is made anew.
    pub(crate) fn forget(&self, ops: &[OpId]) {
        let keys: Vec<String> = ops.iter().map(|op| op_key(*op)).collect();
        self.shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|key, _| !key.starts_with(PAGE_KEY) && !keys.contains(key));
    }

    /// Drops every shared answer.
    pub(crate) fn forget_all(&self) {
        self.shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Runs `read` on the blocking pool (reads are synchronous).
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&store::Reader, Rule) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (reader, rule) = (self.reader.clone(), self.config.rule);
        tokio::task::spawn_blocking(move || read(&reader, rule))
            .await
            .map_err(ApiError::internal)?
    }
}

/// Every route under `/api/v1`, by method and path: what the `OpenAPI` document must name.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/ops"),
    ("POST", "/ops"),
    ("GET", "/ops/{id}"),
    ("GET", "/ops/{id}/tasks/{task}/logs"),
    ("GET", "/ops/{id}/graph"),
    ("POST", "/ops/{id}/resume"),
    ("POST", "/ops/{id}/cancel"),
    ("POST", "/ops/{id}/approve"),
    ("POST", "/ops/{id}/reject"),
    ("GET", "/locks"),
    ("POST", "/pause"),
    ("POST", "/unpause"),
    ("POST", "/ack"),
    ("GET", "/nodes"),
    ("GET", "/schedules"),
    ("POST", "/ops/{id}/mark"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/whoami"),
    ("GET", "/changes"),
];

/// The API's routes, behind the token check, with timeouts, a body limit and compression.
pub fn router(config: Config) -> Result<Router, store::Error> {
    let reader = Arc::new(config.store.reader()?);
    // Asked once now, a store that hears of moves by listening (PostgreSQL) listens from the
    // start, not from the first follower of `/changes`: what moves then is named, not lost.
    reader.moves(None)?;
    let app = App {
        config: Arc::new(config),
        reader,
        watcher: crate::changes::Watcher::default(),
        shown: Arc::default(),
    };
    let api = Router::new()
        .route("/ops", get(list_ops).post(submit))
        .route("/ops/{id}", get(show_op))
        .route("/ops/{id}/tasks/{task}/logs", get(task_logs))
        .route("/ops/{id}/graph", get(graph))
        .route("/ops/{id}/resume", post(resume))
        .route("/ops/{id}/cancel", post(cancel))
        .route("/ops/{id}/approve", post(approve))
        .route("/ops/{id}/reject", post(reject))
        .route("/locks", get(locks))
        .route("/pause", post(pause))
        .route("/unpause", post(unpause))
        .route("/ack", post(ack))
        .route("/nodes", get(nodes))
        .route("/schedules", get(schedules))
        .route("/ops/{id}/mark", post(mark))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/logout", post(crate::session::logout))
        .route("/whoami", get(crate::session::whoami))
        .route("/changes", get(crate::changes::follow))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate))
        // Logging in is the one route without a token: it takes one.
        .route("/login", post(crate::session::login))
        .with_state(app);
    Ok(Router::new()
        .nest("/api/v1", api)
        .merge(crate::ui::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such path") })
        .layer(middleware::map_response(as_json_error))
        .layer(tower_http::compression::CompressionLayer::new())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        )))
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, config: Config) -> std::io::Result<()> {
    serve_router(listener, router(config).map_err(std::io::Error::other)?).await
}

/// Serves `router` (made by [`router`]) on `listener` until the process ends.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// An error answered by the HTTP stack itself (a body over the limit, a method a path does not
/// take, a timeout) as the API's JSON errors.
async fn as_json_error(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let code = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::NOT_FOUND => "not-found",
        s if s.is_client_error() => "bad-request",
        _ => "internal",
    };
    let message = status.canonical_reason().unwrap_or("error").to_lowercase();
    ApiError::new(status, code, message).into_response()
}

/// Lets in a request whose token the store knows, given as a bearer header or as the session
/// cookie of `/login`; a viewer's only to read (and to log out).
async fn authenticate(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| token::hash(t.trim()));
    let cookie = crate::session::cookie_token(request.headers()).map(|t| token::hash(&t));
    let by_cookie = bearer.is_none() && cookie.is_some();
    let Some(hash) = bearer.or(cookie) else {
        return unauthorized(
            "this needs a token: `Authorization: Bearer TOKEN`, or the session cookie of `/login`",
        );
    };
    let caller = match find_caller(&app, hash).await {
        Ok(Some(caller)) => caller,
        Ok(None) => return unauthorized("this token is not known (revoked?)"),
        Err(e) => return e.into_response(),
    };
    if request
        .uri()
        .to_string()
        .to_ascii_lowercase()
        .contains("%00")
    {
        return ApiError::bad(
            "bad-text",
            "the path or query holds a NUL character (`%00`), which no parameter takes",
        )
        .into_response();
    }
    let reads = request.method() == Method::GET || request.method() == Method::HEAD;
    let logout = request.uri().path().ends_with("/logout");
    if !reads && by_cookie && !crate::session::same_origin(request.headers()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "an action by session cookie needs the `{}` header (cross-site requests are refused)",
                crate::session::ACTION_HEADER
            ),
        )
        .into_response();
    }
    if !reads && !logout && caller.role != Role::Operator {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token `{}` is a viewer's: only an operator's may act",
                caller.name
            ),
        )
        .into_response();
    }
    request.extensions_mut().insert(caller);
    let response = next.run(request).await;
    if !reads {
        // What an action changed is seen by the next read.
        app.forget_all();
    }
    response
}

/// The caller whose token has the SHA-256 `hash`, if the store knows it.
pub(crate) async fn find_caller(app: &App, hash: String) -> Result<Option<Caller>, ApiError> {
    let found = app
        .read(move |reader, _| {
            Ok(reader
                .tokens()?
                .into_iter()
                .find(|t| token::same(&t.hash, &hash)))
        })
        .await?;
    Ok(found.map(|row| Caller {
        name: row.name,
        role: Role::parse(&row.role).unwrap_or(Role::Viewer),
    }))
}

pub(crate) fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

fn ok(value: &Value) -> Response {
    axum::Json(value).into_response()
}

/// An op id from the path.
fn op_id(text: &str) -> Result<OpId, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(OpId)
        .ok_or_else(|| {
            ApiError::bad(
                "bad-op-id",
                format!("`{text}` is not an op id (a positive number)"),
            )
        })
}

/// A request's body as a JSON object (an empty body is an empty object).
pub(crate) fn body_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) if holds_nul(&value) => Err(ApiError::bad(
            "bad-text",
            "a text of the body holds a NUL character (`\\u0000`), which no field takes",
        )),
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad("bad-json", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad(
            "bad-json",
            format!("the body is not JSON: {e}"),
        )),
    }
}

/// Whether a text (a key or a string value) anywhere in `value` holds a NUL character: no store
/// keeps one in a text (PostgreSQL refuses it), so it is refused as bad input.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Refuses keys a request does not take, and reads the text ones it does.
pub(crate) struct Fields<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(map: &'a Map<String, Value>, known: &[&str]) -> Result<Self, ApiError> {
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ApiError::bad(
                "unknown-field",
                format!(
                    "unknown field `{key}`; this takes {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(Self { map })
    }

    pub(crate) fn text(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::bad(
                "bad-field",
                format!("`{key}` must be a string"),
            )),
        }
    }
}

/// `GET /ops`: ops newest first; `status`, `plan`, `limit` (at most 500), `before` (an op id:
/// the page after it). `next_before` names the next page, when there is one.
async fn list_ops(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Answer {
    let mut filter = OpFilter {
        limit: Some(PAGE),
        ..OpFilter::default()
    };
    for (key, value) in &query {
        match key.as_str() {
            "status" => {
                filter.status = Some(OpStatus::parse(value).ok_or_else(|| {
                    ApiError::bad(
                        "bad-status",
                        format!(
                            "`{value}` is not a status; one of {}",
                            OpStatus::ALL
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?);
            }
            "plan" => filter.plan = Some(value.clone()),
            "limit" => {
                filter.limit = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=PAGE_MAX).contains(n))
                        .ok_or_else(|| {
                            ApiError::bad(
                                "bad-limit",
                                format!("`limit` must be a number from 1 to {PAGE_MAX}"),
                            )
                        })?,
                );
            }
            "before" => filter.before = Some(op_id(value)?),
            other => {
                return Err(ApiError::bad(
                    "unknown-parameter",
                    format!("unknown parameter `{other}`; this takes status, plan, limit, before"),
                ));
            }
        }
    }
    let key = format!("{PAGE_KEY}{filter:?}");
    shared(&app, key, &headers, move |reader, rule| {
        let now = engine::owner::now();
        let limit = filter.limit.unwrap_or(PAGE) as usize;
        let mut rows = view::matching(
            reader,
            &OpFilter {
                limit: filter.limit.map(|l| l + 1),
                ..filter
            },
            rule,
            now,
        )?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        let ops = rows
            .iter()
            .map(|row| view::op_json(reader, row, rule, now))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next = rows.last().filter(|_| more).map(|r| r.id.0);
        Ok(json!({"ops": ops, "next_before": next}))
    })
    .await
}

/// The op `op`, read; an unknown op is a 404.
fn read_op(reader: &store::Reader, op: OpId) -> Result<store::OpRow, ApiError> {
    reader.op(op).map_err(|e| match e {
        store::Error::NotFound(op) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown-op", format!("no op {op}"))
        }
        other => ApiError::from(other),
    })
}

/// `GET /ops/{id}`: the op as `cairn show --json` prints it, secrets masked.
async fn show_op(State(app): State<App>, Path(id): Path<String>, headers: HeaderMap) -> Answer {
    let op = op_id(&id)?;
    shared(&app, op_key(op), &headers, move |reader, rule| {
        let row = read_op(reader, op)?;
        Ok(view::record(reader, &row, rule, engine::owner::now())?)
    })
    .await
}

/// The key of an op's shared answer, and what the keys of pages of ops start with.
fn op_key(op: OpId) -> String {
    format!("op {op}")
}
const PAGE_KEY: &str = "ops ";

/// Answers a read that every request of the same `key` in the next [`SHOWN_FOR`] shares (see
/// [`Shown`]), gzipped when the client accepts it.
async fn shared(
    app: &App,
    key: String,
    headers: &HeaderMap,
    read: impl FnOnce(&store::Reader, Rule) -> Result<Value, ApiError> + Send + 'static,
) -> Answer {
    let shown = {
        let mut all = app
            .shown
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|_, shown| shown.at.elapsed() < SHOWN_FOR);
        all.entry(key)
            .or_insert_with(|| {
                Arc::new(Shown {
                    at: std::time::Instant::now(),
                    body: tokio::sync::OnceCell::new(),
                    gzipped: std::sync::OnceLock::new(),
                })
            })
            .clone()
    };
    let body = shown
        .body
        .get_or_try_init(|| {
            app.read(move |reader, rule| {
                let value = read(reader, rule)?;
                Ok(Bytes::from(
                    serde_json::to_vec(&value).map_err(ApiError::internal)?,
                ))
            })
        })
        .await?
        .clone();
    let gzip = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            parts.next().is_some_and(|c| c.eq_ignore_ascii_case("gzip"))
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        });
    let json = (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    Ok(if gzip {
        // The compression layer leaves an answer that has its encoding alone.
        let encoding = (header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        ([json, vary, encoding], shown.gzipped(&body)).into_response()
    } else {
        ([json, vary], body).into_response()
    })
}

/// `GET /ops/{id}/graph`: the steps of the op's plan (its snapshot) and what each needs, in plan
/// order: what the dashboard draws.
async fn graph(State(app): State<App>, Path(id): Path<String>) -> Answer {
    let op = op_id(&id)?;
    let value = app
        .read(move |reader, _| {
            read_op(reader, op)?;
            let snapshot = reader.snapshot(op)?;
            let plan = plans::parse(&snapshot.name, &snapshot.text).map_err(|_| {
                ApiError::internal(format!("op {op}'s stored plan no longer parses"))
            })?;
            let steps: Vec<Value> = plan
                .steps
                .iter()
                .map(|step| {
                    json!({
                        "id": step.id,
                        "needs": step.needs.iter().filter_map(|&n| plan.steps.get(n).map(|s| s.id.clone())).collect::<Vec<_>>(),
                    })
                })
                .collect();
            Ok(json!({"steps": steps}))
        })
        .await?;
    Ok(ok(&value))
}

/// `GET /ops/{id}/tasks/{task}/logs`: the lines a task printed (a step's name takes its
/// fan-out items' too), as `cairn logs --json` prints them; `attempt=N` for one attempt;
/// `follow=1` for Server-Sent Events: each line an event `line`, then new ones as they come, and
/// an event `end` (the op's status) once the op no longer runs.
async fn task_logs(
    State(app): State<App>,
    Path((id, task)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let op = op_id(&id)?;
    let mut attempt = None;
    let mut follow = false;
    for (key, value) in &query {
        match key.as_str() {
            "attempt" => {
                attempt = Some(value.parse::<u32>().map_err(|_| {
                    ApiError::bad("bad-attempt", format!("`{value}` is not an attempt number"))
                })?);
            }
            "follow" => {
                follow = match value.as_str() {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => {
                        return Err(ApiError::bad(
                            "bad-follow",
                            format!("`follow={value}`: 1 or 0"),
                        ));
                    }
                };
            }
            other => {
                return Err(ApiError::bad(
                    "unknown-parameter",
                    format!("unknown parameter `{other}`; this takes attempt, follow"),
                ));
            }
        }
    }
    let mut tail = LogTail {
        op,
        task,
        attempt,
        seen: HashMap::new(),
    };
    let (lines, tail, ended) = app
        .read(move |reader, rule| {
            let (lines, ended) = tail.read(reader, rule)?;
            Ok((lines, tail, ended))
        })
        .await?;
    if !follow {
        return Ok(ok(&Value::Array(lines)));
    }
    Ok(follow_logs(app, tail, &lines, ended).into_response())
}

/// What a reader of a task's logs has seen so far.
#[derive(Debug)]
struct LogTail {
    op: OpId,
    task: String,
    attempt: Option<u32>,
    /// The last chunk read of each attempt.
    seen: HashMap<(store::TaskNo, u32), i64>,
}

impl LogTail {
    /// The lines written since the last read, and the op's status once it no longer runs.
    fn read(
        &mut self,
        reader: &store::Reader,
        rule: Rule,
    ) -> Result<(Vec<Value>, Option<OpStatus>), ApiError> {
        let (op, task) = (self.op, &self.task);
        let row = read_op(reader, op)?;
        let tasks = reader.tasks(op)?;
        let wanted: Vec<&store::TaskRow> = match tasks.iter().find(|t| &t.name == task) {
            Some(t) if t.name != t.step => vec![t],
            _ => tasks.iter().filter(|t| &t.step == task).collect(),
        };
        if wanted.is_empty() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown-task",
                format!("op {op} has no task or step `{task}`"),
            ));
        }
        let mut lines = Vec::new();
        for t in wanted {
            for chunk in reader.logs(op, Some(t.task_no), None)? {
                let key = (chunk.task_no, chunk.attempt);
                if self.attempt.is_some_and(|a| a != chunk.attempt)
                    || self.seen.get(&key).is_some_and(|&last| chunk.seq <= last)
                {
                    continue;
                }
                self.seen.insert(key, chunk.seq);
                for line in String::from_utf8_lossy(&chunk.data).split_inclusive('\n') {
                    lines.push(view::log_line(
                        &t.name,
                        chunk.attempt,
                        chunk.stream,
                        chunk.at,
                        line,
                    ));
                }
            }
        }
        let shown = rule.shown_status(&row, engine::owner::now());
        Ok((lines, shown.is_ended().then_some(shown)))
    }
}

/// How often a followed log is read again.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// The Server-Sent Events of a followed log: `lines` first, then what comes, then `end`.
fn follow_logs(
    app: App,
    tail: LogTail,
    lines: &[Value],
    ended: Option<OpStatus>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
    + use<>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    struct Follow {
        app: App,
        tail: Option<LogTail>,
        queued: std::collections::VecDeque<Event>,
        ended: Option<OpStatus>,
    }
    let line = |l: &Value| Event::default().event("line").data(l.to_string());
    let end = |s: OpStatus| {
        Event::default()
            .event("end")
            .data(json!({"status": s.as_str()}).to_string())
    };
    let state = Follow {
        app,
        tail: Some(tail),
        queued: lines.iter().map(line).collect(),
        ended,
    };
    let stream = futures_util::stream::unfold(state, move |mut state| async move {
        loop {
            if let Some(event) = state.queued.pop_front() {
                return Some((Ok(event), state));
            }
            if let Some(status) = state.ended.take() {
                state.tail = None;
                return Some((Ok(end(status)), state));
            }
            let mut tail = state.tail.take()?;
            tokio::time::sleep(FOLLOW_EVERY).await;
            let read = state
                .app
                .read(move |reader, rule| {
                    let read = tail.read(reader, rule);
                    Ok((read, tail))
                })
                .await;
            // A read that failed ends the stream; the client may follow again.
            let Ok((Ok((lines, ended)), tail)) = read else {
                return None;
            };
            state.queued.extend(lines.iter().map(line));
            state.ended = ended;
            state.tail = Some(tail);
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /locks`: held locks, cooldowns and the pause, as `cairn locks --json` prints them.
async fn locks(State(app): State<App>) -> Answer {
    let value = app
        .read(|reader, _| Ok(view::locks(reader, engine::owner::now())?))
        .await?;
    Ok(ok(&value))
}

/// `GET /openapi.json`: the API's `OpenAPI` document.
async fn openapi() -> Answer {
    Ok(ok(&crate::openapi::document()))
}

/// Records an event naming who acted through the API.
async fn note(
    app: &App,
    op: OpId,
    kind: EventKind,
    task: Option<String>,
    message: String,
) -> Result<(), ApiError> {
    app.config
        .store
        .apply(vec![Change::Event {
            op,
            owner: None,
            at: engine::owner::now(),
            kind,
            task,
            message,
        }])
        .await?;
    Ok(())
}

/// `POST /ops`: submits a plan given as text, with params (`{"plan": "...", "params": {...}}`);
/// `cairn serve` starts it. 201 with `{"id": N, "uuid": "..."}`.
async fn submit(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Answer {
    let map = body_object(&body)?;
    let fields = Fields::new(&map, &["plan", "params"])?;
    let text = fields.text("plan")?.ok_or_else(|| {
        ApiError::bad("missing-field", "`plan` (the plan's YAML text) is missing")
    })?;
    let params = match map.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => {
            return Err(ApiError::bad(
                "bad-field",
                "`params` must be an object of names and values",
            ));
        }
    };
    let plan = plans::parse("plan", &text).map_err(|problems| {
        let problems = problems.clamped();
        let mut e = ApiError::bad(
            "invalid-plan",
            format!("the plan has {} problem(s)", problems.list.len()),
        );
        e.more = Some(json!({"problems": problems.json()}));
        e
    })?;
    let params = plans::params::resolve(&plan, &[], Some(&params)).map_err(|problems| {
        ApiError::bad(
            "bad-params",
            problems
                .iter()
                .map(|p| p.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let workdir = app.config.workdir.clone();
    let files = engine::op::children::load(&workdir, &plan)?;
    let new = engine::NewRun {
        env: engine::op::capture_env(&plan),
        workdir,
        files,
        parent: None,
        plan,
        params,
    };
    let store = app.config.store.clone();
    let op = engine::op::submit(&store, new, None).await?;
    note(
        &app,
        op,
        EventKind::Submitted,
        None,
        format!("submitted through the HTTP API by {}", caller.by()),
    )
    .await?;
    let uuid = app.read(move |reader, _| Ok(reader.op(op)?.uuid)).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": op.0, "uuid": uuid})),
    )
        .into_response())
}

/// `POST /ops/{id}/cancel` (`{"reason": "..."}`): 200 once canceled, 202 while its owner still
/// ends it.
async fn cancel(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let op = op_id(&id)?;
    let map = body_object(&body)?;
    let reason = Fields::new(&map, &["reason"])?.text("reason")?;
    app.read(move |reader, _| read_op(reader, op).map(drop))
        .await?;
    let config = &app.config;
    let end = engine::op::cancel(
        &config.store,
        op,
        (caller.by(), reason),
        None,
        config.options.clone(),
        CANCEL_WAIT,
        Arc::new(|_: &engine::progress::Progress| {}),
    )
    .await?;
    let (status, text) = match end {
        engine::op::CancelEnd::Canceled => (StatusCode::OK, "canceled"),
        engine::op::CancelEnd::AlreadyCanceled => (StatusCode::OK, "already-canceled"),
        engine::op::CancelEnd::Requested { .. } => (StatusCode::ACCEPTED, "requested"),
    };
    Ok((status, axum::Json(json!({"id": op.0, "cancel": text}))).into_response())
}

/// `POST /ops/{id}/approve` (`{"step": "...", "comment": "..."}`; `step` may be left out when
/// one gate waits).
async fn approve(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    answer(app, caller, &id, &body, true).await
}

/// `POST /ops/{id}/reject` (`{"step": "...", "comment": "..."}`): the gate's task fails.
async fn reject(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    answer(app, caller, &id, &body, false).await
}

async fn answer(app: App, caller: Caller, id: &str, body: &Bytes, yes: bool) -> Answer {
    let op = op_id(id)?;
    let map = body_object(body)?;
    let fields = Fields::new(&map, &["step", "comment"])?;
    let (step, comment) = (fields.text("step")?, fields.text("comment")?);
    let step = app
        .read(move |reader, _| {
            read_op(reader, op)?;
            if let Some(step) = step {
                return Ok(step);
            }
            let waiting: Vec<String> = reader
                .active_tasks(op)?
                .into_iter()
                .filter(|t| t.status == store::TaskStatus::Waiting)
                .map(|t| t.name)
                .collect();
            match waiting.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "no-gate",
                    format!("op {op} has no gate waiting for an answer"),
                )),
                many => Err(ApiError::bad(
                    "missing-field",
                    format!(
                        "op {op} has {} gates waiting ({}): name one as `step`",
                        many.len(),
                        many.join(", ")
                    ),
                )),
            }
        })
        .await?;
    engine::op::approve(&app.config.store, op, &step, yes, comment, caller.by()).await?;
    let verb = if yes { "approved" } else { "rejected" };
    Ok(ok(&json!({"id": op.0, "step": step, "answer": verb})))
}

/// `POST /ops/{id}/resume` (`{"from": "step"}` to run that step and what follows it again): a
/// failed or interrupted op is resumed by this process. 202: it runs.
async fn resume(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let op = op_id(&id)?;
    let map = body_object(&body)?;
    let from = Fields::new(&map, &["from"])?.text("from")?;
    let step = from.clone();
    let shown = app
        .read(move |reader, rule| {
            let row = read_op(reader, op)?;
            if let Some(step) = step
                && !reader.tasks(op)?.iter().any(|t| t.step == step)
            {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown-step",
                    format!("op {op} has no step `{step}` to resume from"),
                ));
            }
            Ok(rule.shown_status(&row, engine::owner::now()))
        })
        .await?;
    if !matches!(shown, OpStatus::Failed | OpStatus::Interrupted) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-resumable",
            format!("op {op} is {shown}: only a failed or interrupted op is resumed"),
        ));
    }
    let asked = match &from {
        Some(step) => format!("resume from `{step}` asked by {}", caller.by()),
        None => format!("resume asked by {}", caller.by()),
    };
    note(&app, op, EventKind::ResumeRequested, None, asked).await?;
    let config = app.config.clone();
    app.config.ops.clone().spawn(async move {
        let end = engine::op::resume(
            &config.store,
            op,
            engine::op::Edits {
                from: from.as_deref(),
                ..Default::default()
            },
            config.options.clone(),
            engine::op::Overrides::default(),
            Arc::new(|_: &engine::progress::Progress| {}),
            config.stop.clone(),
        )
        .await;
        match end {
            Ok(end) => tracing::info!(op = op.0, "resumed through the HTTP API: {end:?}"),
            Err(e) => tracing::warn!(op = op.0, "resume through the HTTP API failed: {e}"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"id": op.0, "resume": "started"})),
    )
        .into_response())
}

/// The scope of a pause in a body: `plan` and `key` (a lock-key prefix), both optional.
fn pause_scope(fields: &Fields) -> Result<store::PauseScope, ApiError> {
    let scope = store::PauseScope {
        plan: fields.text("plan")?,
        key: fields.text("key")?,
    };
    if scope.plan.as_deref() == Some("") || scope.key.as_deref() == Some("") {
        return Err(ApiError::bad(
            "bad-scope",
            "`plan` and `key` need a value that is not empty",
        ));
    }
    Ok(scope)
}

/// `POST /pause` (`{"reason": "...", "plan": "...", "key": "...", "for": "2h"}`): no new op in
/// the scope (every op without `plan` and `key`) starts until `/unpause` names the same scope or
/// the window given by `for` ends; `locks` says who paused (the token) and why.
async fn pause(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Answer {
    let map = body_object(&body)?;
    let fields = Fields::new(&map, &["reason", "plan", "key", "for"])?;
    let at = engine::owner::now();
    let until = match fields.text("for")? {
        Some(text) => {
            let d = plans::units::parse_duration(&text).map_err(|e| {
                ApiError::bad(
                    "bad-duration",
                    format!("`for`: `{text}` is not a duration: {e}"),
                )
            })?;
            Some(at.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)))
        }
        None => None,
    };
    let pause = store::Pause {
        scope: pause_scope(&fields)?,
        by: caller.by(),
        at,
        reason: fields.text("reason")?,
        until,
    };
    app.config
        .store
        .apply(vec![Change::Pause { pause }])
        .await?;
    Ok(ok(&json!({"paused": true})))
}

/// `POST /unpause` (`{"plan": "...", "key": "..."}`): lifts the pause of exactly that scope (the
/// global one without either).
async fn unpause(State(app): State<App>, body: Bytes) -> Answer {
    let map = body_object(&body)?;
    let fields = Fields::new(&map, &["plan", "key"])?;
    let scope = pause_scope(&fields)?;
    app.config
        .store
        .apply(vec![Change::Unpause { scope }])
        .await?;
    Ok(ok(&json!({"paused": false})))
}

/// `POST /ack` (`{"key": "...", "reason": "..."}`): acknowledges a lock key's cooldown, so a new
/// op on it may start now; recorded in the events of the op it follows.
async fn ack(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Answer {
    let map = body_object(&body)?;
    let fields = Fields::new(&map, &["key", "reason"])?;
    let key = fields
        .text("key")?
        .ok_or_else(|| ApiError::bad("missing-field", "`key` (the lock key) is missing"))?;
    let request = store::Request {
        by: caller.by(),
        at: engine::owner::now(),
        reason: fields.text("reason")?,
    };
    app.config
        .store
        .apply(vec![Change::Ack {
            key: key.clone(),
            request,
        }])
        .await
        .map_err(|e| match e {
            store::Error::NoCooldown { .. } => {
                ApiError::new(StatusCode::CONFLICT, "no-cooldown", e.to_string())
            }
            other => ApiError::from(other),
        })?;
    Ok(ok(&json!({"key": key, "acked": true})))
}

/// `GET /nodes`: the live serving nodes and the ops each holds, as `cairn nodes --json`.
async fn nodes(State(app): State<App>) -> Answer {
    let value = app
        .read(|reader, _| {
            let nodes = view::live_nodes(reader, engine::owner::now())?;
            Ok(nodes
                .iter()
                .map(|(n, r)| view::node_json(n, r))
                .collect::<Value>())
        })
        .await?;
    Ok(ok(&value))
}

/// `GET /schedules`: the schedules and their next firings, as `cairn schedule list --json`.
async fn schedules(State(app): State<App>) -> Answer {
    let value = app
        .read(|reader, _| {
            let now = engine::owner::now();
            Ok(reader
                .schedules()?
                .iter()
                .map(|s| view::schedule_json(s, now))
                .collect::<Value>())
        })
        .await?;
    Ok(ok(&value))
}

/// `POST /ops/{id}/mark` (`{"step": "...", "status": "succeeded"|"skipped", "reason": "...",
/// "outputs": {"key": "value"}, "allow_missing_outputs": false}`): resolves a step by hand, as
/// `cairn mark`; the next resume goes on from there.
async fn mark(
    State(app): State<App>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let op = op_id(&id)?;
    let map = body_object(&body)?;
    let fields = Fields::new(
        &map,
        &[
            "step",
            "status",
            "reason",
            "outputs",
            "allow_missing_outputs",
        ],
    )?;
    let missing = |key: &str, what: &str| {
        ApiError::bad("missing-field", format!("`{key}` ({what}) is missing"))
    };
    let step = fields
        .text("step")?
        .ok_or_else(|| missing("step", "the step"))?;
    let reason = fields
        .text("reason")?
        .ok_or_else(|| missing("reason", "why, for the audit trail"))?;
    let status = match fields.text("status")?.as_deref() {
        Some("succeeded") => store::TaskStatus::Succeeded,
        Some("skipped") => store::TaskStatus::Skipped,
        _ => {
            return Err(ApiError::bad(
                "bad-field",
                "`status` must be `succeeded` or `skipped`",
            ));
        }
    };
    let outputs = match map.get("outputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) if o.values().all(Value::is_string) => o.clone(),
        Some(_) => {
            return Err(ApiError::bad(
                "bad-field",
                "`outputs` must be an object of names and text values",
            ));
        }
    };
    let allow = match map.get("allow_missing_outputs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad(
                "bad-field",
                "`allow_missing_outputs` must be true or false",
            ));
        }
    };
    app.read(move |reader, _| read_op(reader, op).map(drop))
        .await?;
    engine::op::mark(
        &app.config.store,
        op,
        &step,
        status,
        outputs,
        (caller.by(), reason),
        allow,
    )
    .await?;
    Ok(ok(
        &json!({"id": op.0, "step": step, "status": status.as_str()}),
    ))
}

//! A `sql` step: each attempt opens one connection to a PostgreSQL, MySQL or MariaDB server, runs
//! the step's `sql.check` (a row back means the work is done), then its statements in order (in one
//! transaction with `transaction: true`), their values bound as parameters, never inserted into
//! the statement's text; its outputs come from the last statement's single row and row count.
//!
//! - [`run`]: renders the URL and the parameters' values, then runs [`attempts`].
//! - `SqlAttempt`: one attempt ([`Attempt`]), stopped by the run's stop or the step's `timeout`,
//!   which also cancel the statement on the server (`Canceller`).
//! - `Conn`: one connection, `tokio-postgres` or `mysql_async`; `Answer`: one statement's result.
//!
//! Each attempt's log says what it did, a line per statement (`statement 1 of 2 (...): 1 row`),
//! without the parameters' values. The URL's password, and every secret, is masked in every
//! error and log line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plans::model::{Action, Sql, Statement, Step};
use plans::template::Context;
use procs::spawn::{Chunk, Stream};
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::attempts::{Attempt, attempts};
use super::carry::Carry;
use super::context::Shared;
use super::logs::write_logs;
use super::process::finish_logs;
use super::{Ended, Fatal, Job, TaskEnd, fail_before_start, shared_mask, start_attempt};

/// Attempts of a `sql` task (`prior` attempts made, `retry_from` before this round).
pub(crate) async fn run(
    shared: &Shared,
    job: &Job,
    (prior, retry_from): (u32, u32),
    ctx: &Context,
    started: Instant,
    stop: &watch::Receiver<bool>,
    carry: &mut Carry,
) -> Result<TaskEnd, Fatal> {
    let step = shared.step(job.step);
    let Action::Sql(sql) = &step.action else {
        carry.flush(shared).await?;
        return fail_before_start(shared, job, prior + 1, "not a `sql` step".to_owned()).await;
    };
    let rendered = match render(sql, ctx) {
        Ok(rendered) => rendered,
        Err(error) => {
            carry.flush(shared).await?;
            let error = shared_mask(shared, &error);
            return fail_before_start(shared, job, prior + 1, error).await;
        }
    };
    let mut attempt = SqlAttempt {
        shared,
        job,
        step,
        sql,
        rendered: Arc::new(rendered),
        retry_from,
        stop,
        began: None,
    };
    attempts(
        shared,
        job,
        (prior, retry_from),
        started,
        stop,
        carry,
        &mut attempt,
    )
    .await
}

/// A statement with its parameters' values rendered.
#[derive(Debug)]
struct Bound {
    query: String,
    values: Vec<String>,
}

/// What a `sql` task runs, rendered.
#[derive(Debug)]
struct Rendered {
    url: String,
    statements: Vec<Bound>,
    check: Option<Bound>,
}

fn render(sql: &Sql, ctx: &Context) -> Result<Rendered, String> {
    let url = sql
        .url
        .render(ctx)
        .map_err(|e| format!("cannot render `sql.url`: {e}"))?;
    let bind = |s: &Statement| -> Result<Bound, String> {
        let values = s
            .params
            .iter()
            .map(|p| {
                p.render(ctx)
                    .map_err(|e| format!("cannot render a parameter of `{}`: {e}", short(&s.query)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Bound {
            query: s.query.clone(),
            values,
        })
    };
    Ok(Rendered {
        url,
        statements: sql.statements.iter().map(bind).collect::<Result<_, _>>()?,
        check: sql.check.as_ref().map(bind).transpose()?,
    })
}

/// What every attempt of a `sql` task runs.
struct SqlAttempt<'a> {
    shared: &'a Shared,
    job: &'a Job,
    step: &'a Step,
    sql: &'a Sql,
    rendered: Arc<Rendered>,
    retry_from: u32,
    stop: &'a watch::Receiver<bool>,
    began: Option<Instant>,
}

impl Attempt for SqlAttempt<'_> {
    async fn attempt(&mut self, n: u32, carry: &mut Carry) -> Result<Ended, Fatal> {
        let (shared, job, step) = (self.shared, self.job, self.step);
        start_attempt(shared, job, n, self.retry_from, carry).await?;
        if !shared.lease_holds() {
            return Err(Fatal::Lost(
                "the lease ran out before the step could start".to_owned(),
            ));
        }
        self.began.get_or_insert_with(Instant::now);
        let canceller = Canceller::default();
        let (sink, chunks) = procs::spawn::sink();
        let logs = tokio::spawn(write_logs(
            shared.store.clone(),
            (shared.op, shared.me.clone()),
            (job.task(), n),
            chunks,
            (step.log_limit, shared.options.lease / 2),
            shared.secrets.clone(),
        ));
        let log = Log {
            sink,
            url: self.rendered.url.clone(),
        };
        let work = execute(
            Arc::clone(&self.rendered),
            self.sql.clone(),
            canceller.clone(),
            log.clone(),
        );
        let limited = async {
            match step.timeout {
                Some(limit) => tokio::time::timeout(limit, work).await.ok(),
                None => Some(work.await),
            }
        };
        let mut stop = self.stop.clone();
        let outcome = tokio::select! {
            outcome = limited => Some(outcome),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(outcome) = outcome else {
            canceller.cancel().await;
            log.line(
                Stream::Stderr,
                "stopped; the running statement was canceled",
            )
            .await;
            drop(log);
            finish_logs(shared, logs).await;
            return Ok(Ended::Interrupted);
        };
        let mask = |e: &str| shared_mask(shared, &hide_password(&self.rendered.url, e));
        match &outcome {
            None => log.line(
                Stream::Stderr,
                "timed out; the running statement was canceled",
            ),
            Some(Err(e)) => log.line(Stream::Stderr, e),
            Some(Ok(_)) => log.line(Stream::Stdout, "done"),
        }
        .await;
        drop(log);
        finish_logs(shared, logs).await;
        Ok(match outcome {
            None => {
                canceller.cancel().await;
                Ended::Failed {
                    error: format!(
                        "timed out after {}",
                        plans::units::format_duration(step.timeout.unwrap_or_default())
                    ),
                    exit_code: None,
                    retryable: true,
                }
            }
            Some(Ok((outputs, by_check))) => Ended::Succeeded(outputs, by_check),
            Some(Err(error)) => Ended::Failed {
                error: mask(&error),
                exit_code: None,
                retryable: true,
            },
        })
    }

    fn began(&self) -> Option<Instant> {
        self.began
    }
}

/// One attempt's work: connects, runs the check, then the statements; the outputs, and whether
/// the check found the work done.
async fn execute(
    rendered: Arc<Rendered>,
    sql: Sql,
    canceller: Canceller,
    log: Log,
) -> Result<(Map<String, Value>, bool), String> {
    let mut conn = Conn::open(&rendered.url, &canceller)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", url_shown(&rendered.url)))?;
    log.line(
        Stream::Stdout,
        &format!("connected to {}", url_shown(&rendered.url)),
    )
    .await;
    let result = statements(&mut conn, &rendered, &sql, &log).await;
    conn.close().await;
    result
}

async fn statements(
    conn: &mut Conn,
    rendered: &Rendered,
    sql: &Sql,
    log: &Log,
) -> Result<(Map<String, Value>, bool), String> {
    if let Some(check) = &rendered.check {
        let answer = conn
            .run(check)
            .await
            .map_err(|e| format!("`sql.check` failed: {e}"))?;
        let verdict = if answer.returned > 0 {
            "the work is done"
        } else {
            "running the statements"
        };
        log.line(
            Stream::Stdout,
            &format!("`sql.check`: {}: {verdict}", rows(answer.returned)),
        )
        .await;
        if answer.returned > 0 {
            let outputs = publish(sql, &answer, "`sql.check`")?;
            return Ok((outputs, true));
        }
    }
    if sql.transaction {
        conn.begin()
            .await
            .map_err(|e| format!("cannot begin the transaction: {e}"))?;
    }
    let total = rendered.statements.len();
    let mut last = None;
    for (i, statement) in rendered.statements.iter().enumerate() {
        match conn.run(statement).await {
            Ok(answer) => {
                log.line(
                    Stream::Stdout,
                    &format!(
                        "statement {} of {total} (`{}`): {}",
                        i + 1,
                        short(&statement.query),
                        rows(answer.count)
                    ),
                )
                .await;
                last = Some(answer);
            }
            Err(e) => {
                let rolled_back = if sql.transaction {
                    let _ = conn.end(false).await;
                    "; the transaction was rolled back"
                } else {
                    ""
                };
                return Err(if total == 1 {
                    format!("the query failed: {e}{rolled_back}")
                } else {
                    format!(
                        "statement {} of {total} (`{}`) failed: {e}{rolled_back}",
                        i + 1,
                        short(&statement.query)
                    )
                });
            }
        }
    }
    let what = if total == 1 {
        "the query".to_owned()
    } else {
        format!("statement {total}")
    };
    let published = last
        .as_ref()
        .map_or_else(|| Ok(Map::new()), |answer| publish(sql, answer, &what));
    if sql.transaction {
        if published.is_err() {
            let _ = conn.end(false).await;
        } else if let Err(e) = conn.end(true).await {
            return Err(format!("cannot commit the transaction: {e}"));
        }
    }
    published.map(|outputs| (outputs, false))
}

/// The step's outputs from a statement's result: `sql.outputs` from its one row, `sql.row_count`.
fn publish(sql: &Sql, answer: &Answer, what: &str) -> Result<Map<String, Value>, String> {
    let mut outputs = Map::new();
    if let Some(key) = &sql.row_count {
        outputs.insert(key.clone(), Value::from(answer.count));
    }
    if sql.outputs.is_empty() {
        return Ok(outputs);
    }
    let [row] = answer.rows.as_slice() else {
        return Err(format!(
            "{what} returned {} rows; `sql.outputs` reads exactly one",
            answer.returned
        ));
    };
    for (key, column) in &sql.outputs {
        let Some(at) = answer.columns.iter().position(|c| c == column) else {
            return Err(format!(
                "{what} has no column `{column}` for the output `{key}` (its columns: {})",
                answer.columns.join(", ")
            ));
        };
        let value = row[at]
            .clone()
            .map_err(|e| format!("the output `{key}`: {e}"))?;
        outputs.insert(key.clone(), value);
    }
    Ok(outputs)
}

/// `1 row`, `3 rows`.
fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".to_owned()
    } else {
        format!("{n} rows")
    }
}

/// Where an attempt's log lines go: its log writer, through the chunks a process's output would
/// take; the URL's password masked in each.
#[derive(Clone)]
struct Log {
    sink: tokio::sync::mpsc::Sender<Chunk>,
    url: String,
}

impl Log {
    async fn line(&self, stream: Stream, text: &str) {
        let data = format!("{}\n", hide_password(&self.url, text)).into_bytes();
        let _ = self.sink.send(Chunk { stream, data }).await;
    }
}

/// The first line of a statement, shortened, for messages.
fn short(query: &str) -> String {
    let line = query.trim().lines().next().unwrap_or_default();
    let mut shown: String = line.chars().take(60).collect();
    if shown.len() < query.trim().len() {
        shown.push_str("...");
    }
    shown
}

/// The password of a URL (`scheme://user:password@host/...`), if it has one.
fn password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password).filter(|p| !p.is_empty())
}

/// `text` with the URL's password replaced by `********`: wherever it stands, or, when it is too short
/// to tell from other words (`x`), where it stands in a URL.
fn hide_password(url: &str, text: &str) -> String {
    match password(url) {
        Some(p) if p.chars().count() >= 4 => text.replace(p, "********"),
        Some(p) => text.replace(&format!(":{p}@"), ":********@"),
        None => text.to_owned(),
    }
}

/// The URL as messages show it: without its password or its query string.
fn url_shown(url: &str) -> String {
    let url = url.split('?').next().unwrap_or_default();
    hide_password(url, url)
}

/// Which server a URL names.
fn is_mysql(url: &str) -> bool {
    url.starts_with("mysql://") || url.starts_with("mariadb://")
}

/// One statement's result: its columns, its first two rows (each cell read, or why it cannot
/// be), how many rows it returned, and its row count (returned or changed).
#[derive(Debug, Default)]
struct Answer {
    columns: Vec<String>,
    rows: Vec<Vec<Result<Value, String>>>,
    returned: u64,
    count: u64,
}

/// How many rows of a result are kept: enough to tell "exactly one".
const KEPT_ROWS: usize = 2;

/// Cancels the statement running on a connection: from a stop or a timeout.
#[derive(Clone, Default)]
struct Canceller(Arc<Mutex<Option<Cancel>>>);

enum Cancel {
    Postgres(tokio_postgres::CancelToken),
    Mysql(mysql_async::Opts, u32),
}

/// How long a cancel request may take before it is given up.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

impl Canceller {
    fn set(&self, cancel: Cancel) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(cancel);
        }
    }

    /// Asks the server to cancel the running statement; best effort.
    async fn cancel(&self) {
        let cancel = self.0.lock().ok().and_then(|mut slot| slot.take());
        let ask = async {
            match cancel {
                Some(Cancel::Postgres(token)) => {
                    let _ = token.cancel_query(tokio_postgres::NoTls).await;
                }
                Some(Cancel::Mysql(opts, id)) => {
                    use mysql_async::prelude::Queryable as _;
                    if let Ok(mut conn) = mysql_async::Conn::new(opts).await {
                        let _ = conn.query_drop(format!("KILL QUERY {id}")).await;
                        let _ = conn.disconnect().await;
                    }
                }
                None => {}
            }
        };
        let _ = tokio::time::timeout(CANCEL_WAIT, ask).await;
    }
}

/// One connection.
enum Conn {
    Postgres {
        client: tokio_postgres::Client,
        driver: tokio::task::JoinHandle<()>,
    },
    Mysql(mysql_async::Conn),
}

impl Conn {
    async fn open(url: &str, canceller: &Canceller) -> Result<Self, String> {
        if is_mysql(url) {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let opts = mysql_async::Opts::from_url(&url).map_err(|e| e.to_string())?;
            let conn = mysql_async::Conn::new(opts.clone())
                .await
                .map_err(|e| mysql_error(&e))?;
            canceller.set(Cancel::Mysql(opts, conn.id()));
            return Ok(Self::Mysql(conn));
        }
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| postgres_error(&e))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        canceller.set(Cancel::Postgres(client.cancel_token()));
        Ok(Self::Postgres { client, driver })
    }

    async fn run(&mut self, statement: &Bound) -> Result<Answer, String> {
        match self {
            Self::Postgres { client, .. } => pg::run(client, statement).await,
            Self::Mysql(conn) => my::run(conn, statement).await,
        }
    }

    async fn begin(&mut self) -> Result<(), String> {
        let begin = match self {
            Self::Postgres { .. } => "BEGIN",
            Self::Mysql(_) => "START TRANSACTION",
        };
        self.plain(begin).await
    }

    /// Commits (`commit`) or rolls back the transaction; a failed rollback is left to the
    /// server, which rolls back when the connection closes.
    async fn end(&mut self, commit: bool) -> Result<(), String> {
        self.plain(if commit { "COMMIT" } else { "ROLLBACK" }).await
    }

    async fn plain(&mut self, text: &str) -> Result<(), String> {
        let statement = Bound {
            query: text.to_owned(),
            values: Vec::new(),
        };
        self.run(&statement).await.map(|_| ())
    }

    async fn close(self) {
        match self {
            Self::Postgres { client, driver } => {
                drop(client);
                let _ = tokio::time::timeout(CANCEL_WAIT, driver).await;
            }
            Self::Mysql(conn) => {
                let _ = tokio::time::timeout(CANCEL_WAIT, conn.disconnect()).await;
            }
        }
    }
}

/// A PostgreSQL error as the attempt's error: `SQLSTATE 23505: duplicate key value ...`.
fn postgres_error(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let mut text = format!("SQLSTATE {}: {}", db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        let _ = write!(text, " ({detail})");
    }
    text
}

/// A MySQL or MariaDB error as the attempt's error: `SQLSTATE 42S02: Table ... (error 1146)`.
fn mysql_error(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("SQLSTATE {}: {} (error {})", s.state, s.message, s.code)
        }
        other => other.to_string(),
    }
}

/// PostgreSQL: parameters sent as text for the server to parse as the types it infers; results
/// read in the driver's binary format, for the types cairn knows.
mod pg {
    use std::error::Error;

    use serde_json::Value;
    use tokio_postgres::types::{Format, FromSql, IsNull, ToSql, Type, to_sql_checked};

    use super::{Answer, Bound, KEPT_ROWS, postgres_error};

    /// A parameter's value, in PostgreSQL's text format whatever the parameter's type.
    #[derive(Debug)]
    struct Text<'a>(&'a str);

    impl ToSql for Text<'_> {
        fn to_sql(
            &self,
            _ty: &Type,
            out: &mut bytes::BytesMut,
        ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
            out.extend_from_slice(self.0.as_bytes());
            Ok(IsNull::No)
        }

        fn accepts(_ty: &Type) -> bool {
            true
        }

        fn encode_format(&self, _ty: &Type) -> Format {
            Format::Text
        }

        to_sql_checked!();
    }

    /// A cell as an output's value.
    struct Cell(Value);

    impl<'a> FromSql<'a> for Cell {
        fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
            let value = match *ty {
                Type::BOOL => Value::from(bool::from_sql(ty, raw)?),
                Type::INT2 => Value::from(i16::from_sql(ty, raw)?),
                Type::INT4 => Value::from(i32::from_sql(ty, raw)?),
                Type::INT8 => Value::from(i64::from_sql(ty, raw)?),
                Type::OID => Value::from(u32::from_sql(ty, raw)?),
                Type::FLOAT4 => Value::from(f64::from(f32::from_sql(ty, raw)?)),
                Type::FLOAT8 => Value::from(f64::from_sql(ty, raw)?),
                Type::JSON | Type::JSONB => Value::from_sql(ty, raw)?,
                _ => Value::from(<&str>::from_sql(ty, raw)?),
            };
            Ok(Self(value))
        }

        fn from_sql_null(_ty: &Type) -> Result<Self, Box<dyn Error + Sync + Send>> {
            Ok(Self(Value::Null))
        }

        fn accepts(ty: &Type) -> bool {
            matches!(
                *ty,
                Type::BOOL
                    | Type::INT2
                    | Type::INT4
                    | Type::INT8
                    | Type::OID
                    | Type::FLOAT4
                    | Type::FLOAT8
                    | Type::JSON
                    | Type::JSONB
            ) || <&str as FromSql>::accepts(ty)
        }
    }

    pub(super) async fn run(
        client: &tokio_postgres::Client,
        statement: &Bound,
    ) -> Result<Answer, String> {
        use futures_util::TryStreamExt as _;
        let params = statement.values.iter().map(|v| Text(v));
        let stream = client
            .query_raw(statement.query.as_str(), params)
            .await
            .map_err(|e| postgres_error(&e))?;
        futures_util::pin_mut!(stream);
        let mut answer = Answer::default();
        while let Some(row) = stream.try_next().await.map_err(|e| postgres_error(&e))? {
            if answer.columns.is_empty() {
                answer.columns = row.columns().iter().map(|c| c.name().to_owned()).collect();
            }
            answer.returned += 1;
            if answer.rows.len() < KEPT_ROWS {
                answer.rows.push(cells(&row));
            }
        }
        answer.count = stream.rows_affected().unwrap_or(answer.returned);
        Ok(answer)
    }

    fn cells(row: &tokio_postgres::Row) -> Vec<Result<Value, String>> {
        row.columns()
            .iter()
            .enumerate()
            .map(|(i, column)| {
                if !<Cell as FromSql>::accepts(column.type_()) {
                    return Err(format!(
                        "the column `{}` has the type {}, which cairn does not read: convert it in the query (`{}::text AS {}`)",
                        column.name(),
                        column.type_(),
                        column.name(),
                        column.name()
                    ));
                }
                row.try_get::<_, Cell>(i)
                    .map(|c| c.0)
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// MySQL and MariaDB: a statement with parameters is prepared and its values bound (binary
/// protocol); one without runs as it is (text protocol), since some statements cannot be
/// prepared. Either way the result's cells are read by their column's type.
mod my {
    use mysql_async::consts::ColumnType;
    use mysql_async::prelude::Queryable as _;
    use mysql_async::{Params, Row, Value as My};
    use serde_json::Value;

    use super::{Answer, Bound, KEPT_ROWS, mysql_error};

    pub(super) async fn run(
        conn: &mut mysql_async::Conn,
        statement: &Bound,
    ) -> Result<Answer, String> {
        let err = |e: mysql_async::Error| mysql_error(&e);
        if statement.values.is_empty() {
            let mut result = conn
                .query_iter(statement.query.as_str())
                .await
                .map_err(err)?;
            let (columns, affected) = (result.columns(), result.affected_rows());
            let answer = result.reduce(Answer::default(), keep).await.map_err(err)?;
            result.drop_result().await.map_err(err)?;
            Ok(finish(answer, columns.as_deref(), affected))
        } else {
            let params = Params::Positional(
                statement
                    .values
                    .iter()
                    .map(|v| My::Bytes(v.as_bytes().to_vec()))
                    .collect(),
            );
            let mut result = conn
                .exec_iter(statement.query.as_str(), params)
                .await
                .map_err(err)?;
            let (columns, affected) = (result.columns(), result.affected_rows());
            let answer = result.reduce(Answer::default(), keep).await.map_err(err)?;
            result.drop_result().await.map_err(err)?;
            Ok(finish(answer, columns.as_deref(), affected))
        }
    }

    fn keep(mut answer: Answer, row: Row) -> Answer {
        answer.returned += 1;
        if answer.rows.len() < KEPT_ROWS {
            let types: Vec<ColumnType> = row
                .columns_ref()
                .iter()
                .map(mysql_async::Column::column_type)
                .collect();
            let cells = row
                .unwrap()
                .into_iter()
                .zip(types)
                .map(|(v, t)| Ok(cell(v, t)))
                .collect();
            answer.rows.push(cells);
        }
        answer
    }

    fn finish(
        mut answer: Answer,
        columns: Option<&[mysql_async::Column]>,
        affected: u64,
    ) -> Answer {
        match columns {
            Some(columns) if !columns.is_empty() => {
                answer.columns = columns.iter().map(|c| c.name_str().into_owned()).collect();
                answer.count = answer.returned;
            }
            _ => answer.count = affected,
        }
        answer
    }

    /// A cell as an output's value: numbers as numbers (also from the text protocol, by the
    /// column's type), dates and times as text, bytes as (lossy) UTF-8 text.
    fn cell(value: My, ty: ColumnType) -> Value {
        use ColumnType::{
            MYSQL_TYPE_DOUBLE, MYSQL_TYPE_FLOAT, MYSQL_TYPE_INT24, MYSQL_TYPE_LONG,
            MYSQL_TYPE_LONGLONG, MYSQL_TYPE_SHORT, MYSQL_TYPE_TINY, MYSQL_TYPE_YEAR,
        };
        match value {
            My::NULL => Value::Null,
            My::Int(i) => Value::from(i),
            My::UInt(u) => Value::from(u),
            My::Float(f) => Value::from(f64::from(f)),
            My::Double(f) => Value::from(f),
            My::Bytes(bytes) => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let number = match ty {
                    MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG
                    | MYSQL_TYPE_LONGLONG | MYSQL_TYPE_YEAR => text
                        .parse::<i64>()
                        .map(Value::from)
                        .or_else(|_| text.parse::<u64>().map(Value::from))
                        .ok(),
                    MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => {
                        text.parse::<f64>().map(Value::from).ok()
                    }
                    _ => None,
                };
                number.unwrap_or(Value::String(text))
            }
            My::Date(y, mo, d, h, mi, s, us) => Value::String(if us > 0 {
                format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}")
            } else if (h, mi, s) == (0, 0, 0) && ty == ColumnType::MYSQL_TYPE_DATE {
                format!("{y:04}-{mo:02}-{d:02}")
            } else {
                format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
            }),
            My::Time(neg, d, h, mi, s, us) => {
                let hours = u32::from(h) + d * 24;
                let sign = if neg { "-" } else { "" };
                Value::String(if us > 0 {
                    format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}")
                } else {
                    format!("{sign}{hours:02}:{mi:02}:{s:02}")
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{hide_password, password, url_shown};

    #[test]
    fn the_password_is_found_and_hidden_wherever_it_stands() {
        assert_eq!(password("postgres://u:p@ss:w@host:5432/db"), Some("p@ss:w"));
        assert_eq!(password("mysql://u@host/db?x=a:b@c"), None);
        assert_eq!(password("postgres://u:@host/db"), None);
        assert_eq!(
            url_shown("mariadb://root:S3cret@127.0.0.1:3306/mysql?socket=/x"),
            "mariadb://root:********@127.0.0.1:3306/mysql"
        );
        let url = "postgres://u:S3cret@h/db";
        assert_eq!(
            hide_password(url, "login S3cret failed"),
            "login ******** failed"
        );
        // Too short to tell from other words: hidden only where it stands in a URL.
        assert_eq!(
            hide_password("postgres://u:x@h/db", "postgres://u:x@h/db: exit"),
            "postgres://u:********@h/db: exit"
        );
    }
}

//! The writer's connection, on which a statement whose answer nothing reads is sent without
//! waiting for it (pipelined): it goes out with the next statement that is waited for, and its
//! answer is read then, in order. A transaction's writes and its `COMMIT` thus share one round
//! trip to the server. A statement may also be held back until the next is sent, so that a run
//! of them goes as one statement that does the same ([`Fused`]): the server answers each
//! statement with a message and a flush of its own.
//!
//! The client is `tokio-postgres` on a runtime of the connection's own, one thread, which runs
//! only while the writer waits (as the blocking `postgres` client does): the `postgres` client
//! cannot have more than one statement in flight.
//!
//! A statement sent ahead may fail. PostgreSQL then refuses every later statement of the
//! transaction (and a `COMMIT` that comes in the same message as a failed statement is never
//! run), so the failure is reported by the next wait: as that wait's own answer
//! ([`Pipe::wait`]), or by [`Pipe::settle`] before a commit is trusted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Error, NoTls, Row, Statement};
use tokio::runtime::Runtime;
use tokio_postgres::ToStatement;

/// A statement on its way: its answer once read.
type Sent = Pin<Box<dyn Future<Output = Result<Answer, Error>> + Send>>;

enum Answer {
    /// What a write answers: nothing anyone reads.
    Done,
    /// A read sent ahead: its rows, kept until taken ([`Pipe::take`]).
    Rows(Vec<Row>),
}

/// A statement sent and not yet answered.
struct Flying {
    ticket: Ticket,
    kind: Kind,
    answer: Sent,
}

/// What a statement sent ahead is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    /// A read whose rows are kept for [`Pipe::take`].
    Read,
    /// A read outside any transaction, whose failure is its own: never another's answer.
    Aside,
}

/// Sent and not yet answered, in the order they were sent.
type InFlight = Vec<Flying>;

/// The rows of reads sent ahead, answered and not yet taken (`None`: the read failed, and the
/// failure was reported as the first of its wait).
type Kept = HashMap<Ticket, Option<Vec<Row>>>;

/// Names a statement sent ahead (a read's, to take its rows); later statements have greater ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Ticket(u64);

pub(super) struct Pipe {
    runtime: Runtime,
    client: Arc<tokio_postgres::Client>,
    sent: InFlight,
    kept: Kept,
    tickets: u64,
    /// Statements held back to go with the next one sent ([`Pipe::hold`]), in order.
    held: Vec<Held>,
    /// Rows gathered to go as one statement a slot ([`Pipe::gather`]).
    gathered: [Option<Gathered>; SLOTS],
    fused: Vec<Fused>,
}

/// One statement that does what its parts do, in their order: sent instead of them when they
/// are to go one after the other, with their parameters one after the other (each statement
/// costs the server its own start and end, and its answer a message of its own).
pub(super) struct Fused {
    pub(super) parts: Vec<&'static str>,
    pub(super) whole: Statement,
}

/// A statement to be sent, and its ticket.
struct Held {
    /// Its text: what a fused statement's parts are matched against.
    sql: &'static str,
    what: Part,
    ticket: Ticket,
}

enum Part {
    /// A prepared statement, its parameters encoded.
    Statement(Statement, Vec<Encoded>),
    /// Statements without parameters, as one message: the text.
    Batch,
}

/// How many statements may gather rows at once.
pub(super) const SLOTS: usize = 3;

/// A value of a gathered row.
pub(super) enum Value<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

/// A gathered column: its values, bound as one array.
enum Column {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
}

/// The forms of a gathered statement: the one for any rows, which takes every column as an
/// array; and where it is cheaper to run, one for a single row (every column a value) and one for
/// rows whose first column is the same (that column a value, the others arrays).
#[derive(Clone)]
pub(super) struct Forms {
    pub(super) many: Form,
    pub(super) one_row: Option<Form>,
    pub(super) one_first: Option<Form>,
}

/// A statement prepared, and its text.
#[derive(Clone)]
pub(super) struct Form {
    pub(super) statement: Statement,
    pub(super) sql: &'static str,
}

/// The rows of one statement gathered so far, and the keys they were gathered under.
struct Gathered {
    forms: Forms,
    columns: Vec<Column>,
    rows: usize,
    keys: HashSet<(i64, i64)>,
}

impl Gathered {
    /// The statement that runs these rows, and its parameters.
    fn statement(self) -> (Form, Vec<Box<dyn ToSql + Sync>>) {
        let same_first = match self.columns.first() {
            Some(Column::Int(values)) => values.windows(2).all(|w| w[0] == w[1]),
            Some(Column::Text(values)) => values.windows(2).all(|w| w[0] == w[1]),
            None => true,
        };
        let (statement, scalars) = match (self.forms, self.rows) {
            (
                Forms {
                    one_row: Some(one), ..
                },
                1,
            ) => (one, self.columns.len()),
            (
                Forms {
                    one_first: Some(one),
                    ..
                },
                _,
            ) if same_first => (one, 1),
            (Forms { many, .. }, _) => (many, 0),
        };
        let params = self
            .columns
            .into_iter()
            .enumerate()
            .map(|(i, column)| -> Box<dyn ToSql + Sync> {
                match (column, i < scalars) {
                    (Column::Int(mut values), true) => Box::new(values.swap_remove(0)),
                    (Column::Text(mut values), true) => Box::new(values.swap_remove(0)),
                    (Column::Int(values), false) => Box::new(values),
                    (Column::Text(values), false) => Box::new(values),
                }
            })
            .collect();
        (statement, params)
    }
}

/// The first failure among statements sent ahead: which one and why.
pub(super) struct Failed {
    pub(super) ticket: Ticket,
    pub(super) error: Error,
}

impl Pipe {
    /// Connects on `runtime`, which the connection keeps (one thread, started by the caller).
    pub(super) fn connect(
        runtime: Runtime,
        config: &tokio_postgres::Config,
    ) -> Result<Self, Error> {
        let (client, connection) = runtime.block_on(config.connect(NoTls))?;
        runtime.spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            runtime,
            client: Arc::new(client),
            sent: Vec::new(),
            kept: HashMap::new(),
            tickets: 0,
            held: Vec::new(),
            gathered: Default::default(),
            fused: Vec::new(),
        })
    }

    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Sends `statement` without waiting for its answer. Its parameters are encoded now, so
    /// nothing borrowed is kept. (One that cannot be encoded is run at once, for the client's
    /// own error, which is then its answer.)
    pub(super) fn send(&mut self, statement: &Statement, params: &Params) -> Ticket {
        let Some(encoded) = encode(statement, params) else {
            let done = self.execute(statement, params).map(|_| Answer::Done);
            return self.go(Kind::Write, Box::pin(std::future::ready(done)));
        };
        let answer = self.executed(statement.clone(), encoded);
        self.go(Kind::Write, answer)
    }

    /// As [`Pipe::send`], but held back until the next statement is sent or waited for, so that
    /// it may go fused with those after it (`form` is its text and statement).
    pub(super) fn hold(&mut self, form: &Form, params: &Params) -> Ticket {
        let Some(encoded) = encode(&form.statement, params) else {
            return self.send(&form.statement, params);
        };
        self.push_held(form.sql, Part::Statement(form.statement.clone(), encoded))
    }

    /// As [`Pipe::send_batch`], held back as [`Pipe::hold`] holds a statement.
    pub(super) fn hold_batch(&mut self, sql: &'static str) -> Ticket {
        self.push_held(sql, Part::Batch)
    }

    fn push_held(&mut self, sql: &'static str, what: Part) -> Ticket {
        // What was gathered before it goes before it.
        self.hold_gathered();
        let ticket = self.ticket();
        self.held.push(Held { sql, what, ticket });
        ticket
    }

    /// Sends the read `statement` without waiting for its rows, which [`Pipe::take`] gives once
    /// answered; `None` when its parameters cannot be encoded (read it the usual way then).
    pub(super) fn send_read(
        &mut self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Option<Ticket> {
        self.read(Kind::Read, statement, params)
    }

    /// As [`Pipe::send_read`], for a read sent outside any transaction: its failure is never
    /// reported as another statement's (it gives no rows, that is all).
    pub(super) fn send_aside(
        &mut self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Option<Ticket> {
        self.read(Kind::Aside, statement, params)
    }

    fn read(
        &mut self,
        kind: Kind,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Option<Ticket> {
        let encoded = encode(statement, params)?;
        let client = Arc::clone(&self.client);
        let statement = statement.clone();
        Some(self.go(
            kind,
            Box::pin(async move {
                let rows = client.query_raw(&statement, encoded).await?;
                futures_util::TryStreamExt::try_collect(rows)
                    .await
                    .map(Answer::Rows)
            }),
        ))
    }

    /// The rows of the read sent ahead as `ticket`, waiting for them if they have not come;
    /// `None` when they cannot be given (taken, dropped, or the read failed and said so before):
    /// read them the usual way then. A failure of anything sent before them is the answer.
    pub(super) fn take(&mut self, ticket: Ticket) -> Option<Result<Vec<Row>, Error>> {
        // Tickets grow: one at or after the first unanswered is still on its way.
        if self
            .sent
            .first()
            .is_some_and(|first| first.ticket <= ticket)
        {
            let sent = std::mem::take(&mut self.sent);
            if let Err(failed) = self.runtime.block_on(answers(sent, &mut self.kept)) {
                return Some(Err(failed.error));
            }
        }
        self.kept.remove(&ticket)?.map(Ok)
    }

    /// Sends `sql` (statements without parameters, as one message) without waiting for it.
    pub(super) fn send_batch(&mut self, sql: String) -> Ticket {
        self.batch(Kind::Write, sql)
    }

    /// As [`Pipe::send_batch`], outside any transaction of the writer's: as [`Pipe::send_aside`].
    pub(super) fn send_batch_aside(&mut self, sql: String) -> Ticket {
        self.batch(Kind::Aside, sql)
    }

    fn batch(&mut self, kind: Kind, sql: String) -> Ticket {
        let answer = self.batched(sql);
        self.go(kind, answer)
    }

    /// The answer of `statement` run with `params`, once sent ([`Pipe::fly`]).
    fn executed(&self, statement: Statement, params: Vec<Encoded>) -> Sent {
        let client = Arc::clone(&self.client);
        Box::pin(async move {
            client
                .execute_raw(&statement, params)
                .await
                .map(|_| Answer::Done)
        })
    }

    /// The answer of the statements `sql` (without parameters, one message), once sent.
    fn batched(&self, sql: impl AsRef<str> + Send + 'static) -> Sent {
        let client = Arc::clone(&self.client);
        Box::pin(async move {
            client
                .batch_execute(sql.as_ref())
                .await
                .map(|()| Answer::Done)
        })
    }

    /// Gathers a row of `statement`, which takes each of its columns as an array, to be sent
    /// with the others gathered in its slot as one statement, before any other statement is sent
    /// or waited for. Slots are sent in their order, so the statements of different slots must
    /// commute (they are sent in the slots' order, not in the order their rows came). A row whose
    /// `key` is already gathered in its slot sends what was gathered first: one statement never
    /// holds two rows of one key.
    pub(super) fn gather(
        &mut self,
        slot: usize,
        forms: &Forms,
        key: Option<(i64, i64)>,
        row: &[Value<'_>],
    ) {
        if let Some(key) = key
            && self.gathered[slot]
                .as_ref()
                .is_some_and(|g| g.keys.contains(&key))
        {
            self.flush();
        }
        let gathered = self.gathered[slot].get_or_insert_with(|| Gathered {
            forms: forms.clone(),
            rows: 0,
            columns: row
                .iter()
                .map(|value| match value {
                    Value::Int(_) => Column::Int(Vec::new()),
                    Value::Text(_) => Column::Text(Vec::new()),
                })
                .collect(),
            keys: HashSet::new(),
        });
        for (column, value) in gathered.columns.iter_mut().zip(row) {
            match (column, value) {
                (Column::Int(values), Value::Int(value)) => values.push(*value),
                (Column::Text(values), Value::Text(value)) => {
                    values.push(value.map(str::to_owned));
                }
                _ => unreachable!("a slot's rows have the same columns"),
            }
        }
        gathered.rows += 1;
        gathered.keys.extend(key);
    }

    /// Sends statements that come one after the other as `fused` from now on, where they can.
    pub(super) fn fuse(&mut self, fused: Fused) {
        self.fused.push(fused);
    }

    /// How many fused statements are in use.
    #[cfg(test)]
    pub(super) fn fused(&self) -> usize {
        self.fused.len()
    }

    /// Moves what was gathered to the held statements, one statement a slot, in the slots' order.
    fn hold_gathered(&mut self) {
        let statements: Vec<_> = self
            .gathered
            .iter_mut()
            .filter_map(Option::take)
            .map(Gathered::statement)
            .collect();
        for (form, values) in statements {
            let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
            self.hold(&form, &params);
        }
    }

    /// Sends what is held and what was gathered, in order; a run of them that a fused statement
    /// does goes as that statement (the longest first), under the ticket of its first statement
    /// with parameters (a batch's, `BEGIN` say, is not the fused statement's).
    fn flush(&mut self) {
        self.hold_gathered();
        let mut held: VecDeque<Held> = std::mem::take(&mut self.held).into();
        while let Some(first) = held.pop_front() {
            let fused = self
                .fused
                .iter()
                .filter(|f| {
                    let sqls = std::iter::once(first.sql).chain(held.iter().map(|h| h.sql));
                    sqls.take(f.parts.len()).eq(f.parts.iter().copied())
                })
                .max_by_key(|f| f.parts.len());
            let (answer, ticket) = match (fused, first.what) {
                (Some(fused), what) => {
                    let rest = held.drain(..fused.parts.len() - 1);
                    let mut ticket = None;
                    let mut params = Vec::new();
                    for (part, at) in std::iter::once((what, first.ticket))
                        .chain(rest.map(|h| (h.what, h.ticket)))
                    {
                        if let Part::Statement(_, values) = part {
                            ticket.get_or_insert(at);
                            params.extend(values);
                        }
                    }
                    let answer = self.executed(fused.whole.clone(), params);
                    (answer, ticket.unwrap_or(first.ticket))
                }
                (None, Part::Statement(statement, params)) => {
                    (self.executed(statement, params), first.ticket)
                }
                (None, Part::Batch) => (self.batched(first.sql), first.ticket),
            };
            self.fly(Kind::Write, ticket, answer);
        }
    }

    fn ticket(&mut self) -> Ticket {
        self.tickets += 1;
        Ticket(self.tickets)
    }

    /// Polls a statement once, which hands it to the connection, and keeps it for its answer.
    fn go(&mut self, kind: Kind, answer: Sent) -> Ticket {
        self.flush();
        let ticket = self.ticket();
        self.fly(kind, ticket, answer);
        ticket
    }

    fn fly(&mut self, kind: Kind, ticket: Ticket, mut answer: Sent) {
        if let Poll::Ready(done) = answer
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            answer = Box::pin(std::future::ready(done));
        }
        self.sent.push(Flying {
            ticket,
            kind,
            answer,
        });
    }

    /// Reads the answers of everything sent ahead; the first failure, if any. Rows read ahead and
    /// not taken are kept until [`Pipe::drop_kept`].
    pub(super) fn settle(&mut self) -> Result<(), Failed> {
        self.flush();
        let sent = std::mem::take(&mut self.sent);
        self.runtime.block_on(answers(sent, &mut self.kept))
    }

    /// Drops the rows read ahead and not taken.
    pub(super) fn drop_kept(&mut self) {
        self.kept.clear();
    }

    /// Sends `request` after what was sent ahead and waits for all of them; the first failure of
    /// one sent ahead comes before the request's own answer (later statements of its transaction
    /// fail because of it).
    fn wait<T>(
        runtime: &Runtime,
        (sent, kept): (&mut InFlight, &mut Kept),
        request: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let sent = std::mem::take(sent);
        runtime.block_on(async move {
            let mut request = std::pin::pin!(request);
            // Handed to the connection before the earlier answers are awaited, so that it goes
            // out with them.
            let early = std::future::poll_fn(|cx| Poll::Ready(request.as_mut().poll(cx))).await;
            let before = answers(sent, kept).await;
            let answer = match early {
                Poll::Ready(answer) => answer,
                Poll::Pending => request.await,
            };
            before.map_err(|f| f.error)?;
            answer
        })
    }

    /// Runs `request` on the client after what was sent ahead, as [`Pipe::wait`] does.
    fn call<'a, T, F>(
        &'a mut self,
        request: impl FnOnce(&'a tokio_postgres::Client) -> F,
    ) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>> + 'a,
    {
        self.flush();
        let client = &self.client;
        Self::wait(
            &self.runtime,
            (&mut self.sent, &mut self.kept),
            request(client),
        )
    }

    pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), Error> {
        self.call(|c| c.batch_execute(sql))
    }

    pub(super) fn prepare(&mut self, sql: &str) -> Result<Statement, Error> {
        self.call(|c| c.prepare(sql))
    }

    pub(super) fn execute<S: ?Sized + ToStatement>(
        &mut self,
        s: &S,
        p: &Params,
    ) -> Result<u64, Error> {
        self.call(|c| c.execute(s, p))
    }

    pub(super) fn query<S: ?Sized + ToStatement>(
        &mut self,
        s: &S,
        p: &Params,
    ) -> Result<Vec<Row>, Error> {
        self.call(|c| c.query(s, p))
    }

    pub(super) fn query_opt<S: ?Sized + ToStatement>(
        &mut self,
        s: &S,
        p: &Params,
    ) -> Result<Option<Row>, Error> {
        self.call(|c| c.query_opt(s, p))
    }

    pub(super) fn query_one<S: ?Sized + ToStatement>(
        &mut self,
        s: &S,
        p: &Params,
    ) -> Result<Row, Error> {
        self.call(|c| c.query_one(s, p))
    }
}

/// A statement's parameters.
type Params<'a> = [&'a (dyn ToSql + Sync)];

/// The answers of `sent`, in order, the rows of reads kept in `kept`; the first failure.
async fn answers(sent: InFlight, kept: &mut Kept) -> Result<(), Failed> {
    let mut first = None;
    for Flying {
        ticket,
        kind,
        answer,
    } in sent
    {
        let failure = match answer.await {
            Ok(Answer::Rows(rows)) => {
                kept.insert(ticket, Some(rows));
                None
            }
            Ok(Answer::Done) => None,
            Err(error) => {
                if kind != Kind::Write {
                    kept.insert(ticket, None);
                }
                (kind != Kind::Aside).then_some(error)
            }
        };
        if let Some(error) = failure
            && first.is_none()
        {
            first = Some(Failed { ticket, error });
        }
    }
    first.map_or(Ok(()), Err)
}

/// A parameter encoded ahead, in the binary form the statement's type wants.
#[derive(Debug)]
struct Encoded(Option<BytesMut>);

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                IsNull::No
            }
            None => IsNull::Yes,
        })
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// The parameters encoded for the statement's types; `None` when one does not fit (or their
/// count is wrong), which the client reports in its own words when the statement is run.
fn encode(statement: &Statement, params: &[&(dyn ToSql + Sync)]) -> Option<Vec<Encoded>> {
    let types = statement.params();
    if types.len() != params.len() {
        return None;
    }
    params
        .iter()
        .zip(types)
        .map(|(param, ty)| {
            let mut bytes = BytesMut::new();
            match param.to_sql_checked(ty, &mut bytes).ok()? {
                IsNull::No => Some(Encoded(Some(bytes))),
                IsNull::Yes => Some(Encoded(None)),
            }
        })
        .collect()
}

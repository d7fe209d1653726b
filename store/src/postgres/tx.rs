//! The rules' transaction ([`Tx`]) on PostgreSQL: each method is its statements, prepared once per
//! connection and kept ([`Conn`]), with no decision of its own. Every integer column is BIGINT,
//! so every value is bound as an `i64`.
//!
//! A statement that fails records why ([`Fault`]) when the whole transaction must run again (a
//! serialization failure or deadlock) or the connection is gone: the rules see an error like any
//! other, and the writer reads the fault to decide what to do with the transaction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::LazyLock;

use postgres::types::ToSql;
use postgres::{Row, Statement};

use super::pipe::{Form, Forms, Fused, Pipe, Ticket, Value};

use crate::error::{Error, Result};
use crate::rules::{End, Ownership, ReadAhead, Tx};
use crate::types::{
    Interruption, Millis, NewOp, NewSchedule, NewTask, OpId, OpStatus, ProcessId, Request,
    Snapshot, TaskNo, TaskStatus, TokenRow,
};

/// A connection and the statements prepared on it, by their text.
pub(super) struct Conn {
    pub(super) client: Pipe,
    statements: HashMap<&'static str, Statement>,
    /// Its session on the server, when known.
    pub(super) session: Option<Session>,
    /// The tasks whose state was read ahead in the open transaction ([`Conn::read_ahead`]).
    ahead: HashMap<(OpId, TaskNo), Ahead>,
    /// Rows read by earlier transactions, which a transaction of one batch may take as read.
    known: Known,
    /// Whether the open transaction takes [`Known`] rows as read.
    taking: bool,
    /// Whether it sent a guard for one (see [`Known`]).
    guarded: bool,
    /// Whether the next transaction reads everything (set when one taken as read had changed).
    fresh: bool,
    /// The tasks whose next ones are read once the open transaction's `COMMIT` is sent, and
    /// then the reads on their way (see [`Conn::send_next_tasks`]).
    next_tasks: Vec<(OpId, TaskNo)>,
    next_reads: Vec<(OpId, Ticket)>,
}

/// A task's state in the open transaction, before it is read.
enum Ahead {
    /// Its row is on its way.
    Read(Ticket),
    /// Known from an earlier transaction: taken as read, with a guard (see [`Known`]).
    Taken(String, String),
}

/// Rows that earlier transactions on this connection read: each op's owner row as last read, and
/// the state of the op's next tasks, read just after a step's commit and not yet used.
///
/// A transaction of one batch takes such a row as read instead of waiting for it, and sends a
/// guard in its place ([`OWNER_GUARD`], [`TASK_GUARD`]): a statement that finds the row as it is
/// now (locked as the read would have locked it) and raises [`CHANGED`] unless it is the same in
/// every column. The transaction's writes and `COMMIT` go behind it (or in the same statement,
/// behind its guards' row: [`GUARDED_STEP`]), so a row that changed since aborts the transaction
/// before it commits anything, and it runs again reading ([`Fault`]); so a row taken as read can
/// make a transaction slower, never different. A `noop` chain's step then needs one round trip
/// instead of two, and one statement.
#[derive(Default)]
struct Known {
    owners: HashMap<OpId, OwnerRow>,
    tasks: HashMap<(OpId, TaskNo), (String, String)>,
}

/// An op's row as the fence reads it: status, owner (host, boot id, pid, start) and lease.
#[derive(Clone)]
struct OwnerRow {
    status: String,
    host: Option<String>,
    boot: Option<String>,
    pid: Option<i64>,
    start: Option<i64>,
    lease: Option<i64>,
}

/// The most task rows [`Known`] keeps; past it, it forgets them all.
const KNOWN_TASKS: usize = 4096;

/// How many of an op's next tasks one read takes (see [`Conn::send_next_tasks`]).
const NEXT_TASKS_AT_ONCE: i64 = 64;

/// What a guard raises when a row taken as read has changed (`cairn_read_changed()`, schema 10).
pub(super) const CHANGED: &str = "CA001";

/// A server session (backend process): its pid and when it started, which together name it even
/// after the pid is given to another.
#[derive(Debug, Clone, Copy)]
pub(super) struct Session {
    pub(super) pid: i32,
    /// Microseconds since the Unix epoch.
    pub(super) started: i64,
}

impl Conn {
    pub(super) fn new(client: Pipe) -> Self {
        Self {
            client,
            statements: HashMap::new(),
            session: None,
            ahead: HashMap::new(),
            known: Known::default(),
            taking: false,
            guarded: false,
            fresh: false,
            next_tasks: Vec::new(),
            next_reads: Vec::new(),
        }
    }

    /// Whether the open transaction took a row as read (and sent its guard).
    pub(super) fn took(&self) -> bool {
        self.guarded
    }

    /// Forgets every row earlier transactions read (one taken as read had changed, or its guard
    /// did not answer): the next transaction reads everything.
    pub(super) fn forget(&mut self) {
        self.known = Known::default();
        self.fresh = true;
    }

    /// Sends the reads of these tasks' state without waiting (see `rules::read_ahead`): they go
    /// with the transaction's first read, and [`Tx::task_state`] takes their rows.
    ///
    /// With `take` (a transaction of one batch) and tasks to read, a task [`Known`] is taken as
    /// read, and for one that is not, the op's next tasks are read after the commit, to be known
    /// by the transactions after.
    pub(super) fn read_ahead(
        &mut self,
        ahead: ReadAhead,
        take: bool,
    ) -> std::result::Result<(), postgres::Error> {
        self.ahead.clear();
        self.client.drop_kept();
        self.next_tasks.clear();
        self.next_reads.clear();
        // Only attempt changes (a step's) take rows as read: they never change the op's owner
        // row, so the one read for a step is still right for the next. Any other transaction may,
        // and may change tasks: what is kept is dropped.
        let tasks = ahead.once;
        self.taking = take && !tasks.is_empty() && !std::mem::take(&mut self.fresh);
        self.guarded = false;
        if !self.taking {
            self.known = Known::default();
        }
        // The tasks read once are taken as read where known (nothing is, unless taking); every
        // task this transaction may change is then forgotten, as the next must not take it.
        let known: Vec<_> = tasks
            .iter()
            .map(|task| self.known.tasks.remove(task))
            .collect();
        if !self.known.tasks.is_empty() {
            for task in &ahead.named {
                self.known.tasks.remove(task);
            }
        }
        if tasks.is_empty() {
            return Ok(());
        }
        // Prepared once per connection: its wait also answers what was sent before (`BEGIN`).
        let one = self.statement(TASK_STATE)?;
        for ((op, task), known) in tasks.into_iter().zip(known) {
            let ahead = if let Some((status, name)) = known {
                Some(Ahead::Taken(status, name))
            } else {
                if self.taking {
                    self.next_tasks.push((op, task));
                }
                self.client
                    .send_read(&one, &[&op.0, &i64::from(task.0)])
                    .map(Ahead::Read)
            };
            if let Some(ahead) = ahead {
                self.ahead.insert((op, task), ahead);
            }
        }
        Ok(())
    }

    /// Sends the insert of the transaction's commit token (see `writer.rs`) without waiting
    /// (held, to go with the step it ends: [`GUARDED_STEP`]).
    pub(super) fn send_token(
        &mut self,
        token: &str,
        at: i64,
    ) -> std::result::Result<Ticket, postgres::Error> {
        let form = self.form(TOKEN)?;
        Ok(self.client.hold(&form, &[&token, &at]))
    }

    /// Prepares what a step's transaction sends without waiting (the commit token among them):
    /// the statements the connection sends instead of their parts when those come one after the
    /// other (`pipe::Fused`), and the read of an op's next tasks.
    pub(super) fn prepare_steps(&mut self) -> std::result::Result<(), postgres::Error> {
        const GUARDED_PARTS: [&str; 6] = [
            OWNER_GUARD,
            TASK_GUARD,
            ATTEMPT_ROW,
            TASK_ROW,
            OP_EVENTS,
            TOKEN,
        ];
        // The same, as a transaction of its own: the session's transactions are `SERIALIZABLE`
        // (`writer.rs`, `connect_writer`), a statement outside one commits when it ends, and
        // nothing else is in the transaction.
        let alone = std::iter::once(BEGIN)
            .chain(GUARDED_PARTS)
            .chain(std::iter::once(COMMIT))
            .collect();
        for (whole, parts) in [
            (WHOLE_STEP, vec![ATTEMPT_ROW, TASK_ROW, OP_EVENTS]),
            (GUARDED_STEP.as_str(), GUARDED_PARTS.to_vec()),
            (GUARDED_STEP.as_str(), alone),
        ] {
            let whole = self.statement(whole)?;
            let mut types = Vec::new();
            for &part in parts.iter().filter(|&&p| p != BEGIN && p != COMMIT) {
                types.extend_from_slice(self.statement(part)?.params());
            }
            // Each part's parameters are encoded for its own statement's types.
            if whole.params() == types.as_slice() {
                self.client.fuse(Fused { parts, whole });
            }
        }
        self.statement(NEXT_TASKS)?;
        Ok(())
    }

    /// The statement `sql` and its text.
    fn form(&mut self, sql: &'static str) -> std::result::Result<Form, postgres::Error> {
        self.statement(sql).map(|statement| Form { statement, sql })
    }

    /// Once the open transaction's `COMMIT` is sent: reads the state of the next tasks of the ops
    /// whose task it read, outside the transaction (so that they lock nothing under
    /// `SERIALIZABLE`, and see its writes), for the transactions after to take as read. Their
    /// answers come with the commit's; a failed one just gives no rows.
    pub(super) fn send_next_tasks(&mut self) {
        let Some(statement) = self.statements.get(NEXT_TASKS).cloned() else {
            return;
        };
        if self.next_tasks.is_empty() {
            return;
        }
        // The session's transactions are `SERIALIZABLE`; these reads lock nothing.
        self.client.send_batch_aside(BEGIN_READ.to_owned());
        for (op, task) in std::mem::take(&mut self.next_tasks) {
            let after = i64::from(task.0) + 1;
            if let Some(ticket) = self
                .client
                .send_aside(&statement, &[&op.0, &after, &NEXT_TASKS_AT_ONCE])
            {
                self.next_reads.push((op, ticket));
            }
        }
        self.client.send_batch_aside(COMMIT.to_owned());
    }

    /// Keeps the rows read by [`Conn::send_next_tasks`], once the transaction committed.
    pub(super) fn keep_next_tasks(&mut self) {
        if self.known.tasks.len() > KNOWN_TASKS {
            self.known.tasks.clear();
        }
        for (op, ticket) in std::mem::take(&mut self.next_reads) {
            let Some(Ok(rows)) = self.client.take(ticket) else {
                continue;
            };
            for row in rows {
                let (Ok(no), Ok(status), Ok(name)) =
                    (row.try_get::<_, i64>(0), row.try_get(1), row.try_get(2))
                else {
                    continue;
                };
                if let Ok(no) = u32::try_from(no) {
                    self.known.tasks.insert((op, TaskNo(no)), (status, name));
                }
            }
        }
    }

    /// A gathered statement's forms, prepared on this connection the first time.
    fn forms(&mut self, slot: &Slot) -> std::result::Result<Forms, postgres::Error> {
        Ok(Forms {
            one_row: slot.one_row.map(|sql| self.form(sql)).transpose()?,
            one_first: slot.one_op.map(|sql| self.form(sql)).transpose()?,
            many: self.form(slot.many)?,
        })
    }

    /// The statement `sql`, prepared on this connection the first time it is asked for.
    pub(super) fn statement(
        &mut self,
        sql: &'static str,
    ) -> std::result::Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

// Statements whose rows are gathered (`Pipe::gather`), by slot. They commute: whole attempts
// (each of its own key), their tasks' ends (each task once a statement), events (numbered in the
// order they came, per op).

/// A statement whose rows are gathered: its slot, and its forms (see `pipe::Forms`).
struct Slot {
    at: usize,
    many: &'static str,
    one_row: Option<&'static str>,
    one_op: Option<&'static str>,
}

/// Whole attempts' rows.
const WHOLE_ATTEMPTS: Slot = Slot {
    at: 0,
    many: "INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
           SELECT v.op, v.task, v.n, v.status, v.at, v.at, v.exit_code, v.error \
           FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::text[]) \
           AS v(op, task, n, status, at, exit_code, error)",
    one_row: Some(ATTEMPT_ROW),
    one_op: None,
};

const ATTEMPT_ROW: &str = "INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
     VALUES ($1, $2, $3, $4, $5, $5, $6, $7)";

/// The ends of whole attempts' tasks.
const WHOLE_TASKS: Slot = Slot {
    at: 1,
    many: "UPDATE tasks SET status = v.status, attempts = v.n, retry_from = v.retry_from, \
           started_at = COALESCE(tasks.started_at, v.at), ended_at = v.ended, exit_code = v.exit_code, \
           error = v.error, outputs = COALESCE(v.outputs, tasks.outputs), by_check = v.by_check \
           FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], \
           $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::bigint[]) \
           AS v(op, task, status, n, retry_from, at, ended, exit_code, error, outputs, by_check) \
           WHERE tasks.op_id = v.op AND tasks.task_no = v.task",
    one_row: Some(TASK_ROW),
    one_op: None,
};

const TASK_ROW: &str = "UPDATE tasks SET status = $3, attempts = $4, retry_from = $5, \
     started_at = COALESCE(started_at, $6), ended_at = $7, exit_code = $8, error = $9, \
     outputs = COALESCE($10, outputs), by_check = $11 WHERE op_id = $1 AND task_no = $2";

/// Events, each op's numbered on from its last in the order they came; each op that has new ones
/// is notified to the followers of changes when the transaction commits (`listen::MOVES`;
/// PostgreSQL sends one notification of a payload per transaction). Each op's last number is read
/// once (`base`, materialized, read whole before a row is inserted), not per row: a row's look
/// back would step over every row this statement inserted before it, which it cannot see.
const EVENTS: Slot = Slot {
    at: 2,
    many: "WITH e AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[]) \
           WITH ORDINALITY AS e(op, at, task, kind, message, ord)), \
           base AS MATERIALIZED (SELECT d.op, COALESCE((SELECT MAX(x.seq) FROM events x WHERE x.op_id = d.op), 0) \
           AS seq FROM (SELECT DISTINCT op FROM e) d), \
           appended AS (INSERT INTO events (op_id, seq, at, kind, task, message) \
           SELECT e.op, base.seq + row_number() OVER (PARTITION BY e.op ORDER BY e.ord), e.at, e.kind, e.task, \
           e.message FROM e JOIN base ON base.op = e.op) \
           SELECT pg_notify('cairn_moves', base.op::text) FROM base",
    one_row: None,
    one_op: Some(OP_EVENTS),
};

const OP_EVENTS: &str = "WITH appended AS (INSERT INTO events (op_id, seq, at, kind, task, message) \
     SELECT $1, next.seq + e.ord - 1, e.at, e.kind, e.task, e.message \
     FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM events WHERE op_id = $1) next, \
     unnest($2::bigint[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY AS e(at, task, kind, message, ord)) \
     SELECT pg_notify('cairn_moves', $1::bigint::text)";

/// One whole attempt, its task's end and its op's events in one statement (see `pipe::Fused`):
/// [`ATTEMPT_ROW`], [`TASK_ROW`] and [`OP_EVENTS`] as the parts of one `WITH`, their parameters
/// numbered on. Each step of a chain of `noop`s commits this, where three statements cost the
/// server about 25 µs more.
const WHOLE_STEP: &str = "WITH attempt AS (INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
     VALUES ($1, $2, $3, $4, $5, $5, $6, $7)), \
     task AS (UPDATE tasks SET status = $10, attempts = $11, retry_from = $12, \
     started_at = COALESCE(started_at, $13), ended_at = $14, exit_code = $15, error = $16, \
     outputs = COALESCE($17, outputs), by_check = $18 WHERE op_id = $8 AND task_no = $9), \
     appended AS (INSERT INTO events (op_id, seq, at, kind, task, message) \
     SELECT $19, next.seq + e.ord - 1, e.at, e.kind, e.task, e.message \
     FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM events WHERE op_id = $19) next, \
     unnest($20::bigint[], $21::text[], $22::text[], $23::text[]) WITH ORDINALITY AS e(at, task, kind, message, ord)) \
     SELECT pg_notify('cairn_moves', $19::bigint::text)";

/// A step whose owner and task were taken as read, in one statement: [`WHOLE_STEP`] with the
/// guards of its rows ([`OWNER_GUARD`], [`TASK_GUARD`]) and its transaction's [`TOKEN`], their
/// parameters numbered on in that order. Every write takes its rows from the guards' (a `WITH` of
/// one row, run once), so none writes anything before both guards passed, whatever order the
/// server runs the parts in: a changed row stops the statement as when they were statements of
/// their own.
pub(super) static GUARDED_STEP: LazyLock<String> = LazyLock::new(|| {
    // As a transaction of its own it is `SERIALIZABLE` by the session's default, not by a
    // `BEGIN` of its own: were that default ever lost, it raises, and runs again reading (as a
    // transaction that says `SERIALIZABLE`).
    const SERIALIZABLE: &str = "CASE WHEN current_setting('transaction_isolation') = 'serializable' \
         THEN 0 ELSE cairn_read_changed() END";
    const PASSED: &str = "(SELECT owner + task + serializable FROM guards) = 0";
    let guard = |sql: &str, by| numbered_on(sql.strip_prefix("SELECT ").unwrap_or(sql), by);
    let whole = numbered_on(WHOLE_STEP, 11)
        .replacen(" VALUES (", " SELECT ", 1)
        .replacen(
            "$18)), task AS (",
            &format!("$18 WHERE {PASSED}), task AS ("),
            1,
        )
        .replacen(
            " WHERE op_id = $19",
            &format!(" WHERE {PASSED} AND op_id = $19"),
            1,
        )
        .replacen(
            "message, ord)) ",
            &format!("message, ord) WHERE {PASSED}) "),
            1,
        );
    let (writes, notify) = whole.rsplit_once(" SELECT ").unwrap_or((&whole, ""));
    let writes = writes.strip_prefix("WITH ").unwrap_or(writes);
    format!(
        "WITH guards AS MATERIALIZED (SELECT {} AS owner, {} AS task, {SERIALIZABLE} AS serializable), {writes}, \
         token AS ({}) SELECT {notify}",
        guard(OWNER_GUARD, 0),
        guard(TASK_GUARD, 7),
        numbered_on(TOKEN, 34).replacen(
            " VALUES ($35, $36)",
            &format!(" SELECT $35, $36 WHERE {PASSED}"),
            1
        ),
    )
});

/// `sql` with each parameter `$n` numbered `$n + by`.
fn numbered_on(sql: &str, by: usize) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out + rest
}

/// What begins each of the writer's transactions, and what ends it.
pub(super) const BEGIN: &str = "BEGIN ISOLATION LEVEL SERIALIZABLE";
pub(super) const COMMIT: &str = "COMMIT";
/// What begins the writer's reads outside its transactions: they lock nothing.
pub(super) const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY";

/// A transaction's commit token.
pub(super) const TOKEN: &str = "INSERT INTO commit_tokens (token, at) VALUES ($1, $2)";

impl OwnerRow {
    fn ownership(&self) -> Ownership {
        let owner = match (&self.host, &self.boot, self.pid, self.start) {
            (Some(host), Some(boot), Some(pid), Some(start)) => Some(ProcessId {
                host: host.clone(),
                boot_id: boot.clone(),
                pid: u32::try_from(pid).unwrap_or(0),
                start: u64::try_from(start).unwrap_or(0),
            }),
            _ => None,
        };
        (
            OpStatus::parse(&self.status).unwrap_or(OpStatus::Failed),
            owner,
            self.lease,
        )
    }
}

/// A task's stored status and name.
const TASK_STATE: &str = "SELECT status, name FROM tasks WHERE op_id = $1 AND task_no = $2";

/// The state of an op's tasks from one on, at most `$3` (see [`Conn::send_next_tasks`]).
const NEXT_TASKS: &str = "SELECT task_no, status, name FROM tasks \
     WHERE op_id = $1 AND task_no >= $2 ORDER BY task_no LIMIT $3";

/// The fence's read of an op's row.
const OWNER: &str = "SELECT status, owner_host, owner_boot, owner_pid, owner_start, lease_until \
     FROM ops WHERE id = $1 FOR UPDATE";

/// [`OWNER`] taken as read: raises [`CHANGED`] unless the row is as known (see [`Known`]).
const OWNER_GUARD: &str = "SELECT COALESCE((SELECT 0 FROM ops WHERE id = $1 AND status = $2 \
     AND owner_host IS NOT DISTINCT FROM $3 AND owner_boot IS NOT DISTINCT FROM $4 \
     AND owner_pid IS NOT DISTINCT FROM $5 AND owner_start IS NOT DISTINCT FROM $6 \
     AND lease_until IS NOT DISTINCT FROM $7 FOR UPDATE), cairn_read_changed())";

/// [`TASK_STATE`] taken as read: raises [`CHANGED`] unless the task is as known.
const TASK_GUARD: &str = "SELECT COALESCE((SELECT 0 FROM tasks WHERE op_id = $1 AND task_no = $2 \
     AND status = $3 AND name = $4), cairn_read_changed())";

/// Why a transaction cannot go on, beyond the one statement that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// A serialization failure (40001) or a deadlock (40P01): the whole transaction runs again.
    Conflict,
    /// The connection is gone (or the server is shutting it down).
    Lost,
}

/// What a failure of `client` means for its transaction; `None`: only this statement failed.
pub(super) fn fault_of(err: &postgres::Error, client: &Pipe) -> Option<Fault> {
    let code = err.code().map(postgres::error::SqlState::code);
    match code {
        // Or a row taken as read has changed (see `Known`).
        Some("40001" | "40P01" | CHANGED) => Some(Fault::Conflict),
        // Another node's transaction took the same new op id first (see `insert_op`).
        Some("23505") if err.as_db_error().and_then(|e| e.constraint()) == Some("ops_pkey") => {
            Some(Fault::Conflict)
        }
        // Connection exceptions, and the server ending the session (admin or crash shutdown,
        // starting up).
        Some(c) if c.starts_with("08") || c.starts_with("57P") => Some(Fault::Lost),
        _ if err.is_closed() || client.is_closed() => Some(Fault::Lost),
        // No answer from the server at all (an I/O error on the socket).
        None if err.as_db_error().is_none() => Some(Fault::Lost),
        _ => None,
    }
}

/// A failure in the server's words: its message and SQLSTATE when it sent one.
pub(crate) fn describe(err: &postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => err.to_string(),
    }
}

/// An open write transaction (or savepoint) on the writer's connection.
pub(super) struct PgTx<'t> {
    conn: &'t mut Conn,
    path: &'t Path,
    /// The first fault met in this transaction; once set, the transaction is lost.
    pub(super) fault: Option<Fault>,
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

impl<'t> PgTx<'t> {
    pub(super) fn new(conn: &'t mut Conn, path: &'t Path) -> Self {
        Self {
            conn,
            path,
            fault: None,
        }
    }

    /// A statement's failure in the store's words, noting a fault that ends the transaction.
    fn fail(&mut self, err: &postgres::Error) -> Error {
        if self.fault.is_none() {
            self.fault = fault_of(err, &self.conn.client);
        }
        Error::Write {
            path: self.path.to_path_buf(),
            reason: describe(err),
        }
    }

    fn exec(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64> {
        let run = |conn: &mut Conn| {
            let statement = conn.statement(sql)?;
            conn.client.execute(&statement, params)
        };
        run(self.conn).map_err(|e| self.fail(&e))
    }

    /// Sends a statement whose answer nothing reads, without waiting for it (see [`Pipe`]): a
    /// failure is reported by the next statement waited for, or before the commit.
    fn send(&mut self, sql: &'static str, params: &Params<'_>) -> Result<()> {
        let statement = self.conn.statement(sql).map_err(|e| self.fail(&e))?;
        self.conn.client.send(&statement, params);
        Ok(())
    }

    /// As [`PgTx::send`], held to go fused with what follows where it can (`Pipe::hold`).
    fn hold(&mut self, sql: &'static str, params: &Params<'_>) -> Result<()> {
        let form = self.conn.form(sql).map_err(|e| self.fail(&e))?;
        self.conn.client.hold(&form, params);
        Ok(())
    }

    /// Gathers a row of a multi-row statement, sent as one with the others of its slot (see
    /// [`Pipe::gather`]).
    fn gather(&mut self, slot: &Slot, key: Option<(i64, i64)>, row: &[Value<'_>]) -> Result<()> {
        let forms = self.conn.forms(slot).map_err(|e| self.fail(&e))?;
        self.conn.client.gather(slot.at, &forms, key, row);
        Ok(())
    }

    fn opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<Row>> {
        let run = |conn: &mut Conn| {
            let statement = conn.statement(sql)?;
            conn.client.query_opt(&statement, params)
        };
        run(self.conn).map_err(|e| self.fail(&e))
    }

    /// The one row the statement must return: a missing row is an error, as SQLite's
    /// `query_row`.
    fn one(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Row> {
        self.opt(sql, params)?.ok_or_else(|| Error::Write {
            path: self.path.to_path_buf(),
            reason: format!("a row the change needs is missing (`{}`)", first_words(sql)),
        })
    }

    /// Column `i` of a row.
    fn get<'r, T: postgres::types::FromSql<'r>>(&self, row: &'r Row, i: usize) -> Result<T> {
        row.try_get(i).map_err(|e| Error::Write {
            path: self.path.to_path_buf(),
            reason: format!("an unexpected column: {e}"),
        })
    }
}

impl PgTx<'_> {
    fn all(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<Row>> {
        let run = |conn: &mut Conn| {
            let statement = conn.statement(sql)?;
            conn.client.query(&statement, params)
        };
        run(self.conn).map_err(|e| self.fail(&e))
    }
}

/// A process's start time as stored: clock ticks since boot, far below `i64::MAX`.
#[expect(
    clippy::cast_possible_wrap,
    reason = "a process's start time, in clock ticks since boot, is far below i64::MAX"
)]
fn ticks(start: u64) -> i64 {
    start as i64
}

/// The first words of a statement, to say which one found nothing.
fn first_words(sql: &str) -> String {
    sql.split_whitespace().take(6).collect::<Vec<_>>().join(" ")
}

impl Tx for PgTx<'_> {
    fn owner_of(&mut self, op: OpId) -> Result<Option<Ownership>> {
        if self.conn.taking
            && let Some(known) = self.conn.known.owners.get(&op).cloned()
        {
            let r = &known;
            self.conn.guarded = true;
            self.hold(
                OWNER_GUARD,
                &[
                    &op.0, &r.status, &r.host, &r.boot, &r.pid, &r.start, &r.lease,
                ],
            )?;
            return Ok(Some(known.ownership()));
        }
        // Locked: a claim and a fenced write on the same op wait for each other.
        let Some(row) = self.opt(OWNER, &[&op.0])? else {
            return Ok(None);
        };
        let known = OwnerRow {
            status: self.get(&row, 0)?,
            host: self.get(&row, 1)?,
            boot: self.get(&row, 2)?,
            pid: self.get(&row, 3)?,
            start: self.get(&row, 4)?,
            lease: self.get(&row, 5)?,
        };
        let ownership = known.ownership();
        if self.conn.taking {
            self.conn.known.owners.insert(op, known);
        }
        Ok(Some(ownership))
    }

    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<i64> {
        let files: serde_json::Map<String, serde_json::Value> = snapshot
            .files
            .iter()
            .map(|(path, text)| (path.clone(), serde_json::Value::String(text.clone())))
            .collect();
        let files = serde_json::Value::Object(files).to_string();
        self.send(
            "INSERT INTO plan_snapshots (hash, name, text, files) VALUES ($1, $2, $3, $4) ON CONFLICT (hash) DO NOTHING",
            &[&snapshot.hash, &snapshot.name, &snapshot.text, &files],
        )?;
        let row = self.one(
            "SELECT id FROM plan_snapshots WHERE hash = $1",
            &[&snapshot.hash],
        )?;
        self.get(&row, 0)
    }

    fn insert_op(&mut self, new: &NewOp, snapshot: i64) -> Result<OpId> {
        let row = self.one(
            // The next id after the highest, not the identity's sequence: a sequence skips the
            // numbers of transactions that rolled back (a refused submit, a conflict run again),
            // and people read op ids as a count. Two nodes taking the same id at once conflict
            // (`ops_pkey`), and the later transaction runs again.
            "INSERT INTO ops (id, uuid, plan, snapshot_id, title, status, params, workdir, env, created_at, lock_key, \
             cooldown_ms, parent_id, parent_task) VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM ops), \
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id",
            &[
                &new.uuid,
                &new.snapshot.name,
                &snapshot,
                &new.title,
                &new.status.as_str(),
                &new.params.to_string(),
                &new.workdir,
                &serde_json::Value::Object(new.env.clone()).to_string(),
                &new.at,
                &new.lock,
                &new.cooldown_ms,
                &new.parent.map(|(op, _)| op.0),
                &new.parent.map(|(_, task)| i64::from(task.0)),
            ],
        )?;
        self.get(&row, 0).map(OpId)
    }

    fn set_owner(&mut self, op: OpId, owner: &ProcessId, lease_until: Millis) -> Result<()> {
        self.send(
            "UPDATE ops SET owner_host = $2, owner_boot = $3, owner_pid = $4, owner_start = $5, lease_until = $6 WHERE id = $1",
            &[
                &op.0,
                &owner.host,
                &owner.boot_id,
                &i64::from(owner.pid),
                &ticks(owner.start),
                &lease_until,
            ],
        )?;
        Ok(())
    }

    fn start_new(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        at: Millis,
    ) -> Result<()> {
        self.send(
            "UPDATE ops SET owner_host = $2, owner_boot = $3, owner_pid = $4, owner_start = $5, lease_until = $6, \
             status = 'running', started_at = $7 WHERE id = $1",
            &[
                &op.0,
                &owner.host,
                &owner.boot_id,
                &i64::from(owner.pid),
                &ticks(owner.start),
                &lease_until,
                &at,
            ],
        )?;
        Ok(())
    }

    fn run_claimed(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        now: Millis,
    ) -> Result<()> {
        self.send(
            "UPDATE ops SET owner_host = $2, owner_boot = $3, owner_pid = $4, owner_start = $5, lease_until = $6, \
             status = 'running', started_at = COALESCE(started_at, $7), ended_at = NULL, error = NULL, interrupted_by = NULL WHERE id = $1",
            &[
                &op.0,
                &owner.host,
                &owner.boot_id,
                &i64::from(owner.pid),
                &ticks(owner.start),
                &lease_until,
                &now,
            ],
        )?;
        Ok(())
    }

    fn set_lease(&mut self, op: OpId, lease_until: Millis) -> Result<()> {
        self.send(
            "UPDATE ops SET lease_until = $2 WHERE id = $1",
            &[&op.0, &lease_until],
        )?;
        // A heartbeat rides with a step's changes: the next step knows the row as it is now.
        if let Some(known) = self.conn.known.owners.get_mut(&op) {
            known.lease = Some(lease_until);
        }
        Ok(())
    }

    fn set_task_progress(&mut self, op: OpId, task: TaskNo, text: &str) -> Result<()> {
        self.send(
            "UPDATE tasks SET progress = $3 WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0), &text],
        )?;
        Ok(())
    }

    fn set_current_task(&mut self, op: OpId, text: Option<&str>) -> Result<()> {
        self.send(
            "UPDATE ops SET current_task = $2 WHERE id = $1",
            &[&op.0, &text],
        )?;
        Ok(())
    }

    fn set_op_status(
        &mut self,
        op: OpId,
        status: OpStatus,
        error: Option<&str>,
        ended: Option<Millis>,
        release: bool,
        interrupted_by: Option<Interruption>,
    ) -> Result<()> {
        self.send(
            "UPDATE ops SET status = $2::text, error = $3, ended_at = $4::bigint, interrupted_by = $6, \
             current_task = CASE WHEN $4::bigint IS NULL THEN current_task ELSE NULL END, \
             ending = CASE WHEN $2::text IN ('succeeded', 'failed', 'canceled') THEN NULL ELSE ending END, \
             owner_host = CASE WHEN $5::boolean THEN NULL ELSE owner_host END, \
             owner_boot = CASE WHEN $5::boolean THEN NULL ELSE owner_boot END, \
             owner_pid = CASE WHEN $5::boolean THEN NULL ELSE owner_pid END, \
             owner_start = CASE WHEN $5::boolean THEN NULL ELSE owner_start END, \
             lease_until = CASE WHEN $5::boolean THEN NULL ELSE lease_until END WHERE id = $1",
            &[
                &op.0,
                &status.as_str(),
                &error,
                &ended,
                &release,
                &interrupted_by.map(Interruption::as_str),
            ],
        )?;
        Ok(())
    }

    fn op_started_at(&mut self, op: OpId) -> Result<Option<Millis>> {
        let row = self.one("SELECT started_at FROM ops WHERE id = $1", &[&op.0])?;
        self.get(&row, 0)
    }

    fn cancel_unstarted(&mut self, op: OpId, error: &str, at: Millis) -> Result<()> {
        self.send(
            "UPDATE ops SET status = 'canceled', error = $2, ended_at = $3, current_task = NULL, owner_host = NULL, \
             owner_boot = NULL, owner_pid = NULL, owner_start = NULL, lease_until = NULL WHERE id = $1",
            &[&op.0, &error, &at],
        )?;
        Ok(())
    }

    fn request_cancel(
        &mut self,
        op: OpId,
        request: &Request,
        grace_ms: Option<Millis>,
    ) -> Result<()> {
        self.send(
            "UPDATE ops SET cancel_grace_ms = CASE WHEN cancel_requested_at IS NULL THEN $5::bigint ELSE cancel_grace_ms END, \
             cancel_requested_at = COALESCE(cancel_requested_at, $2), cancel_by = COALESCE(cancel_by, $3), \
             cancel_reason = COALESCE(cancel_reason, $4) WHERE id = $1",
            &[&op.0, &request.at, &request.by, &request.reason, &grace_ms],
        )?;
        Ok(())
    }

    fn set_ending(&mut self, op: OpId, ending: &str) -> Result<()> {
        self.send(
            "UPDATE ops SET ending = $2 WHERE id = $1",
            &[&op.0, &ending],
        )?;
        Ok(())
    }

    fn clear_ending(&mut self, op: OpId) -> Result<()> {
        self.send("UPDATE ops SET ending = NULL WHERE id = $1", &[&op.0])?;
        Ok(())
    }

    fn set_params(&mut self, op: OpId, params: &str, env: &str) -> Result<()> {
        self.send(
            "UPDATE ops SET params = $2, env = $3, ending = NULL WHERE id = $1",
            &[&op.0, &params, &env],
        )?;
        Ok(())
    }

    fn plan_hash(&mut self, op: OpId) -> Result<String> {
        let row = self.one(
            "SELECT s.hash FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = $1",
            &[&op.0],
        )?;
        self.get(&row, 0)
    }

    fn set_snapshot(&mut self, op: OpId, snapshot: i64) -> Result<()> {
        self.send(
            "UPDATE ops SET snapshot_id = $2 WHERE id = $1",
            &[&op.0, &snapshot],
        )?;
        Ok(())
    }

    fn renumber_tasks(
        &mut self,
        op: OpId,
        renumber: &[(TaskNo, TaskNo)],
    ) -> Result<Option<(&'static str, i64)>> {
        const AWAY: i64 = 1 << 40;
        /// Per table: move every number away, move one back to its new place, count the left.
        const TABLES: [(&str, &str, &str, &str); 4] = [
            (
                "tasks",
                "UPDATE tasks SET task_no = task_no + $2 WHERE op_id = $1",
                "UPDATE tasks SET task_no = $3 WHERE op_id = $1 AND task_no = $2",
                "SELECT count(*) FROM tasks WHERE op_id = $1 AND task_no >= $2",
            ),
            (
                "attempts",
                "UPDATE attempts SET task_no = task_no + $2 WHERE op_id = $1",
                "UPDATE attempts SET task_no = $3 WHERE op_id = $1 AND task_no = $2",
                "SELECT count(*) FROM attempts WHERE op_id = $1 AND task_no >= $2",
            ),
            (
                "logs",
                "UPDATE logs SET task_no = task_no + $2 WHERE op_id = $1",
                "UPDATE logs SET task_no = $3 WHERE op_id = $1 AND task_no = $2",
                "SELECT count(*) FROM logs WHERE op_id = $1 AND task_no >= $2",
            ),
            (
                "ops",
                "UPDATE ops SET parent_task = parent_task + $2 WHERE parent_id = $1",
                "UPDATE ops SET parent_task = $3 WHERE parent_id = $1 AND parent_task = $2",
                "SELECT count(*) FROM ops WHERE parent_id = $1 AND parent_task >= $2",
            ),
        ];
        // Attempts follow their task: their key to it is checked once all have moved.
        self.exec("SET CONSTRAINTS ALL DEFERRED", &[])?;
        for (table, away, back, left) in TABLES {
            self.exec(away, &[&op.0, &AWAY])?;
            for (from, to) in renumber {
                self.exec(
                    back,
                    &[&op.0, &(i64::from(from.0) + AWAY), &i64::from(to.0)],
                )?;
            }
            let row = self.one(left, &[&op.0, &AWAY])?;
            let left: i64 = self.get(&row, 0)?;
            if left > 0 {
                return Ok(Some((table, left)));
            }
        }
        // Checked here, now that every number has its place.
        self.exec("SET CONSTRAINTS ALL IMMEDIATE", &[])?;
        Ok(None)
    }

    fn insert_tasks(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()> {
        for t in tasks {
            self.send(
                "INSERT INTO tasks (op_id, task_no, step, name, item, status) VALUES ($1, $2, $3, $4, $5, 'pending') \
                 ON CONFLICT (op_id, task_no) DO NOTHING",
                &[
                    &op.0,
                    &i64::from(t.task_no.0),
                    &t.step,
                    &t.name,
                    &t.item.as_ref().map(ToString::to_string),
                ],
            )?;
        }
        Ok(())
    }

    fn task_name(&mut self, op: OpId, task: TaskNo) -> Result<String> {
        let row = self.one(
            "SELECT name FROM tasks WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0)],
        )?;
        self.get(&row, 0)
    }

    fn task_state(&mut self, op: OpId, task: TaskNo) -> Result<(String, String)> {
        match self.conn.ahead.remove(&(op, task)) {
            Some(Ahead::Taken(status, name)) => {
                self.conn.guarded = true;
                self.hold(TASK_GUARD, &[&op.0, &i64::from(task.0), &status, &name])?;
                return Ok((status, name));
            }
            Some(Ahead::Read(ticket)) => match self.conn.client.take(ticket) {
                Some(Ok(rows)) if !rows.is_empty() => {
                    return Ok((self.get(&rows[0], 0)?, self.get(&rows[0], 1)?));
                }
                Some(Err(e)) => return Err(self.fail(&e)),
                // No row, or no answer to give: read as usual (which names what is missing).
                Some(Ok(_)) | None => {}
            },
            None => {}
        }
        let row = self.one(TASK_STATE, &[&op.0, &i64::from(task.0)])?;
        Ok((self.get(&row, 0)?, self.get(&row, 1)?))
    }

    fn find_task_state(&mut self, op: OpId, task: TaskNo) -> Result<Option<(String, String)>> {
        match self.opt(TASK_STATE, &[&op.0, &i64::from(task.0)])? {
            Some(row) => Ok(Some((self.get(&row, 0)?, self.get(&row, 1)?))),
            None => Ok(None),
        }
    }

    fn task_status(&mut self, op: OpId, task: TaskNo) -> Result<String> {
        let row = self.one(
            "SELECT status FROM tasks WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0)],
        )?;
        self.get(&row, 0)
    }

    fn insert_attempt(&mut self, op: OpId, task: TaskNo, n: u32, at: Millis) -> Result<()> {
        self.send(
            "INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES ($1, $2, $3, 'running', $4)",
            &[&op.0, &i64::from(task.0), &i64::from(n), &at],
        )?;
        Ok(())
    }

    fn run_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
    ) -> Result<()> {
        self.send(
            "UPDATE tasks SET status = 'running', attempts = $3, retry_from = $5, started_at = COALESCE(started_at, $4), \
             progress = NULL, ended_at = NULL, exit_code = NULL, error = NULL WHERE op_id = $1 AND task_no = $2",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(n),
                &at,
                &i64::from(retry_from),
            ],
        )?;
        Ok(())
    }

    fn attempt_logged(&mut self, op: OpId, task: TaskNo, n: u32, bytes: [u64; 2]) -> Result<()> {
        self.send(
            "UPDATE attempts SET out_logged = $4, err_logged = $5 WHERE op_id = $1 AND task_no = $2 AND n = $3",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(n),
                &i64::try_from(bytes[0]).unwrap_or(i64::MAX),
                &i64::try_from(bytes[1]).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(())
    }

    fn attempt_process(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        process: &ProcessId,
        pgid: u32,
        at: Millis,
    ) -> Result<()> {
        // Before the attempt names its process: `pid IS NULL` marks its first.
        self.send(
            "UPDATE tasks SET started_at = $4 WHERE op_id = $1 AND task_no = $2 AND started_at = \
             (SELECT started_at FROM attempts WHERE op_id = $1 AND task_no = $2 AND n = $3 AND pid IS NULL)",
            &[&op.0, &i64::from(task.0), &i64::from(n), &at],
        )?;
        self.send(
            "UPDATE attempts SET host = $4, boot_id = $5, pid = $6, pgid = $7, proc_start = $8, \
             started_at = CASE WHEN pid IS NULL THEN $9 ELSE started_at END \
             WHERE op_id = $1 AND task_no = $2 AND n = $3",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(n),
                &process.host,
                &process.boot_id,
                &i64::from(process.pid),
                &i64::from(pgid),
                &ticks(process.start),
                &at,
            ],
        )?;
        Ok(())
    }

    fn end_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()> {
        self.send(
            "UPDATE attempts SET status = $4, ended_at = $5, exit_code = $6, error = $7 \
             WHERE op_id = $1 AND task_no = $2 AND n = $3",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(n),
                &end.attempt,
                &at,
                &end.exit_code.map(i64::from),
                &end.error,
            ],
        )?;
        Ok(())
    }

    fn end_task(&mut self, op: OpId, task: TaskNo, end: &End<'_>) -> Result<()> {
        self.send(
            "UPDATE tasks SET status = $3, ended_at = $4, exit_code = $5, error = $6, \
             outputs = COALESCE($7, outputs), by_check = $8 WHERE op_id = $1 AND task_no = $2",
            &[
                &op.0,
                &i64::from(task.0),
                &end.task.as_str(),
                &end.ended,
                &end.exit_code.map(i64::from),
                &end.error,
                &end.outputs,
                &i64::from(end.by_check),
            ],
        )?;
        Ok(())
    }

    fn uncount_attempt(&mut self, op: OpId, task: TaskNo) -> Result<()> {
        self.send(
            "UPDATE tasks SET retry_from = retry_from + 1 WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0)],
        )?;
        Ok(())
    }

    fn insert_whole_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()> {
        let key = (op.0, (i64::from(task.0) << 32) | i64::from(n));
        self.gather(
            &WHOLE_ATTEMPTS,
            Some(key),
            &[
                Value::Int(Some(op.0)),
                Value::Int(Some(i64::from(task.0))),
                Value::Int(Some(i64::from(n))),
                Value::Text(Some(end.attempt)),
                Value::Int(Some(at)),
                Value::Int(end.exit_code.map(i64::from)),
                Value::Text(end.error),
            ],
        )
    }

    fn whole_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()> {
        self.gather(
            &WHOLE_TASKS,
            Some((op.0, i64::from(task.0))),
            &[
                Value::Int(Some(op.0)),
                Value::Int(Some(i64::from(task.0))),
                Value::Text(Some(end.task.as_str())),
                Value::Int(Some(i64::from(n))),
                Value::Int(Some(i64::from(retry_from))),
                Value::Int(Some(at)),
                Value::Int(end.ended),
                Value::Int(end.exit_code.map(i64::from)),
                Value::Text(end.error),
                Value::Text(end.outputs.as_deref()),
                Value::Int(Some(i64::from(end.by_check))),
            ],
        )
    }

    fn clear_answer(&mut self, op: OpId, task: TaskNo, at: Millis) -> Result<()> {
        self.send(
            "UPDATE tasks SET outputs = NULL, error = NULL, ended_at = NULL, started_at = $3 WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0), &at],
        )?;
        Ok(())
    }

    fn set_task_status(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        ended: Option<Millis>,
    ) -> Result<String> {
        let row = self.one(
            "UPDATE tasks SET status = $3, ended_at = COALESCE($4, ended_at) WHERE op_id = $1 AND task_no = $2 RETURNING name",
            &[&op.0, &i64::from(task.0), &status.as_str(), &ended],
        )?;
        self.get(&row, 0)
    }

    fn mark_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        outputs: &str,
        at: Millis,
    ) -> Result<Option<String>> {
        match self.opt(
            "UPDATE tasks SET status = $3, outputs = $4, ended_at = $5, error = NULL, exit_code = NULL, by_check = 0 \
             WHERE op_id = $1 AND task_no = $2 RETURNING name",
            &[&op.0, &i64::from(task.0), &status.as_str(), &outputs, &at],
        )? {
            Some(row) => self.get(&row, 0).map(Some),
            None => Ok(None),
        }
    }

    fn reset_tasks(&mut self, op: OpId, tasks: &[TaskNo]) -> Result<()> {
        for task in tasks {
            let task = i64::from(task.0);
            self.send(
                "UPDATE tasks SET status = 'pending', outputs = NULL, ended_at = NULL, error = NULL, exit_code = NULL, \
                 by_check = 0, retry_from = attempts, \
                 item = CASE WHEN name = step THEN NULL ELSE item END WHERE op_id = $1 AND task_no = $2",
                &[&op.0, &task],
            )?;
            self.send(
                "UPDATE ops SET parent_task = NULL WHERE parent_id = $1 AND parent_task = $2",
                &[&op.0, &task],
            )?;
        }
        Ok(())
    }

    fn answer_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: &str,
        at: Millis,
        error: Option<&str>,
        outputs: &str,
    ) -> Result<()> {
        self.send(
            "UPDATE tasks SET status = $3, ended_at = $4, error = $5, outputs = $6 WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0), &status, &at, &error, &outputs],
        )?;
        Ok(())
    }

    fn append_log(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        stream: u8,
        at: Millis,
        data: &[u8],
    ) -> Result<()> {
        self.send(
            "INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES ($1, $2, $3, \
             (SELECT COALESCE(MAX(seq), 0) + 1 FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3), $4, $5, $6)",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(attempt),
                &i64::from(stream),
                &at,
                &data,
            ],
        )?;
        Ok(())
    }

    fn log_size(&mut self, op: OpId, task: TaskNo, attempt: u32, after: i64) -> Result<i64> {
        let row = self.one(
            "SELECT COALESCE(SUM(length(data)), 0)::bigint FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3 AND seq > $4 AND stream <> 0",
            &[&op.0, &i64::from(task.0), &i64::from(attempt), &after],
        )?;
        self.get(&row, 0)
    }

    fn log_note(&mut self, op: OpId, task: TaskNo, attempt: u32) -> Result<Option<(i64, Vec<u8>)>> {
        match self.opt(
            "SELECT seq, data FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3 AND stream = 0",
            &[&op.0, &i64::from(task.0), &i64::from(attempt)],
        )? {
            Some(row) => Ok(Some((self.get(&row, 0)?, self.get(&row, 1)?))),
            None => Ok(None),
        }
    }

    fn log_head_end(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        head: i64,
    ) -> Result<Option<i64>> {
        match self.opt(
            "SELECT seq FROM (SELECT seq, SUM(length(data)) OVER (ORDER BY seq) AS upto FROM logs \
             WHERE op_id = $1 AND task_no = $2 AND attempt = $3 AND stream <> 0) AS sums WHERE upto > $4 ORDER BY seq LIMIT 1",
            &[&op.0, &i64::from(task.0), &i64::from(attempt), &head],
        )? {
            Some(row) => Ok(Some(self.get(&row, 0)?)),
            None => Ok(None),
        }
    }

    fn drop_log_after(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        after: i64,
    ) -> Result<Option<i64>> {
        match self.opt(
            "DELETE FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3 AND seq = \
             (SELECT MIN(seq) FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3 AND seq > $4 AND stream <> 0) \
             AND seq < (SELECT MAX(seq) FROM logs WHERE op_id = $1 AND task_no = $2 AND attempt = $3) \
             RETURNING length(data)::bigint",
            &[&op.0, &i64::from(task.0), &i64::from(attempt), &after],
        )? {
            Some(row) => Ok(Some(self.get(&row, 0)?)),
            None => Ok(None),
        }
    }

    fn put_log_note(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        seq: i64,
        at: Millis,
        text: &[u8],
    ) -> Result<()> {
        self.send(
            "INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES ($1, $2, $3, $4, 0, $5, $6) \
             ON CONFLICT (op_id, task_no, attempt, seq) DO UPDATE SET data = excluded.data",
            &[
                &op.0,
                &i64::from(task.0),
                &i64::from(attempt),
                &seq,
                &at,
                &text,
            ],
        )?;
        Ok(())
    }

    fn unexpanded(&mut self, op: OpId, task: TaskNo) -> Result<bool> {
        match self.opt(
            "SELECT item FROM tasks WHERE op_id = $1 AND task_no = $2",
            &[&op.0, &i64::from(task.0)],
        )? {
            Some(row) => Ok(self.get::<Option<String>>(&row, 0)?.is_none()),
            None => Ok(false),
        }
    }

    fn freeze_list(&mut self, op: OpId, task: TaskNo, list: &str, at: Millis) -> Result<String> {
        let row = self.one(
            "UPDATE tasks SET item = $3, status = 'running', started_at = COALESCE(started_at, $4) \
             WHERE op_id = $1 AND task_no = $2 RETURNING name",
            &[&op.0, &i64::from(task.0), &list, &at],
        )?;
        self.get(&row, 0)
    }

    fn upsert_items(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()> {
        // An item of an expansion before the last (no longer linked: `item` NULL) that comes
        // back runs again, with a fresh retry round.
        for t in tasks {
            self.send(
                "INSERT INTO tasks (op_id, task_no, step, name, item, status) VALUES ($1, $2, $3, $4, $5, 'pending') \
                 ON CONFLICT (op_id, task_no) DO UPDATE SET item = excluded.item, \
                 status = CASE WHEN tasks.item IS NULL THEN 'pending' ELSE tasks.status END, \
                 outputs = CASE WHEN tasks.item IS NULL THEN NULL ELSE tasks.outputs END, \
                 error = CASE WHEN tasks.item IS NULL THEN NULL ELSE tasks.error END, \
                 ended_at = CASE WHEN tasks.item IS NULL THEN NULL ELSE tasks.ended_at END, \
                 retry_from = CASE WHEN tasks.item IS NULL THEN tasks.attempts ELSE tasks.retry_from END",
                &[
                    &op.0,
                    &i64::from(t.task_no.0),
                    &t.step,
                    &t.name,
                    &t.item.as_ref().map(ToString::to_string),
                ],
            )?;
        }
        Ok(())
    }

    fn has_items(&mut self, op: OpId, task: TaskNo) -> Result<bool> {
        let row = self.one(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE op_id = $1 AND name != step \
             AND step = (SELECT step FROM tasks WHERE op_id = $1 AND task_no = $2))",
            &[&op.0, &i64::from(task.0)],
        )?;
        self.get(&row, 0)
    }

    fn drop_other_items(&mut self, op: OpId, task: TaskNo, numbers: &str) -> Result<()> {
        self.send(
            "UPDATE tasks SET item = NULL, \
             status = CASE WHEN status = 'pending' THEN 'skipped' ELSE status END, \
             error = CASE WHEN status = 'pending' THEN 'no longer in the fan-out list' ELSE error END \
             WHERE op_id = $1 AND step = (SELECT step FROM tasks WHERE op_id = $1 AND task_no = $2) \
             AND name != step AND item IS NOT NULL \
             AND task_no NOT IN (SELECT value::bigint FROM json_array_elements_text($3::text::json))",
            &[&op.0, &i64::from(task.0), &numbers],
        )?;
        Ok(())
    }

    fn gather_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        ended: Option<Millis>,
        error: Option<&str>,
        outputs: Option<&str>,
    ) -> Result<String> {
        let row = self.one(
            "UPDATE tasks SET status = $3, ended_at = $4, error = $5, outputs = $6 \
             WHERE op_id = $1 AND task_no = $2 RETURNING name",
            &[
                &op.0,
                &i64::from(task.0),
                &status.as_str(),
                &ended,
                &error,
                &outputs,
            ],
        )?;
        self.get(&row, 0)
    }

    fn detach_child(&mut self, op: OpId, task: TaskNo) -> Result<()> {
        self.send(
            "UPDATE ops SET parent_task = NULL WHERE parent_id = $1 AND parent_task = $2",
            &[&op.0, &i64::from(task.0)],
        )?;
        Ok(())
    }

    fn lock_key(&mut self, op: OpId) -> Result<Option<Option<String>>> {
        match self.opt("SELECT lock_key FROM ops WHERE id = $1", &[&op.0])? {
            Some(row) => self.get(&row, 0).map(Some),
            None => Ok(None),
        }
    }

    fn lock_holder(&mut self, key: &str) -> Result<Option<OpId>> {
        match self.opt("SELECT op_id FROM locks WHERE key = $1", &[&key])? {
            Some(row) => self.get(&row, 0).map(|id| Some(OpId(id))),
            None => Ok(None),
        }
    }

    fn cooldown(&mut self, key: &str, at: Millis) -> Result<Option<(OpId, Millis)>> {
        match self.opt(
            "SELECT op_id, until FROM cooldowns WHERE key = $1 AND until > $2 AND acked_at IS NULL",
            &[&key, &at],
        )? {
            Some(row) => Ok(Some((OpId(self.get(&row, 0)?), self.get(&row, 1)?))),
            None => Ok(None),
        }
    }

    fn insert_lock(&mut self, key: &str, op: OpId, at: Millis) -> Result<()> {
        self.send(
            "INSERT INTO locks (key, op_id, since) VALUES ($1, $2, $3)",
            &[&key, &op.0, &at],
        )?;
        Ok(())
    }

    fn delete_cooldown(&mut self, key: &str) -> Result<()> {
        self.send("DELETE FROM cooldowns WHERE key = $1", &[&key])?;
        Ok(())
    }

    fn held_lock(&mut self, op: OpId) -> Result<Option<(String, Option<i64>)>> {
        match self.opt(
            "SELECT l.key, o.cooldown_ms FROM locks l JOIN ops o ON o.id = l.op_id WHERE l.op_id = $1",
            &[&op.0],
        )? {
            Some(row) => Ok(Some((self.get(&row, 0)?, self.get(&row, 1)?))),
            None => Ok(None),
        }
    }

    fn delete_lock(&mut self, key: &str) -> Result<()> {
        self.send("DELETE FROM locks WHERE key = $1", &[&key])?;
        Ok(())
    }

    fn start_cooldown(&mut self, key: &str, op: OpId, until: Millis) -> Result<()> {
        // As SQLite's `INSERT OR REPLACE`: a new row, any acknowledgement of the old one gone.
        self.send(
            "INSERT INTO cooldowns (key, op_id, until) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET \
             op_id = excluded.op_id, until = excluded.until, acked_by = NULL, acked_at = NULL",
            &[&key, &op.0, &until],
        )?;
        Ok(())
    }

    fn ack_cooldown(&mut self, key: &str, request: &Request) -> Result<Option<OpId>> {
        match self.opt(
            "UPDATE cooldowns SET acked_by = $2, acked_at = $3 WHERE key = $1 RETURNING op_id",
            &[&key, &request.by, &request.at],
        )? {
            Some(row) => self.get(&row, 0).map(|id| Some(OpId(id))),
            None => Ok(None),
        }
    }

    fn set_paused(&mut self, setting: &str, pause: &str) -> Result<()> {
        self.send(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&setting, &pause],
        )?;
        Ok(())
    }

    fn clear_paused(&mut self, setting: &str) -> Result<()> {
        self.send("DELETE FROM settings WHERE key = $1", &[&setting])?;
        Ok(())
    }

    fn add_token(&mut self, token: &TokenRow) -> Result<bool> {
        let added = self.exec(
            "INSERT INTO tokens (name, role, hash, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                &token.name,
                &token.role,
                &token.hash,
                &token.created_at,
                &token.created_by,
            ],
        )?;
        Ok(added != 0)
    }

    fn delete_token(&mut self, name: &str) -> Result<bool> {
        let removed = self.exec("DELETE FROM tokens WHERE name = $1", &[&name])?;
        Ok(removed != 0)
    }

    fn add_schedule(&mut self, new: &NewSchedule) -> Result<bool> {
        let added = self.exec(
            "INSERT INTO schedules (name, plan, params, cron, timezone, catch_up, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
            &[
                &new.name,
                &new.plan,
                &serde_json::Value::Object(new.params.clone()).to_string(),
                &new.cron,
                &new.timezone,
                &i64::from(new.catch_up),
                &new.created_at,
            ],
        )?;
        Ok(added != 0)
    }

    fn remove_schedule(&mut self, name: &str) -> Result<bool> {
        let removed = self.exec("DELETE FROM schedules WHERE name = $1", &[&name])?;
        Ok(removed != 0)
    }

    fn pause_schedule(&mut self, name: &str, paused: bool) -> Result<bool> {
        let changed = self.exec(
            "UPDATE schedules SET paused = $2 WHERE name = $1",
            &[&name, &i64::from(paused)],
        )?;
        Ok(changed != 0)
    }

    fn fire_schedule(
        &mut self,
        name: &str,
        due: Millis,
        op: Option<OpId>,
        note: &str,
    ) -> Result<bool> {
        let fired = match op {
            Some(op) => self.exec(
                "UPDATE schedules SET last_fire = $2, last_op = $3, note = $4 \
                 WHERE name = $1 AND (last_fire IS NULL OR last_fire < $2)",
                &[&name, &due, &op.0, &note],
            )?,
            // Without an op, the last op stays the one the schedule last submitted.
            None => self.exec(
                "UPDATE schedules SET last_fire = $2, note = $3 \
                 WHERE name = $1 AND (last_fire IS NULL OR last_fire < $2)",
                &[&name, &due, &note],
            )?,
        };
        Ok(fired != 0)
    }

    fn note_schedule(&mut self, name: &str, due: Millis, note: &str) -> Result<bool> {
        let noted = self.exec(
            "UPDATE schedules SET note = $3 \
             WHERE name = $1 AND (last_fire IS NULL OR last_fire < $2)",
            &[&name, &due, &note],
        )?;
        Ok(noted != 0)
    }

    fn append_events(
        &mut self,
        op: OpId,
        at: Millis,
        task: Option<&str>,
        events: &[(&str, &str)],
    ) -> Result<()> {
        // Gathered with every other event until a statement that is not (`EVENTS`).
        for (kind, message) in events {
            self.gather(
                &EVENTS,
                None,
                &[
                    Value::Int(Some(op.0)),
                    Value::Int(Some(at)),
                    Value::Text(task),
                    Value::Text(Some(kind)),
                    Value::Text(Some(message)),
                ],
            )?;
        }
        Ok(())
    }

    // --- nodes ---

    /// Records a serving node's heartbeat: its row made or renewed, by (boot id, pid, start).
    fn beat_node(
        &mut self,
        node: &ProcessId,
        workers: u32,
        started_at: Millis,
        at: Millis,
        lease_until: Millis,
    ) -> Result<()> {
        self.send(
            "INSERT INTO nodes (host, boot_id, pid, start, workers, started_at, heartbeat_at, lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (boot_id, pid, start) DO UPDATE SET \
             host = excluded.host, workers = excluded.workers, started_at = excluded.started_at, \
             heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until",
            &[
                &node.host,
                &node.boot_id,
                &i64::from(node.pid),
                &ticks(node.start),
                &i64::from(workers),
                &started_at,
                &at,
                &lease_until,
            ],
        )?;
        Ok(())
    }

    /// Deletes a node's row.
    fn delete_node(&mut self, node: &ProcessId) -> Result<()> {
        self.send(
            "DELETE FROM nodes WHERE boot_id = $1 AND pid = $2 AND start = $3",
            &[&node.boot_id, &i64::from(node.pid), &ticks(node.start)],
        )?;
        Ok(())
    }

    /// Deletes the rows of nodes whose lease ran out before `before`.
    fn prune_nodes(&mut self, before: Millis) -> Result<()> {
        self.send("DELETE FROM nodes WHERE lease_until < $1", &[&before])?;
        Ok(())
    }

    /// Of `candidates`, the ops that are queued, never started, and unowned (or whose lease ran
    /// out before `now`), in id order, at most `limit`, each locked for this transaction. Rows
    /// another transaction holds are skipped: nodes claiming at once take different ops.
    fn lock_unowned(&mut self, candidates: &[OpId], now: Millis, limit: u32) -> Result<Vec<OpId>> {
        let ids: Vec<i64> = candidates.iter().map(|op| op.0).collect();
        let rows = self.all(
            "SELECT id FROM ops WHERE id = ANY($1) AND status = 'queued' AND started_at IS NULL \
             AND (owner_boot IS NULL OR lease_until < $2) ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
            &[&ids, &now, &i64::from(limit)],
        )?;
        rows.iter().map(|r| self.get(r, 0).map(OpId)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_step_is_its_three_parts_with_their_parameters_numbered_on() {
        let events = numbered_on(OP_EVENTS, 18);
        let expected = format!(
            "WITH attempt AS ({ATTEMPT_ROW}), task AS ({}), {}",
            numbered_on(TASK_ROW, 7),
            events.strip_prefix("WITH ").unwrap()
        );
        assert_eq!(WHOLE_STEP, expected);
    }

    #[test]
    fn the_guarded_step_writes_nothing_but_from_its_guards_row() {
        let passed = "(SELECT owner + task + serializable FROM guards) = 0";
        let expected = format!(
            "WITH guards AS MATERIALIZED (SELECT COALESCE((SELECT 0 FROM ops WHERE id = $1 \
             AND status = $2 AND owner_host IS NOT DISTINCT FROM $3 AND owner_boot IS NOT DISTINCT FROM $4 \
             AND owner_pid IS NOT DISTINCT FROM $5 AND owner_start IS NOT DISTINCT FROM $6 \
             AND lease_until IS NOT DISTINCT FROM $7 FOR UPDATE), cairn_read_changed()) AS owner, \
             COALESCE((SELECT 0 FROM tasks WHERE op_id = $8 AND task_no = $9 AND status = $10 AND name = $11), \
             cairn_read_changed()) AS task, CASE WHEN current_setting('transaction_isolation') = 'serializable' \
             THEN 0 ELSE cairn_read_changed() END AS serializable), \
             attempt AS (INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
             SELECT $12, $13, $14, $15, $16, $16, $17, $18 WHERE {passed}), \
             task AS (UPDATE tasks SET status = $21, attempts = $22, retry_from = $23, \
             started_at = COALESCE(started_at, $24), ended_at = $25, exit_code = $26, error = $27, \
             outputs = COALESCE($28, outputs), by_check = $29 WHERE {passed} AND op_id = $19 AND task_no = $20), \
             appended AS (INSERT INTO events (op_id, seq, at, kind, task, message) \
             SELECT $30, next.seq + e.ord - 1, e.at, e.kind, e.task, e.message \
             FROM (SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM events WHERE op_id = $30) next, \
             unnest($31::bigint[], $32::text[], $33::text[], $34::text[]) WITH ORDINALITY AS e(at, task, kind, message, ord) \
             WHERE {passed}), \
             token AS (INSERT INTO commit_tokens (token, at) SELECT $35, $36 WHERE {passed}) \
             SELECT pg_notify('cairn_moves', $30::bigint::text)"
        );
        assert_eq!(GUARDED_STEP.as_str(), expected);
    }
}

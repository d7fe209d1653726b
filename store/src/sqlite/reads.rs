//! Read queries, on any connection of the database (the [`SqliteReader`]'s, read-only).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use super::classify;
use crate::api::ReadBackend;
use crate::error::{Error, Result};
use crate::types::{
    AttemptRow, AttemptStatus, Briefs, CooldownRow, EventKind, EventRow, Interruption, LockRow,
    LogChunk, Millis, Moves, NodeRow, OpFilter, OpId, OpRow, OpStatus, Pause, ProcessId, Request,
    ScheduleRow, Snapshot, TaskBrief, TaskNo, TaskRow, TaskStatus, TokenRow,
};

/// The process whose four columns start at `first`, if they are all set.
pub(super) fn process_at(
    r: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<Option<ProcessId>> {
    let host: Option<String> = r.get(first)?;
    let boot: Option<String> = r.get(first + 1)?;
    let pid: Option<i64> = r.get(first + 2)?;
    let start: Option<i64> = r.get(first + 3)?;
    Ok(match (host, boot, pid, start) {
        (Some(host), Some(boot_id), Some(pid), Some(start)) => Some(ProcessId {
            host,
            boot_id,
            pid: u32::try_from(pid).unwrap_or(0),
            start: u64::try_from(start).unwrap_or(0),
        }),
        _ => None,
    })
}

const OP_COLUMNS: &str = "id, uuid, plan, title, status, params, created_at, started_at, ended_at, \
     owner_host, owner_boot, owner_pid, owner_start, lease_until, current_task, error, workdir, env, \
     lock_key, cancel_requested_at, cancel_by, cancel_reason, ending, parent_id, parent_task, \
     interrupted_by, cancel_grace_ms";

/// [`OP_COLUMNS`] with the params and env left out (`op_head`).
static OP_HEAD_COLUMNS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| crate::types::head_columns(OP_COLUMNS));

/// Column `i` of `r` as text borrowed from the row (`None` for NULL).
fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<&'r str>> {
    r.get_ref(i)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn op_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OpRow> {
    let status: String = r.get(4)?;
    let params: String = r.get(5)?;
    Ok(OpRow {
        id: OpId(r.get(0)?),
        uuid: r.get(1)?,
        plan: r.get(2)?,
        title: r.get(3)?,
        status: OpStatus::parse(&status).unwrap_or(OpStatus::Failed),
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
        created_at: r.get(6)?,
        started_at: r.get(7)?,
        ended_at: r.get(8)?,
        owner: process_at(r, 9)?,
        lease_until: r.get(13)?,
        current_task: r.get(14)?,
        error: r.get(15)?,
        workdir: r.get(16)?,
        env: serde_json::from_str(&r.get::<_, String>(17)?).unwrap_or_default(),
        lock_key: r.get(18)?,
        cancel: match r.get::<_, Option<Millis>>(19)? {
            Some(at) => Some(Request {
                by: r.get::<_, Option<String>>(20)?.unwrap_or_default(),
                at,
                reason: r.get(21)?,
            }),
            None => None,
        },
        ending: r
            .get::<_, Option<String>>(22)?
            .and_then(|e| serde_json::from_str(&e).ok()),
        parent: match (r.get::<_, Option<i64>>(23)?, r.get::<_, Option<u32>>(24)?) {
            (Some(op), Some(task)) => Some((OpId(op), TaskNo(task))),
            _ => None,
        },
        interrupted_by: r
            .get::<_, Option<String>>(25)?
            .as_deref()
            .and_then(Interruption::parse),
        cancel_grace_ms: r.get(26)?,
    })
}

/// Read queries, on any connection.
pub(crate) struct Reads<'c> {
    pub conn: &'c Connection,
    pub path: &'c Path,
}

impl Reads<'_> {
    fn err(&self, e: &rusqlite::Error) -> Error {
        classify(self.path, e)
    }

    pub fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>> {
        let mut sql = format!("SELECT {OP_COLUMNS} FROM ops WHERE 1");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?1");
        }
        if filter.plan.is_some() {
            sql.push_str(" AND plan = ?2");
        }
        // Always in the SQL: a parameter never named would be refused.
        sql.push_str(" AND (?4 IS NULL OR id < ?4)");
        sql.push_str(" ORDER BY id DESC LIMIT ?3");
        let limit = filter.limit.map_or(-1, i64::from);
        let before = filter.before.map(|b| b.0);
        let mut stmt = self.conn.prepare_cached(&sql).map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(
                params![
                    filter.status.map(OpStatus::as_str),
                    filter.plan,
                    limit,
                    before
                ],
                op_row,
            )
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn count_ops(&self, status: OpStatus) -> Result<u64> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM ops WHERE status = ?1")
            .map_err(|e| self.err(&e))?;
        let n: i64 = stmt
            .query_row([status.as_str()], |r| r.get(0))
            .map_err(|e| self.err(&e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, plan, params, cron, timezone, paused, catch_up, created_at, last_fire, last_op, note \
                 FROM schedules ORDER BY name",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                let params: String = r.get(2)?;
                Ok(ScheduleRow {
                    name: r.get(0)?,
                    plan: r.get(1)?,
                    params: serde_json::from_str(&params).unwrap_or_default(),
                    cron: r.get(3)?,
                    timezone: r.get(4)?,
                    paused: r.get(5)?,
                    catch_up: r.get(6)?,
                    created_at: r.get(7)?,
                    last_fire: r.get(8)?,
                    last_op: r.get::<_, Option<i64>>(9)?.map(OpId),
                    note: r.get(10)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// The child op that runs task `task` of `op`, if any.
    pub fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM ops WHERE parent_id = ?1 AND parent_task = ?2"
            ))
            .and_then(|mut s| s.query_row(params![op.0, task.0], op_row).optional())
            .map_err(|e| self.err(&e))
    }

    /// The child ops an op started (its `plan:` steps), by task.
    pub fn children(&self, op: OpId) -> Result<Vec<OpRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {OP_COLUMNS} FROM ops WHERE parent_id = ?1 ORDER BY parent_task"
            ))
            .map_err(|e| self.err(&e))?;
        let rows = stmt.query_map([op.0], op_row).map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn op(&self, op: OpId) -> Result<OpRow> {
        self.op_with(op, OP_COLUMNS)
    }

    pub fn op_head(&self, op: OpId) -> Result<OpRow> {
        self.op_with(op, &OP_HEAD_COLUMNS)
    }

    fn op_with(&self, op: OpId, columns: &str) -> Result<OpRow> {
        self.conn
            .prepare_cached(&format!("SELECT {columns} FROM ops WHERE id = ?1"))
            .and_then(|mut s| s.query_row([op.0], op_row).optional())
            .map_err(|e| self.err(&e))?
            .ok_or(Error::NotFound(op))
    }

    pub fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.task_rows(op, None, false)
    }

    /// The op's tasks that are `running` or `waiting`.
    pub fn active_tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.task_rows(op, None, true)
    }

    /// One task of an op.
    pub fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow> {
        self.task_rows(op, Some(task), false)?
            .pop()
            .ok_or(Error::NotFound(op))
    }

    fn task_rows(&self, op: OpId, only: Option<TaskNo>, active: bool) -> Result<Vec<TaskRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT task_no, step, name, item, status, attempts, started_at, ended_at, exit_code, error, outputs, by_check, retry_from, progress \
                 FROM tasks WHERE op_id = ?1 AND (?2 IS NULL OR task_no = ?2) \
                 AND (NOT ?3 OR status IN ('running', 'waiting')) ORDER BY task_no",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![op.0, only.map(|t| t.0), active], |r| {
                let item: Option<String> = r.get(3)?;
                let status: String = r.get(4)?;
                let outputs: Option<String> = r.get(10)?;
                Ok(TaskRow {
                    task_no: TaskNo(r.get(0)?),
                    step: r.get(1)?,
                    name: r.get(2)?,
                    item: item.and_then(|i| serde_json::from_str(&i).ok()),
                    status: TaskStatus::parse(&status).unwrap_or(TaskStatus::Failed),
                    attempts: r.get(5)?,
                    started_at: r.get(6)?,
                    ended_at: r.get(7)?,
                    exit_code: r.get(8)?,
                    error: r.get(9)?,
                    outputs: outputs.and_then(|o| serde_json::from_str(&o).ok()),
                    by_check: r.get(11)?,
                    retry_from: r.get(12)?,
                    progress: r.get(13)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn task_briefs(&self, op: OpId, which: Briefs) -> Result<Vec<TaskBrief>> {
        let mut stmt = self
            .conn
            .prepare_cached(which.sql())
            .map_err(|e| self.err(&e))?;
        let mut rows = match which {
            Briefs::All => stmt.query(params![op.0]),
            Briefs::First { steps, items } => stmt.query(params![op.0, steps, items]),
        }
        .map_err(|e| self.err(&e))?;
        let mut briefs: Vec<TaskBrief> = Vec::new();
        while let Some(r) = rows.next().map_err(|e| self.err(&e))? {
            let brief = (|| {
                let step = text(r, 1)?.unwrap_or_default();
                Ok::<_, rusqlite::Error>(TaskBrief {
                    task_no: TaskNo(r.get(0)?),
                    step: TaskBrief::step_id(step, briefs.last()),
                    name: r.get(2)?,
                    item: text(r, 3)?.map(Box::from),
                    status: TaskStatus::parse(text(r, 4)?.unwrap_or_default())
                        .unwrap_or(TaskStatus::Failed),
                    attempts: r.get(5)?,
                    retry_from: r.get(6)?,
                    error: r.get(7)?,
                    outputs: text(r, 8)?.and_then(|o| serde_json::from_str(o).ok()),
                })
            })()
            .map_err(|e| self.err(&e))?;
            briefs.push(brief);
        }
        Ok(briefs)
    }

    pub fn last_task(&self, op: OpId) -> Result<Option<TaskNo>> {
        self.conn
            .prepare_cached("SELECT max(task_no) FROM tasks WHERE op_id = ?1")
            .and_then(|mut s| s.query_row([op.0], |r| r.get::<_, Option<u32>>(0)))
            .map(|last| last.map(TaskNo))
            .map_err(|e| self.err(&e))
    }

    pub fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.attempt_rows(op, false)
    }

    /// The op's attempts that are `running`.
    pub fn running_attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.attempt_rows(op, true)
    }

    fn attempt_rows(&self, op: OpId, running: bool) -> Result<Vec<AttemptRow>> {
        // The status written out, not bound, and the index named: without statistics SQLite
        // would take the primary key and read all the op's attempts.
        let (index, only) = if running {
            ("INDEXED BY attempts_running", "AND status = 'running'")
        } else {
            ("", "")
        };
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT task_no, n, status, started_at, ended_at, exit_code, error, host, boot_id, pid, proc_start, pgid, \
                 out_logged, err_logged FROM attempts {index} WHERE op_id = ?1 {only} ORDER BY task_no, n",
            ))
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![op.0], |r| {
                let status: String = r.get(2)?;
                let pgid: Option<i64> = r.get(11)?;
                Ok(AttemptRow {
                    task_no: TaskNo(r.get(0)?),
                    n: r.get(1)?,
                    status: AttemptStatus::parse(&status).unwrap_or(AttemptStatus::Failed),
                    started_at: r.get(3)?,
                    ended_at: r.get(4)?,
                    exit_code: r.get(5)?,
                    error: r.get(6)?,
                    process: process_at(r, 7)?,
                    pgid: pgid.and_then(|p| u32::try_from(p).ok()),
                    logged: [r.get::<_, i64>(12)?, r.get::<_, i64>(13)?]
                        .map(|b| u64::try_from(b).unwrap_or(0)),
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn events(&self, op: OpId) -> Result<Vec<EventRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, at, kind, task, message FROM events WHERE op_id = ?1 ORDER BY seq",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([op.0], event_row)
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn moves(&self, after: Option<u64>) -> Result<Moves> {
        let err = |e: &rusqlite::Error| self.err(e);
        // One snapshot for both statements: a prune committed between them would delete rows
        // past the cursor unseen.
        let _snapshot = self.conn.unchecked_transaction().map_err(|e| err(&e))?;
        let (oldest, newest): (i64, i64) = self
            .conn
            .prepare_cached("SELECT COALESCE(MIN(tick), 0), COALESCE(MAX(tick), 0) FROM moves")
            .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(|e| err(&e))?;
        let cursor = u64::try_from(newest).unwrap_or(0);
        let known = after
            .and_then(|a| i64::try_from(a).ok())
            .filter(|a| *a <= newest && *a >= oldest.saturating_sub(1));
        let Some(after) = known else {
            return Ok(Moves { cursor, ops: None });
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT op_id FROM moves WHERE tick > ?1 AND tick <= ?2 ORDER BY tick")
            .map_err(|e| err(&e))?;
        let rows = stmt
            .query_map([after, newest], |r| r.get::<_, i64>(0))
            .map_err(|e| err(&e))?;
        let (mut ops, mut seen) = (Vec::new(), std::collections::HashSet::new());
        for op in rows {
            let op = OpId(op.map_err(|e| err(&e))?);
            if seen.insert(op) {
                ops.push(op);
            }
        }
        Ok(Moves {
            cursor,
            ops: Some(ops),
        })
    }

    pub fn last_event(&self, op: OpId, task: &str, kind: EventKind) -> Result<Option<EventRow>> {
        self.conn
            .prepare_cached(
                "SELECT seq, at, kind, task, message FROM events \
                 WHERE op_id = ?1 AND task = ?2 AND kind = ?3 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![op.0, task, kind.as_str()], event_row)
                    .optional()
            })
            .map_err(|e| self.err(&e))
    }

    /// Log chunks of the op (or of one task), in order, after `after` = (task, attempt, seq).
    pub fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        let (t, a, s) = after.map_or((-1, -1, -1), |(t, a, s)| (i64::from(t.0), i64::from(a), s));
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT task_no, attempt, seq, stream, at, data FROM logs WHERE op_id = ?1 \
                 AND (?2 IS NULL OR task_no = ?2) AND (task_no, attempt, seq) > (?3, ?4, ?5) \
                 ORDER BY task_no, attempt, seq",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map(params![op.0, task.map(|t| t.0), t, a, s], |r| {
                Ok(LogChunk {
                    task_no: TaskNo(r.get(0)?),
                    attempt: r.get(1)?,
                    seq: r.get(2)?,
                    stream: r.get(3)?,
                    at: r.get(4)?,
                    data: r.get(5)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn locks(&self) -> Result<Vec<LockRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, op_id, since FROM locks ORDER BY key")
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(LockRow {
                    key: r.get(0)?,
                    op: OpId(r.get(1)?),
                    since: r.get(2)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Cooldowns that still run at `now` (acknowledged ones included, marked).
    pub fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, op_id, until, acked_by, acked_at FROM cooldowns WHERE until > ?1 ORDER BY key")
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([now], |r| {
                let by: Option<String> = r.get(3)?;
                let at: Option<Millis> = r.get(4)?;
                Ok(CooldownRow {
                    key: r.get(0)?,
                    op: OpId(r.get(1)?),
                    until: r.get(2)?,
                    acked: by.zip(at).map(|(by, at)| Request {
                        by,
                        at,
                        reason: None,
                    }),
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// Who paused cairn, when and why; `None` when it is not paused.
    pub fn nodes(&self) -> Result<Vec<NodeRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT host, boot_id, pid, start, workers, started_at, heartbeat_at, lease_until \
                 FROM nodes ORDER BY host, pid",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(NodeRow {
                    id: ProcessId {
                        host: r.get(0)?,
                        boot_id: r.get(1)?,
                        pid: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                        start: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    },
                    workers: u32::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                    started_at: r.get(5)?,
                    heartbeat_at: r.get(6)?,
                    lease_until: r.get(7)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, role, hash, created_at, created_by FROM tokens ORDER BY name",
            )
            .map_err(|e| self.err(&e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TokenRow {
                    name: r.get(0)?,
                    role: r.get(1)?,
                    hash: r.get(2)?,
                    created_at: r.get(3)?,
                    created_by: r.get(4)?,
                })
            })
            .map_err(|e| self.err(&e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(&e))
    }

    /// A scan of every op's params (compact JSON: a sealed value is `{"$secret":"v1:...`, text that
    /// only quotes it is escaped); asked only when the secret key is missing.
    pub fn any_sealed(&self) -> Result<bool> {
        self.conn
            .prepare_cached(
                r#"SELECT EXISTS (SELECT 1 FROM ops WHERE params LIKE '%{"$secret":"%')"#,
            )
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| self.err(&e))
    }

    pub fn pauses(&self) -> Result<Vec<Pause>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT value FROM settings WHERE key = 'paused' OR key LIKE 'paused:%' ORDER BY key",
            )
            .map_err(|e| self.err(&e))?;
        let values = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
            .map_err(|e| self.err(&e))?;
        Ok(values
            .iter()
            .filter_map(|v| Pause::from_setting(v))
            .collect())
    }

    pub fn snapshot(&self, op: OpId) -> Result<Snapshot> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT s.hash, s.name, s.text, s.files FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([op.0], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?)))
                    .optional()
            })
            .map_err(|e| self.err(&e))?
            .ok_or(Error::NotFound(op))?;
        let files: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&row.3).unwrap_or_default();
        Ok(Snapshot {
            hash: row.0,
            name: row.1,
            text: row.2,
            files: files
                .into_iter()
                .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_owned()))
                .collect(),
        })
    }
}

/// A read-only connection on the database.
#[derive(Debug)]
pub(crate) struct SqliteReader {
    /// Behind a mutex so that a reader may be held across awaits by futures that move between
    /// threads; reads are short and a reader is used by one task at a time.
    conn: Mutex<Connection>,
    path: std::path::PathBuf,
}

impl SqliteReader {
    /// Opens the database at `path` read-only; `None` when there is no file yet. Never writes.
    pub(crate) fn open(path: &Path) -> Result<Option<Self>> {
        Self::open_checked(path, false)
    }

    /// [`SqliteReader::open`] in a process that has the database open for writing: the checks
    /// its writer made when opening it are not made again (`cairn serve` opens a reader at each
    /// poll).
    pub(crate) fn open_beside_writer(path: &Path) -> Result<Option<Self>> {
        Self::open_checked(path, true)
    }

    fn open_checked(path: &Path, beside_writer: bool) -> Result<Option<Self>> {
        Ok(super::open_reader(path, beside_writer)?.map(|conn| Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        }))
    }

    fn with<T>(&self, read: impl FnOnce(Reads<'_>) -> T) -> T {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        read(Reads {
            conn: &conn,
            path: &self.path,
        })
    }
}

impl ReadBackend for SqliteReader {
    fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>> {
        self.with(|r| r.list_ops(filter))
    }

    fn count_ops(&self, status: OpStatus) -> Result<u64> {
        self.with(|r| r.count_ops(status))
    }

    fn op(&self, op: OpId) -> Result<OpRow> {
        self.with(|r| r.op(op))
    }

    fn op_head(&self, op: OpId) -> Result<OpRow> {
        self.with(|r| r.op_head(op))
    }

    fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        self.with(|r| r.schedules())
    }

    fn child(&self, op: OpId, task: TaskNo) -> Result<Option<OpRow>> {
        self.with(|r| r.child(op, task))
    }

    fn children(&self, op: OpId) -> Result<Vec<OpRow>> {
        self.with(|r| r.children(op))
    }

    fn tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.with(|r| r.tasks(op))
    }

    fn active_tasks(&self, op: OpId) -> Result<Vec<TaskRow>> {
        self.with(|r| r.active_tasks(op))
    }

    fn task(&self, op: OpId, task: TaskNo) -> Result<TaskRow> {
        self.with(|r| r.task(op, task))
    }

    fn task_briefs(&self, op: OpId, which: Briefs) -> Result<Vec<TaskBrief>> {
        self.with(|r| r.task_briefs(op, which))
    }

    fn last_task(&self, op: OpId) -> Result<Option<TaskNo>> {
        self.with(|r| r.last_task(op))
    }

    fn attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.with(|r| r.attempts(op))
    }

    fn running_attempts(&self, op: OpId) -> Result<Vec<AttemptRow>> {
        self.with(|r| r.running_attempts(op))
    }

    fn events(&self, op: OpId) -> Result<Vec<EventRow>> {
        self.with(|r| r.events(op))
    }

    fn last_event(&self, op: OpId, task: &str, kind: EventKind) -> Result<Option<EventRow>> {
        self.with(|r| r.last_event(op, task, kind))
    }

    fn moves(&self, after: Option<u64>) -> Result<Moves> {
        self.with(|r| r.moves(after))
    }

    fn logs(
        &self,
        op: OpId,
        task: Option<TaskNo>,
        after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        self.with(|r| r.logs(op, task, after))
    }

    fn snapshot(&self, op: OpId) -> Result<Snapshot> {
        self.with(|r| r.snapshot(op))
    }

    fn locks(&self) -> Result<Vec<LockRow>> {
        self.with(|r| r.locks())
    }

    fn cooldowns(&self, now: Millis) -> Result<Vec<CooldownRow>> {
        self.with(|r| r.cooldowns(now))
    }

    fn pauses(&self) -> Result<Vec<Pause>> {
        self.with(|r| r.pauses())
    }

    fn nodes(&self) -> Result<Vec<NodeRow>> {
        self.with(|r| r.nodes())
    }

    fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.with(|r| r.tokens())
    }

    fn any_sealed(&self) -> Result<bool> {
        self.with(|r| r.any_sealed())
    }
}

/// An `events` row read as `seq, at, kind, task, message`.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        seq: r.get(0)?,
        at: r.get(1)?,
        kind: r.get(2)?,
        task: r.get(3)?,
        message: r.get(4)?,
    })
}

//! The rules' transaction ([`Tx`]) on SQLite: each method is its statements, prepared once per
//! connection and kept (`prepare_cached`), with no decision of its own.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::classify;
use super::reads::process_at;
use crate::error::Result;
use crate::rules::{End, Ownership, Tx};
use crate::types::{
    Interruption, Millis, NewOp, NewSchedule, NewTask, OpId, OpStatus, ProcessId, Request,
    Snapshot, TaskNo, TaskStatus, TokenRow,
};

/// An open write transaction (or savepoint) of the writer's connection.
pub(super) struct SqliteTx<'t> {
    conn: &'t Connection,
    path: &'t Path,
    /// The op this batch last logged in `moves`: one row per op and batch is enough.
    moved: Option<OpId>,
}

/// How many rows of `moves` are kept at least, and how often (in rows) older ones are deleted.
const MOVES_KEPT: i64 = 1 << 17;
const MOVES_PRUNED_EVERY: i64 = 1 << 12;

impl<'t> SqliteTx<'t> {
    pub(super) fn new(conn: &'t Connection, path: &'t Path) -> Self {
        Self {
            conn,
            path,
            moved: None,
        }
    }

    /// Runs statements, a failure told in the database's words.
    fn run<T>(&self, statements: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        statements(self.conn).map_err(|e| classify(self.path, &e))
    }
}

#[expect(
    clippy::cast_possible_wrap,
    reason = "a process's start time, in clock ticks since boot, is far below i64::MAX"
)]
impl Tx for SqliteTx<'_> {
    fn owner_of(&mut self, op: OpId) -> Result<Option<Ownership>> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT status, owner_host, owner_boot, owner_pid, owner_start, lease_until FROM ops INDEXED BY ops_owner WHERE id = ?1",
            )?
            .query_row([op.0], |r| {
                let status: String = r.get(0)?;
                Ok((
                    OpStatus::parse(&status).unwrap_or(OpStatus::Failed),
                    process_at(r, 1)?,
                    r.get::<_, Option<Millis>>(5)?,
                ))
            })
            .optional()
        })
    }

    fn store_snapshot(&mut self, snapshot: &Snapshot) -> Result<i64> {
        let files: serde_json::Map<String, serde_json::Value> = snapshot
            .files
            .iter()
            .map(|(path, text)| (path.clone(), serde_json::Value::String(text.clone())))
            .collect();
        let files = serde_json::Value::Object(files).to_string();
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO plan_snapshots (hash, name, text, files) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (hash) DO NOTHING",
            )?
            .execute(params![snapshot.hash, snapshot.name, snapshot.text, files])?;
            c.prepare_cached("SELECT id FROM plan_snapshots WHERE hash = ?1")?
                .query_row([&snapshot.hash], |r| r.get(0))
        })
    }

    fn insert_op(&mut self, new: &NewOp, snapshot: i64) -> Result<OpId> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO ops (uuid, plan, snapshot_id, title, status, params, workdir, env, created_at, lock_key, cooldown_ms, \
                 parent_id, parent_task) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING id",
            )?
            .query_row(
                params![
                    new.uuid,
                    new.snapshot.name,
                    snapshot,
                    new.title,
                    new.status.as_str(),
                    new.params.to_string(),
                    new.workdir,
                    serde_json::Value::Object(new.env.clone()).to_string(),
                    new.at,
                    new.lock,
                    new.cooldown_ms,
                    new.parent.map(|(op, _)| op.0),
                    new.parent.map(|(_, task)| task.0)
                ],
                |r| r.get(0).map(OpId),
            )
        })
    }

    fn set_owner(&mut self, op: OpId, owner: &ProcessId, lease_until: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6 WHERE id = ?1",
            )?
            .execute(params![op.0, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until])?;
            Ok(())
        })
    }

    fn start_new(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        at: Millis,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6, \
                 status = 'running', started_at = ?7 WHERE id = ?1",
            )?
            .execute(params![op.0, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until, at])?;
            Ok(())
        })
    }

    fn run_claimed(
        &mut self,
        op: OpId,
        owner: &ProcessId,
        lease_until: Millis,
        now: Millis,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET owner_host = ?2, owner_boot = ?3, owner_pid = ?4, owner_start = ?5, lease_until = ?6, \
                 status = 'running', started_at = COALESCE(started_at, ?7), ended_at = NULL, error = NULL, interrupted_by = NULL WHERE id = ?1",
            )?
            .execute(params![op.0, owner.host, owner.boot_id, owner.pid, owner.start as i64, lease_until, now])?;
            Ok(())
        })
    }

    fn set_lease(&mut self, op: OpId, lease_until: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET lease_until = ?2 WHERE id = ?1")?
                .execute(params![op.0, lease_until])?;
            Ok(())
        })
    }

    fn set_task_progress(&mut self, op: OpId, task: TaskNo, text: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE tasks SET progress = ?3 WHERE op_id = ?1 AND task_no = ?2")?
                .execute(params![op.0, task.0, text])?;
            Ok(())
        })
    }

    fn set_current_task(&mut self, op: OpId, text: Option<&str>) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET current_task = ?2 WHERE id = ?1")?
                .execute(params![op.0, text])?;
            Ok(())
        })
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
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET status = ?2, error = ?3, ended_at = ?4, interrupted_by = ?6, \
                 current_task = CASE WHEN ?4 IS NULL THEN current_task ELSE NULL END, \
                 ending = CASE WHEN ?2 IN ('succeeded', 'failed', 'canceled') THEN NULL ELSE ending END, \
                 owner_host = CASE WHEN ?5 THEN NULL ELSE owner_host END, \
                 owner_boot = CASE WHEN ?5 THEN NULL ELSE owner_boot END, \
                 owner_pid = CASE WHEN ?5 THEN NULL ELSE owner_pid END, \
                 owner_start = CASE WHEN ?5 THEN NULL ELSE owner_start END, \
                 lease_until = CASE WHEN ?5 THEN NULL ELSE lease_until END WHERE id = ?1",
            )?
            .execute(params![
                op.0,
                status.as_str(),
                error,
                ended,
                release,
                interrupted_by.map(Interruption::as_str)
            ])?;
            Ok(())
        })
    }

    fn op_started_at(&mut self, op: OpId) -> Result<Option<Millis>> {
        self.run(|c| {
            c.prepare_cached("SELECT started_at FROM ops WHERE id = ?1")?
                .query_row([op.0], |r| r.get(0))
        })
    }

    fn cancel_unstarted(&mut self, op: OpId, error: &str, at: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET status = 'canceled', error = ?2, ended_at = ?3, current_task = NULL, owner_host = NULL, \
                 owner_boot = NULL, owner_pid = NULL, owner_start = NULL, lease_until = NULL WHERE id = ?1",
            )?
            .execute(params![op.0, error, at])?;
            Ok(())
        })
    }

    fn request_cancel(
        &mut self,
        op: OpId,
        request: &Request,
        grace_ms: Option<Millis>,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET cancel_grace_ms = CASE WHEN cancel_requested_at IS NULL THEN ?5 ELSE cancel_grace_ms END, \
                 cancel_requested_at = COALESCE(cancel_requested_at, ?2), cancel_by = COALESCE(cancel_by, ?3), \
                 cancel_reason = COALESCE(cancel_reason, ?4) WHERE id = ?1",
            )?
            .execute(params![op.0, request.at, request.by, request.reason, grace_ms])?;
            Ok(())
        })
    }

    fn set_ending(&mut self, op: OpId, ending: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET ending = ?2 WHERE id = ?1")?
                .execute(params![op.0, ending])?;
            Ok(())
        })
    }

    fn clear_ending(&mut self, op: OpId) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET ending = NULL WHERE id = ?1")?
                .execute([op.0])?;
            Ok(())
        })
    }

    fn set_params(&mut self, op: OpId, params: &str, env: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET params = ?2, env = ?3, ending = NULL WHERE id = ?1")?
                .execute(params![op.0, params, env])?;
            Ok(())
        })
    }

    fn plan_hash(&mut self, op: OpId) -> Result<String> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT s.hash FROM ops o JOIN plan_snapshots s ON s.id = o.snapshot_id WHERE o.id = ?1",
            )?
            .query_row([op.0], |r| r.get(0))
        })
    }

    fn set_snapshot(&mut self, op: OpId, snapshot: i64) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("UPDATE ops SET snapshot_id = ?2 WHERE id = ?1")?
                .execute(params![op.0, snapshot])?;
            Ok(())
        })
    }

    fn renumber_tasks(
        &mut self,
        op: OpId,
        renumber: &[(TaskNo, TaskNo)],
    ) -> Result<Option<(&'static str, i64)>> {
        const AWAY: i64 = 1 << 40;
        self.run(|c| {
            // Attempts and logs follow their task; the keys are checked at commit.
            c.pragma_update(None, "defer_foreign_keys", "ON")?;
            // Each number moved out of the way first, then to its new place.
            for (table, of, no) in [
                ("tasks", "op_id", "task_no"),
                ("attempts", "op_id", "task_no"),
                ("logs", "op_id", "task_no"),
                ("ops", "parent_id", "parent_task"),
            ] {
                c.execute(
                    &format!("UPDATE {table} SET {no} = {no} + ?2 WHERE {of} = ?1"),
                    params![op.0, AWAY],
                )?;
                let mut back = c.prepare(&format!(
                    "UPDATE {table} SET {no} = ?3 WHERE {of} = ?1 AND {no} = ?2"
                ))?;
                for (from, to) in renumber {
                    back.execute(params![op.0, i64::from(from.0) + AWAY, to.0])?;
                }
                let left: i64 = c.query_row(
                    &format!("SELECT count(*) FROM {table} WHERE {of} = ?1 AND {no} >= ?2"),
                    params![op.0, AWAY],
                    |r| r.get(0),
                )?;
                if left > 0 {
                    return Ok(Some((table, left)));
                }
            }
            // Checked at this transaction's commit; the requests after it in the same group
            // commit check theirs at once again.
            c.pragma_update(None, "defer_foreign_keys", "OFF")?;
            Ok(None)
        })
    }

    fn insert_tasks(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()> {
        self.run(|c| {
            let mut insert = c.prepare_cached(
                "INSERT OR IGNORE INTO tasks (op_id, task_no, step, name, item, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
            )?;
            for t in tasks {
                insert.execute(params![
                    op.0,
                    t.task_no.0,
                    t.step,
                    t.name,
                    t.item.as_ref().map(ToString::to_string)
                ])?;
            }
            Ok(())
        })
    }

    fn task_name(&mut self, op: OpId, task: TaskNo) -> Result<String> {
        self.run(|c| {
            c.prepare_cached("SELECT name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| r.get(0))
        })
    }

    fn task_state(&mut self, op: OpId, task: TaskNo) -> Result<(String, String)> {
        self.run(|c| {
            c.prepare_cached("SELECT status, name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| Ok((r.get(0)?, r.get(1)?)))
        })
    }

    fn find_task_state(&mut self, op: OpId, task: TaskNo) -> Result<Option<(String, String)>> {
        self.run(|c| {
            c.prepare_cached("SELECT status, name FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
    }

    fn task_status(&mut self, op: OpId, task: TaskNo) -> Result<String> {
        self.run(|c| {
            c.prepare_cached("SELECT status FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| r.get(0))
        })
    }

    fn insert_attempt(&mut self, op: OpId, task: TaskNo, n: u32, at: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO attempts (op_id, task_no, n, status, started_at) VALUES (?1, ?2, ?3, 'running', ?4)",
            )?
            .execute(params![op.0, task.0, n, at])?;
            Ok(())
        })
    }

    fn run_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        retry_from: u32,
        at: Millis,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = 'running', attempts = ?3, retry_from = ?5, started_at = COALESCE(started_at, ?4), \
                 progress = NULL, ended_at = NULL, exit_code = NULL, error = NULL WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![op.0, task.0, n, at, retry_from])?;
            Ok(())
        })
    }

    fn attempt_logged(&mut self, op: OpId, task: TaskNo, n: u32, bytes: [u64; 2]) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE attempts SET out_logged = ?4, err_logged = ?5 WHERE op_id = ?1 AND task_no = ?2 AND n = ?3",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                i64::try_from(bytes[0]).unwrap_or(i64::MAX),
                i64::try_from(bytes[1]).unwrap_or(i64::MAX)
            ])?;
            Ok(())
        })
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
        self.run(|c| {
            // Before the attempt names its process: `pid IS NULL` marks its first.
            c.prepare_cached(
                "UPDATE tasks SET started_at = ?4 WHERE op_id = ?1 AND task_no = ?2 AND started_at = \
                 (SELECT started_at FROM attempts WHERE op_id = ?1 AND task_no = ?2 AND n = ?3 AND pid IS NULL)",
            )?
            .execute(params![op.0, task.0, n, at])?;
            c.prepare_cached(
                "UPDATE attempts SET host = ?4, boot_id = ?5, pid = ?6, pgid = ?7, proc_start = ?8, \
                 started_at = CASE WHEN pid IS NULL THEN ?9 ELSE started_at END \
                 WHERE op_id = ?1 AND task_no = ?2 AND n = ?3",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                process.host,
                process.boot_id,
                process.pid,
                pgid,
                process.start as i64,
                at
            ])?;
            Ok(())
        })
    }

    fn end_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE attempts SET status = ?4, ended_at = ?5, exit_code = ?6, error = ?7 \
                 WHERE op_id = ?1 AND task_no = ?2 AND n = ?3",
            )?
            .execute(params![
                op.0,
                task.0,
                n,
                end.attempt,
                at,
                end.exit_code,
                end.error
            ])?;
            Ok(())
        })
    }

    fn end_task(&mut self, op: OpId, task: TaskNo, end: &End<'_>) -> Result<()> {
        // No `RETURNING name`: SQLite gathers returned rows in a temporary table, and the rules
        // read the name before.
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = ?4, exit_code = ?5, error = ?6, \
                 outputs = COALESCE(?7, outputs), by_check = ?8 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![
                op.0,
                task.0,
                end.task.as_str(),
                end.ended,
                end.exit_code,
                end.error,
                end.outputs,
                end.by_check
            ])?;
            Ok(())
        })
    }

    fn uncount_attempt(&mut self, op: OpId, task: TaskNo) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET retry_from = retry_from + 1 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![op.0, task.0])?;
            Ok(())
        })
    }

    fn insert_whole_attempt(
        &mut self,
        op: OpId,
        task: TaskNo,
        n: u32,
        at: Millis,
        end: &End<'_>,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO attempts (op_id, task_no, n, status, started_at, ended_at, exit_code, error) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7)",
            )?
            .execute(params![op.0, task.0, n, end.attempt, at, end.exit_code, end.error])?;
            Ok(())
        })
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
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, attempts = ?4, retry_from = ?5, started_at = COALESCE(started_at, ?6), \
                 ended_at = ?7, exit_code = ?8, error = ?9, outputs = COALESCE(?10, outputs), by_check = ?11 \
                 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![
                op.0,
                task.0,
                end.task.as_str(),
                n,
                retry_from,
                at,
                end.ended,
                end.exit_code,
                end.error,
                end.outputs,
                end.by_check
            ])?;
            Ok(())
        })
    }

    fn clear_answer(&mut self, op: OpId, task: TaskNo, at: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET outputs = NULL, error = NULL, ended_at = NULL, started_at = ?3 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![op.0, task.0, at])?;
            Ok(())
        })
    }

    fn set_task_status(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        ended: Option<Millis>,
    ) -> Result<String> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = COALESCE(?4, ended_at) WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
            )?
            .query_row(params![op.0, task.0, status.as_str(), ended], |r| r.get(0))
        })
    }

    fn mark_task(
        &mut self,
        op: OpId,
        task: TaskNo,
        status: TaskStatus,
        outputs: &str,
        at: Millis,
    ) -> Result<Option<String>> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, outputs = ?4, ended_at = ?5, error = NULL, exit_code = NULL, by_check = 0 \
                 WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
            )?
            .query_row(params![op.0, task.0, status.as_str(), outputs, at], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    fn reset_tasks(&mut self, op: OpId, tasks: &[TaskNo]) -> Result<()> {
        self.run(|c| {
            let mut reset = c.prepare_cached(
                "UPDATE tasks SET status = 'pending', outputs = NULL, ended_at = NULL, error = NULL, exit_code = NULL, \
                 by_check = 0, retry_from = attempts WHERE op_id = ?1 AND task_no = ?2",
            )?;
            let mut unfreeze = c.prepare_cached(
                "UPDATE tasks SET item = NULL WHERE op_id = ?1 AND task_no = ?2 AND name = step",
            )?;
            let mut detach = c.prepare_cached(
                "UPDATE ops SET parent_task = NULL WHERE parent_id = ?1 AND parent_task = ?2",
            )?;
            for task in tasks {
                reset.execute(params![op.0, task.0])?;
                unfreeze.execute(params![op.0, task.0])?;
                detach.execute(params![op.0, task.0])?;
            }
            Ok(())
        })
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
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = ?4, error = ?5, outputs = ?6 WHERE op_id = ?1 AND task_no = ?2",
            )?
            .execute(params![op.0, task.0, status, at, error, outputs])?;
            Ok(())
        })
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
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES (?1, ?2, ?3, \
                 (SELECT COALESCE(MAX(seq), 0) + 1 FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3), ?4, ?5, ?6)",
            )?
            .execute(params![op.0, task.0, attempt, stream, at, data])?;
            Ok(())
        })
    }

    fn log_size(&mut self, op: OpId, task: TaskNo, attempt: u32, after: i64) -> Result<i64> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT COALESCE(SUM(length(data)), 0) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND seq > ?4 AND stream <> 0",
            )?
            .query_row(params![op.0, task.0, attempt, after], |r| r.get(0))
        })
    }

    fn log_note(&mut self, op: OpId, task: TaskNo, attempt: u32) -> Result<Option<(i64, Vec<u8>)>> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT seq, data FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND stream = 0",
            )?
            .query_row(params![op.0, task.0, attempt], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
        })
    }

    fn log_head_end(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        head: i64,
    ) -> Result<Option<i64>> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT seq FROM (SELECT seq, SUM(length(data)) OVER (ORDER BY seq) AS upto FROM logs \
                 WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND stream <> 0) WHERE upto > ?4 ORDER BY seq LIMIT 1",
            )?
            .query_row(params![op.0, task.0, attempt, head], |r| r.get(0))
            .optional()
        })
    }

    fn drop_log_after(
        &mut self,
        op: OpId,
        task: TaskNo,
        attempt: u32,
        after: i64,
    ) -> Result<Option<i64>> {
        self.run(|c| {
            c.prepare_cached(
                "DELETE FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND seq = \
                 (SELECT MIN(seq) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3 AND seq > ?4 AND stream <> 0) \
                 AND seq < (SELECT MAX(seq) FROM logs WHERE op_id = ?1 AND task_no = ?2 AND attempt = ?3) \
                 RETURNING length(data)",
            )?
            .query_row(params![op.0, task.0, attempt, after], |r| r.get(0))
            .optional()
        })
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
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO logs (op_id, task_no, attempt, seq, stream, at, data) VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6) \
                 ON CONFLICT (op_id, task_no, attempt, seq) DO UPDATE SET data = excluded.data",
            )?
            .execute(params![op.0, task.0, attempt, seq, at, text])?;
            Ok(())
        })
    }

    fn unexpanded(&mut self, op: OpId, task: TaskNo) -> Result<bool> {
        self.run(|c| {
            let list: Option<Option<String>> = c
                .prepare_cached("SELECT item FROM tasks WHERE op_id = ?1 AND task_no = ?2")?
                .query_row(params![op.0, task.0], |r| r.get(0))
                .optional()?;
            Ok(matches!(list, Some(None)))
        })
    }

    fn freeze_list(&mut self, op: OpId, task: TaskNo, list: &str, at: Millis) -> Result<String> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET item = ?3, status = 'running', started_at = COALESCE(started_at, ?4) \
                 WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
            )?
            .query_row(params![op.0, task.0, list, at], |r| r.get(0))
        })
    }

    fn upsert_items(&mut self, op: OpId, tasks: &[NewTask]) -> Result<()> {
        self.run(|c| {
            // An item of an expansion before the last (no longer linked: `item` NULL) that comes
            // back runs again, with a fresh retry round.
            let mut upsert = c.prepare_cached(
                "INSERT INTO tasks (op_id, task_no, step, name, item, status) VALUES (?1, ?2, ?3, ?4, ?5, 'pending') \
                 ON CONFLICT (op_id, task_no) DO UPDATE SET item = excluded.item, \
                 status = CASE WHEN item IS NULL THEN 'pending' ELSE status END, \
                 outputs = CASE WHEN item IS NULL THEN NULL ELSE outputs END, \
                 error = CASE WHEN item IS NULL THEN NULL ELSE error END, \
                 ended_at = CASE WHEN item IS NULL THEN NULL ELSE ended_at END, \
                 retry_from = CASE WHEN item IS NULL THEN attempts ELSE retry_from END",
            )?;
            for t in tasks {
                upsert.execute(params![
                    op.0,
                    t.task_no.0,
                    t.step,
                    t.name,
                    t.item.as_ref().map(ToString::to_string)
                ])?;
            }
            Ok(())
        })
    }

    fn has_items(&mut self, op: OpId, task: TaskNo) -> Result<bool> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE op_id = ?1 AND name != step \
                 AND step = (SELECT step FROM tasks WHERE op_id = ?1 AND task_no = ?2))",
            )?
            .query_row(params![op.0, task.0], |r| r.get(0))
        })
    }

    fn drop_other_items(&mut self, op: OpId, task: TaskNo, numbers: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET item = NULL, \
                 status = CASE WHEN status = 'pending' THEN 'skipped' ELSE status END, \
                 error = CASE WHEN status = 'pending' THEN 'no longer in the fan-out list' ELSE error END \
                 WHERE op_id = ?1 AND step = (SELECT step FROM tasks WHERE op_id = ?1 AND task_no = ?2) \
                 AND name != step AND item IS NOT NULL AND task_no NOT IN (SELECT value FROM json_each(?3))",
            )?
            .execute(params![op.0, task.0, numbers])?;
            Ok(())
        })
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
        self.run(|c| {
            c.prepare_cached(
                "UPDATE tasks SET status = ?3, ended_at = ?4, error = ?5, outputs = ?6 \
                 WHERE op_id = ?1 AND task_no = ?2 RETURNING name",
            )?
            .query_row(
                params![op.0, task.0, status.as_str(), ended, error, outputs],
                |r| r.get(0),
            )
        })
    }

    fn detach_child(&mut self, op: OpId, task: TaskNo) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE ops SET parent_task = NULL WHERE parent_id = ?1 AND parent_task = ?2",
            )?
            .execute(params![op.0, task.0])?;
            Ok(())
        })
    }

    fn lock_key(&mut self, op: OpId) -> Result<Option<Option<String>>> {
        self.run(|c| {
            c.prepare_cached("SELECT lock_key FROM ops WHERE id = ?1")?
                .query_row([op.0], |r| r.get(0))
                .optional()
        })
    }

    fn lock_holder(&mut self, key: &str) -> Result<Option<OpId>> {
        self.run(|c| {
            c.prepare_cached("SELECT op_id FROM locks WHERE key = ?1")?
                .query_row([key], |r| r.get(0).map(OpId))
                .optional()
        })
    }

    fn cooldown(&mut self, key: &str, at: Millis) -> Result<Option<(OpId, Millis)>> {
        self.run(|c| {
            c.prepare_cached(
                "SELECT op_id, until FROM cooldowns WHERE key = ?1 AND until > ?2 AND acked_at IS NULL",
            )?
            .query_row(params![key, at], |r| Ok((OpId(r.get(0)?), r.get(1)?)))
            .optional()
        })
    }

    fn insert_lock(&mut self, key: &str, op: OpId, at: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("INSERT INTO locks (key, op_id, since) VALUES (?1, ?2, ?3)")?
                .execute(params![key, op.0, at])?;
            Ok(())
        })
    }

    fn delete_cooldown(&mut self, key: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("DELETE FROM cooldowns WHERE key = ?1")?
                .execute([key])?;
            Ok(())
        })
    }

    fn held_lock(&mut self, op: OpId) -> Result<Option<(String, Option<i64>)>> {
        self.run(|c| {
            c.prepare_cached("SELECT l.key, o.cooldown_ms FROM locks l JOIN ops o ON o.id = l.op_id WHERE l.op_id = ?1")?
                .query_row([op.0], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
    }

    fn delete_lock(&mut self, key: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("DELETE FROM locks WHERE key = ?1")?
                .execute([key])?;
            Ok(())
        })
    }

    fn start_cooldown(&mut self, key: &str, op: OpId, until: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT OR REPLACE INTO cooldowns (key, op_id, until) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![key, op.0, until])?;
            Ok(())
        })
    }

    fn ack_cooldown(&mut self, key: &str, request: &Request) -> Result<Option<OpId>> {
        self.run(|c| {
            c.prepare_cached(
                "UPDATE cooldowns SET acked_by = ?2, acked_at = ?3 WHERE key = ?1 RETURNING op_id",
            )?
            .query_row(params![key, request.by, request.at], |r| r.get(0).map(OpId))
            .optional()
        })
    }

    fn set_paused(&mut self, setting: &str, pause: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)")?
                .execute([setting, pause])?;
            Ok(())
        })
    }

    fn clear_paused(&mut self, setting: &str) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("DELETE FROM settings WHERE key = ?1")?
                .execute([setting])?;
            Ok(())
        })
    }

    fn add_token(&mut self, token: &TokenRow) -> Result<bool> {
        self.run(|c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO tokens (name, role, hash, created_at, created_by) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                )?
                .execute(params![
                    token.name,
                    token.role,
                    token.hash,
                    token.created_at,
                    token.created_by
                ])?;
            Ok(added != 0)
        })
    }

    fn delete_token(&mut self, name: &str) -> Result<bool> {
        self.run(|c| {
            let removed = c
                .prepare_cached("DELETE FROM tokens WHERE name = ?1")?
                .execute([name])?;
            Ok(removed != 0)
        })
    }

    fn add_schedule(&mut self, new: &NewSchedule) -> Result<bool> {
        self.run(|c| {
            let added = c
                .prepare_cached(
                    "INSERT INTO schedules (name, plan, params, cron, timezone, catch_up, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
                )?
                .execute(params![
                    new.name,
                    new.plan,
                    serde_json::Value::Object(new.params.clone()).to_string(),
                    new.cron,
                    new.timezone,
                    new.catch_up,
                    new.created_at
                ])?;
            Ok(added != 0)
        })
    }

    fn remove_schedule(&mut self, name: &str) -> Result<bool> {
        self.run(|c| {
            let removed = c
                .prepare_cached("DELETE FROM schedules WHERE name = ?1")?
                .execute([name])?;
            Ok(removed != 0)
        })
    }

    fn pause_schedule(&mut self, name: &str, paused: bool) -> Result<bool> {
        self.run(|c| {
            let changed = c
                .prepare_cached("UPDATE schedules SET paused = ?2 WHERE name = ?1")?
                .execute(params![name, paused])?;
            Ok(changed != 0)
        })
    }

    fn fire_schedule(
        &mut self,
        name: &str,
        due: Millis,
        op: Option<OpId>,
        note: &str,
    ) -> Result<bool> {
        self.run(|c| {
            let fired = match op {
                Some(op) => c
                    .prepare_cached(
                        "UPDATE schedules SET last_fire = ?2, last_op = ?3, note = ?4 \
                         WHERE name = ?1 AND (last_fire IS NULL OR last_fire < ?2)",
                    )?
                    .execute(params![name, due, op.0, note])?,
                // Without an op, the last op stays the one the schedule last submitted.
                None => c
                    .prepare_cached(
                        "UPDATE schedules SET last_fire = ?2, note = ?3 \
                         WHERE name = ?1 AND (last_fire IS NULL OR last_fire < ?2)",
                    )?
                    .execute(params![name, due, note])?,
            };
            Ok(fired != 0)
        })
    }

    fn note_schedule(&mut self, name: &str, due: Millis, note: &str) -> Result<bool> {
        self.run(|c| {
            let noted = c
                .prepare_cached(
                    "UPDATE schedules SET note = ?3 \
                     WHERE name = ?1 AND (last_fire IS NULL OR last_fire < ?2)",
                )?
                .execute(params![name, due, note])?;
            Ok(noted != 0)
        })
    }

    fn beat_node(
        &mut self,
        node: &ProcessId,
        workers: u32,
        started_at: Millis,
        at: Millis,
        lease_until: Millis,
    ) -> Result<()> {
        self.run(|c| {
            c.prepare_cached(
                "INSERT INTO nodes (host, boot_id, pid, start, workers, started_at, heartbeat_at, lease_until) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (boot_id, pid, start) DO UPDATE SET workers = ?5, heartbeat_at = ?7, lease_until = ?8",
            )?
            .execute(params![
                node.host,
                node.boot_id,
                node.pid,
                node.start as i64,
                workers,
                started_at,
                at,
                lease_until
            ])?;
            Ok(())
        })
    }

    fn delete_node(&mut self, node: &ProcessId) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("DELETE FROM nodes WHERE boot_id = ?1 AND pid = ?2 AND start = ?3")?
                .execute(params![node.boot_id, node.pid, node.start as i64])?;
            Ok(())
        })
    }

    fn prune_nodes(&mut self, before: Millis) -> Result<()> {
        self.run(|c| {
            c.prepare_cached("DELETE FROM nodes WHERE lease_until < ?1")?
                .execute([before])?;
            Ok(())
        })
    }

    fn lock_unowned(&mut self, candidates: &[OpId], now: Millis, limit: u32) -> Result<Vec<OpId>> {
        // One writer at a time holds a SQLite database: nothing to pass over.
        let mut sorted = candidates.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        self.run(|c| {
            let mut check = c.prepare_cached(
                "SELECT 1 FROM ops WHERE id = ?1 AND status = 'queued' AND started_at IS NULL \
                 AND (owner_pid IS NULL OR lease_until < ?2)",
            )?;
            let mut taken = Vec::new();
            for op in sorted {
                if taken.len() >= limit as usize {
                    break;
                }
                if check.exists(params![op.0, now])? {
                    taken.push(op);
                }
            }
            Ok(taken)
        })
    }

    fn append_events(
        &mut self,
        op: OpId,
        at: Millis,
        task: Option<&str>,
        events: &[(&str, &str)],
    ) -> Result<()> {
        self.run(|c| {
            let first: i64 = c
                .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE op_id = ?1")?
                .query_row([op.0], |r| r.get(0))?;
            let mut insert = c.prepare_cached(
                "INSERT INTO events (op_id, seq, at, kind, task, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (seq, (kind, message)) in (first..).zip(events) {
                insert.execute(params![op.0, seq, at, kind, task, message])?;
            }
            Ok(())
        })?;
        if self.moved != Some(op) {
            self.run(|c| {
                c.prepare_cached("INSERT INTO moves (op_id) VALUES (?1)")?
                    .execute([op.0])?;
                let tick = c.last_insert_rowid();
                if tick % MOVES_PRUNED_EVERY == 0 {
                    c.prepare_cached("DELETE FROM moves WHERE tick <= ?1")?
                        .execute([tick - MOVES_KEPT])?;
                }
                Ok(())
            })?;
            self.moved = Some(op);
        }
        Ok(())
    }
}

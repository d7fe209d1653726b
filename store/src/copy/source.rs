//! The SQLite side of a copy: the source, read in one read transaction from the first read to the
//! last, so that everything copied is one moment of it; at the end, refused if another process
//! committed to it meanwhile.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use super::Judge;
use crate::error::{Error, Result};
use crate::sqlite::{self, Reads, classify};
use crate::types::{OpFilter, OpId, OpStatus};

/// The statuses of an op that a live owner may still be changing.
const ACTIVE: [OpStatus; 4] = [
    OpStatus::Queued,
    OpStatus::Running,
    OpStatus::Waiting,
    OpStatus::Canceling,
];

/// A table of the source and its columns, in the order `sqlite_schema` has them.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) name: String,
    pub(super) columns: Vec<String>,
}

/// The source database, its read transaction open.
pub(super) struct Source {
    conn: Connection,
    path: PathBuf,
    /// `PRAGMA data_version` when the transaction began: another process's commit changes it.
    version: i64,
}

impl Source {
    /// Opens the database at `path` read-only and begins the read transaction every read of the
    /// copy shares.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let conn = sqlite::open_reader(path, false)?.ok_or_else(|| Error::Unusable {
            path: path.to_path_buf(),
            reason: "there is no database there".to_owned(),
        })?;
        conn.execute_batch("BEGIN")
            .map_err(|e| classify(path, &e))?;
        // The first read: the transaction's snapshot is taken here.
        let version = data_version(&conn).map_err(|e| classify(path, &e))?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            version,
        })
    }

    fn err(&self, e: &rusqlite::Error) -> Error {
        classify(&self.path, e)
    }

    fn reads(&self) -> Reads<'_> {
        Reads {
            conn: &self.conn,
            path: &self.path,
        }
    }

    /// Refuses a source that a live process still uses: an op whose owner lives (running,
    /// waiting, canceling, or queued and held), a `cairn serve` node that lives. Ops whose owner
    /// is gone are copied as they are.
    pub(super) fn refuse_live(&self, judge: &dyn Judge) -> Result<()> {
        let mut live = Vec::new();
        for status in ACTIVE {
            let filter = OpFilter {
                status: Some(status),
                ..OpFilter::default()
            };
            for op in self.reads().list_ops(&filter)?.iter().rev() {
                if let Some(owner) = op.owner.as_ref().filter(|o| judge.alive(o, op.lease_until)) {
                    live.push(format!(
                        "op {} ({}, `{}`) is {}, owned by {owner}, which is alive",
                        op.id, op.plan, op.title, status
                    ));
                }
            }
        }
        for node in self.reads().nodes()? {
            if judge.alive(&node.id, Some(node.lease_until)) {
                live.push(format!("`cairn serve` ({}) serves it", node.id));
            }
        }
        if live.is_empty() {
            return Ok(());
        }
        let mut reason = format!("it is in use: {}.", live.join("; "));
        write!(
            reason,
            " Stop them first (let an op end, or `cairn cancel OP`; stop a `cairn serve` with SIGTERM), then copy again; nothing was copied"
        )
        .ok();
        Err(Error::Unusable {
            path: self.path.clone(),
            reason,
        })
    }

    /// The tables and their columns, from `sqlite_schema` (SQLite's own tables left out).
    pub(super) fn tables(&self) -> Result<Vec<Table>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid",
            )
            .map_err(|e| self.err(&e))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
            .map_err(|e| self.err(&e))?;
        let mut columns = self
            .conn
            .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
            .map_err(|e| self.err(&e))?;
        names
            .into_iter()
            .map(|name| {
                let found = columns
                    .query_map([&name], |r| r.get::<_, String>(0))
                    .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                    .map_err(|e| self.err(&e))?;
                Ok(Table {
                    name,
                    columns: found,
                })
            })
            .collect()
    }

    /// Whether an op's params hold a sealed secret.
    pub(super) fn holds_sealed(&self, judge: &dyn Judge) -> Result<bool> {
        let mut stmt = self
            .conn
            .prepare("SELECT params FROM ops")
            .map_err(|e| self.err(&e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(&e))?;
        while let Some(row) = rows.next().map_err(|e| self.err(&e))? {
            let text: String = row.get(0).map_err(|e| self.err(&e))?;
            let params: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&text).unwrap_or_default();
            if params.values().any(|v| judge.sealed(v)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The highest op id, and the id SQLite would have given next when that is past it (the ids
    /// `cairn db recover` skipped).
    pub(super) fn skipped_ids(&self) -> Result<Option<(OpId, OpId)>> {
        let (highest, seq): (i64, i64) = self
            .conn
            .query_row(
                "SELECT coalesce((SELECT max(id) FROM ops), 0), \
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ops'), 0)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(&e))?;
        Ok((seq > highest).then_some((OpId(highest), OpId(seq + 1))))
    }

    /// Calls `each` with the values of every row of `table`: its `columns`, in that order.
    pub(super) fn rows(
        &self,
        table: &str,
        columns: &[&str],
        mut each: impl FnMut(&[ValueRef<'_>]) -> Result<()>,
    ) -> Result<()> {
        let list: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let sql = format!("SELECT {} FROM {}", list.join(", "), quote(table));
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(&e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(&e))?;
        while let Some(row) = rows.next().map_err(|e| self.err(&e))? {
            let values = (0..columns.len())
                .map(|i| row.get_ref(i))
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.err(&e))?;
            each(&values)?;
        }
        Ok(())
    }

    /// Ends the read transaction; refused if another process committed to the database since it
    /// began (then what was read is no longer all of it).
    pub(super) fn finish(self) -> Result<()> {
        self.conn
            .execute_batch("COMMIT")
            .map_err(|e| self.err(&e))?;
        let now = data_version(&self.conn).map_err(|e| self.err(&e))?;
        if now == self.version {
            return Ok(());
        }
        Err(Error::Unusable {
            path: self.path,
            reason: "another process wrote to it while it was being copied (a `cairn` started meanwhile?); nothing was copied: stop every cairn that uses it, then copy again".to_owned(),
        })
    }
}

/// SQLite's count of commits by other connections, as this one has seen them.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}

/// `name` as an SQL identifier, quoted (the same syntax on SQLite and PostgreSQL).
pub(super) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

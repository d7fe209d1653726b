//! Reads on PostgreSQL: a placeholder that refuses every read, until the reader pool lands here
//! (reader threads over a small pool of connections, the same rows as SQLite's reads).

use std::path::PathBuf;

use crate::api::ReadBackend;
use crate::error::{Error, Result};
use crate::location::Location;
use crate::types::{
    AttemptRow, CooldownRow, EventRow, LockRow, LogChunk, Millis, OpFilter, OpId, OpRow, Request,
    ScheduleRow, Snapshot, TaskNo, TaskRow,
};

/// The reads of a PostgreSQL database.
#[derive(Debug, Clone)]
pub(crate) struct PgReader {
    location: Location,
}

impl PgReader {
    #[allow(
        clippy::needless_pass_by_value,
        reason = "the constructor's signature the reader pool keeps"
    )]
    pub(crate) fn new(config: postgres::Config, location: Location) -> Self {
        let _ = config;
        Self { location }
    }

    fn refuse<T>(&self) -> Result<T> {
        Err(Error::Unusable {
            path: PathBuf::from(self.location.as_path()),
            reason: "reading a PostgreSQL database is not supported yet".to_owned(),
        })
    }
}

impl ReadBackend for PgReader {
    fn list_ops(&self, _filter: &OpFilter) -> Result<Vec<OpRow>> {
        self.refuse()
    }
    fn op(&self, _op: OpId) -> Result<OpRow> {
        self.refuse()
    }
    fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        self.refuse()
    }
    fn child(&self, _op: OpId, _task: TaskNo) -> Result<Option<OpRow>> {
        self.refuse()
    }
    fn children(&self, _op: OpId) -> Result<Vec<OpRow>> {
        self.refuse()
    }
    fn tasks(&self, _op: OpId) -> Result<Vec<TaskRow>> {
        self.refuse()
    }
    fn task(&self, _op: OpId, _task: TaskNo) -> Result<TaskRow> {
        self.refuse()
    }
    fn attempts(&self, _op: OpId) -> Result<Vec<AttemptRow>> {
        self.refuse()
    }
    fn events(&self, _op: OpId) -> Result<Vec<EventRow>> {
        self.refuse()
    }
    fn logs(
        &self,
        _op: OpId,
        _task: Option<TaskNo>,
        _after: Option<(TaskNo, u32, i64)>,
    ) -> Result<Vec<LogChunk>> {
        self.refuse()
    }
    fn snapshot(&self, _op: OpId) -> Result<Snapshot> {
        self.refuse()
    }
    fn locks(&self) -> Result<Vec<LockRow>> {
        self.refuse()
    }
    fn cooldowns(&self, _now: Millis) -> Result<Vec<CooldownRow>> {
        self.refuse()
    }
    fn paused(&self) -> Result<Option<Request>> {
        self.refuse()
    }
}

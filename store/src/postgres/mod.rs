//! The PostgreSQL backend.
//!
//! - [`reads`]: `PgReader`, the [`ReadBackend`](crate::ReadBackend) over a small pool of reader
//!   threads, each with its own connection.

// Nothing opens a `PgReader` yet outside its tests: `crate::open_reader` picks it once the
// backend's writer is in.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod reads;

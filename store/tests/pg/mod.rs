//! A PostgreSQL database of a test's own on the server at 127.0.0.1:5432 (trust auth, user
//! `postgres`), made fresh and dropped (with any connection left to it) when the test is done.

use std::sync::atomic::{AtomicU32, Ordering};

use postgres::{Client, NoTls};
use store::{Location, Store};

/// The server, as `postgres`, in its database `test`.
const ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

pub struct Db {
    pub name: String,
}

impl Db {
    /// A new, empty database named `<prefix>_<pid>_<n>`.
    pub fn new(prefix: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        admin(&format!("CREATE DATABASE {name}"));
        Self { name }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.name)
    }

    pub fn location(&self) -> Location {
        Location::parse(&self.url())
    }

    /// The store on it, opened for writing.
    pub fn open(&self) -> Store {
        store::open(&self.location()).unwrap()
    }

    /// A connection of the test's own to this database.
    pub fn connect(&self) -> Client {
        Client::connect(
            &format!(
                "host=127.0.0.1 port=5432 user=postgres dbname={}",
                self.name
            ),
            NoTls,
        )
        .unwrap()
    }

    /// The one number `query` answers, read on a connection of the test's own.
    pub fn count(&self, query: &str) -> i64 {
        self.connect().query_one(query, &[]).unwrap().get(0)
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `sql` as the server's admin, on a thread of its own: the synchronous client must not run
/// on a thread that drives a runtime.
fn admin(sql: &str) {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        Client::connect(ADMIN, NoTls)
            .unwrap()
            .batch_execute(&sql)
            .unwrap();
    })
    .join()
    .unwrap();
}

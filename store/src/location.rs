//! Where a store is, and opening it: [`Location::parse`] reads what the user gave (a file path,
//! or a server's URL), and [`open`] / [`open_reader`] pick the backend for it.

use std::path::{Path, PathBuf};

use crate::api::{Reader, Store};
use crate::error::Result;
use crate::{postgres, sqlite};

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL server: its URL (`postgres://` or `postgresql://`), and the same with its
    /// password hidden, for messages.
    Postgres { url: String, shown: String },
}

impl Location {
    /// A `postgres://` or `postgresql://` URL is a PostgreSQL server; anything else is the path
    /// of a SQLite database file.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Self::Postgres {
                url: text.to_owned(),
                shown: hide_password(text),
            }
        } else {
            Self::Sqlite(PathBuf::from(text))
        }
    }

    /// The schema version this cairn reads and writes in a store of this kind (a store it opened
    /// for writing is at it).
    #[must_use]
    pub fn schema_version(&self) -> i64 {
        match self {
            Self::Sqlite(_) => i64::from(sqlite::SCHEMA_VERSION),
            Self::Postgres { .. } => postgres::SCHEMA_VERSION,
        }
    }

    /// Whether processes on other machines may share this store: then only an owner's lease
    /// tells whether it lives, even on its own machine (a process stopped past its lease has lost
    /// its ops). A SQLite file is one machine's.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    /// A server's URL with its password left out (`user@host`), for a setting people copy
    /// (`CAIRN_DB`), and whether there was one to leave out; a database file's path as it is.
    #[must_use]
    pub fn without_password(&self) -> (String, bool) {
        match self {
            Self::Sqlite(path) => (path.display().to_string(), false),
            Self::Postgres { url, .. } => {
                let bare = replace_password(url, None);
                let had = bare != *url;
                (bare, had)
            }
        }
    }

    /// The database file, or a server's URL without its password (as a path, for messages).
    #[must_use]
    pub fn as_path(&self) -> &Path {
        match self {
            Self::Sqlite(path) => path,
            Self::Postgres { shown, .. } => Path::new(shown),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => path.display().fmt(f),
            Self::Postgres { shown, .. } => f.write_str(shown),
        }
    }
}

/// Opens the store at `location` for writing: a SQLite file is created if needed, private to
/// the user; a PostgreSQL database gets cairn's schema on first use (the database itself must
/// exist).
pub fn open(location: &Location) -> Result<Store> {
    match location {
        Location::Sqlite(path) => Ok(Store::from_backend(sqlite::SqliteStore::open(path)?)),
        Location::Postgres { .. } => Ok(Store::from_backend(postgres::PgStore::open(location)?)),
    }
}

/// Opens the store at `location` for reading; `None` when there is nothing to read yet (no file,
/// or a database without cairn's schema yet). Never writes.
pub fn open_reader(location: &Location) -> Result<Option<Reader>> {
    match location {
        Location::Sqlite(path) => Ok(sqlite::SqliteReader::open(path)?.map(Reader::from_backend)),
        Location::Postgres { .. } => postgres::open_reader(location),
    }
}

/// The URL with every password in it replaced by `***`: the user's (`user:password@`, up to the
/// last `@` before the query, so a password holding `/` or `@` is hidden whole) and any
/// `password=` parameter of the query.
fn hide_password(url: &str) -> String {
    replace_password(url, Some("***"))
}

/// The URL with every password in it (the user's, a `password=` parameter) replaced by `with`,
/// or left out (`user@`, the parameter dropped) when `None`.
fn replace_password(url: &str, with: Option<&str>) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (before_query, query) = rest
        .split_once('?')
        .map_or((rest, None), |(b, q)| (b, Some(q)));
    let shown = match before_query.rsplit_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split_once(':').map_or(user, |(name, _)| name);
            match with {
                Some(password) => format!("{name}:{password}@{host}"),
                None => format!("{name}@{host}"),
            }
        }
        _ => before_query.to_owned(),
    };
    let Some(query) = query else {
        return format!("{scheme}://{shown}");
    };
    let query: Vec<String> = query
        .split('&')
        .filter_map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                with.map(|password| format!("{key}={password}"))
            }
            _ => Some(pair.to_owned()),
        })
        .collect();
    if query.is_empty() {
        return format!("{scheme}://{shown}");
    }
    format!("{scheme}://{shown}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_url_is_hidden() {
        assert_eq!(
            hide_password("postgres://me:secret@db:5432/cairn?x=1"),
            "postgres://me:***@db:5432/cairn?x=1"
        );
        assert_eq!(hide_password("postgres://db/cairn"), "postgres://db/cairn");
        assert_eq!(hide_password("postgres://me@db/c"), "postgres://me@db/c");
        assert_eq!(
            hide_password("postgres://me:hun/ter@2@db/c"),
            "postgres://me:***@db/c"
        );
        assert_eq!(
            hide_password("postgres://me@db/c?sslmode=disable&password=hunter2&x=y"),
            "postgres://me@db/c?sslmode=disable&password=***&x=y"
        );
    }

    #[test]
    fn a_url_without_its_password_keeps_everything_else() {
        let with = Location::parse("postgres://me:secret@db:5432/cairn?x=1");
        assert_eq!(
            with.without_password(),
            ("postgres://me@db:5432/cairn?x=1".to_owned(), true)
        );
        let without = Location::parse("postgres://me@db/cairn");
        assert_eq!(
            without.without_password(),
            ("postgres://me@db/cairn".to_owned(), false)
        );
    }
}

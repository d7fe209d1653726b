//! The PostgreSQL backend: a server that several cairn processes (on several machines) share.
//!
//! The clients run their own small runtimes and block on them, which must never happen on
//! a thread that drives async tasks (the engine calls the store from tokio workers). So every
//! connection belongs to a thread this backend owns, and callers only send it work:
//!
//! - this file: reading the URL (with libpq's `PG*` variables for what it leaves out), connecting,
//!   and failures to connect in the store's words.
//! - [`migrations`]: the schema, `store/migrations/postgres/*.sql`, run once each.
//! - [`writer`]: [`PgStore`], the [`Backend`](crate::Backend): the writer thread, group commit,
//!   SERIALIZABLE transactions run again on conflict, reconnecting, commit tokens, `NOTIFY`.
//! - [`tx`]: the rules' transaction ([`crate::rules::Tx`]) in SQL.
//! - [`pipe`]: the writer's connection, which sends what nothing reads without waiting for it.
//! - [`listen`]: the listener thread (`LISTEN cairn`) behind `wait_for_change`.
//! - [`reads`]: `PgReader`, the [`ReadBackend`](crate::ReadBackend), over reader threads.

mod listen;
mod migrations;
mod pipe;
mod reads;
mod tx;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, NoTls};
use tokio_postgres::Config;
use tokio_postgres::config::{Host, SslMode};

use crate::api::Reader;
use crate::error::{Error, Result};
use crate::location::Location;
pub(crate) use migrations::SCHEMA_VERSION;
pub(crate) use reads::PgReader;
pub(crate) use tx::describe;
pub(crate) use writer::{PgStore, secret_key_file};

/// How long sent data may stay unacknowledged before the connection counts as broken.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one attempt to reach the server may take, unless the URL says (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The session setting every connection starts with (see [`Target::new`]).
const NO_JIT: &str = "-c jit=off";

/// Where and as whom to connect: the client's settings, and what they resolve to, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The settings for the blocking client (the readers, the listener, migrations).
    pub(crate) config: postgres::Config,
    /// The same settings, for the writer's pipelined connection ([`pipe::Pipe`]).
    pipe_config: Config,
    pub(crate) location: Location,
    host: String,
    port: u16,
    dbname: String,
    user: String,
}

impl Target {
    /// Reads a `postgres://` location. What the URL leaves out comes from libpq's variables
    /// (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`), then libpq's defaults: host
    /// `localhost`, port 5432, the OS user, a database named as the user.
    pub(crate) fn new(location: &Location) -> Result<Self> {
        let Location::Postgres { url, .. } = location else {
            return Err(Error::Unusable {
                path: location.as_path().to_path_buf(),
                reason: "it is not a PostgreSQL URL".to_owned(),
            });
        };
        let unusable = |reason: String| Error::Unusable {
            path: location.as_path().to_path_buf(),
            reason,
        };
        // The scheme is read in any case, as `Location::parse` does; the client wants it lowercase.
        let url = match url.split_once("://") {
            Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
            None => url.clone(),
        };
        let tls = "it asks for TLS (`sslmode` require, verify-ca or verify-full, in the URL or PGSSLMODE), which cairn does not support yet";
        if url.contains("sslmode=verify-") {
            // The client cannot even read these modes.
            return Err(unusable(tls.to_owned()));
        }
        let mut config =
            Config::from_str(&url).map_err(|e| unusable(format!("its URL cannot be read: {e}")))?;
        // libpq's PGSSLMODE applies when the URL does not say.
        let asked = if url.contains("sslmode=") {
            config.get_ssl_mode()
        } else {
            match std::env::var("PGSSLMODE").ok().as_deref() {
                Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
                _ => config.get_ssl_mode(),
            }
        };
        if asked == SslMode::Require {
            return Err(unusable(tls.to_owned()));
        }
        // Without TLS support, `prefer` means plain connections: say so to the server at once.
        config.ssl_mode(SslMode::Disable);
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if config.get_hosts().is_empty() {
            config.host(var("PGHOST").unwrap_or_else(|| "localhost".to_owned()));
        }
        if config.get_ports().is_empty() {
            let port = match var("PGPORT") {
                Some(p) => p
                    .parse::<u16>()
                    .map_err(|_| unusable(format!("PGPORT `{p}` is not a port number")))?,
                None => 5432,
            };
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = var("PGUSER")
                .or_else(os_user)
                .ok_or_else(|| unusable("no user: name one in the URL or in PGUSER".to_owned()))?;
            config.user(&user);
        }
        if config.get_password().is_none()
            && let Some(password) = var("PGPASSWORD")
        {
            config.password(password);
        }
        let user = config.get_user().unwrap_or_default().to_owned();
        if config.get_dbname().is_none() {
            config.dbname(var("PGDATABASE").unwrap_or_else(|| user.clone()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A connection whose other end vanished (a network cut, a host lost) is found broken
        // within seconds, not after the kernel's fifteen minutes of retries, unless the URL says.
        if !url.contains("keepalives") {
            config
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(5))
                .keepalives_interval(Duration::from_secs(2))
                .keepalives_retries(3);
        }
        if !url.contains("tcp_user_timeout") {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        config.application_name("cairn");
        // No JIT: the server compiles a statement whose planned cost passes `jit_above_cost`,
        // tens of milliseconds at every run of it, and cairn's statements find their rows by
        // key. The URL's own `options` come after, so that they decide.
        let options = config
            .get_options()
            .map_or_else(|| NO_JIT.to_owned(), |own| format!("{NO_JIT} {own}"));
        config.options(&options);
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        if config.get_password().is_none() {
            // As libpq: a socket directory is `localhost` in the password file.
            let named = if host.starts_with('/') {
                "localhost"
            } else {
                &host
            };
            let dbname = config.get_dbname().unwrap_or_default();
            if let Some(password) = password_file()
                .and_then(|file| password_in(&file, [named, &port.to_string(), dbname, &user]))
            {
                config.password(password);
            }
        }
        Ok(Self {
            host,
            port,
            dbname: config.get_dbname().unwrap_or_default().to_owned(),
            user,
            config: postgres::Config::from(config.clone()),
            pipe_config: config,
            location: location.clone(),
        })
    }

    /// Where this is, for messages: host, port, database and user, never the password.
    pub(crate) fn server(&self) -> String {
        format!(
            "{}:{}, database `{}`, user `{}`",
            self.host, self.port, self.dbname, self.user
        )
    }

    /// A failure to use the database (nothing was changed), naming the server.
    pub(crate) fn unusable(&self, reason: &str) -> Error {
        Error::Unusable {
            path: self.location.as_path().to_path_buf(),
            reason: format!("{} ({})", reason, self.server()),
        }
    }

    /// A new connection, its failure told in the store's words ([`Target::connect_failure`]).
    pub(crate) fn connect(&self) -> Result<Client> {
        self.config
            .connect(NoTls)
            .map_err(|e| self.unusable(&self.connect_failure(&e)))
    }

    /// A new connection for the writer, which can send statements without waiting for their
    /// answers; its failure told as [`Target::connect`]'s.
    fn connect_pipe(&self) -> Result<pipe::Pipe> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.unusable(&format!("cannot start its connection's runtime: {e}")))?;
        pipe::Pipe::connect(runtime, &self.pipe_config)
            .map_err(|e| self.unusable(&self.connect_failure(&e)))
    }

    /// Why a connection could not be made, in words a person can act on.
    pub(crate) fn connect_failure(&self, err: &postgres::Error) -> String {
        if let Some(db) = err.as_db_error() {
            return match db.code().code() {
                "28P01" => format!(
                    "the server refused the login of user `{}` (wrong password)",
                    self.user
                ),
                "28000" => format!(
                    "the server refused the login of user `{}`: {}",
                    self.user,
                    db.message()
                ),
                "3D000" => format!("the server has no database `{}`", self.dbname),
                _ => format!("cannot connect: {}", db.message()),
            };
        }
        let io = std::error::Error::source(err)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(|e| (e.kind(), e.to_string()));
        match io {
            Some((std::io::ErrorKind::ConnectionRefused, _)) => {
                "the connection was refused (is the server running, on this port?)".to_owned()
            }
            Some((std::io::ErrorKind::TimedOut, _)) => {
                "the server did not answer in time".to_owned()
            }
            Some((_, text)) if text.contains("lookup") || text.contains("Name or service") => {
                format!("no such host `{}` ({text})", self.host)
            }
            Some((_, text)) => format!("cannot connect: {text}"),
            None => format!("cannot connect: {err}"),
        }
    }
}

/// libpq's password file: `PGPASSFILE`, else `~/.pgpass`; like libpq, not one that group or
/// others may read or write.
fn password_file() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let file = var("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".pgpass")))?;
    let meta = std::fs::metadata(&file).ok()?;
    let others = meta.permissions().mode() & 0o077;
    (meta.is_file() && others == 0).then_some(file)
}

/// The password of the first line of a password file (`host:port:database:user:password`, `*`
/// matching anything, `\:` and `\\` escaped) that matches `wanted`.
fn password_in(file: &Path, wanted: [&str; 4]) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_escaped(line);
            let [host, port, db, user, password] = fields.as_slice() else {
                return None;
            };
            let matches = [host, port, db, user]
                .iter()
                .zip(wanted)
                .all(|(field, want)| field.as_str() == "*" || field.as_str() == want);
            matches.then(|| password.clone())
        })
}

/// A password file's line split at its unescaped colons, escapes removed.
fn split_escaped(line: &str) -> Vec<String> {
    let (mut fields, mut field) = (Vec::new(), String::new());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// The name of the user running this process, as libpq defaults to.
fn os_user() -> Option<String> {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
}

/// Opens the database for reading: `None` when it holds nothing yet (no cairn schema, no table);
/// refused when it is not cairn's, is newer than this cairn, or older (a command that writes
/// upgrades it). Never writes.
pub(crate) fn open_reader(location: &Location) -> Result<Option<Reader>> {
    let target = Target::new(location)?;
    let mut client = target.connect()?;
    let unusable = |reason: String| target.unusable(&reason);
    let describe = |e: &postgres::Error| target.unusable(&tx::describe(e));
    let found = migrations::identify(&mut client, &unusable, &describe)?;
    drop(client);
    match found {
        migrations::Found::Empty => Ok(None),
        migrations::Found::Cairn(version) if version < SCHEMA_VERSION => Err(target.unusable(
            &format!(
                "its schema (version {version}) is older than this cairn's ({SCHEMA_VERSION}); run any command that writes (e.g. `cairn run`) to upgrade it"
            ),
        )),
        migrations::Found::Cairn(_) => Ok(Some(Reader::from_backend(PgReader::new(
            target.config.clone(),
            location.clone(),
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_is_read_as_libpq_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\n\
             db.internal:5432:other:cairn:no\n\
             db.internal:5432:*:cairn:pa\\:ss\\\\w\n\
             *:*:*:*:fallback\n",
        )
        .unwrap();
        let find = |host, port, db, user| password_in(&file, [host, port, db, user]);
        assert_eq!(
            find("db.internal", "5432", "cairn", "cairn").as_deref(),
            Some("pa:ss\\w")
        );
        assert_eq!(
            find("db.internal", "5432", "other", "cairn").as_deref(),
            Some("no")
        );
        assert_eq!(
            find("elsewhere", "5433", "x", "y").as_deref(),
            Some("fallback")
        );
        std::fs::write(&file, "h:1:d:u:p\nbroken:line\n").unwrap();
        assert_eq!(find("h", "2", "d", "u"), None);
    }
}

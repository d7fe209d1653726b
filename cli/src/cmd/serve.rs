//! `cairn serve`: the daemon that runs queued ops and resumes interrupted ones.

use std::sync::Arc;
use std::time::Duration;

use crate::cmd::run::RunArgs;
use crate::db::DbArgs;
use crate::exit::Failure;
use crate::output::Output;

/// Run queued ops and resume interrupted ones, up to `--workers` at once.
///
/// Starts queued ops oldest first, and resumes ops whose process died (or that a stop left
/// interrupted) when their plan allows it (`auto_resume`, on by default), and fires the cron
/// schedules (`cairn schedule`). Several `serve` processes may share one database: an op is only
/// ever run by one, and `cairn nodes` lists them. SIGTERM or Ctrl-C: no new step starts; running
/// steps get `--grace` to finish, then TERM, then KILL after `--grace`; the ops are recorded
/// interrupted and released, so that the next `serve` resumes them at once. Logs go to stderr:
/// each step's start and end; with `-q` only what failed (warnings), with `-v` debugging too
/// (`RUST_LOG` filters them instead; `--log-format json` for machines).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many ops run at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    workers: u16,
    /// Exit when nothing is left to do: no op to start or resume, none running.
    #[arg(long)]
    once: bool,
    /// How often to look for work.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    poll: Duration,
    /// Fire schedules by a clock that reads TIME when `serve` starts and runs SPEED times as fast
    /// as real time (`2026-11-22T02:00:30Z` or `2026-11-22T02:00:30Zx60`): for tests and drills.
    #[arg(long, value_name = "TIME[xSPEED]", hide = true, value_parser = clock)]
    schedule_clock: Option<(i64, f64)>,
    /// How long this process's lease lasts, on the ops it runs and on its own record (`cairn
    /// nodes`), renewed every sixth of it. Past it, a process that stopped renewing (killed,
    /// frozen, cut off from the database) has lost its ops, and another `serve` takes them over.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = lease_ttl)]
    lease_ttl: Duration,
    /// How log lines are written.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Also serve the HTTP API (`/api/v1`, JSON; every request needs a token from `cairn token
    /// create`) on ADDR, `127.0.0.1:7070` when none is given. Plain HTTP unless `--tls-cert` and
    /// `--tls-key`: then an address other than a loopback one is refused unless `--insecure-http`.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:7070")]
    http: Option<String>,
    /// Serve the HTTP API over TLS with this certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["http", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM), readable by its owner alone.
    #[arg(long, value_name = "FILE", requires_all = ["http", "tls_cert"])]
    tls_key: Option<std::path::PathBuf>,
    /// Serve the HTTP API in plain text on an address other than a loopback one: tokens then
    /// cross the network readable. Give `--tls-cert` and `--tls-key`, or put a TLS proxy in front.
    #[arg(long, requires = "http", conflicts_with = "tls_cert")]
    insecure_http: bool,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn clock(text: &str) -> Result<(i64, f64), String> {
    let (time, speed) = match text.rsplit_once('x') {
        Some((time, speed)) if speed.parse::<f64>().is_ok() => {
            (time, speed.parse::<f64>().unwrap_or(1.0))
        }
        _ => (text, 1.0),
    };
    Ok((engine::time::parse_rfc3339(time)?, speed))
}

fn duration(text: &str) -> Result<Duration, String> {
    plans::units::parse_duration(text)
}

/// A lease of at least a second: renewed every sixth of it, a shorter one would be lost to the
/// first slow commit.
fn lease_ttl(text: &str) -> Result<Duration, String> {
    let ttl = duration(text)?;
    if ttl < Duration::from_secs(1) {
        return Err(format!("`{text}` is too short for a lease: at least 1s"));
    }
    Ok(ttl)
}

/// The address `--http` names, refused when it is not a loopback one, served in plain text
/// (no `--tls-cert`), and `--insecure-http` was not given.
fn http_addr(text: &str, tls: bool, insecure: bool) -> anyhow::Result<std::net::SocketAddr> {
    let addr: std::net::SocketAddr = text.parse().map_err(|_| {
        anyhow::anyhow!("`--http {text}` is not an address: an IP and a port, `127.0.0.1:7070`")
    })?;
    if !addr.ip().is_loopback() && !tls && !insecure {
        anyhow::bail!(
            "`--http {addr}` is not a loopback address: in plain HTTP, tokens would cross the \
             network readable; give `--tls-cert FILE --tls-key FILE`, or serve on 127.0.0.1 \
             behind a TLS proxy, or give `--insecure-http` to do it anyway"
        );
    }
    Ok(addr)
}

/// Whether a progress event says something failed: an op that ended otherwise than succeeded, a
/// task that failed (in a child op too). Logged as warnings, which `-q` keeps.
fn failed(p: &engine::progress::Progress) -> bool {
    use engine::progress::Progress;
    match p {
        Progress::OpEnded { status, .. } => *status != store::OpStatus::Succeeded,
        Progress::TaskFailed { .. } => true,
        Progress::Child { event, .. } => failed(event),
        _ => false,
    }
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let http = args
        .http
        .as_deref()
        .map(|text| http_addr(text, args.tls_cert.is_some(), args.insecure_http))
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(web::tls::Tls {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    // `-q`: warnings only (an op or a step that failed, a store in trouble); `-v`: debug.
    // `RUST_LOG` overrides either.
    let level = if out.quiet {
        "warn"
    } else if out.verbose {
        "debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(out.color)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let store = args.db.store()?;
    let rule = args.db.rule()?;
    let config = engine::serve::Config {
        workers: usize::from(args.workers),
        once: args.once,
        options: args.run.options().with_lease(args.lease_ttl),
        poll: args.poll,
        schedule_clock: args.schedule_clock,
    };
    // Each op's progress, as log lines naming the op.
    let progress: Arc<dyn Fn(store::OpId) -> engine::progress::Sink + Send + Sync> =
        Arc::new(|op: store::OpId| -> engine::progress::Sink {
            Arc::new(move |p: &engine::progress::Progress| {
                let line = crate::progress::describe(p, false);
                if failed(p) {
                    tracing::warn!(op = op.0, "{}", line.trim_start());
                } else {
                    tracing::info!(op = op.0, "{}", line.trim_start());
                }
            })
        });
    let runtime = crate::runtime()?;
    runtime.block_on(async {
        let stop = engine::StopHandle::new();
        crate::signals::watch(stop.clone())
            .map_err(|e| anyhow::anyhow!("cannot watch for signals: {e}"))?;
        if let Some(addr) = http {
            // The certificate is read before anything listens: a wrong file is an error now.
            let tls = match &tls {
                Some(tls) => Some(tls.load().await.map_err(anyhow::Error::msg)?),
                None => None,
            };
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot serve HTTP on {addr}: {e}"))?;
            let web = web::Config {
                store: store.clone(),
                rule,
                options: config.options.clone(),
                stop: stop.clone(),
                workdir: std::env::current_dir()
                    .map_err(|e| anyhow::anyhow!("cannot read the current directory: {e}"))?,
                tls: tls.is_some(),
                ops: tokio::runtime::Handle::current(),
            };
            let app = web::router(web)?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!("serving the HTTP API on {scheme}://{addr}/api/v1");
            // On a thread and runtime of its own, beside the engine until `serve` returns: what
            // clients ask never delays the engine's next step.
            std::thread::Builder::new()
                .name("cairn-http".into())
                .spawn(move || {
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .and_then(|runtime| {
                            runtime.block_on(async move {
                                if let Some(tls) = tls {
                                    web::tls::serve_tls(listener, app, tls).await
                                } else {
                                    listener.set_nonblocking(true)?;
                                    let listener = tokio::net::TcpListener::from_std(listener)?;
                                    web::serve_router(listener, app).await
                                }
                            })
                        });
                    if let Err(e) = served {
                        tracing::error!("the HTTP API stopped: {e}");
                    }
                })
                .map_err(|e| anyhow::anyhow!("cannot start the HTTP API's thread: {e}"))?;
        }
        engine::serve::serve(&store, config, progress, stop).await?;
        Ok(())
    })
}

//! The files and environment of a step's process.
//!
//! - [`OutputFiles`]: the op's `$CAIRN_OUTPUT` files (one made ahead while a step runs), and the
//!   files of params too long for the environment.
//! - [`process_files`]: one process's output file and environment (`environment`, `param_env`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use plans::model::Step;
use plans::template::Context;
use serde_json::Value;

use super::Job;
use super::context::Shared;

/// The longest `NAME=value` string Linux lets into a process's environment (`MAX_ARG_STRLEN`, 128
/// KiB with its terminating NUL): a param whose variable would be longer is passed in a file.
const ENV_STRING_MAX: usize = 128 * 1024 - 1;

/// Every param as the environment passes it: `CAIRN_PARAM_<NAME>`, or, when that variable could
/// not be passed at all, `CAIRN_PARAM_<NAME>_FILE` naming a read-only file that holds it (never a
/// secret's: those stay out of files). The same for every task of the run, so made once: a list
/// param of 100,000 items took milliseconds to write out as JSON, for every process.
fn param_env(shared: &Shared) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (name, value) in &shared.params {
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let var = format!("CAIRN_PARAM_{}", name.to_uppercase());
        // `secrets` holds every secret param's text: those the plan declares and those stored
        // sealed (`op::secret_values`).
        let secret = shared.secrets.contains(&text);
        if var.len() + 1 + text.len() > ENV_STRING_MAX && !secret {
            let file_var = format!("{var}_FILE");
            if let Some(other) = shared
                .params
                .keys()
                .find(|n| format!("CAIRN_PARAM_{}", n.to_uppercase()) == file_var)
            {
                return Err(format!(
                    "param `{name}` is too long for the environment and goes in a file named by `{file_var}`, which is param `{other}`'s variable: rename one of them"
                ));
            }
            let path = shared
                .outputs
                .param_file(name, &text)
                .map_err(|e| format!("cannot write param `{name}` to its file: {e}"))?;
            env.insert(file_var, path.display().to_string());
        } else {
            env.insert(var, text);
        }
    }
    Ok(env)
}

/// The environment of a step's process: the captured base, the plan's and step's `env`, every
/// param as `CAIRN_PARAM_<NAME>`, and cairn's own variables.
fn environment(
    shared: &Shared,
    step: &Step,
    job: &Job,
    ctx: &Context,
    n: u32,
    output: &std::path::Path,
) -> Result<BTreeMap<String, String>, String> {
    let mut env = shared.env.clone();
    for var in shared.plan.env.iter().chain(&step.env) {
        let value = var
            .value
            .render(ctx)
            .map_err(|e| format!("cannot render `env.{}`: {e}", var.name))?;
        env.insert(var.name.clone(), value);
    }
    // Kept once made; a failure (a full disk) is tried again by the next process.
    let params = shared.param_env(|| param_env(shared))?;
    env.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("CAIRN_OP_ID".into(), shared.op.0.to_string());
    env.insert("CAIRN_OP_UUID".into(), shared.uuid.clone());
    env.insert("CAIRN_TASK".into(), job.name.clone());
    if let Some(item) = &job.item {
        let text = match item {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        env.insert("CAIRN_ITEM".into(), text);
    }
    env.insert("CAIRN_ATTEMPT".into(), n.to_string());
    env.insert("CAIRN_OUTPUT".into(), output.display().to_string());
    env.insert(
        "CAIRN_PROGRESS".into(),
        progress_file(output).display().to_string(),
    );
    // Finishing hooks see the op's outcome, as orchestrator's hooks get their placeholders.
    if let Some(end) = shared.outcome() {
        env.insert("CAIRN_OP_STATUS".into(), end.status.to_string());
        env.insert("CAIRN_OP_ERROR".into(), end.error.unwrap_or_default());
        env.insert(
            "CAIRN_FAILED_TASK".into(),
            end.failed_task.unwrap_or_default(),
        );
    }
    Ok(env)
}

/// Where a process of the attempt whose outputs go to `output` says how far it is
/// (`$CAIRN_PROGRESS`): beside it, made by the process if it says anything.
pub(crate) fn progress_file(output: &std::path::Path) -> PathBuf {
    let mut name = output.as_os_str().to_os_string();
    name.push(".progress");
    PathBuf::from(name)
}

/// The `$CAIRN_OUTPUT` file and the environment of one process of attempt `n` (`what`: `check` or
/// `run`).
pub(crate) fn process_files(
    shared: &Shared,
    step: &Step,
    ctx: &Context,
    job: &Job,
    n: u32,
) -> Result<(PathBuf, BTreeMap<String, String>), String> {
    let output = output_file(shared)?;
    let env = environment(shared, step, job, ctx, n, &output)?;
    Ok((output, env))
}

/// Where an attempt's process writes its outputs (`$CAIRN_OUTPUT`): an empty file, new to it.
fn output_file(shared: &Shared) -> Result<PathBuf, String> {
    shared
        .outputs
        .take()
        .map_err(|e| format!("cannot create its output file: {e}"))
}

/// The op's `$CAIRN_OUTPUT` files, in a directory private to the user (`0700`), each `0600`, each
/// used by one attempt and removed once read.
///
/// Making a file costs ext4 a search of its inode bitmap (for a free inode not recently deleted),
/// a fifth of a short step's time when it was made between one step's end and the next one's
/// start. So one is made ahead, while a step runs ([`OutputFiles::make_spare`]), and the next
/// attempt takes it.
#[derive(Debug)]
pub struct OutputFiles {
    dir: tempfile::TempDir,
    spare: std::sync::Mutex<Vec<PathBuf>>,
    made: std::sync::atomic::AtomicU64,
    /// The files of params too long for the environment, by name: written once per run.
    params: std::sync::Mutex<BTreeMap<String, PathBuf>>,
}

impl OutputFiles {
    /// Removes what earlier runs of op `uuid` left in the temporary directory (they were killed
    /// before they could: output files, long params). Called by a resume once it owns the op: only
    /// one process owns an op at a time, and a new op has nothing there.
    pub(crate) fn remove_left(uuid: &str) {
        use std::os::unix::fs::MetadataExt as _;
        let prefix = format!("cairn-{uuid}-");
        let me = nix::unistd::geteuid().as_raw();
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let left = entry.file_name().to_str().is_some_and(|name| {
                    name.starts_with(&prefix) && !name[prefix.len()..].contains('/')
                });
                // Only a real directory of this user's, never what a link points to.
                if left
                    && std::fs::symlink_metadata(entry.path())
                        .is_ok_and(|m| m.is_dir() && m.uid() == me)
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// A new directory, private to the user, for a run of op `uuid`: `$TMPDIR/cairn-<uuid>-*`.
    pub(crate) fn new(uuid: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix(&format!("cairn-{uuid}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()?;
        Ok(Self {
            dir,
            spare: std::sync::Mutex::new(Vec::new()),
            made: std::sync::atomic::AtomicU64::new(0),
            params: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn make(&self) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let n = self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("output-{n}"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(path)
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.spare
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty file for one attempt: the spare one if there is one, else a new one.
    fn take(&self) -> std::io::Result<PathBuf> {
        let spare = self.spare().pop();
        spare.map_or_else(|| self.make(), Ok)
    }

    /// The file holding param `name`'s `text` (`0400`: every process of the run reads the same
    /// one; beside the output files), written the first time it is asked for. One that could not
    /// be written whole is removed, to be written again next time.
    fn param_file(&self, name: &str, text: &str) -> std::io::Result<PathBuf> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut files = self
            .params
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(path) = files.get(name) {
            return Ok(path.clone());
        }
        let path = self.dir.path().join(format!("param-{name}"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        files.insert(name.to_owned(), path.clone());
        Ok(path)
    }

    /// Makes a file ahead for the next attempt, unless one is waiting already.
    pub(crate) fn make_spare(&self) {
        if self.spare().is_empty()
            && let Ok(path) = self.make()
        {
            self.spare().push(path);
        }
    }
}

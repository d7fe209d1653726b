//! Secret params at rest: sealed with XChaCha20-Poly1305 under a key kept outside the database
//! (a `0600` file the store names, or `CAIRN_SECRET_KEY`), so the database alone never holds a secret in
//! clear, and a resume can still pass the value to its steps.
//!
//! A sealed value is stored as `{"$secret": "v1:<nonce hex>:<ciphertext hex>"}`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use serde_json::{Map, Value};

/// The JSON key that marks a sealed value.
pub const MARK: &str = "$secret";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read or create the secret key `{path}`: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "the secret key `{path}` is readable by group or others (mode {mode:04o}); make it private with `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "there is no secret key at `{path}`; a database that several machines share needs one key that every `cairn` using it has (it is never created for you): make it with `(umask 077; head -c 32 /dev/urandom > {path})`, copy it to each machine, and name it with CAIRN_SECRET_KEY_FILE"
    )]
    NoSharedKey { path: PathBuf },
    #[error(
        "the secret key `{path}` is missing, but the database holds secrets sealed with it: a new key could never open them, so none is made. Restore the key file to `{path}` (mode 0600) from a backup or another machine that uses this database, or name it with CAIRN_SECRET_KEY_FILE (or give the key itself, 64 hex digits, in CAIRN_SECRET_KEY)"
    )]
    Missing { path: PathBuf },
    #[error(
        "the secret key `{to}` is another key than `{from}`, which sealed the secret params to copy: they would not open with it. Move `{to}` aside (or name another file with CAIRN_SECRET_KEY_FILE) and copy again"
    )]
    Differs { from: PathBuf, to: PathBuf },
    #[error("cannot decrypt secret param `{name}`: {reason}")]
    Open { name: String, reason: String },
}

/// A key that seals and opens secret params, and where it came from (for messages).
#[derive(Clone)]
pub struct SecretKey {
    key: Key,
    /// The key file's path, or `CAIRN_SECRET_KEY`.
    from: String,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("SecretKey")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    fn new(key: Key, from: impl Into<String>) -> Self {
        Self {
            key,
            from: from.into(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The key of `store`'s secrets: `CAIRN_SECRET_KEY` if set, else the file the store names
/// ([`store::Store::secret_key_file`]). On one machine's store the file is created when `create`
/// and it does not exist yet (`None` when it does not and not `create`); a store that several
/// machines share ([`store::Location::is_shared`]) needs the same key on each, so it is never
/// created, and its absence is an error saying how to make one. A key file readable by group or
/// others is refused.
///
/// A missing key while the database holds sealed values is refused ([`Error::Missing`]) whatever
/// `create` says: a second key would leave the database holding values that no key opens.
pub fn key(store: &store::Store, create: bool) -> Result<Option<SecretKey>, Error> {
    if let Ok(hexed) = std::env::var("CAIRN_SECRET_KEY") {
        return unhex(hexed.trim())
            .filter(|k| k.len() == 32)
            .map(|k| Some(SecretKey::new(*Key::from_slice(&k), "CAIRN_SECRET_KEY")))
            .ok_or_else(|| Error::Key {
                path: "CAIRN_SECRET_KEY".into(),
                reason: "it is not 64 hex digits".into(),
            });
    }
    let path = store.secret_key_file();
    let shared = store.location().is_shared();
    if let Some(key) = read_key(&path)? {
        return Ok(Some(key));
    }
    if any_sealed(store, &path)? {
        return Err(Error::Missing { path });
    }
    if shared {
        Err(Error::NoSharedKey { path })
    } else if create {
        create_key(&path)
    } else {
        Ok(None)
    }
}

/// Whether `store` holds a sealed value already (then its key exists, somewhere).
fn any_sealed(store: &store::Store, path: &Path) -> Result<bool, Error> {
    store
        .reader()
        .and_then(|reader| reader.any_sealed())
        .map_err(|e| Error::Key {
            path: path.to_path_buf(),
            reason: format!("cannot tell whether the database holds sealed secrets: {e}"),
        })
}

/// Reads the key file at `path` (`None` if there is none): 64 hex digits (what cairn writes), or
/// 32 raw bytes (`head -c 32 /dev/urandom`). Refused when group or others may read it.
fn read_key(path: &Path) -> Result<Option<SecretKey>, Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let fail = |reason: String| Error::Key {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    let mode = file
        .metadata()
        .map_err(|e| fail(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::Exposed {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| fail(e.to_string()))?;
    let from = path.display().to_string();
    if bytes.len() == 32 {
        return Ok(Some(SecretKey::new(*Key::from_slice(&bytes), from)));
    }
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| unhex(text.trim()))
        .filter(|k| k.len() == 32)
        .map(|k| Some(SecretKey::new(*Key::from_slice(&k), from)))
        .ok_or_else(|| fail("it does not hold a key (64 hex digits, or 32 bytes)".into()))
}

/// Creates the key file at `path` with a fresh key (see [`install`]); when another process
/// created it first, its key is read back and used.
fn create_key(path: &Path) -> Result<Option<SecretKey>, Error> {
    let fresh = XChaCha20Poly1305::generate_key(&mut OsRng);
    match install(path, hex(&fresh).as_bytes()) {
        Ok(true) => Ok(Some(SecretKey::new(fresh, path.display().to_string()))),
        Ok(false) => read_key(path),
        Err(e) => Err(Error::Key {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Creates the file `path` holding `bytes`, atomically and durably: written (`0600`) and synced
/// under a temporary name, linked into place, then the directory synced. `Ok(false)` when a file
/// is at `path` already: it is left as it is.
fn install(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let temp = path.with_extension(format!("key.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    let linked = written.and_then(|()| std::fs::hard_link(&temp, path));
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the key files `from` and `to` hold the same key (in either form: hex or raw bytes);
/// `None` when there is no file at `to`. Each is read as [`key`] reads it: one that others may
/// read, or that holds no key, is refused.
pub fn same_key(from: &Path, to: &Path) -> Result<Option<bool>, Error> {
    let Some(source) = read_key(from)? else {
        return Err(Error::Key {
            path: from.to_path_buf(),
            reason: "it does not exist".to_owned(),
        });
    };
    Ok(read_key(to)?.map(|target| source.key == target.key))
}

/// Makes `to` a key file that holds the key of `from`, byte for byte: created atomically, `0600`,
/// in a directory made `0700` if it is missing. `Ok(false)` when `to` held the same key already;
/// refused ([`Error::Differs`]) when it holds another.
pub fn copy_key(from: &Path, to: &Path) -> Result<bool, Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    let fail = |path: &Path, e: std::io::Error| Error::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if same_key(from, to)?.is_none() {
        let bytes = std::fs::read(from).map_err(|e| fail(from, e))?;
        if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(to, e))?;
        }
        if install(to, &bytes).map_err(|e| fail(to, e))? {
            return Ok(true);
        }
        // Another process made it meanwhile: it must hold the same key too.
    }
    match same_key(from, to)? {
        Some(true) => Ok(false),
        _ => Err(Error::Differs {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        }),
    }
}

/// Seals the values of `secret` params in `params`.
#[must_use]
pub fn seal(params: &Map<String, Value>, secret: &[&str], key: &SecretKey) -> Map<String, Value> {
    params
        .iter()
        .map(|(name, value)| {
            if secret.contains(&name.as_str()) {
                (name.clone(), seal_value(value, key))
            } else {
                (name.clone(), value.clone())
            }
        })
        .collect()
}

/// One value sealed: `{"$secret": "v1:<nonce hex>:<ciphertext hex>"}` (a param's, or a step's
/// output that holds a secret).
#[must_use]
pub fn seal_value(value: &Value, key: &SecretKey) -> Value {
    let cipher = XChaCha20Poly1305::new(&key.key);
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let plain = value.to_string();
    let sealed = cipher.encrypt(&nonce, plain.as_bytes()).unwrap_or_default();
    let text = format!("v1:{}:{}", hex(&nonce), hex(&sealed));
    Value::Object(Map::from_iter([(MARK.to_owned(), Value::String(text))]))
}

/// Whether `value` (a step's output) holds one of the `secrets` (values of secret params) in its
/// text: then it is sealed when stored, like them.
#[must_use]
pub fn holds_secret(value: &Value, secrets: &[String]) -> bool {
    let text = match value {
        Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
        other => std::borrow::Cow::Owned(other.to_string()),
    };
    !is_sealed(value)
        && secrets
            .iter()
            .any(|s| !s.is_empty() && text.contains(s.as_str()))
}

/// Whether a stored value is a sealed secret.
#[must_use]
pub fn is_sealed(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.len() == 1 && o.contains_key(MARK))
}

/// Opens the sealed values of `params`; `key` is needed only when there are any.
pub fn open(
    params: &Map<String, Value>,
    key: Option<&SecretKey>,
) -> Result<Map<String, Value>, Error> {
    let mut out = Map::new();
    for (name, value) in params {
        let value = if is_sealed(value) {
            open_value(name, value, key)?
        } else {
            value.clone()
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// Opens one sealed value, named `name` in messages.
pub fn open_value(name: &str, value: &Value, key: Option<&SecretKey>) -> Result<Value, Error> {
    let fail = |reason: &str| Error::Open {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let key = key.ok_or_else(|| fail("the secret key is missing (set CAIRN_SECRET_KEY, or restore the key file beside the database)"))?;
    let text = value[MARK].as_str().unwrap_or_default();
    let mut parts = text.splitn(3, ':');
    let (Some("v1"), Some(nonce), Some(sealed)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(fail("the stored value is not in a known format"));
    };
    let nonce = unhex(nonce)
        .filter(|n| n.len() == 24)
        .ok_or_else(|| fail("bad nonce"))?;
    let sealed = unhex(sealed).ok_or_else(|| fail("bad ciphertext"))?;
    // The cipher authenticates: another key fails here, it never yields garbage.
    let plain = XChaCha20Poly1305::new(&key.key)
        .decrypt(XNonce::from_slice(&nonce), sealed.as_slice())
        .map_err(|_| {
            fail(&format!(
                "`{}` is not the key these secrets were sealed with (every machine using the database needs the same key)",
                key.from
            ))
        })?;
    serde_json::from_slice(&plain).map_err(|_| fail("the decrypted value is not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_copied_whole_private_and_never_over_another() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("cairn.db.key");
        create_key(&from).unwrap();
        let to = dir.path().join("state/cairn/postgres.key");
        assert_eq!(same_key(&from, &to).unwrap(), None);
        assert!(copy_key(&from, &to).unwrap(), "made");
        assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(&from).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&to), 0o600);
        assert_eq!(mode(to.parent().unwrap()), 0o700);
        assert_eq!(same_key(&from, &to).unwrap(), Some(true));
        // The same key as 32 raw bytes is the same key: nothing to do.
        let raw = unhex(std::fs::read_to_string(&from).unwrap().trim()).unwrap();
        std::fs::write(&to, &raw).unwrap();
        assert!(!copy_key(&from, &to).unwrap(), "already there");
        // Another key is never replaced.
        std::fs::write(&to, "ab".repeat(32)).unwrap();
        assert_eq!(same_key(&from, &to).unwrap(), Some(false));
        let refused = copy_key(&from, &to).unwrap_err().to_string();
        assert!(
            refused.contains(&format!("`{}`", from.display())),
            "{refused}"
        );
        assert!(
            refused.contains(&format!("`{}`", to.display())),
            "{refused}"
        );
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "ab".repeat(32));
    }

    #[test]
    fn sealed_values_open_with_the_key_only() {
        let key = SecretKey::new(XChaCha20Poly1305::generate_key(&mut OsRng), "test");
        let params = Map::from_iter([
            ("user".to_owned(), Value::from("admin")),
            ("password".to_owned(), Value::from("hunter2")),
        ]);
        let sealed = seal(&params, &["password"], &key);
        assert_eq!(sealed["user"], "admin");
        assert!(is_sealed(&sealed["password"]));
        assert!(
            !Value::Object(sealed.clone())
                .to_string()
                .contains("hunter2")
        );
        assert_eq!(open(&sealed, Some(&key)).unwrap(), params);
        let other = SecretKey::new(XChaCha20Poly1305::generate_key(&mut OsRng), "other");
        let wrong = open(&sealed, Some(&other)).unwrap_err().to_string();
        assert!(wrong.contains("`other` is not the key"), "{wrong}");
        assert!(open(&sealed, None).is_err());
    }
}

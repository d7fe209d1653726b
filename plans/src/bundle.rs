//! A plan and the sub-plans it names, as one snapshot: sub-plans are keyed by their path, made
//! absolute and normalized without touching the file system, so that any plan of the bundle finds
//! its own sub-plans from its directory alone.

use sha2::{Digest, Sha256};

/// The key of the sub-plan `path` named by a plan in directory `dir` (absolute): `dir/path` with
/// `.` and `..` resolved lexically.
#[must_use]
pub fn sub_plan_key(dir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{dir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The directory of a key (the directory its plan's steps run in, and its sub-plans are named from).
#[must_use]
pub fn key_dir(key: &str) -> &str {
    match key.rfind('/') {
        Some(0) => "/",
        Some(i) => &key[..i],
        None => ".",
    }
}

/// `sha256:<hex>` of a plan's text with its sub-plans' (`files`, sorted by key); equal to the
/// plan's own hash when it has none.
#[must_use]
pub fn hash(text: &str, files: &[(String, String)]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let mut files: Vec<&(String, String)> = files.iter().collect();
    files.sort();
    for (key, body) in files {
        // Lengths first, so that no two bundles hash the same bytes.
        hasher.update(b"\0");
        hasher.update((key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update((body.len() as u64).to_le_bytes());
        hasher.update(body.as_bytes());
    }
    format!("sha256:{:x}", hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_normalized_without_the_file_system() {
        assert_eq!(
            sub_plan_key("/srv/plans", "./child.yaml"),
            "/srv/plans/child.yaml"
        );
        assert_eq!(
            sub_plan_key("/srv/plans", "../common/a.yaml"),
            "/srv/common/a.yaml"
        );
        assert_eq!(sub_plan_key("/srv/plans", "/etc/x.yaml"), "/etc/x.yaml");
        assert_eq!(key_dir("/srv/common/a.yaml"), "/srv/common");
    }

    #[test]
    fn a_bundle_without_files_hashes_as_its_text() {
        let text = "name: x\n";
        assert_eq!(
            hash(text, &[]),
            format!("sha256:{:x}", Sha256::digest(text.as_bytes()))
        );
        assert_ne!(
            hash(text, &[("/a".into(), "b".into())]),
            hash(text, &[("/a".into(), "c".into())])
        );
    }
}

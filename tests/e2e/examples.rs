//! The plans shipped in `examples/` are valid.

use crate::support::{cairn_in, root, stderr, stdout};

#[test]
fn every_example_plan_is_valid() {
    let dir = root().join("examples");
    let mut plans: Vec<String> = Vec::new();
    for sub in ["", "postgres", "mariadb"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if std::path::Path::new(&name)
                .extension()
                .is_some_and(|e| e == "yaml")
            {
                plans.push(if sub.is_empty() {
                    name
                } else {
                    format!("{sub}/{name}")
                });
            }
        }
    }
    plans.sort();
    assert!(plans.len() >= 8, "{plans:?}");
    let mut args = vec!["validate"];
    args.extend(plans.iter().map(String::as_str));
    let out = cairn_in(&dir, &args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for plan in &plans {
        assert!(
            stderr(&out).contains(&format!("{plan}: ok")),
            "{plan} not reported ok"
        );
    }
}

#[test]
fn the_committed_schema_is_what_cairn_schema_prints() {
    let out = cairn_in(&root(), &["schema"]);
    assert_eq!(out.status.code(), Some(0));
    let committed = std::fs::read_to_string(root().join("docs/plan.schema.json")).unwrap();
    assert!(
        committed == crate::support::stdout(&out),
        "docs/plan.schema.json is stale: run `cargo run -- schema > docs/plan.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    assert!(schema["properties"]["steps"].is_object());
}

/// The README's set-up command and quick start: the plan runs; pointed at a missing directory it
/// fails at `dump`; after the fix, `resume` finishes it without running `prepare` again.
#[test]
fn the_quick_start_fails_is_fixed_and_resumes() {
    let dir = crate::support::Sandbox::new();
    let plan = root().join("examples/quickstart.yaml");
    let backups = dir.path().join("backups");
    let cairn = |args: &[&str]| dir.cairn(args);
    let workdir = format!("workdir={}", dir.path().join("work").display());
    let into = format!("backups={}", dir.path().join("work/backups").display());
    let ok = cairn(&["run", plan.to_str().unwrap(), "-p", &workdir, "-p", &into]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let failing = cairn(&[
        "run",
        plan.to_str().unwrap(),
        "-p",
        &workdir,
        "-p",
        &format!("backups={}", backups.display()),
    ]);
    assert_eq!(failing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failing.stderr);
    assert!(
        err.contains("dump: failed: exit code 2") && err.contains("cairn resume 2"),
        "{err}"
    );
    std::fs::create_dir(&backups).unwrap();
    let resumed = cairn(&["resume", "2"]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let show: serde_json::Value =
        serde_json::from_slice(&cairn(&["show", "2", "--json"]).stdout).unwrap();
    let attempts = |id: &str| {
        show["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["attempts"]
            .clone()
    };
    assert_eq!(attempts("prepare"), 1);
    assert_eq!(attempts("dump"), 2);
    assert!(backups.join("demo-2.tgz").exists());
}

/// The metadata backup example runs as shipped: its lock, hooks and outputs.
#[test]
fn the_backup_example_runs() {
    let dir = crate::support::Sandbox::new();
    let out = dir
        .command(&[
            "run",
            root()
                .join("examples/backup-metadata.yaml")
                .to_str()
                .unwrap(),
            "-p",
            "dataset=hbase",
        ])
        .arg("-p")
        .arg(format!("workdir={}", dir.path().display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("on_success[1]: succeeded"), "{err}");
    let backups: Vec<_> = std::fs::read_dir(dir.path().join("backups/hbase"))
        .unwrap()
        .collect();
    assert_eq!(backups.len(), 1);
}

/// The simulated follower rebuild: a fan-out, an approval and a sub-plan, end to end.
#[test]
fn the_follower_rebuild_example_runs_with_its_approval_and_sub_plan() {
    let sandbox = crate::support::Sandbox::new();
    let workdir = format!("workdir={}", sandbox.path().join("demo").display());
    let plan = root().join("examples/rebuild-follower.yaml");
    let run = sandbox.spawn(&[
        "run",
        plan.to_str().unwrap(),
        "-p",
        "xstore=xs-1",
        "-p",
        "target=pod-2",
        "-p",
        &workdir,
    ]);
    let started = std::time::Instant::now();
    sandbox.wait_for_db();
    while sandbox.json(&["status", "--json"])[0]["status"] != "waiting" {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "never reached the gate"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        crate::support::code(&sandbox.cairn(&["approve", "1", "confirm"])),
        Some(0)
    );
    let ended = run.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(0), "{}", stderr(&ended));
    let show = sandbox.show(1);
    assert_eq!(show["children"][0]["status"], "succeeded");
    let restored =
        std::fs::read_to_string(sandbox.path().join("demo/xs-1/pod-2/restored/shards")).unwrap();
    assert_eq!(restored.lines().count(), 3, "{restored}");
    let members = std::fs::read_to_string(sandbox.path().join("demo/xs-1/members")).unwrap();
    assert!(members.starts_with("pod-2 127.0.0.1:"), "{members}");
}

/// The README's quick start, run verbatim: each `$ ` line of its console blocks through `sh`, with
/// `cairn` on `PATH` and a new default database (its own `XDG_STATE_HOME`), from the checkout; each
/// line printed after it must appear in what the command printed, times, ids' digits and durations
/// aside (`...` and `[...]` stand for what is left out).
#[test]
fn the_readme_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Quick start\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Quick start section");
    let mut transcript: Vec<(String, Vec<String>)> = Vec::new();
    for block in section.split("```console\n").skip(1) {
        let block = block.split("```").next().unwrap();
        for line in block.lines() {
            match line.strip_prefix("$ ") {
                Some(command) => transcript.push((command.to_owned(), Vec::new())),
                None => transcript.last_mut().unwrap().1.push(line.to_owned()),
            }
        }
    }
    assert!(transcript.len() >= 6, "{transcript:?}");
    for dir in ["/tmp/cairn-qs-backups", "/tmp/cairn-quickstart"] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let state = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_cairn"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut last_code = None;
    for (command, expected) in &transcript {
        if command == "echo $?" {
            // The previous command's exit code, as the transcript shows it.
            assert_eq!(
                last_code.map(|c: i32| c.to_string()).as_deref(),
                expected.first().map(String::as_str),
                "the exit code before `echo $?`"
            );
            continue;
        }
        let out = std::process::Command::new("sh")
            .args(["-c", command])
            .current_dir(root())
            .env("PATH", &path)
            .env("XDG_STATE_HOME", state.path())
            .env_remove("CAIRN_DB")
            .env_remove("CAIRN_SECRET_KEY_FILE")
            .output()
            .unwrap();
        last_code = out.status.code();
        let printed = format!("{}{}", stdout(&out), stderr(&out));
        let printed: Vec<String> = printed.lines().map(normalized).collect();
        for line in expected {
            let wanted = normalized(line.split("[...]").next().unwrap());
            if wanted.is_empty() || wanted == "..." {
                continue;
            }
            assert!(
                printed.iter().any(|p| p.starts_with(&wanted)),
                "`{command}` did not print `{line}`; it printed:\n{}",
                printed.join("\n")
            );
        }
    }
    for dir in ["/tmp/cairn-qs-backups", "/tmp/cairn-quickstart"] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A line with what changes from run to run made alike: a token of digits, `:`, `-` and `.`
/// (a time, a date) or a duration (`9ms`, `1m29s`) becomes `#`, other runs of digits `0`; spaces
/// collapse.
fn normalized(line: &str) -> String {
    line.split_whitespace()
        .map(|token| {
            let timeish = token.starts_with(|c: char| c.is_ascii_digit())
                && token
                    .chars()
                    .all(|c| c.is_ascii_digit() || ":-.mshµ".contains(c));
            if timeish && token.chars().any(|c| !c.is_ascii_digit()) {
                return "#".to_owned();
            }
            let mut out = String::new();
            for c in token.chars() {
                if c.is_ascii_digit() {
                    if !out.ends_with('0') || out.is_empty() {
                        out.push('0');
                    }
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join(" ")
}

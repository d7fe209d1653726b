//! How large a plan or params file may be: over 16 MiB it is refused before it is read (an endless
//! one too), naming the file, its size and the cap; within it, large plans and params work.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Sandbox, code, stderr};

/// 17 MiB of YAML: a valid start, then a comment.
fn oversized(dir: &Sandbox, name: &str, start: &str) -> std::path::PathBuf {
    let mut text = String::from(start);
    text.push('#');
    text.push_str(&"x".repeat(17 * 1024 * 1024));
    text.push('\n');
    dir.write(name, &text)
}

/// `cairn validate /dev/zero` in an address space of 256 MiB: it read until the kernel or the
/// allocator stopped it; now it stops at the cap.
#[test]
fn an_endless_plan_file_is_refused_within_a_small_memory_limit() {
    let dir = Sandbox::new();
    let mut child = Command::new("prlimit")
        .args(["--as=268435456", "--"])
        .arg(env!("CARGO_BIN_EXE_cairn"))
        .args(["validate", "/dev/zero"])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("`cairn validate /dev/zero` still reads after a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(
        err.contains("/dev/zero") && err.contains("endless") && err.contains("16.0 MiB"),
        "{err}"
    );
}

#[test]
fn plan_params_and_sub_plan_files_over_the_cap_are_refused_naming_them() {
    let dir = Sandbox::new();
    oversized(&dir, "big.yaml", "name: big\n");
    let out = dir.cairn(&["validate", "big.yaml"]);
    let err = stderr(&out);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(
        err.contains("big.yaml") && err.contains("17.0 MiB") && err.contains("at most 16.0 MiB"),
        "{err}"
    );

    dir.write(
        "plan.yaml",
        "name: small\nparams:\n  t: {}\nsteps:\n  - id: a\n    noop: true\n",
    );
    oversized(&dir, "params.yaml", "t: x\n");
    let out = dir.cairn(&["run", "plan.yaml", "--params", "params.yaml"]);
    let err = stderr(&out);
    assert_eq!(code(&out), Some(2), "{err}");
    assert!(
        err.contains("params.yaml") && err.contains("17.0 MiB") && err.contains("at most 16.0 MiB"),
        "{err}"
    );

    dir.write(
        "parent.yaml",
        "name: parent\nsteps:\n  - id: child\n    plan: ./big.yaml\n",
    );
    for args in [["validate", "parent.yaml"], ["run", "parent.yaml"]] {
        let out = dir.cairn(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("big.yaml") && err.contains("at most 16.0 MiB"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_plan_of_a_hundred_thousand_steps_validates() {
    let dir = Sandbox::new();
    let mut text = String::from("name: wide\nsteps:\n");
    for i in 0..100_000 {
        writeln!(text, "  - id: s{i}\n    run: echo {i}").unwrap();
    }
    dir.write("wide.yaml", &text);
    let out = dir.cairn(&["validate", "wide.yaml"]);
    let err = stderr(&out);
    assert_eq!(code(&out), Some(0), "{err}");
    assert!(err.contains("100000 steps"), "{err}");
}

#[test]
fn a_params_file_with_a_list_of_three_hundred_thousand_items_is_read() {
    let dir = Sandbox::new();
    dir.write(
        "plan.yaml",
        "name: list\nparams:\n  items: { type: list }\nsteps:\n  - id: a\n    noop: true\n",
    );
    let mut text = String::from("items:\n");
    for i in 0..300_000 {
        writeln!(text, "  - item-{i}").unwrap();
    }
    dir.write("params.yaml", &text);
    let out = dir.cairn(&["submit", "plan.yaml", "--params", "params.yaml"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let op: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let items = &dir.show(op)["params"]["items"];
    assert_eq!(items.as_array().map(Vec::len), Some(300_000));
    assert_eq!(items[299_999], "item-299999");
}

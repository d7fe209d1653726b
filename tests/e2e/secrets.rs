//! Secrets misused in every way a tester found: never in clear in a message, the database, `show`,
//! `status` or `logs`; a NUL in a param refused at submit; a lost key never replaced by a new one.

use crate::support::{Sandbox, code, stderr, stdout, task};

const SECRET: &str = "S3cr3t-pw-7731";

/// Everything cairn prints about the sandbox's ops: `status --json`, `show`, `show --json` and
/// `logs` of `op`, on stdout and stderr.
fn everything_shown(sandbox: &Sandbox, op: &str) -> String {
    let mut all = String::new();
    for args in [
        &["status", "--json", "--all"][..],
        &["show", op],
        &["show", op, "--json"],
        &["logs", op],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(0), "{args:?}: {}", stderr(&out));
        all.push_str(&stdout(&out));
        all.push_str(&stderr(&out));
    }
    all
}

/// A plan whose secrets are given the wrong type, written to the outputs (the whole environment,
/// and a line of its own), used downstream, and echoed by a failing step.
const MISUSED: &str = r#"
name: misused
params:
  password: { secret: true, required: true }
  pin: { type: int, secret: true, default: 1234 }
  keys: { type: list, secret: true, default: [] }
steps:
  - id: leak
    env: { PASSWORD: "{{ params.password }}" }
    outputs: [pw, plain]
    run: |
      env >> "$CAIRN_OUTPUT"
      echo "pw=$PASSWORD" >> "$CAIRN_OUTPUT"
      echo "plain=hello" >> "$CAIRN_OUTPUT"
  - id: use
    needs: [leak]
    env: { PW: "{{ steps.leak.outputs.pw }}" }
    run: test -f go && printf %s "$PW" > got
  - id: fail
    needs: [use]
    env: { PASSWORD: "{{ params.password }}" }
    run: |
      echo "the password is $PASSWORD"
      echo "cannot log in with $PASSWORD" >&2
      exit 1
"#;

#[test]
fn a_misused_secret_is_never_shown_or_stored_in_clear_and_still_reaches_its_step() {
    let sandbox = Sandbox::new();
    sandbox.write("plan.yaml", MISUSED);
    let password = format!("password={SECRET}");
    let mut printed = String::new();
    for bad in [format!("pin={SECRET}"), format!("keys=[\"{SECRET}")] {
        let out = sandbox.cairn(&["run", "plan.yaml", "-p", &password, "-p", &bad]);
        assert_eq!(code(&out), Some(2), "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("(secret, not shown)"),
            "{}",
            stderr(&out)
        );
        printed.push_str(&stderr(&out));
    }
    let run = sandbox.cairn(&["run", "plan.yaml", "-p", &password]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    assert_eq!(task(&sandbox.show(1), "use")["status"], "failed");
    // Resumed, the step after the output reads it from the database: sealed, opened for it.
    sandbox.write("go", "");
    let resumed = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&resumed), Some(1), "{}", stderr(&resumed));
    // A value given by hand is sealed as a step's own would be, and its event masks it.
    let token = format!("token=x-{SECRET}");
    let mark = [
        "mark",
        "1",
        "fail",
        "--succeeded",
        "--reason",
        "fixed",
        "--output",
        &token,
        "--output",
        "note=ok",
    ];
    let marked = sandbox.cairn(&mark);
    assert_eq!(code(&marked), Some(0), "{}", stderr(&marked));
    for out in [&run, &resumed, &marked] {
        printed.push_str(&stdout(out));
        printed.push_str(&stderr(out));
    }
    printed.push_str(&everything_shown(&sandbox, "1"));
    assert!(!printed.contains(SECRET), "a secret shown:\n{printed}");
    assert!(printed.contains("cannot log in with ********"), "{printed}");

    let show = sandbox.show(1);
    let outputs = &task(&show, "leak")["outputs"];
    assert_eq!(outputs["pw"], "********", "{outputs}");
    assert_eq!(outputs["PASSWORD"], "********", "{outputs}");
    assert_eq!(outputs["CAIRN_PARAM_PASSWORD"], "********", "{outputs}");
    assert_eq!(
        outputs["plain"], "hello",
        "only values holding a secret are sealed"
    );
    let marked = &task(&show, "fail")["outputs"];
    assert_eq!(marked["token"], "********", "{marked}");
    assert_eq!(marked["note"], "ok", "{marked}");
    // The output's real value reached the step that takes it in its environment, after a resume.
    assert_eq!(sandbox.read("got"), SECRET);
    sandbox.assert_not_stored(SECRET);
    // Sealed like a secret param, with the same key.
    let stored = sandbox.sql("SELECT outputs FROM tasks WHERE name = 'leak'");
    assert!(stored.contains("\"$secret\""), "{stored}");
}

/// Where a secret param may not go, an output holding one may not either: a command line, a
/// fan-out's items, a sub-plan's param that is not secret (all seen by others or stored).
#[test]
fn an_output_holding_a_secret_is_refused_where_others_would_see_it() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        r#"
name: argv
params:
  password: { secret: true, required: true }
steps:
  - id: leak
    env: { PASSWORD: "{{ params.password }}" }
    run: echo "pw=$PASSWORD" >> "$CAIRN_OUTPUT"
  - id: argv
    needs: [leak]
    continue_on_error: true
    run: echo {{ steps.leak.outputs.pw }} > got
  - id: each
    needs: [leak, argv]
    continue_on_error: true
    for_each: "{{ steps.leak.outputs.pw }}"
    run: echo "$CAIRN_ITEM" > got
  - id: child
    needs: [leak, each]
    plan: ./child.yaml
    with: { note: "{{ steps.leak.outputs.pw }}" }
"#,
    );
    sandbox.write(
        "child.yaml",
        "name: child\nparams:\n  note: { required: true }\nsteps:\n  - id: a\n    run: touch got\n",
    );
    let run = sandbox.cairn(&["run", "plan.yaml", "-p", &format!("password={SECRET}")]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    assert!(!sandbox.path().join("got").exists(), "a step ran");
    let show = sandbox.show(1);
    for (id, what) in [
        (
            "argv",
            "the command line, `cwd`, `on`, `check` or `until.probe`",
        ),
        ("each", "`for_each`"),
        ("child", "`with.note`"),
    ] {
        let error = task(&show, id)["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains(&format!(
                "{what} inserts an output of an earlier step that holds a secret"
            )),
            "{id}: {error}"
        );
    }
    assert_eq!(sandbox.op_count(), 1, "no child op was stored");
    let printed = format!("{}{}", stderr(&run), everything_shown(&sandbox, "1"));
    assert!(!printed.contains(SECRET), "a secret shown:\n{printed}");
    sandbox.assert_not_stored(SECRET);
}

#[test]
fn a_nul_in_a_param_is_refused_at_submit_naming_it() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: nul\nparams:\n  items: { type: list, default: [] }\n  note: { default: ok }\nsteps:\n  - id: a\n    run: touch ran\n",
    );
    sandbox.write("params.yaml", "note: \"a\\0b\"\n");
    sandbox.write(
        "default.yaml",
        "name: nul\nparams:\n  note: { default: \"a\\0b\" }\nsteps:\n  - id: a\n    run: touch ran\n",
    );
    let cases: [(&[&str], &str); 4] = [
        (
            &["run", "plan.yaml", "-p", r#"items=["a\u0000b"]"#],
            "items",
        ),
        (
            &["submit", "plan.yaml", "-p", r#"items=["a\u0000b"]"#],
            "items",
        ),
        (&["run", "plan.yaml", "--params", "params.yaml"], "note"),
        (&["submit", "default.yaml"], "note"),
    ];
    for (args, param) in cases {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("param `{param}` holds a NUL")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!sandbox.holds_ops(), "an op was stored");
    assert!(!sandbox.path().join("ran").exists());
}

#[test]
fn a_lost_key_is_never_replaced_while_sealed_secrets_are_stored() {
    let sandbox = Sandbox::new();
    sandbox.write(
        "plan.yaml",
        "name: key\nparams:\n  password: { secret: true, required: true }\nsteps:\n  - id: a\n    env: { PW: \"{{ params.password }}\" }\n    run: test -f go && printf %s \"$PW\" > got\n",
    );
    let password = format!("password={SECRET}");
    let run = sandbox.cairn(&["run", "plan.yaml", "-p", &password]);
    assert_eq!(code(&run), Some(1), "{}", stderr(&run));
    let key = sandbox.key_file();
    let kept = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    sandbox.write("go", "");
    for args in [
        &["run", "plan.yaml", "-p", &password][..],
        &["submit", "plan.yaml", "-p", &password],
        &["resume", "1"],
    ] {
        let out = sandbox.cairn(args);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        let said = stderr(&out);
        assert!(
            said.contains(&format!("the secret key `{}` is missing", key.display()))
                && said.contains("CAIRN_SECRET_KEY_FILE")
                && said.contains("Restore"),
            "{args:?}: {said}"
        );
        assert!(!key.exists(), "{args:?} made a new key");
    }
    assert_eq!(sandbox.op_count(), 1, "nothing more was stored");
    assert!(!sandbox.path().join("got").exists());
    // Restored, the key opens the op's secret again.
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .unwrap();
        file.write_all(&kept).unwrap();
    }
    let resumed = sandbox.cairn(&["resume", "1"]);
    assert_eq!(code(&resumed), Some(0), "{}", stderr(&resumed));
    assert_eq!(sandbox.read("got"), SECRET);
}

//! What a new user types first: bare `cairn`, shell completions, the man page.

use std::process::Command;

use crate::support::{Sandbox, code, stderr, stdout};

/// Bare `cairn` is a question, not a mistake: it prints the help, with every command, and exits 0.
#[test]
fn bare_cairn_prints_its_help() {
    let out = Sandbox::new().cairn(&[]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let help = stdout(&out);
    assert!(help.contains("Usage: cairn"), "{help}");
    for command in ["run", "status", "resume", "cancel", "completions", "man"] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "`{command}` is not listed: {help}"
        );
    }
}

/// The bash completion script loads in a real bash and completes `cairn`'s commands.
#[test]
fn bash_completions_load_and_complete_the_commands() {
    let sandbox = Sandbox::new();
    let out = sandbox.cairn(&["completions", "bash"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let script = sandbox.write("cairn.bash", &stdout(&out));
    let probe = format!(
        "source {}; COMP_WORDS=(cairn res); COMP_CWORD=1; _cairn cairn res cairn; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display()
    );
    let completed = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    assert!(completed.status.success(), "{}", stderr(&completed));
    assert_eq!(stdout(&completed).trim(), "resume");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = sandbox.cairn(&["completions", shell]);
        assert_eq!(code(&out), Some(0), "{shell}: {}", stderr(&out));
        assert!(stdout(&out).contains("cairn"), "{shell}");
    }
    let out = sandbox.cairn(&["completions", "tcsh"]);
    assert_eq!(code(&out), Some(2), "an unknown shell is bad input");
}

/// The man page is roff with the name, synopsis and every command.
#[test]
fn the_man_page_is_roff_generated_from_the_commands() {
    let out = Sandbox::new().cairn(&["man"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH cairn 1"), "{page}");
    assert!(
        page.contains(".SH NAME") && page.contains(".SH SYNOPSIS"),
        "{page}"
    );
    for command in ["validate", "resume", "approve", "completions"] {
        assert!(page.contains(command), "`{command}` is missing");
    }
}

//! `cairn validate`: check plan files and report every problem with `file:line:col`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plans::{Plan, Problem, Problems};
use serde::Serialize;

use crate::exit::Failure;
use crate::output::Output;

/// Check plans; print every problem with `file:line:col`, the line and a caret.
///
/// Sub-plans named by `plan:` steps are checked too, with the params their `with:` passes.
/// Exits 0 when every plan is valid, 2 otherwise.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Plan files.
    #[arg(required = true)]
    plans: Vec<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The result for one file, as `--json` prints it.
#[derive(Debug, Serialize)]
struct FileResult<'a> {
    file: String,
    valid: bool,
    plan: Option<&'a str>,
    steps: Option<usize>,
    problems: Vec<plans::diag::JsonProblem<'a>>,
}

/// Reads and validates one plan file.
pub fn load(path: &Path) -> Result<Plan, Problems> {
    let file = path.display().to_string();
    match engine::op::input::read(path) {
        Ok(bytes) => plans::parse_bytes(&file, &bytes),
        Err(err) => Err(Problems {
            file,
            source: String::new(),
            list: vec![Problem::new(
                if err.too_large() {
                    "too-large"
                } else {
                    "unreadable"
                },
                None,
                format!("cannot read the plan: {}", err.failure),
            )],
        }),
    }
}

/// Validates `path` and, through `plan:` steps, the sub-plans it names; one entry per file.
fn check_tree(
    path: &Path,
    seen: &mut BTreeSet<PathBuf>,
    results: &mut Vec<(Result<Plan, Problems>, String)>,
) {
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if !seen.insert(key) {
        return;
    }
    let result = load(path);
    let file = path.display().to_string();
    let mut extra = Vec::new();
    let mut children = Vec::new();
    if let Ok(plan) = &result {
        let dir = path.parent().unwrap_or(Path::new("."));
        for (step, sub) in plan.sub_plans() {
            let child_path: PathBuf = dir
                .join(sub)
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect();
            match load(&child_path) {
                Ok(child) => extra.extend(plans::validate::sub_plan_problems(plan, step, &child)),
                Err(p) if p.list.iter().any(|p| p.code == "unreadable") => {
                    extra.push(plans::validate::missing_sub_plan(
                        plan,
                        step,
                        &p.list[0].message,
                    ));
                }
                Err(_) => {}
            }
            children.push(child_path);
        }
    }
    let result = match (result, extra.is_empty()) {
        (Ok(plan), false) => {
            let mut problems = Problems {
                file: file.clone(),
                source: plan.text.clone(),
                list: extra,
            };
            problems.sort();
            Err(problems)
        }
        (other, _) => other,
    };
    results.push((result, file));
    for child in children {
        check_tree(&child, seen, results);
    }
}

pub fn run(args: &Args, out: &Output) -> Result<(), Failure> {
    let mut results = Vec::new();
    let mut seen = BTreeSet::new();
    for path in &args.plans {
        check_tree(path, &mut seen, &mut results);
    }
    let all_valid = results.iter().all(|(r, _)| r.is_ok());
    if args.json {
        let json: Vec<FileResult> = results
            .iter()
            .map(|(result, file)| match result {
                Ok(plan) => FileResult {
                    file: file.clone(),
                    valid: true,
                    plan: Some(&plan.name),
                    steps: Some(plan.steps.len()),
                    problems: Vec::new(),
                },
                Err(problems) => FileResult {
                    file: file.clone(),
                    valid: false,
                    plan: None,
                    steps: None,
                    problems: problems.json(),
                },
            })
            .collect();
        let mut text = serde_json::to_string_pretty(&json).context("cannot encode the result")?;
        text.push('\n');
        crate::output::data(&text).context("cannot write the result")?;
    } else {
        let mut errors = 0;
        for (result, file) in &results {
            match result {
                Ok(plan) => out.note(&format!(
                    "{}: ok: plan `{}`, {} step{}\n",
                    crate::output::shown(file),
                    plan.name,
                    plan.steps.len(),
                    if plan.steps.len() == 1 { "" } else { "s" }
                )),
                Err(problems) => {
                    errors += problems.list.len();
                    crate::output::diagnostic(&problems.render(out.color));
                }
            }
        }
        if errors > 0 {
            crate::output::diagnostic(&format!(
                "{errors} problem{} found\n",
                if errors == 1 { "" } else { "s" }
            ));
        }
    }
    if all_valid {
        Ok(())
    } else {
        Err(Failure::Reported)
    }
}

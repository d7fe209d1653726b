//! How large a plan or params file may be, and the YAML budget that goes with that size. The cap
//! is checked by whoever reads the file, before reading it; the budget by the YAML reader, so that
//! no text, whatever it holds, makes cairn use more than a bounded amount of memory.

use serde_saphyr::budget::BudgetBreach;

/// The largest plan, sub-plan or params file cairn reads: 16 MiB.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The most YAML nodes (values, lists and mappings) one file may hold: room for a plan of some
/// 200,000 steps, and for a list param of a million items.
pub const MAX_YAML_NODES: usize = 2_000_000;

/// `bytes` for people: `17.0 MiB`.
#[must_use]
pub fn size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// The YAML reader's budget: nodes and events in proportion to [`MAX_YAML_NODES`], the others as
/// the reader sets them.
pub(crate) fn budget() -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_YAML_NODES;
    budget.max_events = 3 * MAX_YAML_NODES;
    budget
}

/// The budget `err` reports breached, under whatever snippet or alias it is wrapped in.
pub(crate) fn breached(err: &serde_saphyr::Error) -> Option<&BudgetBreach> {
    use serde_saphyr::Error as E;
    let mut err = err;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = err {
        err = error;
    }
    match err {
        E::Budget { breach, .. } => Some(breach),
        _ => None,
    }
}

/// What a breached budget means, for a message that starts with the file ("the plan is too
/// large: …").
pub(crate) fn breach(breach: &BudgetBreach) -> String {
    match breach {
        BudgetBreach::Nodes { .. } => {
            format!("more than {MAX_YAML_NODES} YAML nodes (values, lists and mappings; the limit)")
        }
        BudgetBreach::Events { .. } => {
            format!("more than {} YAML events (the limit)", 3 * MAX_YAML_NODES)
        }
        BudgetBreach::Depth { depth } => {
            format!("lists and mappings nested {depth} deep (the limit is 64)")
        }
        BudgetBreach::ScalarBytes { .. } => {
            "more than 64 MiB of values once aliases are expanded (the limit)".to_owned()
        }
        BudgetBreach::Aliases { .. } | BudgetBreach::Anchors { .. } => {
            "more than 50,000 YAML anchors or aliases (the limit)".to_owned()
        }
        other => format!("over a limit of the YAML reader ({other:?})"),
    }
}

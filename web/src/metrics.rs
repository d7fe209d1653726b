//! `GET /api/v1/metrics`: Prometheus text, read with the same tokens as the API (a viewer's is
//! enough).

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use store::OpStatus;

use crate::api::App;
use crate::error::ApiError;

/// `GET /metrics`: Prometheus text: the ops stored with each open status (the queue's depth
/// among them), the tasks running in this process, and what it counts of its own work (tasks'
/// durations, lease renewals, takeovers, commits' latency).
pub(crate) async fn metrics(State(app): State<App>) -> Result<Response, ApiError> {
    let counts = app.read(|reader, _| Ok(reader.open_op_counts()?)).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP cairn_ops Ops stored with each status that is not final.\n# TYPE cairn_ops gauge"
    );
    for (status, n) in &counts {
        let _ = writeln!(out, "cairn_ops{{status=\"{}\"}} {n}", status.as_str());
    }
    let queued = counts
        .iter()
        .find(|(status, _)| *status == OpStatus::Queued)
        .map_or(0, |(_, n)| *n);
    let _ = writeln!(
        out,
        "# HELP cairn_queue_depth Ops queued for a serving node.\n# TYPE cairn_queue_depth gauge\ncairn_queue_depth {queued}"
    );
    let _ = writeln!(
        out,
        "# HELP cairn_tasks_running Tasks running in this process.\n# TYPE cairn_tasks_running gauge\ncairn_tasks_running {}",
        app.config.options.running_tasks()
    );
    app.config.options.metrics.write(&mut out);
    let name = "cairn_commit_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} How long this process's commits took, as the caller waited for each.\n# TYPE {name} histogram"
    );
    app.config.store.commit_latency().write(&mut out, name, "");
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

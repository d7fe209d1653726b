//! The API's `OpenAPI` 3.1 document (`GET /api/v1/openapi.json`), written here beside the routes.
//! A test holds it to the router's routes ([`crate::api::ROUTES`]), and the end-to-end tests call
//! every path it names.

use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    })
}

fn json_response(description: &str, schema: &Value) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": schema}},
    })
}

/// An op id: a positive 64-bit number.
fn op_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1, "maximum": i64::MAX}})
}

fn body(properties: &Value, required: &[&str]) -> Value {
    json!({
        "required": !required.is_empty(),
        "content": {"application/json": {"schema": {
            "type": "object",
            "additionalProperties": false,
            "properties": properties,
            "required": required,
        }}},
    })
}

/// An operation: its summary, parameters, request body and answers, with the errors every
/// operation may give.
fn operation(summary: &str, params: &[Value], request: Option<Value>, ok: (&str, &Value)) -> Value {
    let mut op = json!({
        "summary": summary,
        "parameters": params,
        "responses": {
            ok.0: ok.1,
            "400": error_response("bad input, named in `message`"),
            "401": error_response("no token, or one the store does not know"),
            "403": error_response("a viewer's token, for an action"),
            "404": error_response("no such op, task or step"),
            "409": error_response("the op's state refuses it"),
        },
    });
    if let Some(request) = request {
        op["requestBody"] = request;
    }
    op
}

fn text(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

/// A text that may be left out, or given as `null`, which reads the same.
fn optional_text(description: &str) -> Value {
    json!({"type": ["string", "null"], "description": description})
}

/// The document.
#[must_use]
pub fn document() -> Value {
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cairn",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP API of `cairn serve --http`. Every request needs `Authorization: Bearer TOKEN` (`cairn token create`); a viewer's token reads, an operator's also acts. The shapes are those of the command line's `--json`.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": paths_of_ops().as_object().into_iter().chain(other_paths().as_object()).flatten().map(|(k, v)| (k.clone(), v.clone())).collect::<serde_json::Map<_, _>>(),
        "components": components(),
    });
    name_operations(&mut doc);
    doc
}

/// Gives every operation an `operationId` made of its method and path (`post_ops_id_cancel`),
/// which the links from a submit's answer name, so that a client (or a fuzzer) can follow a new
/// op to the actions on it.
fn name_operations(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, ops) in paths.iter_mut() {
        let Some(ops) = ops.as_object_mut() else {
            continue;
        };
        for (method, op) in ops.iter_mut() {
            op["operationId"] = json!(operation_id(method, path));
        }
    }
}

fn operation_id(method: &str, path: &str) -> String {
    let words = path
        .split('/')
        .map(|part| part.trim_matches(['{', '}']).replace('.', "_"))
        .filter(|part| !part.is_empty());
    std::iter::once(method.to_owned())
        .chain(words)
        .collect::<Vec<_>>()
        .join("_")
}

/// The links from a submit's answer to what may be done with the new op.
fn links_of_a_new_op() -> Value {
    let to = |path: &str, method: &str| json!({"operationId": operation_id(method, path), "parameters": {"id": "$response.body#/id"}});
    json!({
        "show": to("/ops/{id}", "get"),
        "cancel": to("/ops/{id}/cancel", "post"),
        "approve": to("/ops/{id}/approve", "post"),
        "reject": to("/ops/{id}/reject", "post"),
        "resume": to("/ops/{id}/resume", "post"),
    })
}

/// A plan that a submit of the document's example runs: a step, then a gate.
const EXAMPLE_PLAN: &str = "name: example\nsteps:\n  - id: hello\n    run: echo hello\n  - id: gate\n    needs: [hello]\n    approve: go on?\n";

/// The paths under `/ops` and their operations.
fn paths_of_ops() -> Value {
    let op = json!({"$ref": "#/components/schemas/Op"});
    let answer = json!({"type": "object", "properties": {"id": {"type": "integer"}}});
    let query = |name: &str, schema: Value, description: &str| json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description});
    json!({
            "/ops": {
                "get": operation(
                    "List ops, newest first (as `cairn status --json --children`), a page at a time",
                    &[
                        query("status", json!({"enum": store::OpStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>()}), "only ops shown with this status"),
                        query("plan", json!({"type": "string"}), "only ops of this plan"),
                        query("limit", json!({"type": "integer", "minimum": 1, "maximum": 500}), "ops per page (50)"),
                        query("before", json!({"type": "integer", "minimum": 1, "maximum": i64::MAX}), "only ops older than this one: the next page"),
                    ],
                    None,
                    ("200", &json_response("a page of ops", &json!({
                        "type": "object",
                        "properties": {
                            "ops": {"type": "array", "items": op},
                            "next_before": {"type": ["integer", "null"]},
                        },
                        "required": ["ops", "next_before"],
                    }))),
                ),
                "post": operation(
                    "Submit a plan, given as YAML text, with params; `cairn serve` starts it",
                    &[],
                    Some(body(&json!({
                        "plan": {"type": "string", "description": "the plan's YAML", "example": EXAMPLE_PLAN},
                        "params": {"type": ["object", "null"], "description": "the params, by name"},
                    }), &["plan"])),
                    ("201", &{
                        let mut answer = json_response("the op, queued", &json!({
                            "type": "object",
                            "properties": {"id": {"type": "integer"}, "uuid": {"type": "string"}},
                            "required": ["id", "uuid"],
                        }));
                        answer["links"] = links_of_a_new_op();
                        answer
                    }),
                ),
            },
            "/ops/{id}": {
                "get": operation(
                    "One op in full (as `cairn show --json`): params with secrets masked, tasks, attempts, outputs, events",
                    &[op_id_param()],
                    None,
                    ("200", &json_response("the op", &op)),
                ),
            },
            "/ops/{id}/graph": {
                "get": operation(
                    "The steps of the op's plan and what each needs, in plan order (what the dashboard draws)",
                    &[op_id_param()],
                    None,
                    ("200", &json_response("the steps", &json!({
                        "type": "object",
                        "properties": {"steps": {"type": "array", "items": {
                            "type": "object",
                            "properties": {"id": {"type": "string"}, "needs": {"type": "array", "items": {"type": "string"}}},
                            "required": ["id", "needs"],
                        }}},
                        "required": ["steps"],
                    }))),
                ),
            },
            "/ops/{id}/tasks/{task}/logs": {
                "get": operation(
                    "What a task printed (a step's name takes its fan-out items' too), as `cairn logs --json`",
                    &[
                        op_id_param(),
                        json!({"name": "task", "in": "path", "required": true, "schema": {"type": "string"}}),
                        query("attempt", json!({"type": "integer", "minimum": 0, "maximum": u32::MAX}), "only this attempt"),
                        query("follow", json!({"enum": ["1", "0", "true", "false"]}), "1: Server-Sent Events (`text/event-stream`): an event `line` (a LogLine) for each line, new ones as they come, and `end` (`{\"status\": ...}`) once the op no longer runs"),
                    ],
                    None,
                    ("200", &json!({
                        "description": "the lines",
                        "content": {
                            "application/json": {"schema": {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/LogLine"},
                            }},
                            "text/event-stream": {"schema": sse_event(&["line", "end"])},
                        },
                    })),
                ),
            },
            "/ops/{id}/resume": {
                "post": operation(
                    "Resume a failed or interrupted op in the serving process",
                    &[op_id_param()],
                    Some(body(&json!({"from": optional_text("run this step and what follows it again")}), &[])),
                    ("202", &json_response("the op resumes", &answer)),
                ),
            },
            "/ops/{id}/cancel": {
                "post": operation(
                    "Cancel an op",
                    &[op_id_param()],
                    Some(body(&json!({"reason": optional_text("why, for the audit trail")}), &[])),
                    ("200", &json_response("canceled (202: its owner still ends it)", &answer)),
                ),
            },
            "/ops/{id}/approve": {
                "post": operation(
                    "Approve a waiting gate",
                    &[op_id_param()],
                    Some(body(&json!({
                        "step": optional_text("the gate; may be left out when one waits"),
                        "comment": optional_text("why, for the audit trail"),
                    }), &[])),
                    ("200", &json_response("approved", &answer)),
                ),
            },
            "/ops/{id}/reject": {
                "post": operation(
                    "Reject a waiting gate: its task fails",
                    &[op_id_param()],
                    Some(body(&json!({
                        "step": optional_text("the gate; may be left out when one waits"),
                        "comment": optional_text("why, for the audit trail"),
                    }), &[])),
                    ("200", &json_response("rejected", &answer)),
                ),
            },

    })
}

/// The paths of the whole of cairn (locks, the pause, nodes, schedules), marking a step, and
/// this document.
fn other_paths() -> Value {
    let object = json!({"type": "object"});
    let who = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "role": {"enum": ["viewer", "operator"]}},
        "required": ["name", "role"],
    });
    let answer = json!({"type": "object", "properties": {"id": {"type": "integer"}}});
    json!({
            "/locks": {
                "get": operation(
                    "Held locks, cooldowns and the pause (as `cairn locks --json`)",
                    &[],
                    None,
                    ("200", &json_response("locks", &object)),
                ),
            },
            "/pause": {
                "post": operation(
                    "Pause cairn, or one plan or lock-key prefix: no new op of it starts (running ones go on)",
                    &[],
                    Some(body(&json!({
                        "reason": optional_text("why, for the people who will be refused"),
                        "plan": optional_text("only ops of this plan"),
                        "key": optional_text("only ops whose lock key starts with this"),
                        "for": optional_text("a duration (`2h`): the pause ends by itself then"),
                    }), &[])),
                    ("200", &json_response("paused", &object)),
                ),
            },
            "/unpause": {
                "post": operation(
                    "Lift the pause of exactly this scope (none: the pause of every op)",
                    &[],
                    Some(body(&json!({"plan": optional_text("the pause of this plan"), "key": optional_text("the pause of this lock-key prefix")}), &[])),
                    ("200", &json_response("unpaused", &object)),
                ),
            },
            "/ack": {
                "post": operation(
                    "Acknowledge a lock key's cooldown, so a new op on it may start now",
                    &[],
                    Some(body(&json!({"key": text("the lock key"), "reason": optional_text("why, for the audit trail")}), &["key"])),
                    ("200", &json_response("acknowledged", &object)),
                ),
            },
            "/nodes": {
                "get": operation(
                    "The live serving nodes and the ops each holds (as `cairn nodes --json`)",
                    &[],
                    None,
                    ("200", &json_response("nodes", &json!({"type": "array", "items": {"type": "object"}}))),
                ),
            },
            "/schedules": {
                "get": operation(
                    "The schedules and their next firings (as `cairn schedule list --json`)",
                    &[],
                    None,
                    ("200", &json_response("schedules", &json!({"type": "array", "items": {"type": "object"}}))),
                ),
            },
            "/ops/{id}/mark": {
                "post": operation(
                    "Resolve a step by hand (as `cairn mark`); the next resume goes on from there",
                    &[op_id_param()],
                    Some(body(&json!({
                        "step": text("the step"),
                        "status": {"enum": ["succeeded", "skipped"]},
                        "reason": text("why, for the audit trail"),
                        "outputs": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
                        "allow_missing_outputs": {"type": ["boolean", "null"]},
                    }), &["step", "status", "reason"])),
                    ("200", &json_response("marked", &answer)),
                ),
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text: ops by open status, the queue's depth, tasks running, tasks' durations by kind, lease renewals and their failures, takeovers, commits' latency (this process's)",
                    "responses": {
                        "200": {"description": "the metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                        "401": error_response("no token, or one the store does not know"),
                    },
                },
            },
            "/openapi.json": {
                "get": operation("This document", &[], None, ("200", &json_response("the document", &object))),
            },
            "/login": {
                "post": operation(
                    "Begin a browser session: the token, given once, comes back as an HttpOnly, SameSite=Strict cookie (`cairn_session`) that every path takes as it takes the bearer header; actions by cookie need the header `x-cairn-action`",
                    &[],
                    Some(body(&json!({"token": text("a token of `cairn token create`")}), &["token"])),
                    ("200", &json_response("who the token is; the cookie is set", &who)),
                ),
            },
            "/logout": {
                "post": operation("End the browser session: the cookie is cleared (a body, if any, is not read)", &[], None, ("200", &json_response("logged out", &object))),
            },
            "/whoami": {
                "get": operation("The token's name and role", &[], None, ("200", &json_response("who calls", &who))),
            },
            "/changes": {
                "get": operation(
                    "Server-Sent Events: `resync` (`{}`: read again what you show) first and whenever what moved is not known, then `ops` (`[id, ...]`) naming the ops that moved, as they move",
                    &[],
                    None,
                    ("200", &json!({"description": "the events", "content": {"text/event-stream": {"schema": sse_event(&["resync", "ops"])}}})),
                ),
            },
    })
}

/// One Server-Sent Event of the kinds `names`: its `data` is JSON text (described in the
/// operation's summary).
fn sse_event(names: &[&str]) -> Value {
    json!({
        "type": "object",
        "properties": {
            "event": {"enum": names},
            "data": {"type": "string", "contentMediaType": "application/json"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    })
}

/// The schemas the paths refer to, and how a token is given.
fn components() -> Value {
    json!({
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "description": "stable, for programs"},
                        "message": {"type": "string", "description": "for people"},
                    },
                    "required": ["code", "message"],
                },
                "Op": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "uuid": {"type": "string"},
                        "plan": {"type": "string"},
                        "name": {"type": "string"},
                        "status": {"type": "string"},
                        "current_tasks": {"type": "array"},
                    },
                    "required": ["id", "uuid", "plan", "status"],
                },
                "LogLine": {
                    "type": "object",
                    "properties": {
                        "task": {"type": "string"},
                        "attempt": {"type": "integer"},
                        "stream": {"enum": ["stdout", "stderr", "cairn"]},
                        "time": {"type": "string"},
                        "text": {"type": "string"},
                    },
                    "required": ["task", "attempt", "stream", "time", "text"],
                },
            },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_names_every_route_and_no_other() {
        let doc = super::document();
        let mut named: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(move |m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let mut routes: Vec<(String, String)> = crate::api::ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        named.sort();
        routes.sort();
        assert_eq!(named, routes);
    }
}

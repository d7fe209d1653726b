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

fn op_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}})
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

/// The document.
#[must_use]
pub fn document() -> Value {
    json!({
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
    })
}

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
                        query("status", json!({"type": "string"}), "only ops shown with this status"),
                        query("plan", json!({"type": "string"}), "only ops of this plan"),
                        query("limit", json!({"type": "integer", "minimum": 1, "maximum": 500}), "ops per page (50)"),
                        query("before", json!({"type": "integer", "minimum": 1}), "only ops older than this one: the next page"),
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
                        "plan": text("the plan's YAML"),
                        "params": {"type": "object", "description": "the params, by name"},
                    }), &["plan"])),
                    ("201", &json_response("the op, queued", &json!({
                        "type": "object",
                        "properties": {"id": {"type": "integer"}, "uuid": {"type": "string"}},
                        "required": ["id", "uuid"],
                    }))),
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
                        query("attempt", json!({"type": "integer", "minimum": 0}), "only this attempt"),
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
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    })),
                ),
            },
            "/ops/{id}/resume": {
                "post": operation(
                    "Resume a failed or interrupted op in the serving process",
                    &[op_id_param()],
                    Some(body(&json!({"from": text("run this step and what follows it again")}), &[])),
                    ("202", &json_response("the op resumes", &answer)),
                ),
            },
            "/ops/{id}/cancel": {
                "post": operation(
                    "Cancel an op",
                    &[op_id_param()],
                    Some(body(&json!({"reason": text("why, for the audit trail")}), &[])),
                    ("200", &json_response("canceled (202: its owner still ends it)", &answer)),
                ),
            },
            "/ops/{id}/approve": {
                "post": operation(
                    "Approve a waiting gate",
                    &[op_id_param()],
                    Some(body(&json!({
                        "step": text("the gate; may be left out when one waits"),
                        "comment": text("why, for the audit trail"),
                    }), &[])),
                    ("200", &json_response("approved", &answer)),
                ),
            },
            "/ops/{id}/reject": {
                "post": operation(
                    "Reject a waiting gate: its task fails",
                    &[op_id_param()],
                    Some(body(&json!({
                        "step": text("the gate; may be left out when one waits"),
                        "comment": text("why, for the audit trail"),
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
                    "Pause cairn: no new op starts (running ones go on)",
                    &[],
                    Some(body(&json!({"reason": text("why, for the people who will be refused")}), &[])),
                    ("200", &json_response("paused", &object)),
                ),
            },
            "/unpause": {
                "post": operation("Let new ops start again", &[], Some(body(&json!({}), &[])), ("200", &json_response("unpaused", &object))),
            },
            "/ack": {
                "post": operation(
                    "Acknowledge a lock key's cooldown, so a new op on it may start now",
                    &[],
                    Some(body(&json!({"key": text("the lock key"), "reason": text("why, for the audit trail")}), &["key"])),
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
                        "outputs": {"type": "object", "additionalProperties": {"type": "string"}},
                        "allow_missing_outputs": {"type": "boolean"},
                    }), &["step", "status", "reason"])),
                    ("200", &json_response("marked", &answer)),
                ),
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
                "post": operation("End the browser session: the cookie is cleared", &[], Some(body(&json!({}), &[])), ("200", &json_response("logged out", &object))),
            },
            "/whoami": {
                "get": operation("The token's name and role", &[], None, ("200", &json_response("who calls", &who))),
            },
            "/changes": {
                "get": operation(
                    "Server-Sent Events `ops`: `[[id, n], ...]`, each op's newest event number; every op first, then the ops whose number moved, as they move",
                    &[],
                    None,
                    ("200", &json!({"description": "the events", "content": {"text/event-stream": {"schema": {"type": "string"}}}})),
                ),
            },
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

//! Turning what a user passed (`-p KEY=VALUE`, `--params FILE`) into an op's parameters: each
//! value read as its param's type, enums and required params enforced, defaults filled in.

use serde_json::{Map, Value};

use crate::model::{Param, ParamType, Plan};
use crate::validate::suggest;

/// A problem with the parameters given to an op.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    pub message: String,
}

fn error(message: String) -> ParamError {
    ParamError { message }
}

/// How a value given for `param` is quoted in a message: never a secret's.
fn quoted(param: &Param, text: &str) -> String {
    if param.secret {
        "a value that is not one (secret, not shown)".to_owned()
    } else {
        format!("`{text}`")
    }
}

/// Reads a command-line value as the param's type.
fn coerce(param: &Param, text: &str) -> Result<Value, ParamError> {
    let name = &param.name;
    match param.ty {
        ParamType::String => Ok(Value::String(text.to_owned())),
        ParamType::Int => text.trim().parse::<i64>().map(Value::from).map_err(|_| {
            error(format!(
                "param `{name}` takes an int, found {}",
                quoted(param, text)
            ))
        }),
        ParamType::Bool => match text.trim() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(error(format!(
                "param `{name}` takes `true` or `false`, found {}",
                quoted(param, text)
            ))),
        },
        ParamType::List => {
            if text.trim_start().starts_with('[') {
                serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(Value::is_array)
                    .ok_or_else(|| {
                        let shown = if param.secret {
                            "the value given (secret, not shown)".to_owned()
                        } else {
                            format!("`{text}`")
                        };
                        error(format!(
                            "param `{name}` takes a list: `a,b,c` or a JSON array; {shown} is not valid JSON"
                        ))
                    })
            } else if text.is_empty() {
                Ok(Value::Array(Vec::new()))
            } else {
                Ok(Value::Array(
                    text.split(',')
                        .map(|s| Value::String(s.trim().to_owned()))
                        .collect(),
                ))
            }
        }
        ParamType::Map => serde_json::from_str::<Value>(text)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                error(format!(
                    "param `{name}` takes a map, written as a JSON object; found {}",
                    quoted(param, text)
                ))
            }),
    }
}

/// Whether `value` holds a NUL character anywhere (in a string, a list's item, a map's key or
/// value): no process can receive it in its environment or arguments.
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// The problem with `param`'s resolved `value` that reading it as its type cannot see: a NUL, or
/// a value outside its `enum`.
fn refused(param: &Param, value: &Value) -> Option<ParamError> {
    if has_nul(value) {
        return Some(error(format!(
            "param `{}` holds a NUL character, which no step's environment or command line can carry",
            param.name
        )));
    }
    let choices = param.choices.as_ref()?;
    if choices.contains(value) {
        return None;
    }
    let shown = if param.secret {
        "the value given".to_owned()
    } else {
        format!("`{}`", plain(value))
    };
    Some(error(format!(
        "param `{}`: {shown} is not one of {}",
        param.name,
        choices
            .iter()
            .map(|c| format!("`{}`", plain(c)))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// Builds the op's parameters from `given` (`-p` pairs, later ones winning) over `file` (a
/// `--params` mapping). Every problem is reported, not just the first.
pub fn resolve(
    plan: &Plan,
    given: &[(String, String)],
    file: Option<&Map<String, Value>>,
) -> Result<Map<String, Value>, Vec<ParamError>> {
    let mut problems = Vec::new();
    let mut values = Map::new();
    let unknown = |name: &str| {
        let names = plan.params.iter().map(|p| p.name.as_str());
        let hint = match suggest(name, names) {
            Some(s) => format!("; did you mean `{s}`?"),
            None if plan.params.is_empty() => "; the plan takes no params".to_owned(),
            None => format!(
                "; the plan takes {}",
                plan.params
                    .iter()
                    .map(|p| format!("`{}`", p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        error(format!("plan `{}` has no param `{name}`{hint}", plan.name))
    };
    for (name, value) in file.into_iter().flatten() {
        match plan.param(name) {
            None => problems.push(unknown(name)),
            Some(param) => {
                // A file value is already typed by YAML/JSON; a string may still need reading.
                let value = match value {
                    Value::String(s) if param.ty != ParamType::String => coerce(param, s),
                    other if param.ty.admits(other) => Ok(other.clone()),
                    other => Err(error(format!(
                        "param `{name}` takes a {}, found {}",
                        param.ty.name(),
                        quoted(param, &other.to_string())
                    ))),
                };
                match value {
                    Ok(v) => {
                        values.insert(name.clone(), v);
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
    }
    for (name, text) in given {
        match plan.param(name) {
            None => problems.push(unknown(name)),
            Some(param) => match coerce(param, text) {
                Ok(v) => {
                    values.insert(name.clone(), v);
                }
                Err(e) => problems.push(e),
            },
        }
    }
    for param in &plan.params {
        match values.get(&param.name) {
            Some(value) => problems.extend(refused(param, value)),
            None => match &param.default {
                Some(default) => {
                    problems.extend(refused(param, default));
                    values.insert(param.name.clone(), default.clone());
                }
                None if param.required => problems.push(error(format!(
                    "param `{}` is required{}",
                    param.name,
                    param
                        .description
                        .as_ref()
                        .map_or(String::new(), |d| format!(" ({d})"))
                ))),
                None => {}
            },
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems)
    }
}

/// Reads new values for some of an op's params (`resume --param`, later pairs winning) as the
/// plan's types, with the same checks as [`resolve`]: each must be a param of the plan.
pub fn changes(
    plan: &Plan,
    given: &[(String, String)],
) -> Result<Map<String, Value>, Vec<ParamError>> {
    let mut problems = Vec::new();
    let mut values = Map::new();
    for (name, text) in given {
        let Some(param) = plan.param(name) else {
            let names = plan.params.iter().map(|p| p.name.as_str());
            let hint =
                suggest(name, names).map_or(String::new(), |s| format!("; did you mean `{s}`?"));
            problems.push(error(format!(
                "plan `{}` has no param `{name}`{hint}",
                plan.name
            )));
            continue;
        };
        match coerce(param, text) {
            Ok(v) => match refused(param, &v) {
                Some(e) => problems.push(e),
                None => {
                    values.insert(name.clone(), v);
                }
            },
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems)
    }
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads the text of a `--params` file (`file` names it in messages): a YAML or JSON mapping of
/// param names to values, within the YAML budget of a plan ([`crate::limits`]).
pub fn parse_file(file: &str, text: &str) -> Result<Map<String, Value>, ParamError> {
    let options = serde_saphyr::options! { budget: Some(crate::limits::budget()) };
    let value: Value = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        match crate::limits::breached(&e) {
            Some(b) => error(format!(
                "`{file}` is too large: {}",
                crate::limits::breach(b)
            )),
            None => error(format!("`{file}` is not a YAML or JSON mapping: {e}")),
        }
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(error(format!(
            "`{file}` is not a mapping of param names to values"
        ))),
    }
}

/// Splits `KEY=VALUE`.
pub fn split_pair(text: &str) -> Result<(String, String), ParamError> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| error(format!("`{text}` is not `KEY=VALUE`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        crate::parse(
            "p.yaml",
            "name: p\nparams:\n  target: { required: true }\n  port: { type: int, default: 5432 }\n  role: { enum: [follower, logger], default: follower }\n  shards: { type: list }\n  local: { type: bool, default: false }\nsteps:\n  - id: a\n    noop: true\n",
        )
        .unwrap()
    }

    #[test]
    fn values_are_typed_and_defaults_filled() {
        let given = vec![
            ("target".into(), "pod-2".into()),
            ("shards".into(), "a, b".into()),
            ("local".into(), "true".into()),
        ];
        let values = resolve(&plan(), &given, None).unwrap();
        assert_eq!(
            Value::Object(values),
            serde_json::json!({"target": "pod-2", "port": 5432, "role": "follower", "shards": ["a", "b"], "local": true})
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let given = vec![
            ("port".into(), "many".into()),
            ("role".into(), "leader".into()),
            ("tagret".into(), "x".into()),
        ];
        let problems: Vec<String> = resolve(&plan(), &given, None)
            .unwrap_err()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(
            problems,
            vec![
                "param `port` takes an int, found `many`",
                "plan `p` has no param `tagret`; did you mean `target`?",
                "param `target` is required",
                "param `role`: `leader` is not one of `follower`, `logger`",
            ]
        );
    }

    #[test]
    fn a_secret_is_never_quoted_and_a_nul_is_refused() {
        let plan = crate::parse(
            "p.yaml",
            "name: p\nparams:\n  pin: { type: int, secret: true }\n  keys: { type: list, secret: true }\n  note: { type: string, default: \"a\\0b\" }\nsteps:\n  - id: a\n    noop: true\n",
        )
        .unwrap();
        let given = vec![
            ("pin".into(), "S3cr3t-pin".into()),
            ("keys".into(), "[\"S3cr3t-key".into()),
        ];
        let problems: Vec<String> = resolve(&plan, &given, None)
            .unwrap_err()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert!(!problems.join("\n").contains("S3cr3t"), "{problems:?}");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[2].starts_with("param `note` holds a NUL"),
            "{problems:?}"
        );
        let file = Map::from_iter([("keys".to_owned(), serde_json::json!(["x\u{0}y"]))]);
        let problems = resolve(&plan, &[("pin".into(), "1".into())], Some(&file)).unwrap_err();
        assert!(
            problems[0].message.starts_with("param `keys` holds a NUL"),
            "{problems:?}"
        );
    }
}

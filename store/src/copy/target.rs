//! The PostgreSQL side of a copy: one transaction on a connection of its own (made by the
//! backend's [`Target`]). Its tables, columns and types come from the catalog and must match the
//! source's; it must hold nothing yet; each table is streamed in with binary `COPY`, parents
//! before children (by its foreign keys); sequences are moved past what was copied.

use std::collections::BTreeMap;

use postgres::Transaction;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use rusqlite::types::ValueRef;

use super::source::{self, Source, quote};
use crate::error::{Error, Result};
use crate::postgres::{Target, describe};

/// Columns of the SQLite schema that PostgreSQL's leaves out on purpose: `ops.event_seq`, no
/// longer kept since SQLite's schema version 4 (`store/migrations/postgres/0001_initial.sql`).
const SQLITE_ONLY: &[(&str, &str)] = &[("ops", "event_seq")];

/// SQLite's own tables, with nothing to copy from them: `moves`, the log of which ops moved that
/// a follower of changes reads (PostgreSQL tells them by `NOTIFY`).
const SQLITE_ONLY_TABLES: &[&str] = &["moves"];

/// PostgreSQL's own tables, with nothing to copy into them: what the database is
/// (`cairn_meta`), and the writers' commit tokens.
const POSTGRES_ONLY: &[&str] = &["cairn_meta", "commit_tokens"];

/// The table serving nodes write on their own: a node of the target's started before the copy may
/// have recorded itself there. It is neither locked nor required to be empty.
const NODES: &str = "nodes";

/// How a column's values are written: the PostgreSQL types cairn's schema uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Bytes,
}

impl Kind {
    fn of(ty: &Type) -> Option<Self> {
        match *ty {
            Type::INT8 => Some(Self::Int),
            Type::TEXT => Some(Self::Text),
            Type::BYTEA => Some(Self::Bytes),
            _ => None,
        }
    }

    fn ty(self) -> Type {
        match self {
            Self::Int => Type::INT8,
            Self::Text => Type::TEXT,
            Self::Bytes => Type::BYTEA,
        }
    }

    /// A SQLite value as this kind, unchanged; what it holds instead, when it is not one.
    fn cell(self, value: ValueRef<'_>) -> std::result::Result<Box<dyn ToSql + Sync>, String> {
        Ok(match (self, value) {
            (Self::Int, ValueRef::Null) => Box::new(None::<i64>),
            (Self::Text, ValueRef::Null) => Box::new(None::<String>),
            (Self::Bytes, ValueRef::Null) => Box::new(None::<Vec<u8>>),
            (Self::Int, ValueRef::Integer(n)) => Box::new(n),
            (Self::Text, ValueRef::Text(text)) => match std::str::from_utf8(text) {
                Ok(text) => Box::new(text.to_owned()),
                Err(_) => return Err("text that is not UTF-8".to_owned()),
            },
            (Self::Bytes, ValueRef::Text(bytes) | ValueRef::Blob(bytes)) => {
                Box::new(bytes.to_vec())
            }
            (_, other) => return Err(format!("a value of type {}", other.data_type())),
        })
    }
}

/// Every column of every table of the target, by table, in the columns' order: its name, type,
/// and the sequence that gives its values by default, if any.
type Catalog = BTreeMap<String, Vec<(String, Type, Option<String>)>>;

/// A column of a table to copy.
#[derive(Debug)]
struct Column {
    name: String,
    kind: Kind,
    /// The sequence that gives its values by default (an identity column), if any.
    sequence: Option<String>,
}

/// A table to copy, its columns in PostgreSQL's order.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) name: String,
    columns: Vec<Column>,
}

/// The copy's transaction on the target.
pub(super) struct Writing<'a> {
    tx: Transaction<'a>,
    target: &'a Target,
}

impl<'a> Writing<'a> {
    /// Begins the transaction: durable at commit whatever the server's default, and waiting
    /// at most 30 s for a lock another process holds.
    pub(super) fn begin(client: &'a mut postgres::Client, target: &'a Target) -> Result<Self> {
        let mut tx = client.transaction().map_err(|e| fail(target, &e))?;
        tx.batch_execute("SET LOCAL synchronous_commit = on; SET LOCAL lock_timeout = '30s'")
            .map_err(|e| fail(target, &e))?;
        Ok(Self { tx, target })
    }

    /// The source's tables as the target has them, parents first; refused when the two schemas
    /// differ (a table or column on one side only, a type a copy does not write).
    pub(super) fn plan(&mut self, source: &[source::Table]) -> Result<Vec<Table>> {
        let target = self.target;
        let catalog = self.catalog()?;
        let tables = matched(source, catalog).map_err(|problems| {
            target.unusable(&format!(
                "its schema does not match the source's: {}; nothing was copied",
                problems.join("; ")
            ))
        })?;
        let parents = self.foreign_keys()?;
        ordered(tables, &parents).map_err(|why| target.unusable(&why))
    }

    /// Every column of every table of the current schema (see [`Catalog`]).
    fn catalog(&mut self) -> Result<Catalog> {
        let rows = self
            .tx
            .query(
                "SELECT c.relname::text, a.attname::text, a.atttypid, \
                        pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname) \
                 FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid \
                 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') \
                   AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY c.relname, a.attnum",
                &[],
            )
            .map_err(|e| fail(self.target, &e))?;
        let mut catalog = Catalog::new();
        for row in rows {
            let ty = Type::from_oid(row.get(2)).unwrap_or(Type::UNKNOWN);
            catalog
                .entry(row.get(0))
                .or_default()
                .push((row.get(1), ty, row.get(3)));
        }
        Ok(catalog)
    }

    /// The foreign keys of the current schema, as (child table, parent table).
    fn foreign_keys(&mut self) -> Result<Vec<(String, String)>> {
        let rows = self
            .tx
            .query(
                "SELECT child.relname::text, parent.relname::text FROM pg_constraint k \
                 JOIN pg_class child ON child.oid = k.conrelid \
                 JOIN pg_class parent ON parent.oid = k.confrelid \
                 JOIN pg_namespace n ON n.oid = child.relnamespace \
                 WHERE k.contype = 'f' AND n.nspname = current_schema()",
                &[],
            )
            .map_err(|e| fail(self.target, &e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Locks the tables to copy into against every other writer until the commit, then refuses
    /// a target that holds anything already: first of all, ops.
    pub(super) fn refuse_unless_empty(&mut self, plan: &[Table]) -> Result<()> {
        let names: Vec<String> = plan
            .iter()
            .filter(|t| t.name != NODES)
            .map(|t| quote(&t.name))
            .collect();
        self.tx
            .batch_execute(&format!(
                "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
                names.join(", ")
            ))
            .map_err(|e| fail(self.target, &e))?;
        let mut held = Vec::new();
        for table in plan.iter().filter(|t| t.name != NODES) {
            let sql = format!("SELECT count(*) FROM {}", quote(&table.name));
            let row = self
                .tx
                .query_one(&sql, &[])
                .map_err(|e| fail(self.target, &e))?;
            let count: i64 = row.get(0);
            if count > 0 {
                held.push((table.name.as_str(), count));
            }
        }
        held.sort_by_key(|(name, _)| *name != "ops");
        let Some((name, count)) = held.first() else {
            return Ok(());
        };
        let what = match (*name, *count) {
            ("ops", 1) => "1 op".to_owned(),
            ("ops", n) => format!("{n} ops"),
            (table, n) => format!("{n} row(s) in `{table}`"),
        };
        Err(self.target.unusable(&format!(
            "it already holds {what}: a copy goes into a database that holds none (make a new one, e.g. with `createdb`); nothing was copied"
        )))
    }

    /// Streams every row of `table` from the source in; how many there were.
    pub(super) fn copy(&mut self, table: &Table, source: &Source) -> Result<u64> {
        let target = self.target;
        let fail = |e: &postgres::Error| {
            target.unusable(&format!("copying `{}`: {}", table.name, describe(e)))
        };
        let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        let types: Vec<Type> = table.columns.iter().map(|c| c.kind.ty()).collect();
        let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
        let sql = format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            quote(&table.name),
            quoted.join(", ")
        );
        let mut writer =
            BinaryCopyInWriter::new(self.tx.copy_in(&sql).map_err(|e| fail(&e))?, &types);
        let mut row = 0u64;
        source.rows(&table.name, &names, |values| {
            row += 1;
            let cells = values
                .iter()
                .zip(&table.columns)
                .map(|(value, column)| {
                    column.kind.cell(*value).map_err(|held| {
                        target.unusable(&format!(
                            "row {row} of `{}` cannot be copied: its `{}` holds {held}, where PostgreSQL keeps {}; nothing was copied",
                            table.name,
                            column.name,
                            column.kind.ty()
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&(dyn ToSql + Sync)> = cells.iter().map(AsRef::as_ref).collect();
            writer.write(&refs).map_err(|e| fail(&e))
        })?;
        writer.finish().map_err(|e| fail(&e))
    }

    /// Moves every sequence of the copied tables past the highest value copied, so that rows
    /// made later never collide (`setval` is not undone by a rollback: a copy that fails after
    /// it leaves a sequence further on, never a row), and tells listening nodes once the copy
    /// commits (`NOTIFY cairn`).
    pub(super) fn finish(&mut self, plan: &[Table]) -> Result<()> {
        let target = self.target;
        for table in plan {
            for column in &table.columns {
                let Some(sequence) = &column.sequence else {
                    continue;
                };
                let sql = format!(
                    "SELECT setval($1::text::regclass, coalesce((SELECT max({}) FROM {}), 0) + 1, false)",
                    quote(&column.name),
                    quote(&table.name)
                );
                self.tx
                    .execute(&sql, &[sequence])
                    .map_err(|e| fail(target, &e))?;
            }
        }
        self.tx
            .batch_execute("NOTIFY cairn")
            .map_err(|e| fail(target, &e))
    }

    pub(super) fn commit(self) -> Result<()> {
        self.tx.commit().map_err(|e| fail(self.target, &e))
    }
}

/// A failure of the server, in its words, naming it.
fn fail(target: &Target, err: &postgres::Error) -> Error {
    target.unusable(&describe(err))
}

/// The source's tables with the target's columns; every difference between the two schemas
/// when they do not match.
fn matched(
    source: &[source::Table],
    mut catalog: Catalog,
) -> std::result::Result<Vec<Table>, Vec<String>> {
    let mut problems = Vec::new();
    let mut tables = Vec::new();
    for table in source
        .iter()
        .filter(|t| !SQLITE_ONLY_TABLES.contains(&t.name.as_str()))
    {
        let Some(found) = catalog.remove(&table.name) else {
            problems.push(format!("the source's table `{}` is not in it", table.name));
            continue;
        };
        let kept = |c: &&String| !SQLITE_ONLY.contains(&(table.name.as_str(), c.as_str()));
        for column in table.columns.iter().filter(kept) {
            if !found.iter().any(|(name, ..)| name == column) {
                problems.push(format!(
                    "the source's column `{}.{column}` is not in it",
                    table.name
                ));
            }
        }
        let mut columns = Vec::new();
        for (name, ty, sequence) in found {
            if !table.columns.contains(&name) {
                problems.push(format!(
                    "its column `{}.{name}` is not in the source",
                    table.name
                ));
            }
            match Kind::of(&ty) {
                Some(kind) => columns.push(Column {
                    name,
                    kind,
                    sequence,
                }),
                None => problems.push(format!(
                    "its column `{}.{name}` is of type {ty}, which a copy does not write",
                    table.name
                )),
            }
        }
        tables.push(Table {
            name: table.name.clone(),
            columns,
        });
    }
    for name in catalog
        .keys()
        .filter(|n| !POSTGRES_ONLY.contains(&n.as_str()))
    {
        problems.push(format!("its table `{name}` is not in the source"));
    }
    if problems.is_empty() {
        Ok(tables)
    } else {
        Err(problems)
    }
}

/// `tables` with every table after the tables it refers to (`parents`: (child, parent)), in
/// their own order otherwise.
fn ordered(
    mut tables: Vec<Table>,
    parents: &[(String, String)],
) -> std::result::Result<Vec<Table>, String> {
    let mut done = Vec::with_capacity(tables.len());
    while !tables.is_empty() {
        let waits = |table: &Table| {
            parents.iter().any(|(child, parent)| {
                *child == table.name
                    && *parent != table.name
                    && tables.iter().any(|t| t.name == *parent)
            })
        };
        let Some(next) = tables.iter().position(|t| !waits(t)) else {
            let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "its tables {names:?} refer to each other in a cycle, which a copy cannot order"
            ));
        };
        done.push(tables.remove(next));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, columns: &[&str]) -> source::Table {
        source::Table {
            name: name.to_owned(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn catalog(tables: &[(&str, &[(&str, Type)])]) -> Catalog {
        tables
            .iter()
            .map(|(name, columns)| {
                let columns = columns
                    .iter()
                    .map(|(c, ty)| ((*c).to_owned(), ty.clone(), None))
                    .collect();
                ((*name).to_owned(), columns)
            })
            .collect()
    }

    fn names(table: &Table) -> Vec<&str> {
        table.columns.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn schemas_match_but_for_what_one_side_keeps_on_purpose() {
        let tables = matched(
            &[
                source("ops", &["id", "event_seq", "title"]),
                source("logs", &["data"]),
            ],
            catalog(&[
                ("cairn_meta", &[("key", Type::TEXT)]),
                ("logs", &[("data", Type::BYTEA)]),
                ("ops", &[("title", Type::TEXT), ("id", Type::INT8)]),
            ]),
        )
        .unwrap();
        // In the source's order of tables, PostgreSQL's order of columns; `event_seq` not copied.
        assert_eq!(tables[0].name, "ops");
        assert_eq!(names(&tables[0]), ["title", "id"]);
        assert_eq!(tables[1].columns[0].kind, Kind::Bytes);
    }

    #[test]
    fn every_difference_between_the_schemas_is_named() {
        let problems = matched(
            &[source("ops", &["id", "gone"]), source("only_here", &["x"])],
            catalog(&[
                ("ops", &[("id", Type::INT4), ("extra", Type::TEXT)]),
                ("only_there", &[("y", Type::TEXT)]),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "the source's column `ops.gone` is not in it",
                "its column `ops.id` is of type int4, which a copy does not write",
                "its column `ops.extra` is not in the source",
                "the source's table `only_here` is not in it",
                "its table `only_there` is not in the source",
            ]
        );
    }

    #[test]
    fn parents_are_copied_before_their_children() {
        let table = |name: &str| Table {
            name: name.to_owned(),
            columns: Vec::new(),
        };
        let fk = |child: &str, parent: &str| (child.to_owned(), parent.to_owned());
        let parents = [
            fk("tasks", "ops"),
            fk("ops", "ops"),
            fk("ops", "plan_snapshots"),
            fk("elsewhere", "ops"),
        ];
        let order = ordered(
            vec![
                table("tasks"),
                table("settings"),
                table("ops"),
                table("plan_snapshots"),
            ],
            &parents,
        )
        .unwrap();
        let order: Vec<&str> = order.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(order, ["settings", "plan_snapshots", "ops", "tasks"]);
        let cycle = ordered(vec![table("a"), table("b")], &[fk("a", "b"), fk("b", "a")]);
        assert!(cycle.unwrap_err().contains("cycle"));
    }

    #[test]
    fn a_value_of_another_type_is_refused_never_changed() {
        assert!(Kind::Int.cell(ValueRef::Integer(7)).is_ok());
        assert!(Kind::Int.cell(ValueRef::Null).is_ok());
        assert!(Kind::Bytes.cell(ValueRef::Text(b"text")).is_ok());
        assert_eq!(
            Kind::Int.cell(ValueRef::Real(1.5)).err().unwrap(),
            "a value of type Real"
        );
        assert_eq!(
            Kind::Int.cell(ValueRef::Text(b"7")).err().unwrap(),
            "a value of type Text"
        );
        assert_eq!(
            Kind::Text.cell(ValueRef::Text(b"\xff")).err().unwrap(),
            "text that is not UTF-8"
        );
        assert!(Kind::Text.cell(ValueRef::Blob(b"x")).is_err());
    }
}

//! The JSON Schema (draft-07) of the plan format, for editors that check YAML against a schema.

use schemars::generate::SchemaSettings;

use crate::raw::RawPlan;

/// The plan format's JSON Schema, pretty-printed.
#[must_use]
pub fn json_schema() -> String {
    let generator = SchemaSettings::draft07().into_generator();
    let schema = generator.into_root_schema_for::<RawPlan>();
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

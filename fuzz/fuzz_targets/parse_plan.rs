//! Any bytes given as a plan file: parsing and validation never panic, and everything cairn
//! prints about the result (problems as text and JSON, the graph in every format, a diff of the
//! plan against itself) is produced without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plans::graph::{Format, render};

fuzz_target!(|data: &[u8]| {
    match plans::parse_bytes("fuzz.yaml", data) {
        Ok(plan) => {
            for format in [Format::Text, Format::Dot, Format::Mermaid] {
                let _ = render(&plan, format);
            }
            assert!(plans::drift::diff(&plan, &plan).is_empty());
            let _ = plan.dag.order();
        }
        Err(problems) => {
            assert!(!problems.list.is_empty());
            let _ = problems.render(false);
            let _ = problems.json();
        }
    }
});

//! parse → validate → render on hostile input: any bytes, and the example plans with random edits
//! (bytes replaced, inserted, deleted, lines swapped). The parser never panics; a rejected plan
//! has at least one problem, each pointing inside the file, and renders as text and JSON; an
//! accepted plan renders its graph and is its own diff-free twin. The fuzz target in `fuzz/` does
//! the same, guided by coverage, for much longer.

use plans::graph::{Format, render};
use proptest::prelude::*;

static EXAMPLES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(examples);

fn examples() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut texts = Vec::new();
    for dir in ["examples", "tests/plans/invalid"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                texts.push(String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned());
            }
        }
    }
    assert!(texts.len() > 50, "the seed plans are missing");
    texts
}

#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, u8),
    Insert(prop::sample::Index, String),
    Delete(prop::sample::Index, usize),
    SwapLines(prop::sample::Index, prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                Just("{{".to_owned()),
                Just("}}".to_owned()),
                Just("\n  - ".to_owned()),
                Just(": ".to_owned()),
                Just("[".to_owned()),
                Just("needs: [a]".to_owned()),
                Just("&x *x <<: ".to_owned()),
                Just("\u{0}".to_owned()),
                "[ -~]{0,12}".prop_map(|s| s),
            ]
        )
            .prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<prop::sample::Index>(), 0..20usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Edit::SwapLines(a, b)),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for e in edits {
        let len = bytes.len().max(1);
        match e {
            Edit::Replace(i, b) => {
                if !bytes.is_empty() {
                    let at = i.index(len);
                    bytes[at] = *b;
                }
            }
            Edit::Insert(i, s) => {
                let at = i.index(len + 1).min(bytes.len());
                bytes.splice(at..at, s.bytes());
            }
            Edit::Delete(i, n) => {
                let at = i.index(len).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Edit::SwapLines(a, b) => {
                let mut lines: Vec<Vec<u8>> =
                    bytes.split(|c| *c == b'\n').map(<[u8]>::to_vec).collect();
                let n = lines.len();
                lines.swap(a.index(n), b.index(n));
                bytes = lines.join(&b'\n');
            }
        }
    }
    bytes
}

fn check(bytes: &[u8]) {
    match plans::parse_bytes("edited.yaml", bytes) {
        Ok(plan) => {
            for format in [Format::Text, Format::Dot, Format::Mermaid] {
                assert!(!render(&plan, format).is_empty());
            }
            assert!(plans::drift::diff(&plan, &plan).is_empty());
        }
        Err(problems) => {
            assert!(!problems.list.is_empty());
            for p in &problems.list {
                if let Some(span) = &p.span {
                    assert!(
                        span.offset + span.len <= problems.source.len(),
                        "{}: span {span:?} outside a source of {} bytes",
                        p.code,
                        problems.source.len()
                    );
                }
            }
            assert!(!problems.render(false).is_empty());
            let _ = problems.json();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_bytes_parse_or_give_problems(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check(&bytes);
    }

    #[test]
    fn edited_plans_parse_or_give_problems(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let text = &EXAMPLES[which.index(EXAMPLES.len())];
        check(&apply(text, &edits));
    }
}

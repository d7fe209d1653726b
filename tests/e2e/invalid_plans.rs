//! The catalogue of invalid plans under `tests/plans/invalid/`. Each file's first line says where
//! its first problem is and what it is — `# expect: LINE:COL CODE` — and `cairn validate` must
//! reject it (exit 2) with that problem at that place. The full message is snapshot-tested.

use crate::support::{cairn_in, root, stderr, stdout};

#[test]
fn every_invalid_plan_is_rejected_at_the_right_place() {
    let dir = root().join("tests/plans/invalid");
    let mut count = 0;
    let mut wrong = Vec::new();
    insta::glob!("../plans/invalid", "*.yaml", |path| {
        count += 1;
        let name = path.file_name().unwrap().to_str().unwrap();
        let text = std::fs::read(path).unwrap();
        let first_line =
            String::from_utf8_lossy(text.split(|b| *b == b'\n').next().unwrap()).into_owned();
        let expect = first_line
            .strip_prefix("# expect: ")
            .unwrap_or_else(|| panic!("{name}: the first line must be `# expect: LINE:COL CODE`"));
        let (place, code) = expect.trim().split_once(' ').expect("`LINE:COL CODE`");

        let json = cairn_in(&dir, &["validate", "--json", name]);
        assert_eq!(json.status.code(), Some(2), "{name}: validate must exit 2");
        let results: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
        let first = &results[0]["problems"][0];
        let found = format!(
            "{}:{} {}",
            first["line"],
            first["column"],
            first["code"].as_str().unwrap()
        );
        if found != format!("{place} {code}") {
            wrong.push(format!(
                "{name}: expected {place} {code}, found {found}: {}",
                first["message"]
            ));
        }

        let human = cairn_in(&dir, &["validate", name]);
        assert_eq!(human.status.code(), Some(2));
        insta::assert_snapshot!(stderr(&human));
    });
    assert!(
        wrong.is_empty(),
        "problems not where expected:\n{}",
        wrong.join("\n")
    );
    assert!(count >= 25, "the catalogue has only {count} plans");
}

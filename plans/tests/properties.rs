//! Properties of the plan layer: topological order respects every edge, cycles are real, and
//! shell quoting delivers every value to bash exactly as it was.

use std::process::Command;

use plans::dag::Dag;
use plans::template::{Context, Quoting, Template};
use proptest::prelude::*;

/// A random DAG of `n` steps: edges only go from a lower to a higher rank, and ranks are a random
/// permutation of the indexes, so the order is not simply the file order.
fn dag_strategy() -> impl Strategy<Value = Vec<Vec<usize>>> {
    (1usize..40)
        .prop_flat_map(|n| {
            (
                Just(n),
                Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                proptest::collection::vec(
                    proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
                    n,
                ),
            )
        })
        .prop_map(|(n, rank, picks)| {
            // `position[r]` is the step at rank r.
            let mut needs = vec![Vec::new(); n];
            for (r, picks) in picks.iter().enumerate() {
                if r == 0 {
                    continue;
                }
                let step = rank[r];
                for pick in picks {
                    let need = rank[pick.index(r)];
                    if !needs[step].contains(&need) {
                        needs[step].push(need);
                    }
                }
            }
            needs
        })
}

proptest! {
    #[test]
    fn topological_order_respects_every_edge(needs in dag_strategy()) {
        let dag = Dag::new(needs.clone()).expect("a DAG");
        let order = dag.order();
        prop_assert_eq!(order.len(), needs.len());
        let mut position = vec![usize::MAX; needs.len()];
        for (p, &s) in order.iter().enumerate() {
            prop_assert_eq!(position[s], usize::MAX, "step {} appears twice", s);
            position[s] = p;
        }
        for (step, step_needs) in needs.iter().enumerate() {
            for &need in step_needs {
                prop_assert!(position[need] < position[step], "{} runs before {}, which it needs", step, need);
                prop_assert!(dag.is_upstream(need, step));
            }
        }
    }

    #[test]
    fn a_reported_cycle_is_a_real_cycle(
        needs in proptest::collection::vec(proptest::collection::vec(0usize..12, 0..3), 1..12)
    ) {
        let n = needs.len();
        let needs: Vec<Vec<usize>> = needs
            .into_iter()
            .map(|v| { let mut v: Vec<usize> = v.into_iter().filter(|&x| x < n).collect(); v.sort_unstable(); v.dedup(); v })
            .collect();
        match Dag::new(needs.clone()) {
            Ok(dag) => {
                let mut position = vec![0; n];
                for (p, &s) in dag.order().iter().enumerate() { position[s] = p; }
                for (s, ns) in needs.iter().enumerate() {
                    for &x in ns { prop_assert!(position[x] < position[s]); }
                }
            }
            Err(cycles) => {
                prop_assert!(!cycles.is_empty());
                for cycle in cycles {
                    let path = cycle.0;
                    prop_assert_eq!(path.first(), path.last());
                    for pair in path.windows(2) {
                        prop_assert!(needs[pair[0]].contains(&pair[1]), "{} does not need {}", pair[0], pair[1]);
                    }
                }
            }
        }
    }
}

/// Runs `script` with `bash -c` (as a `run` step does) and returns the NUL-separated words it printed.
fn run_bash(shell: &str, script: &str) -> Vec<String> {
    let out = Command::new(shell)
        .arg("-c")
        .arg(script)
        .output()
        .expect("the shell runs");
    assert!(
        out.status.success(),
        "{shell} failed on {script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut words: Vec<String> = text.split('\0').map(str::to_owned).collect();
    words.pop();
    words
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        // Anything but NUL, which no shell argument can hold.
        "[^\\x00]{0,40}",
        // Shell metacharacters, denser.
        proptest::collection::vec(
            prop_oneof![
                Just("'"),
                Just("\""),
                Just("`"),
                Just("$("),
                Just(")"),
                Just(";"),
                Just("\n"),
                Just("\\"),
                Just("$HOME"),
                Just("${x}"),
                Just("*"),
                Just("?"),
                Just("["),
                Just("]"),
                Just("!"),
                Just("&"),
                Just("|"),
                Just(">"),
                Just("<"),
                Just("#"),
                Just(" "),
                Just("\t"),
                Just("~"),
                Just("{"),
                Just("}"),
                Just("touch pwned"),
                Just("-e"),
                Just("--"),
                Just("é"),
                Just("\r"),
                Just("%s"),
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// `printf '%s\0' {{ params.a }} {{ params.b }} {{ params.list }}` prints exactly the values.
    #[test]
    fn run_templates_deliver_values_to_bash_verbatim(
        a in hostile_string(),
        b in hostile_string(),
        list in proptest::collection::vec(hostile_string(), 0..4),
    ) {
        let (template, _) = Template::compile(
            "printf '%s\\0' {{ params.a }} {{ params.b }} {{ params.list }}",
            Quoting::Shell,
            &|_| None,
        )
        .unwrap();
        let mut ctx = Context::new();
        ctx.param("a", &serde_json::json!(a))
            .param("b", &serde_json::json!(b))
            .param("list", &serde_json::json!(list));
        let script = template.render(&ctx).unwrap();
        let mut expected = vec![a, b];
        expected.extend(list);
        for shell in ["bash", "sh"] {
            prop_assert_eq!(&run_bash(shell, &script), &expected, "{} ran {:?}", shell, script);
        }
    }
}

#[test]
fn a_nul_byte_is_an_error_not_a_truncated_word() {
    let (template, _) =
        Template::compile("echo {{ params.a }}", Quoting::Shell, &|_| None).unwrap();
    let mut ctx = Context::new();
    ctx.param("a", &serde_json::json!("a\0b"));
    assert!(template.render(&ctx).unwrap_err().message.contains("NUL"));
}

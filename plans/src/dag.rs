//! The steps' dependency graph: a topological order, cycles named in order, and "is X upstream of Y".
//!
//! petgraph does the graph algorithms (`toposort`, `tarjan_scc`); the result is kept as plain
//! adjacency lists, which is what the engine asks of it on every task completion.

use std::collections::{HashSet, VecDeque};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};

/// The dependency graph of a plan's steps, by step index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    needs: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    order: Vec<usize>,
}

/// Why a graph is not a DAG: the steps of one cycle, in `needs` order, the first repeated last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle(pub Vec<usize>);

impl Dag {
    /// Builds the graph from each step's `needs` (indexes, all in range). Returns every cycle when
    /// there are any; a step that needs itself is a cycle of one.
    pub fn new(needs: Vec<Vec<usize>>) -> Result<Self, Vec<Cycle>> {
        let n = needs.len();
        let mut graph = DiGraph::<usize, ()>::with_capacity(n, needs.iter().map(Vec::len).sum());
        let nodes: Vec<NodeIndex> = (0..n).map(|i| graph.add_node(i)).collect();
        let mut dependents = vec![Vec::new(); n];
        for (step, step_needs) in needs.iter().enumerate() {
            for &need in step_needs {
                graph.add_edge(nodes[need], nodes[step], ());
                dependents[need].push(step);
            }
        }
        match toposort(&graph, None) {
            Ok(order) => Ok(Self {
                needs,
                dependents,
                order: order.into_iter().map(NodeIndex::index).collect(),
            }),
            Err(_) => Err(cycles(&graph, &needs)),
        }
    }

    /// The steps that `step` needs directly.
    #[must_use]
    pub fn needs(&self, step: usize) -> &[usize] {
        &self.needs[step]
    }

    /// The steps that need `step` directly.
    #[must_use]
    pub fn dependents(&self, step: usize) -> &[usize] {
        &self.dependents[step]
    }

    /// Every step, each after all the steps it needs.
    #[must_use]
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.needs.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.needs.is_empty()
    }

    /// Whether `ancestor` must finish before `step` starts (through `needs`, directly or not).
    /// Searches breadth-first from `step`, so the usual case, a direct need, costs one look; the
    /// steps seen are kept in a set, never a vector as long as the plan (the validator asks this
    /// for every `steps.X` a template names: a vector made it quadratic in the plan's size).
    #[must_use]
    pub fn is_upstream(&self, ancestor: usize, step: usize) -> bool {
        if self.needs[step].contains(&ancestor) {
            return true;
        }
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([step]);
        while let Some(s) = queue.pop_front() {
            for &need in &self.needs[s] {
                if need == ancestor {
                    return true;
                }
                if seen.insert(need) {
                    queue.push_back(need);
                }
            }
        }
        false
    }

    /// `step` and every step downstream of it.
    #[must_use]
    pub fn downstream(&self, step: usize) -> Vec<usize> {
        let mut seen = vec![false; self.needs.len()];
        let mut out = vec![step];
        seen[step] = true;
        let mut i = 0;
        while i < out.len() {
            for &d in &self.dependents[out[i]] {
                if !seen[d] {
                    seen[d] = true;
                    out.push(d);
                }
            }
            i += 1;
        }
        out
    }
}

/// One cycle per strongly connected component that has one, each walked from its first step in
/// file order along `needs`.
fn cycles(graph: &DiGraph<usize, ()>, needs: &[Vec<usize>]) -> Vec<Cycle> {
    let mut out = Vec::new();
    for component in tarjan_scc(graph) {
        let mut members: Vec<usize> = component.iter().map(|n| n.index()).collect();
        members.sort_unstable();
        let start = members[0];
        if members.len() == 1 && !needs[start].contains(&start) {
            continue;
        }
        out.push(Cycle(shortest_cycle(start, &members, needs)));
    }
    out.sort_by_key(|c| c.0[0]);
    out
}

/// The shortest walk along `needs` from `start` back to itself, within `members`.
fn shortest_cycle(start: usize, members: &[usize], needs: &[Vec<usize>]) -> Vec<usize> {
    let mut previous: Vec<Option<usize>> = vec![None; needs.len()];
    let mut queue = VecDeque::from([start]);
    while let Some(s) = queue.pop_front() {
        let mut step_needs = needs[s].clone();
        step_needs.sort_unstable();
        for need in step_needs {
            if need == start {
                let mut path = vec![start];
                let mut at = s;
                while at != start {
                    path.push(at);
                    at = previous[at].unwrap_or(start);
                }
                path[1..].reverse();
                path.push(start);
                return path;
            }
            if members.binary_search(&need).is_ok() && previous[need].is_none() {
                previous[need] = Some(s);
                queue.push_back(need);
            }
        }
    }
    vec![start, start]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_answers_upstream() {
        // 0 <- 1 <- 3, 0 <- 2 <- 3
        let dag = Dag::new(vec![vec![], vec![0], vec![0], vec![1, 2]]).unwrap();
        let pos = |s| dag.order().iter().position(|&x| x == s).unwrap();
        assert!(pos(0) < pos(1) && pos(1) < pos(3) && pos(2) < pos(3));
        assert!(dag.is_upstream(0, 3));
        assert!(!dag.is_upstream(3, 0));
        assert!(!dag.is_upstream(1, 2));
        assert_eq!(dag.downstream(1), vec![1, 3]);
    }

    #[test]
    fn names_cycles_in_needs_order() {
        // a needs c, b needs a, c needs b: a -> c -> b -> a; d needs itself.
        let cycles = Dag::new(vec![vec![2], vec![0], vec![1], vec![3]]).unwrap_err();
        assert_eq!(cycles, vec![Cycle(vec![0, 2, 1, 0]), Cycle(vec![3, 3])]);
    }
}

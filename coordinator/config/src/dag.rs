//! A plan builder's steps as a DAG: which steps each one requires and restores, a
//! topological order, and [`Progress`], the pure rule of which steps may start now. Config
//! validation reports a bad graph with [`Dag::new`]'s errors; the runner drives a build
//! with [`Progress`]. No I/O, no clock.

use crate::model::Step;

/// The steps of one builder as a graph, by index into the builder's `steps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dag {
    names: Vec<String>,
    requires: Vec<Vec<usize>>,
    restores: Vec<Vec<usize>>,
}

/// What is wrong with a builder's graph; `step` is the index of the step at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    /// `requires[index]` names no step of the builder.
    #[error("unknown step \"{name}\"")]
    UnknownRequire {
        step: usize,
        index: usize,
        name: String,
    },
    /// A step requires itself.
    #[error("a step cannot require itself")]
    SelfRequire { step: usize, index: usize },
    /// A step is listed twice in one `requires`.
    #[error("\"{name}\" is listed twice")]
    DuplicateRequire {
        step: usize,
        index: usize,
        name: String,
    },
    /// The requirements loop; `cycle` names the steps in order, the first again at the end.
    #[error("steps require each other in a cycle: {}", cycle.join(" -> "))]
    Cycle { step: usize, cycle: Vec<String> },
    /// `restore` names no step of the builder.
    #[error("unknown step \"{name}\"")]
    UnknownRestore { step: usize, name: String },
    /// `restore` names a step that this one does not require (directly or not), so its
    /// snapshot might not exist yet.
    #[error("\"{name}\" is not among this step's requirements (add it to `requires`)")]
    RestoreNotRequired { step: usize, name: String },
    /// `restore` names a step that saves no snapshot.
    #[error("step \"{name}\" saves no snapshot (give it `snapshot = \"dir\"`)")]
    RestoreWithoutSnapshot { step: usize, name: String },
}

impl Dag {
    /// The graph of `steps`, or every problem with it.
    pub fn new(steps: &[Step]) -> Result<Dag, Vec<DagError>> {
        let names: Vec<String> = steps.iter().map(|s| s.name.clone()).collect();
        let index_of = |name: &str| names.iter().position(|n| n == name);
        let mut errors = Vec::new();
        let mut requires = Vec::with_capacity(steps.len());
        for (i, s) in steps.iter().enumerate() {
            let mut reqs: Vec<usize> = Vec::new();
            for (k, name) in s.requires.iter().enumerate() {
                match index_of(name) {
                    None => errors.push(DagError::UnknownRequire {
                        step: i,
                        index: k,
                        name: name.clone(),
                    }),
                    Some(j) if j == i => errors.push(DagError::SelfRequire { step: i, index: k }),
                    Some(j) if reqs.contains(&j) => errors.push(DagError::DuplicateRequire {
                        step: i,
                        index: k,
                        name: name.clone(),
                    }),
                    Some(j) => reqs.push(j),
                }
            }
            requires.push(reqs);
        }
        let mut dag = Dag {
            names,
            requires,
            restores: vec![Vec::new(); steps.len()],
        };
        errors.extend(dag.cycles());
        if !errors.is_empty() {
            return Err(errors);
        }
        for (i, s) in steps.iter().enumerate() {
            dag.restores[i] = match &s.restore {
                Some(name) => match dag.names.iter().position(|n| n == name) {
                    None => {
                        errors.push(DagError::UnknownRestore {
                            step: i,
                            name: name.clone(),
                        });
                        continue;
                    }
                    Some(j) if !dag.depends_on(i, j) => {
                        errors.push(DagError::RestoreNotRequired {
                            step: i,
                            name: name.clone(),
                        });
                        continue;
                    }
                    Some(j) if steps[j].snapshot.is_none() => {
                        errors.push(DagError::RestoreWithoutSnapshot {
                            step: i,
                            name: name.clone(),
                        });
                        continue;
                    }
                    Some(j) => vec![j],
                },
                None => dag.requires[i]
                    .iter()
                    .copied()
                    .filter(|&j| steps[j].snapshot.is_some())
                    .collect(),
            };
        }
        if errors.is_empty() {
            Ok(dag)
        } else {
            Err(errors)
        }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The step's name.
    pub fn name(&self, step: usize) -> &str {
        &self.names[step]
    }

    /// The steps `step` directly requires.
    pub fn requires(&self, step: usize) -> &[usize] {
        &self.requires[step]
    }

    /// The steps whose snapshots are restored before `step` runs, in `requires` order.
    pub fn restores(&self, step: usize) -> &[usize] {
        &self.restores[step]
    }

    /// Whether `step` requires `other`, directly or through other steps.
    pub fn depends_on(&self, step: usize, other: usize) -> bool {
        let mut seen = vec![false; self.len()];
        let mut stack = self.requires[step].clone();
        while let Some(j) = stack.pop() {
            if j == other {
                return true;
            }
            if !std::mem::replace(&mut seen[j], true) {
                stack.extend(&self.requires[j]);
            }
        }
        false
    }

    /// A topological order: every step after all it requires; ties in file order.
    pub fn order(&self) -> Vec<usize> {
        let mut progress = Progress::new(self);
        let mut out = Vec::with_capacity(self.len());
        while let Some(&i) = progress.ready(self).first() {
            progress.start(i);
            progress.finish(i, true);
            out.push(i);
        }
        out
    }

    /// Each cycle once, reported at its first step in file order.
    fn cycles(&self) -> Vec<DagError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        fn visit(
            dag: &Dag,
            i: usize,
            marks: &mut [Mark],
            path: &mut Vec<usize>,
            out: &mut Vec<DagError>,
        ) {
            marks[i] = Mark::OnPath;
            path.push(i);
            for &j in &dag.requires[i] {
                match marks[j] {
                    Mark::New => visit(dag, j, marks, path, out),
                    Mark::OnPath => {
                        let start = path.iter().position(|&p| p == j).unwrap_or(0);
                        let mut cycle: Vec<String> = path[start..]
                            .iter()
                            .map(|&p| dag.names[p].clone())
                            .collect();
                        cycle.push(dag.names[j].clone());
                        let step = path[start..].iter().copied().min().unwrap_or(j);
                        out.push(DagError::Cycle { step, cycle });
                    }
                    Mark::Done => {}
                }
            }
            path.pop();
            marks[i] = Mark::Done;
        }
        let mut marks = vec![Mark::New; self.len()];
        let mut out = Vec::new();
        for i in 0..self.len() {
            if marks[i] == Mark::New {
                visit(self, i, &mut marks, &mut Vec::new(), &mut out);
            }
        }
        out
    }
}

/// Where one step of a running plan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepState {
    Waiting,
    Running,
    Passed,
    Failed,
}

/// A plan's progress: which steps may start. Once a step failed nothing new starts (the
/// build has its verdict); steps already running may finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    states: Vec<StepState>,
}

impl Progress {
    /// Every step waiting.
    pub fn new(dag: &Dag) -> Progress {
        Progress {
            states: vec![StepState::Waiting; dag.len()],
        }
    }

    /// Waiting steps whose requirements all passed, in file order; none after a failure.
    pub fn ready(&self, dag: &Dag) -> Vec<usize> {
        if self.failed() {
            return Vec::new();
        }
        (0..self.states.len())
            .filter(|&i| self.states[i] == StepState::Waiting)
            .filter(|&i| {
                dag.requires(i)
                    .iter()
                    .all(|&j| self.states[j] == StepState::Passed)
            })
            .collect()
    }

    pub fn start(&mut self, step: usize) {
        self.states[step] = StepState::Running;
    }

    pub fn finish(&mut self, step: usize, passed: bool) {
        self.states[step] = if passed {
            StepState::Passed
        } else {
            StepState::Failed
        };
    }

    pub fn state(&self, step: usize) -> StepState {
        self.states[step]
    }

    /// Whether some step failed.
    pub fn failed(&self) -> bool {
        self.states.contains(&StepState::Failed)
    }

    /// Whether nothing runs and nothing more can start.
    pub fn is_done(&self, dag: &Dag) -> bool {
        !self.states.contains(&StepState::Running) && self.ready(dag).is_empty()
    }

    /// Whether every step passed.
    pub fn all_passed(&self) -> bool {
        self.states.iter().all(|s| *s == StepState::Passed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn step(name: &str, requires: &[&str]) -> Step {
        Step {
            name: name.into(),
            command: vec!["true".into()],
            env: Default::default(),
            timeout: Duration::from_secs(1),
            requires: requires.iter().map(|s| (*s).to_owned()).collect(),
            snapshot: None,
            restore: None,
            cache: None,
            units: None,
            only_units: Vec::new(),
            path: Vec::new(),
            toolchain: None,
        }
    }

    #[test]
    fn diamond_runs_roots_in_parallel_and_the_join_last() {
        // build -> (vet, test) -> report
        let steps = [
            step("report", &["vet", "test"]),
            step("vet", &["build"]),
            step("build", &[]),
            step("test", &["build"]),
        ];
        let dag = Dag::new(&steps).unwrap();
        assert_eq!(dag.order(), [2, 1, 3, 0]);
        let mut p = Progress::new(&dag);
        assert_eq!(p.ready(&dag), [2]);
        p.start(2);
        assert!(p.ready(&dag).is_empty(), "nothing else until build passes");
        p.finish(2, true);
        assert_eq!(p.ready(&dag), [1, 3], "vet and test may run at once");
        p.start(1);
        p.start(3);
        p.finish(3, true);
        assert!(p.ready(&dag).is_empty(), "report waits for vet too");
        assert!(!p.is_done(&dag));
        p.finish(1, true);
        assert_eq!(p.ready(&dag), [0]);
        p.start(0);
        p.finish(0, true);
        assert!(p.is_done(&dag) && p.all_passed());
    }

    #[test]
    fn a_failure_starts_nothing_new_but_lets_running_steps_finish() {
        let steps = [step("a", &[]), step("b", &[]), step("c", &["a"])];
        let dag = Dag::new(&steps).unwrap();
        let mut p = Progress::new(&dag);
        assert_eq!(p.ready(&dag), [0, 1]);
        p.start(0);
        p.start(1);
        p.finish(1, false);
        p.finish(0, true);
        assert!(p.ready(&dag).is_empty(), "c never starts");
        assert!(p.is_done(&dag) && p.failed() && !p.all_passed());
    }

    #[test]
    fn bad_references_are_all_reported() {
        let steps = [step("a", &["nope", "a", "b", "b"]), step("b", &[])];
        let errs = Dag::new(&steps).unwrap_err();
        assert_eq!(
            errs,
            [
                DagError::UnknownRequire {
                    step: 0,
                    index: 0,
                    name: "nope".into()
                },
                DagError::SelfRequire { step: 0, index: 1 },
                DagError::DuplicateRequire {
                    step: 0,
                    index: 3,
                    name: "b".into()
                },
            ]
        );
    }

    #[test]
    fn cycles_are_named_once() {
        let steps = [
            step("a", &["c"]),
            step("b", &["a"]),
            step("c", &["b"]),
            step("d", &["a"]),
        ];
        let errs = Dag::new(&steps).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].to_string(),
            "steps require each other in a cycle: a -> c -> b -> a"
        );
    }

    #[test]
    fn restores_default_to_required_snapshots_and_are_checked() {
        let mut build = step("build", &[]);
        build.snapshot = Some("src".into());
        let mut test = step("test", &["build", "lint"]);
        let lint = step("lint", &[]);
        let dag = Dag::new(&[build.clone(), test.clone(), lint.clone()]).unwrap();
        assert_eq!(dag.restores(1), [0], "only requirements with a snapshot");

        // Transitive requirements may be restored explicitly.
        let mut report = step("report", &["test"]);
        report.restore = Some("build".into());
        let dag = Dag::new(&[build.clone(), test.clone(), lint.clone(), report]).unwrap();
        assert_eq!(dag.restores(3), [0]);

        test.restore = Some("lint".into());
        let mut other = step("other", &[]);
        other.restore = Some("build".into());
        let mut ghost = step("ghost", &["build"]);
        ghost.restore = Some("missing".into());
        let errs = Dag::new(&[build, test, lint, other, ghost]).unwrap_err();
        assert_eq!(
            errs,
            [
                DagError::RestoreWithoutSnapshot {
                    step: 1,
                    name: "lint".into()
                },
                DagError::RestoreNotRequired {
                    step: 3,
                    name: "build".into()
                },
                DagError::UnknownRestore {
                    step: 4,
                    name: "missing".into()
                },
            ]
        );
    }
}

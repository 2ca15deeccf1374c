//! Pure run progression: given a run, the DAG version it runs and the time stamped on
//! the command being applied, which tasks become queued (dependencies done), which are
//! `upstream_failed`, when a failed attempt retries, and when the run is finished.
//! No I/O; called by `state::machine` after every change to a run.

use super::model::{DagSpec, Millis, Run, RunState, TaskSpec, TaskState};

/// Delay before retry number `retry` (1 = first retry) of `task`: fixed, or doubling
/// from `retry_delay` when exponential, never above `max_retry_delay`.
pub fn retry_delay_ms(task: &TaskSpec, retry: u32) -> u64 {
    let base = task.retry_delay_ms;
    let d = if task.retry_exponential {
        let shift = retry.saturating_sub(1).min(40);
        base.saturating_mul(1u64 << shift)
    } else {
        base
    };
    d.min(
        task.max_retry_delay_ms
            .max(base.min(task.max_retry_delay_ms)),
    )
}

fn is_terminal(s: TaskState) -> bool {
    matches!(
        s,
        TaskState::Done
            | TaskState::Failed
            | TaskState::UpstreamFailed
            | TaskState::Skipped
            | TaskState::Cancelled
    )
}

/// Move `pending` tasks whose dependencies are all done to `queued`, mark tasks below a
/// failure `upstream_failed`, and finish the run when every task is terminal. Repeats
/// until nothing changes (a chain of upstream failures settles in one call).
pub fn advance(run: &mut Run, spec: &DagSpec, now: Millis) {
    if run.state.is_finished() {
        return;
    }
    loop {
        let mut changed = false;
        for t in &spec.tasks {
            let Some(state) = run.tasks.get(&t.task_id).map(|i| i.state) else {
                continue;
            };
            if state != TaskState::Pending {
                continue;
            }
            let deps: Vec<TaskState> = t
                .depends_on
                .iter()
                .filter_map(|d| run.tasks.get(d).map(|i| i.state))
                .collect();
            let next = if deps.iter().any(|s| {
                matches!(
                    s,
                    TaskState::Failed | TaskState::UpstreamFailed | TaskState::Cancelled
                )
            }) {
                Some(TaskState::UpstreamFailed)
            } else if deps
                .iter()
                .all(|s| matches!(s, TaskState::Done | TaskState::Skipped))
            {
                Some(TaskState::Queued)
            } else {
                None
            };
            if let Some(n) = next {
                if let Some(inst) = run.tasks.get_mut(&t.task_id) {
                    inst.state = n;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let all_terminal = run.tasks.values().all(|t| is_terminal(t.state));
    if all_terminal && (run.state == RunState::Running || run.tasks.is_empty()) {
        let failed = run
            .tasks
            .values()
            .any(|t| matches!(t.state, TaskState::Failed | TaskState::UpstreamFailed));
        run.state = if failed {
            RunState::Failed
        } else {
            RunState::Done
        };
        run.started_ms.get_or_insert(now);
        run.ended_ms = Some(now);
    }
}

/// Tasks that may be assigned now: queued, or retrying with their delay passed.
pub fn ready_tasks(run: &Run, now: Millis) -> Vec<String> {
    if !matches!(run.state, RunState::Queued | RunState::Running) {
        return Vec::new();
    }
    run.tasks
        .iter()
        .filter(|(_, t)| match t.state {
            TaskState::Queued => true,
            TaskState::Retrying => t.next_try_ms.is_none_or(|at| at <= now),
            _ => false,
        })
        .map(|(id, _)| id.clone())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::model::{RunType, TaskInstance, TaskKind, Window};

    fn task(id: &str, deps: &[&str]) -> TaskSpec {
        TaskSpec {
            task_id: id.into(),
            kind: TaskKind::Noop,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            retries: 2,
            retry_delay_ms: 1000,
            retry_exponential: true,
            max_retry_delay_ms: 5000,
            timeout_ms: None,
        }
    }

    fn spec(tasks: Vec<TaskSpec>) -> DagSpec {
        DagSpec {
            dag_id: "d".into(),
            schedule: None,
            timezone: "UTC".into(),
            owner: None,
            catchup: false,
            max_active_runs: 1,
            sla_ms: None,
            paused: false,
            start_date_ms: None,
            end_date_ms: None,
            webhook: None,
            tasks,
        }
    }

    /// A running run of `spec` with every task pending (also used by the executor's tests).
    pub(crate) fn run_of(spec: &DagSpec) -> Run {
        Run {
            run_id: "run_1".into(),
            tenant: "t".into(),
            dag_id: "d".into(),
            dag_version: 1,
            run_type: RunType::Manual,
            window: Window {
                start_ms: 0,
                end_ms: 0,
            },
            state: RunState::Running,
            created_ms: 0,
            started_ms: Some(0),
            ended_ms: None,
            sla_deadline_ms: None,
            sla_missed: false,
            tasks: spec
                .tasks
                .iter()
                .map(|t| (t.task_id.clone(), TaskInstance::new()))
                .collect::<BTreeMap<_, _>>(),
            counted: false,
            triggered_by: None,
            slot_share_percent: None,
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let t = task("a", &[]);
        assert_eq!(retry_delay_ms(&t, 1), 1000);
        assert_eq!(retry_delay_ms(&t, 2), 2000);
        assert_eq!(retry_delay_ms(&t, 3), 4000);
        assert_eq!(retry_delay_ms(&t, 4), 5000);
        assert_eq!(retry_delay_ms(&t, 60), 5000);
        let fixed = TaskSpec {
            retry_exponential: false,
            ..t
        };
        assert_eq!(retry_delay_ms(&fixed, 5), 1000);
    }

    #[test]
    fn roots_queue_then_dependents_follow() {
        let s = spec(vec![
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["a", "b"]),
        ]);
        let mut r = run_of(&s);
        advance(&mut r, &s, 1);
        assert_eq!(ready_tasks(&r, 1), vec!["a".to_string()]);
        r.tasks.get_mut("a").unwrap().state = TaskState::Done;
        advance(&mut r, &s, 2);
        assert_eq!(ready_tasks(&r, 2), vec!["b".to_string()]);
        r.tasks.get_mut("b").unwrap().state = TaskState::Done;
        advance(&mut r, &s, 3);
        r.tasks.get_mut("c").unwrap().state = TaskState::Done;
        advance(&mut r, &s, 4);
        assert_eq!(r.state, RunState::Done);
        assert_eq!(r.ended_ms, Some(4));
    }

    #[test]
    fn failure_propagates_upstream_failed_and_fails_the_run() {
        let s = spec(vec![
            task("a", &[]),
            task("b", &["a"]),
            task("c", &["b"]),
            task("x", &[]),
        ]);
        let mut r = run_of(&s);
        advance(&mut r, &s, 1);
        r.tasks.get_mut("a").unwrap().state = TaskState::Failed;
        r.tasks.get_mut("x").unwrap().state = TaskState::Done;
        advance(&mut r, &s, 2);
        assert_eq!(r.tasks["b"].state, TaskState::UpstreamFailed);
        assert_eq!(r.tasks["c"].state, TaskState::UpstreamFailed);
        assert_eq!(r.state, RunState::Failed);
    }

    #[test]
    fn retrying_waits_for_its_delay() {
        let s = spec(vec![task("a", &[])]);
        let mut r = run_of(&s);
        let a = r.tasks.get_mut("a").unwrap();
        a.state = TaskState::Retrying;
        a.next_try_ms = Some(100);
        assert!(ready_tasks(&r, 99).is_empty());
        assert_eq!(ready_tasks(&r, 100), vec!["a".to_string()]);
    }

    #[test]
    fn a_run_without_tasks_is_done_at_once() {
        let s = spec(vec![]);
        let mut r = run_of(&s);
        r.state = RunState::Queued;
        advance(&mut r, &s, 7);
        assert_eq!(r.state, RunState::Done);
    }
}

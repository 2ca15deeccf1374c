//! Per-tenant quotas on what a tenant holds: live DAGs (`limits.max_dags_per_tenant`),
//! unfinished runs (`limits.max_active_runs_per_tenant`) and queued runs of one DAG
//! (`limits.max_queued_runs_per_dag`), checked against a [`Usage`].
//!
//! The authority is apply (from protocol 5): each request carries its tenant's [`Quota`]
//! and the state machine checks it against the counts as of that request, pending writes
//! of the same apply included, so concurrent writes never overshoot a quota. The API and
//! the scheduler check the same rules first against the replica's counts, only to spare
//! Raft a write that apply would refuse (and to keep quotas while a cluster is still
//! below protocol 5, with an overshoot of at most the writes in flight).

use crate::config::Quotas;
use crate::state::census::Usage;
use crate::state::command::Quota;

/// A quota a new run or DAG would exceed: which one, and the message a caller acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    #[error(
        "dag '{dag_id}' already has {count} queued runs, the limit \
         (limits.max_queued_runs_per_dag = {max}); wait for them to start or cancel some"
    )]
    QueuedPerDag {
        dag_id: String,
        count: u64,
        max: u64,
    },
    #[error(
        "tenant '{tenant}' already has {count} unfinished runs, the limit \
         (limits.max_active_runs_per_tenant = {max}); wait for some to finish or cancel some"
    )]
    ActivePerTenant {
        tenant: String,
        count: u64,
        max: u64,
    },
    #[error(
        "tenant '{tenant}' already has {count} DAGs, the limit \
         (limits.max_dags_per_tenant = {max}); delete one first"
    )]
    DagsPerTenant {
        tenant: String,
        count: u64,
        max: u64,
    },
}

impl From<&Quotas> for Quota {
    fn from(q: &Quotas) -> Quota {
        Quota {
            max_dags: q.max_dags_per_tenant,
            max_active_runs: q.max_active_runs_per_tenant,
            max_queued_runs_per_dag: q.max_queued_runs_per_dag,
            dag_versions_kept: q.max_dag_versions,
            slot_share_percent: Some(q.max_slot_share_percent.clamp(1, 100) as u32),
        }
    }
}

/// Whether one more run of `dag_id` fits `tenant`'s quota, given what it holds.
pub fn check_new_run(usage: Usage, tenant: &str, dag_id: &str, q: &Quota) -> Result<(), Exceeded> {
    if usage.active_runs >= q.max_active_runs {
        return Err(Exceeded::ActivePerTenant {
            tenant: tenant.to_string(),
            count: usage.active_runs,
            max: q.max_active_runs,
        });
    }
    if usage.queued_runs >= q.max_queued_runs_per_dag {
        return Err(Exceeded::QueuedPerDag {
            dag_id: dag_id.to_string(),
            count: usage.queued_runs,
            max: q.max_queued_runs_per_dag,
        });
    }
    Ok(())
}

/// Whether one more live DAG fits `tenant`'s quota.
pub fn check_new_dag(usage: Usage, tenant: &str, q: &Quota) -> Result<(), Exceeded> {
    if usage.live_dags >= q.max_dags {
        return Err(Exceeded::DagsPerTenant {
            tenant: tenant.to_string(),
            count: usage.live_dags,
            max: q.max_dags,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        max_dags: 2,
        max_active_runs: 3,
        max_queued_runs_per_dag: 1,
        dag_versions_kept: 10,
        slot_share_percent: None,
    };

    #[test]
    fn a_quota_holds_at_its_limit_and_names_it() {
        let at = |active, queued| Usage {
            live_dags: 0,
            active_runs: active,
            queued_runs: queued,
        };
        assert_eq!(check_new_run(at(2, 0), "t", "d", &Q), Ok(()));
        let e = check_new_run(at(3, 0), "t", "d", &Q).unwrap_err();
        assert!(
            e.to_string().contains("max_active_runs_per_tenant = 3"),
            "{e}"
        );
        let e = check_new_run(at(1, 1), "t", "d", &Q).unwrap_err();
        assert!(e.to_string().contains("max_queued_runs_per_dag = 1"), "{e}");
        let dags = |n| Usage {
            live_dags: n,
            ..Usage::default()
        };
        assert_eq!(check_new_dag(dags(1), "t", &Q), Ok(()));
        let e = check_new_dag(dags(2), "t", &Q).unwrap_err();
        assert!(e.to_string().contains("max_dags_per_tenant = 2"), "{e}");
    }
}

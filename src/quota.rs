//! Per-tenant run quotas (`limits.max_queued_runs_per_dag`,
//! `limits.max_active_runs_per_tenant`), read from the counts this node's replica keeps
//! incrementally ([`TenantCounts`]: a lookup, whatever the number of runs). The API checks them before proposing a trigger and the scheduler
//! before firing a window; they are read outside apply, so concurrent triggers can
//! overshoot a quota by the number in flight.

use crate::config::Quotas;
use crate::state::census::TenantCounts;

/// A quota a new run would exceed: which one, and the message a caller acts on.
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
}

/// Whether one more run of `dag_id` fits `tenant`'s quotas, by the replica's counts.
pub fn check_new_run(
    counts: &TenantCounts,
    tenant: &str,
    dag_id: &str,
    q: &Quotas,
) -> Result<(), Exceeded> {
    let active = counts.active_runs(tenant);
    if active >= q.max_active_runs_per_tenant {
        return Err(Exceeded::ActivePerTenant {
            tenant: tenant.to_string(),
            count: active,
            max: q.max_active_runs_per_tenant,
        });
    }
    let queued = counts.queued_runs(tenant, dag_id);
    if queued >= q.max_queued_runs_per_dag {
        return Err(Exceeded::QueuedPerDag {
            dag_id: dag_id.to_string(),
            count: queued,
            max: q.max_queued_runs_per_dag,
        });
    }
    Ok(())
}

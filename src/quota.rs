//! Per-tenant run quotas (`limits.max_queued_runs_per_dag`,
//! `limits.max_active_runs_per_tenant`), counted from the active-runs index of this
//! node's replica. The API checks them before proposing a trigger and the scheduler
//! before firing a window; they are read outside apply, so concurrent triggers can
//! overshoot a quota by the number in flight.

use crate::config::Quotas;
use crate::raft::db::{Db, DbError};
use crate::state::machine::keys;
use crate::state::model::{ActiveEntry, RunState};
use crate::state::Table;

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

/// Whether one more run of `dag_id` fits `tenant`'s quotas.
pub fn check_new_run(
    db: &Db,
    tenant: &str,
    dag_id: &str,
    q: &Quotas,
) -> Result<Result<(), Exceeded>, DbError> {
    let active = count(
        db,
        &keys::prefix(&[tenant.as_bytes()]),
        None,
        q.max_active_runs_per_tenant,
    )?;
    if active >= q.max_active_runs_per_tenant {
        return Ok(Err(Exceeded::ActivePerTenant {
            tenant: tenant.to_string(),
            count: active,
            max: q.max_active_runs_per_tenant,
        }));
    }
    let queued = count(
        db,
        &keys::prefix(&[tenant.as_bytes(), dag_id.as_bytes()]),
        Some(RunState::Queued),
        q.max_queued_runs_per_dag,
    )?;
    if queued >= q.max_queued_runs_per_dag {
        return Ok(Err(Exceeded::QueuedPerDag {
            dag_id: dag_id.to_string(),
            count: queued,
            max: q.max_queued_runs_per_dag,
        }));
    }
    Ok(Ok(()))
}

/// Active-runs entries under `prefix` (in `state` when given), counting up to `max`.
fn count(db: &Db, prefix: &[u8], state: Option<RunState>, max: u64) -> Result<u64, DbError> {
    const PAGE: usize = 512;
    let mut n = 0u64;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = db.scan_prefix(Table::ActiveRuns, prefix, after.as_deref(), PAGE)?;
        let done = page.len() < PAGE;
        for (k, v) in page {
            let counts = match state {
                None => true,
                Some(s) => serde_json::from_slice::<ActiveEntry>(&v).is_ok_and(|e| e.state == s),
            };
            if counts {
                n += 1;
            }
            after = Some(k);
        }
        if done || n >= max {
            return Ok(n);
        }
    }
}

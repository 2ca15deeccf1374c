//! The retention purge in apply: finished runs, request and idempotency records past
//! their age.

use super::*;

pub(super) fn purge(
    kv: &mut impl Kv,
    before_ms: Millis,
    records_before_ms: Millis,
) -> Result<Outcome, KvError> {
    let mut runs = 0;
    for (k, _) in kv.scan_prefix(Table::FinishedRuns, b"")? {
        let Some(ended) = k.get(..8).and_then(keys::from_ordered_i64) else {
            continue;
        };
        if ended >= before_ms {
            break;
        }
        let run_id = String::from_utf8_lossy(&k[9.min(k.len())..]).into_owned();
        kv.delete(Table::FinishedRuns, k);
        let Some(run) = get_json::<Run>(kv, Table::Runs, run_id.as_bytes())? else {
            continue;
        };
        kv.delete(Table::Runs, run_id.as_bytes().to_vec());
        kv.delete(
            Table::Windows,
            keys::window(&run.tenant, &run.dag_id, &run.window),
        );
        kv.delete(
            Table::RunsByDag,
            keys::run_by_dag(&run.tenant, &run.dag_id, run.created_ms, &run_id),
        );
        kv.delete(
            Table::RunsByTenant,
            keys::run_by_tenant(&run.tenant, run.created_ms, &run_id),
        );
        for ev in ["success", "failure", "sla_miss"] {
            kv.delete(Table::Notifications, keys::notification(&run_id, ev));
        }
        runs += 1;
    }
    let mut records = 0;
    for (k, v) in kv.scan_prefix(Table::Requests, b"")? {
        let r: RequestRecord = decode(Table::Requests, &v)?;
        if r.created_ms < records_before_ms {
            kv.delete(Table::Requests, k);
            records += 1;
        }
    }
    for (k, v) in kv.scan_prefix(Table::Idempotency, b"")? {
        let r: IdempotencyRecord = decode(Table::Idempotency, &v)?;
        if r.created_ms < records_before_ms {
            kv.delete(Table::Idempotency, k);
            records += 1;
        }
    }
    Ok(Outcome::Purged { runs, records })
}

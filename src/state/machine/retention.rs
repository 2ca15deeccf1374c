//! The retention purge in apply: finished runs, request and idempotency records past
//! their age. Runs are found by end time (`FinishedRuns`), and from protocol 10 records by
//! their time index ([`keys::record_by_time`]), so a purge reads only what is due; from
//! protocol 10 it also stops at [`PURGE_CHUNK`] of each kind.

use super::*;

/// The most runs, and the most records of each table, one purge removes (protocol ≥ 10).
/// A purge that stops there says so by its counts, and the leader purges again at once.
pub const PURGE_CHUNK: usize = 5_000;

pub(super) fn purge(
    kv: &mut impl Kv,
    before_ms: Millis,
    records_before_ms: Millis,
    protocol: u32,
) -> Result<Outcome, KvError> {
    let chunk = if protocol >= 10 {
        PURGE_CHUNK
    } else {
        usize::MAX
    };
    let mut runs = 0;
    // Only the keys below the cutoff: `ended` leads the key.
    let due = kv.keys_below(Table::FinishedRuns, b"", &keys::ordered_i64(before_ms))?;
    for k in due.into_iter().take(chunk) {
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
    if protocol >= 10 {
        let end = keys::record_by_time(records_before_ms, b"");
        for table in [Table::Requests, Table::Idempotency] {
            for entry in kv.keys_below(table, &[0], &end)?.into_iter().take(chunk) {
                // The record goes only if it is the one indexed: a record the full scan
                // removed (beyond a chunk, during the change to 10) may have been written
                // again under its key since, with an entry of its own.
                if let Some((at, record)) = keys::record_of_time_entry(&entry) {
                    if created_ms(kv, table, record)? == Some(at) {
                        kv.delete(table, record.to_vec());
                        records += 1;
                    }
                }
                kv.delete(table, entry);
            }
        }
        // Records from before the raise to 10 have no index entry: scan for them until a
        // purge's cutoff has passed the raise (then none is left).
        let Some(indexed_from) = read_i64(kv, clock::RECORDS_INDEXED_FROM)? else {
            return Ok(Outcome::Purged { runs, records });
        };
        if records_before_ms >= indexed_from {
            kv.delete(Table::Counters, clock::RECORDS_INDEXED_FROM.to_vec());
        }
    }
    records += purge_unindexed_records(kv, records_before_ms)?;
    Ok(Outcome::Purged { runs, records })
}

/// When the record under `key` was created (`None`: no record there).
fn created_ms(kv: &impl Kv, table: Table, key: &[u8]) -> Result<Option<Millis>, KvError> {
    Ok(match table {
        Table::Requests => get_json::<RequestRecord>(kv, table, key)?.map(|r| r.created_ms),
        _ => get_json::<IdempotencyRecord>(kv, table, key)?.map(|r| r.created_ms),
    })
}

/// Decode every record and delete those created before `before_ms` (what every purge
/// did before protocol 10). Time-index entries are skipped: they are not records.
fn purge_unindexed_records(kv: &mut impl Kv, before_ms: Millis) -> Result<u32, KvError> {
    let mut records = 0;
    for (k, v) in kv.scan_prefix(Table::Requests, b"")? {
        if k.first() == Some(&0) {
            continue;
        }
        let r: RequestRecord = decode(Table::Requests, &v)?;
        if r.created_ms < before_ms {
            kv.delete(Table::Requests, k);
            records += 1;
        }
    }
    for (k, v) in kv.scan_prefix(Table::Idempotency, b"")? {
        if k.first() == Some(&0) {
            continue;
        }
        let r: IdempotencyRecord = decode(Table::Idempotency, &v)?;
        if r.created_ms < before_ms {
            kv.delete(Table::Idempotency, k);
            records += 1;
        }
    }
    Ok(records)
}

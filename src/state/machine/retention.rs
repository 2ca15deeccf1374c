//! The retention purge in apply: finished runs, request and idempotency records past
//! their age. Runs are found by end time (`FinishedRuns`), and from protocol 10 records by
//! their time index ([`keys::record_by_time`]), so a purge reads only what is due; from
//! protocol 10 it also reads and removes at most [`PURGE_CHUNK`] of each kind. Records
//! from before protocol 10 have no index entry and are found by a full scan, until none
//! is left (from protocol 12) or a purge's cutoff has passed the raise.

use super::*;

/// The most runs, and the most index entries of each record table, one purge reads and
/// removes (protocol ≥ 10). A purge that stops there says so (`more`), and the leader
/// purges again at its next pass.
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
    let mut more = false;
    let mut runs = 0;
    // Only the keys below the cutoff (`ended` leads the key), and at most a chunk.
    let due = kv.keys_below(
        Table::FinishedRuns,
        b"",
        &keys::ordered_i64(before_ms),
        chunk,
    )?;
    more |= due.len() >= chunk;
    for k in due {
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
    if protocol < 10 {
        let records = purge_unindexed_records(kv, records_before_ms, Millis::MAX, false)?.purged;
        return Ok(Outcome::Purged {
            runs,
            records,
            more,
        });
    }
    let mut records = 0;
    let end = keys::record_by_time(records_before_ms, b"");
    for table in [Table::Requests, Table::Idempotency] {
        let entries = kv.keys_below(table, &[0], &end, chunk)?;
        more |= entries.len() >= chunk;
        for entry in entries {
            // The record goes only if it is the one indexed: one created at the raise to
            // 10, removed by the scan below, may have been written again since under its
            // key, with an entry of its own.
            if let Some((at, record)) = keys::record_of_time_entry(&entry) {
                if created_ms(kv, table, record)? == Some(at) {
                    kv.delete(table, record.to_vec());
                    records += 1;
                }
            }
            kv.delete(table, entry);
        }
    }
    // Records from before the raise to 10 have no index entry: scan for them (and only
    // them: created up to the raise) until a purge's cutoff has passed the raise, after
    // which none is left. A record created at the raise's own time may be indexed (it
    // followed the raise in its batch): the scan may take it first, leaving its entry.
    // From protocol 12 the scan also ends as soon as it finds no such record left (a
    // cluster raised with none, as every fresh one is, scans once, not for a day).
    if let Some(indexed_from) = read_i64(kv, clock::RECORDS_INDEXED_FROM)? {
        let scan = purge_unindexed_records(kv, records_before_ms, indexed_from, true)?;
        records += scan.purged;
        if records_before_ms > indexed_from || (protocol >= 12 && scan.left == 0) {
            kv.delete(Table::Counters, clock::RECORDS_INDEXED_FROM.to_vec());
        }
    }
    Ok(Outcome::Purged {
        runs,
        records,
        more,
    })
}

/// When the record under `key` was created (`None`: no record there).
fn created_ms(kv: &impl Kv, table: Table, key: &[u8]) -> Result<Option<Millis>, KvError> {
    Ok(match table {
        Table::Requests => get_json::<RequestRecord>(kv, table, key)?.map(|r| r.created_ms),
        _ => get_json::<IdempotencyRecord>(kv, table, key)?.map(|r| r.created_ms),
    })
}

/// What a scan for records without a time-index entry found.
struct Scanned {
    /// Records removed.
    purged: u32,
    /// Records created up to the scan's bound, not yet due, and without an index entry:
    /// what a later scan would still look for.
    left: u32,
}

/// Decode every record and delete those created before `before_ms` and at or before
/// `up_to_ms` (what every purge did before protocol 10, with no upper bound). From
/// protocol 10 (`indexed`) the time-index entries are skipped: they are not records.
fn purge_unindexed_records(
    kv: &mut impl Kv,
    before_ms: Millis,
    up_to_ms: Millis,
    indexed: bool,
) -> Result<Scanned, KvError> {
    let mut scanned = Scanned { purged: 0, left: 0 };
    for table in [Table::Requests, Table::Idempotency] {
        for (k, v) in kv.scan_prefix(table, b"")? {
            if indexed && k.first() == Some(&0) {
                continue;
            }
            let created = match table {
                Table::Requests => decode::<RequestRecord>(table, &v)?.created_ms,
                _ => decode::<IdempotencyRecord>(table, &v)?.created_ms,
            };
            if created > up_to_ms {
                continue;
            }
            if created < before_ms {
                kv.delete(table, k);
                scanned.purged += 1;
            } else if kv.get(table, &keys::record_by_time(created, &k))?.is_none() {
                scanned.left += 1;
            }
        }
    }
    Ok(scanned)
}

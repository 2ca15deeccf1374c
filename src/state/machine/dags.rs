//! DAGs in apply: writing a definition (and its version), the live DAG a command names,
//! and the spec a run executes.

use super::*;

pub(super) fn live_dag(kv: &impl Kv, tenant: &str, dag_id: &str) -> Result<Option<Dag>, KvError> {
    Ok(get_json::<Dag>(kv, Table::Dags, &keys::dag(tenant, dag_id))?.filter(|d| !d.deleted))
}

pub(super) fn put_dag(
    kv: &mut impl Kv,
    tenant: &str,
    spec: &DagSpec,
    expected_version: Option<u64>,
    subject: Option<&str>,
    ctx: Ctx,
) -> Result<Outcome, KvError> {
    let now = ctx.now;
    let key = keys::dag(tenant, &spec.dag_id);
    let existing = get_json::<Dag>(kv, Table::Dags, &key)?;
    let decision = put_decision(existing.as_ref(), spec, expected_version);
    if let PutDecision::Conflict { expected, current } = decision {
        return Ok(Outcome::VersionConflict { expected, current });
    }
    // From protocol 11 apply, not only the API, holds the shell capability: a request
    // from a node that did not check it (or a caller that lost it) writes nothing.
    let shell = ctx.protocol >= 11 && StoredVersion::has_shell(spec);
    if shell && !ctx.shell_scope {
        return Ok(Outcome::Forbidden {
            message: "a DAG with a shell task needs the orchestrator:shell scope".into(),
        });
    }
    let version = match decision {
        PutDecision::Write { version, .. } => version,
        _ => {
            return Ok(Outcome::DagPut {
                dag_id: spec.dag_id.clone(),
                version: decision.version(),
                changed: false,
            })
        }
    };
    if decision.creates() {
        if let Some(q) = &ctx.quota {
            let usage = kv.usage(tenant, &spec.dag_id)?;
            if let Err(e) = crate::quota::check_new_dag(usage, tenant, q) {
                return Ok(Outcome::QuotaExceeded {
                    message: e.to_string(),
                });
            }
        }
    }
    let dag = Dag {
        tenant: tenant.to_string(),
        version,
        spec: spec.clone(),
        // A re-created DAG starts over from now (protocol 2): its schedule must not
        // reach back to the first incarnation's creation.
        created_ms: existing
            .as_ref()
            .filter(|d| !(d.deleted && ctx.protocol >= 2))
            .map_or(now, |d| d.created_ms),
        updated_ms: now,
        deleted: false,
        // Who created it: kept across updates; a re-created DAG starts over.
        created_by: match existing.as_ref().filter(|d| !d.deleted) {
            Some(d) => d.created_by.clone(),
            None => subject.map(str::to_string),
        },
        updated_by: subject.map(str::to_string),
    };
    put_json(kv, Table::Dags, key, &dag);
    let grant = shell.then(|| ShellGrant {
        by: subject.map(str::to_string),
    });
    put_version(kv, tenant, &spec.dag_id, version, spec, grant, ctx)?;
    Ok(Outcome::DagPut {
        dag_id: spec.dag_id.clone(),
        version,
        changed: true,
    })
}

/// What writing `spec` over the stored DAG `existing` does, if the write is allowed
/// (the shell scope and the DAG quota are checked apart). Apply decides by it, and so
/// does a dry run (`POST /dags/{dag_id}/plan`), which must answer what apply would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutDecision {
    /// The write names a version (`If-Match` or `version`) that is not the current one.
    Conflict { expected: u64, current: u64 },
    /// The live DAG already has this definition: nothing is written.
    Unchanged { version: u64 },
    /// A new version is stored; `creates` if no live DAG had this id (a new DAG, or a
    /// deleted one created again: it counts against the tenant's DAG quota).
    Write { version: u64, creates: bool },
}

impl PutDecision {
    /// The DAG's version after the write (the current one if nothing is written).
    pub fn version(self) -> u64 {
        match self {
            PutDecision::Conflict { current, .. } => current,
            PutDecision::Unchanged { version } | PutDecision::Write { version, .. } => version,
        }
    }

    /// Whether the write makes a live DAG where there was none.
    pub fn creates(self) -> bool {
        matches!(self, PutDecision::Write { creates: true, .. })
    }
}

/// See [`PutDecision`].
pub fn put_decision(
    existing: Option<&Dag>,
    spec: &DagSpec,
    expected_version: Option<u64>,
) -> PutDecision {
    let current = existing.map_or(0, |d| d.version);
    match (existing, expected_version) {
        (_, Some(expected)) if expected != current => PutDecision::Conflict { expected, current },
        (Some(d), _) if !d.deleted && d.spec == *spec => {
            PutDecision::Unchanged { version: current }
        }
        (d, _) => PutDecision::Write {
            version: current + 1,
            creates: d.is_none_or(|d| d.deleted),
        },
    }
}

/// Store version `version` of a DAG, with the grant to run its shell tasks if it has
/// one (protocol 11). From protocol 5, with a quota, drop the versions
/// `dag_versions_kept` or more behind it, except those an unfinished run executes (they
/// go with a later write once their runs have finished).
pub(super) fn put_version(
    kv: &mut impl Kv,
    tenant: &str,
    dag_id: &str,
    version: u64,
    spec: &DagSpec,
    shell_grant: Option<ShellGrant>,
    ctx: Ctx,
) -> Result<(), KvError> {
    let key = keys::dag_version(tenant, dag_id, version);
    match shell_grant {
        // Without a grant the value is the bare spec, as before protocol 11.
        None => put_json(kv, Table::DagVersions, key, spec),
        Some(grant) => {
            let stored = StoredVersion {
                spec: spec.clone(),
                shell_grant: Some(grant),
            };
            put_json(kv, Table::DagVersions, key, &stored)
        }
    }
    let Some(q) = &ctx.quota else {
        return Ok(());
    };
    let Some(last_dropped) = version.checked_sub(q.dag_versions_kept.max(1)) else {
        return Ok(());
    };
    drop_versions(kv, tenant, dag_id, Some(last_dropped.saturating_add(1)))
}

/// Drop the DAG's versions below `below` (all of them when None), except those an
/// unfinished run still executes.
pub(super) fn drop_versions(
    kv: &mut impl Kv,
    tenant: &str,
    dag_id: &str,
    below: Option<u64>,
) -> Result<(), KvError> {
    let prefix = keys::prefix(&[tenant.as_bytes(), dag_id.as_bytes()]);
    // Only the keys of the range to drop are read (no version reaches u64::MAX), and the
    // versions unfinished runs still hold.
    let end = keys::dag_version(tenant, dag_id, below.unwrap_or(u64::MAX));
    let old = kv.keys_below(Table::DagVersions, &prefix, &end, usize::MAX)?;
    if old.is_empty() {
        return Ok(());
    }
    /// The one field of a stored run this needs (the rest is skipped, not built).
    #[derive(serde::Deserialize)]
    struct RunVersion {
        dag_version: u64,
    }
    let mut in_use = std::collections::BTreeSet::new();
    for (k, _) in kv.scan_prefix(Table::ActiveRuns, &prefix)? {
        if let Some(run) = get_json::<RunVersion>(kv, Table::Runs, keys::last_part(&k))? {
            in_use.insert(run.dag_version);
        }
    }
    for k in old {
        if version_of_key(&prefix, &k).is_some_and(|v| !in_use.contains(&v)) {
            kv.delete(Table::DagVersions, k);
        }
    }
    Ok(())
}

/// Version `version` of a DAG as stored, with its shell grant.
pub(super) fn stored_version(
    kv: &impl Kv,
    tenant: &str,
    dag_id: &str,
    version: u64,
) -> Result<Option<StoredVersion>, KvError> {
    get_json(
        kv,
        Table::DagVersions,
        &keys::dag_version(tenant, dag_id, version),
    )
}

/// The raise to protocol 11: every stored version with a shell task was admitted by the
/// API's scope check alone; record that as its grant, so the executor can refuse any
/// shell version without one from then on. Reads every stored version once (they are
/// few: `dag_versions_kept` per DAG at most, plus those unfinished runs hold).
pub(super) fn grant_shell_versions_from_before(kv: &mut impl Kv) -> Result<(), KvError> {
    for (key, value) in kv.scan_prefix(Table::DagVersions, &[])? {
        let stored: StoredVersion = decode(Table::DagVersions, &value)?;
        if stored.shell_grant.is_none() && StoredVersion::has_shell(&stored.spec) {
            let granted = StoredVersion {
                shell_grant: Some(ShellGrant { by: None }),
                ..stored
            };
            put_json(kv, Table::DagVersions, key, &granted);
        }
    }
    Ok(())
}

/// The version in a `DagVersions` key under `prefix` (the DAG's `tenant \0 dag_id \0`).
pub fn version_of_key(prefix: &[u8], key: &[u8]) -> Option<u64> {
    let rest = key.strip_prefix(prefix)?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

/// The DAG definition a run executes (the version it started with).
pub(super) fn run_spec(kv: &impl Kv, run: &Run) -> Result<DagSpec, KvError> {
    get_json::<DagSpec>(
        kv,
        Table::DagVersions,
        &keys::dag_version(&run.tenant, &run.dag_id, run.dag_version),
    )?
    .ok_or_else(|| {
        KvError::Storage(format!(
            "run {} refers to missing dag version {}",
            run.run_id, run.dag_version
        ))
    })
}

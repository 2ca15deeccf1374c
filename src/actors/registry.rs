//! The DAG registry actor: resolves DAG definitions (current and by version) from the
//! replicated state, for the API and the executor. It reads the state machine's
//! tables; it never writes them (DESIGN invariant 2).

use actix::prelude::*;

use crate::raft::db::{Db, DbError};
use crate::state::machine::keys;
use crate::state::model::{Dag, StoredVersion};
use crate::state::Table;

#[derive(Message)]
#[rtype(result = "Result<Option<Dag>, DbError>")]
struct Lookup {
    tenant: String,
    dag_id: String,
}

#[derive(Message)]
#[rtype(result = "Result<Option<StoredVersion>, DbError>")]
struct LookupVersion {
    tenant: String,
    dag_id: String,
    version: u64,
}

pub struct Registry {
    db: Db,
}

impl Registry {
    pub fn new(db: Db) -> Self {
        Registry { db }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<Lookup> for Registry {
    type Result = Result<Option<Dag>, DbError>;
    fn handle(&mut self, m: Lookup, _: &mut Context<Self>) -> Self::Result {
        let dag: Option<Dag> = self
            .db
            .get_json(Table::Dags.name(), &keys::dag(&m.tenant, &m.dag_id))?;
        Ok(dag.filter(|d| !d.deleted))
    }
}

impl Handler<LookupVersion> for Registry {
    type Result = Result<Option<StoredVersion>, DbError>;
    fn handle(&mut self, m: LookupVersion, _: &mut Context<Self>) -> Self::Result {
        self.db.get_json(
            Table::DagVersions.name(),
            &keys::dag_version(&m.tenant, &m.dag_id, m.version),
        )
    }
}

/// Cheap handle to the registry.
#[derive(Clone)]
pub struct RegistryHandle {
    addr: Addr<Registry>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registry stopped")]
    Stopped,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl RegistryHandle {
    pub(super) fn new(addr: Addr<Registry>) -> Self {
        RegistryHandle { addr }
    }

    /// The current definition of a tenant's DAG, unless it does not exist or is deleted.
    pub async fn dag(&self, tenant: &str, dag_id: &str) -> Result<Option<Dag>, Error> {
        Ok(self
            .addr
            .send(Lookup {
                tenant: tenant.into(),
                dag_id: dag_id.into(),
            })
            .await
            .map_err(|_| Error::Stopped)??)
    }

    /// A DAG as it was at `version` (runs keep the version they started with), with the
    /// grant to run its shell tasks.
    pub async fn dag_version(
        &self,
        tenant: &str,
        dag_id: &str,
        version: u64,
    ) -> Result<Option<StoredVersion>, Error> {
        Ok(self
            .addr
            .send(LookupVersion {
                tenant: tenant.into(),
                dag_id: dag_id.into(),
                version,
            })
            .await
            .map_err(|_| Error::Stopped)??)
    }
}

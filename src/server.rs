//! Running one node: open the database, start Raft and the actors, serve the public API
//! and the peer listener, form the cluster if this node bootstraps it, and on shutdown
//! stop accepting, finish in-flight requests, stop the actors, shut Raft down and flush.

use std::future::Future;
use std::sync::Arc;

use axum_server::tls_rustls::RustlsConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::actors::{ActorSystem, Leadership};
use crate::admission::{AuthFailures, ConnectionLimit};
use crate::api::{self, ApiState};
use crate::auth::{self, Verifier};
use crate::config::{self, Config};
use crate::raft::db::{Db, DbError};
use crate::raft::network::PeerTls;
use crate::raft::{node, peer_server, RaftNode};
use crate::rate_limit::RateLimiter;

/// How many malloc arenas the server's threads share (glibc), unless `MALLOC_ARENA_MAX`
/// says otherwise.
pub const MALLOC_ARENAS: i32 = 2;

/// Cap glibc's malloc arenas at [`MALLOC_ARENAS`]. By default glibc gives busy threads
/// up to eight arenas per core, and memory freed in one arena is not reused by threads
/// allocating in another: on the `firelag` benchmark the leader's resident memory peaked
/// at 367 MB with a live heap of 50-136 MiB, and at 172-204 MB with two arenas (jemalloc
/// did no better; docs/performance.md). `MALLOC_ARENA_MAX` in the environment still
/// wins. Called at start, before the runtime's threads. (A no-op elsewhere than glibc.)
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot open the database in {path} (is another node using this data dir?)")]
    Db {
        path: std::path::PathBuf,
        #[source]
        source: DbError,
    },
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Raft(#[from] node::Error),
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("raft stopped on a fatal error: {0}")]
    RaftFatal(String),
    #[error(transparent)]
    Actors(#[from] crate::actors::system::StartError),
    #[error("executor: {0}")]
    Shell(#[from] crate::executor::sandbox::Error),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::metrics::InstallError),
}

/// Run a node until `shutdown` completes.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    // Before any child starts: what the node's launcher left open goes no further.
    close_inherited_on_exec();
    // The data dir holds every tenant's state and the node's secrets: the node's user only.
    config::private_dir(&config.data_dir)?;
    // Other processes of the node's user (shell tasks without a `shell_user`) cannot read
    // this process's environment or memory through /proc or ptrace.
    // SAFETY: prctl(PR_SET_DUMPABLE) only changes this process's dumpable flag.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    // Shell attempts must not run as a user that can read what this node guards.
    crate::executor::sandbox::ShellPolicy::from_config(&config).check_at_start(&config)?;
    let files = raise_open_files_limit();
    // Listeners' caps plus a reserve for RocksDB, logs and outgoing calls.
    let a = &config.admission;
    let wanted = u64::from(a.max_api_connections) + u64::from(a.max_peer_connections) + 1024;
    if files < wanted {
        warn!(
            open_files = files,
            wanted,
            "the open-files limit is below the connection caps plus a reserve: under a flood \
             accepting fails before the caps refuse; lower admission.max_*_connections or raise \
             the node's hard limit (LimitNOFILE, ulimit -Hn)"
        );
    }
    // Before Raft starts, so what it applies at start is recorded too.
    let metrics = crate::telemetry::metrics::install(config.node_id)?;
    let secret = config.resolve_cluster_secret()?;
    if secret.len() < crate::config::MIN_CLUSTER_SECRET_LEN {
        warn!(
            bytes = secret.len(),
            wanted = crate::config::MIN_CLUSTER_SECRET_LEN,
            "the cluster secret is short: this node gives no proof on the join probe, so it \
             cannot be added through POST /cluster/members (configured peers still work); set \
             a random one of 32+ bytes on every node (e.g. `head -c 32 /dev/urandom | xxd -p -c 64`)"
        );
    }
    let jwt_secret = config.resolve_hs256_secret()?;
    // Refuse a weak token setup before anything else starts.
    let verifier = Arc::new(Verifier::from_config(&config.auth, &jwt_secret)?);
    let db_path = config.data_dir.join("db");
    let db = Db::open(&db_path).map_err(|source| Error::Db {
        path: db_path.clone(),
        source,
    })?;
    let api_listener = TcpListener::bind(&config.api_addr)
        .await
        .map_err(|source| Error::Bind {
            what: "api_addr",
            addr: config.api_addr.clone(),
            source,
        })?;
    let peer_listener = TcpListener::bind(&config.peer_addr)
        .await
        .map_err(|source| Error::Bind {
            what: "peer_addr",
            addr: config.peer_addr.clone(),
            source,
        })?;
    let config = Arc::new(config);
    let tls = tls_setup(&config).await?;
    let node = RaftNode::start(
        config.clone(),
        db.clone(),
        &secret,
        tls.as_ref().map(|t| t.peer_client.clone()),
    )
    .await?;
    let actor_system = ActorSystem::start(node.clone(), config.clone())?;
    let actors = actor_system.actors.clone();

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(watch_leadership(
        node.clone(),
        actors.clone(),
        stop_rx.clone(),
    ));
    tokio::spawn({
        let node = node.clone();
        let stop = stop_rx.clone();
        async move { node.bootstrap(stop).await }
    });
    tokio::spawn({
        let node = node.clone();
        let stop = stop_rx.clone();
        async move { node.sample_clocks(stop).await }
    });

    if let Err(e) = verifier.refresh_jwks().await {
        warn!(error = %e, "cannot fetch the JWKS yet; tokens it signs fail until it can be");
    }
    if config.auth.jwks_url.is_some() {
        // Keys rotate: fetch the JWKS again every five minutes (and on an unknown kid).
        let (v, mut stop) = (verifier.clone(), stop_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(300)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if let Err(e) = v.refresh_jwks().await {
                    warn!(error = %e, "JWKS refresh failed; keeping the keys we have");
                }
            }
        });
    }
    let limiter = Arc::new(RateLimiter::new(config.node_id, config.rate_limit.clone()));
    tokio::spawn(gossip_rates(node.clone(), limiter.clone(), stop_rx.clone()));
    tokio::spawn(crate::telemetry::metrics::upkeep(
        metrics.clone(),
        stop_rx.clone(),
    ));
    let api_router = api::router(ApiState {
        node: node.clone(),
        actors: actors.clone(),
        verifier,
        limiter: limiter.clone(),
        auth_failures: Arc::new(AuthFailures::new(
            config.admission.auth_failures_per_minute,
            config.admission.auth_failure_burst,
        )),
        metrics,
    });
    let peer_router = peer_server::router(
        node.clone(),
        Arc::new(actors.proposer.clone()),
        &secret,
        limiter,
    );

    let api_handle = axum_server::Handle::new();
    let peer_handle = axum_server::Handle::new();
    let (api_tls, peer_tls) = match tls {
        Some(t) => (Some(t.api), Some(t.peer_server)),
        None => (None, None),
    };
    let header_timeout = std::time::Duration::from_millis(config.header_read_timeout_ms);
    let a = &config.admission;
    let api_server = serve(
        api_listener,
        api_router,
        api_tls,
        api_handle.clone(),
        header_timeout,
        ConnectionLimit::new(
            "api",
            a.max_api_connections,
            Some(a.max_connections_per_address),
        ),
    )?;
    let peer_server = serve(
        peer_listener,
        peer_router,
        peer_tls,
        peer_handle.clone(),
        header_timeout,
        ConnectionLimit::new(
            "peer",
            a.max_peer_connections,
            Some(a.max_peer_connections_per_address),
        )
        .only_from(peer_sources(&config))
        .exempt(member_addresses(&config)),
    )?;
    print!("{}", first_steps(&config));
    info!(node = config.node_id, api = %config.api_addr, peer = %config.peer_addr, "node started");
    if config
        .peer_addr
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().to_canonical().is_unspecified())
    {
        warn!(
            node = config.node_id,
            peer = %config.peer_addr,
            "peer_addr listens on every address, so it names none the other nodes can reach: \
             this node cannot be added to a cluster through the API (set peer_addr to its own \
             address)"
        );
    }

    // Stop on the signal, or when Raft stops on a fatal error: then this node cannot
    // serve, and the process exits so its supervisor restarts it from its disk.
    let mut fatal_rx = node.raft.metrics();
    let fatal = tokio::select! {
        _ = shutdown => None,
        f = async move {
            loop {
                if let Err(e) = &fatal_rx.borrow_and_update().running_state {
                    return e.to_string();
                }
                if fatal_rx.changed().await.is_err() {
                    return "raft metrics closed".to_string();
                }
            }
        } => Some(f),
    };
    if let Some(reason) = &fatal {
        tracing::error!(node = config.node_id, reason = %reason, "raft stopped on a fatal error; exiting so the node restarts from its disk");
    }
    info!(
        node = config.node_id,
        "shutting down: no new requests; finishing in-flight ones"
    );
    let _ = stop_tx.send(true);
    // The API drains first; peers keep being answered until raft is shut down (forwarded
    // writes only until the actors stop: their proposer is gone, and the forwarders retry
    // at the next leader).
    api_handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    if let Ok(Err(e)) = api_server.await {
        warn!(error = %e, "api server ended with an error");
    }
    actor_system.stop();
    if let Err(e) = node.raft.shutdown().await {
        warn!(error = %e, "raft shutdown reported an error");
    }
    peer_handle.graceful_shutdown(Some(std::time::Duration::from_secs(2)));
    if let Ok(Err(e)) = peer_server.await {
        warn!(error = %e, "peer server ended with an error");
    }
    if let Err(e) = db.raw().flush_wal(true).and_then(|_| db.raw().flush()) {
        warn!(error = %e, "final flush failed");
    }
    info!(node = config.node_id, "stopped");
    match fatal {
        Some(reason) => Err(Error::RaftFatal(reason)),
        None => Ok(()),
    }
}

/// Tell the leader-only actors when this node starts or stops being the serving leader.
async fn watch_leadership(
    node: RaftNode,
    actors: crate::actors::Actors,
    stop: watch::Receiver<bool>,
) {
    let mut metrics = node.raft.metrics();
    let mut last = Leadership {
        serving: false,
        term: 0,
    };
    loop {
        let m = metrics.borrow_and_update().clone();
        let now = Leadership {
            serving: node.is_serving_leader(&m),
            term: m.current_term,
        };
        if now != last {
            actors.scheduler.set_leadership(now);
            actors.supervisor.set_leadership(now);
            last = now;
        }
        if *stop.borrow() || metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Send this node's per-tenant request counts to every other member, every
/// `rate_limit.gossip_ms`, so the limit holds across the cluster.
async fn gossip_rates(node: RaftNode, limiter: Arc<RateLimiter>, stop: watch::Receiver<bool>) {
    let every = std::time::Duration::from_millis(limiter.gossip_ms());
    let timeout = every.max(std::time::Duration::from_millis(200));
    loop {
        tokio::time::sleep(every).await;
        if *stop.borrow() {
            return;
        }
        let report = limiter.report(node.clock.now_ms());
        if report.counts.is_empty() {
            continue;
        }
        let members = node
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, m)| (*id, m.clone()))
            .collect::<Vec<_>>();
        for (id, member) in members {
            if id == node.id {
                continue;
            }
            let (peers, report) = (node.peers.clone(), report.clone());
            tokio::spawn(async move {
                let _: Result<(), _> = peers
                    .call(id, &member.peer_addr, "/cluster/rate", &report, timeout)
                    .await;
            });
        }
    }
}

/// TLS material of a node: what the API serves, what the peer listener serves (client
/// certificates required: mutual TLS), and how this node calls its peers.
struct NodeTls {
    api: RustlsConfig,
    peer_server: RustlsConfig,
    peer_client: PeerTls,
}

/// Load the certificate and key (served on both listeners, and presented to peers as
/// this node's client certificate) and the CA peers are checked against, when TLS is
/// configured. The peer listener admits only clients with a certificate from that CA.
async fn tls_setup(config: &Config) -> Result<Option<NodeTls>, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    // Several nodes in one process (tests) may race to install it: the first wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let api = RustlsConfig::from_pem_file(cert, key).await.map_err(|e| {
        Error::Tls(format!(
            "cannot load {} / {}: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    let ca_path = config.tls.ca_file.as_ref().unwrap_or(cert);
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| Error::Tls(format!("cannot read {}: {e}", p.display())))
    };
    let (cert_pem, key_pem, ca_pem) = (read(cert)?, read(key)?, read(ca_path)?);
    let ca = reqwest::Certificate::from_pem(&ca_pem)
        .map_err(|e| Error::Tls(format!("{}: {e}", ca_path.display())))?;
    let identity = reqwest::Identity::from_pem(&[cert_pem.as_slice(), b"\n", &key_pem].concat())
        .map_err(|e| Error::Tls(format!("client identity from {}: {e}", cert.display())))?;

    let tls_err = |what: &str, e: &dyn std::fmt::Display| Error::Tls(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| tls_err(&ca_path.display().to_string(), &e))?;
        roots
            .add(c)
            .map_err(|e| tls_err(&ca_path.display().to_string(), &e))?;
    }
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&cert.display().to_string(), &e))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| tls_err(&key.display().to_string(), &e))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls_err("peer client verifier", &e))?;
    let mut peer = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("peer TLS", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private)
        .map_err(|e| tls_err("peer TLS certificate", &e))?;
    // HTTP/1.1 only, as both listeners serve (see `serve`).
    peer.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut api_inner = (*api.get_inner()).clone();
    api_inner.alpn_protocols = vec![b"http/1.1".to_vec()];
    let api = RustlsConfig::from_config(std::sync::Arc::new(api_inner));
    Ok(Some(NodeTls {
        api,
        peer_server: RustlsConfig::from_config(std::sync::Arc::new(peer)),
        peer_client: PeerTls { ca, identity },
    }))
}

/// Mark every descriptor this process inherited beyond stdin, stdout and stderr
/// close-on-exec, so no child (shell attempts, the fence keeper) gets it: a launcher's
/// `exec 9<secret` or a service manager's leftovers would otherwise reach every shell
/// task, whatever user it runs as. What the node opens itself is close-on-exec already
/// (Rust's std and RocksDB open everything so).
fn close_inherited_on_exec() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        warn!("cannot list this process's descriptors; inherited ones stay open to children");
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD only read and set a descriptor's flags; a descriptor
        // that closed meanwhile (the directory's own) fails harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Where peer connections may come from: the peer networks, and every configured member's
/// and this node's own addresses (a static peer may live outside `peer_networks`).
fn peer_sources(config: &Config) -> Vec<crate::cidr::Cidr> {
    // `peer_networks` was parsed when the config was validated.
    let mut sources = crate::cidr::parse_all(&config.peer_networks).unwrap_or_default();
    for ip in member_addresses(config) {
        if let Ok(host) = ip.to_string().parse() {
            sources.push(host);
        }
    }
    sources
}

/// The addresses of this node and of the configured members.
fn member_addresses(config: &Config) -> Vec<std::net::IpAddr> {
    [&config.api_addr, &config.peer_addr]
        .into_iter()
        .chain(
            config
                .peers
                .iter()
                .flat_map(|p| [&p.api_addr, &p.peer_addr]),
        )
        .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip())
        .collect()
}

/// Let the node hold as many files as its hard limit allows (many shells start it with a
/// soft limit of 1024), so the listeners' connection caps (`admission.*`), not running out
/// of descriptors, decide which connections are refused.
fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out pointer; setrlimit only changes this process's limit.
    unsafe {
        // An unlimited hard limit still stops at the kernel's nr_open (2^20 by default).
        let ceiling = |max: libc::rlim_t| max.min(1 << 20);
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
            && lim.rlim_cur < ceiling(lim.rlim_max)
        {
            let wanted = libc::rlimit {
                rlim_cur: ceiling(lim.rlim_max),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                lim.rlim_cur = wanted.rlim_cur;
            } else {
                warn!(
                    soft = lim.rlim_cur,
                    hard = lim.rlim_max,
                    "cannot raise the open-files limit"
                );
            }
        }
    }
    lim.rlim_cur
}

/// Serve `router` on `listener`, over TLS when `tls` is set, until `handle` shuts it down;
/// connections beyond `limit` are closed as they arrive. Handlers see the client's address
/// (`ConnectInfo<SocketAddr>`).
fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<RustlsConfig>,
    handle: axum_server::Handle<std::net::SocketAddr>,
    header_timeout: std::time::Duration,
    limit: ConnectionLimit,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, Error> {
    let bind_err = |e: std::io::Error| Error::Tls(format!("cannot hand the listener over: {e}"));
    let std_listener = listener.into_std().map_err(bind_err)?;
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Slowloris: a connection that does not finish its request headers in time is closed:
    // `first_request_timeout` bounds a new connection until its first request's headers
    // are in (it sends nothing at all, or dribbles them), `header_read_timeout` every
    // request's headers once they have started, and an idle keep-alive connection's next.
    // HTTP/1.1 only: an HTTP/2 connection that has sent one request has no such bound and
    // could hold its place under the connection caps for ever; nothing here needs HTTP/2
    // (peers and the CLI speak HTTP/1.1, browsers fall back to it).
    Ok(match tls {
        Some(cfg) => {
            let mut server = axum_server::from_tcp_rustls(std_listener, cfg)
                .map_err(bind_err)?
                .map(|tls| tls.acceptor(limit))
                .http1_only()
                .handle(handle)
                .first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(server.serve(service))
        }
        None => {
            let mut server = axum_server::from_tcp(std_listener)
                .map_err(bind_err)?
                .acceptor(limit)
                .http1_only()
                .handle(handle)
                .first_request_timeout(header_timeout);
            server
                .http_builder()
                .http1()
                .header_read_timeout(header_timeout);
            tokio::spawn(server.serve(service))
        }
    })
}

/// What a node prints once it serves: where it is, and CLI commands that work when
/// pasted into another shell (absolute data dir, a reachable API address).
pub fn first_steps(config: &Config) -> String {
    let scheme = if config.tls.cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    let api_addr = match config.api_addr.rsplit_once(':') {
        Some(("0.0.0.0" | "[::]", port)) => format!("127.0.0.1:{port}"),
        _ => config.api_addr.clone(),
    };
    let data_dir =
        std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
    let mut out = format!(
        "orchestrator node {} listening: API {scheme}://{api_addr} (peer {}), data in {}\n",
        config.node_id,
        config.peer_addr,
        data_dir.display()
    );
    // Listening is not ready: a node serves once it has a leader and has applied what
    // is committed (a node waiting to be added never is), which only /readyz tells.
    out.push_str(&format!(
        "ready when {scheme}://{api_addr}/readyz answers 200 (`orchestrator cluster status` shows each node)\n"
    ));
    out.push_str("use the CLI from another shell:\n");
    out.push_str(&format!(
        "  export ORCHESTRATOR_API={scheme}://{api_addr}\n"
    ));
    if let Some(ca) = config
        .tls
        .ca_file
        .as_ref()
        .or(config.tls.cert_file.as_ref())
    {
        let ca = std::path::absolute(ca).unwrap_or_else(|_| ca.clone());
        out.push_str(&format!("  export ORCHESTRATOR_CA_FILE={}\n", ca.display()));
    }
    // `orchestrator token` signs with the secret this node checks: read from the same
    // configuration file when the node read one (whatever it sets: an inline secret, a
    // secret file, the data dir, issuer and audience), else from the same secret file,
    // else the one generated in its data dir. Issuer and audience, when set, go along
    // (they are not secrets). The tenant is an operator tenant, so that `cluster status`
    // answers.
    let operator = config
        .auth
        .operator_tenants
        .first()
        .map_or("ops", String::as_str);
    let scope =
        "--scope \"orchestrator:read orchestrator:write orchestrator:admin orchestrator:shell\"";
    if let Some(file) = &config.file {
        out.push_str(&format!(
            "  export ORCHESTRATOR_TOKEN=$(orchestrator token --config {} --tenant {operator} {scope})\n",
            file.display()
        ));
        out.push_str("  orchestrator cluster status\n");
        return out;
    }
    let mut settings = String::new();
    for (name, value) in [
        ("ORCHESTRATOR_AUTH__ISSUER", config.auth.issuer.as_deref()),
        (
            "ORCHESTRATOR_AUTH__AUDIENCE",
            config.auth.audience.as_deref(),
        ),
    ] {
        if let Some(v) = value {
            settings.push_str(&format!("{name}='{v}' "));
        }
    }
    let source = match &config.auth.hs256_secret_file {
        Some(f) => {
            let f = std::path::absolute(f).unwrap_or_else(|_| f.clone());
            settings.push_str(&format!(
                "ORCHESTRATOR_AUTH__HS256_SECRET_FILE={} ",
                f.display()
            ));
            String::new()
        }
        None => format!("--data-dir {} ", data_dir.display()),
    };
    out.push_str(&format!(
        "  export ORCHESTRATOR_TOKEN=$({settings}orchestrator token {source}--tenant {operator} {scope})\n"
    ));
    out.push_str("  orchestrator cluster status\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_token_command_signs_with_the_secret_the_node_reads() {
        let generated = first_steps(&Config::default());
        assert!(
            generated.contains("orchestrator token --data-dir /"),
            "{generated}"
        );
        let mut c = Config::default();
        c.auth.hs256_secret_file = Some(std::path::PathBuf::from("/etc/orchestrator/jwt.secret"));
        c.auth.issuer = Some("https://issuer.example".into());
        let from_file = first_steps(&c);
        assert!(
            from_file.contains(
                "$(ORCHESTRATOR_AUTH__ISSUER='https://issuer.example' \
                 ORCHESTRATOR_AUTH__HS256_SECRET_FILE=/etc/orchestrator/jwt.secret \
                 orchestrator token --tenant ops"
            ),
            "{from_file}"
        );
        // Read from a file: the token command reads the same file, for an operator.
        c.file = Some(std::path::PathBuf::from("/etc/orchestrator/node.toml"));
        c.auth.operator_tenants = vec!["platform".into()];
        let configured = first_steps(&c);
        assert!(
            configured.contains(
                "$(orchestrator token --config /etc/orchestrator/node.toml --tenant platform --scope"
            ),
            "{configured}"
        );
    }
}

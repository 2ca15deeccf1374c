//! The API actor: the node's single proposer. Requests that arrive while an entry is
//! being committed queue up and go out together as the next entry's batch, so one fsync
//! and one replication round serve many writes (openraft 0.9 appends and fsyncs each
//! client write separately: throughput comes from batching here, not from concurrency).
//!
//! Every request has its own deadline, `leader_wait` after it arrived: time spent queued
//! behind an entry in flight counts against it, a request whose deadline passed while
//! queued is answered `NoLeader` without being proposed, and a batch is proposed with
//! the earliest deadline among its requests. So no request waits longer than
//! `leader_wait` for Raft, however many batches are ahead of it.

use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::raft::node::Error;
use crate::raft::RaftNode;
use crate::state::{Batch, Request, Response};

const MAX_BATCH: usize = 512;

type Reply = oneshot::Sender<Result<Response, Error>>;

#[derive(Message)]
#[rtype(result = "()")]
struct Propose {
    request: Request,
    reply: Reply,
    deadline: Instant,
}

pub struct Proposer {
    node: RaftNode,
    rt: tokio::runtime::Handle,
    queue: Vec<(Request, Reply, Instant)>,
    in_flight: bool,
}

impl Proposer {
    pub fn new(node: RaftNode, rt: tokio::runtime::Handle) -> Self {
        Proposer {
            node,
            rt,
            queue: Vec::new(),
            in_flight: false,
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight {
            return;
        }
        // Answer what expired (or was given up on) while it waited in the queue.
        let now = Instant::now();
        let waited_ms = self.node.leader_wait().as_millis() as u64;
        self.queue.retain_mut(|(_, reply, deadline)| {
            if reply.is_closed() {
                return false;
            }
            if *deadline <= now {
                let (tx, _) = oneshot::channel();
                let reply = std::mem::replace(reply, tx);
                let _ = reply.send(Err(Error::NoLeader { waited_ms }));
                return false;
            }
            true
        });
        if self.queue.is_empty() {
            return;
        }
        let n = self.queue.len().min(MAX_BATCH);
        let mut deadline = None::<Instant>;
        let mut requests = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(n);
        for (request, reply, d) in self.queue.drain(..n) {
            deadline = Some(deadline.map_or(d, |e| e.min(d)));
            requests.push(request);
            replies.push(reply);
        }
        let deadline = deadline.unwrap_or(now);
        let node = self.node.clone();
        let job = self
            .rt
            .spawn(async move { node.propose_by(Batch { requests }, false, deadline).await });
        self.in_flight = true;
        ctx.spawn(
            async move {
                let result = match job.await {
                    Ok(r) => r,
                    Err(e) => Err(Error::Stopped(format!("proposal task failed: {e}"))),
                };
                match result {
                    Ok(batch) if batch.responses.len() == replies.len() => {
                        for (reply, resp) in replies.into_iter().zip(batch.responses) {
                            let _ = reply.send(Ok(resp));
                        }
                    }
                    Ok(batch) => {
                        let e = Error::Stopped(format!(
                            "state machine answered {} of {} requests",
                            batch.responses.len(),
                            replies.len()
                        ));
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                act.in_flight = false;
                act.flush(ctx);
            }),
        );
    }
}

impl Actor for Proposer {
    type Context = Context<Self>;
}

impl Handler<Propose> for Proposer {
    type Result = ();

    fn handle(&mut self, msg: Propose, ctx: &mut Context<Self>) {
        self.queue.push((msg.request, msg.reply, msg.deadline));
        self.flush(ctx);
    }
}

/// Cheap handle to the proposer.
#[derive(Clone)]
pub struct ProposerHandle {
    addr: Addr<Proposer>,
    leader_wait: Duration,
}

impl ProposerHandle {
    pub(super) fn new(addr: Addr<Proposer>, leader_wait: Duration) -> Self {
        ProposerHandle { addr, leader_wait }
    }

    /// Commit one request through Raft and return its response, or `NoLeader` once
    /// `leader_wait` has passed since the call (the request may still commit later: its
    /// request id makes a retry safe).
    pub async fn propose(&self, request: Request) -> Result<Response, Error> {
        let deadline = Instant::now() + self.leader_wait;
        let (tx, rx) = oneshot::channel();
        self.addr.do_send(Propose {
            request,
            reply: tx,
            deadline,
        });
        // A little grace past the deadline: the batch's own bound ends there too, and its
        // answer (perhaps a commit) is better than a guess.
        let grace = Duration::from_millis(250);
        match tokio::time::timeout_at((deadline + grace).into(), rx).await {
            Ok(reply) => reply.map_err(|_| Error::Stopped("proposer stopped".into()))?,
            Err(_elapsed) => Err(Error::NoLeader {
                waited_ms: self.leader_wait.as_millis() as u64,
            }),
        }
    }
}

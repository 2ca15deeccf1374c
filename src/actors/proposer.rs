//! The API actor: the node's single proposer. Requests that arrive while an entry is
//! being committed queue up and go out together as the next entry's batch, so one fsync
//! and one replication round serve many writes (openraft 0.9 appends and fsyncs each
//! client write separately: throughput comes from batching here, not from concurrency).

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
}

pub struct Proposer {
    node: RaftNode,
    rt: tokio::runtime::Handle,
    queue: Vec<(Request, Reply)>,
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
        if self.in_flight || self.queue.is_empty() {
            return;
        }
        let n = self.queue.len().min(MAX_BATCH);
        let (requests, replies): (Vec<Request>, Vec<Reply>) = self.queue.drain(..n).unzip();
        let node = self.node.clone();
        let job = self
            .rt
            .spawn(async move { node.propose(Batch { requests }, false).await });
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
        self.queue.push((msg.request, msg.reply));
        self.flush(ctx);
    }
}

/// Cheap handle to the proposer.
#[derive(Clone)]
pub struct ProposerHandle {
    addr: Addr<Proposer>,
}

impl ProposerHandle {
    pub(super) fn new(addr: Addr<Proposer>) -> Self {
        ProposerHandle { addr }
    }

    /// Commit one request through Raft and return its response.
    pub async fn propose(&self, request: Request) -> Result<Response, Error> {
        let (tx, rx) = oneshot::channel();
        self.addr.do_send(Propose { request, reply: tx });
        rx.await
            .map_err(|_| Error::Stopped("proposer stopped".into()))?
    }
}

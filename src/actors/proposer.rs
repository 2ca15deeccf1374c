//! The API actor: the node's single proposer. One entry is being committed at a time
//! ([`MAX_IN_FLIGHT`]); requests that arrive meanwhile queue up and go out together as the
//! next entry's batch, so one fsync and one replication round serve many writes (openraft
//! 0.9 appends and fsyncs each client write separately: throughput comes from batching
//! here). On the leader, batches the other nodes forward join the same queue: under load
//! a write reaches the log in the leader's next entry whichever node it arrived at.
//!
//! Every request has its own deadline, `leader_wait` after it arrived: time spent queued
//! behind entries in flight counts against it, a request whose deadline passed while
//! queued is answered `NoLeader` without being proposed, and a batch is proposed with
//! the earliest deadline among its requests. So no request waits longer than
//! `leader_wait` for Raft, however many batches are ahead of it.
//!
//! A fresh cluster's replicated protocol is version 1 until its leader raises it. A new
//! leader whose cluster has never raised its protocol therefore raises it (to the newest
//! its voters share) before it commits anything else, holding other writes until that
//! raise ends: a fresh cluster's first writes apply under that version, not under
//! version 1's rules, unless a voter does not answer (then the raise ends without
//! proposing, and the writes go out at version 1).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::system_request;
use crate::raft::node::{Error, ForwardedWrites};
use crate::raft::RaftNode;
use crate::state::machine::PROTOCOL_VERSION;
use crate::state::{Batch, BatchResponse, Command, Outcome, Request, Response};

const MAX_BATCH: usize = 512;
/// Batches in flight at once. One: a node's writes then wait for the entry before them,
/// and every write of the cluster reaches the log in as few entries as possible. Measured
/// (release, three nodes, `POST /dags` from 63 connections over all three): one in flight
/// 2,805-2,821/s with every repeat's p99 under 100 ms; two 2,694-2,698/s and three
/// 2,579-2,583/s, each with a repeat's p99 of 0.4-1.4 s, as before forwarded batches
/// joined this queue (2,449-2,638/s, 0.5-0.7 s). Chains on a fresh cluster took the same
/// time with one, two or three (docs/performance.md, optimisation 9).
const MAX_IN_FLIGHT: usize = 1;

/// Raise the replicated protocol to this binary's version once every voter supports it
/// (a rolling upgrade finishes before any replica applies the new behaviour). Run by the
/// proposer, one at a time: first thing when a leader finds its cluster never raised,
/// and every second at the supervisor's request.
pub async fn raise_protocol(node: &RaftNode, proposer: &ProposerHandle, term: u64) {
    let current = match node.applied_protocol() {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "cannot read the protocol version"),
    };
    if current >= PROTOCOL_VERSION || node.protocol_offered() <= current {
        return;
    }
    let supported = node.voters_support().await;
    if supported <= current {
        // Every second while a voter is behind (or `raft.max_protocol` holds it): debug.
        debug!(
            current,
            supported, "protocol stays: not every voter supports a newer one"
        );
        return;
    }
    let version = supported.min(PROTOCOL_VERSION);
    match proposer
        .propose(system_request(Command::RaiseProtocol { term, version }))
        .await
    {
        Ok(r) if matches!(r.outcome, Outcome::ProtocolRaised { .. }) => {
            info!(from = current, to = version, "replicated protocol raised")
        }
        Ok(r) => info!(outcome = ?r.outcome, "protocol raise not applied"),
        Err(e) => warn!(error = %e, "protocol raise not committed"),
    }
}

/// Where a leader stands with its term's first protocol raise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstRaise {
    /// Nothing to hold in this term: the protocol was raised before, or the raise ended
    /// (committed or not), or the hold ran out (`leader_wait`: a raise that outlived it
    /// is stuck, and the writes held would fail their own deadlines).
    Settled { term: u64 },
    /// Raising since `since`: only the raise goes out.
    Raising { term: u64, since: Instant },
}

/// Whether a leader in `term` holds writes back for the first raise, given where it stands
/// (`None`: nothing yet this process) and, when that does not settle it, the protocol its
/// cluster has applied (`None`: unreadable, so nothing is held). Returns the new standing
/// and whether a raise must be started now.
///
/// The raise's end settles the hold (its asking of the voters is bounded by the RPC
/// timeout, its commit by `leader_wait`), whatever the time: it held for a fixed 500 ms
/// before, and a node starved of CPU took longer than that to commit a healthy raise, so
/// its first writes applied under version 1's rules. `hold` only bounds a raise that
/// never ends.
fn first_raise(
    standing: Option<FirstRaise>,
    term: u64,
    now: Instant,
    hold: Duration,
    applied: impl FnOnce() -> Option<u32>,
) -> (FirstRaise, bool) {
    match standing {
        Some(s @ FirstRaise::Settled { term: t }) if t == term => (s, false),
        Some(FirstRaise::Raising { term: t, since }) if t == term => {
            if now.duration_since(since) < hold {
                (FirstRaise::Raising { term, since }, false)
            } else {
                (FirstRaise::Settled { term }, false)
            }
        }
        _ => match applied() {
            Some(1) => (FirstRaise::Raising { term, since: now }, true),
            _ => (FirstRaise::Settled { term }, false),
        },
    }
}

fn is_raise(w: &Waiting) -> bool {
    !w.requests.is_empty()
        && w.requests
            .iter()
            .all(|r| matches!(r.command, Command::RaiseProtocol { .. }))
}

/// Who waits for a part of a batch's answer: one of this node's requests, or a batch
/// another node forwarded to this one (answered as a whole, and never forwarded again).
enum Waiter {
    Local(oneshot::Sender<Result<Response, Error>>),
    Forwarded(oneshot::Sender<Result<BatchResponse, Error>>),
}

impl Waiter {
    fn given_up(&self) -> bool {
        match self {
            Waiter::Local(reply) => reply.is_closed(),
            Waiter::Forwarded(reply) => reply.is_closed(),
        }
    }

    fn fail(self, e: Error) {
        match self {
            Waiter::Local(reply) => {
                let _ = reply.send(Err(e));
            }
            Waiter::Forwarded(reply) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Requests in the queue (one for a local waiter), who waits for them, and until when.
#[derive(Message)]
#[rtype(result = "()")]
struct Waiting {
    requests: Vec<Request>,
    waiter: Waiter,
    deadline: Instant,
}

/// A waiter's share of a batch in flight: its next `n` requests.
struct Part {
    n: usize,
    waiter: Waiter,
    deadline: Instant,
}

pub struct Proposer {
    node: RaftNode,
    rt: tokio::runtime::Handle,
    queue: VecDeque<Waiting>,
    /// Batches proposed and not yet answered (at most [`MAX_IN_FLIGHT`]).
    in_flight: usize,
    /// This leader's first protocol raise (`None` before it first led).
    first_raise: Option<FirstRaise>,
    /// A protocol check (and raise) is in flight: one at a time, whoever asks.
    raising: bool,
    /// A term whose check was asked for while another ran: it starts when that ends.
    check_next: Option<u64>,
    /// The term this node leads in, as of the last flush (`None`: not leading).
    leading_term: Option<u64>,
}

impl Proposer {
    pub fn new(node: RaftNode, rt: tokio::runtime::Handle) -> Self {
        Proposer {
            node,
            rt,
            queue: VecDeque::new(),
            in_flight: 0,
            first_raise: None,
            raising: false,
            check_next: None,
            leading_term: None,
        }
    }

    /// Check (and raise) the replicated protocol for `term` unless a check is in flight;
    /// when it ends, the term's hold for its first raise ends too.
    fn check_protocol(&mut self, ctx: &mut Context<Self>, term: u64) {
        if self.raising {
            // An older term's check may wait on a voter that is down: this one follows.
            self.check_next = Some(term);
            return;
        }
        self.raising = true;
        let node = self.node.clone();
        let proposer = ProposerHandle::new(ctx.address(), self.node.leader_wait());
        let raise = self.rt.spawn(async move {
            raise_protocol(&node, &proposer, term).await;
        });
        ctx.spawn(raise.into_actor(self).map(move |_, act, ctx| {
            act.raising = false;
            if matches!(act.first_raise, Some(FirstRaise::Raising { term: t, .. }) if t == term) {
                act.first_raise = Some(FirstRaise::Settled { term });
            }
            if let Some(next) = act.check_next.take().filter(|t| *t != term) {
                act.check_protocol(ctx, next);
            }
            act.flush(ctx);
        }));
    }

    /// Whether writes other than the protocol raise wait now (this node leads in `term`).
    /// Starts the term's first raise when the cluster has never raised its protocol.
    fn holding(&mut self, ctx: &mut Context<Self>, term: u64) -> bool {
        let node = self.node.clone();
        let hold = node.leader_wait();
        // Nothing to raise to (`raft.max_protocol` holds the cluster) reads as settled.
        let (standing, start) = first_raise(self.first_raise, term, Instant::now(), hold, || {
            node.applied_protocol()
                .ok()
                .filter(|p| node.protocol_offered() > *p)
        });
        self.first_raise = Some(standing);
        if start {
            // A check already in flight (the supervisor's) ends this hold just as well.
            self.check_protocol(ctx, term);
            ctx.run_later(hold, |act, ctx| act.flush(ctx));
        }
        matches!(standing, FirstRaise::Raising { .. })
    }

    /// This node's term while it leads with its quorum; else the `NotLeader` a forwarder
    /// gets.
    fn leading(&self) -> Result<u64, Error> {
        let metrics = self.node.raft.metrics();
        let m = metrics.borrow();
        if m.state == openraft::ServerState::Leader && self.node.has_quorum(&m) {
            return Ok(m.current_term);
        }
        Err(Error::NotLeader {
            leader: m.current_leader.filter(|l| *l != self.node.id),
        })
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight >= MAX_IN_FLIGHT {
            return;
        }
        // Answer what expired (or was given up on) while it waited in the queue; forwarded
        // requests wait for this node's entry only while it leads.
        let now = Instant::now();
        let waited_ms = self.node.leader_wait().as_millis() as u64;
        let leading = self.leading();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for w in self.queue.drain(..) {
            if w.waiter.given_up() {
                continue;
            }
            match (&leading, &w.waiter) {
                _ if w.deadline <= now => w.waiter.fail(Error::NoLeader { waited_ms }),
                (Err(e), Waiter::Forwarded(_)) => w.waiter.fail(e.clone()),
                _ => kept.push_back(w),
            }
        }
        self.queue = kept;
        self.leading_term = leading.as_ref().ok().copied();
        if let Ok(term) = leading {
            if self.holding(ctx, term) {
                // Only the raise goes out; the rest waits for it, or for the hold's end.
                while self.in_flight < MAX_IN_FLIGHT {
                    let Some(w) = self
                        .queue
                        .iter()
                        .position(is_raise)
                        .and_then(|i| self.queue.remove(i))
                    else {
                        return;
                    };
                    let part = Part {
                        n: w.requests.len(),
                        waiter: w.waiter,
                        deadline: w.deadline,
                    };
                    self.launch(
                        ctx,
                        Batch {
                            requests: w.requests,
                        },
                        vec![part],
                    );
                }
                return;
            }
        }
        while self.in_flight < MAX_IN_FLIGHT {
            let Some((batch, parts)) = take_batch(&mut self.queue) else {
                return;
            };
            self.launch(ctx, batch, parts);
        }
    }

    /// Propose `batch` and, when it is answered, hand out the answers and flush again.
    fn launch(&mut self, ctx: &mut Context<Self>, batch: Batch, parts: Vec<Part>) {
        let deadline = parts
            .iter()
            .map(|p| p.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        // A batch holding forwarded requests is proposed here or not at all: it already
        // took its one hop.
        let forwarded = parts
            .iter()
            .any(|p| matches!(p.waiter, Waiter::Forwarded(_)));
        let node = self.node.clone();
        // Launched by a leader past its hold, or by a follower (which hands the batch
        // back should it lead before the batch commits: the hold applies then).
        let let_go_in = self.leading_term;
        let job = self.rt.spawn(async move {
            let result = node
                .propose_by(&batch, forwarded, let_go_in, deadline)
                .await;
            (batch, result)
        });
        self.in_flight += 1;
        ctx.spawn(job.into_actor(self).map(move |joined, act, ctx| {
            act.in_flight -= 1;
            let again = match joined {
                Ok((batch, result)) => answer(batch, parts, result),
                Err(e) => {
                    let e = Error::Stopped(format!("proposal task failed: {e}"));
                    parts.into_iter().for_each(|p| p.waiter.fail(e.clone()));
                    Vec::new()
                }
            };
            for w in again.into_iter().rev() {
                act.queue.push_front(w);
            }
            act.flush(ctx);
        }));
    }
}

/// The next batch: up to [`MAX_BATCH`] requests from the front of the queue (a forwarded
/// batch is never split: the first one goes whatever its size), and who waits for which.
fn take_batch(queue: &mut VecDeque<Waiting>) -> Option<(Batch, Vec<Part>)> {
    let mut requests = Vec::with_capacity(
        queue
            .iter()
            .map(|w| w.requests.len())
            .sum::<usize>()
            .min(MAX_BATCH),
    );
    let mut parts = Vec::new();
    while let Some(w) = queue.front() {
        if !parts.is_empty() && requests.len() + w.requests.len() > MAX_BATCH {
            break;
        }
        let Some(w) = queue.pop_front() else { break };
        parts.push(Part {
            n: w.requests.len(),
            waiter: w.waiter,
            deadline: w.deadline,
        });
        requests.extend(w.requests);
    }
    (!parts.is_empty()).then_some((Batch { requests }, parts))
}

/// Hand each waiter its part of the batch's answer, in order. A batch that could not go
/// because it held forwarded requests and this node no longer leads fails those, and
/// returns this node's own requests to queue again (to be forwarded to the leader).
fn answer(batch: Batch, parts: Vec<Part>, result: Result<BatchResponse, Error>) -> Vec<Waiting> {
    let expected: usize = parts.iter().map(|p| p.n).sum();
    let mut responses = match result {
        Ok(answered) if answered.responses.len() == expected => answered.responses.into_iter(),
        Ok(answered) => {
            let e = Error::Stopped(format!(
                "state machine answered {} of {expected} requests",
                answered.responses.len()
            ));
            parts.into_iter().for_each(|p| p.waiter.fail(e.clone()));
            return Vec::new();
        }
        Err(e @ Error::NotLeader { .. }) => {
            let mut requests = batch.requests.into_iter();
            let mut again = Vec::new();
            for p in parts {
                let mine: Vec<Request> = requests.by_ref().take(p.n).collect();
                match p.waiter {
                    Waiter::Local(_) => again.push(Waiting {
                        requests: mine,
                        waiter: p.waiter,
                        deadline: p.deadline,
                    }),
                    Waiter::Forwarded(_) => p.waiter.fail(e.clone()),
                }
            }
            return again;
        }
        Err(e) => {
            parts.into_iter().for_each(|p| p.waiter.fail(e.clone()));
            return Vec::new();
        }
    };
    for p in parts {
        match p.waiter {
            Waiter::Local(reply) => {
                if let Some(r) = responses.next() {
                    let _ = reply.send(Ok(r));
                }
            }
            Waiter::Forwarded(reply) => {
                let part: Vec<Response> = responses.by_ref().take(p.n).collect();
                let _ = reply.send(Ok(BatchResponse { responses: part }));
            }
        }
    }
    Vec::new()
}

impl Actor for Proposer {
    type Context = Context<Self>;
}

impl Handler<Waiting> for Proposer {
    type Result = ();

    fn handle(&mut self, w: Waiting, ctx: &mut Context<Self>) {
        // A forwarded batch is told at once when this node cannot commit it now (not the
        // leader, or a leader without its quorum), rather than after the batch in flight:
        // its forwarder then finds the leader itself.
        if matches!(w.waiter, Waiter::Forwarded(_)) {
            if let Err(e) = self.leading() {
                w.waiter.fail(e);
                return;
            }
        }
        self.queue.push_back(w);
        self.flush(ctx);
    }
}

/// Check the replicated protocol now (the supervisor's periodic check, as leader of
/// `term`); ignored while a check is in flight.
#[derive(Message)]
#[rtype(result = "()")]
struct CheckProtocol {
    term: u64,
}

impl Handler<CheckProtocol> for Proposer {
    type Result = ();

    fn handle(&mut self, m: CheckProtocol, ctx: &mut Context<Self>) {
        self.check_protocol(ctx, m.term);
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

    /// Check the replicated protocol and raise it when every voter supports a newer one
    /// ([`raise_protocol`]), as the leader of `term`; nothing while a check is in flight.
    pub fn check_protocol(&self, term: u64) {
        self.addr.do_send(CheckProtocol { term });
    }

    /// Commit one request through Raft and return its response, or `NoLeader` once
    /// `leader_wait` has passed since the call (the request may still commit later: its
    /// request id makes a retry safe).
    pub async fn propose(&self, request: Request) -> Result<Response, Error> {
        let deadline = Instant::now() + self.leader_wait;
        let (tx, rx) = oneshot::channel();
        self.addr.do_send(Waiting {
            requests: vec![request],
            waiter: Waiter::Local(tx),
            deadline,
        });
        self.answer_of(rx, deadline).await
    }

    /// The answer on `rx`, or `NoLeader` a little past `deadline`: the batch's own bound
    /// ends there too, and its answer (perhaps a commit) is better than a guess.
    async fn answer_of<T>(
        &self,
        rx: oneshot::Receiver<Result<T, Error>>,
        deadline: Instant,
    ) -> Result<T, Error> {
        let grace = Duration::from_millis(250);
        match tokio::time::timeout_at((deadline + grace).into(), rx).await {
            Ok(reply) => reply.map_err(|_| Error::Stopped("proposer stopped".into()))?,
            Err(_elapsed) => Err(Error::NoLeader {
                waited_ms: self.leader_wait.as_millis() as u64,
            }),
        }
    }
}

impl ForwardedWrites for ProposerHandle {
    /// A batch another node forwarded to this one (the leader, it believes), committed in
    /// this node's next entry along with its own writes.
    fn propose_forwarded(
        &self,
        batch: Batch,
    ) -> futures::future::BoxFuture<'static, Result<BatchResponse, Error>> {
        let deadline = Instant::now() + self.leader_wait;
        let (tx, rx) = oneshot::channel();
        self.addr.do_send(Waiting {
            requests: batch.requests,
            waiter: Waiter::Forwarded(tx),
            deadline,
        });
        let me = self.clone();
        Box::pin(async move { me.answer_of(rx, deadline).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> Request {
        Request {
            request_id: id.into(),
            proposed_at_ms: 0,
            idempotency: None,
            command: Command::Supervise { term: 1 },
            subject: None,
            quota: None,
            shell_scope: false,
        }
    }

    /// A response that says which request it answers (its id, a number, as the marker).
    fn response(id: &str) -> Response {
        Response {
            outcome: Outcome::StaleAttempt {
                current: id.trim_start_matches('f').parse().expect("numeric ids"),
            },
            replayed: false,
        }
    }

    fn answered(r: &Response) -> u32 {
        match r.outcome {
            Outcome::StaleAttempt { current } => current,
            _ => unreachable!("every test response is a marker"),
        }
    }

    type LocalRx = oneshot::Receiver<Result<Response, Error>>;
    type ForwardedRx = oneshot::Receiver<Result<BatchResponse, Error>>;

    fn local(id: &str) -> (Waiting, LocalRx) {
        let (tx, rx) = oneshot::channel();
        let w = Waiting {
            requests: vec![request(id)],
            waiter: Waiter::Local(tx),
            deadline: Instant::now() + Duration::from_secs(5),
        };
        (w, rx)
    }

    fn forwarded(ids: &[&str]) -> (Waiting, ForwardedRx) {
        let (tx, rx) = oneshot::channel();
        let w = Waiting {
            requests: ids.iter().map(|id| request(id)).collect(),
            waiter: Waiter::Forwarded(tx),
            deadline: Instant::now() + Duration::from_secs(5),
        };
        (w, rx)
    }

    fn ids(b: &Batch) -> Vec<&str> {
        b.requests.iter().map(|r| r.request_id.as_str()).collect()
    }

    #[test]
    fn forwarded_batches_join_the_local_requests_in_one_batch_and_get_their_answers() {
        let (a, mut a_rx) = local("1");
        let (f, mut f_rx) = forwarded(&["f2", "f3"]);
        let (b, mut b_rx) = local("4");
        let mut queue: VecDeque<Waiting> = [a, f, b].into_iter().collect();
        let (batch, parts) = take_batch(&mut queue).expect("a batch");
        assert!(queue.is_empty());
        assert_eq!(ids(&batch), ["1", "f2", "f3", "4"]);
        let all = BatchResponse {
            responses: ids(&batch).into_iter().map(response).collect(),
        };
        assert!(answer(batch, parts, Ok(all)).is_empty());
        assert_eq!(answered(&a_rx.try_recv().unwrap().unwrap()), 1);
        assert_eq!(answered(&b_rx.try_recv().unwrap().unwrap()), 4);
        let f: Vec<u32> = f_rx
            .try_recv()
            .unwrap()
            .unwrap()
            .responses
            .iter()
            .map(answered)
            .collect();
        assert_eq!(f, [2, 3]);
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_requests_and_never_splits_a_forwarded_one() {
        let big: Vec<String> = (0..MAX_BATCH + 3).map(|i| format!("f{i}")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let (f, _f_rx) = forwarded(&big);
        let (a, _a_rx) = local("1");
        let mut queue: VecDeque<Waiting> = [f, a].into_iter().collect();
        let (batch, _) = take_batch(&mut queue).expect("a batch");
        assert_eq!(
            batch.requests.len(),
            MAX_BATCH + 3,
            "the forwarded batch whole"
        );
        assert_eq!(queue.len(), 1, "the local request waits for the next entry");
        let mut queue: VecDeque<Waiting> = (0..MAX_BATCH + 1)
            .map(|i| local(&i.to_string()).0)
            .collect();
        let (batch, _) = take_batch(&mut queue).expect("a batch");
        assert_eq!(batch.requests.len(), MAX_BATCH);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn not_leading_fails_the_forwarded_part_and_requeues_the_local_requests() {
        let (a, mut a_rx) = local("1");
        let (f, mut f_rx) = forwarded(&["f2"]);
        let mut queue: VecDeque<Waiting> = [a, f].into_iter().collect();
        let (batch, parts) = take_batch(&mut queue).expect("a batch");
        let again = answer(batch, parts, Err(Error::NotLeader { leader: Some(2) }));
        assert!(matches!(
            f_rx.try_recv(),
            Ok(Err(Error::NotLeader { leader: Some(2) }))
        ));
        assert!(
            a_rx.try_recv().is_err(),
            "the local request is not answered yet"
        );
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].requests[0].request_id, "1");
        assert!(matches!(again[0].waiter, Waiter::Local(_)));
    }

    #[test]
    fn a_leader_of_a_never_raised_cluster_holds_writes_for_its_first_raise_only() {
        let t0 = Instant::now();
        let unread = || -> Option<u32> { panic!("the applied protocol is read once a term") };
        // Never raised: start the raise and hold.
        let hold = Duration::from_secs(5);
        let (raising, start) = first_raise(None, 3, t0, hold, || Some(1));
        assert_eq!(raising, FirstRaise::Raising { term: 3, since: t0 });
        assert!(start);
        // Within the hold: hold on, start nothing more.
        let ms = Duration::from_millis;
        assert_eq!(
            first_raise(Some(raising), 3, t0 + ms(100), hold, unread),
            (raising, false)
        );
        // However slow the raise (a node starved of CPU), until it ends or the hold runs
        // out.
        assert_eq!(
            first_raise(Some(raising), 3, t0 + ms(4_000), hold, unread),
            (raising, false)
        );
        // The hold runs out: writes go.
        let settled = FirstRaise::Settled { term: 3 };
        assert_eq!(
            first_raise(Some(raising), 3, t0 + hold, hold, unread),
            (settled, false)
        );
        assert_eq!(
            first_raise(Some(settled), 3, t0 + ms(900), hold, unread),
            (settled, false)
        );
        // A new term looks again: a raised cluster holds nothing, nor an unreadable one.
        let next = FirstRaise::Settled { term: 4 };
        assert_eq!(
            first_raise(Some(settled), 4, t0, hold, || Some(8)),
            (next, false)
        );
        assert_eq!(
            first_raise(Some(raising), 4, t0, hold, || None),
            (next, false)
        );
        // A new term of a cluster still at 1 (the last leader's raise never committed).
        assert_eq!(
            first_raise(Some(settled), 5, t0, hold, || Some(1)),
            (FirstRaise::Raising { term: 5, since: t0 }, true)
        );
    }

    #[test]
    fn only_a_raise_alone_passes_the_hold() {
        let raise = |id: &str| Request {
            command: Command::RaiseProtocol {
                term: 1,
                version: 8,
            },
            ..request(id)
        };
        let (mut w, _rx) = local("1");
        assert!(!is_raise(&w));
        w.requests = vec![raise("2")];
        assert!(is_raise(&w));
        w.requests.push(request("3"));
        assert!(
            !is_raise(&w),
            "a raise batched with a write holds the write back"
        );
        w.requests.clear();
        assert!(!is_raise(&w));
    }
}

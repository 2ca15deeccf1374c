//! Linearizable reads that share leadership confirmations. Each read index costs the
//! leader a round of heartbeats to a quorum; one round per read made a `GET` under load
//! cost two RPCs, which at 63 concurrent reads timed out and ran the kernel out of local
//! ports (docs/performance.md). Here concurrent reads join rounds: at most one round is
//! in flight, and a read that arrives meanwhile joins the next one, which starts when the
//! current one ends. A read never joins a round that started before it arrived: such a
//! round may have confirmed leadership before the read was asked, which is exactly what
//! linearizability forbids. Written by hand: this is etcd's and TiKV's read-index
//! batching, and no crate offers it for openraft 0.9.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Round<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

/// Runs `round` for every batch of callers waiting at its start.
pub struct ReadRounds<T> {
    round: Round<T>,
    waiting: Arc<Mutex<Waiting<T>>>,
}

struct Waiting<T> {
    /// A driver task is running rounds.
    driving: bool,
    /// Callers for the next round.
    next: Vec<oneshot::Sender<T>>,
}

impl<T> Clone for ReadRounds<T> {
    fn clone(&self) -> Self {
        ReadRounds {
            round: self.round.clone(),
            waiting: self.waiting.clone(),
        }
    }
}

impl<T: Clone + Send + 'static> ReadRounds<T> {
    pub fn new<F, Fut>(round: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        ReadRounds {
            round: Arc::new(move || Box::pin(round())),
            waiting: Arc::new(Mutex::new(Waiting {
                driving: false,
                next: Vec::new(),
            })),
        }
    }

    /// The result of a round that started after this call. `None` only if the driver
    /// task was dropped (the runtime is shutting down).
    pub async fn join(&self) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut w = lock(&self.waiting);
            w.next.push(tx);
            !std::mem::replace(&mut w.driving, true)
        };
        if start {
            let (round, waiting) = (self.round.clone(), self.waiting.clone());
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut w = lock(&waiting);
                        if w.next.is_empty() {
                            w.driving = false;
                            return;
                        }
                        std::mem::take(&mut w.next)
                    };
                    let out = round().await;
                    for tx in batch {
                        // A caller that gave up (its own deadline) no longer listens.
                        let _ = tx.send(out.clone());
                    }
                }
            });
        }
        rx.await.ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The lock only guards two fields, each left whole by every critical section.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    /// A round records when it started (a counter) and returns it after a while.
    fn counting() -> (ReadRounds<u64>, Arc<AtomicU64>) {
        let started = Arc::new(AtomicU64::new(0));
        let s = started.clone();
        let rounds = ReadRounds::new(move || {
            let n = s.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n
            }
        });
        (rounds, started)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_and_never_join_one_already_started() {
        let (rounds, started) = counting();
        let mut handles = Vec::new();
        for _ in 0..200 {
            let r = rounds.clone();
            let s = started.clone();
            handles.push(tokio::spawn(async move {
                // Rounds already started when this read arrived.
                let before = s.load(Ordering::SeqCst);
                let got = r.join().await.expect("a round");
                (before, got)
            }));
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        for h in handles {
            let (before, got) = h.await.expect("task");
            assert!(
                got > before,
                "answered by round {got}, which started before the read (round {before})"
            );
        }
        let total = started.load(Ordering::SeqCst);
        assert!(
            (2..100).contains(&total),
            "200 reads over ~100 ms of 20 ms rounds: {total} rounds"
        );
    }

    #[tokio::test]
    async fn each_lone_read_gets_its_own_round() {
        let (rounds, started) = counting();
        assert_eq!(rounds.join().await, Some(1));
        assert_eq!(rounds.join().await, Some(2));
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }
}

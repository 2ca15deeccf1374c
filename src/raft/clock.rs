//! The cluster's wall clock as this node reads it: its own clock corrected by the median
//! of the voters' clocks, which it samples over the peer port.
//!
//! Every time a node puts into the replicated state — the stamp on a proposal (and so
//! the cluster clock apply keeps), the windows the scheduler fires, the purge cutoffs —
//! comes from [`ClusterClock::now_ms`]. With three voters, one clock that is wrong by any
//! amount, fast or slow, moves none of them: the median is one of the two others. A node
//! that leads with its clock a minute fast therefore neither fires a window a minute
//! early nor purges a record a minute before its retention ends. With an even number of
//! known clocks the slower middle one counts: a clock read late only delays firing,
//! lease expiry and purge, and never brings them forward.
//!
//! Offsets are measured NTP-style (the peer's clock against the midpoint of the round
//! trip, on the monotonic clock), every [`SAMPLE_EVERY`], and a sample older than
//! [`SAMPLE_TTL`] no longer counts: clocks drift slowly, so a voter that is down for a
//! few minutes keeps its say. A sample is wrong by at most half its round trip, and on a
//! busy node the two legs differ by most of it; so, as NTP's clock filter does, a node
//! keeps each voter's last [`FILTER_SAMPLES`] samples and reads the one with the shortest
//! round trip. Chaos Run 6 ran with the newest sample instead, under load: two nodes'
//! readings could differ by up to 500 ms, most of the 600 ms fence margin. A node with no
//! samples yet (just started, or alone) reads its own clock; leader work that acts on
//! time waits for [`ClusterClock::calibrated`].
//!
//! A sample bounds the true offset to within half its round trip of what it measured, so
//! two samples of one voter whose bounds do not meet cannot both be right: a clock (the
//! voter's or this node's) was stepped between them. A new sample then drops every older
//! one it contradicts, and the reading follows the step at once instead of keeping a
//! pre-step sample for up to [`FILTER_SAMPLES`] rounds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::NodeId;

/// How often a node samples each voter's clock.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How often while this node's reading is not yet the median of a majority (start-up).
pub const SAMPLE_EVERY_UNCALIBRATED: Duration = Duration::from_millis(200);
/// How long a sample counts.
pub const SAMPLE_TTL: Duration = Duration::from_secs(600);
/// A sample whose round trip took longer than this says too little about the offset.
const MAX_SAMPLE_RTT: Duration = Duration::from_millis(500);
/// How many recent samples of each voter count: the one with the shortest round trip
/// gives the offset (16 s of samples at [`SAMPLE_EVERY`], in which clocks drift by
/// microseconds).
pub const FILTER_SAMPLES: usize = 8;
/// What two consistent samples may still disagree by beyond their round trips: each
/// offset comes from two wall clocks read in whole milliseconds and a halved round trip
/// truncated to one (up to 3 ms of rounding between two samples), and clocks drift by
/// microseconds over the filter's span. A step worth following is far larger.
const STEP_SLACK_MS: u64 = 5;

/// A peer's answer to a clock sample (`/cluster/clock`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ClockReading {
    pub wall_ms: i64,
}

/// This node's wall clock, in milliseconds since the Unix epoch.
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    offset_ms: i64,
    rtt: Duration,
    at: Instant,
}

/// The offset a voter's recent samples give: that of the fresh one with the shortest
/// round trip (the tightest error bound), if any is fresh.
fn filtered(samples: &VecDeque<Sample>) -> Option<i64> {
    samples
        .iter()
        .filter(|s| s.at.elapsed() < SAMPLE_TTL)
        .min_by_key(|s| s.rtt)
        .map(|s| s.offset_ms)
}

/// The voters' clock offsets as this node measured them.
#[derive(Debug)]
pub struct ClusterClock {
    own: NodeId,
    samples: Mutex<BTreeMap<NodeId, VecDeque<Sample>>>,
    warn_offset_ms: u64,
}

impl ClusterClock {
    pub fn new(own: NodeId, warn_offset_ms: u64) -> Self {
        ClusterClock {
            own,
            samples: Mutex::new(BTreeMap::new()),
            warn_offset_ms,
        }
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, VecDeque<Sample>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the map itself
        // is always whole (each update is one insert or retain).
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster's time now: this node's wall clock plus the median correction.
    pub fn now_ms(&self) -> i64 {
        wall_ms() + self.correction_ms()
    }

    /// What to add to this node's wall clock to read the voters' median clock.
    pub fn correction_ms(&self) -> i64 {
        let offsets: Vec<i64> = self.samples().values().filter_map(filtered).collect();
        median_correction(&offsets)
    }

    /// Every voter's clock offset from this node's, as last measured (milliseconds the
    /// peer's clock is ahead), fresh samples only.
    pub fn offsets_ms(&self) -> BTreeMap<NodeId, i64> {
        self.samples()
            .iter()
            .filter_map(|(id, s)| filtered(s).map(|o| (*id, o)))
            .collect()
    }

    /// True when this node has fresh samples from a majority of `voters` (itself
    /// included), so its reading is the median of a majority and not just its own.
    pub fn calibrated(&self, voters: &[NodeId]) -> bool {
        let samples = self.samples();
        let known = voters
            .iter()
            .filter(|v| **v == self.own || samples.get(v).and_then(filtered).is_some())
            .count();
        known * 2 > voters.len()
    }

    /// Record one measurement: the peer reported `peer_wall_ms` in a round trip that
    /// started at this node's wall time `sent_wall_ms` and took `rtt`.
    pub fn record(&self, peer: NodeId, sent_wall_ms: i64, rtt: Duration, peer_wall_ms: i64) {
        if peer == self.own || rtt > MAX_SAMPLE_RTT {
            return;
        }
        let offset_ms = peer_wall_ms - (sent_wall_ms + rtt.as_millis() as i64 / 2);
        if offset_ms.unsigned_abs() > self.warn_offset_ms {
            warn!(
                peer,
                offset_ms,
                max_ms = self.warn_offset_ms,
                "a voter's clock is off from this node's; the cluster reads the median clock"
            );
        }
        let mut samples = self.samples();
        let kept = samples.entry(peer).or_default();
        let before = kept.len();
        kept.retain(|s| {
            let bound = (s.rtt + rtt).as_millis() as u64 / 2 + STEP_SLACK_MS;
            s.offset_ms.abs_diff(offset_ms) <= bound
        });
        if kept.len() < before {
            info!(
                peer,
                offset_ms,
                dropped = before - kept.len(),
                "a clock was stepped: dropped the voter's earlier samples that contradict the new one"
            );
        }
        kept.push_back(Sample {
            offset_ms,
            rtt,
            at: Instant::now(),
        });
        while kept.len() > FILTER_SAMPLES {
            kept.pop_front();
        }
    }

    /// Forget the samples of nodes that are no longer voters.
    pub fn retain(&self, voters: &[NodeId]) {
        self.samples().retain(|id, _| voters.contains(id));
    }
}

/// The median of this node's own offset (0) and the voters' offsets: the lower middle
/// value when their count is even.
pub fn median_correction(peer_offsets: &[i64]) -> i64 {
    let mut all = Vec::with_capacity(peer_offsets.len() + 1);
    all.push(0);
    all.extend_from_slice(peer_offsets);
    all.sort_unstable();
    all[(all.len() - 1) / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wrong_clock_of_three_moves_nothing() {
        // This node is a minute fast: both others read 60 s behind it.
        assert_eq!(median_correction(&[-60_000, -60_100]), -60_000);
        // This node is right; one peer a minute fast, one 6 s slow.
        assert_eq!(median_correction(&[60_000, -6_000]), 0);
        // This node is 6 s slow; one peer a minute fast, one right.
        assert_eq!(median_correction(&[66_000, 6_000]), 6_000);
    }

    #[test]
    fn a_stepped_clock_is_followed_at_once() {
        let c = ClusterClock::new(1, 500);
        c.record(2, 4_998, Duration::from_millis(4), 5_000);
        // Within the bounds of the first: kept, and the precise one still counts.
        c.record(2, 10_000, Duration::from_millis(40), 10_030);
        assert_eq!(c.offsets_ms().get(&2), Some(&0));
        // The peer's clock is stepped 10 s ahead: no round trip explains that, so the
        // samples from before the step go and the new offset counts now.
        c.record(2, 20_000, Duration::from_millis(300), 30_150);
        assert_eq!(c.offsets_ms().get(&2), Some(&10_000));
    }

    #[test]
    fn the_sample_with_the_shortest_round_trip_counts() {
        let c = ClusterClock::new(1, 500);
        // The peer's clock is this node's: 5_000 at the midpoint of a 4 ms round trip.
        c.record(2, 4_998, Duration::from_millis(4), 5_000);
        // Later samples on a busy node: the reply waited 400 ms (the peer reads early) or
        // the request did (late): each looks 200 ms off.
        c.record(2, 10_000, Duration::from_millis(400), 10_000);
        c.record(2, 20_000, Duration::from_millis(400), 20_400);
        assert_eq!(c.offsets_ms().get(&2), Some(&0));
        assert_eq!(c.correction_ms(), 0);
        // Only the last FILTER_SAMPLES count: the precise one ages out.
        for i in 0..FILTER_SAMPLES as i64 {
            c.record(2, 30_000 + i, Duration::from_millis(300), 30_000 + i + 300);
        }
        assert_eq!(c.offsets_ms().get(&2), Some(&150));
    }

    #[test]
    fn alone_or_even_reads_the_slower_middle_clock() {
        assert_eq!(median_correction(&[]), 0);
        assert_eq!(median_correction(&[60_000]), 0);
        assert_eq!(median_correction(&[-60_000]), -60_000);
    }

    #[test]
    fn samples_count_by_majority_and_slow_round_trips_are_dropped() {
        let c = ClusterClock::new(1, 500);
        assert!(!c.calibrated(&[1, 2, 3]));
        assert!(c.calibrated(&[1]));
        c.record(2, 1_000, Duration::from_millis(900), 9_999_999);
        assert!(
            c.offsets_ms().is_empty(),
            "a 900 ms round trip is no sample"
        );
        c.record(2, 1_000, Duration::from_millis(20), 61_010);
        assert_eq!(c.offsets_ms().get(&2), Some(&60_000));
        assert!(c.calibrated(&[1, 2, 3]));
        c.retain(&[1, 3]);
        assert!(!c.calibrated(&[1, 2, 3]));
    }
}

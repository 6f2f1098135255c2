//! Why sessions move on their own: load reports between the servers of a
//! pool, sending new sessions away from a full or draining server, the
//! rebalancer, and drain. The decisions are pure functions of the loads
//! (tested here); the [`Endpoint`](super::Endpoint) applies them on its
//! timers.
//!
//! Every server reports its load to each peer every
//! [`BalanceConfig::report_every`] ([`LoadReport`]: sessions owned,
//! capacity, bytes per second, draining). A peer is a *candidate* for
//! sessions while its last report is fresh (younger than
//! [`BalanceConfig::stale_after`]), its control link is up, it is not
//! draining and it has room below its capacity. Sessions go to the least
//! loaded candidate first, counting each one given as it is given (water
//! filling), so a batch spreads evenly.

use std::time::Duration;

use crate::control::LoadReport;
use crate::types::ServerId;

/// Load reports, new-session redirection and the rebalancer
/// (`ServerConfig::balance`).
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// How often this server reports its load to its peers (1 s).
    pub report_every: Duration,
    /// A peer whose last report is older than this takes no session (3 s).
    pub stale_after: Duration,
    /// The rebalancer, `None` to turn it off.
    pub rebalance: Option<RebalanceConfig>,
    /// While draining: how often the drain looks for sessions still here
    /// (250 ms); a session sent away that is still here after
    /// [`BalanceConfig::retrigger`] is sent again, maybe elsewhere.
    pub drain_round: Duration,
    /// See [`BalanceConfig::drain_round`] (2 s).
    pub retrigger: Duration,
    /// Most sessions of a drain on their way out at once (512): the next
    /// goes as one leaves, so a drain of many sessions neither floods the
    /// peers with handshakes nor holds two connections per session. Each
    /// move waits for a connect and a handshake, so a drain goes faster
    /// with more of them at once until the peers' CPU is the limit.
    pub drain_parallel: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            report_every: Duration::from_secs(1),
            stale_after: Duration::from_secs(3),
            rebalance: Some(RebalanceConfig::default()),
            drain_round: Duration::from_millis(250),
            retrigger: Duration::from_secs(2),
            drain_parallel: 512,
        }
    }
}

/// When the rebalancer moves sessions off this server. It compares the
/// sessions this server owns with the mean over itself and its candidate
/// peers. Above `factor` x the mean (and at least `min_excess` above it)
/// it starts sending the sessions beyond the mean to the peers below it,
/// at most `max_moves` per round, waiting `settle` after each round so
/// the peers' next reports show what arrived; it goes on round by round
/// until it is less than `min_excess` above the mean (hysteresis: it
/// starts high and stops low). Moves only level towards the mean and a
/// server that received sessions ends at most at the mean, so a pool in
/// balance stays put.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceConfig {
    /// Move only when owning more than `factor` x the pool mean (1.25).
    pub factor: f64,
    /// ... and at least this many sessions above the mean (2).
    pub min_excess: usize,
    /// Most sessions moved in one round: with `settle`, the rate limit
    /// (100).
    pub max_moves: usize,
    /// Time between a round that moved sessions and the next look (3 s);
    /// also how long after start the first look waits.
    pub settle: Duration,
    /// A session that started or arrived here less than this ago is not
    /// moved (2 s): no session bounces between servers.
    pub min_residence: Duration,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            factor: 1.25,
            min_excess: 2,
            max_moves: 100,
            settle: Duration::from_secs(3),
            min_residence: Duration::from_secs(2),
        }
    }
}

/// A peer as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The peer.
    pub id: ServerId,
    /// Its last report.
    pub load: LoadReport,
}

/// Picks a destination for each of `n` sessions: the candidate with the
/// fewest sessions (then the fewest bytes per second, then the lowest id)
/// that has room, counting the sessions given so far. Fewer than `n`
/// when the candidates fill up.
pub fn spread(n: usize, candidates: &[Candidate]) -> Vec<ServerId> {
    spread_upto(n, candidates, |c| c.load.capacity as usize)
}

/// [`spread`] with a per-candidate limit on the sessions it may end with.
fn spread_upto(
    n: usize,
    candidates: &[Candidate],
    limit: impl Fn(&Candidate) -> usize,
) -> Vec<ServerId> {
    let mut loads: Vec<(usize, u64, &ServerId, usize)> = candidates
        .iter()
        .map(|c| {
            (
                c.load.sessions as usize,
                c.load.bytes_per_sec,
                &c.id,
                limit(c),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let Some(best) = loads
            .iter_mut()
            .filter(|(s, _, _, lim)| s < lim)
            .min_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)))
        else {
            break;
        };
        best.0 += 1;
        out.push(best.2.clone());
    }
    out
}

/// The rebalancer's decision: where to send sessions from a server that
/// owns `own` (of which `movable` may move now), given its candidate
/// peers, and whether it is rebalancing (`active`: it was, the last
/// round; updated). Empty when the pool is in balance by `cfg`'s rule.
pub fn rebalance(
    own: usize,
    movable: usize,
    candidates: &[Candidate],
    cfg: &RebalanceConfig,
    active: &mut bool,
) -> Vec<ServerId> {
    if candidates.is_empty() {
        *active = false;
        return Vec::new();
    }
    let total: usize = own
        + candidates
            .iter()
            .map(|c| c.load.sessions as usize)
            .sum::<usize>();
    let servers = candidates.len() + 1;
    let mean = total as f64 / servers as f64;
    let target = total.div_ceil(servers);
    if own < target + cfg.min_excess {
        *active = false;
    } else if (own as f64) > mean * cfg.factor {
        *active = true;
    }
    if !*active {
        return Vec::new();
    }
    let n = (own - target).min(movable).min(cfg.max_moves);
    // Fill the peers up to the mean only: none ends above it.
    spread_upto(n, candidates, |c| target.min(c.load.capacity as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, sessions: u32) -> Candidate {
        Candidate {
            id: ServerId::new(id).unwrap(),
            load: LoadReport {
                sessions,
                capacity: 1000,
                bytes_per_sec: 0,
                draining: false,
            },
        }
    }

    fn count(v: &[ServerId], id: &str) -> usize {
        v.iter().filter(|s| s.as_str() == id).count()
    }

    #[test]
    fn spread_fills_the_least_loaded_first() {
        let c = [cand("a", 10), cand("b", 4), cand("c", 0)];
        let d = spread(20, &c);
        assert_eq!(d.len(), 20);
        // Level at 10, then one each in id order: a 12, b 11, c 11.
        assert_eq!((count(&d, "a"), count(&d, "b"), count(&d, "c")), (2, 7, 11));
        assert_eq!(d[0].as_str(), "c");
    }

    #[test]
    fn spread_respects_capacity() {
        let mut c = [cand("a", 0), cand("b", 0)];
        c[0].load.capacity = 3;
        c[1].load.capacity = 2;
        let d = spread(10, &c);
        assert_eq!((count(&d, "a"), count(&d, "b")), (3, 2));
        assert!(spread(1, &[]).is_empty());
    }

    fn once(own: usize, movable: usize, c: &[Candidate], cfg: &RebalanceConfig) -> Vec<ServerId> {
        rebalance(own, movable, c, cfg, &mut false)
    }

    #[test]
    fn rebalance_levels_a_hot_server_and_then_stays_put() {
        let cfg = RebalanceConfig::default();
        let c = [cand("b", 0), cand("c", 0)];
        let all = RebalanceConfig {
            max_moves: 1000,
            ..cfg.clone()
        };
        let d = once(300, 300, &c, &all);
        assert_eq!((count(&d, "b"), count(&d, "c")), (100, 100));
        // The rate limit.
        assert_eq!(once(300, 300, &c, &cfg).len(), 100);
        // In balance, or within the factor: nothing moves.
        assert!(once(100, 100, &[cand("b", 100), cand("c", 100)], &cfg).is_empty());
        assert!(once(110, 110, &[cand("b", 95), cand("c", 95)], &cfg).is_empty());
        assert!(once(3, 3, &[cand("b", 0)], &cfg).is_empty(), "min_excess");
        // Only what may move now.
        assert_eq!(once(300, 7, &c, &cfg).len(), 7);
        // Nobody to give to.
        assert!(once(300, 300, &[], &cfg).is_empty());
    }

    #[test]
    fn rebalance_starts_high_and_stops_low() {
        let cfg = RebalanceConfig::default();
        let mut active = false;
        // 116 of 300 is within the factor: a balanced pool is left alone.
        let c = [cand("b", 92), cand("c", 92)];
        assert!(rebalance(116, 116, &c, &cfg, &mut active).is_empty());
        assert!(!active);
        // Far above: it starts, and round after round it goes on to the
        // mean even once within the factor.
        let d = rebalance(300, 300, &[cand("b", 0), cand("c", 0)], &cfg, &mut active);
        assert!(active);
        assert_eq!(d.len(), 100);
        let d = rebalance(116, 116, &c, &cfg, &mut active);
        assert_eq!((count(&d, "b"), count(&d, "c")), (8, 8));
        // Level: it stops.
        let level = [cand("b", 100), cand("c", 100)];
        assert!(rebalance(100, 100, &level, &cfg, &mut active).is_empty());
        assert!(!active);
    }

    #[test]
    fn rebalance_never_overfills_a_peer() {
        let cfg = RebalanceConfig {
            max_moves: 1000,
            ..RebalanceConfig::default()
        };
        // Mean 100: b is above it already and gets nothing.
        let d = once(180, 180, &[cand("b", 110), cand("c", 10)], &cfg);
        assert_eq!((count(&d, "b"), count(&d, "c")), (0, 80));
    }
}

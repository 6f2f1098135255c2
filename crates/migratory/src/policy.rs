//! When a client migrates on its own: the [`Policy`] hook and the policies
//! that come with it.
//!
//! The client runtime asks its policy after every event of the session
//! ([`PolicyEvent::Client`]: data arrived, a migration started or ended, a
//! Pong came back...) and at the instants the policy asks to be woken at
//! ([`Policy::poll_timeout`], then [`PolicyEvent::Tick`]). Each call sees a
//! [`ClientView`] (the time, the server, the session's byte counters) and
//! answers with an [`Action`]: stay, migrate, send a Ping, or declare the
//! server failed. A policy that asks for no tick costs nothing while the
//! session is idle.
//!
//! * [`Manual`] (the default) never acts: the application calls
//!   [`MigratoryStream::migrate`](crate::MigratoryStream::migrate), and the
//!   servers' triggers are followed.
//! * [`Throughput`] leaves a server whose stream slows down (MTCP thesis,
//!   section 5.3.2): a smoothed rate of the received bytes, sampled every
//!   `period` while the stream flows, compared with the best smoothed rate
//!   seen on the current server.
//! * [`Liveness`] leaves a server whose process stops answering Pings: `N`
//!   unanswered in a row, each within `timeout`, and the client fails over
//!   as if the connection had broken.
//!
//! `docs/policies.md` says when to use which, with their parameters.
//!
//! ```
//! use std::time::Duration;
//! use migratory::{Throughput, ThroughputConfig};
//!
//! let policy = Throughput::new(ThroughputConfig {
//!     trigger: 0.6,
//!     min_interval: Duration::from_secs(5),
//!     ..ThroughputConfig::default()
//! });
//! # let _ = policy;
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use migratory_proto::client::ClientEvent;
use migratory_proto::types::ServerId;

/// Decides when the client migrates on its own (MTCP thesis, section 3.4:
/// policy is kept apart from the mechanism). See the module documentation.
pub trait Policy: Send + 'static {
    /// Called after each event of the session, and with
    /// [`PolicyEvent::Tick`] once the instant [`Policy::poll_timeout`] gave
    /// has come. Returns what the client should do.
    fn on_event(&mut self, event: PolicyEvent<'_>, client: &ClientView<'_>) -> Action;

    /// When the policy wants its next [`PolicyEvent::Tick`]; read again
    /// after every call. `None` (the default): no tick.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

/// What a policy is called for.
#[derive(Debug, Clone, Copy)]
pub enum PolicyEvent<'a> {
    /// Something happened to the session.
    Client(&'a ClientEvent),
    /// The instant the policy asked for has come.
    Tick,
}

/// What a policy asks the client to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Stay,
    /// Migrate now, to this server, or (`None`) to the server of the pool
    /// the client left the longest time ago (never visited first). Ignored
    /// while the session is not attached (connecting, migrating, ended).
    Migrate(Option<ServerId>),
    /// Send a Ping to the current server now; a [`ClientEvent::Pong`]
    /// reports its round-trip time if it answers.
    Ping,
    /// The current server is failed (this says why): the client leaves its
    /// connection without draining it and fails over to the pool's other
    /// servers, as when the connection breaks.
    FailServer(String),
}

/// What a policy sees of the client when it is called.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientView<'a> {
    /// The time of the call.
    pub now: Instant,
    /// The server the session is attached to, or was last attached to.
    pub server: Option<&'a ServerId>,
    /// Established on a server and not migrating: the only state in which
    /// [`Action::Migrate`], [`Action::Ping`] and [`Action::FailServer`]
    /// act.
    pub attached: bool,
    /// Down-stream bytes received since the session started (over every
    /// server).
    pub down_received: u64,
    /// Of those, bytes the application has not read yet.
    pub unread: u64,
    /// The client's receive window: the server stops sending when
    /// `unread` reaches it, so a rate measured then is the application's,
    /// not the server's.
    pub recv_window: u64,
    /// Migrations completed so far.
    pub migrations: u64,
}

/// Never migrates by itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Manual;

impl Policy for Manual {
    fn on_event(&mut self, _event: PolicyEvent<'_>, _client: &ClientView<'_>) -> Action {
        Action::Stay
    }
}

// ----- throughput --------------------------------------------------------------

/// Parameters of [`Throughput`]. The defaults are the thesis's (`alpha`
/// 0.4, `trigger` 0.7) and the choices documented on each field.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputConfig {
    /// Weight of the newest sample in the smoothed rate:
    /// `smoothed = alpha * sample + (1 - alpha) * smoothed`. Default 0.4
    /// (MTCP thesis, section 5.3.2).
    pub alpha: f64,
    /// Migrate when the smoothed rate falls to this fraction of the
    /// highest smoothed rate seen on the current server. Default 0.7
    /// (thesis).
    pub trigger: f64,
    /// How often the received rate is sampled. Default 100 ms: a few
    /// round trips even on a long path, and short enough to react within
    /// half a second. (The thesis sampled at every segment, in the kernel.)
    pub period: Duration,
    /// Least time between two migrations this policy asks for, and after
    /// any migration before it asks for one. Default 1 s.
    pub min_interval: Duration,
    /// Samples needed on a server before a migration away from it is
    /// considered: the best rate needs a few samples to mean something.
    /// Default 3.
    pub min_samples: u32,
    /// Samples in a row at or below the trigger before the policy acts:
    /// one late period (the client or the server was not scheduled for a
    /// moment, and the next period makes up for it) is not a degraded
    /// server. Default 2; 1 acts on the first, as the thesis did.
    pub confirm: u32,
    /// A stream that brings nothing for this long is idle, not slow: the
    /// policy forgets the burst's unconfirmed samples and stops ticking
    /// until data comes again. Gaps shorter than this are skipped (a
    /// period with no bytes is never a sample). Default 500 ms.
    pub idle: Duration,
}

impl Default for ThroughputConfig {
    fn default() -> Self {
        Self {
            alpha: 0.4,
            trigger: 0.7,
            period: Duration::from_millis(100),
            min_interval: Duration::from_secs(1),
            min_samples: 3,
            confirm: 2,
            idle: Duration::from_millis(500),
        }
    }
}

impl ThroughputConfig {
    /// Checks the parameters: `alpha` in (0, 1], `trigger` in (0, 1), a
    /// non-zero `period`.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(format!("alpha must be in (0, 1], not {}", self.alpha));
        }
        if !(self.trigger > 0.0 && self.trigger < 1.0) {
            return Err(format!("trigger must be in (0, 1), not {}", self.trigger));
        }
        if self.period.is_zero() {
            return Err("the sampling period must not be zero".into());
        }
        Ok(())
    }
}

/// Migrates away from a server whose stream slows down (MTCP thesis,
/// section 5.3.2).
///
/// Every `period` while data flows, the policy takes the rate at which
/// down bytes arrived in that period as a sample and smooths the samples
/// with an exponentially weighted moving average. It remembers the highest
/// smoothed rate seen on the current server; when the smoothed rate falls
/// to `trigger` times that maximum, it asks for a migration to another
/// server, and starts afresh there.
///
/// So that a session does not move for reasons that are not its server's:
/// * a period in which no byte arrived is not a sample (the server may
///   have nothing to say); after `idle` without data the burst is over;
/// * the first period of a burst (data began somewhere in it) and the
///   last one (data stopped somewhere in it) are not samples: a sample is
///   kept only once more data arrives after it;
/// * a period at whose end the application had left half the receive
///   window unread is not a sample (the application, not the server, set
///   the pace);
/// * nothing is decided before `min_samples` samples on the server, nor
///   before `confirm` samples in a row are at or below the trigger, nor
///   within `min_interval` of the previous migration.
///
/// It fits streams (downloads, media) whose server may degrade; bursty
/// request/response traffic gives it too few samples to judge.
#[derive(Debug, Clone)]
pub struct Throughput {
    cfg: ThroughputConfig,
    /// The smoothed rate (bytes/s) and the highest it was on this server.
    smoothed: Option<f64>,
    max: f64,
    samples: u32,
    /// Samples in a row at or below the trigger.
    below: u32,
    /// The previous period's rate, kept once more data arrives after it.
    pending: Option<f64>,
    /// Data flows: the first period with data was seen.
    in_burst: bool,
    /// The start of the current period and the bytes received by then.
    period_start: Instant,
    bytes_at_start: u64,
    /// When a period last brought data.
    last_data: Instant,
    /// The next tick (`None`: idle).
    next: Option<Instant>,
    /// The last migration (of any cause) or migration this policy asked
    /// for.
    last_move: Option<Instant>,
}

impl Throughput {
    /// A throughput policy with these parameters (see
    /// [`ThroughputConfig::validate`]; out-of-range values are clamped).
    pub fn new(cfg: ThroughputConfig) -> Self {
        let mut cfg = cfg;
        cfg.alpha = cfg.alpha.clamp(f64::MIN_POSITIVE, 1.0);
        cfg.trigger = cfg.trigger.clamp(0.0, 1.0);
        cfg.period = cfg.period.max(Duration::from_millis(1));
        cfg.confirm = cfg.confirm.max(1);
        // Any instant will do until the first tick is scheduled.
        let t = Instant::now();
        Self {
            cfg,
            smoothed: None,
            max: 0.0,
            samples: 0,
            below: 0,
            pending: None,
            in_burst: false,
            period_start: t,
            bytes_at_start: 0,
            last_data: t,
            next: None,
            last_move: None,
        }
    }

    /// The parameters.
    pub fn config(&self) -> &ThroughputConfig {
        &self.cfg
    }

    /// The smoothed received rate on the current server, in bytes per
    /// second (`None` before the first sample).
    pub fn smoothed_rate(&self) -> Option<f64> {
        self.smoothed
    }

    /// The highest smoothed rate seen on the current server.
    pub fn max_rate(&self) -> f64 {
        self.max
    }

    /// A new server (or none yet): forget its predecessor's rates.
    fn restart(&mut self) {
        self.smoothed = None;
        self.max = 0.0;
        self.samples = 0;
        self.below = 0;
        self.end_burst();
    }

    fn end_burst(&mut self) {
        self.pending = None;
        self.in_burst = false;
        self.next = None;
    }

    fn sample(&mut self, rate: f64) {
        let s = match self.smoothed {
            None => rate,
            Some(s) => self.cfg.alpha * rate + (1.0 - self.cfg.alpha) * s,
        };
        self.smoothed = Some(s);
        self.max = self.max.max(s);
        self.samples += 1;
        if s <= self.cfg.trigger * self.max {
            self.below += 1;
        } else {
            self.below = 0;
        }
    }

    fn tick(&mut self, c: &ClientView<'_>) -> Action {
        let Some(due) = self.next else {
            return Action::Stay;
        };
        if c.now < due {
            return Action::Stay;
        }
        let bytes = c.down_received.saturating_sub(self.bytes_at_start);
        let elapsed = c.now.saturating_duration_since(self.period_start);
        self.period_start = c.now;
        self.bytes_at_start = c.down_received;
        self.next = Some(c.now + self.cfg.period);
        if !c.attached {
            self.end_burst();
            return Action::Stay;
        }
        if bytes == 0 {
            if c.now.saturating_duration_since(self.last_data) >= self.cfg.idle {
                // Idle: the burst's last period with data was its tail.
                self.end_burst();
            }
            return Action::Stay;
        }
        self.last_data = c.now;
        if !self.in_burst {
            // The burst's first period: data began somewhere in it.
            self.in_burst = true;
            return Action::Stay;
        }
        // More data came: the previous period was a whole one.
        if let Some(rate) = self.pending.take() {
            self.sample(rate);
        }
        let receiver_limited = c.unread.saturating_mul(2) >= c.recv_window;
        if !receiver_limited {
            self.pending = Some(bytes as f64 / elapsed.as_secs_f64().max(1e-6));
        }
        self.decide(c)
    }

    fn decide(&mut self, c: &ClientView<'_>) -> Action {
        let Some(s) = self.smoothed else {
            return Action::Stay;
        };
        let calm = self
            .last_move
            .is_none_or(|t| c.now.saturating_duration_since(t) >= self.cfg.min_interval);
        if self.samples >= self.cfg.min_samples
            && self.max > 0.0
            && s <= self.cfg.trigger * self.max
            && self.below >= self.cfg.confirm
            && calm
        {
            self.last_move = Some(c.now);
            return Action::Migrate(None);
        }
        Action::Stay
    }
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new(ThroughputConfig::default())
    }
}

impl Policy for Throughput {
    fn on_event(&mut self, event: PolicyEvent<'_>, c: &ClientView<'_>) -> Action {
        match event {
            PolicyEvent::Tick => self.tick(c),
            PolicyEvent::Client(ClientEvent::Readable) => {
                if self.next.is_none() && c.attached {
                    // Data again after idleness: sample from now on.
                    self.period_start = c.now;
                    self.bytes_at_start = c.down_received;
                    self.last_data = c.now;
                    self.next = Some(c.now + self.cfg.period);
                }
                Action::Stay
            }
            PolicyEvent::Client(ClientEvent::MigrationStarted { .. }) => {
                self.restart();
                Action::Stay
            }
            PolicyEvent::Client(ClientEvent::Migrated { .. } | ClientEvent::Established { .. }) => {
                self.restart();
                self.last_move = Some(c.now);
                Action::Stay
            }
            PolicyEvent::Client(ClientEvent::Finished | ClientEvent::Failed(_)) => {
                self.end_burst();
                Action::Stay
            }
            PolicyEvent::Client(_) => Action::Stay,
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next
    }
}

// ----- liveness ----------------------------------------------------------------

/// Parameters of [`Liveness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessConfig {
    /// How often the current server is pinged while no data comes from
    /// it. Default 2 s. Each Ping costs the server a wakeup (tens of
    /// microseconds); data from the server counts as an answer, so a busy
    /// stream is not pinged.
    pub interval: Duration,
    /// How long a Ping may wait for its Pong. Default 1 s.
    pub timeout: Duration,
    /// Pings unanswered in a row (each within `timeout`) after which the
    /// server is declared failed. Default 3.
    pub misses: u32,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            misses: 3,
        }
    }
}

impl LivenessConfig {
    /// Checks the parameters: non-zero durations, at least one miss.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("the ping interval and timeout must not be zero".into());
        }
        if self.misses == 0 {
            return Err("at least one unanswered ping must be allowed".into());
        }
        Ok(())
    }
}

/// Fails over from a server whose process stops answering Pings.
///
/// A hung server process (stopped, deadlocked, swapping) may keep its TCP
/// connections open: its kernel still acknowledges, so neither TCP nor
/// keepalive notices. This policy pings the current server every
/// `interval` when no data came from it in the meantime; when `misses`
/// pings in a row get no Pong within `timeout`, it declares the server
/// failed ([`Action::FailServer`]) and the client fails over as when a
/// connection breaks. The session survives if another server can resume
/// it: a backup holding its replica (eager replication), since a hung
/// origin cannot hand its state over; otherwise it fails with a clear
/// error, sooner than the client's own silence timeout would have.
///
/// It finds a server process that hangs, not an application that is
/// merely slow: the server's runtime answers Pings on its own.
#[derive(Debug, Clone)]
pub struct Liveness {
    cfg: LivenessConfig,
    /// Pings sent and not answered, by their sending time (oldest first).
    outstanding: VecDeque<Instant>,
    misses: u32,
    /// When to ping next (`None`: not attached).
    next_ping: Option<Instant>,
    /// Down bytes received at the last ping or data seen.
    bytes_seen: u64,
}

impl Liveness {
    /// A liveness policy with these parameters (see
    /// [`LivenessConfig::validate`]; zero values are raised to the least
    /// meaningful ones).
    pub fn new(cfg: LivenessConfig) -> Self {
        let mut cfg = cfg;
        cfg.interval = cfg.interval.max(Duration::from_millis(1));
        cfg.timeout = cfg.timeout.max(Duration::from_millis(1));
        cfg.misses = cfg.misses.max(1);
        Self {
            cfg,
            outstanding: VecDeque::new(),
            misses: 0,
            next_ping: None,
            bytes_seen: 0,
        }
    }

    /// The parameters.
    pub fn config(&self) -> &LivenessConfig {
        &self.cfg
    }

    /// Pings unanswered in a row so far.
    pub fn misses(&self) -> u32 {
        self.misses
    }

    fn attach(&mut self, c: &ClientView<'_>) {
        self.outstanding.clear();
        self.misses = 0;
        self.bytes_seen = c.down_received;
        self.next_ping = Some(c.now + self.cfg.interval);
    }

    fn detach(&mut self) {
        self.outstanding.clear();
        self.misses = 0;
        self.next_ping = None;
    }

    fn tick(&mut self, c: &ClientView<'_>) -> Action {
        if !c.attached {
            return Action::Stay;
        }
        // Pings whose time is up.
        while let Some(&sent) = self.outstanding.front() {
            if c.now.saturating_duration_since(sent) < self.cfg.timeout {
                break;
            }
            self.outstanding.pop_front();
            self.misses += 1;
        }
        if c.down_received > self.bytes_seen {
            // The server's process sent data: it is alive.
            self.bytes_seen = c.down_received;
            self.misses = 0;
            self.outstanding.clear();
            self.next_ping = Some(c.now + self.cfg.interval);
            return Action::Stay;
        }
        if self.misses >= self.cfg.misses {
            let why = format!(
                "{} pings in a row unanswered within {:?}",
                self.misses, self.cfg.timeout
            );
            self.detach();
            return Action::FailServer(why);
        }
        match self.next_ping {
            Some(t) if t <= c.now => {
                self.outstanding.push_back(c.now);
                self.next_ping = Some(c.now + self.cfg.interval);
                Action::Ping
            }
            _ => Action::Stay,
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new(LivenessConfig::default())
    }
}

impl Policy for Liveness {
    fn on_event(&mut self, event: PolicyEvent<'_>, c: &ClientView<'_>) -> Action {
        match event {
            PolicyEvent::Tick => self.tick(c),
            PolicyEvent::Client(ClientEvent::Pong { rtt, .. }) => {
                if *rtt <= self.cfg.timeout {
                    // Answered in time: this ping and any older one.
                    let sent = c.now.checked_sub(*rtt).unwrap_or(c.now);
                    self.outstanding.retain(|t| *t > sent);
                    self.misses = 0;
                }
                Action::Stay
            }
            PolicyEvent::Client(ClientEvent::Established { .. } | ClientEvent::Migrated { .. }) => {
                self.attach(c);
                Action::Stay
            }
            PolicyEvent::Client(
                ClientEvent::MigrationStarted { .. }
                | ClientEvent::Finished
                | ClientEvent::Failed(_),
            ) => {
                self.detach();
                Action::Stay
            }
            PolicyEvent::Client(_) => Action::Stay,
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let next = self.next_ping?;
        let expiry = self.outstanding.front().map(|t| *t + self.cfg.timeout);
        Some(expiry.map_or(next, |e| e.min(next)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use migratory_proto::client::ClientEvent;
    use migratory_proto::types::ServerId;

    use super::{Action, ClientView, Liveness, LivenessConfig, Policy, PolicyEvent, Throughput};

    const MS: Duration = Duration::from_millis(1);

    /// A simulated client: a clock, a byte counter and the policy under
    /// test, ticked whenever the policy asks.
    struct Sim<P> {
        policy: P,
        now: Instant,
        bytes: u64,
        unread: u64,
        attached: bool,
        actions: Vec<(Duration, Action)>,
        t0: Instant,
    }

    impl<P: Policy> Sim<P> {
        fn new(policy: P) -> Self {
            let t0 = Instant::now();
            let mut s = Self {
                policy,
                now: t0,
                bytes: 0,
                unread: 0,
                attached: true,
                actions: Vec::new(),
                t0,
            };
            s.event(&ClientEvent::Established {
                session: migratory_proto::types::SessionId(1),
                server: ServerId::new("s1").unwrap(),
            });
            s
        }

        fn view(&self) -> ClientView<'static> {
            ClientView {
                now: self.now,
                server: None,
                attached: self.attached,
                down_received: self.bytes,
                unread: self.unread,
                recv_window: 4 << 20,
                migrations: 0,
            }
        }

        fn event(&mut self, e: &ClientEvent) {
            let v = self.view();
            let a = self.policy.on_event(PolicyEvent::Client(e), &v);
            self.record(a);
        }

        fn record(&mut self, a: Action) {
            if a != Action::Stay {
                self.actions.push((self.now - self.t0, a));
            }
        }

        /// Advances the clock by `d` in 1 ms steps; `rate(t)` bytes per
        /// millisecond arrive meanwhile (t since the start).
        fn run(&mut self, d: Duration, rate: impl Fn(Duration) -> u64) {
            let end = self.now + d;
            while self.now < end {
                self.now += MS;
                let n = rate(self.now - self.t0);
                if n > 0 {
                    self.bytes += n;
                    self.event(&ClientEvent::Readable);
                }
                while self.policy.poll_timeout().is_some_and(|t| t <= self.now) {
                    let v = self.view();
                    let a = self.policy.on_event(PolicyEvent::Tick, &v);
                    self.record(a);
                }
            }
        }
    }

    #[test]
    fn a_steady_stream_never_moves() {
        let mut s = Sim::new(Throughput::default());
        s.run(Duration::from_secs(10), |_| 1000);
        assert_eq!(s.bytes, 10_000_000);
        assert!(s.actions.is_empty(), "{:?}", s.actions);
        let r = s.policy.smoothed_rate().unwrap();
        assert!((r - 1e6).abs() < 1e3, "{r}");
    }

    #[test]
    fn a_degrading_stream_moves_once_below_the_trigger() {
        let mut s = Sim::new(Throughput::default());
        // 1 MB/s for 2 s, then the rate falls by 10% every 100 ms.
        let rate = |t: Duration| {
            let ms = t.as_millis() as u64;
            if ms < 2000 {
                1000
            } else {
                (1000.0 * 0.9f64.powi(((ms - 2000) / 100) as i32)) as u64
            }
        };
        s.run(Duration::from_secs(3), rate);
        assert_eq!(s.actions.len(), 1, "{:?}", s.actions);
        let (at, a) = &s.actions[0];
        assert_eq!(*a, Action::Migrate(None));
        // 0.9^k reaches 0.7 after ~4 periods; the smoothing lags a few.
        assert!(*at > Duration::from_millis(2300), "{at:?}");
        assert!(*at < Duration::from_millis(2900), "{at:?}");
        // No second request before a migration or `min_interval`.
        s.run(Duration::from_millis(500), rate);
        assert_eq!(s.actions.len(), 1);
    }

    #[test]
    fn one_late_period_is_not_a_degraded_server() {
        let mut s = Sim::new(Throughput::default());
        // 1 MB/s, but every 2 s a 90 ms hiccup that the next period makes
        // up for.
        s.run(Duration::from_secs(10), |t| match t.as_millis() % 2000 {
            1000..1090 => 0,
            1090..1180 => 2000,
            _ => 1000,
        });
        assert!(s.actions.is_empty(), "{:?}", s.actions);
    }

    #[test]
    fn bursts_separated_by_silence_never_move() {
        // A request/response pattern: 150 ms of data at full rate, then
        // 700 ms of nothing (longer than `idle`), 20 times, with partial
        // periods at both ends of every burst.
        let mut s = Sim::new(Throughput::default());
        s.run(Duration::from_millis(37), |_| 0);
        s.run(Duration::from_secs(17), |t| {
            u64::from((t.as_millis() % 850) < 150) * 1000
        });
        s.run(Duration::from_secs(1), |_| 0);
        assert!(s.actions.is_empty(), "{:?}", s.actions);
        assert!(s.policy.poll_timeout().is_none(), "idle: no tick");
    }

    #[test]
    fn an_application_that_stops_reading_is_not_a_slow_server() {
        let mut s = Sim::new(Throughput::default());
        s.run(Duration::from_secs(1), |_| 1000);
        // The application leaves most of the window unread: the server
        // slows to a trickle as the window closes.
        s.unread = 3 << 20;
        s.run(Duration::from_secs(2), |_| 10);
        assert!(s.actions.is_empty(), "{:?}", s.actions);
    }

    #[test]
    fn after_a_migration_the_best_rate_is_the_new_servers() {
        let mut s = Sim::new(Throughput::default());
        s.run(Duration::from_secs(1), |_| 1000);
        s.event(&ClientEvent::MigrationStarted {
            to: ServerId::new("s2").unwrap(),
            cause: migratory_proto::client::MigrationCause::Requested,
        });
        s.attached = false;
        s.run(Duration::from_millis(5), |_| 0);
        s.attached = true;
        s.event(&ClientEvent::Migrated {
            from: ServerId::new("s1").unwrap(),
            to: ServerId::new("s2").unwrap(),
            epoch: 2,
        });
        assert_eq!(s.policy.max_rate(), 0.0);
        // The new server is slower but steady: no reason to move.
        s.run(Duration::from_secs(3), |_| 400);
        assert!(s.actions.is_empty(), "{:?}", s.actions);
        let m = s.policy.max_rate();
        assert!((m - 4e5).abs() < 1e3, "{m}");
    }

    fn liveness() -> Liveness {
        Liveness::new(LivenessConfig {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(100),
            misses: 3,
        })
    }

    #[test]
    fn a_server_that_answers_is_kept() {
        let mut s = Sim::new(liveness());
        for _ in 0..20 {
            s.run(Duration::from_millis(250), |_| 0);
            // Every ping answered after 5 ms.
            if let Some((_, Action::Ping)) = s.actions.last() {
                s.run(Duration::from_millis(5), |_| 0);
                s.event(&ClientEvent::Pong {
                    nonce: 0,
                    rtt: Duration::from_millis(5),
                });
            }
        }
        assert!(s.actions.iter().all(|(_, a)| *a == Action::Ping));
        assert!(s.actions.len() >= 15, "{}", s.actions.len());
        assert_eq!(s.policy.misses(), 0);
    }

    #[test]
    fn three_unanswered_pings_fail_the_server() {
        let mut s = Sim::new(liveness());
        s.run(Duration::from_secs(2), |_| 0);
        let pings = s.actions.iter().filter(|(_, a)| *a == Action::Ping).count();
        assert_eq!(pings, 3);
        let fails: Vec<_> = s
            .actions
            .iter()
            .filter(|(_, a)| matches!(a, Action::FailServer(_)))
            .collect();
        assert_eq!(fails.len(), 1, "{:?}", s.actions);
        // Pings at 200, 400, 600 ms; the third expires at 700 ms.
        assert_eq!(fails[0].0, Duration::from_millis(700));
        assert!(s.policy.poll_timeout().is_none(), "stops until attached");
    }

    #[test]
    fn late_pongs_do_not_count_and_data_does() {
        let mut s = Sim::new(liveness());
        s.run(Duration::from_millis(300), |_| 0);
        s.event(&ClientEvent::Pong {
            nonce: 0,
            rtt: Duration::from_millis(100) + MS,
        });
        // Data from the server shows it alive: no ping while it flows.
        s.run(Duration::from_secs(2), |_| 1);
        assert_eq!(s.actions.len(), 1, "{:?}", s.actions);
        assert_eq!(s.policy.misses(), 0);
    }
}

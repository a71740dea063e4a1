//! StatsD metrics through cadence. Off unless `STATSD_HOST` is set. Handlers never wait on the
//! network: a metric goes into a bounded queue (`QueuingMetricSink`); one thread drains it into
//! a buffered UDP sink that packs lines into datagrams; the [`spawn_reporter`] tick flushes the
//! buffer once a second, so a quiet process still reports promptly. When the queue is full the
//! metric is dropped and counted (never blocks). Every metric carries the component's tags
//! (`component:broker|proxy`, and `proxy_id` or `broker_id`). docs/METRICS.md lists them all.

use std::{
    net::{ToSocketAddrs, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use cadence::{prelude::*, BufferedUdpMetricSink, MetricBuilder, MetricError, QueuingMetricSink, StatsdClient};

/// Metrics waiting for the UDP thread; beyond this they are dropped, not waited for.
const QUEUE: usize = 64 * 1024;
/// Datagram payload size: fits an Ethernet MTU with room for IP/UDP headers.
const DATAGRAM: usize = 1432;

/// Where StatsD metrics go (`STATSD_HOST`, `STATSD_PORT`, `STATSD_PREFIX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsdConfig {
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl StatsdConfig {
    /// The setting from its parts: `None` when no host is given (metrics off).
    pub fn from_settings(host: Option<&str>, port: u16, prefix: &str) -> Result<Option<Self>, String> {
        let Some(host) = host.map(str::trim).filter(|h| !h.is_empty()) else {
            return Ok(None);
        };
        if prefix.contains(['|', ':', '#', '@']) || prefix.contains(char::is_whitespace) {
            return Err(format!("STATSD_PREFIX {prefix:?} may not contain spaces or any of | : # @"));
        }
        Ok(Some(Self { host: host.to_owned(), port, prefix: prefix.to_owned() }))
    }
}

/// The metrics handle: cheap to clone; every method does nothing when metrics are off.
#[derive(Clone, Default)]
pub struct Metrics {
    client: Option<Arc<StatsdClient>>,
    /// Metrics that could not be queued or sent (a full queue, a failing socket).
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("on", &self.is_on()).finish()
    }
}

impl Metrics {
    /// Metrics that go nowhere.
    pub fn off() -> Self {
        Self::default()
    }

    /// Starts sending to `config` (or nothing without one), tagging every metric with `tags`.
    pub fn start(config: Option<&StatsdConfig>, tags: &[(&str, &str)]) -> Result<Self, String> {
        let Some(config) = config else {
            return Ok(Self::off());
        };
        let target = (config.host.clone(), config.port);
        let first = target
            .to_socket_addrs()
            .map_err(|e| format!("STATSD_HOST {}: {e}", config.host))?
            .next()
            .ok_or_else(|| format!("STATSD_HOST {} has no address", config.host))?;
        let local = if first.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(local).map_err(|e| format!("cannot open a UDP socket for StatsD: {e}"))?;
        socket.set_nonblocking(true).map_err(|e| format!("cannot set up the StatsD socket: {e}"))?;
        let udp = BufferedUdpMetricSink::builder()
            .with_capacity(DATAGRAM)
            // A StatsD host that moves (containers) is found again within a minute.
            .with_resolver_period(Duration::from_secs(60))
            .build(target, socket)
            .map_err(|e| format!("StatsD sink: {e}"))?;
        let dropped = Arc::new(AtomicU64::new(0));
        let on_send_error = dropped.clone();
        let queue = QueuingMetricSink::builder()
            .with_capacity(QUEUE)
            .with_error_handler(move |_| {
                on_send_error.fetch_add(1, Ordering::Relaxed);
            })
            .build(udp);
        let on_queue_error = dropped.clone();
        let mut builder = StatsdClient::builder(&config.prefix, queue).with_error_handler(move |_: MetricError| {
            on_queue_error.fetch_add(1, Ordering::Relaxed);
        });
        for (key, value) in tags {
            builder = builder.with_tag(key, value);
        }
        tracing::info!(host = %config.host, port = config.port, prefix = %config.prefix, "sending StatsD metrics");
        Ok(Self { client: Some(Arc::new(builder.build())), dropped })
    }

    pub fn is_on(&self) -> bool {
        self.client.is_some()
    }

    fn send<'a, T: cadence::Metric + From<String>>(
        mut metric: MetricBuilder<'a, 'a, T>,
        tags: &'a [(&'a str, &'a str)],
    ) {
        for (key, value) in tags {
            metric = metric.with_tag(key, value);
        }
        metric.send();
    }

    /// Adds `n` to a counter (`|c`).
    pub fn count(&self, name: &str, n: u64, tags: &[(&str, &str)]) {
        if let Some(c) = &self.client {
            Self::send(c.count_with_tags(name, n), tags);
        }
    }

    /// Sets a gauge (`|g`).
    pub fn gauge(&self, name: &str, value: u64, tags: &[(&str, &str)]) {
        if let Some(c) = &self.client {
            Self::send(c.gauge_with_tags(name, value), tags);
        }
    }

    /// Records a duration in fractional milliseconds. Sent as `|h`, which StatsD servers
    /// aggregate like a timer (`|ms`); cadence's timers carry whole milliseconds only, and most
    /// requests here take less than one.
    pub fn time(&self, name: &str, elapsed: Duration, tags: &[(&str, &str)]) {
        if let Some(c) = &self.client {
            Self::send(c.histogram_with_tags(name, elapsed.as_secs_f64() * 1e3), tags);
        }
    }

    /// Sends what the UDP sink has buffered.
    pub fn flush(&self) {
        if let Some(c) = &self.client {
            if c.flush().is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// How many metrics were dropped so far (queue full, send failed).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A live count (open streams, waiting long-polls): raised by [`Level::hold`], lowered when the
/// guard drops, so every way out of a handler (answer, error, client gone) is counted.
#[derive(Debug, Default)]
pub struct Level(AtomicU64);

impl Level {
    pub fn hold(self: &Arc<Self>) -> LevelGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        LevelGuard(self.clone())
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Holds one unit of a [`Level`].
#[derive(Debug)]
pub struct LevelGuard(Arc<Level>);

impl Drop for LevelGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running total kept in an atomic (bytes, expired tasks) and reported as counter increments:
/// each report sends what was added since the last one.
#[derive(Debug, Default)]
pub struct Total {
    now: AtomicU64,
    reported: AtomicU64,
}

impl Total {
    pub fn add(&self, n: u64) {
        self.now.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// Sends the increase since the last report as counter `name`.
    pub fn report(&self, metrics: &Metrics, name: &str) {
        let now = self.get();
        let before = self.reported.swap(now, Ordering::Relaxed);
        if now > before {
            metrics.count(name, now - before, &[]);
        }
    }
}

/// Runs `sample` every `every` (gauges, totals) and then flushes, until `shutdown` is raised;
/// reports and flushes once more on the way out. Must run inside an actix or tokio runtime.
pub fn spawn_reporter(
    metrics: Metrics,
    every: Duration,
    shutdown: super::Shutdown,
    sample: impl Fn(&Metrics) -> bool + 'static,
) {
    if !metrics.is_on() {
        return;
    }
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dropped_seen = 0;
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.started() => true,
            };
            let alive = sample(&metrics);
            metrics.flush();
            let dropped = metrics.dropped();
            if dropped > dropped_seen {
                tracing::warn!(
                    n_dropped = dropped - dropped_seen,
                    "StatsD metrics dropped (queue full or send failed)"
                );
                dropped_seen = dropped;
            }
            if last || !alive {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        assert_eq!(StatsdConfig::from_settings(None, 8125, "photon").unwrap(), None);
        assert_eq!(StatsdConfig::from_settings(Some(" "), 8125, "photon").unwrap(), None);
        let c = StatsdConfig::from_settings(Some("statsd"), 9125, "site.a").unwrap().unwrap();
        assert_eq!((c.host.as_str(), c.port, c.prefix.as_str()), ("statsd", 9125, "site.a"));
        assert!(StatsdConfig::from_settings(Some("statsd"), 8125, "a|b").is_err());
    }

    #[test]
    fn sends_tagged_lines_over_udp() {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = StatsdConfig { host: "127.0.0.1".into(), port, prefix: "t".into() };
        let m = Metrics::start(Some(&config), &[("component", "unit")]).unwrap();
        m.count("hits", 3, &[("endpoint", "x")]);
        m.gauge("open", 7, &[]);
        m.time("took", Duration::from_micros(1500), &[]);
        let total = Total::default();
        total.add(5);
        total.report(&m, "bytes");
        total.report(&m, "bytes"); // nothing new: nothing sent
                                   // The queue thread may still hold some; flush until all four have arrived.
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        let give_up = std::time::Instant::now() + Duration::from_secs(10);
        while lines.len() < 4 && std::time::Instant::now() < give_up {
            m.flush();
            if let Ok(n) = listener.recv(&mut buf) {
                lines.extend(std::str::from_utf8(&buf[..n]).unwrap().lines().map(str::to_owned));
            }
        }
        assert!(lines.contains(&"t.hits:3|c|#component:unit,endpoint:x".to_string()), "{lines:?}");
        assert!(lines.contains(&"t.open:7|g|#component:unit".to_string()), "{lines:?}");
        assert!(lines.contains(&"t.took:1.5|h|#component:unit".to_string()), "{lines:?}");
        assert!(lines.contains(&"t.bytes:5|c|#component:unit".to_string()), "{lines:?}");
        assert_eq!(lines.len(), 4, "{lines:?}");
    }

    #[test]
    fn levels_follow_their_guards() {
        let level = Arc::new(Level::default());
        let a = level.hold();
        let b = level.hold();
        assert_eq!(level.get(), 2);
        drop(a);
        assert_eq!(level.get(), 1);
        drop(b);
        assert_eq!(level.get(), 0);
        Metrics::off().count("nothing", 1, &[]); // off: a no-op
    }
}

//! The control connection: one long-lived, signed `GET /v1/control` to the broker for as long
//! as the proxy runs. While it is open the broker lists this proxy as online; the broker's
//! heartbeat lines tell a dead connection from a quiet one. When it breaks, the proxy reconnects
//! with exponential backoff (jittered, capped). If the broker refuses it because another
//! process with the same proxy id is online, the proxy reports that on its health endpoint and
//! keeps trying, without exiting: the operator decides which one should run.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use parking_lot::Mutex;
use photon::wire::broker::ControlEvent;
use rand::Rng;
use reqwest::Method;

use crate::{
    upstream::{Upstream, UpstreamError},
    ProxyState,
};

/// First wait after a failed attempt; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Missing this many heartbeats in a row means the connection is dead.
const MISSED_HEARTBEATS: u32 = 3;
/// The broker's first line must come within this.
const WELCOME_WITHIN: Duration = Duration::from_secs(10);
/// How long a proxy that shuts down waits for the broker to take its goodbye.
const GOODBYE_WITHIN: Duration = Duration::from_secs(2);

/// Where the control connection stands.
#[derive(Debug, Clone)]
enum LinkState {
    Connecting,
    Online {
        since: Instant,
    },
    Down {
        error: String,
    },
    /// Refused: another instance with this proxy id is online.
    Duplicate {
        error: String,
    },
    Stopped,
}

/// The control connection's state, read by health.
pub struct Link(Mutex<LinkState>);

impl Default for Link {
    fn default() -> Self {
        Self(Mutex::new(LinkState::Connecting))
    }
}

impl Link {
    /// Why the proxy is not online at the broker, if it is not.
    pub fn problem(&self) -> Option<String> {
        match &*self.0.lock() {
            LinkState::Online { .. } => None,
            LinkState::Connecting => Some("connecting to the broker".into()),
            LinkState::Down { error } => Some(format!("not connected to the broker: {error}")),
            LinkState::Duplicate { error } => Some(format!("refused by the broker: {error}")),
            LinkState::Stopped => Some("shutting down".into()),
        }
    }

    /// How long the connection has been up.
    pub fn online_for(&self) -> Option<Duration> {
        match &*self.0.lock() {
            LinkState::Online { since } => Some(since.elapsed()),
            _ => None,
        }
    }

    fn set(&self, state: LinkState) {
        *self.0.lock() = state;
    }

    /// Records why an attempt to connect failed.
    pub fn failed(&self, e: &UpstreamError) {
        self.set(match e {
            UpstreamError::Duplicate(error) => LinkState::Duplicate { error: error.clone() },
            e => LinkState::Down { error: e.to_string() },
        });
    }
}

/// An open control connection whose welcome has been read.
pub struct Open {
    res: reqwest::Response,
    heartbeat: Duration,
    /// Bytes read past the welcome line.
    buf: BytesMut,
}

/// Opens the control connection and reads the broker's welcome.
pub async fn open(upstream: &Upstream) -> Result<Open, UpstreamError> {
    let me = upstream.keys.me().clone();
    let res = upstream.send_as(Method::GET, "/v1/control", me.as_str(), bytes::Bytes::new(), None).await?;
    if !res.status().is_success() {
        let status = res.status();
        let body = crate::upstream::text_within(res, crate::upstream::SMALL_ANSWER).await.unwrap_or_default();
        return Err(UpstreamError::Refused(format!("the control connection was answered {status}: {body}")));
    }
    let mut open = Open { res, heartbeat: Duration::ZERO, buf: BytesMut::new() };
    match tokio::time::timeout(WELCOME_WITHIN, open.next_line()).await {
        Ok(Ok(Some(ControlEvent::Welcome { heartbeat_ms, max_wait_ms }))) => {
            open.heartbeat = Duration::from_millis(heartbeat_ms.max(1));
            upstream.learn_broker_max_wait(max_wait_ms.map(Duration::from_millis));
            Ok(open)
        }
        Ok(Ok(other)) => Err(UpstreamError::Refused(format!("unexpected first control line: {other:?}"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::Timeout),
    }
}

impl Open {
    /// The next control line; `None` when the broker ended the connection.
    async fn next_line(&mut self) -> Result<Option<ControlEvent>, UpstreamError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                return serde_json::from_slice(&line[..pos])
                    .map(Some)
                    .map_err(|e| UpstreamError::Refused(format!("malformed control line: {e}")));
            }
            if self.buf.len() > 64 * 1024 {
                return Err(UpstreamError::Refused("control line too long".into()));
            }
            match self.res.chunk().await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }

    /// Holds the connection until it ends; returns why.
    async fn hold(mut self, state: &ProxyState) -> String {
        let patience = self.heartbeat * MISSED_HEARTBEATS;
        loop {
            let line = tokio::select! {
                line = tokio::time::timeout(patience, self.next_line()) => line,
                // Held while in-flight requests finish: they are this instance's as long as it
                // is online, and a replacement that connects meanwhile would make them 409.
                _ = state.shutdown.drained() => return "shutting down".into(),
            };
            match line {
                Ok(Ok(Some(ControlEvent::Heartbeat | ControlEvent::Welcome { .. }))) => {}
                Ok(Ok(Some(ControlEvent::Bye { reason }))) => return format!("the broker ended it: {reason}"),
                Ok(Ok(None)) => return "the broker closed it".into(),
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return format!("no heartbeat from the broker for {} s", patience.as_secs_f64()),
            }
        }
    }
}

/// Keeps the control connection up until shutdown. `first` is a connection already opened at
/// start, if that worked.
pub async fn run(state: Arc<ProxyState>, mut first: Option<Open>) {
    let mut backoff = FIRST_BACKOFF;
    let mut duplicate_reported = false;
    loop {
        if state.shutdown.is_started() {
            break;
        }
        let attempt = match first.take() {
            Some(open) => Ok(open),
            None => tokio::select! {
                r = open(&state.upstream) => r,
                _ = state.shutdown.started() => break,
            },
        };
        match attempt {
            Ok(conn) => {
                let since = Instant::now();
                state.link.set(LinkState::Online { since });
                duplicate_reported = false;
                tracing::info!(heartbeat_ms = conn.heartbeat.as_millis() as u64, "online at the broker");
                let why = conn.hold(&state).await;
                if state.shutdown.is_started() {
                    break;
                }
                tracing::warn!(reason = %why, "control connection to the broker lost; reconnecting");
                state.observer.metrics.count("control.reconnects", 1, &[]);
                state.link.set(LinkState::Down { error: why });
                if since.elapsed() >= STABLE {
                    backoff = FIRST_BACKOFF;
                }
            }
            Err(e) => {
                if !matches!(e, UpstreamError::Duplicate(_)) {
                    tracing::debug!(error = %e, retry_ms = backoff.as_millis() as u64, "cannot open the control connection");
                } else if !duplicate_reported {
                    tracing::error!(
                        error = %e,
                        "the broker refused this proxy: another process with the same PROXY_ID is online; \
                         stop one of them (this one keeps retrying)"
                    );
                    duplicate_reported = true;
                }
                state.link.failed(&e);
            }
        }
        // Full jitter: spread reconnecting proxies out after a broker restart.
        let delay = backoff.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = state.shutdown.started() => break,
        }
    }
    state.link.set(LinkState::Stopped);
    // Say goodbye, so the broker shows this proxy offline now (best effort, briefly).
    let me = state.upstream.keys.me().clone();
    let bye =
        state.upstream.send_as(Method::DELETE, "/v1/control", me.as_str(), bytes::Bytes::new(), Some(GOODBYE_WITHIN));
    if let Err(e) = bye.await {
        tracing::debug!(error = %e, "could not say goodbye to the broker");
    }
}

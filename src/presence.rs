//! Which proxies are online: each proxy holds one control connection (`GET /v1/control`) for as
//! long as it runs. [`Presence`] records who holds one now, since when, and when each proxy was
//! last seen to go, for the monitoring endpoints. It also keeps one process per proxy id: while
//! an instance of a proxy is online, a second instance (another process with the same id and
//! key: a misconfiguration) is refused, reported and counted, and neither process is harmed.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Instant, SystemTime},
};

use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::wire::ProxyId;

/// One proxy's record.
#[derive(Debug)]
struct Record {
    online: Option<Online>,
    last_disconnect: Option<SystemTime>,
    n_connects: u64,
}

#[derive(Debug)]
struct Online {
    /// The instance (process) that holds the control connection.
    instance: String,
    /// Which connection of this proxy it is, so a replaced connection's end is ignored.
    conn: u64,
    since: SystemTime,
    since_instant: Instant,
    /// Ends the control connection (revocation, a reconnect of the same instance).
    kick: Option<oneshot::Sender<&'static str>>,
}

/// What the monitoring endpoint says about one proxy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProxyStatus {
    pub proxy_id: ProxyId,
    pub online: bool,
    /// RFC 3339, while online.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// RFC 3339; `null` if it never disconnected.
    pub last_disconnect: Option<String>,
    /// Control connections so far (reconnects included).
    pub connections: u64,
}

/// Refused: another instance of this proxy holds the control connection.
#[derive(Debug, thiserror::Error)]
#[error("another instance of {proxy} is connected (since {since}); two processes share one proxy id")]
pub struct Duplicate {
    pub proxy: ProxyId,
    pub since: String,
}

/// Read on every authenticated request ([`Presence::check`]); written only when a proxy
/// connects or goes.
#[derive(Default)]
pub struct Presence {
    proxies: RwLock<HashMap<ProxyId, Record>>,
}

/// Held by a control connection; the proxy goes offline when it drops.
pub struct Connection {
    presence: Arc<Presence>,
    proxy: ProxyId,
    conn: u64,
    /// Fires when the connection must end (with the reason).
    pub kicked: oneshot::Receiver<&'static str>,
}

impl Presence {
    /// Marks `proxy` online through `instance`'s control connection. The same instance
    /// reconnecting replaces its old connection (which may not have noticed it is dead yet);
    /// another instance is refused while one is online.
    pub fn connect(self: &Arc<Self>, proxy: &ProxyId, instance: &str) -> Result<Connection, Duplicate> {
        let mut proxies = self.proxies.write();
        let record =
            proxies.entry(proxy.clone()).or_insert(Record { online: None, last_disconnect: None, n_connects: 0 });
        if let Some(online) = &mut record.online {
            if online.instance != instance {
                return Err(Duplicate { proxy: proxy.clone(), since: super::ops::rfc3339(online.since) });
            }
            if let Some(kick) = online.kick.take() {
                let _ = kick.send("replaced by a new connection from the same proxy");
            }
        }
        record.n_connects += 1;
        let (kick, kicked) = oneshot::channel();
        let now = SystemTime::now();
        record.online = Some(Online {
            instance: instance.to_owned(),
            conn: record.n_connects,
            since: now,
            since_instant: Instant::now(),
            kick: Some(kick),
        });
        Ok(Connection { presence: self.clone(), proxy: proxy.clone(), conn: record.n_connects, kicked })
    }

    /// A request from `instance` of `proxy`: refused while another instance is online.
    pub fn check(&self, proxy: &ProxyId, instance: Option<&str>) -> Result<(), Duplicate> {
        let proxies = self.proxies.read();
        match proxies.get(proxy).and_then(|r| r.online.as_ref()) {
            Some(online) if Some(online.instance.as_str()) != instance => {
                Err(Duplicate { proxy: proxy.clone(), since: super::ops::rfc3339(online.since) })
            }
            _ => Ok(()),
        }
    }

    /// Ends `proxy`'s control connection (its certificate was revoked).
    pub fn kick(&self, proxy: &ProxyId, reason: &'static str) {
        let mut proxies = self.proxies.write();
        if let Some(kick) = proxies.get_mut(proxy).and_then(|r| r.online.as_mut()).and_then(|o| o.kick.take()) {
            let _ = kick.send(reason);
        }
    }

    /// `instance` of `proxy` says goodbye (it is shutting down): offline now, without waiting
    /// for its connection's end to be noticed. Returns whether it was the one online.
    pub fn leave(&self, proxy: &ProxyId, instance: &str) -> bool {
        let conn = {
            let mut proxies = self.proxies.write();
            let Some(online) = proxies.get_mut(proxy).and_then(|r| r.online.as_mut()) else { return false };
            if online.instance != instance {
                return false;
            }
            if let Some(kick) = online.kick.take() {
                let _ = kick.send("the proxy said goodbye");
            }
            online.conn
        };
        self.disconnect(proxy, conn);
        true
    }

    fn disconnect(&self, proxy: &ProxyId, conn: u64) {
        let mut proxies = self.proxies.write();
        if let Some(record) = proxies.get_mut(proxy) {
            if record.online.as_ref().is_some_and(|o| o.conn == conn) {
                let online = record.online.take().expect("checked");
                record.last_disconnect = Some(SystemTime::now());
                tracing::info!(
                    proxy = %proxy,
                    online_s = online.since_instant.elapsed().as_secs(),
                    "proxy disconnected"
                );
            }
        }
    }

    /// The proxies online now, sorted.
    pub fn online(&self) -> Vec<ProxyId> {
        let proxies = self.proxies.read();
        let mut ids: Vec<ProxyId> =
            proxies.iter().filter(|(_, r)| r.online.is_some()).map(|(id, _)| id.clone()).collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        ids
    }

    pub fn n_online(&self) -> usize {
        self.proxies.read().values().filter(|r| r.online.is_some()).count()
    }

    /// One proxy's status; `None` if it never connected.
    pub fn status(&self, proxy: &ProxyId) -> Option<ProxyStatus> {
        let proxies = self.proxies.read();
        let record = proxies.get(proxy)?;
        Some(ProxyStatus {
            proxy_id: proxy.clone(),
            online: record.online.is_some(),
            connected_since: record.online.as_ref().map(|o| super::ops::rfc3339(o.since)),
            last_disconnect: record.last_disconnect.map(super::ops::rfc3339),
            connections: record.n_connects,
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.presence.disconnect(&self.proxy, self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ProxyId {
        ProxyId::parse(s).unwrap()
    }

    #[test]
    fn one_instance_per_proxy() {
        let presence = Arc::new(Presence::default());
        let (p1, p2) = (p("proxy1.broker"), p("proxy2.broker"));
        assert!(presence.status(&p1).is_none());
        let conn = presence.connect(&p1, "a").unwrap();
        let _other = presence.connect(&p2, "z").unwrap();
        assert_eq!(presence.online(), vec![p1.clone(), p2.clone()]);
        assert!(presence.check(&p1, Some("a")).is_ok());
        assert!(presence.check(&p1, Some("b")).is_err());
        assert!(presence.check(&p1, None).is_err());
        let Err(dup) = presence.connect(&p1, "b") else { panic!("a second instance was let in") };
        assert!(dup.to_string().contains("another instance of proxy1.broker"), "{dup}");
        // The refusal did not disturb the first instance.
        assert!(presence.status(&p1).unwrap().online);
        drop(conn);
        let status = presence.status(&p1).unwrap();
        assert!(!status.online && status.last_disconnect.is_some() && status.connected_since.is_none());
        assert!(presence.check(&p1, Some("b")).is_ok(), "nobody online: anyone may act");
        assert_eq!(presence.online(), vec![p2]);
    }

    #[test]
    fn a_reconnect_of_the_same_instance_replaces_the_old_connection() {
        let presence = Arc::new(Presence::default());
        let p1 = p("proxy1.broker");
        let mut old = presence.connect(&p1, "a").unwrap();
        let new = presence.connect(&p1, "a").unwrap();
        assert!(old.kicked.try_recv().is_ok(), "the old connection is told to end");
        drop(old); // its end does not take the new one offline
        assert!(presence.status(&p1).unwrap().online);
        assert_eq!(presence.status(&p1).unwrap().connections, 2);
        presence.kick(&p1, "revoked");
        drop(new);
        assert!(!presence.status(&p1).unwrap().online);
        let mut again = presence.connect(&p1, "a").unwrap();
        assert!(!presence.leave(&p1, "b"), "only the instance online may leave");
        assert!(presence.leave(&p1, "a"));
        assert!(again.kicked.try_recv().is_ok());
        assert!(!presence.status(&p1).unwrap().online, "offline at once, before the connection ends");
    }
}

//! Where the load goes: a creator app and a worker app, each at its proxy with its API key.
//! Only loopback targets are allowed unless the user says otherwise (`--allow-remote`): a load
//! test aimed at someone's production by a typo is a denial of service.

use photon::urls::{Host, Url};

/// One app at its proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The proxy's base URL, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// The app id, e.g. `app1.proxy1.broker`.
    pub app: String,
    pub key: String,
}

/// The apps a scenario uses: the creator sends tasks, the workers answer them (most scenarios
/// use the first; fanout sends each task to all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub creator: Endpoint,
    pub workers: Vec<Endpoint>,
}

impl Target {
    /// The local dev network of API.md (`cargo xtask dev`).
    pub fn dev() -> Self {
        Self::dev_at("http://127.0.0.1:8081", "http://127.0.0.1:8082", &[])
    }

    /// The dev network's apps at other URLs, with `extra` more worker apps on the second proxy.
    pub fn dev_at(proxy1: &str, proxy2: &str, extra: &[String]) -> Self {
        let at =
            |url: &str, app: &str| Endpoint { url: url.into(), app: app.into(), key: crate::network::DEV_KEY.into() };
        let mut workers = vec![at(proxy2, "app2.proxy2.broker")];
        workers.extend(extra.iter().map(|a| at(proxy2, &format!("{a}.proxy2.broker"))));
        Self { creator: at(proxy1, "app1.proxy1.broker"), workers }
    }

    /// Refuses URLs that are not `http(s)://` or (without `allow_remote`) not loopback.
    pub fn check(&self, allow_remote: bool) -> Result<(), String> {
        std::iter::once(("creator", &self.creator))
            .chain(self.workers.iter().map(|w| ("worker", w)))
            .try_for_each(|(role, e)| check_url(role, &e.url, allow_remote))
    }
}

/// Refuses `url` (the `role` URL) if it is not `http(s)://` or, without `allow_remote`, not on
/// this machine. The host is the one the requests will go to: `url` is parsed as the HTTP
/// clients parse it (WHATWG rules, where `http://a.example\@127.0.0.1` is `a.example`).
pub fn check_url(role: &str, url: &str, allow_remote: bool) -> Result<(), String> {
    let not_http = || format!("{role} URL {url:?} is not an http(s) URL");
    let parsed = Url::parse(url).map_err(|_| not_http())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(not_http());
    }
    let local = match parsed.host().ok_or_else(not_http)? {
        Host::Domain(name) => name == "localhost",
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    };
    if !allow_remote && !local {
        return Err(format!("{role} URL {url} is not on this machine; pass --allow-remote to load a remote network"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(url: &str) -> Target {
        let mut t = Target::dev();
        t.workers[0].url = url.into();
        t
    }

    #[test]
    fn only_loopback_unless_allowed() {
        assert!(Target::dev().check(false).is_ok());
        for ok in ["http://localhost:8082", "http://[::1]:8082/", "http://127.1.2.3"] {
            assert!(at(ok).check(false).is_ok(), "{ok}");
        }
        for remote in ["http://10.0.0.5:8082", "https://proxy.example.org", "http://user@192.168.1.1:80"] {
            let err = at(remote).check(false).unwrap_err();
            assert!(err.contains("--allow-remote") && err.contains("worker"), "{err}");
            assert!(at(remote).check(true).is_ok());
        }
        assert!(at("ftp://127.0.0.1").check(true).unwrap_err().contains("not an http"));
        assert!(at("http://").check(true).is_err());
        // The host the requests would go to, as the HTTP clients parse the URL.
        for remote in
            [r"http://prod.example.org\@127.0.0.1:8081", "http://localhost.example.org", "http://127.0.0.1.nip.io"]
        {
            assert!(at(remote).check(false).is_err(), "{remote}");
        }
        assert!(check_url("broker", "http://LOCALHOST:8080", false).is_ok());
        assert!(check_url("broker", "http://192.168.1.1:8080", false).unwrap_err().contains("broker URL"));
    }
}

//! The proxy's configuration: flags and environment (clap, Beam's variable names), plus the app
//! keys from `APP_<name>_KEY`; validated once at start with messages that say what to set.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use photon::{
    config::{broker_id_setting, duration_setting, OpsArgs, OpsConfig},
    wire::{AppId, ProxyId},
};

#[derive(Debug, Parser)]
#[command(
    name = "photon-proxy",
    version,
    about = "Photon site proxy: apps talk plain HTTP to it; it relays through the broker",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make this site's private key (mode 0600) and a certificate signing request for the CA.
    Keygen {
        #[arg(long, env = "PROXY_ID")]
        proxy_id: String,
        /// Directory for `<proxy id>.priv.pem` and `<proxy id>.csr.pem`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Replace a private key already there (it may be the one the site runs with).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:8081")]
    pub bind_addr: SocketAddr,
    /// The broker's URL; its host name is the broker id.
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,
    /// The broker id, when it is not the host name of BROKER_URL.
    #[arg(long, env = "BROKER_ID")]
    pub broker_id: Option<String>,
    /// This proxy's id, `<name>.<broker id>`.
    #[arg(long, env = "PROXY_ID")]
    pub proxy_id: Option<String>,
    /// This site's private key (from `photon-proxy keygen`).
    #[arg(long, env = "PRIVKEY_FILE")]
    pub privkey_file: Option<PathBuf>,
    /// The federation's root certificate, pinned.
    #[arg(long, env = "ROOTCERT_FILE")]
    pub rootcert_file: Option<PathBuf>,
    /// This proxy's certificate; fetched from the broker when not given.
    #[arg(long, env = "CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Largest request an app may send (the task or result JSON), in bytes: by default a 10 MiB
    /// body and its envelope. Sealed, that is 14.7 MiB, under the broker's 16 MiB.
    #[arg(long, env = "MAX_BODY", default_value_t = 11 * 1024 * 1024)]
    pub max_body: usize,
    #[arg(long, env = "MAX_TTL", default_value = "7d")]
    pub max_ttl: String,
    #[arg(long, env = "MAX_WAIT", default_value = "1h")]
    pub max_wait: String,
    /// Interval of `: keep-alive` comments on idle event streams.
    #[arg(long, env = "KEEPALIVE", default_value = "15s")]
    pub keepalive: String,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,
    /// How often the proxy fetches the revocation list and its own (renewed) certificate, and
    /// the longest it uses a peer's certificate before fetching it again.
    #[arg(long, env = "CERT_REFRESH", default_value = "60s")]
    pub cert_refresh: String,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// The validated configuration.
#[derive(Clone)]
pub struct ProxyConfig {
    pub proxy_id: ProxyId,
    pub broker_url: String,
    pub broker_id: String,
    pub privkey_file: PathBuf,
    pub rootcert_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    /// App → API key.
    pub apps: HashMap<AppId, String>,
    pub max_body: usize,
    pub max_ttl: Duration,
    pub max_wait: Duration,
    pub keepalive: Duration,
    pub workers: usize,
    pub cert_refresh: Duration,
    pub ops: OpsConfig,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys.
        f.debug_struct("ProxyConfig")
            .field("proxy_id", &self.proxy_id)
            .field("broker_url", &self.broker_url)
            .field("apps", &self.apps.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn required<T: Clone>(value: &Option<T>, what: &str) -> Result<T, String> {
    value.clone().ok_or_else(|| format!("{what} is not set"))
}

/// App keys from variables `APP_<name>_KEY=<secret>`.
pub fn app_keys_from_env(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("APP_")?.strip_suffix("_KEY")?;
            (!name.is_empty()).then(|| (name.to_owned(), v))
        })
        .collect()
}

impl ServeArgs {
    /// Validates the flags together with app keys `(name, key)`.
    pub fn validate(&self, app_keys: Vec<(String, String)>) -> Result<ProxyConfig, String> {
        let broker_url = required(&self.broker_url, "BROKER_URL (the broker's URL, e.g. http://broker:8080)")?;
        let broker_id = broker_id_setting(&broker_url, self.broker_id.as_deref())?;
        let proxy_text = required(&self.proxy_id, "PROXY_ID (this proxy's id, e.g. proxy1.<broker id>)")?;
        let proxy_id = ProxyId::parse(&proxy_text).map_err(|e| format!("PROXY_ID: {e}"))?;
        proxy_id
            .within(&broker_id)
            .map_err(|e| format!("PROXY_ID: {e} (the broker id is {broker_id:?}, from BROKER_URL)"))?;
        if app_keys.is_empty() {
            return Err(
                "no app keys: set APP_<name>_KEY=<secret> for each app that may use this proxy, e.g. APP_app1_KEY=..."
                    .into(),
            );
        }
        let mut apps = HashMap::new();
        for (name, key) in app_keys {
            let app = proxy_id.app(&name).map_err(|e| format!("APP_{name}_KEY: {e}"))?;
            if key.is_empty() {
                return Err(format!("APP_{name}_KEY is empty"));
            }
            apps.insert(app, key);
        }
        let keepalive = duration_setting("KEEPALIVE", &self.keepalive)?;
        if keepalive.is_zero() {
            return Err("KEEPALIVE must be more than 0".into());
        }
        let cert_refresh = duration_setting("CERT_REFRESH", &self.cert_refresh)?;
        if cert_refresh.is_zero() {
            return Err("CERT_REFRESH must be more than 0".into());
        }
        Ok(ProxyConfig {
            proxy_id,
            broker_url: broker_url.trim_end_matches('/').to_owned(),
            broker_id,
            privkey_file: required(
                &self.privkey_file,
                "PRIVKEY_FILE (this site's private key, from `photon-proxy keygen`)",
            )?,
            rootcert_file: required(&self.rootcert_file, "ROOTCERT_FILE (the federation's root certificate)")?,
            cert_file: self.cert_file.clone(),
            apps,
            max_body: self.max_body,
            max_ttl: duration_setting("MAX_TTL", &self.max_ttl)?,
            max_wait: duration_setting("MAX_WAIT", &self.max_wait)?,
            keepalive,
            cert_refresh,
            ops: self.ops.validate()?,
            workers: match self.workers {
                // actix's own limits, met with a message instead of its assertion.
                Some(n) if !(1..=512).contains(&n) => return Err("WORKERS must be from 1 to 512".into()),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        let cli = Cli::try_parse_from([
            "photon-proxy",
            "--broker-url",
            "http://broker:8080",
            "--proxy-id",
            "proxy1.broker",
            "--privkey-file",
            "k.pem",
            "--rootcert-file",
            "root.crt",
        ])
        .unwrap();
        cli.serve
    }

    #[test]
    fn app_keys_come_from_env_names() {
        let keys = app_keys_from_env([
            ("APP_app1_KEY".to_string(), "s1".to_string()),
            ("APP__KEY".to_string(), "x".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ]);
        assert_eq!(keys, vec![("app1".to_string(), "s1".to_string())]);
    }

    #[test]
    fn validation_says_what_to_set() {
        let err = args().validate(vec![]).unwrap_err();
        assert!(err.contains("APP_<name>_KEY"), "{err}");
        let cfg = args().validate(vec![("app1".into(), "secret".into())]).unwrap();
        assert_eq!(cfg.broker_id, "broker");
        assert!(cfg.apps.contains_key(&AppId::parse("app1.proxy1.broker").unwrap()));
        assert!(!format!("{cfg:?}").contains("secret"));
        let mut bad = args();
        bad.proxy_id = Some("proxy1.other".into());
        assert!(bad.validate(vec![("a".into(), "k".into())]).unwrap_err().contains("PROXY_ID"));
        let mut missing = args();
        missing.broker_url = None;
        assert!(missing.validate(vec![("a".into(), "k".into())]).unwrap_err().contains("BROKER_URL"));
        assert!(args().validate(vec![("bad name".into(), "k".into())]).is_err());
    }
}

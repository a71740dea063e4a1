//! The broker's configuration: one struct, from flags and environment (clap), validated once at
//! start with messages that say what to set. Also the `ca` subcommands' arguments.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    ops::{LogFormat, StatsdConfig},
    wire::parse_duration,
};

#[derive(Debug, Parser)]
#[command(
    name = "photon-broker",
    version,
    about = "Photon broker: stores and forwards sealed tasks between site proxies",
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
    /// The built-in certificate authority.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// Make the root key and certificate, and the broker's own key and certificate.
    Init {
        /// Directory for the CA's files (created).
        #[arg(long, env = "PKI_DIR", default_value = "pki")]
        dir: PathBuf,
        /// The broker's URL; its host name is the broker id unless --broker-id says otherwise.
        #[arg(long, env = "BROKER_URL")]
        broker_url: String,
        #[arg(long, env = "BROKER_ID")]
        broker_id: Option<String>,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a proxy certificate from its CSR (written to <dir>/certs/<proxy id>.crt).
    Sign {
        #[arg(long, env = "PKI_DIR", default_value = "pki")]
        dir: PathBuf,
        #[arg(long, env = "BROKER_URL")]
        broker_url: String,
        #[arg(long, env = "BROKER_ID")]
        broker_id: Option<String>,
        /// The CSR made by `photon-proxy keygen`.
        #[arg(long)]
        csr: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a proxy's current certificate (<dir>/certs/<proxy id>.crt), or any certificate the
    /// CA issued by its serial (every one is kept as <dir>/certs/issued/<proxy id>.<serial>.crt):
    /// adds it to <dir>/crl.pem, which the running broker reloads and proxies fetch and honour.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["proxy_id", "serial"])))]
    Revoke {
        #[arg(long, env = "PKI_DIR", default_value = "pki")]
        dir: PathBuf,
        /// The proxy whose current certificate to revoke, e.g. proxy2.broker.
        #[arg(long)]
        proxy_id: Option<String>,
        /// The serial of the certificate to revoke (hex), e.g. a renewed proxy's earlier one
        /// whose key leaked.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:8080")]
    pub bind_addr: SocketAddr,
    /// The URL proxies use to reach this broker; its host name is the broker id.
    #[arg(long, env = "BROKER_URL")]
    pub broker_url: Option<String>,
    /// The broker id, when it is not the host name of BROKER_URL (e.g. `broker` in the dev
    /// network, reached at 127.0.0.1).
    #[arg(long, env = "BROKER_ID")]
    pub broker_id: Option<String>,
    /// The CA directory made by `photon-broker ca init`.
    #[arg(long, env = "PKI_DIR", default_value = "pki")]
    pub pki_dir: PathBuf,
    /// Longest task TTL accepted.
    #[arg(long, env = "MAX_TTL", default_value = "7d")]
    pub max_ttl: String,
    /// Longest long-poll wait.
    #[arg(long, env = "MAX_WAIT", default_value = "1h")]
    pub max_wait: String,
    /// Largest request body in bytes (sealed bodies are about a third larger than plaintext).
    #[arg(long, env = "MAX_BODY", default_value_t = 16 * 1024 * 1024)]
    pub max_body: usize,
    /// Keep-alive interval on idle streams.
    #[arg(long, env = "KEEPALIVE", default_value = "15s")]
    pub keepalive: String,
    /// HTTP worker threads (default: one per core).
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,
    /// The password of the monitoring endpoints (`/v1/health/proxies`, Basic auth with an empty
    /// user); they answer 501 without one.
    #[arg(long, env = "MONITORING_API_KEY", hide_env_values = true)]
    pub monitoring_api_key: Option<String>,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// What every Photon server takes besides its own settings: metrics, logs, shutdown.
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// StatsD host to send metrics to; metrics are off when it is not set.
    #[arg(long, env = "STATSD_HOST")]
    pub statsd_host: Option<String>,
    #[arg(long, env = "STATSD_PORT", default_value_t = 8125)]
    pub statsd_port: u16,
    /// Prefix of every metric name.
    #[arg(long, env = "STATSD_PREFIX", default_value = "photon")]
    pub statsd_prefix: String,
    /// How long in-flight requests may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s")]
    pub shutdown_grace: String,
    /// Log lines as text, or as one JSON object per line (for log shippers). The level comes
    /// from RUST_LOG (default info; debug adds one line per request).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The validated [`OpsArgs`].
#[derive(Debug, Clone, Default)]
pub struct OpsConfig {
    pub statsd: Option<StatsdConfig>,
    pub shutdown_grace: Duration,
}

impl OpsArgs {
    pub fn validate(&self) -> Result<OpsConfig, String> {
        Ok(OpsConfig {
            statsd: StatsdConfig::from_settings(self.statsd_host.as_deref(), self.statsd_port, &self.statsd_prefix)?,
            shutdown_grace: duration_setting("SHUTDOWN_GRACE", &self.shutdown_grace)?,
        })
    }
}

/// A secret setting: compared, never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The validated configuration `serve` runs with.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub broker_id: String,
    pub pki_dir: PathBuf,
    pub max_ttl: Duration,
    pub max_wait: Duration,
    pub max_body: usize,
    pub keepalive: Duration,
    pub workers: usize,
    pub session_lifetime: Duration,
    /// Password of the monitoring endpoints; they answer 501 without one.
    pub monitoring_api_key: Option<Secret>,
    pub ops: OpsConfig,
}

/// The host name of a URL (`http://broker:8080/` → `broker`).
pub fn host_of(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = host_port.split(':').next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{url:?} has no host name"));
    }
    Ok(host.to_ascii_lowercase())
}

/// The broker id: `BROKER_ID` if set, else the host name of `BROKER_URL`.
pub fn broker_id_setting(broker_url: &str, broker_id: Option<&str>) -> Result<String, String> {
    let id = match broker_id {
        Some(id) => id.to_owned(),
        None => host_of(broker_url).map_err(|e| format!("BROKER_URL: {e}"))?,
    };
    crate::wire::ProxyId::parse(&format!("x.{id}"))
        .map_err(|_| format!("broker id {id:?} is not a valid dot-separated name (BROKER_ID or BROKER_URL)"))?;
    Ok(id)
}

/// A duration setting (`MAX_TTL=7d`), up to a year; the error names the setting.
pub fn duration_setting(name: &str, value: &str) -> Result<Duration, String> {
    parse_duration(value, Duration::from_secs(365 * 86_400)).map_err(|e| format!("{name}: {e}"))
}

impl ServeArgs {
    pub fn validate(&self) -> Result<BrokerConfig, String> {
        let url = self.broker_url.as_deref().ok_or(
            "BROKER_URL is not set: set it to the URL proxies use to reach this broker, e.g. http://broker:8080",
        )?;
        let broker_id = broker_id_setting(url, self.broker_id.as_deref())?;
        let max_wait = duration_setting("MAX_WAIT", &self.max_wait)?;
        let keepalive = duration_setting("KEEPALIVE", &self.keepalive)?;
        if keepalive.is_zero() {
            return Err("KEEPALIVE must be more than 0".into());
        }
        Ok(BrokerConfig {
            broker_id,
            pki_dir: self.pki_dir.clone(),
            max_ttl: duration_setting("MAX_TTL", &self.max_ttl)?,
            max_wait,
            max_body: self.max_body,
            keepalive,
            workers: match self.workers {
                // actix's own limits, met with a message instead of its assertion.
                Some(n) if !(1..=512).contains(&n) => return Err("WORKERS must be from 1 to 512".into()),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(2, |n| n.get()),
            },
            session_lifetime: Duration::from_secs(3600),
            monitoring_api_key: match self.monitoring_api_key.as_deref() {
                Some("") => return Err("MONITORING_API_KEY is empty: unset it or give it a value".into()),
                key => key.map(|k| Secret(k.to_owned())),
            },
            ops: self.ops.validate()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("http://broker:8080").unwrap(), "broker");
        assert_eq!(host_of("https://Broker.Example.org/path").unwrap(), "broker.example.org");
        assert!(host_of("broker:8080").is_err());
        assert!(host_of("http://:80").is_err());
    }
}

//! The command line: a scenario with its bounds and target, or `report`. Validated into a
//! [`Run`] with messages that say what to change.
//!
//! With no target URL given, the tool starts a fresh local network itself (API.md's dev shape on
//! free loopback ports) and samples its processes' memory.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    client::ClientKind,
    scenario::{Plan, Via},
    target::{Endpoint, Target},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Concurrent clients creating tasks.
    Create,
    /// Pipelines of create → worker answers → creator gets the result.
    Roundtrip,
    /// Round trips with large bodies (1 MiB unless --body-bytes says otherwise).
    Large,
    /// S event streams (-c) on one task, P result updates (-n): every stream must get every update.
    Sse,
    /// N long-poll waiters (-c) on one task, woken by one result; -n rounds.
    Waiters,
    /// Tasks to R recipient apps (--recipients), each answering; the creator waits for all.
    Fanout,
    /// Round trips at a fixed --rate for --duration, memory sampled throughout.
    Soak,
    /// Tasks with a short --ttl; then how long the broker takes to give their memory back.
    Expiry,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Roundtrip => "roundtrip",
            Self::Large => "large",
            Self::Sse => "sse",
            Self::Waiters => "waiters",
            Self::Fanout => "fanout",
            Self::Soak => "soak",
            Self::Expiry => "expiry",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "photon-loadtest",
    version,
    about = "Load-test a network that speaks the Beam app API (Photon or Samply.Beam)",
    after_help = "Without --creator-url/--worker-url it starts a fresh local Photon network (broker + two \
                  proxies, API.md's apps and keys, free loopback ports) from the binaries next to itself, \
                  and samples their memory. Prints one JSON summary line per run (also appended to --out); \
                  `photon-loadtest report` turns such lines into an HTML page."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one scenario.
    #[command(name = "run")]
    Run(Box<RunArgs>),
    /// Write an HTML report (SVG charts) of the JSON lines in one or more files.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// JSON-lines files written by --out.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long, short = 'o', default_value = "loadtest-report.html")]
    pub output: PathBuf,
    /// The report's title.
    #[arg(long, default_value = "Photon load test")]
    pub title: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub scenario: Scenario,
    /// Concurrent clients, pipelines, streams (sse) or waiters (waiters).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub clients: usize,
    /// Operations in all (tasks, round trips, result updates, rounds); the run stops at this
    /// count or at --duration, whichever is first.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub count: u64,
    /// Longest run, e.g. 10s, 2m.
    #[arg(long, short = 'd', default_value = "10s")]
    pub duration: String,
    /// Bytes of each task and result body (as JSON); 100, or 1 MiB for `large`.
    #[arg(long)]
    pub body_bytes: Option<usize>,
    /// How the worker and the creator are told of new tasks and results.
    #[arg(long, value_enum, default_value_t = Via::LongPoll)]
    pub via: Via,
    /// Each task's time to live; 5m, or 5s for `expiry`.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Round trips started per second (soak).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Recipient apps per task (fanout) when the tool starts the network; against a given
    /// network, the --worker-app flags name them.
    #[arg(long, default_value_t = 10)]
    pub recipients: usize,
    /// The creator's proxy; with --worker-url, loads that network instead of starting one.
    #[arg(long)]
    pub creator_url: Option<String>,
    #[arg(long, default_value = "app1.proxy1.broker")]
    pub creator_app: String,
    #[arg(long, env = "LOADTEST_CREATOR_KEY", default_value = "App1Secret", hide_env_values = true)]
    pub creator_key: String,
    #[arg(long)]
    pub worker_url: Option<String>,
    /// The worker app; repeat it for fanout's recipients (all at --worker-url, one key).
    #[arg(long, default_value = "app2.proxy2.broker")]
    pub worker_app: Vec<String>,
    #[arg(long, env = "LOADTEST_WORKER_KEY", default_value = "App1Secret", hide_env_values = true)]
    pub worker_key: String,
    /// The broker of a given network; lets `waiters` see when every waiter is registered.
    #[arg(long)]
    pub broker_url: Option<String>,
    /// A process of a given network whose memory to sample, as NAME=PID (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Where photon-broker and photon-proxy are, for a network the tool starts; by default
    /// next to this executable.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The HTTP client of the apps' plain requests (event streams always use reqwest): the
    /// loadtest's own (lean on CPU, so it takes less from what it measures on a shared machine;
    /// plain http:// and direct connections only), or reqwest (TLS, and HTTP_PROXY etc.).
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// Allow targets that are not on this machine.
    #[arg(long)]
    pub allow_remote: bool,
    /// Append the JSON summary line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No live progress.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID, e.g. broker=1234")?;
    let pid = pid.parse().map_err(|_| format!("{pid:?} is not a process id"))?;
    if name.is_empty() {
        return Err("expected NAME=PID, e.g. broker=1234".into());
    }
    Ok((name.to_owned(), pid))
}

/// Where the load goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Network {
    /// A running network at these URLs.
    Given { target: Target, broker_url: Option<String>, pids: Vec<(String, u32)> },
    /// A fresh network the tool starts from the binaries in this directory.
    Start { bin_dir: Option<PathBuf> },
}

/// A validated run.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: Scenario,
    pub plan: Plan,
    pub network: Network,
}

const MAX_WAIT: Duration = Duration::from_secs(7 * 86_400);

impl RunArgs {
    pub fn validate(&self) -> Result<Run, String> {
        let duration =
            photon::wire::parse_duration(&self.duration, MAX_WAIT).map_err(|e| format!("--duration: {e}"))?;
        if duration.is_zero() || self.count == 0 || self.clients == 0 {
            return Err("--clients, --count and --duration must be more than 0".into());
        }
        if self.clients > 100_000 {
            return Err("--clients: at most 100000".into());
        }
        let body_bytes = self.body_bytes.unwrap_or(if self.scenario == Scenario::Large { 1 << 20 } else { 100 });
        if !(2..=64 * 1024 * 1024).contains(&body_bytes) {
            return Err("--body-bytes: from 2 (an empty JSON string) to 64 MiB".into());
        }
        let ttl =
            self.ttl.clone().unwrap_or_else(|| if self.scenario == Scenario::Expiry { "5s" } else { "5m" }.into());
        photon::wire::parse_duration(&ttl, MAX_WAIT).map_err(|e| format!("--ttl: {e}"))?;
        if !(self.rate > 0.0 && self.rate <= 1e6) {
            return Err("--rate: more than 0 and at most 1000000 per second".into());
        }
        if !(1..=1000).contains(&self.recipients) {
            return Err("--recipients: from 1 to 1000".into());
        }
        let network = match (&self.creator_url, &self.worker_url) {
            (None, None) => {
                if !self.pids.is_empty() || self.broker_url.is_some() {
                    return Err(
                        "--pid and --broker-url describe a given network: add --creator-url and --worker-url".into()
                    );
                }
                Network::Start { bin_dir: self.bin_dir.clone() }
            }
            (Some(creator), Some(worker)) => {
                let target = Target {
                    creator: Endpoint {
                        url: trim(creator),
                        app: self.creator_app.clone(),
                        key: self.creator_key.clone(),
                    },
                    workers: self
                        .worker_app
                        .iter()
                        .map(|app| Endpoint { url: trim(worker), app: app.clone(), key: self.worker_key.clone() })
                        .collect(),
                };
                target.check(self.allow_remote)?;
                if let Some(broker) = &self.broker_url {
                    crate::target::check_url("broker", broker, self.allow_remote)?;
                }
                Network::Given { target, broker_url: self.broker_url.as_deref().map(trim), pids: self.pids.clone() }
            }
            _ => return Err("give both --creator-url and --worker-url, or neither to start a local network".into()),
        };
        let recipients = match &network {
            Network::Given { target, .. } => target.workers.len(),
            Network::Start { .. } => self.recipients,
        };
        Ok(Run {
            scenario: self.scenario,
            plan: Plan {
                clients: self.clients,
                count: self.count,
                duration,
                body_bytes,
                via: self.via,
                ttl,
                rate: self.rate,
                recipients,
                client: self.client,
            },
            network,
        })
    }
}

fn trim(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Run, String> {
        let cli = Cli::try_parse_from(["photon-loadtest", "run"].into_iter().chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(run) => run.validate(),
            Command::Report(_) => unreachable!(),
        }
    }

    const GIVEN: [&str; 4] = ["--creator-url", "http://127.0.0.1:8081/", "--worker-url", "http://127.0.0.1:8082"];

    #[test]
    fn without_a_target_it_starts_a_network() {
        let run = parse(&["create"]).unwrap();
        assert_eq!(run.scenario, Scenario::Create);
        assert_eq!(run.network, Network::Start { bin_dir: None });
        assert_eq!((run.plan.clients, run.plan.count, run.plan.body_bytes), (1, 10_000, 100));
        assert_eq!(
            (run.plan.duration, run.plan.ttl.as_str(), run.plan.recipients),
            (Duration::from_secs(10), "5m", 10)
        );
    }

    #[test]
    fn a_given_network_is_the_dev_one_by_default() {
        let run = parse(
            &[&["create"][..], &GIVEN, &["--pid", "broker=42", "--broker-url", "http://127.0.0.1:8080"]].concat(),
        )
        .unwrap();
        let Network::Given { target, broker_url, pids } = run.network else { panic!("given") };
        assert_eq!(target, Target::dev());
        assert_eq!(broker_url.as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(pids, vec![("broker".to_string(), 42)]);
        assert_eq!((run.plan.recipients, run.plan.client), (1, ClientKind::Lean));
        let reqwest = parse(&[&["create", "--client", "reqwest"][..], &GIVEN].concat()).unwrap();
        assert_eq!(reqwest.plan.client, ClientKind::Reqwest);
        assert!(parse(&["create", "--client", "curl"]).unwrap_err().contains("--client"));
    }

    #[test]
    fn flags_shape_the_plan() {
        let run = parse(&["roundtrip", "-c", "64", "-n", "500", "-d", "2m", "--via", "sse", "--body-bytes", "1048576"])
            .unwrap();
        assert_eq!(run.scenario, Scenario::Roundtrip);
        assert_eq!((run.plan.clients, run.plan.count, run.plan.via), (64, 500, Via::Sse));
        assert_eq!((run.plan.duration, run.plan.body_bytes), (Duration::from_secs(120), 1 << 20));
        assert_eq!(parse(&["large"]).unwrap().plan.body_bytes, 1 << 20);
        assert_eq!(parse(&["large", "--body-bytes", "10485760"]).unwrap().plan.body_bytes, 10 << 20);
        assert_eq!(parse(&["expiry"]).unwrap().plan.ttl, "5s");
        assert_eq!(parse(&["soak", "--rate", "50", "--ttl", "1m"]).unwrap().plan.rate, 50.0);
        let fan = parse(
            &[&GIVEN[..], &["fanout", "--worker-app", "a.proxy2.broker", "--worker-app", "b.proxy2.broker"]].concat(),
        );
        assert_eq!(fan.unwrap().plan.recipients, 2);
    }

    #[test]
    fn bad_input_is_named() {
        assert!(parse(&["explode"]).is_err());
        assert!(parse(&["create", "-d", "soon"]).unwrap_err().contains("--duration"));
        assert!(parse(&["create", "--ttl", "forever"]).unwrap_err().contains("--ttl"));
        assert!(parse(&["create", "-n", "0"]).unwrap_err().contains("more than 0"));
        assert!(parse(&["create", "--body-bytes", "1"]).unwrap_err().contains("--body-bytes"));
        assert!(parse(&["soak", "--rate", "0"]).unwrap_err().contains("--rate"));
        assert!(parse(&["fanout", "--recipients", "0"]).unwrap_err().contains("--recipients"));
        assert!(parse(&["create", "--pid", "broker"]).unwrap_err().contains("NAME=PID"));
        assert!(parse(&["create", "--pid", "broker=1"]).unwrap_err().contains("--creator-url"));
        assert!(parse(&["create", "--creator-url", "http://127.0.0.1:1"]).unwrap_err().contains("both"));
        let remote = parse(&["create", "--creator-url", "http://127.0.0.1:1", "--worker-url", "http://10.1.1.1:8082"]);
        assert!(remote.unwrap_err().contains("--allow-remote"));
        let allowed =
            ["create", "--creator-url", "http://127.0.0.1:1", "--worker-url", "http://10.1.1.1:8082", "--allow-remote"];
        assert!(parse(&allowed).is_ok());
    }

    #[test]
    fn report_takes_files() {
        let cli = Cli::try_parse_from(["photon-loadtest", "report", "a.jsonl", "b.jsonl", "-o", "r.html"]).unwrap();
        let Command::Report(r) = cli.command else { panic!("report") };
        assert_eq!((r.inputs.len(), r.output), (2, PathBuf::from("r.html")));
        assert!(Cli::try_parse_from(["photon-loadtest", "report"]).is_err());
    }
}

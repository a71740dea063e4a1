//! The command line: a scenario, its bounds, and the target (API.md's dev network when none is
//! given). Validated into a [`Run`] with messages that say what to change.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

use crate::{
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
}

#[derive(Debug, Parser)]
#[command(
    name = "photon-loadtest",
    version,
    about = "Load-test a network that speaks the Beam app API (Photon or Samply.Beam)",
    after_help = "Without target flags it loads the local dev network (`cargo xtask dev`). Prints one JSON \
                  summary line per run (also appended to --out)."
)]
pub struct Cli {
    pub scenario: Scenario,
    /// Concurrent clients (create) or pipelines (roundtrip).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub clients: usize,
    /// Operations in all; the run stops at this count or at --duration, whichever is first.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub count: u64,
    /// Longest run, e.g. 10s, 2m.
    #[arg(long, short = 'd', default_value = "10s")]
    pub duration: String,
    /// Bytes of each task and result body (as JSON).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// How the worker and the creator are told of new tasks and results.
    #[arg(long, value_enum, default_value_t = Via::LongPoll)]
    pub via: Via,
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub creator_url: String,
    #[arg(long, default_value = "app1.proxy1.broker")]
    pub creator_app: String,
    #[arg(long, env = "LOADTEST_CREATOR_KEY", default_value = "App1Secret", hide_env_values = true)]
    pub creator_key: String,
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub worker_url: String,
    #[arg(long, default_value = "app2.proxy2.broker")]
    pub worker_app: String,
    #[arg(long, env = "LOADTEST_WORKER_KEY", default_value = "App1Secret", hide_env_values = true)]
    pub worker_key: String,
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

/// A validated run.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: Scenario,
    pub plan: Plan,
    pub target: Target,
}

impl Cli {
    pub fn validate(&self) -> Result<Run, String> {
        let duration = photon::wire::parse_duration(&self.duration, Duration::from_secs(7 * 86_400))
            .map_err(|e| format!("--duration: {e}"))?;
        if duration.is_zero() || self.count == 0 || self.clients == 0 {
            return Err("--clients, --count and --duration must be more than 0".into());
        }
        if self.clients > 100_000 {
            return Err("--clients: at most 100000".into());
        }
        if self.body_bytes < 2 || self.body_bytes > 64 * 1024 * 1024 {
            return Err("--body-bytes: from 2 (an empty JSON string) to 64 MiB".into());
        }
        let target = Target {
            creator: Endpoint {
                url: trim(&self.creator_url),
                app: self.creator_app.clone(),
                key: self.creator_key.clone(),
            },
            worker: Endpoint {
                url: trim(&self.worker_url),
                app: self.worker_app.clone(),
                key: self.worker_key.clone(),
            },
        };
        target.check(self.allow_remote)?;
        Ok(Run {
            scenario: self.scenario,
            plan: Plan {
                clients: self.clients,
                count: self.count,
                duration,
                body_bytes: self.body_bytes,
                via: self.via,
            },
            target,
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
        let cli = Cli::try_parse_from(std::iter::once("photon-loadtest").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate()
    }

    #[test]
    fn defaults_target_the_dev_network() {
        let run = parse(&["create"]).unwrap();
        assert_eq!(run.scenario, Scenario::Create);
        assert_eq!(run.target, Target::dev());
        assert_eq!((run.plan.clients, run.plan.count, run.plan.body_bytes), (1, 10_000, 100));
        assert_eq!(run.plan.duration, Duration::from_secs(10));
    }

    #[test]
    fn flags_shape_the_plan() {
        let run = parse(&["roundtrip", "-c", "64", "-n", "500", "-d", "2m", "--via", "sse", "--body-bytes", "1048576"])
            .unwrap();
        assert_eq!(run.scenario, Scenario::Roundtrip);
        assert_eq!((run.plan.clients, run.plan.count, run.plan.via), (64, 500, Via::Sse));
        assert_eq!((run.plan.duration, run.plan.body_bytes), (Duration::from_secs(120), 1 << 20));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(parse(&["explode"]).is_err());
        assert!(parse(&["create", "-d", "soon"]).unwrap_err().contains("--duration"));
        assert!(parse(&["create", "-n", "0"]).unwrap_err().contains("more than 0"));
        assert!(parse(&["create", "--body-bytes", "1"]).unwrap_err().contains("--body-bytes"));
        let remote = parse(&["create", "--worker-url", "http://10.1.1.1:8082"]).unwrap_err();
        assert!(remote.contains("--allow-remote"), "{remote}");
        assert!(parse(&["create", "--worker-url", "http://10.1.1.1:8082", "--allow-remote"]).is_ok());
    }
}

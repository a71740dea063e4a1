//! `photon-loadtest`: parse the flags, run one scenario with live progress, print and save the
//! JSON summary.

use std::{io::Write, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use photon_loadtest::{
    cli::{Cli, Run, Scenario},
    client::App,
    scenario,
    stats::Recorder,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = match cli.validate() {
        Ok(run) => run,
        Err(e) => {
            eprintln!("photon-loadtest: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(execute(&cli, run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("photon-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: &Cli, run: Run) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(run.plan.clients.max(16))
        .tcp_nodelay(true)
        .build()
        .context("HTTP client")?;
    let creator = Arc::new(App::new(http.clone(), run.target.creator.clone()).map_err(anyhow::Error::msg)?);
    let worker = Arc::new(App::new(http.clone(), run.target.worker.clone()).map_err(anyhow::Error::msg)?);
    for app in [&creator, &worker] {
        let health = http.get(format!("{}/v1/health", app.endpoint.url)).send().await;
        health.with_context(|| {
            format!("{} does not answer; start the dev network with `cargo xtask dev`", app.endpoint.url)
        })?;
    }
    let rec = Arc::new(Recorder::new());
    let progress = (!cli.quiet).then(|| progress(rec.clone(), run.plan.count));
    match run.scenario {
        Scenario::Create => scenario::create(creator, &worker, &run.plan, rec.clone()).await,
        Scenario::Roundtrip => scenario::roundtrip(creator, worker, &run.plan, rec.clone()).await,
    }
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    let summary = rec.summary(name(run.scenario), serde_json::to_value(&run.plan)?);
    let line = serde_json::to_string(&summary)?;
    println!("{line}");
    if let Some(path) = &cli.out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| path.display().to_string())?;
        writeln!(file, "{line}")?;
    }
    let l = summary.latency_ms.as_ref();
    eprintln!(
        "{}: {} ok, {} failed in {:.1} s = {:.0}/s; latency ms p50 {:.3} p99 {:.3} max {:.3}",
        summary.scenario,
        summary.ok,
        summary.errors.values().sum::<u64>(),
        summary.elapsed_s,
        summary.per_s,
        l.map_or(0.0, |l| l.p50),
        l.map_or(0.0, |l| l.p99),
        l.map_or(0.0, |l| l.max),
    );
    Ok(())
}

fn name(s: Scenario) -> &'static str {
    match s {
        Scenario::Create => "create",
        Scenario::Roundtrip => "roundtrip",
    }
}

/// A progress bar on stderr: done of planned, rate, errors, elapsed.
fn progress(rec: Arc<Recorder>, count: u64) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let bar = indicatif::ProgressBar::new(count);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let shown = bar.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let (ok, failed, secs) = (rec.n_ok(), rec.n_failed(), rec.elapsed().as_secs_f64());
            shown.set_position(ok + failed);
            shown.set_message(format!("{:.0}/s, {failed} errors", ok as f64 / secs.max(1e-3)));
        }
    });
    (bar, ticker)
}

//! `photon-loadtest`: run one scenario with live progress against a given network or one it
//! starts itself, print and save the JSON summary; or turn saved summaries into an HTML report.

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use photon_loadtest::{
    cli::{Cli, Command, Network as Where, ReportArgs, Run, Scenario},
    client::App,
    memory::Sampler,
    network::{self, Network, Spec},
    report,
    scenario::{self, Ctx},
    stats::{Recorder, Summary},
    target::Target,
};

/// mimalloc instead of glibc malloc: the loadtest shares the machine with what it measures, and
/// glibc's free-list upkeep was a large part of its time (see docs/BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Report(args) => write_report(args),
        Command::Run(args) => match args.validate() {
            Ok(run) => {
                let runtime =
                    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
                runtime.block_on(execute(args.out.clone(), args.quiet, run))
            }
            Err(e) => {
                eprintln!("photon-loadtest: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("photon-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_report(args: &ReportArgs) -> anyhow::Result<()> {
    let mut summaries = Vec::new();
    for path in &args.inputs {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        summaries.extend(report::parse_lines(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?);
    }
    std::fs::write(&args.output, report::render(&args.title, &summaries))
        .with_context(|| args.output.display().to_string())?;
    eprintln!("wrote {} ({} runs)", args.output.display(), summaries.len());
    Ok(())
}

/// A network the tool started for this run, in a scratch directory removed afterwards.
struct Started {
    net: Network,
    dir: PathBuf,
}

impl Drop for Started {
    fn drop(&mut self) {
        self.net.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a fresh dev-shaped network on free ports, with the fanout's extra worker apps.
fn start_network(bin_dir: Option<PathBuf>, extra_apps: &[String]) -> anyhow::Result<Started> {
    let bin_dir =
        bin_dir.or_else(network::own_bin_dir).context("cannot tell where the binaries are: pass --bin-dir")?;
    let dir = std::env::temp_dir().join(format!("photon-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let mut attempt = 1;
    loop {
        let addrs = network::free_addrs()?;
        let mut spec = Spec::dev(bin_dir.clone(), dir.join("pki"), addrs, extra_apps);
        spec.logs = Some(dir.clone());
        spec.env.push(("RUST_LOG".into(), "warn".into()));
        match Network::start(spec, &AtomicBool::new(false)) {
            Ok(net) => return Ok(Started { net, dir }),
            // Another process can take a free port before the child binds it (the start then
            // fails at once, naming the process): try other ports.
            Err(e) if attempt < 3 => {
                eprintln!("photon-loadtest: {e:#}; starting again on other ports");
                attempt += 1;
            }
            Err(e) => return Err(e.context("starting the local network")),
        }
    }
}

async fn execute(out: Option<PathBuf>, quiet: bool, run: Run) -> anyhow::Result<()> {
    let (target, broker_url, pids, started) = match run.network.clone() {
        Where::Given { target, broker_url, pids } => (target, broker_url, pids, None),
        Where::Start { bin_dir } => {
            let extra: Vec<String> = if run.scenario == Scenario::Fanout {
                (1..run.plan.recipients).map(|i| format!("fan{i}")).collect()
            } else {
                Vec::new()
            };
            let started = tokio::task::spawn_blocking(move || start_network(bin_dir, &extra)).await??;
            let spec = &started.net.spec;
            let url = |i: usize| format!("http://{}", spec.proxies[i].addr);
            let extra: Vec<String> = spec.proxies[1].apps[1..].to_vec();
            let target = Target::dev_at(&url(0), &url(1), &extra);
            (target, Some(spec.broker_url()), started.net.pids(), Some(started))
        }
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(run.plan.clients.max(16))
        .tcp_nodelay(true)
        // A failed request is counted as failed, not quietly sent again.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        // Nor sent elsewhere: a redirect could lead off the machine the target check allowed.
        .redirect(reqwest::redirect::Policy::none())
        // A stalled target fails requests instead of holding the run for ever.
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(photon_loadtest::client::READ_LIMIT)
        .build()
        .context("HTTP client")?;
    let max_idle = run.plan.clients.max(16);
    let app = |e| App::new(http.clone(), e, run.plan.client, max_idle).map(Arc::new).map_err(anyhow::Error::msg);
    let creator = app(target.creator.clone())?;
    let workers = target.workers.iter().cloned().map(app).collect::<anyhow::Result<Vec<_>>>()?;
    for url in std::iter::once(&creator).chain(&workers).map(|a| &a.endpoint.url) {
        http.get(format!("{url}/v1/health")).send().await.with_context(|| format!("{url} does not answer"))?;
    }
    let memory = (!pids.is_empty()).then(|| Arc::new(Sampler::start(&pids)));
    let rec = Arc::new(Recorder::new());
    let ctx =
        Ctx { creator, workers, plan: run.plan.clone(), rec: rec.clone(), broker_url, memory: memory.clone(), http };
    let planned = match run.scenario {
        Scenario::Sse | Scenario::Waiters => run.plan.count.saturating_mul(run.plan.clients as u64),
        _ => run.plan.count,
    };
    let progress = (!quiet).then(|| progress(rec.clone(), planned));
    match run.scenario {
        Scenario::Create => scenario::create(&ctx).await,
        Scenario::Roundtrip | Scenario::Large => scenario::roundtrip(&ctx, false).await,
        Scenario::Fanout => scenario::roundtrip(&ctx, true).await,
        Scenario::Soak => scenario::soak(&ctx).await,
        Scenario::Sse => scenario::sse(&ctx).await,
        Scenario::Waiters => scenario::waiters(&ctx).await,
        Scenario::Expiry => scenario::expiry(&ctx).await,
    }
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    let mut summary = rec.summary(run.scenario.name(), serde_json::to_value(&run.plan)?);
    if let Some(memory) = memory {
        summary.memory = memory.finish();
    }
    drop(started);
    emit(&summary, out)
}

fn emit(summary: &Summary, out: Option<PathBuf>) -> anyhow::Result<()> {
    let line = serde_json::to_string(summary)?;
    println!("{line}");
    if let Some(path) = &out {
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
    if !summary.figures.is_empty() {
        eprintln!("  {}", serde_json::to_string(&summary.figures)?);
    }
    for (name, m) in &summary.memory {
        eprintln!("  {name}: rss {} → {} KiB, peak {} KiB", m.start_kib, m.end_kib, m.peak_kib);
    }
    Ok(())
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

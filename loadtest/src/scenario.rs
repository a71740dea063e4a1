//! The scenarios. Each is bounded by a count and a duration and stops by itself at whichever
//! comes first; every operation is recorded in the run's [`Recorder`].
//! - `create`: `clients` concurrent clients post tasks.
//! - `roundtrip` (and `large`, with big bodies): `clients` pipelines, each: create a task → the
//!   worker gets it (to-do long-poll or `new_task` stream) and puts a result → the creator gets
//!   it (long-poll or result stream). The latency is the whole round trip.
//! - `soak`: round trips started at a fixed rate (open loop), whatever the latency.
//! - `fanout`: round trips to every worker app; done when all have answered.
//! - `sse`: `clients` result streams on one task, `count` updates of its result; each stream
//!   must see every update. The updates are sent [`UPDATERS`] at a time. The latency is from the
//!   update's PUT to its arrival on a stream.
//! - `waiters`: `clients` long-polls on one task's results, woken by one result; `count` rounds.
//!   The latency is from the PUT to each waiter's answer.
//! - `expiry`: tasks with a short TTL, then how long the broker takes to give their memory back.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use photon::wire::app::RawBody;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::{
    client::{App, ClientKind, Failure},
    memory::Sampler,
    stats::Recorder,
};

/// How the worker and the creator learn of new things.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// `filter=todo` and result long-polls.
    #[value(name = "longpoll")]
    LongPoll,
    /// `new_task` and `new_result` Server-Sent Events.
    Sse,
}

/// The bounds and shape of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub clients: usize,
    /// Operations in all (tasks created, round trips, updates, rounds).
    pub count: u64,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Bytes of each task and result body.
    pub body_bytes: usize,
    pub via: Via,
    /// Each task's time to live, as API.md writes it.
    pub ttl: String,
    /// Round trips started per second (soak).
    pub rate: f64,
    /// Recipient apps per task (fanout).
    pub recipients: usize,
    /// The HTTP client of the apps' plain requests.
    pub client: ClientKind,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    /// A JSON string body of `body_bytes` bytes once serialized (quotes included).
    pub fn body(&self) -> Value {
        Value::String("x".repeat(self.body_bytes.saturating_sub(2)))
    }

    /// [`Plan::body`] as JSON text, written once: sending it again costs a copy, not a second
    /// pass of the JSON escaper (most of the client's time with large bodies).
    fn raw_body(&self) -> Arc<RawBody> {
        Arc::new(serde_json::value::to_raw_value(&self.body()).expect("strings serialize"))
    }

    /// Like [`Plan::body`], starting with `n` and a colon, so that a reader can tell updates apart.
    fn numbered_body(&self, n: u64) -> Value {
        let tag = format!("{n}:");
        Value::String(tag.clone() + &"x".repeat(self.body_bytes.saturating_sub(2 + tag.len())))
    }

    fn ttl(&self) -> Duration {
        photon::wire::parse_duration(&self.ttl, Duration::MAX).expect("validated")
    }
}

/// The number a [`Plan::numbered_body`] starts with.
fn number_of(body: Option<&Value>) -> Option<u64> {
    body?.as_str()?.split_once(':')?.0.parse().ok()
}

/// What a scenario works with.
pub struct Ctx {
    pub creator: Arc<App>,
    /// The first answers every scenario's tasks; fanout sends to all.
    pub workers: Vec<Arc<App>>,
    pub plan: Plan,
    pub rec: Arc<Recorder>,
    /// The broker's base URL when known: Photon's `/v1/health` counts the requests waiting there.
    pub broker_url: Option<String>,
    /// The network's processes when their ids are known.
    pub memory: Option<Arc<Sampler>>,
    pub http: reqwest::Client,
}

/// Hands out operation numbers until the count or the deadline is reached.
struct Budget {
    issued: AtomicU64,
    count: u64,
    deadline: Instant,
}

impl Budget {
    fn new(plan: &Plan) -> Self {
        Self { issued: AtomicU64::new(0), count: plan.count, deadline: Instant::now() + plan.duration }
    }

    fn take(&self) -> bool {
        Instant::now() < self.deadline && self.issued.fetch_add(1, Ordering::Relaxed) < self.count
    }
}

/// A long-poll's own limit; a round trip that takes longer counts as `timeout`.
const LONG_POLL: Duration = Duration::from_secs(30);

/// Runs one operation, at most [`LONG_POLL`], and records its latency or why it failed.
async fn timed(rec: &Recorder, op: impl std::future::Future<Output = Result<(), Failure>>) {
    timed_since(rec, Instant::now(), op).await;
}

/// [`timed`], with the latency counted from `started` (when the operation was due, for an
/// open-loop scenario: time spent waiting to start is part of what a user sees).
async fn timed_since(rec: &Recorder, started: Instant, op: impl std::future::Future<Output = Result<(), Failure>>) {
    match tokio::time::timeout(LONG_POLL, op).await {
        Ok(Ok(())) => rec.ok(started.elapsed()),
        Ok(Err(e)) => rec.error(e),
        Err(_) => rec.error("timeout"),
    }
}

/// Runs `op` on `clients` concurrent clients until the budget is spent, recording each.
async fn closed_loop<F, Fut>(clients: usize, budget: Arc<Budget>, rec: Arc<Recorder>, op: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Failure>> + Send,
{
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            let (budget, rec, op) = (budget.clone(), rec.clone(), op.clone());
            tokio::spawn(async move {
                while budget.take() {
                    timed(&rec, op()).await;
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
}

/// `create`: concurrent clients posting tasks from the creator to the worker.
pub async fn create(ctx: &Ctx) {
    let (creator, to, body, ttl) =
        (ctx.creator.clone(), ctx.workers[0].id.clone(), ctx.plan.raw_body(), ctx.plan.ttl.clone());
    let op = move || {
        let (creator, to, body, ttl) = (creator.clone(), to.clone(), body.clone(), ttl.clone());
        async move { creator.create(&to, &*body, &ttl).await.map(drop) }
    };
    closed_loop(ctx.plan.clients, Arc::new(Budget::new(&ctx.plan)), ctx.rec.clone(), op).await;
}

/// One round trip: create a task for `to`, wait until each has answered.
#[derive(Clone)]
struct Trip {
    creator: Arc<App>,
    to: Vec<photon::wire::AppId>,
    body: Arc<RawBody>,
    ttl: String,
    via: Via,
}

impl Trip {
    fn new(ctx: &Ctx, workers: &[Arc<App>]) -> Self {
        Self {
            creator: ctx.creator.clone(),
            to: workers.iter().map(|w| w.id.clone()).collect(),
            body: ctx.plan.raw_body(),
            ttl: ctx.plan.ttl.clone(),
            via: ctx.plan.via,
        }
    }

    async fn run(self) -> Result<(), Failure> {
        let id = self.creator.create_for(&self.to, &*self.body, &self.ttl).await?;
        match self.via {
            Via::LongPoll => self.creator.results(id, self.to.len(), LONG_POLL).await.map(drop),
            Via::Sse => self.creator.result_events(id, self.to.len()).await.map(drop),
        }
    }
}

/// `roundtrip` and `large`: pipelines of create → worker answers → creator reads the result.
/// `fanout`: the same, to every worker.
pub async fn roundtrip(ctx: &Ctx, fanout: bool) {
    let workers = if fanout { &ctx.workers[..] } else { &ctx.workers[..1] };
    let answering = Answering::start(workers, ctx);
    let trip = Trip::new(ctx, workers);
    closed_loop(ctx.plan.clients, Arc::new(Budget::new(&ctx.plan)), ctx.rec.clone(), move || trip.clone().run()).await;
    answering.stop().await;
}

/// `soak`: round trips started at `rate` per second for the run's duration (or count), each on
/// its own, so a slow answer does not slow the rate (no coordinated omission). More than
/// `clients × 100` (at least 10,000) in flight at once counts as `overload` instead.
pub async fn soak(ctx: &Ctx) {
    let answering = Answering::start(&ctx.workers[..1], ctx);
    let (trip, budget, rec) = (Trip::new(ctx, &ctx.workers[..1]), Budget::new(&ctx.plan), ctx.rec.clone());
    let in_flight = Arc::new(Semaphore::new((ctx.plan.clients * 100).max(10_000)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / ctx.plan.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut trips = tokio::task::JoinSet::new();
    loop {
        // When this round trip is due: a late tick (a busy machine, or catching up in a burst)
        // and the wait for the spawned task to run count in its latency.
        let due = tick.tick().await.into_std();
        if !budget.take() {
            break;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            rec.error("overload");
            continue;
        };
        let (trip, rec) = (trip.clone(), rec.clone());
        trips.spawn(async move {
            timed_since(&rec, due, trip.run()).await;
            drop(permit);
        });
        while trips.try_join_next().is_some() {}
    }
    while trips.join_next().await.is_some() {}
    answering.stop().await;
}

/// Worker apps answering every task addressed to them, once each, until stopped.
struct Answering {
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Answering {
    fn start(workers: &[Arc<App>], ctx: &Ctx) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let workers = workers
            .iter()
            .map(|w| tokio::spawn(work(w.clone(), ctx.plan.clone(), stopped.clone(), ctx.rec.clone())))
            .collect();
        Self { stop, workers }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for w in self.workers {
            let _ = w.await;
        }
    }
}

/// The worker: takes every task addressed to it and answers it once. Its own failures are
/// counted under `worker_<status>`; the creator's round trip then times out.
///
/// By long-poll it works like a Beam worker: it answers the batch it got (all at once), then
/// asks again. Asking while its answers are still on their way would only be handed the same
/// tasks again (`filter=todo` lists a task until the app's result is stored), which cost every
/// large round trip a second delivery of its body.
async fn work(worker: Arc<App>, plan: Plan, mut stop: tokio::sync::watch::Receiver<bool>, rec: Arc<Recorder>) {
    let body = plan.raw_body();
    // A long-poll can still hand out a task again (a failed answer, a slow one): answer each once.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let answer = |task: photon::wire::app::Task| {
        let (worker, body, rec, seen) = (worker.clone(), body.clone(), rec.clone(), seen.clone());
        if !seen.lock().insert(task.id) {
            return None;
        }
        Some(tokio::spawn(async move {
            if let Err(e) = worker.answer(&task, &*body).await {
                rec.error(format!("worker_{e}"));
                seen.lock().remove(&task.id);
            }
        }))
    };
    let mut stream = None;
    loop {
        let next = async {
            match plan.via {
                Via::LongPoll => worker.todo(Duration::from_secs(1)).await,
                Via::Sse => {
                    if stream.is_none() {
                        stream = Some(worker.todo_stream().await?);
                    }
                    let events = stream.as_mut().expect("just opened");
                    match events.next().await? {
                        Some(e) if e.event == "new_task" => {
                            serde_json::from_str(&e.data).map(|t| vec![t]).map_err(|_| "malformed".to_string())
                        }
                        Some(_) => Ok(vec![]),
                        // The stream is held open without a count: its end is trouble (or a
                        // proxy without new_task streams, such as Beam's), counted and paused
                        // on below rather than reopened at full speed.
                        None => Err("task_stream_ended".to_string()),
                    }
                }
            }
        };
        tokio::select! {
            got = next => match got {
                Ok(tasks) => {
                    let answers: Vec<_> = tasks.into_iter().filter_map(answer).collect();
                    if plan.via == Via::LongPoll {
                        tokio::select! {
                            _ = futures_util::future::join_all(answers) => {}
                            _ = stop.changed() => return,
                        }
                    }
                }
                Err(e) => {
                    rec.error(format!("worker_{e}"));
                    stream = None;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Opens at most this many connections at once while setting up streams or waiters, so that
/// the listen backlog never overflows.
const OPENING: usize = 256;
/// Updates in flight at once in `sse`: one closed-loop updater would measure its own PUT
/// latency times the streams, not how fast the streams are fed.
const UPDATERS: usize = 4;

/// `sse`: `clients` streams on one task's results; the worker updates its result `count` times,
/// one PUT after another. Every stream must see every update: the figures say how many were
/// delivered and lost, and (when the processes are known) each stream's memory.
pub async fn sse(ctx: &Ctx) {
    let (plan, rec, worker) = (&ctx.plan, &ctx.rec, ctx.workers[0].clone());
    let task = match ctx.creator.create(&worker.id, &plan.body(), &plan.ttl).await {
        Ok(id) => id,
        Err(e) => return rec.error(format!("create_{e}")),
    };
    let before = ctx.memory.as_ref().map(|m| m.now_all());
    let updates = plan.count.min(10_000_000) as usize;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..updates).map(|_| AtomicU64::new(0)).collect());
    let clock = Instant::now();
    let opening = Arc::new(Semaphore::new(OPENING));
    let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<bool>(plan.clients);
    // Once the updaters are done: how many updates were sent (a run cut short by its duration,
    // or a failed PUT, sends fewer than planned).
    let (done_tx, done) = tokio::sync::watch::channel(None::<usize>);
    let delivered = Arc::new(AtomicU64::new(0));
    // When the latest event was delivered (µs since `clock`): the work ends there, not after
    // the streams' final check that nothing more comes.
    let last_delivery = Arc::new(AtomicU64::new(0));
    // Open for the whole run and then some; the stream ends at this wait_time.
    let wait = format!("wait_time={}s", (plan.duration + Duration::from_secs(60)).as_secs());
    let (duplicates, reconnects) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let streams: Vec<_> = (0..plan.clients)
        .map(|_| {
            let (creator, rec, sent_at, opening, open_tx) =
                (ctx.creator.clone(), rec.clone(), sent_at.clone(), opening.clone(), open_tx.clone());
            let (mut done, delivered, duplicates, reconnects, wait) =
                (done.clone(), delivered.clone(), duplicates.clone(), reconnects.clone(), wait.clone());
            let last_delivery = last_delivery.clone();
            tokio::spawn(async move {
                let permit = opening.acquire().await;
                let mut events = match creator.result_stream(task, None, &wait).await {
                    Ok(events) => events,
                    Err(e) => {
                        rec.error(format!("open_{e}"));
                        let _ = open_tx.send(false).await;
                        return;
                    }
                };
                drop(permit);
                let _ = open_tx.send(true).await;
                let mut seen = vec![false; sent_at.len()];
                let (mut last_id, mut n_seen) = (None, 0);
                while n_seen < done.borrow().unwrap_or(seen.len()) {
                    let next = tokio::select! {
                        next = events.next() => next,
                        // Once the updates are all sent, a stream that falls silent has lost some.
                        _ = async { drop(done.wait_for(Option::is_some).await) } => {
                            if n_seen >= done.borrow().unwrap_or(seen.len()) {
                                break;
                            }
                            match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
                                Ok(next) => next,
                                Err(_) => break,
                            }
                        }
                    };
                    match next {
                        Ok(Some(event)) if event.event == "new_result" => {
                            let got = Instant::now();
                            last_id = event.id.or(last_id);
                            let result: Option<photon::wire::app::TaskResult> = serde_json::from_str(&event.data).ok();
                            let Some(n) = number_of(result.as_ref().and_then(|r| r.body.as_ref())) else {
                                rec.error("malformed");
                                continue;
                            };
                            let Some(slot) = seen.get_mut(n as usize) else { continue };
                            if std::mem::replace(slot, true) {
                                duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            n_seen += 1;
                            delivered.fetch_add(1, Ordering::Relaxed);
                            last_delivery.fetch_max(clock.elapsed().as_micros() as u64, Ordering::Relaxed);
                            let sent = Duration::from_micros(sent_at[n as usize].load(Ordering::Relaxed));
                            rec.ok((got - clock).saturating_sub(sent));
                        }
                        Ok(Some(_)) => {}
                        // The stream ended or broke: resume after the last event, as a client would
                        // (a little later, and not for ever).
                        Ok(None) | Err(_) => {
                            if reconnects.fetch_add(1, Ordering::Relaxed) > 10 * sent_at.len() as u64 {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            match creator.result_stream(task, last_id.as_deref(), &wait).await {
                                Ok(again) => events = again,
                                Err(e) => {
                                    rec.error(format!("reopen_{e}"));
                                    break;
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    drop(open_tx);
    let mut opened = 0;
    for _ in 0..plan.clients {
        opened += usize::from(open_rx.recv().await.unwrap_or(false));
    }
    // Every stream is open at its proxy; wait until the broker holds them too (when it says).
    settle(ctx, "streams", opened).await;
    if let (Some(memory), Some(before)) = (&ctx.memory, before) {
        let before: std::collections::BTreeMap<_, _> = before.into_iter().collect();
        for (name, after) in memory.now_all() {
            let Some(before) = before.get(&name) else { continue };
            let per_stream = after.saturating_sub(*before) as f64 / opened.max(1) as f64;
            rec.figure(&format!("stream_kib.{name}"), (per_stream * 10.0).round() / 10.0);
        }
    }
    rec.restart();
    let (started, next) = (Instant::now(), Arc::new(AtomicU64::new(0)));
    let updaters: Vec<_> = (0..UPDATERS)
        .map(|_| {
            let (worker, creator, rec, plan, sent_at, next) =
                (worker.clone(), ctx.creator.id.clone(), rec.clone(), plan.clone(), sent_at.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(sent) = sent_at.get(n as usize).filter(|_| started.elapsed() <= plan.duration) else {
                        return;
                    };
                    sent.store(clock.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if let Err(e) = worker.put_result(task, &creator, &plan.numbered_body(n)).await {
                        rec.error(format!("update_{e}"));
                        // Not sent: no stream can get it, and none has lost it.
                        sent.store(0, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for u in updaters {
        let _ = u.await;
    }
    let sent = sent_at.iter().filter(|s| s.load(Ordering::Relaxed) > 0).count() as u64;
    let _ = done_tx.send(Some(sent as usize));
    for s in streams {
        let _ = s.await;
    }
    let last = last_delivery.load(Ordering::Relaxed);
    if last > 0 {
        rec.stop_at(clock + Duration::from_micros(last));
    }
    let delivered = delivered.load(Ordering::Relaxed);
    rec.figure("streams", opened as u64);
    rec.figure("updates", sent);
    rec.figure("events_expected", sent * opened as u64);
    rec.figure("events_delivered", delivered);
    rec.figure("events_lost", (sent * opened as u64).saturating_sub(delivered));
    rec.figure("duplicates", duplicates.load(Ordering::Relaxed));
    rec.figure("reconnects", reconnects.load(Ordering::Relaxed));
}

/// Waits until health shows at least `n` of `what` (`waiters`, `streams`), for at most 30 s:
/// the creator's proxy's (a Photon proxy counts its apps' open reads), else the broker's when
/// known; where neither counts them, a fixed pause.
async fn settle(ctx: &Ctx, what: &str, n: usize) {
    let count = |url: String| async move {
        let health = ctx.http.get(format!("{url}/v1/health")).send().await.ok()?;
        health.json::<Value>().await.ok().and_then(|h| h[what].as_u64())
    };
    let proxy = ctx.creator.endpoint.url.clone();
    let source = match (count(proxy.clone()).await, &ctx.broker_url) {
        (Some(_), _) => proxy,
        // A broker that counts them (a Beam broker does not: then the pause below).
        (None, Some(broker)) if count(broker.clone()).await.is_some() => broker.clone(),
        _ => return tokio::time::sleep(Duration::from_millis(1_000 + n as u64)).await,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if count(source.clone()).await.is_some_and(|c| c >= n as u64) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.rec.error(format!("settle_{what}"));
}

/// `waiters`: per round, `clients` long-polls on one new task's results, then one result. Each
/// waiter's latency runs from the PUT to its answer; `woken_all_ms` lists each round's slowest.
///
/// One round runs first and is not recorded (`warmup_woken_all_ms`): on a fresh network its PUT
/// is the worker proxy's first message to the creator's, so it includes fetching and checking
/// that proxy's certificate and deriving their pairwise key, and every waiter's connection and
/// buffers are new. That is set-up, paid once per pair of proxies, not waking waiters.
pub async fn waiters(ctx: &Ctx) {
    let warmup = Arc::new(Recorder::new());
    let cold = wake_round(ctx, &warmup).await;
    for (what, n) in warmup.errors() {
        ctx.rec.errors_of(&format!("warmup_{what}"), n);
    }
    let budget = Budget::new(&ctx.plan);
    let mut rounds = Vec::new();
    ctx.rec.restart();
    while budget.take() {
        if let Some(slowest) = wake_round(ctx, &ctx.rec).await {
            rounds.push(round_ms(slowest));
        }
    }
    ctx.rec.figure("woken_all_ms", rounds);
    ctx.rec.figure("warmup_woken_all_ms", cold.map(round_ms));
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One `waiters` round, recorded in `rec`: the slowest waiter's latency, unless the task could
/// not be created.
async fn wake_round(ctx: &Ctx, rec: &Arc<Recorder>) -> Option<Duration> {
    let (plan, worker) = (&ctx.plan, &ctx.workers[0]);
    let task = match ctx.creator.create(&worker.id, &plan.body(), &plan.ttl).await {
        Ok(id) => id,
        Err(e) => {
            rec.error(format!("create_{e}"));
            return None;
        }
    };
    let opening = Arc::new(Semaphore::new(OPENING));
    let answered = Arc::new(Mutex::new(Vec::with_capacity(plan.clients)));
    let waiting: Vec<_> = (0..plan.clients)
        .map(|_| {
            let (creator, rec, opening, answered) =
                (ctx.creator.clone(), rec.clone(), opening.clone(), answered.clone());
            tokio::spawn(async move {
                let permit = opening.acquire().await;
                let asked = creator.first_result(task, LONG_POLL);
                drop(permit);
                match asked.await {
                    Ok(_) => answered.lock().push(Instant::now()),
                    Err(e) => rec.error(e),
                }
            })
        })
        .collect();
    settle(ctx, "waiters", plan.clients).await;
    let put = Instant::now();
    if let Err(e) = worker.put_result(task, &ctx.creator.id, &plan.body()).await {
        rec.error(format!("worker_{e}"));
    }
    for w in waiting {
        let _ = w.await;
    }
    let answered = std::mem::take(&mut *answered.lock());
    answered.iter().for_each(|at| rec.ok(at.saturating_duration_since(put)));
    // A round in which not every waiter was woken has no "all woken" time (its failures are
    // counted); recording the slowest of those who were would flatter it.
    if answered.len() < plan.clients {
        rec.error("round_incomplete");
        return None;
    }
    answered.iter().map(|at| at.saturating_duration_since(put)).max()
}

/// `expiry`: a warm-up batch of tasks (a tenth) expires, and the broker's memory then is the
/// baseline. Then `count` tasks with the plan's TTL; once the last has expired, the broker's
/// memory is sampled until it is back within 10 % (at least 1 MiB) of the baseline.
/// Needs the broker's process id.
pub async fn expiry(ctx: &Ctx) {
    let rec = &ctx.rec;
    let Some(memory) = ctx.memory.as_ref().filter(|m| m.now_kib("broker").is_some()) else {
        return rec.error("no_broker_pid");
    };
    let broker = || memory.now_kib("broker").unwrap_or(0);
    let ttl = ctx.plan.ttl();
    let batch = |count: u64, rec: Arc<Recorder>| Ctx {
        creator: ctx.creator.clone(),
        workers: ctx.workers.clone(),
        plan: Plan { count, ..ctx.plan.clone() },
        rec,
        broker_url: None,
        memory: None,
        http: ctx.http.clone(),
    };
    create(&batch((ctx.plan.count / 10).max(1), Arc::new(Recorder::new()))).await;
    tokio::time::sleep(ttl + Duration::from_secs(2)).await;
    let baseline = broker();
    rec.restart();
    create(&batch(ctx.plan.count, rec.clone())).await;
    let loaded = broker();
    let expired_at = Instant::now() + ttl;
    tokio::time::sleep(ttl).await;
    let threshold = baseline + (baseline / 10).max(1024);
    let mut back_after = None;
    let mut at_2s = None;
    while expired_at.elapsed() < Duration::from_secs(30) {
        let now = broker();
        if at_2s.is_none() && expired_at.elapsed() >= Duration::from_secs(2) {
            at_2s = Some(now);
        }
        if back_after.is_none() && now <= threshold {
            back_after = Some((expired_at.elapsed().as_secs_f64() * 1e3).round() / 1e3);
        }
        if back_after.is_some() && at_2s.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rec.figure("tasks", rec.n_ok());
    rec.figure("baseline_kib", baseline);
    rec.figure("loaded_kib", loaded);
    let after = at_2s.unwrap_or_else(broker);
    rec.figure("after_2s_kib", after);
    // How much of what the load added was given back 2 s after the expiry.
    let added = loaded.saturating_sub(baseline).max(1) as f64;
    rec.figure("returned_pct", ((loaded.saturating_sub(after) as f64 / added) * 1000.0).round() / 10.0);
    rec.figure("threshold_kib", threshold);
    rec.figure("back_after_s", back_after);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(count: u64, duration: Duration) -> Plan {
        Plan {
            clients: 1,
            count,
            duration,
            body_bytes: 100,
            via: Via::LongPoll,
            ttl: "5m".into(),
            rate: 1.0,
            recipients: 1,
            client: ClientKind::Lean,
        }
    }

    #[test]
    fn the_budget_stops_at_the_count_or_the_deadline() {
        let b = Budget::new(&plan(3, Duration::from_secs(60)));
        assert_eq!((0..10).filter(|_| b.take()).count(), 3);
        let b = Budget::new(&plan(1_000, Duration::ZERO));
        assert!(!b.take());
    }

    #[test]
    fn bodies_have_the_planned_size_and_numbers() {
        let p = plan(1, Duration::ZERO);
        assert_eq!(serde_json::to_vec(&p.body()).unwrap().len(), 100);
        let numbered = p.numbered_body(4711);
        assert_eq!(serde_json::to_vec(&numbered).unwrap().len(), 100);
        assert_eq!(number_of(Some(&numbered)), Some(4711));
        assert_eq!(number_of(Some(&p.body())), None);
        assert_eq!(number_of(None), None);
    }
}

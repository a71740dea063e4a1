//! The scenarios. Each is bounded by a count and a duration and stops by itself at whichever
//! comes first; every operation is recorded in the run's [`Recorder`].
//! - `create`: `clients` concurrent clients post tasks.
//! - `roundtrip`: `clients` pipelines, each: create a task → the worker gets it (to-do long-poll
//!   or `new_task` stream) and puts a result → the creator gets it (long-poll or result stream).
//!   The latency is the whole round trip.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use serde_json::Value;

use crate::{client::App, stats::Recorder};

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
    /// Operations in all (tasks created, round trips).
    pub count: u64,
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Bytes of each task and result body.
    pub body_bytes: usize,
    pub via: Via,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    /// A JSON string body of `body_bytes` bytes once serialized (quotes included).
    pub fn body(&self) -> Value {
        Value::String("x".repeat(self.body_bytes.saturating_sub(2)))
    }
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

const TTL: &str = "5m";
/// A long-poll's own limit; a round trip that takes longer counts as `timeout`.
const LONG_POLL: Duration = Duration::from_secs(30);

/// `create`: concurrent clients posting tasks from the creator to the worker.
pub async fn create(creator: Arc<App>, worker: &App, plan: &Plan, rec: Arc<Recorder>) {
    let budget = Arc::new(Budget::new(plan));
    let (to, body) = (worker.id.clone(), plan.body());
    let clients: Vec<_> = (0..plan.clients)
        .map(|_| {
            let (creator, budget, rec, to, body) =
                (creator.clone(), budget.clone(), rec.clone(), to.clone(), body.clone());
            tokio::spawn(async move {
                while budget.take() {
                    let started = Instant::now();
                    match creator.create(&to, &body, TTL).await {
                        Ok(_) => rec.ok(started.elapsed()),
                        Err(e) => rec.error(e),
                    }
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
}

/// `roundtrip`: pipelines of create → worker answers → creator reads the result.
pub async fn roundtrip(creator: Arc<App>, worker: Arc<App>, plan: &Plan, rec: Arc<Recorder>) {
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let answering = tokio::spawn(work(worker.clone(), plan.clone(), stop, rec.clone()));
    let budget = Arc::new(Budget::new(plan));
    let pipelines: Vec<_> = (0..plan.clients)
        .map(|_| {
            let (creator, budget, rec, to) = (creator.clone(), budget.clone(), rec.clone(), worker.id.clone());
            let (body, via) = (plan.body(), plan.via);
            tokio::spawn(async move {
                while budget.take() {
                    let started = Instant::now();
                    let trip = async {
                        let id = creator.create(&to, &body, TTL).await?;
                        match via {
                            Via::LongPoll => creator.first_result(id, LONG_POLL).await,
                            Via::Sse => creator.first_result_event(id).await,
                        }
                    };
                    match tokio::time::timeout(LONG_POLL, trip).await {
                        Ok(Ok(_)) => rec.ok(started.elapsed()),
                        Ok(Err(e)) => rec.error(e),
                        Err(_) => rec.error("timeout"),
                    }
                }
            })
        })
        .collect();
    for p in pipelines {
        let _ = p.await;
    }
    let _ = stop_tx.send(true);
    let _ = answering.await;
}

/// The worker: takes every task addressed to it and answers it once. Its own failures are
/// counted under `worker_<status>`; the creator's round trip then times out.
async fn work(worker: Arc<App>, plan: Plan, mut stop: tokio::sync::watch::Receiver<bool>, rec: Arc<Recorder>) {
    let body = plan.body();
    // Long-polls can hand out a task again until its answer is stored: answer each once.
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let answer = |task: photon::wire::app::Task| {
        let (worker, body, rec, seen) = (worker.clone(), body.clone(), rec.clone(), seen.clone());
        if !seen.lock().insert(task.id) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = worker.answer(&task, &body).await {
                rec.error(format!("worker_{e}"));
                seen.lock().remove(&task.id);
            }
        });
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
                        Some((event, data)) if event == "new_task" => {
                            serde_json::from_str(&data).map(|t| vec![t]).map_err(|_| "malformed".to_string())
                        }
                        Some(_) => Ok(vec![]),
                        None => {
                            stream = None;
                            Ok(vec![])
                        }
                    }
                }
            }
        };
        tokio::select! {
            got = next => match got {
                Ok(tasks) => tasks.into_iter().for_each(answer),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(count: u64, duration: Duration) -> Plan {
        Plan { clients: 1, count, duration, body_bytes: 100, via: Via::LongPoll }
    }

    #[test]
    fn the_budget_stops_at_the_count_or_the_deadline() {
        let b = Budget::new(&plan(3, Duration::from_secs(60)));
        assert_eq!((0..10).filter(|_| b.take()).count(), 3);
        let b = Budget::new(&plan(1_000, Duration::ZERO));
        assert!(!b.take());
    }

    #[test]
    fn bodies_have_the_planned_size() {
        assert_eq!(serde_json::to_vec(&plan(1, Duration::ZERO).body()).unwrap().len(), 100);
    }
}

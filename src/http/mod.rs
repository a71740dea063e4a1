//! The broker's HTTP API, spoken only by proxies (plus health for operators). The route table
//! is [`routes`]; handlers are thin: authenticate, parse, one engine call, map the error.
//!
//! Every task endpoint requires a proxy session (see `crypto::session`) and names the app the
//! proxy acts for in `x-photon-app`; the broker checks the proxy may sign for that app.

pub mod body;
pub mod error;
mod ops;
mod stream;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{
    http::{header, Method, StatusCode},
    web, HttpRequest, HttpResponse,
};
use bytes::Bytes;

pub use body::parse_task_id;
pub use error::ApiError;

use crate::{
    actors::{
        engine::{Listing, Wait},
        mailbox::ListFilter,
        task::PutOutcome,
        Engine,
    },
    config::Secret,
    crypto::{
        directory::CertDirectory,
        session::{self, AuthError, BodyDigest, SessionStore, EMPTY_BODY},
    },
    ops::{metrics::LevelGuard, requests::Observer, Level, Shutdown},
    presence::Presence,
    wire::{
        broker::{self as bw, SessionHello, WireResult, WireTask},
        may_sign_for, to_json, AppId, BodySize, ProxyId, ReadQuery,
    },
};

/// What every broker handler shares.
pub struct BrokerState {
    pub engine: Engine,
    pub sessions: SessionStore,
    pub certs: CertDirectory,
    /// Largest request body accepted (sealed bodies are larger than the apps' plaintext).
    pub max_body: usize,
    /// Interval of keep-alive lines on idle streams and of control-connection heartbeats.
    pub keepalive: Duration,
    /// Which proxies hold a control connection now.
    pub presence: Arc<Presence>,
    /// Metrics and traffic totals (also used by the request middleware).
    pub observer: Arc<Observer>,
    /// Long-polls waiting now.
    pub waiters: Arc<Level>,
    /// Event streams open now (control connections not included).
    pub streams: Arc<Level>,
    pub shutdown: Shutdown,
    /// Password of the monitoring endpoints.
    pub monitoring_key: Option<Secret>,
    /// When the broker's own certificate ends (Unix seconds).
    pub cert_not_after: i64,
    pub started: Instant,
}

impl BrokerState {
    /// Counts one waiting long-poll while the guard lives (nothing for answers given at once).
    fn waiting(&self, wait: &Wait) -> Option<LevelGuard> {
        (!wait.is_none()).then(|| self.waiters.hold())
    }
}

type State = web::Data<Arc<BrokerState>>;

pub fn routes(cfg: &mut web::ServiceConfig) {
    // Task routes first, in their own scope: they are nearly every request, and actix-router
    // tries each dynamic pattern in turn with a regex, so task requests skip the others, and
    // the most frequent pattern (results) is tried first.
    cfg.service(
        web::scope("/v1/tasks")
            .route("", on(Method::POST).to(create_task))
            .route("", on(Method::GET).to(list_tasks))
            .route("/{id}/results", on(Method::GET).to(get_results))
            .route("/{id}/results/{app_id}", on(Method::PUT).to(put_result))
            .route("/{id}/results/{app_id}/sealed", on(Method::GET).to(get_detached_result))
            .route("/{id}/sealed", on(Method::GET).to(get_detached_task))
            .route("/{id}", on(Method::GET).to(get_task)),
    )
    .route(bw::BATCH_PATH, on(Method::POST).to(batch))
    .route("/v1/health", on(Method::GET).to(ops::health))
    .route("/v1/health", on(Method::HEAD).to(ops::health))
    .route("/v1/health/proxies", on(Method::GET).to(ops::proxies))
    .route("/v1/health/proxies/{proxy_id}", on(Method::GET).to(ops::proxy))
    .route("/v1/control", on(Method::GET).to(ops::control))
    .route("/v1/control", on(Method::DELETE).to(ops::leave))
    .route("/v1/session", on(Method::POST).to(open_session))
    .route("/v1/certs/{proxy_id}", on(Method::GET).to(get_cert))
    .route("/v1/crl", on(Method::GET).to(get_crl))
    .default_service(web::to(no_such_endpoint));
}

/// A route for requests of one method (broker and proxy). actix's own method guards
/// (`web::get()`, ...) note every method they are tried against in the request's extensions,
/// for the `Allow` header of a 405: an allocation and a map per request, 2–3 % of the proxy's
/// CPU when it answers 1,000 waiters at once. These APIs never answer 405 (a method a path
/// does not take is 404, `no_such_endpoint`), so this guard only compares.
pub fn on(method: Method) -> actix_web::Route {
    web::route().guard(actix_web::guard::fn_guard(move |ctx| ctx.head().method == method))
}

/// The answer to any path the API does not have (broker and proxy).
pub async fn no_such_endpoint() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint".into()))
}

/// Checks a request's session MAC (`app_text` as signed, `body` the body's digest) and that the
/// sending instance is the one online for its proxy; returns the proxy. Refusals are counted by
/// reason.
fn verify_request(
    state: &BrokerState,
    req: &HttpRequest,
    app_text: &str,
    body: &BodyDigest,
) -> Result<ProxyId, ApiError> {
    let verified = (|| {
        let (session, seq, ts) = signed_headers(req)?;
        let mac = header_text(req, bw::MAC_HEADER).ok_or(AuthError::Header(bw::MAC_HEADER))?;
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        state.sessions.verify(session, seq, ts, mac, req.method().as_str(), path, app_text, body)
    })()
    .map_err(|e| refused(state, e))?;
    state.presence.check(&verified, ops::instance_of(req)).map_err(|e| {
        state.observer.metrics.count("proxies.duplicate", 1, &[]);
        ApiError::Duplicate(e.to_string())
    })?;
    Ok(verified)
}

/// A signed request's session, sequence number and timestamp headers.
fn signed_headers(req: &HttpRequest) -> Result<(&str, u64, u64), AuthError> {
    let h = |name: &'static str| header_text(req, name).ok_or(AuthError::Header(name));
    let seq = h(bw::SEQ_HEADER)?.parse().map_err(|_| AuthError::Header(bw::SEQ_HEADER))?;
    let ts = h(bw::TS_HEADER)?.parse().map_err(|_| AuthError::Header(bw::TS_HEADER))?;
    Ok((h(bw::SESSION_HEADER)?, seq, ts))
}

/// Refuses, before its body is read, an upload whose session, timestamp or sequence number
/// can't pass [`verify_request`] (see `SessionStore::precheck`). The body of a refused one is
/// read and dropped (`body::discard`): nothing is kept, hashed or parsed, and a proxy still
/// sending a large one reads the `401` (and renews its session) instead of a broken
/// connection. Returns the payload of an upload that may go on.
async fn precheck_upload(
    state: &BrokerState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<web::Payload, ApiError> {
    let checked = signed_headers(req).and_then(|(session, seq, ts)| state.sessions.precheck(session, seq, ts));
    match checked {
        Ok(()) => Ok(payload),
        Err(e) => {
            body::discard(req, payload, state.max_body).await;
            Err(refused(state, e))
        }
    }
}

fn header_text<'r>(req: &'r HttpRequest, name: &str) -> Option<&'r str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Counts and logs an authentication refusal.
fn refused(state: &BrokerState, e: AuthError) -> ApiError {
    state.observer.metrics.count("requests.refused", 1, &[("reason", e.reason())]);
    tracing::debug!(reason = e.reason(), error = %e, "refused a request's authentication");
    ApiError::from(e)
}

/// The app a request acts for, after the proxy's session and right to act for it are checked.
fn authenticate(state: &BrokerState, req: &HttpRequest, body: &BodyDigest) -> Result<AppId, ApiError> {
    let app_text = header_text(req, bw::APP_HEADER).ok_or_else(|| refused(state, AuthError::Header(bw::APP_HEADER)))?;
    let proxy = verify_request(state, req, app_text, body)?;
    let app = AppId::parse(app_text).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    may_act_for(state, &proxy, &app)?;
    Ok(app)
}

/// `403` (counted as `not_signer`) unless `proxy` may act for `app` (the label boundary).
fn may_act_for(state: &BrokerState, proxy: &ProxyId, app: &AppId) -> Result<(), ApiError> {
    if may_sign_for(proxy.as_str(), app.as_str()) {
        return Ok(());
    }
    state.observer.metrics.count("requests.refused", 1, &[("reason", "not_signer")]);
    Err(ApiError::Forbidden(format!("proxy {proxy} may not act for {app}")))
}

/// A request a proxy makes as itself (its control connection, its upload batches):
/// `x-photon-app` is its own id. `body` is the body's digest.
fn authenticate_proxy(state: &BrokerState, req: &HttpRequest, body: &BodyDigest) -> Result<ProxyId, ApiError> {
    let claimed = header_text(req, bw::APP_HEADER).ok_or_else(|| refused(state, AuthError::Header(bw::APP_HEADER)))?;
    let proxy = verify_request(state, req, claimed, body)?;
    if proxy.as_str() != claimed {
        return Err(ApiError::Forbidden(format!("proxy {proxy} may not act as {claimed}")));
    }
    Ok(proxy)
}

/// A JSON answer, written into a buffer sized once for the bodies in it (`wire::to_json`); a
/// large one goes to actix in slices ([`body::Sliced`]). Broker and proxy answer every JSON
/// message through it.
pub fn json_answer<T: serde::Serialize + BodySize + ?Sized>(status: StatusCode, message: &T) -> HttpResponse {
    let json = to_json(message);
    let mut answer = HttpResponse::build(status);
    answer.content_type("application/json");
    if json.len() > body::SLICE {
        answer.body(body::Sliced(json))
    } else {
        answer.body(json)
    }
}

fn json_listing<T: serde::Serialize + BodySize>(listing: Listing<T>) -> HttpResponse {
    json_answer(if listing.partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK }, &listing.items)
}

async fn open_session(state: State, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = body::read_limited(&req, payload, 64 * 1024).await?;
    let hello: SessionHello = body::parse_json(&body)?;
    let (accept, cert) = state
        .sessions
        .accept(&hello, |cert| state.certs.is_revoked(cert))
        .map_err(|e| ApiError::Unauthorized(format!("handshake refused: {e}")))?;
    tracing::info!(proxy = %accept.proxy_id, "proxy session opened");
    state.certs.learn(accept.proxy_id.clone(), cert);
    Ok(HttpResponse::Ok().json(accept))
}

async fn get_cert(state: State, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let proxy = ProxyId::parse(&path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let cert =
        state.certs.get(&proxy).ok_or_else(|| ApiError::NotFound(format!("no valid certificate for {proxy}")))?;
    Ok(HttpResponse::Ok().content_type("application/x-pem-file").body(cert.pem.to_string()))
}

/// The root-signed revocation list, relayed as the CA wrote it (proxies verify it).
async fn get_crl(state: State) -> Result<HttpResponse, ApiError> {
    let crl = state.certs.crl().ok_or_else(|| ApiError::NotFound("no revocation list; run `ca revoke`".into()))?;
    Ok(HttpResponse::Ok().content_type("application/pkix-crl").body(crl.pem.to_string()))
}

/// 424 for the recipients in this federation whose proxy has no valid certificate.
fn check_recipients(state: &BrokerState, to: &[AppId]) -> Result<(), ApiError> {
    let broker_id = &state.engine.limits().broker_id;
    let proxies: Vec<ProxyId> = to.iter().filter(|a| a.within(broker_id).is_ok()).map(AppId::proxy_id).collect();
    let missing = state.certs.missing(&proxies);
    if !missing.is_empty() {
        return Err(ApiError::MissingCerts(missing));
    }
    Ok(())
}

/// A task or result upload's digest and message: plain JSON, or detached (`bw::Detached`), its
/// JSON parsed and the upload kept whole in `detached`.
async fn read_upload<T: serde::de::DeserializeOwned>(
    state: &BrokerState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<(BodyDigest, Result<(T, Option<Bytes>), ApiError>), ApiError> {
    let payload = precheck_upload(state, req, payload).await?;
    let detached = req.query_string() == bw::DETACHED_QUERY;
    // A detached upload is kept as it was read: sized by its Content-Length, its buffer is
    // exactly as large (a body without one is read into a buffer grown by doubling).
    if detached && !req.headers().contains_key(header::CONTENT_LENGTH) {
        body::discard(req, payload, state.max_body).await;
        return Err(ApiError::BadRequest("a detached upload needs a Content-Length".into()));
    }
    if !detached {
        let body = body::read_limited(req, payload, state.max_body).await?;
        let (digest, message) = body::digest_beside(&body, body::parse_json::<T>).await;
        return Ok((digest, message.map(|m| (m, None))));
    }
    // Refused before its MAC is checked (its sequence number stays unspent): without the
    // newline there is no JSON and ciphertext for the MAC's digest to cover.
    let (upload, Some((json_len, ct_digest))) = body::read_detached(req, payload, state.max_body).await? else {
        return Err(ApiError::BadRequest("a detached upload is its JSON, a newline, then the ciphertext".into()));
    };
    let json = &upload[..json_len];
    let digest = session::detached_digest(json, &ct_digest);
    let message = body::parse_json::<T>(json);
    Ok((digest, message.map(|m| (m, Some(upload)))))
}

async fn create_task(state: State, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let (digest, task) = read_upload::<WireTask>(&state, &req, payload).await?;
    let caller = authenticate(&state, &req, &digest)?;
    let (mut task, detached) = task?;
    task.detached = detached;
    let id = store_task(&state, &caller, task).await?;
    Ok(HttpResponse::Created().insert_header((header::LOCATION, format!("/v1/tasks/{id}"))).finish())
}

/// Stores a task `caller` (authenticated) sends.
async fn store_task(state: &BrokerState, caller: &AppId, task: WireTask) -> Result<uuid::Uuid, ApiError> {
    if &task.from != caller {
        return Err(ApiError::Forbidden(format!("from is {}, but the caller is {caller}", task.from)));
    }
    check_recipients(state, &task.to)?;
    let id = state.engine.create(caller, task).await?;
    state.observer.metrics.count("tasks.created", 1, &[]);
    Ok(id)
}

/// Stores a result `caller` (authenticated) sends.
async fn store_result(state: &BrokerState, caller: &AppId, result: WireResult) -> Result<PutOutcome, ApiError> {
    check_recipients(state, &result.to)?;
    let outcome = state.engine.put_result(caller, result).await?;
    let tag = match outcome {
        PutOutcome::Created => "created",
        PutOutcome::Replaced => "replaced",
        PutOutcome::Ignored => "ignored",
    };
    state.observer.metrics.count("results.stored", 1, &[("outcome", tag)]);
    Ok(outcome)
}

/// `POST /v1/batch`: a proxy's task creations and result puts in one signed request (see
/// [`bw::BATCH_PATH`]). The batch is authenticated as the proxy; each upload is checked as its
/// own request would be (the proxy may act for its `from`, recipients have certificates, ...)
/// and stored or refused on its own. They are stored in order: a task comes before a later
/// upload of the same batch sees it.
async fn batch(state: State, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let payload = precheck_upload(&state, &req, payload).await?;
    let body = body::read_limited(&req, payload, state.max_body).await?;
    let (digest, uploads) = body::digest_beside(&body, body::parse_json::<Vec<bw::Upload>>).await;
    let proxy = authenticate_proxy(&state, &req, &digest)?;
    let uploads = uploads?;
    if uploads.len() > bw::MAX_BATCH {
        return Err(ApiError::BadRequest(format!("a batch carries at most {} uploads", bw::MAX_BATCH)));
    }
    state.observer.metrics.count("batches", 1, &[]);
    // Polled in order: each task is stored during the first poll, before any later upload
    // looks for it; result puts then wait for their task actors side by side.
    let outcomes = futures_util::future::join_all(uploads.into_iter().map(|upload| async {
        match store_upload(&state, &proxy, upload).await {
            Ok(status) => bw::Outcome { status: status.as_u16(), error: None },
            Err(e) => bw::Outcome {
                status: actix_web::ResponseError::status_code(&e).as_u16(),
                error: String::from_utf8(e.json_body().to_vec())
                    .ok()
                    .and_then(|text| serde_json::value::RawValue::from_string(text).ok()),
            },
        }
    }))
    .await;
    Ok(HttpResponse::Ok().json(outcomes))
}

/// One upload of `proxy`'s batch, checked and stored as its own request would be; the status
/// that request would have answered.
async fn store_upload(state: &BrokerState, proxy: &ProxyId, upload: bw::Upload) -> Result<StatusCode, ApiError> {
    match upload {
        bw::Upload::Task(task) => {
            let caller = task.from.clone();
            may_act_for(state, proxy, &caller)?;
            store_task(state, &caller, task).await.map(|_| StatusCode::CREATED)
        }
        bw::Upload::Result(result) => {
            let caller = result.from.clone();
            may_act_for(state, proxy, &caller)?;
            Ok(match store_result(state, &caller, result).await? {
                PutOutcome::Created => StatusCode::CREATED,
                PutOutcome::Replaced | PutOutcome::Ignored => StatusCode::NO_CONTENT,
            })
        }
    }
}

async fn list_tasks(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&state, &req, &EMPTY_BODY)?;
    let q: ReadQuery = body::parse_query(&req)?;
    if q.filter.is_some() && !q.todo() {
        return Err(ApiError::BadRequest("filter must be \"todo\" if given".into()));
    }
    for (name, given) in [("from", &q.from), ("to", &q.to)] {
        if given.as_ref().is_some_and(|id| id != &caller) {
            return Err(ApiError::Forbidden(format!("{name} must be the caller ({caller})")));
        }
    }
    if q.from.is_none() && q.to.is_none() && !q.todo() {
        return Err(ApiError::BadRequest("give from or to (or filter=todo)".into()));
    }
    let filter = ListFilter { todo: q.todo(), from: q.from.clone(), to: q.to.clone() };
    let wait = body::parse_wait(&q, state.engine.limits().max_wait)?;
    if q.stream.is_some() {
        if !q.todo() {
            return Err(ApiError::BadRequest("task streams need filter=todo".into()));
        }
        let last = body::last_event_id(&req, &q)?;
        return Ok(stream::tasks(&state, &caller, wait, last));
    }
    let _waiting = state.waiting(&wait);
    Ok(json_listing(state.engine.list(&caller, filter, wait).await?))
}

async fn get_task(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&state, &req, &EMPTY_BODY)?;
    let id = parse_task_id(&path)?;
    let q: ReadQuery = body::parse_query(&req)?;
    if q.wait_count.is_some_and(|c| c != 1) {
        return Err(ApiError::BadRequest("wait_count must be absent or 1 for a single task".into()));
    }
    let wait = body::parse_wait(&q, state.engine.limits().max_wait)?;
    let _waiting = state.waiting(&wait);
    Ok(json_answer(StatusCode::OK, &state.engine.get(&caller, id, wait).await?))
}

async fn put_result(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (digest, result) = read_upload::<WireResult>(&state, &req, payload).await?;
    let caller = authenticate(&state, &req, &digest)?;
    let (task_text, app_text) = path.into_inner();
    let id = parse_task_id(&task_text)?;
    let (mut result, detached) = result?;
    result.detached = detached;
    if result.task != id || result.from.as_str() != app_text {
        return Err(ApiError::BadRequest(
            "the task id and app id in the path must match the result's task and from".into(),
        ));
    }
    Ok(match store_result(&state, &caller, result).await? {
        PutOutcome::Created => HttpResponse::Created().finish(),
        PutOutcome::Replaced | PutOutcome::Ignored => HttpResponse::NoContent().finish(),
    })
}

async fn get_results(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&state, &req, &EMPTY_BODY)?;
    let id = parse_task_id(&path)?;
    let q: ReadQuery = body::parse_query(&req)?;
    let wait = body::parse_wait(&q, state.engine.limits().max_wait)?;
    if q.stream.is_some() {
        let last = body::last_event_id(&req, &q)?;
        return stream::results(&state, &caller, id, wait, last).await;
    }
    let _waiting = state.waiting(&wait);
    Ok(json_listing(state.engine.read_results(&caller, id, wait).await?))
}

/// A detached upload as an answer (`application/octet-stream`, in slices).
fn detached_answer(upload: Option<Bytes>, what: &str) -> Result<HttpResponse, ApiError> {
    let upload = upload.ok_or_else(|| ApiError::NotFound(format!("the {what} has no detached body")))?;
    Ok(HttpResponse::Ok().content_type("application/octet-stream").body(body::Sliced(upload)))
}

/// `GET /v1/tasks/{id}/sealed`: the task's detached upload, for whoever may read the task.
async fn get_detached_task(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&state, &req, &EMPTY_BODY)?;
    let id = parse_task_id(&path)?;
    let task = state.engine.get(&caller, id, Wait::default()).await?;
    detached_answer(task.detached, "task")
}

/// `GET /v1/tasks/{id}/results/{app}/sealed`: the detached upload of `app`'s result as it is
/// now (a replaced result's newer one), for whoever may read the task's results.
async fn get_detached_result(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let caller = authenticate(&state, &req, &EMPTY_BODY)?;
    let (task_text, app_text) = path.into_inner();
    let id = parse_task_id(&task_text)?;
    let results = state.engine.read_results(&caller, id, Wait::default()).await?;
    let result = results.items.into_iter().find(|r| r.from.as_str() == app_text);
    detached_answer(result.and_then(|r| r.detached.clone()), "result")
}

//! The broker's operator endpoints: health, the monitoring endpoints behind
//! `MONITORING_API_KEY`, and the control connection each proxy holds open to show it is online.

use std::time::Duration;

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::{authenticate_proxy, stream, ApiError, State};
use crate::{
    crypto::{session::EMPTY_BODY, unix_millis},
    wire::{
        broker::{ControlEvent, INSTANCE_HEADER},
        ProxyId,
    },
};

/// `GET`/`HEAD /v1/health`: 200 `healthy` with a summary; 503 `unhealthy` with the reason while
/// shutting down or once the broker's own certificate has expired.
pub(super) async fn health(state: State) -> HttpResponse {
    let problem = if state.shutdown.is_started() {
        Some("shutting down".to_owned())
    } else if (unix_millis() / 1000) as i64 > state.cert_not_after {
        Some("the broker's certificate has expired; renew broker.crt".to_owned())
    } else {
        None
    };
    let mut summary = serde_json::json!({
        "summary": if problem.is_some() { "unhealthy" } else { "healthy" },
        "tasks": state.engine.n_tasks(),
        "proxies_online": state.presence.n_online(),
        "waiters": state.waiters.get(),
        "streams": state.streams.get(),
        "uptime_s": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    match problem {
        None => HttpResponse::Ok().json(summary),
        Some(error) => {
            summary["error"] = error.into();
            HttpResponse::ServiceUnavailable().json(summary)
        }
    }
}

/// Basic auth with an empty user and the monitoring key as password: 501 without a configured
/// key, 401 (with a Basic challenge) for a missing or wrong one.
fn check_monitoring_key(state: &State, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(key) = &state.monitoring_key else {
        return Err(ApiError::NotImplemented("monitoring is off: set MONITORING_API_KEY on the broker".into()));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok());
    let password = given.as_deref().and_then(|userpass| userpass.strip_prefix(':'));
    // Digests so the comparison takes the same time whatever the lengths.
    let ok = password.is_some_and(|p| bool::from(Sha256::digest(p).ct_eq(&Sha256::digest(&key.0))));
    if ok {
        Ok(())
    } else {
        Err(ApiError::MonitoringAuth)
    }
}

/// `GET /v1/health/proxies`: the proxies connected now.
pub(super) async fn proxies(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check_monitoring_key(&state, &req)?;
    Ok(HttpResponse::Ok().json(state.presence.online()))
}

/// `GET /v1/health/proxies/<id>`: 200 connected, 503 with `last_disconnect` known but gone, 404
/// never seen.
pub(super) async fn proxy(state: State, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    check_monitoring_key(&state, &req)?;
    let proxy = ProxyId::parse(&path).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let status = state.presence.status(&proxy).ok_or_else(|| ApiError::NotFound(format!("{proxy} was never seen")))?;
    Ok(if status.online { HttpResponse::Ok().json(status) } else { HttpResponse::ServiceUnavailable().json(status) })
}

/// `GET /v1/control`: a proxy's control connection. Authenticated like every proxy request
/// (acting as itself); held open with a heartbeat line every `KEEPALIVE`. A second instance of a
/// proxy that is online is refused with 409 and counted; the first is left alone. Ends with a
/// `bye` line on shutdown, revocation, or when the same instance reconnects.
pub(super) async fn control(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let proxy = authenticate_proxy(&state, &req, &EMPTY_BODY)?;
    let instance = instance_of(&req).unwrap_or_default();
    if instance.is_empty() {
        return Err(ApiError::BadRequest(format!("the control connection needs the {INSTANCE_HEADER} header")));
    }
    let mut conn = state.presence.connect(&proxy, instance).map_err(|e| {
        state.observer.metrics.count("proxies.duplicate", 1, &[]);
        tracing::warn!(proxy = %proxy, error = %e, "refused a second instance of a proxy");
        ApiError::Duplicate(e.to_string())
    })?;
    tracing::info!(proxy = %proxy, "proxy online");
    let heartbeat = state.keepalive;
    let max_wait_ms = state.engine.limits().max_wait.as_millis() as u64;
    let shutdown = state.shutdown.clone();
    let (out, rx) = mpsc::channel::<Bytes>(4);
    actix_web::rt::spawn(async move {
        let welcome =
            ControlEvent::Welcome { heartbeat_ms: heartbeat.as_millis() as u64, max_wait_ms: Some(max_wait_ms) };
        if out.send(stream::json_line(&welcome)).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        let reason = loop {
            tokio::select! {
                _ = tick.tick() => {
                    if out.send(stream::json_line(&ControlEvent::Heartbeat)).await.is_err() {
                        return; // the proxy went away; dropping `conn` marks it offline
                    }
                }
                why = &mut conn.kicked => break why.unwrap_or("ended"),
                _ = shutdown.started() => break "the broker is shutting down",
                _ = out.closed() => return,
            }
        };
        let bye = ControlEvent::Bye { reason: reason.to_owned() };
        let _ = tokio::time::timeout(Duration::from_secs(1), out.send(stream::json_line(&bye))).await;
        drop(conn);
    });
    Ok(stream::respond(rx))
}

/// `DELETE /v1/control`: a proxy that shuts down says goodbye, so it shows offline at once
/// rather than when its connection's end is noticed (at the next heartbeat or two).
pub(super) async fn leave(state: State, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let proxy = authenticate_proxy(&state, &req, &EMPTY_BODY)?;
    let left = instance_of(&req).is_some_and(|instance| state.presence.leave(&proxy, instance));
    Ok(if left { HttpResponse::NoContent().finish() } else { HttpResponse::NotFound().finish() })
}

/// The `x-photon-instance` a request names, if any.
pub(super) fn instance_of(req: &HttpRequest) -> Option<&str> {
    req.headers().get(INSTANCE_HEADER).and_then(|v| v.to_str().ok())
}

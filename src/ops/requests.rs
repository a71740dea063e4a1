//! Request observation for broker and proxy (an actix `from_fn` middleware): one debug log line
//! per request (method, endpoint, path, status, time to the answer's head; never headers,
//! queries or bodies), the metrics `requests` and `request.duration_ms` by endpoint and status,
//! and the bytes each request and answer carried (streams included). A handler that panics is
//! answered 500 instead of taking its worker thread (and every connection and task actor on it)
//! down.

use std::{
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use actix_web::{
    body::{BodySize, BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    middleware::Next,
    HttpMessage,
};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::metrics::{Metrics, Total};

/// What the middleware reports into, shared by every worker.
#[derive(Default)]
pub struct Observer {
    pub metrics: Metrics,
    /// Request body bytes received.
    pub bytes_in: Total,
    /// Answer body bytes sent.
    pub bytes_out: Total,
}

impl Observer {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        Arc::new(Self { metrics, ..Default::default() })
    }

    /// Reports the byte totals (called by the metrics tick).
    pub fn report(&self) {
        self.bytes_in.report(&self.metrics, "bytes.in");
        self.bytes_out.report(&self.metrics, "bytes.out");
    }
}

/// The endpoint a route pattern names, for tags and logs. Broker and proxy share the table.
pub fn endpoint(method: &str, pattern: Option<&str>) -> &'static str {
    match (method, pattern.unwrap_or("")) {
        ("POST", "/v1/tasks") => "create_task",
        ("GET", "/v1/tasks") => "list_tasks",
        ("GET", "/v1/tasks/{id}") => "get_task",
        ("GET", "/v1/tasks/{id}/results") => "get_results",
        ("PUT", "/v1/tasks/{id}/results/{app_id}") => "put_result",
        ("POST", "/v1/batch") => "batch",
        (_, "/v1/health") => "health",
        (_, "/v1/health/proxies" | "/v1/health/proxies/{proxy_id}") => "monitoring",
        (_, "/v1/session") => "session",
        (_, "/v1/control") => "control",
        (_, "/v1/certs/{proxy_id}") => "certs",
        (_, "/v1/crl") => "crl",
        _ => "other",
    }
}

/// The middleware: `App::new().wrap(from_fn(move |req, next| observe(obs.clone(), req, next)))`.
pub async fn observe(
    observer: Arc<Observer>,
    mut req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    // Off the hot path when nobody looks: no byte counting without metrics, no endpoint name
    // without metrics or a debug log.
    let counting = observer.metrics.is_on();
    if counting && has_body(&req) {
        let counted = observer.clone();
        let payload = req.take_payload().inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                counted.bytes_in.add(bytes.len() as u64);
            }
        });
        let boxed: Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>> =
            Box::pin(payload);
        req.set_payload(actix_web::dev::Payload::from(boxed));
    }
    let res = match AssertUnwindSafe(next.call(req)).catch_unwind().await {
        Ok(res) => res?,
        // The panic hook has printed the message; the state a handler touches is behind
        // non-poisoning locks or in actors, so the worker can go on serving. (The request is
        // gone with the handler: the error becomes the answer, unobserved.)
        Err(_) => {
            tracing::error!("a request handler panicked; answered 500");
            let e = crate::http::ApiError::Internal("internal error (a bug); the request was not completed".into());
            return Err(e.into());
        }
    };
    if !counting && !tracing::enabled!(tracing::Level::DEBUG) {
        return Ok(res);
    }
    let elapsed = started.elapsed();
    let request = res.request();
    let pattern = request.match_pattern();
    let endpoint = endpoint(request.method().as_str(), pattern.as_deref());
    let status = res.status();
    tracing::debug!(
        method = %request.method(),
        endpoint,
        path = request.path(),
        status = status.as_u16(),
        ms = elapsed.as_secs_f64() * 1e3,
        "request"
    );
    if !counting {
        return Ok(res);
    }
    let m = &observer.metrics;
    m.count("requests", 1, &[("endpoint", endpoint), ("status", status.as_str())]);
    m.time("request.duration_ms", elapsed, &[("endpoint", endpoint)]);
    Ok(res.map_body(|_, body| BoxBody::new(Counted { inner: body, observer })))
}

fn has_body(req: &ServiceRequest) -> bool {
    let headers = req.headers();
    headers.contains_key(actix_web::http::header::TRANSFER_ENCODING)
        || headers.get(actix_web::http::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0")
}

/// An answer body that counts the bytes it yields.
struct Counted {
    inner: BoxBody,
    observer: Arc<Observer>,
}

impl MessageBody for Counted {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            this.observer.bytes_out.add(chunk.len() as u64);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panicking handler is answered 500 and the service goes on answering.
    #[actix_web::test]
    async fn a_panicking_handler_is_a_500_not_a_dead_worker() {
        use actix_web::{test, web, App};
        let observer = Arc::new(Observer::default());
        let app = test::init_service(
            App::new()
                .wrap(actix_web::middleware::from_fn(move |req, next| observe(observer.clone(), req, next)))
                .route(
                    "/panic",
                    web::get().to(|| async {
                        if true {
                            panic!("deliberately");
                        }
                        "unreached"
                    }),
                )
                .route("/ok", web::get().to(|| async { "fine" })),
        )
        .await;
        for _ in 0..2 {
            // The server turns a service error into its response, as this does.
            let err = test::try_call_service(&app, test::TestRequest::get().uri("/panic").to_request())
                .await
                .expect_err("the panic is an error answer");
            let res = err.error_response();
            assert_eq!(res.status(), 500);
            let body: serde_json::Value =
                serde_json::from_slice(&actix_web::body::to_bytes(res.into_body()).await.unwrap()).unwrap();
            assert!(body["error"].as_str().unwrap().contains("internal error"));
            let res = test::call_service(&app, test::TestRequest::get().uri("/ok").to_request()).await;
            assert_eq!(res.status(), 200);
        }
    }

    #[test]
    fn endpoints_are_named_by_method_and_pattern() {
        assert_eq!(endpoint("POST", Some("/v1/tasks")), "create_task");
        assert_eq!(endpoint("GET", Some("/v1/tasks")), "list_tasks");
        assert_eq!(endpoint("PUT", Some("/v1/tasks/{id}/results/{app_id}")), "put_result");
        assert_eq!(endpoint("HEAD", Some("/v1/health")), "health");
        assert_eq!(endpoint("POST", Some("/v1/batch")), "batch");
        assert_eq!(endpoint("GET", Some("/v1/health/proxies/{proxy_id}")), "monitoring");
        assert_eq!(endpoint("DELETE", Some("/v1/tasks")), "other");
        assert_eq!(endpoint("GET", None), "other");
    }
}

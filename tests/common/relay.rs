//! A "broker in the middle": an HTTP relay between the proxies and the broker that records
//! every request it forwards and can rewrite JSON requests, JSON answers and each line of the
//! broker's event streams. It plays a broker that reads and alters everything it handles.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;

/// Rewrites a JSON value passing through; gets `METHOD path?query`.
pub type Rewrite = Box<dyn FnMut(&str, &mut Value) + Send>;
pub type RawRewrite = Box<dyn FnMut(&str, &mut Vec<u8>) + Send>;

/// One request as the relay received it from a proxy.
#[derive(Clone, Debug)]
pub struct Captured {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

#[derive(Default)]
pub struct Relay {
    pub broker: Mutex<String>,
    pub captured: Mutex<Vec<Captured>>,
    /// Every byte the proxies sent through the relay.
    pub bytes_in: Mutex<Vec<u8>>,
    on_request: Mutex<Option<Rewrite>>,
    on_answer: Mutex<Option<Rewrite>>,
    on_raw_answer: Mutex<Option<RawRewrite>>,
    /// Requests (`METHOD path` prefix) answered `404 no such endpoint`, as an older broker would.
    missing: Mutex<Option<String>>,
    /// Requests (`METHOD path` prefix) answered `503` this many more times, as a broker
    /// restarting or a gateway's hiccup would.
    failing: Mutex<Option<(String, usize)>>,
}

impl Relay {
    /// From now on, JSON request bodies pass through `f`.
    pub fn rewrite_requests(&self, f: impl FnMut(&str, &mut Value) + Send + 'static) {
        *self.on_request.lock() = Some(Box::new(f));
    }

    /// From now on, JSON answers and stream lines pass through `f`.
    pub fn rewrite_answers(&self, f: impl FnMut(&str, &mut Value) + Send + 'static) {
        *self.on_answer.lock() = Some(Box::new(f));
    }

    /// From now on, binary answers (`application/octet-stream`: detached uploads) pass through `f`.
    pub fn rewrite_raw_answers(&self, f: impl FnMut(&str, &mut Vec<u8>) + Send + 'static) {
        *self.on_raw_answer.lock() = Some(Box::new(f));
    }

    /// From now on, requests starting `METHOD path` get `404 no such endpoint` (recorded, not
    /// forwarded): a broker without that endpoint.
    pub fn without_endpoint(&self, what: &str) {
        *self.missing.lock() = Some(what.to_owned());
    }

    /// The next `times` requests starting `METHOD path` get `503` (recorded, not forwarded).
    pub fn fail_next(&self, what: &str, times: usize) {
        *self.failing.lock() = Some((what.to_owned(), times));
    }

    /// Back to an honest relay.
    pub fn honest(&self) {
        *self.on_request.lock() = None;
        *self.on_answer.lock() = None;
        *self.on_raw_answer.lock() = None;
        *self.missing.lock() = None;
        *self.failing.lock() = None;
    }

    pub fn requests_to(&self, method: &str, path_prefix: &str) -> Vec<Captured> {
        self.captured.lock().iter().filter(|c| c.method == method && c.path.starts_with(path_prefix)).cloned().collect()
    }

    fn rewrite(&self, which: &Mutex<Option<Rewrite>>, what: &str, bytes: Bytes) -> Bytes {
        let mut guard = which.lock();
        let Some(f) = guard.as_mut() else { return bytes };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(mut v) => {
                f(what, &mut v);
                Bytes::from(serde_json::to_vec(&v).unwrap())
            }
            Err(_) => bytes,
        }
    }
}

const FORWARDED: &[&str] = &["content-type", "accept", "last-event-id"];

async fn forward(relay: web::Data<Arc<Relay>>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let what = format!("{} {path}", req.method());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-photon-") || FORWARDED.contains(&k.as_str()))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    relay.bytes_in.lock().extend_from_slice(path.as_bytes());
    for (k, v) in &headers {
        relay.bytes_in.lock().extend_from_slice(format!("{k}: {v}\n").as_bytes());
    }
    relay.bytes_in.lock().extend_from_slice(&body);
    relay.captured.lock().push(Captured {
        method: req.method().to_string(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    if relay.missing.lock().as_deref().is_some_and(|m| what.starts_with(m)) {
        return HttpResponse::NotFound().json(serde_json::json!({"error": "no such endpoint"}));
    }
    if let Some((prefix, left)) = relay.failing.lock().as_mut() {
        if *left > 0 && what.starts_with(prefix.as_str()) {
            *left -= 1;
            return HttpResponse::ServiceUnavailable().json(serde_json::json!({"error": "try again"}));
        }
    }
    let body = relay.rewrite(&relay.on_request, &what, body);
    let url = format!("{}{path}", relay.broker.lock());
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes()).unwrap();
    let mut out = reqwest::Client::new().request(method, url).body(body);
    for (k, v) in &headers {
        out = out.header(k, v);
    }
    let res = match out.send().await {
        Ok(res) => res,
        Err(e) => return HttpResponse::BadGateway().body(e.to_string()),
    };
    let mut answer = HttpResponse::build(actix_web::http::StatusCode::from_u16(res.status().as_u16()).unwrap());
    for (k, v) in res.headers() {
        if k.as_str().starts_with("x-photon-") || k == "content-type" || k == "location" {
            answer.insert_header((k.as_str(), v.to_str().unwrap_or_default()));
        }
    }
    let streaming = res.headers().get("content-type").is_some_and(|v| v.to_str().unwrap_or("").contains("ndjson"));
    let binary = res.headers().get("content-type").is_some_and(|v| v == "application/octet-stream");
    if binary {
        let mut bytes = res.bytes().await.unwrap_or_default().to_vec();
        if let Some(f) = relay.on_raw_answer.lock().as_mut() {
            f(&what, &mut bytes);
        }
        return answer.body(bytes);
    }
    if !streaming {
        let bytes = res.bytes().await.unwrap_or_default();
        return answer.body(relay.rewrite(&relay.on_answer, &what, bytes));
    }
    // Line by line, each rewritten, as they come.
    let relay = relay.get_ref().clone();
    let lines = futures_util::stream::unfold(
        (res.bytes_stream(), BytesMut::new(), relay, what),
        |(mut upstream, mut buf, relay, what)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line = buf.split_to(pos + 1).freeze();
                    let line = if line.len() > 1 {
                        let mut out = relay.rewrite(&relay.on_answer, &what, line.slice(..line.len() - 1)).to_vec();
                        out.push(b'\n');
                        Bytes::from(out)
                    } else {
                        line
                    };
                    return Some((Ok::<_, actix_web::Error>(line), (upstream, buf, relay, what)));
                }
                match upstream.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    _ => return None,
                }
            }
        },
    );
    answer.streaming(lines)
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(64 * 1024 * 1024)).default_service(web::to(forward));
}

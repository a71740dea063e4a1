//! The proxy reaches the broker through an HTTP forward proxy when `HTTP_PROXY` is set (its own
//! test binary, because the variable is process-wide).

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use common::*;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A minimal forward proxy: reads the first request head of each connection, counts
/// connections that proxies opened to the broker, connects to the absolute-form target and pipes both ways.
async fn forward_proxy(handshakes: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else { return };
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
                let target = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let Some(rest) = target.strip_prefix("http://") else { return };
                // Only proxies fetch certificates and open sessions, and only at the broker.
                if rest.contains("/v1/session") || rest.contains("/v1/certs/") {
                    handshakes.fetch_add(1, Ordering::SeqCst);
                }
                let authority = rest.split('/').next().unwrap_or_default().to_string();
                let Ok(mut upstream) = TcpStream::connect(&authority).await else { return };
                if upstream.write_all(&head).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    port
}

// Multi-threaded: `Net::start` blocks this thread while the forward proxy must keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reaches_the_broker_through_http_proxy() {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let port = forward_proxy(handshakes.clone()).await;
    // SAFETY of the test: this binary has one test, so nothing else reads the environment.
    std::env::set_var("HTTP_PROXY", format!("http://127.0.0.1:{port}"));
    std::env::set_var("NO_PROXY", "");
    let net = Net::start();
    let id = net.create(APP1, &[APP2], json!("via proxy"), "1m").await;
    let todo = json_of(net.get(APP2, "/v1/tasks?filter=todo").send().await.unwrap()).await;
    assert_eq!(todo[0]["id"], id.as_str());
    assert!(handshakes.load(Ordering::SeqCst) >= 2, "both proxies reached the broker through the HTTP proxy");
}

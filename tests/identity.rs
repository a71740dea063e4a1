//! Proxy identity at the broker over real HTTP: no session, no service; a captured request
//! can't be replayed; a proxy certified by another CA gets nowhere.

mod common;

use common::*;
use photon::{
    crypto::{ca, session, unix_millis, RootCert},
    wire::{
        broker::{self as bw, SessionAccept},
        ProxyId,
    },
};
use photon_proxy::upstream::{OwnFiles, Upstream};

#[tokio::test]
async fn broker_refuses_requests_without_a_session() {
    let net = Net::start();
    for path in ["/v1/tasks?filter=todo", &format!("/v1/tasks/{}", uuid::Uuid::new_v4())] {
        let res = net.http.get(format!("{}{path}", net.broker)).header(bw::APP_HEADER, APP1).send().await.unwrap();
        assert_eq!(res.status(), 401, "{path}");
    }
}

/// Paths and methods the broker does not serve are 404 "no such endpoint" before any
/// authentication, inside the task routes' scope as outside it.
/// An upload without a live session is refused from its headers: the broker reads its body
/// only to drop it (nothing kept, hashed or parsed), so the client, still sending, reads a
/// clean 401 and can renew its session and send again.
#[tokio::test]
async fn broker_refuses_an_unauthenticated_upload_from_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let net = Net::start();
    let authority = net.broker.trim_start_matches("http://").to_owned();
    let ts = unix_millis();
    for (method, path) in
        [("POST", "/v1/tasks".to_owned()), ("PUT", format!("/v1/tasks/{}/results/{APP2}", uuid::Uuid::new_v4()))]
    {
        let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\n\
             content-length: 4000000\r\n{}: {APP1}\r\n{}: made-up\r\n{}: 1\r\n{}: {ts}\r\n{}: AAAA\r\n\r\n",
            bw::APP_HEADER,
            bw::SESSION_HEADER,
            bw::SEQ_HEADER,
            bw::TS_HEADER,
            bw::MAC_HEADER,
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // The whole body, as a proxy on a slow link sends it (over 2 s): the connection stays
        // up for all of it, and the refusal is read whole after it.
        for _ in 0..4 {
            tcp.write_all(&vec![b' '; 1_000_000]).await.expect("the broker takes the whole body");
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        }
        let mut answer = vec![0; 512];
        let n = tokio::time::timeout(SECS(5), tcp.read(&mut answer)).await.expect("answered").unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{method} {path}: {answer}");
    }
}

#[tokio::test]
async fn broker_answers_unknown_endpoints_404() {
    let net = Net::start();
    let id = uuid::Uuid::new_v4();
    let requests = [
        (reqwest::Method::DELETE, "/v1/tasks".to_owned()),
        (reqwest::Method::PUT, format!("/v1/tasks/{id}")),
        (reqwest::Method::GET, format!("/v1/tasks/{id}/results/{APP2}/more")),
        (reqwest::Method::GET, "/v1/tasks/".to_owned()),
        (reqwest::Method::GET, "/v1/nope".to_owned()),
    ];
    for (method, path) in requests {
        let res = net.http.request(method.clone(), format!("{}{path}", net.broker)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{method} {path}");
        assert_eq!(json_of(res).await["error"], "no such endpoint", "{method} {path}");
    }
}

#[tokio::test]
async fn captured_request_replayed_is_refused() {
    let net = Net::start();
    let s = session_as_proxy1(&net).await;

    let path = "/v1/tasks?filter=todo";
    let signed = |app: &str, auth: &session::RequestAuth| {
        with_auth(net.http.get(format!("{}{path}", net.broker)), app, auth).send()
    };
    let auth = s.sign("GET", path, APP1, b"");
    let send = || signed(APP1, &auth);
    assert_eq!(send().await.unwrap().status(), 200, "the original goes through");
    let replay = send().await.unwrap();
    assert_eq!(replay.status(), 401, "the replay does not");
    assert!(json_of(replay).await["error"].as_str().unwrap().contains("replay"));

    // A proxy may act only for its own apps (label boundary).
    let auth = s.sign("GET", path, APP2, b"");
    let res = signed(APP2, &auth).await.unwrap();
    assert_eq!(res.status(), 403);

    // The MAC covers the body, small or large (the broker hashes a large one beside parsing it):
    // a body changed after signing is refused as such, even when it is not JSON either; a signed
    // body that is not JSON is a 400.
    let post = |body: Vec<u8>, auth: session::RequestAuth| {
        with_auth(net.http.post(format!("{}/v1/tasks", net.broker)), APP1, &auth).body(body).send()
    };
    for size in [100, 600 * 1024] {
        let body = vec![b'x'; size];
        let auth = s.sign("POST", "/v1/tasks", APP1, &body);
        let mut changed = body.clone();
        changed[size / 2] = b'y';
        let res = post(changed, auth).await.unwrap();
        assert_eq!(res.status(), 401, "{size} bytes changed after signing");
        assert!(json_of(res).await["error"].as_str().unwrap().contains("MAC"), "{size} bytes");
        let auth = s.sign("POST", "/v1/tasks", APP1, &body);
        let res = post(body, auth).await.unwrap();
        assert_eq!(res.status(), 400, "{size} bytes of signed non-JSON");
        assert!(json_of(res).await["error"].as_str().unwrap().contains("invalid JSON"), "{size} bytes");
    }
}

/// A session of proxy1's, opened by hand. While the real proxy1 is online the broker would
/// refuse a second instance of it (409), so it stops first.
async fn session_as_proxy1(net: &Net) -> session::ClientSession {
    net.proxy_stops[0].stop_now().await;
    eventually("proxy1 offline", || async { net.broker_health().await["proxies_online"] == 1 }).await;
    let root = RootCert::load(&net.pki.join(ca::ROOT_CERT)).unwrap();
    let cert_pem = std::fs::read_to_string(net.pki.join("certs/proxy1.broker.crt")).unwrap();
    let cert = root.verify(&cert_pem, (unix_millis() / 1000) as i64).unwrap();
    let key = std::fs::read_to_string(net.pki.join("proxy1.broker.priv.pem")).unwrap();
    let identity = session::Identity::new(&key, cert_pem, &cert).unwrap();
    let pending = session::client_hello(&identity, "broker");
    let res = net.http.post(format!("{}/v1/session", net.broker)).json(&pending.hello).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let accept: SessionAccept = res.json().await.unwrap();
    session::client_finish(pending, &accept, &root, "broker").unwrap()
}

/// A batch of uploads is authenticated as the proxy, and each upload is then checked, stored
/// or refused on its own, in order, with the status and error body its own request would get.
#[tokio::test]
async fn each_upload_of_a_batch_has_its_own_outcome() {
    let net = Net::start();
    let s = session_as_proxy1(&net).await;
    let send = |body: Vec<u8>| {
        let auth = s.sign("POST", bw::BATCH_PATH, "proxy1.broker", &body);
        with_auth(net.http.post(format!("{}{}", net.broker, bw::BATCH_PATH)), "proxy1.broker", &auth).body(body).send()
    };
    let task = |id: &uuid::Uuid, from: &str, to: &str| {
        serde_json::json!({"task": {"id": id, "from": from, "to": [to], "ttl_ms": 60000,
            "failure_strategy": "discard", "metadata": null, "body": {"sealed": 1}}})
    };
    let result = |task: &uuid::Uuid, from: &str, to: &str| {
        serde_json::json!({"result": {"task": task, "from": from, "to": [to], "status": "succeeded",
            "metadata": null, "body": {"sealed": 2}}})
    };
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let uploads = serde_json::json!([
        task(&a, APP1, APP3),                // 201
        result(&a, APP3, APP1),              // 201: the task above is stored first
        result(&a, APP3, APP1),              // 204: replaces it
        task(&a, APP1, APP3),                // 409: the id is taken
        task(&b, APP2, APP1),                // 403: proxy1 may not act for app2
        task(&b, APP1, "app.proxy9.broker"), // 424: proxy9 has no certificate
        result(&b, APP3, APP1),              // 404: no such task
    ]);
    let res = send(serde_json::to_vec(&uploads).unwrap()).await.unwrap();
    assert_eq!(res.status(), 200);
    let outcomes: Vec<serde_json::Value> = res.json().await.unwrap();
    let statuses: Vec<u64> = outcomes.iter().map(|o| o["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [201, 201, 204, 409, 403, 424, 404]);
    assert!(outcomes[..3].iter().all(|o| o.get("error").is_none()), "{outcomes:?}");
    assert!(outcomes[4]["error"]["error"].as_str().unwrap().contains("may not act for"), "{outcomes:?}");
    assert_eq!(outcomes[5]["error"], serde_json::json!(["proxy9.broker"]), "the 424 body is beam's array");
    assert!(outcomes[6]["error"]["error"].is_string(), "{outcomes:?}");
    assert_eq!(net.broker_tasks().await, 1, "only the one good task is stored");

    // Refused as a whole: a body that is not a batch, too many uploads, a body changed after
    // signing (nothing of it stored).
    let res = send(b"{\"task\": 1}".to_vec()).await.unwrap();
    assert_eq!(res.status(), 400);
    let c = uuid::Uuid::new_v4();
    let many: Vec<_> = (0..=bw::MAX_BATCH).map(|_| result(&c, APP3, APP1)).collect();
    let res = send(serde_json::to_vec(&many).unwrap()).await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(json_of(res).await["error"].as_str().unwrap().contains("at most"));
    let body = serde_json::to_vec(&serde_json::json!([task(&c, APP1, APP3)])).unwrap();
    let auth = s.sign("POST", bw::BATCH_PATH, "proxy1.broker", &body);
    let changed = serde_json::to_vec(&serde_json::json!([task(&c, APP1, APP1)])).unwrap();
    let res = with_auth(net.http.post(format!("{}{}", net.broker, bw::BATCH_PATH)), "proxy1.broker", &auth)
        .body(changed)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Signed as an app rather than as the proxy itself.
    let auth = s.sign("POST", bw::BATCH_PATH, APP1, &body);
    let res = with_auth(net.http.post(format!("{}{}", net.broker, bw::BATCH_PATH)), APP1, &auth)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(net.broker_tasks().await, 1);
}

/// `req` with the session headers of `auth`, acting for `app`.
fn with_auth(req: reqwest::RequestBuilder, app: &str, auth: &session::RequestAuth) -> reqwest::RequestBuilder {
    req.header(bw::APP_HEADER, app)
        .header(bw::SESSION_HEADER, &auth.session)
        .header(bw::SEQ_HEADER, auth.seq)
        .header(bw::TS_HEADER, auth.ts)
        .header(bw::MAC_HEADER, &auth.mac)
}

#[tokio::test]
async fn proxy_of_another_ca_gets_nowhere() {
    let net = Net::start();
    let other = std::env::temp_dir().join(format!("photon-other-{}", uuid::Uuid::new_v4()));
    ca::init(&other, "broker", 30).unwrap();
    let id = ProxyId::parse("proxy1.broker").unwrap();
    let (key, csr) = ca::keygen(&id).unwrap();
    let (_, cert_path) = ca::sign(&other, "broker", &csr, 30).unwrap();
    let own_root = RootCert::load(&other.join(ca::ROOT_CERT)).unwrap();
    let key_path = other.join("proxy1.priv.pem");
    ca::write_private(&key_path, &key).unwrap();
    let files = OwnFiles { privkey_file: key_path, cert_file: Some(cert_path) };
    // Its certificate checks out against its own root, but the broker refuses the handshake.
    let upstream = Upstream::connect(&net.broker, "broker", &id, files, own_root, SECS(60)).await.unwrap();
    let err = upstream.ensure_session().await.unwrap_err().to_string();
    assert!(err.contains("refused"), "{err}");
    // Pinned to the real root, it can't even use the certificate it has.
    let real_root = RootCert::load(&net.pki.join(ca::ROOT_CERT)).unwrap();
    let (key2, _) = ca::keygen(&id).unwrap();
    let key2_path = other.join("proxy1.other.priv.pem");
    ca::write_private(&key2_path, &key2).unwrap();
    let files = OwnFiles { privkey_file: key2_path, cert_file: None };
    assert!(
        Upstream::connect(&net.broker, "broker", &id, files, real_root, SECS(60)).await.is_err(),
        "key does not match the certificate"
    );
    let _ = std::fs::remove_dir_all(other);
}

/// A detached upload (the message's JSON, a newline, the ciphertext) is authenticated whole,
/// stored as it came, and handed out whole only to those who may read its message; the message
/// itself is listed as JSON like any other.
#[tokio::test]
async fn detached_uploads_are_stored_whole_and_served_to_readers_only() {
    let net = Net::start();
    let s = session_as_proxy1(&net).await;
    // A detached upload's MAC covers its JSON and the ciphertext's digest (session::detached_digest).
    let sign = |method: &str, path: &str, app: &str, body: &[u8]| match path.ends_with(bw::DETACHED_QUERY) {
        true => s.sign_digest(method, path, app, &session::detached_upload_digest(body)),
        false => s.sign(method, path, app, body),
    };
    let upload = |method: reqwest::Method, path: &str, app: &str, body: Vec<u8>| {
        let auth = sign(method.as_str(), path, app, &body);
        with_auth(net.http.request(method, format!("{}{path}", net.broker)), app, &auth).body(body).send()
    };
    let read = |path: String, app: &'static str| {
        let auth = s.sign("GET", &path, app, b"");
        with_auth(net.http.get(format!("{}{path}", net.broker)), app, &auth).send()
    };
    // Ciphertext bytes of every value, newlines included: only the first newline separates.
    let ct: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let detached = |json: serde_json::Value| {
        let mut body = serde_json::to_vec(&json).unwrap();
        body.push(b'\n');
        body.extend_from_slice(&ct);
        body
    };
    let sealed = serde_json::json!({"sealed": 1, "detached": ct.len(), "ct": ""});
    let id = uuid::Uuid::new_v4();
    let task = serde_json::json!({"id": id, "from": APP1, "to": [APP3], "ttl_ms": 60000,
        "failure_strategy": "discard", "metadata": null, "body": sealed});
    let task_path = format!("/v1/tasks?{}", bw::DETACHED_QUERY);

    // Refused whole: no separator; a ciphertext changed after signing (the MAC covers it).
    let res = upload(reqwest::Method::POST, &task_path, APP1, serde_json::to_vec(&task).unwrap()).await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(json_of(res).await["error"].as_str().unwrap().contains("newline"));
    let body = detached(task.clone());
    let auth = sign("POST", &task_path, APP1, &body);
    let mut changed = body.clone();
    *changed.last_mut().unwrap() ^= 1;
    let res = with_auth(net.http.post(format!("{}{task_path}", net.broker)), APP1, &auth).body(changed).send();
    assert_eq!(res.await.unwrap().status(), 401);
    // Signed over its bytes, as a plain body is: not the digest a detached upload's MAC covers.
    let auth = s.sign("POST", &task_path, APP1, &body);
    let res = with_auth(net.http.post(format!("{}{task_path}", net.broker)), APP1, &auth).body(body.clone()).send();
    assert_eq!(res.await.unwrap().status(), 401);
    assert_eq!(net.broker_tasks().await, 0, "nothing stored");

    // Without a Content-Length (chunked): refused, as its buffer would be kept grown by doubling.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let authority = net.broker.trim_start_matches("http://").to_owned();
        let auth = sign("POST", &task_path, APP1, &body);
        let mut head = format!("POST {task_path} HTTP/1.1\r\nhost: {authority}\r\ntransfer-encoding: chunked\r\n");
        let signed = [
            (bw::APP_HEADER, APP1.to_owned()),
            (bw::SESSION_HEADER, auth.session.clone()),
            (bw::SEQ_HEADER, auth.seq.to_string()),
            (bw::TS_HEADER, auth.ts.to_string()),
            (bw::MAC_HEADER, auth.mac.clone()),
        ];
        for (name, value) in signed {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let mut tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        tcp.write_all(format!("{head}\r\n{:x}\r\n", body.len()).as_bytes()).await.unwrap();
        tcp.write_all(&body).await.unwrap();
        tcp.write_all(b"\r\n0\r\n\r\n").await.unwrap();
        let mut answer = vec![0; 512];
        let n = tokio::time::timeout(SECS(5), tcp.read(&mut answer)).await.expect("answered").unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("Content-Length"), "{answer}");
    }
    assert_eq!(net.broker_tasks().await, 0, "nothing stored");

    let res = upload(reqwest::Method::POST, &task_path, APP1, body.clone()).await.unwrap();
    assert_eq!(res.status(), 201);
    // Listed as its JSON; fetched whole by its creator and recipient, by no one else.
    let listed: serde_json::Value = read(format!("/v1/tasks/{id}"), APP3).await.unwrap().json().await.unwrap();
    assert_eq!(listed["body"], sealed);
    let sealed_path = format!("/v1/tasks/{id}{}", bw::DETACHED_PATH);
    for app in [APP1, APP3] {
        let res = read(sealed_path.clone(), app).await.unwrap();
        assert_eq!(res.status(), 200, "{app}");
        assert_eq!(res.headers()["content-type"], "application/octet-stream");
        assert_eq!(res.bytes().await.unwrap(), body, "{app}: the upload as it came");
    }
    assert_eq!(read(sealed_path.clone(), "app9.proxy1.broker").await.unwrap().status(), 404);

    // A result, the same way; only the task's creator reads it (as it reads the task's results).
    let result = serde_json::json!({"task": id, "from": APP3, "to": [APP1], "status": "succeeded",
        "metadata": null, "body": sealed});
    let result_path = format!("/v1/tasks/{id}/results/{APP3}?{}", bw::DETACHED_QUERY);
    let body = detached(result);
    assert_eq!(upload(reqwest::Method::PUT, &result_path, APP3, body.clone()).await.unwrap().status(), 201);
    let sealed_result = format!("/v1/tasks/{id}/results/{APP3}{}", bw::DETACHED_PATH);
    let res = read(sealed_result.clone(), APP1).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap(), body);
    assert_eq!(read(sealed_result, APP3).await.unwrap().status(), 403);

    // A message uploaded inline has nothing detached.
    let inline = uuid::Uuid::new_v4();
    let task = serde_json::json!({"id": inline, "from": APP1, "to": [APP3], "ttl_ms": 60000,
        "failure_strategy": "discard", "metadata": null, "body": {"sealed": 2}});
    let res = upload(reqwest::Method::POST, "/v1/tasks", APP1, serde_json::to_vec(&task).unwrap()).await.unwrap();
    assert_eq!(res.status(), 201);
    let res = read(format!("/v1/tasks/{inline}{}", bw::DETACHED_PATH), APP3).await.unwrap();
    assert_eq!(res.status(), 404);
    assert!(json_of(res).await["error"].as_str().unwrap().contains("no detached body"));
}

//! A lean HTTP/1.1 client for plain request/answer exchanges over `http://` with direct
//! connections: pooled keep-alive connections; each request is written with one vectored write
//! (head and body, the body uncopied) by the task that sends it, and its answer is parsed in
//! place (`httparse`). No TLS, no forward proxies, no streaming: those stay with reqwest.
//!
//! Used by the loadtest's apps and by the proxy for its plain requests to the broker. Through
//! reqwest (hyper-util's pool, hyper's per-connection task and channel, a `Url` per request)
//! the loadtest spent 65–74 µs of CPU per create it sent; through this, about 30.

use std::{
    collections::VecDeque,
    io,
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// An answer: its status, head and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and header lines, as received.
    head: Bytes,
    pub body: Bytes,
}

impl Answer {
    /// The first value of header `name` (any case), if it is there and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut headers);
        res.parse(&self.head).ok()?;
        let value: &[u8] = res.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name))?.value;
        std::str::from_utf8(value).ok()
    }
}

/// Whether a request that got no byte of an answer on a reused connection goes out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Once, on a new connection: the server most likely closed the idle connection before it
    /// read the request.
    Unanswered,
    /// Never: the request must not be seen twice (a signed request's sequence number is spent).
    Never,
}

/// Why a request failed, by the name the run counts it under.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// No connection could be made.
    Connect,
    /// The connection broke or closed before the whole answer came.
    Lost,
    /// The answer is not HTTP/1.1 as this client reads it.
    Malformed,
    /// The answer's body is longer than the request allowed (by its length, or as it came);
    /// it was not read further.
    TooLarge,
}

impl Error {
    pub fn name(&self) -> &'static str {
        match self {
            Error::Connect => "connect",
            Error::Lost => "lost",
            Error::Malformed => "malformed",
            Error::TooLarge => "too_large",
        }
    }
}

/// `host:port` of a plain `http://` URL, the authority a [`Pool`] takes; `None` for any other
/// scheme (TLS is not this client's).
pub fn plain_authority(url: &crate::urls::Url) -> Option<String> {
    match (url.scheme(), url.host_str()) {
        ("http", Some(host)) => Some(format!("{host}:{}", url.port_or_known_default().unwrap_or(80))),
        _ => None,
    }
}

/// Keep-alive connections to one origin.
pub struct Pool {
    /// `host:port`, to connect to and as the `Host` header.
    authority: String,
    /// Idle connections, the most recently used at the back.
    idle: Mutex<VecDeque<Conn>>,
    max_idle: usize,
    /// [`MAX_IDLE_TIME`], shorter in tests.
    max_idle_time: Duration,
    resend: Resend,
}

struct Conn {
    stream: TcpStream,
    /// When it was last put back idle.
    idle_since: Instant,
    /// Read but not yet consumed bytes.
    buf: BytesMut,
}

/// A request as it goes out: its head, and its body as the caller holds it. Both go out
/// together in one vectored write, so the body is never copied (a 1 MiB copy into a fresh
/// buffer was 9 % of the loadtest's CPU in the 1 MiB round trip).
struct Request<'b> {
    head: Vec<u8>,
    body: &'b [u8],
}

/// An idle connection older than this is closed, not reused: servers close idle connections
/// too (actix after 5 s by default), and one that does so just as a request goes out loses it.
const MAX_IDLE_TIME: Duration = Duration::from_secs(4);

/// Longest wait for a connection (as reqwest is set up in the proxy).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most header lines an answer may have.
const MAX_HEADERS: usize = 64;
/// Largest answer head read before giving up on it.
const MAX_HEAD: usize = 64 * 1024;
/// Largest answer body [`Pool::send`] takes: four times the largest body the loadtest sends
/// (64 MiB), so a wrong length cannot make it allocate without bound. [`Pool::send_within`]
/// takes another bound.
pub const MAX_BODY: usize = 256 * 1024 * 1024;

impl Pool {
    /// A pool for `authority` (`host:port`) that keeps up to `max_idle` idle connections.
    pub fn new(authority: &str, max_idle: usize, resend: Resend) -> Self {
        let idle = Mutex::new(VecDeque::new());
        Self { authority: authority.to_owned(), idle, max_idle, max_idle_time: MAX_IDLE_TIME, resend }
    }

    /// Sends `method target` with `headers` (each `name: value`, without line ends) and `body`
    /// (JSON unless `headers` give a `content-type`), and reads the whole answer, its body at
    /// most [`MAX_BODY`] bytes. With [`Resend::Unanswered`], a request on an idle connection
    /// that the server had closed meanwhile (no byte of an answer came back) is sent once more,
    /// on a new connection; no other failure is retried.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> Result<Answer, Error> {
        self.send_within(method, target, headers, body, MAX_BODY).await
    }

    /// [`Pool::send`], taking an answer body of at most `max_body` bytes: a longer one fails
    /// ([`Error::TooLarge`]) as soon as its length or its bytes so far show it, and its
    /// connection is not kept.
    pub async fn send_within(
        &self,
        method: &str,
        target: &str,
        headers: &[&str],
        body: Option<&[u8]>,
        max_body: usize,
    ) -> Result<Answer, Error> {
        let request = self.request(method, target, headers, body);
        if let Some(mut conn) = self.reuse() {
            match conn.exchange(&request, method, max_body).await {
                Ok((answer, keep)) => {
                    self.put_back(conn, keep);
                    return Ok(answer);
                }
                Err(Exchange::Unanswered) if self.resend == Resend::Unanswered => {}
                Err(Exchange::Unanswered) => return Err(Error::Lost),
                Err(Exchange::Failed(e)) => return Err(e),
            }
        }
        let mut conn = self.connect().await?;
        match conn.exchange(&request, method, max_body).await {
            Ok((answer, keep)) => {
                self.put_back(conn, keep);
                Ok(answer)
            }
            Err(Exchange::Unanswered) => Err(Error::Lost),
            Err(Exchange::Failed(e)) => Err(e),
        }
    }

    fn request<'b>(&self, method: &str, target: &str, headers: &[&str], body: Option<&'b [u8]>) -> Request<'b> {
        let body = body.unwrap_or_default();
        let mut head = Vec::with_capacity(160 + headers.iter().map(|h| h.len() + 2).sum::<usize>());
        head.extend_from_slice(format!("{method} {target} HTTP/1.1\r\nhost: {}\r\n", self.authority).as_bytes());
        for h in headers {
            head.extend_from_slice(h.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            let typed = headers.iter().any(|h| h.get(..13).is_some_and(|n| n.eq_ignore_ascii_case("content-type:")));
            if !typed {
                head.extend_from_slice(b"content-type: application/json\r\n");
            }
            head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        Request { head, body }
    }

    /// An idle connection the server has not closed, as far as can be seen without waiting.
    fn reuse(&self) -> Option<Conn> {
        loop {
            let conn = self.idle.lock().pop_back()?;
            if conn.idle_since.elapsed() > self.max_idle_time {
                continue;
            }
            match conn.stream.try_read(&mut [0; 1]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(conn),
                // Closed (0), or bytes nobody asked for: either way not usable.
                _ => continue,
            }
        }
    }

    fn put_back(&self, mut conn: Conn, keep: bool) {
        conn.idle_since = Instant::now();
        let mut idle = self.idle.lock();
        // The oldest are at the front: close those past their time rather than keep them open.
        while idle.front().is_some_and(|c| c.idle_since.elapsed() > self.max_idle_time) {
            idle.pop_front();
        }
        if keep && idle.len() < self.max_idle {
            idle.push_back(conn);
        }
    }

    async fn connect(&self) -> Result<Conn, Error> {
        // Resolved again for every new connection (an IP address is not looked up), so a name
        // that moves to another address is followed, as reqwest does.
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.authority.as_str()))
            .await
            .map_err(|_| Error::Connect)?
            .map_err(|_| Error::Connect)?;
        stream.set_nodelay(true).map_err(|_| Error::Connect)?;
        Ok(Conn { stream, idle_since: Instant::now(), buf: BytesMut::with_capacity(8 * 1024) })
    }
}

/// How one exchange on a connection failed.
enum Exchange {
    /// Not one byte of an answer came: the server may have closed the connection before it
    /// read the request.
    Unanswered,
    Failed(Error),
}

impl Conn {
    /// Writes `request` and reads its answer; whether the connection can carry another.
    async fn exchange(
        &mut self,
        request: &Request<'_>,
        method: &str,
        max_body: usize,
    ) -> Result<(Answer, bool), Exchange> {
        if self.stream.write_all_buf(&mut Buf::chain(&request.head[..], request.body)).await.is_err() {
            return Err(Exchange::Unanswered);
        }
        self.buf.clear();
        let head = loop {
            match parse_head(&self.buf) {
                Ok(Some(head)) if head.status >= 200 => break head,
                // An interim answer (100 Continue …): skip it.
                Ok(Some(head)) => self.buf.advance(head.len),
                Ok(None) if self.buf.len() > MAX_HEAD => return Err(Exchange::Failed(Error::Malformed)),
                Ok(None) => match self.fill().await {
                    Ok(()) => {}
                    Err(_) if self.buf.is_empty() => return Err(Exchange::Unanswered),
                    Err(e) => return Err(Exchange::Failed(e)),
                },
                Err(e) => return Err(Exchange::Failed(e)),
            }
        };
        let head_bytes = self.buf.split_to(head.len).freeze();
        let bodiless = method == "HEAD" || head.status == 204 || head.status == 304;
        let body = match (bodiless, head.length) {
            (true, _) => Bytes::new(),
            (false, Length::Fixed(n)) if n > max_body => return Err(Exchange::Failed(Error::TooLarge)),
            (false, Length::Fixed(n)) => self.exactly(n).await.map_err(Exchange::Failed)?,
            (false, Length::Chunked) => self.chunked(max_body).await.map_err(Exchange::Failed)?,
            (false, Length::UntilClose) => self.until_close(max_body).await.map_err(Exchange::Failed)?,
        };
        // A body that ends with the connection ends it; a bodiless answer (204) does not.
        let keep = head.keep_alive && (bodiless || head.length != Length::UntilClose) && self.buf.is_empty();
        Ok((Answer { status: head.status, head: head_bytes, body }, keep))
    }

    /// Reads more bytes; a closed connection is `Lost`.
    async fn fill(&mut self) -> Result<(), Error> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8 * 1024);
        }
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(Error::Lost),
            Ok(_) => Ok(()),
        }
    }

    /// `n` bytes (the caller bounds `n`).
    async fn exactly(&mut self, n: usize) -> Result<Bytes, Error> {
        self.buf.reserve(n.saturating_sub(self.buf.len()));
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// The body up to the connection's end; what came with the head counts too, so a body over
    /// `max_body` is refused without waiting for more.
    async fn until_close(&mut self, max_body: usize) -> Result<Bytes, Error> {
        loop {
            if self.buf.len() > max_body {
                return Err(Error::TooLarge);
            }
            if self.fill().await.is_err() {
                return Ok(self.buf.split().freeze());
            }
        }
    }

    /// A chunked body, its trailers skipped. Its framing (size lines, line ends, trailers)
    /// counts towards the bound too, as much again as `max_body` and 64 KiB: tiny chunks with
    /// long size lines, or trailers without end, cannot keep the reader busy past it.
    async fn chunked(&mut self, max_body: usize) -> Result<Bytes, Error> {
        let mut body = BytesMut::new();
        let mut framing = max_body.saturating_add(64 * 1024);
        let mut line = async |conn: &mut Self| {
            let line = conn.line().await?;
            framing = framing.checked_sub(line.len() + 2).ok_or(Error::TooLarge)?;
            Ok::<_, Error>(line)
        };
        loop {
            let size_line = line(self).await?;
            let size = std::str::from_utf8(&size_line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or_default().trim(), 16).ok())
                .ok_or(Error::Malformed)?;
            if size == 0 {
                while !line(self).await?.is_empty() {}
                return Ok(body.freeze());
            }
            if body.len().saturating_add(size) > max_body {
                return Err(Error::TooLarge);
            }
            body.extend_from_slice(&self.exactly(size).await?);
            if !line(self).await?.is_empty() {
                return Err(Error::Malformed);
            }
        }
    }

    /// One line, without its `\r\n`.
    async fn line(&mut self) -> Result<Bytes, Error> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(at).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Error::Malformed);
            }
            self.fill().await?;
        }
    }
}

/// How an answer's body ends.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Length {
    Fixed(usize),
    Chunked,
    UntilClose,
}

/// What the client needs of an answer's head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes the head takes, blank line included.
    len: usize,
    length: Length,
    keep_alive: bool,
}

/// The answer head at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf).map_err(|_| Error::Malformed)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = res.code.ok_or(Error::Malformed)?;
    let mut keep_alive = res.version == Some(1);
    let mut length = Length::UntilClose;
    for h in res.headers.iter() {
        let value = || std::str::from_utf8(h.value).map(str::trim).map_err(|_| Error::Malformed);
        if h.name.eq_ignore_ascii_case("content-length") && length == Length::UntilClose {
            length = Length::Fixed(value()?.parse().map_err(|_| Error::Malformed)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked wins over a length (RFC 9112, 6.3).
            if value()?.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked")) {
                length = Length::Chunked;
            }
        } else if h.name.eq_ignore_ascii_case("connection") {
            let value = value()?;
            if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                keep_alive = false;
            } else if value.split(',').any(|t| t.trim().eq_ignore_ascii_case("keep-alive")) {
                keep_alive = true;
            }
        }
    }
    Ok(Some(Head { status, len, length, keep_alive }))
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    #[test]
    fn heads() {
        let head = |s: &str| parse_head(s.as_bytes());
        let len = |s: &str| s.find("\r\n\r\n").unwrap() + 4;
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-len"), Ok(None));
        let created = "HTTP/1.1 201 Created\r\nContent-Length: 12\r\n\r\nrest";
        assert_eq!(
            head(created),
            Ok(Some(Head { status: 201, len: len(created), length: Length::Fixed(12), keep_alive: true }))
        );
        let chunked =
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n";
        assert_eq!(
            head(chunked),
            Ok(Some(Head { status: 200, len: len(chunked), length: Length::Chunked, keep_alive: false }))
        );
        let old = "HTTP/1.0 200 OK\r\n\r\n";
        assert_eq!(
            head(old),
            Ok(Some(Head { status: 200, len: len(old), length: Length::UntilClose, keep_alive: false }))
        );
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"), Err(Error::Malformed));
        assert_eq!(head("SSH-2.0-OpenSSH\r\n\r\n"), Err(Error::Malformed));
    }

    /// A server that reads each request and answers with the next of `answers` (raw bytes), or
    /// closes the connection unanswered for a `None`; it stops once all are used. Returns the
    /// requests it read and how many connections it took.
    async fn server(answers: Vec<Option<&'static str>>) -> (String, tokio::task::JoinHandle<(Vec<String>, usize)>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let served = tokio::spawn(async move {
            let (mut seen, mut conns) = (Vec::new(), 0);
            let mut answers = answers.into_iter().peekable();
            'conns: while answers.peek().is_some() {
                // Bounded, so that a client that never comes back fails the test, not hangs it.
                let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept()).await;
                let Ok(Ok((mut s, _))) = accepted else { break };
                conns += 1;
                loop {
                    let mut buf = Vec::new();
                    let mut byte = [0; 1];
                    while !buf.ends_with(b"\r\n\r\n") {
                        if s.read(&mut byte).await.unwrap_or(0) == 0 {
                            continue 'conns;
                        }
                        buf.push(byte[0]);
                    }
                    let head = String::from_utf8(buf).unwrap();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |n| n.parse::<usize>().unwrap());
                    let mut body = vec![0; length];
                    // Bounded too: a body that never comes in full fails the test.
                    let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut body)).await;
                    assert!(read.is_ok_and(|r| r.is_ok()), "the body of {head:?} did not come in full");
                    seen.push(format!("{head}{}", String::from_utf8(body).unwrap()));
                    match answers.next() {
                        Some(Some(answer)) => s.write_all(answer.as_bytes()).await.unwrap(),
                        Some(None) => continue 'conns,
                        None => break 'conns,
                    }
                }
            }
            (seen, conns)
        });
        (addr, served)
    }

    #[tokio::test]
    async fn requests_and_answers() {
        let (addr, served) = server(vec![
            Some("HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"),
            Some("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nt: 1\r\n\r\n"),
            Some("HTTP/1.1 204 No Content\r\n\r\n"),
            // Closed without an answer on the reused connection, then on a fresh one.
            None,
            None,
        ])
        .await;
        let pool = Pool::new(&addr, 4, Resend::Unanswered);
        let a = pool.send("POST", "/v1/tasks", &["authorization: ApiKey a k"], Some(b"{}")).await.unwrap();
        assert_eq!((a.status, &a.body[..]), (201, &b"ok"[..]));
        assert_eq!((a.header("Content-Length"), a.header("x-none")), (Some("2"), None));
        let b = pool.send("GET", "/v1/tasks?x=1", &[], None).await.unwrap();
        assert_eq!((b.status, &b.body[..]), (200, &b"abcde"[..]));
        let c = pool.send("PUT", "/r", &[], Some(b"[1]")).await.unwrap();
        assert_eq!((c.status, c.body.len()), (204, 0));
        // The one connection was reused throughout; now the server closes it unanswered: the
        // request goes out once more on a new connection, and is lost when that closes too.
        assert_eq!(pool.send("GET", "/gone", &[], None).await.unwrap_err(), Error::Lost);
        let (seen, conns) = served.await.unwrap();
        assert_eq!(conns, 2, "one kept alive throughout, one for the resend");
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert!(seen[3].starts_with("GET /gone ") && seen[4].starts_with("GET /gone "));
        assert_eq!(
            seen[0],
            format!(
                "POST /v1/tasks HTTP/1.1\r\nhost: {addr}\r\nauthorization: ApiKey a k\r\n\
                 content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
            )
        );
        assert!(seen[1].starts_with("GET /v1/tasks?x=1 HTTP/1.1\r\n") && !seen[1].contains("content-length"));
    }

    #[tokio::test]
    async fn a_large_body_goes_out_whole_with_its_head() {
        let (addr, served) = server(vec![
            Some("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"),
            Some("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n"),
        ])
        .await;
        let pool = Pool::new(&addr, 4, Resend::Never);
        // More than a socket takes in one write, then a small one on the same connection.
        let large = format!("\"{}\"", "x".repeat(8 << 20));
        let small = "[1]".to_owned();
        assert_eq!(pool.send("PUT", "/large", &[], Some(large.as_bytes())).await.unwrap().status, 201);
        assert_eq!(pool.send("PUT", "/small", &[], Some(small.as_bytes())).await.unwrap().status, 201);
        drop(pool); // closes the kept connection, which ends the server
        let (seen, conns) = served.await.unwrap();
        assert_eq!(conns, 1);
        let head = |path: &str, n: usize| {
            format!(
                "PUT {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {n}\r\n\r\n"
            )
        };
        assert_eq!(seen, [head("/large", large.len()) + &large, head("/small", small.len()) + &small]);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        // The first connection is closed by the server after its answer; the second request
        // must go out on a new one and succeed.
        let (addr, served) = server(vec![
            Some("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
            None,
            Some("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
        ])
        .await;
        let pool = Pool::new(&addr, 4, Resend::Unanswered);
        assert_eq!(&pool.send("GET", "/1", &[], None).await.unwrap().body[..], b"a");
        // Unanswered on the reused connection, then answered on a fresh one.
        assert_eq!(&pool.send("GET", "/2", &[], None).await.unwrap().body[..], b"b");
        drop(pool);
        assert_eq!(served.await.unwrap().0.len(), 3);
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_reused() {
        let ok = Some("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na");
        let (addr, served) = server(vec![ok, ok, ok]).await;
        let mut pool = Pool::new(&addr, 4, Resend::Never);
        pool.max_idle_time = Duration::from_millis(100);
        for pause in [0, 20, 300] {
            tokio::time::sleep(Duration::from_millis(pause)).await;
            pool.send("GET", "/", &[], None).await.unwrap();
        }
        drop(pool);
        // The second request reused the first connection; the third came after it was too old.
        assert_eq!(served.await.unwrap().1, 2);
    }

    #[tokio::test]
    async fn never_resent_when_told_so() {
        let (addr, served) = server(vec![Some("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"), None]).await;
        let pool = Pool::new(&addr, 4, Resend::Never);
        assert_eq!(&pool.send("GET", "/1", &[], None).await.unwrap().body[..], b"a");
        // Closed unanswered on the reused connection: lost, and the server saw it once.
        assert_eq!(pool.send("GET", "/2", &[], None).await.unwrap_err(), Error::Lost);
        drop(pool);
        assert_eq!(served.await.unwrap().0.len(), 2);
    }

    #[tokio::test]
    async fn an_absurd_length_is_refused() {
        let (addr, served) = server(vec![
            Some("HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\n\r\n"),
            Some("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"),
        ])
        .await;
        let pool = Pool::new(&addr, 1, Resend::Unanswered);
        assert_eq!(pool.send("GET", "/", &[], None).await.unwrap_err(), Error::TooLarge);
        assert_eq!(pool.send("GET", "/", &[], None).await.unwrap_err(), Error::Malformed);
        drop(pool);
        assert_eq!(served.await.unwrap().0.len(), 2);
    }

    #[tokio::test]
    async fn an_answer_over_the_requests_bound_is_refused_however_it_is_framed() {
        // Three 1-byte chunks, each with a size line of 30 KiB: 4 bytes of body, but more
        // framing than the body's bound and 64 KiB.
        let ext = format!("1;{}\r\na\r\n", "x".repeat(30 * 1024));
        let framed = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{}0\r\n\r\n", ext.repeat(3));
        let (addr, served) = server(vec![
            Some("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd"),
            // Refused by its length, before its body (which never comes) is waited for.
            Some("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Some("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            // Refused for what came with its head: the connection stays open.
            Some("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nabcde"),
            Some(framed.leak()),
            Some("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabcde"),
        ])
        .await;
        let pool = Pool::new(&addr, 1, Resend::Never);
        // Bounded in time: a refusal that waited for more would hang, not fail.
        let within = |path| tokio::time::timeout(Duration::from_secs(5), pool.send_within("GET", path, &[], None, 4));
        assert_eq!(&within("/exact").await.unwrap().unwrap().body[..], b"abcd");
        assert_eq!(within("/length").await.unwrap().unwrap_err(), Error::TooLarge);
        assert_eq!(within("/chunked").await.unwrap().unwrap_err(), Error::TooLarge);
        assert_eq!(within("/close").await.unwrap().unwrap_err(), Error::TooLarge);
        assert_eq!(within("/framing").await.unwrap().unwrap_err(), Error::TooLarge);
        // Without a bound of its own, the same answer is taken.
        assert_eq!(&pool.send("GET", "/unbounded", &[], None).await.unwrap().body[..], b"abcde");
        drop(pool);
        let (seen, conns) = served.await.unwrap();
        assert_eq!(seen.len(), 6);
        // A refused answer's connection is not kept: each refusal costs a new one.
        assert_eq!(conns, 5);
    }

    #[tokio::test]
    async fn a_body_goes_out_as_the_type_the_caller_gives() {
        let created = Some("HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        let (addr, served) = server(vec![created]).await;
        let pool = Pool::new(&addr, 1, Resend::Never);
        let typed = pool.send("PUT", "/d", &["Content-Type: application/octet-stream"], Some(b"{}\n\x01"));
        assert_eq!(typed.await.unwrap().status, 201);
        drop(pool);
        let seen = served.await.unwrap().0;
        assert_eq!(
            seen[0],
            format!(
                "PUT /d HTTP/1.1\r\nhost: {addr}\r\nContent-Type: application/octet-stream\r\n\
                 content-length: 4\r\n\r\n{{}}\n\x01"
            )
        );
    }

    #[tokio::test]
    async fn nobody_listening_is_connect() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert_eq!(
            Pool::new(&addr, 1, Resend::Unanswered).send("GET", "/", &[], None).await.unwrap_err(),
            Error::Connect
        );
    }
}

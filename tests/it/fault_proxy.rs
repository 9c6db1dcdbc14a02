//! A fault-injecting HTTP/1.1 proxy on loopback, in front of a store's S3 port.
//!
//! `FaultProxy::new(garage.s3_addr(0))` listens on a free port of 127.0.0.1; a client
//! pointed at `proxy.endpoint()` (`garage.env_via(&proxy.endpoint())`) goes through it.
//! Each client connection gets a thread and an upstream connection of its own; the
//! proxy reads every request and response by its framing (`Content-Length`, chunked
//! transfer coding, a response read to the close), so keep-alive connections carry
//! many requests and a fault hits exactly one of them. Rules (`proxy.add`) say which
//! requests: the next `n`, every `k`-th, each with probability `p` from a seeded
//! generator, each narrowed to a method and a part of the path. For each request the
//! rules are offered in the order they were added; each counts the requests it
//! matches, and the first that fires decides the request's fault:
//!
//! - `Drop`: the connection is reset, the request never reaches the store;
//! - `ResetBeforeResponse`: the store acts and answers, the client's connection is
//!   reset instead (the client cannot know whether the request took effect);
//! - `ResetAfter(n)`: the first `n` bytes of the response (head included), then a reset;
//! - `Status(code)`: the proxy answers `code` with an S3-style XML error body, the store
//!   never sees the request; the connection stays open;
//! - `Stall(until)`: the store's response is held until the test releases it
//!   (`release`, with `wait_stalled` to know a request is held) or for a duration;
//! - `Truncate`: the response head as the store sent it, then half of the body, then
//!   the connection is closed (the client reads fewer bytes than announced; a response
//!   without a body is sent whole before the close).
//!
//! A store that does not accept the proxy's connection resets the client's. Every
//! request seen (with its fault and status) is logged, so a test can assert that the
//! faults it asked for happened.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What happens to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Reset the client's connection without forwarding the request.
    Drop,
    /// Forward the request, read the store's whole response, reset the client's connection.
    ResetBeforeResponse,
    /// Forward, send the first `n` bytes of the response (head included), then reset.
    ResetAfter(usize),
    /// Answer with this status and an S3 error document, without forwarding.
    Status(u16),
    /// Forward, then hold the response until released.
    Stall(Until),
    /// Forward, send the head and half of the body, then close the connection.
    Truncate,
}

/// How long a stalled response is held.
#[derive(Clone, Debug, PartialEq)]
pub enum Until {
    /// Until the test calls `FaultProxy::release` (or the proxy is dropped).
    Released,
    /// For this long (or until released).
    For(Duration),
}

/// When a rule fires, among the requests it matches.
#[derive(Clone, Debug)]
enum Schedule {
    /// The next `n` matching requests (counted when this rule's fault is applied).
    Next(u64),
    /// Every `k`-th matching request: the k-th, 2k-th...
    Every(u64),
    /// Each matching request with probability `p`, from a generator seeded by the test.
    Random { p: f64, state: u64 },
}

/// A fault and the requests it applies to.
#[derive(Clone, Debug)]
pub struct Rule {
    fault: Fault,
    schedule: Schedule,
    method: Option<String>,
    path: Option<String>,
    /// Matching requests offered so far.
    seen: u64,
    /// Times this rule's fault was applied.
    fired: u64,
}

impl Rule {
    fn new(schedule: Schedule, fault: Fault) -> Rule {
        Rule {
            fault,
            schedule,
            method: None,
            path: None,
            seen: 0,
            fired: 0,
        }
    }

    /// The next `n` matching requests.
    pub fn next(n: u64, fault: Fault) -> Rule {
        Rule::new(Schedule::Next(n), fault)
    }

    /// Every matching request.
    pub fn always(fault: Fault) -> Rule {
        Rule::new(Schedule::Next(u64::MAX), fault)
    }

    /// Every `k`-th matching request (the k-th, the 2k-th...).
    pub fn every(k: u64, fault: Fault) -> Rule {
        assert!(k > 0);
        Rule::new(Schedule::Every(k), fault)
    }

    /// Each matching request with probability `p`, drawn from a generator seeded with
    /// `seed` (the same seed and requests give the same faults).
    pub fn random(p: f64, seed: u64, fault: Fault) -> Rule {
        assert!((0.0..=1.0).contains(&p));
        Rule::new(Schedule::Random { p, state: seed }, fault)
    }

    /// Only requests of this method (`GET`, `PUT`...).
    pub fn method(mut self, method: &str) -> Rule {
        self.method = Some(method.to_owned());
        self
    }

    /// Only requests whose target (path and query) contains `part`.
    pub fn path_contains(mut self, part: &str) -> Rule {
        self.path = Some(part.to_owned());
        self
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self.path.as_deref().is_none_or(|p| target.contains(p))
    }

    /// Offers a matching request: counts it and says whether this rule would fire.
    fn offer(&mut self) -> bool {
        self.seen += 1;
        match &mut self.schedule {
            Schedule::Next(n) => self.fired < *n,
            Schedule::Every(k) => self.seen.is_multiple_of(*k),
            Schedule::Random { p, state } => {
                // splitmix64, as the model test's generator.
                *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = *state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64) < *p
            }
        }
    }
}

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// 1 for the first request through the proxy, in the order their heads arrived.
    pub seq: u64,
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// The response's status (the store's, or the one injected), once its head came.
    pub status: Option<u16>,
    /// Whether the store sent the response body chunked.
    pub chunked: bool,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    seen: Vec<Seen>,
    connections: u64,
    /// Bumped by `release`; a stall waits for it to change.
    releases: u64,
    stalled: usize,
    stopping: bool,
    /// Every socket of the proxy, shut down on drop so that every thread ends.
    sockets: HashMap<u64, Vec<TcpStream>>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The proxy: listening on 127.0.0.1 until dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 in front of `upstream`, passing everything
    /// through until rules are added.
    pub fn new(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut threads = Vec::new();
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let shared = shared.clone();
                    threads.push(std::thread::spawn(move || serve(&shared, client)));
                }
                threads
            })
        };
        FaultProxy {
            addr,
            shared,
            stop,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a rule after those there are.
    pub fn add(&self, rule: Rule) {
        self.shared.lock().rules.push(rule);
    }

    /// Removes every rule: from now on everything passes through.
    pub fn clear(&self) {
        self.shared.lock().rules.clear();
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// The number of requests seen.
    pub fn requests(&self) -> u64 {
        self.shared.lock().seen.len() as u64
    }

    /// The requests a fault was applied to.
    pub fn faulted(&self) -> Vec<Seen> {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.fault.is_some())
            .cloned()
            .collect()
    }

    /// The number of client connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.lock().connections
    }

    /// Releases every response stalled until now.
    pub fn release(&self) {
        self.shared.lock().releases += 1;
        self.shared.changed.notify_all();
    }

    /// Waits until at least `n` responses are held by stalls (panics after 60 s).
    pub fn wait_stalled(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut st = self.shared.lock();
        while st.stalled < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{} responses stalled, not {n}", st.stalled);
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let mut st = self.shared.lock();
            st.stopping = true;
            for s in st.sockets.values().flatten() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        // Wake the acceptor with a connection of our own.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take()
            && let Ok(threads) = acceptor.join()
        {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    /// Read until the sender closes (responses only).
    ToClose,
}

/// A request or response head: the raw bytes and what the proxy needs of them.
struct Head {
    raw: Vec<u8>,
    /// Request: method, target, version. Response: version, status, reason.
    start: [String; 3],
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn body(&self) -> io::Result<Body> {
        if self.has_token("transfer-encoding", "chunked") {
            return Ok(Body::Chunked);
        }
        match self.header("content-length") {
            Some(v) => v
                .trim()
                .parse()
                .map(Body::Length)
                .map_err(|_| bad("bad Content-Length")),
            None => Ok(Body::None),
        }
    }

    /// Whether the connection ends after this message (HTTP/1.0, or `Connection: close`).
    fn closes(&self, version: &str) -> bool {
        self.has_token("connection", "close") || version == "HTTP/1.0"
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads a message head; `None` at a clean end of stream before its first byte.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        if r.read_until(b'\n', &mut raw)? == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(bad("head cut short"))
            };
        }
        if raw.len() > 64 * 1024 {
            return Err(bad("head over 64 KiB"));
        }
        let line = &raw[before..];
        if (line == b"\r\n" || line == b"\n") && before > 0 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let mut start = lines.next().unwrap_or("").splitn(3, ' ').map(str::to_owned);
    let start = [
        start.next().unwrap_or_default(),
        start.next().unwrap_or_default(),
        start.next().unwrap_or_default(),
    ];
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Some(Head {
        raw,
        start,
        headers,
    }))
}

/// Copies a body of the given framing from `r` to `w`, raw (chunk sizes and trailers
/// included).
fn copy_body(r: &mut impl BufRead, body: Body, w: &mut impl Write) -> io::Result<()> {
    match body {
        Body::None => Ok(()),
        Body::Length(n) => {
            let copied = io::copy(&mut r.take(n), w)?;
            if copied < n {
                return Err(bad("body cut short"));
            }
            Ok(())
        }
        Body::ToClose => io::copy(r, w).map(|_| ()),
        Body::Chunked => loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                return Err(bad("chunked body cut short"));
            }
            w.write_all(&line)?;
            let text = String::from_utf8_lossy(&line);
            let size = u64::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers up to an empty line.
                loop {
                    let mut t = Vec::new();
                    if r.read_until(b'\n', &mut t)? == 0 {
                        return Err(bad("trailers cut short"));
                    }
                    w.write_all(&t)?;
                    if t == b"\r\n" || t == b"\n" {
                        return Ok(());
                    }
                }
            }
            // The chunk and its CRLF.
            let want = size + 2;
            if io::copy(&mut r.take(want), w)? < want {
                return Err(bad("chunk cut short"));
            }
        },
    }
}

/// A writer that takes `budget` bytes and fails after them.
struct Budget<'a, W> {
    inner: &'a mut W,
    left: usize,
}

impl<W: Write> Write for Budget<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("the fault's byte budget is spent"));
        }
        let n = self.inner.write(&buf[..buf.len().min(self.left)])?;
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How a client connection ends.
enum Ending {
    /// Shut down: the client reads the end of the stream.
    Close,
    /// Closed with a zero linger: the client reads ECONNRESET.
    Reset,
}

/// Makes the last close of `s` send a reset (a shutdown first would send a FIN).
fn arm_reset(s: &TcpStream) -> Ending {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
    Ending::Reset
}

/// The S3-style error document answered for `Fault::Status`.
fn error_response(code: u16, head_only: bool, closes: bool, seq: u64, target: &str) -> Vec<u8> {
    let (reason, s3_code) = match code {
        500 => ("Internal Server Error", "InternalError"),
        503 => ("Service Unavailable", "ServiceUnavailable"),
        _ => ("Injected Fault", "InjectedFault"),
    };
    let resource = target
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{s3_code}</Code>\
         <Message>fault injected by the test proxy</Message><Resource>{resource}</Resource>\
         <RequestId>fault-{seq}</RequestId></Error>"
    );
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nx-amz-request-id: fault-{seq}\r\n{}\r\n",
        body.len(),
        if closes { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Serves one client connection until it closes or a fault ends it.
fn serve(shared: &Shared, client: TcpStream) {
    let conn = {
        let mut st = shared.lock();
        if st.stopping {
            return;
        }
        st.connections += 1;
        let conn = st.connections;
        if let Ok(c) = client.try_clone() {
            st.sockets.entry(conn).or_default().push(c);
        }
        conn
    };
    let ending = serve_requests(shared, conn, &client).unwrap_or(Ending::Close);
    let clones = shared.lock().sockets.remove(&conn).unwrap_or_default();
    if let Ending::Close = ending {
        let _ = client.shutdown(Shutdown::Both);
        for s in &clones {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    // Dropping the last descriptors closes the sockets (a reset when armed).
}

fn serve_requests(shared: &Shared, conn: u64, client: &TcpStream) -> io::Result<Ending> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client.try_clone()?;
    let mut upstream: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some(req) = read_head(&mut from_client)? else {
            return Ok(Ending::Close);
        };
        let [method, target, version] = req.start.clone();
        let req_body = req.body()?;
        let client_closes = req.closes(&version);
        let (seq, fault) = {
            let mut st = shared.lock();
            let seq = st.seen.len() as u64 + 1;
            let mut chosen: Option<usize> = None;
            for (i, rule) in st.rules.iter_mut().enumerate() {
                if rule.matches(&method, &target) && rule.offer() && chosen.is_none() {
                    chosen = Some(i);
                }
            }
            let fault = chosen.map(|i| {
                st.rules[i].fired += 1;
                st.rules[i].fault.clone()
            });
            st.seen.push(Seen {
                seq,
                method: method.clone(),
                target: target.clone(),
                fault: fault.clone(),
                status: None,
                chunked: false,
            });
            (seq, fault)
        };

        match &fault {
            Some(Fault::Drop) => {
                return Ok(arm_reset(client));
            }
            Some(Fault::Status(code)) => {
                shared.lock().seen[seq as usize - 1].status = Some(*code);
                if req.has_token("expect", "100-continue") {
                    // The body would come only after a 100 Continue: answer and close.
                    let out = error_response(*code, method == "HEAD", true, seq, &target);
                    to_client.write_all(&out)?;
                    return Ok(Ending::Close);
                }
                copy_body(&mut from_client, req_body, &mut io::sink())?;
                let out = error_response(*code, method == "HEAD", client_closes, seq, &target);
                to_client.write_all(&out)?;
                if client_closes {
                    return Ok(Ending::Close);
                }
                continue;
            }
            _ => {}
        }

        // Forward the request on this connection's upstream connection, a new one if
        // the store closed the last (an idle keep-alive connection may be closed).
        if upstream.as_ref().is_some_and(|(_, s)| !still_open(s)) {
            upstream = None;
        }
        if upstream.is_none() {
            let s = match TcpStream::connect(shared.upstream) {
                Ok(s) => s,
                Err(_) => {
                    // The store is down: so is the proxy, for this client.
                    return Ok(arm_reset(client));
                }
            };
            if let Ok(c) = s.try_clone() {
                shared.lock().sockets.entry(conn).or_default().push(c);
            }
            upstream = Some((BufReader::new(s.try_clone()?), s));
        }
        let (from_up, to_up) = upstream.as_mut().unwrap();
        let expects_continue = req.has_token("expect", "100-continue");
        if expects_continue {
            // Answer the client's expectation here and send the store the whole request.
            to_client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            let raw = String::from_utf8_lossy(&req.raw).into_owned();
            let kept: String = raw
                .split_inclusive('\n')
                .filter(|l| !l.to_ascii_lowercase().starts_with("expect:"))
                .collect();
            to_up.write_all(kept.as_bytes())?;
        } else {
            to_up.write_all(&req.raw)?;
        }
        copy_body(&mut from_client, req_body, to_up)?;
        to_up.flush()?;

        // The response; interim (1xx) ones are passed on as they come.
        let resp = loop {
            let head = read_head(from_up)?.ok_or_else(|| bad("the store closed"))?;
            let status: u16 = head.start[1].parse().map_err(|_| bad("bad status"))?;
            if (100..200).contains(&status) && status != 101 {
                if !expects_continue || status != 100 {
                    to_client.write_all(&head.raw)?;
                }
                continue;
            }
            break head;
        };
        let status: u16 = resp.start[1].parse().unwrap_or(0);
        let resp_body = if method == "HEAD" || status == 204 || status == 304 {
            Body::None
        } else {
            match resp.body()? {
                Body::None => Body::ToClose,
                b => b,
            }
        };
        let closes = client_closes || resp.closes(&resp.start[0]) || resp_body == Body::ToClose;
        {
            let mut st = shared.lock();
            let seen = &mut st.seen[seq as usize - 1];
            seen.status = Some(status);
            seen.chunked = resp_body == Body::Chunked;
        }

        match fault {
            Some(Fault::ResetBeforeResponse) => {
                copy_body(from_up, resp_body, &mut io::sink())?;
                return Ok(arm_reset(client));
            }
            Some(Fault::ResetAfter(n)) => {
                let mut budget = Budget {
                    inner: &mut to_client,
                    left: n,
                };
                let _ = budget
                    .write_all(&resp.raw)
                    .and_then(|()| copy_body(from_up, resp_body, &mut budget));
                to_client.flush()?;
                return Ok(arm_reset(client));
            }
            Some(Fault::Truncate) => {
                let mut body = Vec::new();
                copy_body(from_up, resp_body, &mut body)?;
                to_client.write_all(&resp.raw)?;
                to_client.write_all(&body[..body.len() / 2])?;
                to_client.flush()?;
                let _ = client.shutdown(Shutdown::Both);
                return Ok(Ending::Close);
            }
            Some(Fault::Stall(until)) => {
                stall(shared, &until);
            }
            _ => {}
        }
        to_client.write_all(&resp.raw)?;
        copy_body(from_up, resp_body, &mut to_client)?;
        to_client.flush()?;
        if closes {
            return Ok(Ending::Close);
        }
    }
}

/// Whether the peer of an idle connection has not closed it (nothing to read yet).
fn still_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let open = matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).is_ok() && open
}

/// Holds the calling connection until released, `until` passes or the proxy stops.
fn stall(shared: &Shared, until: &Until) {
    let deadline = match until {
        Until::Released => None,
        Until::For(d) => Some(Instant::now() + *d),
    };
    let mut st = shared.lock();
    let releases = st.releases;
    st.stalled += 1;
    shared.changed.notify_all();
    while st.releases == releases && !st.stopping {
        st = match deadline {
            None => shared.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                shared
                    .changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
    st.stalled -= 1;
}

// ---------------------------------------------------------------- self-tests

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use object_store::{ClientOptions, RetryConfig};

    use super::*;
    use crate::garage::Garage;
    use crate::support::*;

    fn no_retries() -> RetryConfig {
        RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        }
    }

    /// A client connection speaking raw HTTP/1.1 to the proxy.
    struct Conn {
        r: BufReader<TcpStream>,
        w: TcpStream,
    }

    impl Conn {
        fn open(addr: SocketAddr) -> Conn {
            let w = TcpStream::connect(addr).unwrap();
            w.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            Conn {
                r: BufReader::new(w.try_clone().unwrap()),
                w,
            }
        }

        fn send(&mut self, raw: &[u8]) {
            self.w.write_all(raw).unwrap();
        }

        fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
            self.send(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
            self.response().unwrap()
        }

        /// The next response: its status and body (a chunked body decoded).
        fn response(&mut self) -> io::Result<(u16, Vec<u8>)> {
            let head = read_head(&mut self.r)?.ok_or_else(|| bad("closed"))?;
            let status = head.start[1].parse().unwrap();
            let framing = head.body()?;
            let mut raw = Vec::new();
            copy_body(&mut self.r, framing, &mut raw)?;
            let body = if framing == Body::Chunked {
                dechunk(&raw)
            } else {
                raw
            };
            Ok((status, body))
        }

        /// Everything until the connection ends, and how it ended (`None`: a clean close).
        fn rest(&mut self) -> (Vec<u8>, Option<io::ErrorKind>) {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match self.r.read(&mut buf) {
                    Ok(0) => return (got, None),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return (got, Some(e.kind())),
                }
            }
        }
    }

    fn dechunk(mut raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let eol = raw.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&raw[..eol]).unwrap(), 16).unwrap();
            raw = &raw[eol + 2..];
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&raw[..size]);
            raw = &raw[size + 2..];
        }
    }

    fn statuses(proxy: &FaultProxy) -> Vec<Option<u16>> {
        proxy.seen().iter().map(|s| s.status).collect()
    }

    #[test]
    fn passes_s3_requests_through_on_kept_alive_connections() {
        let Some(g) = Garage::single() else { return };
        let proxy = FaultProxy::new(g.s3_addr(0));
        let s3 = g.client_via(&proxy.endpoint(), false);
        let data = random_bytes("proxy", 1 << 20);
        s3.put("a", &data).unwrap();
        s3.put("b", b"bee").unwrap();
        assert_eq!(s3.get("a").unwrap(), data);
        assert_eq!(s3.get_range("a", 5..10).unwrap(), &data[5..10]);
        assert_eq!(s3.list("").unwrap().len(), 2);
        s3.delete("b").unwrap();
        assert!(matches!(
            s3.get("b"),
            Err(object_store::Error::NotFound { .. })
        ));
        let seen = proxy.seen();
        let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
        assert_eq!(
            methods,
            ["PUT", "PUT", "GET", "GET", "GET", "DELETE", "GET"]
        );
        assert_eq!(
            statuses(&proxy),
            [200, 200, 200, 206, 200, 204, 404].map(Some)
        );
        assert!(proxy.faulted().is_empty());
        assert!(
            proxy.connections() < proxy.requests(),
            "{} connections for {} requests: keep-alive lost",
            proxy.connections(),
            proxy.requests()
        );
        // Garage 2.5 frames these responses with Content-Length.
        assert!(seen.iter().all(|s| !s.chunked), "{seen:?}");
        // Direct to the store, the same bytes.
        assert_eq!(g.client().get("a").unwrap(), data);
    }

    #[test]
    fn injected_statuses_are_s3_errors_that_never_reach_the_store() {
        let Some(g) = Garage::single() else { return };
        let proxy = FaultProxy::new(g.s3_addr(0));
        let s3 = g.client_via(&proxy.endpoint(), false);
        proxy.add(Rule::next(2, Fault::Status(503)));
        let e = s3.put("x", b"first").unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
        let e = s3.put("x", b"second").unwrap_err().to_string();
        assert!(e.contains("503"), "{e}");
        assert_eq!(
            g.client().list("").unwrap(),
            vec![],
            "a 503'd PUT was stored"
        );
        s3.put("x", b"third").unwrap();
        assert_eq!(g.client().get("x").unwrap(), b"third");

        // The body is an S3 error document, and the connection stays usable.
        proxy.add(Rule::next(1, Fault::Status(500)));
        let mut c = Conn::open(proxy.addr());
        let (status, body) = c.get("/volsnap-test/x");
        assert_eq!(status, 500);
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("<Code>InternalError</Code>"), "{body}");
        assert!(
            body.contains("<Resource>/volsnap-test/x</Resource>"),
            "{body}"
        );
        assert_eq!(c.get("/volsnap-test/x").0, 403, "anonymous, from Garage");

        // With retries, the client goes through the faults.
        proxy.add(Rule::next(3, Fault::Status(503)));
        assert_eq!(
            g.client_via(&proxy.endpoint(), true).get("x").unwrap(),
            b"third"
        );
        let faulted = proxy.faulted();
        assert_eq!(faulted.len(), 6, "{faulted:?}");
        assert_eq!(
            statuses(&proxy),
            [503, 503, 200, 500, 403, 503, 503, 503, 200].map(Some)
        );
    }

    #[test]
    fn resets_before_and_within_the_response() {
        let Some(g) = Garage::single() else { return };
        let proxy = FaultProxy::new(g.s3_addr(0));
        let s3 = g.client_via(&proxy.endpoint(), false);

        // Dropped: the store never saw the PUT.
        proxy.add(Rule::next(1, Fault::Drop));
        s3.put("dropped", b"d").unwrap_err();
        // Reset before the response: the store stored it, the client cannot know.
        proxy.add(Rule::next(1, Fault::ResetBeforeResponse));
        s3.put("stored", b"s").unwrap_err();
        let direct = g.client();
        assert_eq!(direct.list("").unwrap(), vec![("stored".to_owned(), 1)]);

        // Reset after 50 bytes: exactly those arrive, then ECONNRESET.
        proxy.add(Rule::next(1, Fault::ResetAfter(50)));
        let mut c = Conn::open(proxy.addr());
        c.send(b"GET /volsnap-test/stored HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let (got, end) = c.rest();
        assert_eq!(got.len(), 50, "{}", String::from_utf8_lossy(&got));
        assert!(got.starts_with(b"HTTP/1.1 403 "));
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));

        // A client with retries rides over a reset every other request.
        proxy.add(Rule::every(2, Fault::ResetBeforeResponse));
        let s3 = g.client_via(&proxy.endpoint(), true);
        for i in 0..6 {
            s3.put(&format!("r/{i}"), format!("object {i}").as_bytes())
                .unwrap();
        }
        for i in 0..6 {
            assert_eq!(
                direct.get(&format!("r/{i}")).unwrap(),
                format!("object {i}").as_bytes()
            );
        }
        assert!(proxy.faulted().len() >= 6, "{:?}", proxy.faulted());
        let kinds: Vec<Fault> = proxy
            .faulted()
            .into_iter()
            .filter_map(|s| s.fault)
            .collect();
        assert_eq!(
            kinds[..3],
            [
                Fault::Drop,
                Fault::ResetBeforeResponse,
                Fault::ResetAfter(50)
            ]
        );
    }

    #[test]
    fn truncated_bodies_announce_more_than_they_send() {
        let Some(g) = Garage::single() else { return };
        let data = random_bytes("truncated", 100_000);
        g.client().put("t", &data).unwrap();
        let proxy = FaultProxy::new(g.s3_addr(0));
        proxy.add(Rule::next(2, Fault::Truncate));

        let mut c = Conn::open(proxy.addr());
        c.send(b"GET /volsnap-test/t HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let head = read_head(&mut c.r).unwrap().unwrap();
        let Ok(Body::Length(announced)) = head.body() else {
            panic!("no Content-Length")
        };
        let (body, end) = c.rest();
        assert_eq!(end, None, "closed, not reset");
        assert!(!body.is_empty() && (body.len() as u64) < announced);

        let s3 = g.client_via(&proxy.endpoint(), false);
        let e = s3.get("t").unwrap_err();
        eprintln!("a truncated GET: {e}");
        assert_eq!(s3.get("t").unwrap(), data, "the rule was spent");
        assert_eq!(proxy.faulted().len(), 2);
    }

    #[test]
    fn a_stalled_response_waits_for_its_release() {
        let Some(g) = Garage::single() else { return };
        g.client().put("s", b"stalled").unwrap();
        let proxy = FaultProxy::new(g.s3_addr(0));
        proxy.add(Rule::next(1, Fault::Stall(Until::Released)));
        let endpoint = proxy.endpoint();
        let g = std::sync::Arc::new(g);
        let reader = {
            let g = g.clone();
            std::thread::spawn(move || g.client_via(&endpoint, false).get("s").unwrap())
        };
        proxy.wait_stalled(1);
        assert!(!reader.is_finished(), "a stalled response arrived");
        proxy.release();
        assert_eq!(reader.join().unwrap(), b"stalled");

        // A client whose timeout passes while the response is held gives up.
        proxy.add(Rule::next(1, Fault::Stall(Until::Released)));
        let impatient = g.client_with(
            &proxy.endpoint(),
            no_retries(),
            ClientOptions::new().with_timeout(Duration::from_millis(300)),
        );
        let e = format!("{:?}", impatient.get("s").unwrap_err());
        assert!(
            e.to_lowercase().contains("timed out") || e.contains("Timeout"),
            "{e}"
        );
        proxy.release();

        // A stall of a given time delays the response by at least that long.
        proxy.add(Rule::next(
            1,
            Fault::Stall(Until::For(Duration::from_millis(300))),
        ));
        let t = Instant::now();
        assert_eq!(
            g.client_via(&proxy.endpoint(), false).get("s").unwrap(),
            b"stalled"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn rules_count_their_requests_and_the_first_that_fires_wins() {
        let Some(g) = Garage::single() else { return };
        let proxy = FaultProxy::new(g.s3_addr(0));
        proxy.add(Rule::every(2, Fault::Status(500)));
        proxy.add(Rule::every(3, Fault::Status(503)));
        // One keep-alive connection: injected and forwarded answers interleave on it.
        let mut c = Conn::open(proxy.addr());
        let got: Vec<u16> = (0..7).map(|_| c.get("/volsnap-test/k").0).collect();
        assert_eq!(got, [403, 500, 503, 500, 403, 500, 403]);
        assert_eq!(proxy.connections(), 1);
        proxy.clear();

        // By method and path.
        proxy.add(
            Rule::always(Fault::Status(500))
                .method("PUT")
                .path_contains("/locks/"),
        );
        let s3 = g.client_via(&proxy.endpoint(), false);
        assert!(
            s3.put("locks/l", b"l")
                .unwrap_err()
                .to_string()
                .contains("500")
        );
        s3.put("data/d", b"d").unwrap();
        s3.put("locks-not/d", b"d").unwrap();
        assert!(matches!(
            s3.get("locks/l"),
            Err(object_store::Error::NotFound { .. })
        ));
        let faulted: Vec<String> = proxy
            .faulted()
            .into_iter()
            .filter(|s| s.seq > 7)
            .map(|s| s.target)
            .collect();
        assert_eq!(faulted, ["/volsnap-test/locks/l"]);
    }

    #[test]
    fn random_faults_repeat_with_their_seed() {
        let Some(g) = Garage::single() else { return };
        let run = |seed: u64| {
            let proxy = FaultProxy::new(g.s3_addr(0));
            proxy.add(Rule::random(0.3, seed, Fault::Status(503)));
            let mut c = Conn::open(proxy.addr());
            for _ in 0..60 {
                c.get("/volsnap-test/k");
            }
            proxy.faulted().iter().map(|s| s.seq).collect::<Vec<u64>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert!((5..=35).contains(&a.len()), "{} of 60 at p = 0.3", a.len());
        assert_ne!(a, run(8));
    }

    #[test]
    fn chunked_request_bodies_reach_the_store_whole() {
        // Garage's admin API reads a chunked JSON body (its S3 clients send lengths).
        let Some(g) = Garage::single() else { return };
        let proxy = FaultProxy::new(g.admin_addr(0));
        let mut c = Conn::open(proxy.addr());
        let body = br#"{"globalAlias": "sent-in-chunks"}"#;
        let mut req = format!(
            "POST /v2/CreateBucket HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
            g.admin_token()
        )
        .into_bytes();
        for part in body.chunks(7) {
            req.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
            req.extend_from_slice(part);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        c.send(&req);
        let (status, created) = c.response().unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&created));
        // The next request on the same connection is read from the right place.
        c.send(
            format!(
                "GET /v2/GetBucketInfo?globalAlias=sent-in-chunks HTTP/1.1\r\n\
                 Host: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
                g.admin_token()
            )
            .as_bytes(),
        );
        let (status, info) = c.response().unwrap();
        assert_eq!(status, 200);
        let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
        assert_eq!(info["globalAliases"][0], "sent-in-chunks");
        assert_eq!(proxy.requests(), 2);
        assert_eq!(proxy.connections(), 1);
    }

    /// Python's HTTP/1.1 server answering every GET with a chunked body (Garage 2.5
    /// sends lengths), on a free port; killed on drop.
    struct ChunkedServer(Child, SocketAddr);

    impl ChunkedServer {
        fn start() -> ChunkedServer {
            let script = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in [b"one ", b"two ", self.path.encode()]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
            let mut child = Command::new("python3")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 (.ci/test installs it)");
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            let port: u16 = line.trim().parse().unwrap();
            ChunkedServer(child, SocketAddr::from(([127, 0, 0, 1], port)))
        }
    }

    impl Drop for ChunkedServer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn chunked_responses_pass_whole_or_cut() {
        let server = ChunkedServer::start();
        let proxy = FaultProxy::new(server.1);
        let mut c = Conn::open(proxy.addr());
        assert_eq!(c.get("/first"), (200, b"one two /first".to_vec()));
        assert_eq!(c.get("/second"), (200, b"one two /second".to_vec()));
        assert!(proxy.seen().iter().all(|s| s.chunked));
        assert_eq!(proxy.connections(), 1);

        proxy.add(Rule::next(1, Fault::Truncate));
        let mut c = Conn::open(proxy.addr());
        c.send(b"GET /cut HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let head = read_head(&mut c.r).unwrap().unwrap();
        assert_eq!(head.body().unwrap(), Body::Chunked);
        let (raw, end) = c.rest();
        assert_eq!(end, None);
        assert!(!raw.ends_with(b"0\r\n\r\n"), "the last chunk arrived");
        assert!(!raw.is_empty());
    }

    #[test]
    fn a_store_that_is_down_resets_every_connection() {
        // A port nothing listens on.
        let down = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = FaultProxy::new(down);
        let mut c = Conn::open(proxy.addr());
        c.send(b"GET /volsnap-test/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        let (got, end) = c.rest();
        assert!(got.is_empty());
        assert_eq!(end, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(proxy.requests(), 1);
        assert!(proxy.faulted().is_empty());
    }

    #[test]
    fn dropping_the_proxy_ends_stalls_and_connections() {
        let server = ChunkedServer::start();
        let proxy = FaultProxy::new(server.1);
        proxy.add(Rule::always(Fault::Stall(Until::Released)));
        let addr = proxy.addr();
        let client = std::thread::spawn(move || {
            let mut c = Conn::open(addr);
            c.send(b"GET /held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
            c.rest()
        });
        let idle = Conn::open(addr);
        proxy.wait_stalled(1);
        drop(proxy);
        let (got, _) = client.join().unwrap();
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
        drop(idle);
        assert!(TcpStream::connect(addr).is_err(), "still listening");
    }
}

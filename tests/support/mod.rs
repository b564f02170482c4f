//! Shared harness for end-to-end tests.
//!
//! - [`TestCa`]: a throwaway CA (rcgen) and leaf certificates as PEM files.
//! - [`Proxy`]: the `portcullis` binary as a child process (`run -c FILE`),
//!   started on port 0 and read back from its `listening ...` / `ready` lines.
//! - [`Upstream`]: `tests/fixtures/upstream.py` on 127.0.0.2 (HTTPS + HTTP),
//!   whose event lines on stdout the tests wait on.
//! - Small blocking HTTP and Prometheus-text helpers, client commands with the
//!   proxy environment cleaned, and bounded waits (no sleeps as synchronisation:
//!   every wait is on an event or a polled condition with a deadline).
//!
//! Every child is killed when its owner drops; every wait has a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

/// Where upstream servers listen (loopback, but not 127.0.0.1: the proxy's
/// guard for 127.0.0.1 is tested separately).
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Default deadline for network reads in helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// Proxy environment variables removed from every child process.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "ftp_proxy",
    "FTP_PROXY",
    "no_proxy",
    "NO_PROXY",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "PIP_INDEX_URL",
    "PIP_PROXY",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

// ---------------------------------------------------------------------------
// Waiting

/// Polls `cond` until it holds or `timeout` passes; true if it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Lines read from a child's pipe by a background thread, with waits on them.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<LinesState>, Condvar)>,
}

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    closed: bool,
}

impl Lines {
    /// Starts a thread that reads `reader` line by line until EOF.
    pub fn spawn_reader<R: Read + Send + 'static>(reader: R) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        sink.push(line);
                    }
                }
            }
            let (lock, cv) = &*sink.inner;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        lines
    }

    fn push(&self, line: String) {
        let (lock, cv) = &*self.inner;
        lock.lock().unwrap().lines.push(line);
        cv.notify_all();
    }

    /// Every line so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    /// Waits until `cond` holds on the lines read so far (re-checked on every
    /// new line); false on timeout or when the pipe closed without it holding.
    pub fn wait(&self, timeout: Duration, mut cond: impl FnMut(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut state = lock.lock().unwrap();
        loop {
            if cond(&state.lines) {
                return true;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                return false;
            }
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits for a line satisfying `pred` and returns it.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        self.wait(timeout, |lines| {
            found = lines.iter().find(|l| pred(l)).cloned();
            found.is_some()
        });
        found
    }
}

// ---------------------------------------------------------------------------
// Child processes and client tools

/// Whether running `program args` succeeds (the tool is installed and works).
pub fn tool_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True when `available`; otherwise prints `SKIPPED: why` and returns false,
/// or panics when `CI=true` (CI must run every test).
pub fn require(available: bool, why: &str) -> bool {
    if available {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("required tool missing in CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// python3 is needed for every test with an upstream.
pub fn have_python() -> bool {
    require(tool_works("python3", &["--version"]), "python3 not found")
}

/// A command with every proxy-related variable removed and `NO_PROXY=""`.
pub fn client_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "").env("no_proxy", "");
    cmd
}

/// Runs `cmd` to completion with `stdin` as input, killing it after `timeout`
/// (and then panicking with what it printed).
pub fn run_command(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap();
            let stderr = err.join().unwrap();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn collect<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// stdout and stderr of an output, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "status: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Sends a signal with `kill(1)` (no libc crate).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Waits for `child` to exit within `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A child killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// Test CA

/// A throwaway CA whose certificate and leaves live as PEM files in a tempdir.
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    ca_path: PathBuf,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A new CA, written to `ca.pem`.
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, issuer.pem()).unwrap();
        TestCa {
            dir,
            issuer,
            ca_path,
        }
    }

    /// Path of the CA bundle (PEM).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a server certificate for `names`; returns (cert PEM path, key PEM path).
    pub fn leaf(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{}.crt", names[0]));
        let key_path = self.dir.path().join(format!("{}.key", names[0]));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    /// A rustls client config trusting only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------
// HTTP over raw sockets

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// First header of that name (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A response head: status, reason, headers.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// Connects with read and write timeouts set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub fn read_head(r: &mut impl Read) -> io::Result<Head> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 256 * 1024 {
            return Err(io::Error::other("response head over 256 KiB"));
        }
        match r.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "EOF after {} bytes of head: {:?}",
                        buf.len(),
                        String::from_utf8_lossy(&buf)
                    ),
                ));
            }
            _ => buf.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::other(format!(
            "not an HTTP response: {status_line:?}"
        )));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Head {
        status,
        reason,
        headers,
    })
}

/// Reads a body framed by `head` (chunked, Content-Length, or until EOF).
pub fn read_body(r: &mut impl Read, head: &Head, head_request: bool) -> io::Result<Vec<u8>> {
    if head_request || head.status / 100 == 1 || head.status == 204 || head.status == 304 {
        return Ok(Vec::new());
    }
    let te = header(&head.headers, "transfer-encoding").unwrap_or_default();
    if te.to_ascii_lowercase().contains("chunked") {
        let mut body = Vec::new();
        loop {
            let line = read_line(r)?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                loop {
                    if read_line(r)?.is_empty() {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            read_line(r)?;
        }
    }
    if let Some(len) = header(&head.headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| io::Error::other(format!("bad content-length {len:?}")))?;
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body)?;
    Ok(body)
}

fn read_line(r: &mut impl Read) -> io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        if r.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("line over 64 KiB"));
        }
    }
    buf.truncate(buf.len() - 2);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads a whole response.
pub fn read_response(r: &mut impl Read) -> io::Result<Response> {
    let head = read_head(r)?;
    let body = read_body(r, &head, false)?;
    Ok(Response {
        status: head.status,
        reason: head.reason,
        headers: head.headers,
        body,
    })
}

/// A plain `GET path` to `addr` (HTTP/1.1, `Connection: close`).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    let mut s = connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut s)
}

/// Reads until EOF or error; returns what was read and how it ended.
/// `Ok(bytes)` on a clean EOF, `Err((bytes, err))` otherwise (reset, timeout).
pub fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, (Vec<u8>, io::Error)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return Ok(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((buf, e)),
        }
    }
}

/// Whether an I/O error is a read timeout (as opposed to a reset or EOF).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

// ---------------------------------------------------------------------------
// Prometheus text

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket` ... suffix as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text format (comments skipped).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = body.len();
            let mut key = String::new();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        // expect a quoted value
                        let mut value = String::new();
                        if let Some((_, '"')) = chars.next() {
                            while let Some((_, c)) = chars.next() {
                                match c {
                                    '\\' => match chars.next() {
                                        Some((_, 'n')) => value.push('\n'),
                                        Some((_, other)) => value.push(other),
                                        None => {}
                                    },
                                    '"' => break,
                                    c => value.push(c),
                                }
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            }
            rest = &body[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            out.push(Sample {
                name,
                labels,
                value,
            });
        }
    }
    out
}

/// Sum of every sample named `name` whose labels include all of `labels`;
/// `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = parse_metrics(text)
        .into_iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

// ---------------------------------------------------------------------------
// The proxy

/// The `portcullis` binary running `run -c CONFIG` on port-0 listeners.
pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    transparent: Option<SocketAddr>,
    stdout: Lines,
    stderr: Lines,
}

impl Proxy {
    /// Starts the proxy; panics (with its stderr) if it does not print `ready`.
    pub fn start(config: &str) -> Proxy {
        Proxy::try_start(config).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the proxy; `Err` with its output if it exits or stalls before `ready`.
    pub fn try_start(config: &str) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("portcullis.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = client_command(env!("CARGO_BIN_EXE_portcullis"));
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn portcullis: {e}"))?;
        let stdout = Lines::spawn_reader(child.stdout.take().unwrap());
        let stderr = Lines::spawn_reader(child.stderr.take().unwrap());
        let ready = stdout.wait(Duration::from_secs(30), |lines| {
            lines.iter().any(|l| l.trim() == "ready")
        });
        if !ready {
            let _ = child.kill();
            let status = child.wait().ok();
            // Let the readers reach EOF so the message has everything.
            stderr.wait(Duration::from_secs(2), |_| false);
            return Err(format!(
                "portcullis did not print `ready` (exit: {status:?})\nconfig:\n{config}\nstdout:\n{}\nstderr:\n{}",
                stdout.snapshot().join("\n"),
                stderr.snapshot().join("\n")
            ));
        }
        let mut addr = None;
        let mut admin = None;
        let mut transparent = None;
        for line in stdout.snapshot() {
            let mut words = line.split_whitespace();
            if words.next() != Some("listening") {
                continue;
            }
            let (Some(kind), Some(a)) = (words.next(), words.next()) else {
                continue;
            };
            let a: SocketAddr = a
                .parse()
                .map_err(|e| format!("bad address in {line:?}: {e}"))?;
            match kind {
                "proxy" => addr = Some(a),
                "admin" => admin = Some(a),
                "transparent" => transparent = Some(a),
                _ => {}
            }
        }
        let addr = addr.ok_or_else(|| {
            format!(
                "no `listening proxy ADDR` line before `ready`: {:?}",
                stdout.snapshot()
            )
        })?;
        Ok(Proxy {
            child,
            dir,
            config_path,
            addr,
            admin,
            transparent,
            stdout,
            stderr,
        })
    }

    /// Explicit proxy listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for `-x`, `HTTPS_PROXY` and friends.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("no `listening admin ADDR` line")
    }

    /// Transparent listener, if configured.
    pub fn transparent_addr(&self) -> Option<SocketAddr> {
        self.transparent
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Directory holding the config file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `/metrics` text (panics on transport errors or non-200).
    pub fn metrics_text(&self) -> String {
        let resp = http_get(self.admin_addr(), "/metrics").expect("GET /metrics");
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        resp.text()
    }

    /// Sum of the samples named `name` carrying all of `labels`; 0 when none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics_text(), name, labels).unwrap_or(0.0)
    }

    /// Polls `metric(name, labels)` until `pred` holds or `timeout` passes;
    /// returns the last value read.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = f64::NAN;
        wait_until(timeout, || {
            last = self.metric(name, labels);
            pred(last)
        });
        last
    }

    /// stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// stderr lines (logs) so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// The stderr line reader, to wait on log lines.
    pub fn stderr(&self) -> &Lines {
        &self.stderr
    }

    /// Rewrites the config file and sends SIGHUP.
    pub fn reload(&self, new_config: &str) {
        std::fs::write(&self.config_path, new_config).unwrap();
        send_signal(self.pid(), "HUP");
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        send_signal(self.pid(), "TERM");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGTERM, then wait (up to 60 s) for the exit status.
    pub fn shutdown(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.terminate();
        self.wait_exit(Duration::from_secs(60))
            .expect("portcullis did not exit within 60 s of SIGTERM")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The upstream (tests/fixtures/upstream.py)

/// Names on the upstream's certificate.
pub const UPSTREAM_NAMES: &[&str] = &["allowed.test", "other.test", "pypi.test", "git.test"];

/// Size of `/blob` and `/slow`.
pub const BLOB_SIZE: usize = 1 << 20;

/// Body of `/hello.txt`.
pub const HELLO: &[u8] = b"hello from the portcullis test upstream\n";

/// Name of the wheel the upstream serves.
pub const WHEEL: &str = "tinypkg-0.1-py3-none-any.whl";

/// HTTPS and HTTP servers on 127.0.0.2 run by `tests/fixtures/upstream.py`.
pub struct Upstream {
    child: Child,
    stdin: Option<ChildStdin>,
    dir: tempfile::TempDir,
    https_port: u16,
    http_port: u16,
    blob: Vec<u8>,
    log: Lines,
    stderr: Lines,
}

/// 1 MiB of deterministic bytes (xorshift64).
pub fn blob_bytes() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(BLOB_SIZE);
    while out.len() < BLOB_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(BLOB_SIZE);
    out
}

impl Upstream {
    /// Starts the fixture with a certificate from `ca` for [`UPSTREAM_NAMES`].
    pub fn start(ca: &TestCa) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let www = dir.path().join("www");
        let git_root = dir.path().join("git");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(&git_root).unwrap();
        let blob = blob_bytes();
        std::fs::write(www.join("blob"), &blob).unwrap();
        std::fs::write(www.join("hello.txt"), HELLO).unwrap();
        let (cert, key) = ca.leaf(UPSTREAM_NAMES);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream.py");
        let mut child = client_command("python3")
            .arg("-u")
            .arg(script)
            .arg("serve")
            .arg("--host")
            .arg(UPSTREAM_IP.to_string())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--www")
            .arg(&www)
            .arg("--git-root")
            .arg(&git_root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3 upstream.py");
        let stdin = child.stdin.take();
        let log = Lines::spawn_reader(child.stdout.take().unwrap());
        let stderr = Lines::spawn_reader(child.stderr.take().unwrap());
        let Some(ready) = log.wait_line(Duration::from_secs(30), |l| l.starts_with("ready "))
        else {
            let _ = child.kill();
            let _ = child.wait();
            stderr.wait(Duration::from_secs(2), |_| false);
            panic!(
                "upstream.py did not become ready\nstdout: {:?}\nstderr:\n{}",
                log.snapshot(),
                stderr.snapshot().join("\n")
            );
        };
        let port = |key: &str| -> u16 {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {ready:?}"))
        };
        Upstream {
            https_port: port("https="),
            http_port: port("http="),
            child,
            stdin,
            dir,
            blob,
            log,
            stderr,
        }
    }

    /// The HTTPS port on 127.0.0.2.
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// The plain HTTP port on 127.0.0.2.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `127.0.0.2:http_port`.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(UPSTREAM_IP), self.http_port)
    }

    /// `127.0.0.2:https_port`.
    pub fn https_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(UPSTREAM_IP), self.https_port)
    }

    /// The bytes of `/blob` (and `/slow`).
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// Directory of static files.
    pub fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// The wheel file served at `/packages/WHEEL`.
    pub fn wheel_path(&self) -> PathBuf {
        self.www().join("packages").join(WHEEL)
    }

    /// Event lines (see upstream.py).
    pub fn log(&self) -> &Lines {
        &self.log
    }

    /// The upstream's stderr.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    /// Paths of every request the upstream parsed (`request ... path=P`).
    pub fn request_paths(&self) -> Vec<String> {
        self.log
            .snapshot()
            .iter()
            .filter(|l| l.starts_with("request "))
            .filter_map(|l| l.split(" path=").nth(1).map(str::to_string))
            .collect()
    }

    /// Waits (bounded) until the upstream has logged `n` requests, then returns their paths.
    pub fn wait_request_paths(&self, n: usize) -> Vec<String> {
        self.log.wait(IO_TIMEOUT, |lines| {
            lines.iter().filter(|l| l.starts_with("request ")).count() >= n
        });
        self.request_paths()
    }

    /// Lets every `/slow` response finish (GET /release straight to the upstream).
    pub fn release_slow(&self) {
        let resp = http_get(self.http_addr(), "/release").expect("GET /release");
        assert_eq!(resp.status, 200);
    }

    /// Creates a bare repository `NAME.git` with one commit; returns its hash.
    pub fn create_git_repo(&self, name: &str) -> String {
        let work = self.dir.path().join(format!("{name}-work"));
        let bare = self.dir.path().join("git").join(format!("{name}.git"));
        let git = |args: &[&str], cwd: &Path| -> String {
            let out = run_command(
                client_command("git")
                    .args(args)
                    .current_dir(cwd)
                    .env("HOME", self.dir.path())
                    .env("GIT_CONFIG_NOSYSTEM", "1")
                    .env("GIT_AUTHOR_NAME", "Test")
                    .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
                    .env("GIT_COMMITTER_NAME", "Test")
                    .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
                    .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
                    .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z"),
                None,
                Duration::from_secs(60),
            );
            assert!(out.status.success(), "git {args:?}: {}", output_text(&out));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        std::fs::create_dir_all(&work).unwrap();
        git(&["init", "-q", "-b", "main"], &work);
        std::fs::write(work.join("README"), format!("{name}: portcullis test\n")).unwrap();
        std::fs::write(work.join("blob.bin"), &self.blob[..64 * 1024]).unwrap();
        git(&["add", "."], &work);
        git(&["commit", "-q", "-m", "initial"], &work);
        let head = git(&["rev-parse", "HEAD"], &work);
        git(
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
            self.dir.path(),
        );
        head
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

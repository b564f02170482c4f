//! Child processes of the tests: client commands with the proxy environment
//! cleaned, runs with a deadline, line readers on a child's pipes, signals,
//! and bounded polling.
//!
//! Nothing here sleeps as synchronisation: every wait is on an event (a line,
//! an exit) or a polled condition, and every wait has a deadline. A command
//! that overruns its deadline is killed, then reported with its output.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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

/// Line readers on a spawned child's stdout and stderr (both must be piped).
pub fn pipes(child: &mut Child) -> (Lines, Lines) {
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    (Lines::spawn_reader(stdout), Lines::spawn_reader(stderr))
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
    let Some(status) = wait_child(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        panic!(
            "{cmd:?} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
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

/// What a child printed on its two pipes, for a failure message; first lets
/// its stderr reader reach EOF (briefly), so a child that just died has said
/// everything.
pub fn printed(stdout: &Lines, stderr: &Lines) -> String {
    stderr.wait(Duration::from_secs(2), |_| false);
    format!(
        "stdout:\n{}\nstderr:\n{}",
        stdout.snapshot().join("\n"),
        stderr.snapshot().join("\n")
    )
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
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
}

/// A child killed on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

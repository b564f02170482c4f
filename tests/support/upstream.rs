//! The test upstream: `tests/fixtures/upstream.py` serving HTTPS and plain
//! HTTP on 127.0.0.2 (static files, a 1 MiB blob, a slow download, git smart
//! HTTP), whose event lines on stdout the tests wait on.
//!
//! [`Site`] prepares what it serves and builds its command line; the local
//! [`Upstream`] and the network-namespace one (`netns::NsUpstream`) both
//! start it through there. The child is killed when its owner drops.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::http::{IO_TIMEOUT, http_get};
use super::process::{Lines, client_command, output_text, pipes, printed, run_command};
use super::tls::TestCa;

/// Where upstream servers listen (loopback, but not 127.0.0.1: the proxy's
/// guard for 127.0.0.1 is tested separately).
pub const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Longest upstream.py may take to print its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

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

/// What one upstream.py serves: its static files, git root and certificate.
pub struct Site {
    /// Static files (`/blob`, `/hello.txt`, ...).
    pub www: PathBuf,
    /// Bare repositories served over git smart HTTP.
    pub git_root: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM).
    pub key: PathBuf,
    /// The bytes of `/blob`.
    pub blob: Vec<u8>,
}

impl Site {
    /// Creates `ROOT/www` (with `/blob` and `/hello.txt`) and `ROOT/git`,
    /// and a certificate from `ca` for `names`.
    pub fn create(root: &Path, ca: &TestCa, names: &[&str]) -> Site {
        let www = root.join("www");
        let git_root = root.join("git");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::create_dir_all(&git_root).unwrap();
        let blob = blob_bytes();
        std::fs::write(www.join("blob"), &blob).unwrap();
        std::fs::write(www.join("hello.txt"), HELLO).unwrap();
        let (cert, key) = ca.leaf(names);
        Site {
            www,
            git_root,
            cert,
            key,
            blob,
        }
    }

    /// `python3 -u upstream.py serve` on `ip` for this site (proxy
    /// environment removed).
    pub fn serve_command(&self, ip: Ipv4Addr) -> Command {
        let mut cmd = client_command("python3");
        cmd.arg("-u")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/upstream.py"
            ))
            .arg("serve")
            .arg("--host")
            .arg(ip.to_string())
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .arg("--www")
            .arg(&self.www)
            .arg("--git-root")
            .arg(&self.git_root);
        cmd
    }
}

/// Waits (bounded) for upstream.py's `ready https=P http=P` line and returns
/// (HTTPS port, HTTP port); `None` if it never came.
pub fn ready_ports(stdout: &Lines) -> Option<(u16, u16)> {
    let ready = stdout.wait_line(READY_TIMEOUT, |l| l.starts_with("ready "))?;
    let port = |key: &str| -> u16 {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {ready:?}"))
    };
    Some((port("https="), port("http=")))
}

impl Upstream {
    /// Starts the fixture with a certificate from `ca` for [`UPSTREAM_NAMES`].
    pub fn start(ca: &TestCa) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let site = Site::create(dir.path(), ca, UPSTREAM_NAMES);
        let mut child = site
            .serve_command(UPSTREAM_IP)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3 upstream.py");
        let stdin = child.stdin.take();
        let (log, stderr) = pipes(&mut child);
        let Some((https_port, http_port)) = ready_ports(&log) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "upstream.py did not become ready\n{}",
                printed(&log, &stderr)
            );
        };
        Upstream {
            https_port,
            http_port,
            child,
            stdin,
            dir,
            blob: site.blob,
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

//! Test harness: real `strata` processes on loopback, and clients for them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata::addr::PeerAddr;
use strata::proto::{snix, tvix};
use tonic::transport::Channel;

/// Path of the binary under test.
pub fn strata_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// A free TCP port on loopback (released again, so a process can bind it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A running `strata serve`, killed when dropped.
pub struct Daemon {
    child: Child,
    // Holds the socket, log and composition file until the daemon is gone.
    _dir: tempfile::TempDir,
    pub tcp: String,
    pub socket: PathBuf,
    log: PathBuf,
    /// HOST:PORT of `/metrics`, when started with metrics.
    metrics: Option<String>,
}

impl Daemon {
    /// Starts `strata serve` with the given composition (or the default when
    /// `None`), listening on a fresh TCP port and a unix socket.
    pub fn start(config: Option<&str>) -> Daemon {
        Daemon::start_inner(config, None, &[], &[], "info")
    }

    /// Like [`Daemon::start_with_metrics`], with extra `strata serve`
    /// arguments and `RUST_LOG` set to `rust_log`.
    pub fn start_logging(config: &str, extra: &[&str], rust_log: &str) -> Daemon {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--metrics-listen", &addr];
        args.extend_from_slice(extra);
        let mut daemon = Daemon::start_inner(Some(config), None, &args, &[], rust_log);
        daemon.metrics = Some(addr);
        daemon
    }

    /// Like [`Daemon::start`], run through `wrapper` (a command that ends by
    /// exec'ing its arguments, such as `nsenter …`), so the daemon can live
    /// in another mount namespace. The wrapper must not fork: signals go to
    /// the process it starts as.
    pub fn start_wrapped(config: &str, wrapper: &[String]) -> Daemon {
        Daemon::start_inner(Some(config), None, &[], wrapper, "info")
    }

    /// Like [`Daemon::start`], also serving `/metrics` on a fresh port;
    /// [`Daemon::metrics`] scrapes it.
    pub fn start_with_metrics(config: Option<&str>) -> Daemon {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut daemon =
            Daemon::start_inner(config, None, &["--metrics-listen", &addr], &[], "info");
        daemon.metrics = Some(addr);
        daemon
    }

    /// Like [`Daemon::start`], with `$XDG_CACHE_HOME` (where the default
    /// composition keeps its disk cache) set to `cache_home`.
    pub fn start_with_cache_home(config: Option<&str>, cache_home: &Path) -> Daemon {
        Daemon::start_inner(config, Some(cache_home), &[], &[], "info")
    }

    fn start_inner(
        config: Option<&str>,
        cache_home: Option<&Path>,
        extra: &[&str],
        wrapper: &[String],
        rust_log: &str,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache_home = cache_home
            .map(Path::to_owned)
            .unwrap_or_else(|| dir.path().join("cache"));
        let socket = dir.path().join("strata.sock");
        let log = dir.path().join("serve.log");
        let config_path = config.map(|config| {
            let path = dir.path().join("composition.toml");
            std::fs::write(&path, config).expect("write composition");
            path
        });
        let mut last_err = String::new();
        // A port picked this way can be taken by someone else before the
        // daemon binds it; retry with another.
        for _ in 0..5 {
            let tcp = format!("127.0.0.1:{}", free_port());
            let mut cmd = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut cmd = Command::new(program);
                    cmd.args(args).arg(strata_bin());
                    cmd
                }
                None => Command::new(strata_bin()),
            };
            cmd.arg("serve")
                .arg("--listen")
                .arg(&tcp)
                .arg("--listen")
                .arg(&socket)
                .env("RUST_LOG", rust_log)
                // The default composition's disk cache goes here, not into
                // the user's cache directory.
                .env("XDG_CACHE_HOME", &cache_home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"));
            if let Some(path) = &config_path {
                cmd.arg("--config").arg(path);
            }
            cmd.args(extra);
            let mut child = cmd.spawn().expect("spawn strata serve");
            match wait_ready(&mut child, &tcp, &socket, &log) {
                Ok(()) => {
                    return Daemon {
                        child,
                        _dir: dir,
                        tcp,
                        socket,
                        log,
                        metrics: None,
                    };
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = e;
                }
            }
        }
        panic!("strata serve did not start: {last_err}");
    }

    /// `grpc+http://…` address of the TCP listener.
    pub fn tcp_addr(&self) -> String {
        format!("grpc+http://{}", self.tcp)
    }

    /// `grpc+unix://…` address of the socket listener.
    pub fn unix_addr(&self) -> String {
        format!("grpc+unix://{}", self.socket.display())
    }

    /// The daemon's `/metrics` page (started with
    /// [`Daemon::start_with_metrics`]).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.metrics.as_ref().expect("started with metrics");
        let mut conn = std::net::TcpStream::connect(addr).expect("connect to /metrics");
        write!(
            conn,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send the request");
        let mut response = String::new();
        conn.read_to_string(&mut response).expect("read /metrics");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "/metrics answered {head}");
        body.to_owned()
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the daemon to exit on its own.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for strata serve")
    }

    /// Asks the daemon to shut down (SIGTERM), which drains background
    /// fills, and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait()
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    /// Waits up to `limit` for the daemon to exit; `None` if it still runs.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for strata serve") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the daemon accepts connections on both listeners.
fn wait_ready(child: &mut Child, tcp: &str, socket: &Path, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("exited with {status}: {text}"));
        }
        if std::net::TcpStream::connect(tcp).is_ok()
            && std::os::unix::net::UnixStream::connect(socket).is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("not ready after 20 s".to_owned())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `strata` CLI with `args` and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(strata_bin())
        .args(args)
        .env_remove("STRATA_ADDR")
        .output()
        .expect("run strata")
}

/// Runs the CLI, asserting success; returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A channel to `addr` (`grpc+http://…` or `grpc+unix://…`).
pub fn channel(addr: &str) -> Channel {
    let addr: PeerAddr = addr.parse().expect("address");
    addr.channel(Duration::from_secs(5)).expect("channel")
}

/// A snix-package client.
pub fn snix_client(addr: &str) -> snix::blob_service_client::BlobServiceClient<Channel> {
    snix::blob_service_client::BlobServiceClient::new(channel(addr))
        .max_decoding_message_size(64 << 20)
}

/// A tvix-package client.
pub fn tvix_client(addr: &str) -> tvix::blob_service_client::BlobServiceClient<Channel> {
    tvix::blob_service_client::BlobServiceClient::new(channel(addr))
        .max_decoding_message_size(64 << 20)
}

/// Deterministic pseudo-random bytes, so failures reproduce.
pub fn test_data(len: usize, seed: u64) -> Vec<u8> {
    strata::testkit::pseudo_random(len, seed)
}

/// Writes `data` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write test file");
    path
}

/// A real S3 server (s3s-fs) on loopback, killed when dropped.
pub struct S3Server {
    child: Child,
    // The data directory, removed when the server is dropped.
    _root: tempfile::TempDir,
    pub port: u16,
}

pub const S3_ACCESS_KEY: &str = "strata-test";
pub const S3_SECRET_KEY: &str = "strata-test-secret";

/// The s3s-fs binary: `$S3S_FS`, else on `PATH`, else in cargo's bin dir.
fn s3s_fs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return p.into();
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return p;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    cargo_home.join("bin").join("s3s-fs")
}

impl S3Server {
    /// Starts s3s-fs with one bucket, `bucket`. Panics (failing the test)
    /// when the server cannot be started: `scripts/test.sh` installs it.
    pub fn start(bucket: &str) -> S3Server {
        let bin = s3s_fs_bin();
        assert!(
            bin.is_file(),
            "s3s-fs not found at {}: run `bash scripts/test.sh`, which installs it",
            bin.display()
        );
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(bucket)).expect("bucket dir");
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(root.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_err = format!("s3s-fs exited with {status}");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return S3Server {
                        child,
                        _root: root,
                        port,
                    };
                }
                if Instant::now() > deadline {
                    last_err = "s3s-fs did not listen within 20 s".into();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("cannot start s3s-fs: {last_err}");
    }

    /// `object_store_options` for this server, as a TOML inline table.
    pub fn options_toml(&self) -> String {
        format!(
            "{{ aws_endpoint = \"http://127.0.0.1:{}\", aws_allow_http = \"true\", \
             aws_access_key_id = \"{S3_ACCESS_KEY}\", aws_secret_access_key = \"{S3_SECRET_KEY}\", \
             aws_region = \"us-east-1\", aws_virtual_hosted_style_request = \"false\" }}",
            self.port
        )
    }

    /// The same options as key/value pairs.
    pub fn options(&self) -> Vec<(String, String)> {
        vec![
            (
                "aws_endpoint".into(),
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), S3_ACCESS_KEY.into()),
            ("aws_secret_access_key".into(), S3_SECRET_KEY.into()),
            ("aws_region".into(), "us-east-1".into()),
            ("aws_virtual_hosted_style_request".into(), "false".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a daemon from an async test (the start-up wait blocks).
pub async fn start_daemon(config: String) -> Daemon {
    tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .expect("daemon start task")
}

/// A daemon serving a 256 MiB `memory` tier: an origin for a sidecar.
pub async fn memory_origin() -> Daemon {
    start_daemon("[blobservices.root]\ntype = \"memory\"\nmax_size = \"256MiB\"\n".into()).await
}

/// A sidecar with metrics: a `disk` tier at `disk` (named `near`), then the
/// `grpc` peer at `peer`, with `fill` as the fill mode.
pub async fn disk_sidecar(disk: &Path, peer: &str, fill: &str) -> Daemon {
    let config = format!(
        "[blobservices.root]\ntype = \"tiers\"\ntiers = [\"near\", \"peer\"]\nfill = \"{fill}\"\n\n\
         [blobservices.near]\ntype = \"disk\"\npath = {}\n\n\
         [blobservices.peer]\ntype = \"grpc\"\nurl = \"{peer}\"\n",
        toml::Value::String(disk.display().to_string())
    );
    tokio::task::spawn_blocking(move || Daemon::start_with_metrics(Some(&config)))
        .await
        .expect("daemon start task")
}

/// Waits (up to 30 s) until a [`disk_sidecar`]'s fill is published: a
/// client of a sync fill gets its last bytes before the near tier has
/// stored them.
pub async fn wait_for_fill(sidecar: &Daemon) {
    let filled = || metric(&sidecar.metrics(), "strata_tier_fills_total{tier=\"near\"}") >= 1.0;
    assert!(
        eventually(Duration::from_secs(30), filled).await,
        "the fill never completed"
    );
}

/// Polls `ready` every 20 ms until it holds (true) or `limit` has passed
/// (false): for what a daemon does after its answer.
pub async fn eventually(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Puts `data` through the snix package in 1 MiB messages; returns the
/// digest the server reported.
pub async fn put_blob(addr: &str, data: &[u8]) -> strata::B3Digest {
    let pieces: Vec<strata::proto::snix::BlobChunk> = data
        .chunks(1 << 20)
        .map(|c| strata::proto::snix::BlobChunk {
            data: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    let resp = snix_client(addr)
        .put(futures::stream::iter(pieces))
        .await
        .expect("put")
        .into_inner();
    strata::B3Digest::try_from(&resp.digest).expect("digest in put response")
}

/// Reads a blob through the snix package: all its bytes, or the status the
/// call (or the stream) ended with. On an error, `received` says how many
/// bytes had arrived before it.
pub async fn read_blob(addr: &str, digest: &strata::B3Digest) -> Result<Vec<u8>, ReadFailure> {
    use futures::StreamExt;
    let req = strata::proto::snix::ReadBlobRequest {
        digest: (*digest).into(),
    };
    let mut stream = match snix_client(addr).read(req).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            return Err(ReadFailure {
                status,
                received: 0,
                data: Vec::new(),
            });
        }
    };
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m) => out.extend_from_slice(&m.data),
            Err(status) => {
                return Err(ReadFailure {
                    status,
                    received: out.len(),
                    data: out,
                });
            }
        }
    }
    Ok(out)
}

/// How a [`read_blob`] failed.
#[derive(Debug)]
pub struct ReadFailure {
    pub status: tonic::Status,
    pub received: usize,
    /// The bytes that arrived before the error.
    pub data: Vec<u8>,
}

impl ReadFailure {
    pub fn code(&self) -> tonic::Code {
        self.status.code()
    }
}

/// A TCP listener that accepts connections and never answers: a peer that
/// stalls forever. Returns its `grpc+http://` address.
pub fn stalled_peer() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    format!("grpc+http://{addr}")
}

/// The value of one series (`name{labels}`, exactly as exported) in a
/// `/metrics` page; 0 when absent.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Settings for the property tests: `cases` per test, small enough to run
/// in a few seconds on every `cargo test`; `PROPTEST_CASES` overrides it
/// for a longer search. Failures print the shrunk input rather than writing
/// regression files into the source tree.
pub fn fuzz_config(cases: u32) -> proptest::prelude::ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    proptest::prelude::ProptestConfig {
        cases,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    }
}

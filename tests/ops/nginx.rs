//! nginx.conf: `nginx -t` accepts it (with a self-signed certificate made for
//! the test), and a real nginx started from it on free ports redirects HTTP,
//! proxies /health and /api/ to an upstream, streams SSE event by event, hides
//! /metrics, sets the security headers, and refuses large bodies.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use crate::{read, run, run_ok};

/// A copy of nginx.conf whose paths point into `dir`, with the given upstream file.
struct Prepared {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn prepare(upstream_file: &str, upstream_to: &str, ports: Option<(u16, u16)>) -> Prepared {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["ssl", "upstream", "logs"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    run_ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "ssl/key.pem",
            "-out",
            "ssl/cert.pem",
        ],
        Some(d),
    );
    // The upstream names a compose service; here it is a local address.
    let upstream = read(upstream_file);
    let upstream = point_upstream_at(&upstream, upstream_to);
    std::fs::write(d.join("upstream/api.conf"), upstream).unwrap();
    let p = |sub: &str| d.join(sub).display().to_string();
    let mut conf = read("nginx.conf")
        .replace("/etc/nginx/ssl/", &format!("{}/", p("ssl")))
        .replace("/etc/nginx/upstream/api.conf", &p("upstream/api.conf"))
        .replace("/var/log/nginx/", &format!("{}/", p("logs")));
    assert!(!conf.contains("/etc/nginx/ssl") && !conf.contains("/var/log"));
    if let Some((http, https)) = ports {
        conf = conf
            .replace(
                "listen 80 default_server;",
                &format!("listen 127.0.0.1:{http} default_server;"),
            )
            .replace("listen [::]:80 default_server;", "")
            .replace(
                "listen 443 ssl http2 default_server;",
                &format!("listen 127.0.0.1:{https} ssl http2 default_server;"),
            )
            .replace("listen [::]:443 ssl http2 default_server;", "");
        // Temp files of a non-root nginx in the temp dir.
        conf = conf.replace(
            "    server_tokens off;",
            &format!(
                "    server_tokens off;\n    client_body_temp_path {0}/body;\n    proxy_temp_path {0}/proxy;",
                p("logs")
            ),
        );
    }
    let conf_path = d.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    Prepared {
        dir,
        conf: conf_path,
    }
}

/// Point every `server host:port;` line of an upstream file at `to`.
fn point_upstream_at(upstream: &str, to: &str) -> String {
    let out: Vec<String> = upstream
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("server ") {
                format!("    server {to};")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(
        out.iter().any(|l| l.contains(to)),
        "no server line in the upstream file"
    );
    out.join("\n") + "\n"
}

fn globals(dir: &Path) -> String {
    format!(
        "pid {0}/nginx.pid; error_log {0}/logs/error.log;",
        dir.display()
    )
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn nginx_accepts_the_config_with_both_upstream_files() {
    for upstream in ["nginx/upstream/api.conf", "nginx/upstream-dev.conf"] {
        let prepared = prepare(upstream, "127.0.0.1:18000", None);
        let d = prepared.dir.path();
        let out = run_ok(
            "nginx",
            &[
                "-t",
                "-p",
                d.to_str().unwrap(),
                "-c",
                prepared.conf.to_str().unwrap(),
                "-g",
                &globals(d),
            ],
            None,
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("test is successful"), "{said}");
    }
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn nginx_rejects_a_broken_config() {
    // The check above can fail: a config with a typo does not pass.
    let prepared = prepare("nginx/upstream/api.conf", "127.0.0.1:18000", None);
    let d = prepared.dir.path();
    let broken = std::fs::read_to_string(&prepared.conf)
        .unwrap()
        .replace("proxy_buffering off;", "proxy_buffering sideways;");
    std::fs::write(&prepared.conf, broken).unwrap();
    let out = run(
        "nginx",
        &[
            "-t",
            "-p",
            d.to_str().unwrap(),
            "-c",
            prepared.conf.to_str().unwrap(),
            "-g",
            &globals(d),
        ],
        None,
    );
    assert!(!out.status.success());
}

/// A one-thread HTTP upstream on a free port: each connection's request head
/// goes to `answer`, which writes the response. Stopped and joined on drop.
struct Upstream {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(mut answer: impl FnMut(TcpStream, &str) + Send + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(2)))
                            .unwrap();
                        let mut buf = [0u8; 8192];
                        let n = stream.read(&mut buf).unwrap_or(0);
                        let head = String::from_utf8_lossy(&buf[..n]).to_string();
                        answer(stream, &head);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The plain answer: 200 with the request line and the X-Request-Id it got.
fn echo(mut stream: TcpStream, head: &str) {
    let line = head.lines().next().unwrap_or("");
    let request_id = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("X-Request-Id: ")
                .or_else(|| l.strip_prefix("x-request-id: "))
        })
        .unwrap_or("");
    let body = format!("upstream saw: {line} id={request_id}\n");
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A real nginx started from nginx.conf on free ports in front of `upstream`,
/// in the foreground as a child of the test, so it is stopped and reaped on drop.
struct RunningNginx {
    prepared: Prepared,
    child: std::process::Child,
    http: u16,
    https: u16,
}

impl RunningNginx {
    fn start(upstream: &Upstream) -> RunningNginx {
        let (http, https) = (free_port(), free_port());
        let prepared = prepare(
            "nginx/upstream/api.conf",
            &format!("127.0.0.1:{}", upstream.port),
            Some((http, https)),
        );
        let d = prepared.dir.path();
        let daemon_off = format!("daemon off; {}", globals(d));
        let child = Command::new("nginx")
            .args([
                "-p",
                d.to_str().unwrap(),
                "-c",
                prepared.conf.to_str().unwrap(),
                "-g",
                &daemon_off,
            ])
            .spawn()
            .expect("nginx is installed");
        let nginx = RunningNginx {
            prepared,
            child,
            http,
            https,
        };
        // Wait until nginx answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while curl(&[&nginx.https_url("/health")]).0 == 0 {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }

    fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https)
    }
}

impl Drop for RunningNginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// curl's `(status, headers and body)`.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-D",
            "-",
            "-o",
            "-",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), rest.to_owned())
}

#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn nginx_redirects_proxies_and_hides_metrics() {
    let upstream = Upstream::start(echo);
    let nginx = RunningNginx::start(&upstream);
    let (http, https_url) = (nginx.http, |path: &str| nginx.https_url(path));

    let (status, text) = curl(&[&format!("http://127.0.0.1:{http}/api/v1/assistants?x=1")]);
    assert_eq!(status, 301, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("location: https://127.0.0.1/api/v1/assistants?x=1"),
        "{text}"
    );

    let (status, text) = curl(&["-H", "X-Request-Id: corr-123", &https_url("/health")]);
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("upstream saw: GET /health HTTP/1.1 id=corr-123"),
        "{text}"
    );
    let lower = text.to_ascii_lowercase();
    for header in [
        "strict-transport-security: max-age=63072000",
        "x-content-type-options: nosniff",
        "x-frame-options: deny",
    ] {
        assert!(lower.contains(header), "no {header}: {text}");
    }
    assert!(
        !lower.contains("server: nginx/"),
        "nginx version disclosed: {text}"
    );

    let (status, text) = curl(&[&https_url("/metrics")]);
    assert_eq!(status, 404, "/metrics must not be public: {text}");
    assert!(!text.contains("upstream saw"), "{text}");

    let big = nginx.prepared.dir.path().join("big.json");
    std::fs::write(&big, vec![b'x'; 2 * 1024 * 1024]).unwrap();
    let (status, _) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("@{}", big.display()),
        &https_url("/api/v1/users"),
    ]);
    assert_eq!(status, 413);

    // Both TLS 1.2 and 1.3 are served (older versions are not in ssl_protocols;
    // the client's own OpenSSL refuses them too, so that cannot be shown here).
    for version in [
        ["--tlsv1.2", "--tls-max", "1.2"],
        ["--tlsv1.3", "--tls-max", "1.3"],
    ] {
        let mut args: Vec<&str> = version.to_vec();
        let url = https_url("/health");
        args.push(&url);
        assert_eq!(curl(&args).0, 200, "{version:?} not served");
    }
}

/// How the upstream frames the stream's body.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// As the service sends it (hyper, to nginx's HTTP/1.1): each event a chunk.
    /// With `proxy_buffering on`, whether nginx holds a chunk back depends on
    /// how the bytes happen to arrive (both were seen), hence the framing below.
    Chunked,
    /// Until the connection closes: a buffering nginx keeps these bytes until
    /// its buffer fills or the body ends, every time.
    UntilClose,
}

/// The SSE route passes each event on as it comes: the upstream sends an event
/// only once the client has received the one before, so a proxy that held the
/// first one back (waiting for more) would never deliver it. Both framings:
/// the service's, and the one under which `proxy_buffering on` is seen.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn nginx_streams_sse_event_by_event() {
    for framing in [Framing::Chunked, Framing::UntilClose] {
        stream_through_nginx(framing);
    }
}

fn stream_through_nginx(framing: Framing) {
    const EVENTS: usize = 3;
    // The test tells the upstream that the client has the last event.
    let (received, wait_for_client) = mpsc::channel::<()>();
    let upstream = Upstream::start(move |mut stream, head| {
        if !head.starts_with("GET /api/v1/conversations/abc/stream ") {
            return echo(stream, head);
        }
        let framing_header = match framing {
            Framing::Chunked => "transfer-encoding: chunked",
            Framing::UntilClose => "connection: close",
        };
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{framing_header}\r\n\r\n"
        );
        for n in 1..=EVENTS {
            let event = format!("id: {n}\ndata: event {n}\n\n");
            let _ = match framing {
                Framing::Chunked => write!(stream, "{:x}\r\n{event}\r\n", event.len()),
                Framing::UntilClose => write!(stream, "{event}"),
            };
            let _ = stream.flush();
            // Not delivered (or the test gave up): end here, nothing more is sent.
            if wait_for_client
                .recv_timeout(Duration::from_secs(10))
                .is_err()
            {
                return;
            }
        }
        if let Framing::Chunked = framing {
            let _ = write!(stream, "0\r\n\r\n");
        }
    });
    let nginx = RunningNginx::start(&upstream);

    // curl -N writes each piece as it arrives; a thread hands its lines over.
    let mut client = Command::new("curl")
        .args(["-sSkN", "--max-time", "30"])
        .arg(nginx.https_url("/api/v1/conversations/abc/stream"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let stdout = client.stdout.take().unwrap();
    let (line_tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    for n in 1..=EVENTS {
        let expected = format!("data: event {n}");
        loop {
            match lines.recv_timeout(Duration::from_secs(5)) {
                Ok(line) if line == expected => break,
                Ok(_) => {}
                Err(_) => {
                    let _ = client.kill();
                    panic!(
                        "{framing:?}: event {n} did not reach the client within 5 s while the upstream held the next one back (is the stream buffered?)"
                    );
                }
            }
        }
        received.send(()).unwrap();
    }
    let status = client.wait().unwrap();
    assert!(status.success(), "{framing:?}: curl {status}");
    reader.join().unwrap();
}

/// The outer rate limit: sign-ups and logins from one address get a burst of
/// 5 beyond the first, then 429 from nginx itself (the upstream never sees them);
/// the rest of the API is limited much more loosely.
#[cfg_attr(
    not(test_servers),
    ignore = "needs the servers: AI_SECRETARY_TEST_SERVERS=1"
)]
#[test]
fn nginx_limits_the_rate_of_sign_ups_and_logins_per_address() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = seen.clone();
    let upstream = Upstream::start(move |stream, head| {
        counted.fetch_add(1, Ordering::Relaxed);
        echo(stream, head)
    });
    let nginx = RunningNginx::start(&upstream);
    let login = nginx.https_url("/api/v1/auth/token");
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = (0..12)
        .map(|_| curl(&["-X", "POST", "--data", "{}", &login]).0)
        .collect();
    // At 1 request/s, a slow machine may earn a token back per second spent.
    let refilled = started.elapsed().as_secs() as usize;
    let passed = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        (6..=6 + refilled).contains(&passed) && passed + limited == statuses.len(),
        "one plus a burst of five, then 429: {statuses:?}"
    );
    let before = seen.load(Ordering::Relaxed);
    // Other API routes still pass (their own, looser zone).
    assert_eq!(curl(&[&nginx.https_url("/api/v1/assistants")]).0, 200);
    assert_eq!(seen.load(Ordering::Relaxed), before + 1);
    // The wait on the sign-up route is its own zone's too: the same address
    // has spent its auth tokens.
    assert_eq!(
        curl(&[
            "-X",
            "POST",
            "--data",
            "{}",
            &nginx.https_url("/api/v1/users")
        ])
        .0,
        429
    );
}

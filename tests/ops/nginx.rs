//! nginx.conf: `nginx -t` accepts it (with a self-signed certificate made for
//! the test), and a real nginx started from it on free ports redirects HTTP,
//! proxies /health and /api/ to an upstream, hides /metrics, sets the
//! security headers, and refuses large bodies.

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::Command,
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

/// A one-thread HTTP upstream that answers every request with 200 and the path.
fn upstream() -> (
    u16,
    std::thread::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let handle = std::thread::spawn(move || {
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_secs(2)))
                        .unwrap();
                    let mut buf = [0u8; 8192];
                    let n = stream.read(&mut buf).unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let line = head.lines().next().unwrap_or("").to_owned();
                    let request_id = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("X-Request-Id: ")
                                .or_else(|| l.strip_prefix("x-request-id: "))
                        })
                        .unwrap_or("")
                        .to_owned();
                    let body = format!("upstream saw: {line} id={request_id}\n");
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    (port, handle, stop)
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

#[test]
fn nginx_redirects_proxies_and_hides_metrics() {
    let (upstream_port, upstream_thread, stop) = upstream();
    let (http, https) = (free_port(), free_port());
    let prepared = prepare(
        "nginx/upstream/api.conf",
        &format!("127.0.0.1:{upstream_port}"),
        Some((http, https)),
    );
    let d = prepared.dir.path();
    // In the foreground, as a child of this test, so it is stopped and reaped here.
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
    struct Nginx(std::process::Child);
    impl Drop for Nginx {
        fn drop(&mut self) {
            // SIGTERM: the master stops its workers, then exits.
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
    let _nginx = Nginx(child);
    let https_url = |path: &str| format!("https://127.0.0.1:{https}{path}");
    // Wait until nginx answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while curl(&[&https_url("/health")]).0 == 0 {
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

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

    let (status, text) = curl(&[&https_url("/api/v1/conversations/abc/stream")]);
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("upstream saw: GET /api/v1/conversations/abc/stream"),
        "{text}"
    );

    let (status, text) = curl(&[&https_url("/metrics")]);
    assert_eq!(status, 404, "/metrics must not be public: {text}");
    assert!(!text.contains("upstream saw"), "{text}");

    let big = d.join("big.json");
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

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    upstream_thread.join().unwrap();
}

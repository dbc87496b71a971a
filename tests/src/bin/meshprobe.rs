//! meshprobe: the processes tests and the demo run inside pods.
//!
//!   meshprobe serve <port> <name> [record-file]   echo server: replies "<name>:<data>", appends
//!                                                 "<peer> <data>" lines to record-file
//!   meshprobe connect <ip:port> <text> [count] [timeout-ms]
//!                                                 connects `count` times, sends text, half-closes,
//!                                                 prints one JSON line per attempt; connect and
//!                                                 read give up after timeout-ms (default 5000)
//!   meshprobe hold <ip:port> <text> <seconds>      one connection that exchanges text every 100 ms
//!   meshprobe send <ip:port> <bytes>                 one connection that sends <bytes> bytes ("x"),
//!                                                 half-closes and reads to EOF while sending;
//!                                                 prints {"sent":..,"received":..}
//!   meshprobe serve6 <port> <name>                 IPv6-only echo server
//!   meshprobe udpserve <port> <name> [record-file] UDP echo server (same replies and record)
//!   meshprobe udp <ip:port> <text> <connect|sendto> [timeout-ms]
//!                                                 one datagram (connected socket or sendto), one
//!                                                 JSON attempt line; `[::ffff:a.b.c.d]:p` uses an
//!                                                 IPv6 socket with a v4-mapped address
//!   meshprobe connectfrom <src-ip> <ip:port> <text> <timeout-ms>
//!                                                 one TCP attempt from a bound source address
//!   meshprobe many <ip:port> <count> <hold-ms>     opens `count` connections one after another,
//!                                                 each exchanging one byte, holds the ones that
//!                                                 worked open for hold-ms, prints a JSON summary
//!   meshprobe loop <ip:port> <text> <millis> <timeout-ms>
//!                                                 new connections back to back for `millis`,
//!                                                 printed as one JSON summary line
//!   meshprobe bench <ip:port> <seconds> <workers>  new connections per second (connect, 1 byte
//!                                                 each way, close), printed as one JSON line
//!   meshprobe http <port> <name> <behaviour> [record-file]
//!                                                 HTTP/1.1 keep-alive server answering
//!                                                 "<name>\n" with `x-served-by: <name>`; appends
//!                                                 "<METHOD> <path>" per request to record-file.
//!                                                 behaviour: ok | 503 (always) | 503x<N> (the
//!                                                 first N requests) | reset (RST instead of an
//!                                                 answer) | hang (never answers) | slow<ms> |
//!                                                 health=<file> (200, but `/health` answers
//!                                                 503 while <file> exists: a health switch);
//!                                                 a request with `Upgrade: echo` gets 101 and
//!                                                 its raw bytes echoed; a path under
//!                                                 `/missing` gets 404 whatever the behaviour;
//!                                                 a `traceparent` it receives comes back as
//!                                                 `x-traceparent`

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", port, name, rest @ ..] => serve(port.parse()?, name, rest.first().copied()),
        ["connect", addr, text, rest @ ..] => {
            let count = rest.first().map(|c| c.parse()).transpose()?.unwrap_or(1);
            let timeout = rest
                .get(1)
                .map(|t| t.parse().map(Duration::from_millis))
                .transpose()?
                .unwrap_or(DEFAULT_TIMEOUT);
            connect(addr.parse()?, text, count, timeout)
        }
        ["hold", addr, text, secs] => hold(addr.parse()?, text, secs.parse()?),
        ["send", addr, bytes] => send(addr.parse()?, bytes.parse()?),
        ["serve6", port, name] => serve6(port.parse()?, name),
        ["udpserve", port, name, rest @ ..] => udp_serve(port.parse()?, name, rest.first().copied()),
        ["udp", addr, text, mode, rest @ ..] => {
            let timeout = rest
                .first()
                .map(|t| t.parse().map(Duration::from_millis))
                .transpose()?
                .unwrap_or(DEFAULT_TIMEOUT);
            let a = udp_attempt(addr.parse()?, text, *mode == "connect", timeout);
            println!("{}", serde_json::to_string(&a)?);
            Ok(())
        }
        ["connectfrom", src, addr, text, timeout] => {
            let a = attempt_from(
                src.parse()?,
                addr.parse()?,
                text,
                Duration::from_millis(timeout.parse()?),
            );
            println!("{}", serde_json::to_string(&a)?);
            Ok(())
        }
        ["many", addr, count, hold] => many(
            addr.parse()?,
            count.parse()?,
            Duration::from_millis(hold.parse()?),
        ),
        ["loop", addr, text, millis, timeout] => connect_loop(
            addr.parse()?,
            text,
            Duration::from_millis(millis.parse()?),
            Duration::from_millis(timeout.parse()?),
        ),
        ["bench", addr, secs, workers] => bench(addr.parse()?, secs.parse()?, workers.parse()?),
        ["http", port, name, behaviour, rest @ ..] => http_serve(
            port.parse()?,
            name,
            behaviour.parse()?,
            rest.first().copied(),
        ),
        _ => bail!("usage: meshprobe serve <port> <name> [record] | connect <ip:port> <text> [count] [timeout-ms] | hold <ip:port> <text> <seconds> | send <ip:port> <bytes> | bench <ip:port> <seconds> <workers> | http <port> <name> <behaviour> [record]"),
    }
}

fn serve(port: u16, name: &str, record: Option<&str>) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    println!("listening on {port}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.to_owned();
        let record = record.map(str::to_owned);
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let mut buf = [0u8; 4096];
            // Echo each chunk as it arrives (so `hold` sees replies), until the peer half-closes.
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let data = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(path) = &record {
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                    {
                        let _ = writeln!(f, "{peer} {data}");
                    }
                }
                if stream
                    .write_all(format!("{name}:{data}").as_bytes())
                    .is_err()
                {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// IPv6-only TCP echo server (for strict-mode checks over IPv6).
fn serve6(port: u16, name: &str) -> Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    let addr: SocketAddr = format!("[::]:{port}").parse()?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    let listener: TcpListener = socket.into();
    println!("listening on [::]:{port}");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.to_owned();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
                if stream.write_all(reply.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn udp_serve(port: u16, name: &str, record: Option<&str>) -> Result<()> {
    let socket = std::net::UdpSocket::bind(("0.0.0.0", port))
        .with_context(|| format!("bind udp :{port}"))?;
    println!("listening on udp {port}");
    std::io::stdout().flush()?;
    let mut buf = [0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let data = String::from_utf8_lossy(&buf[..n]).into_owned();
        if let Some(path) = record {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{peer} {data}");
            }
        }
        let _ = socket.send_to(format!("{name}:{data}").as_bytes(), peer);
    }
}

/// One datagram to `addr` and its reply: on a connected socket (`connect`) or with sendto.
fn udp_attempt(addr: SocketAddr, text: &str, connect: bool, timeout: Duration) -> Attempt {
    let result = (|| -> std::io::Result<String> {
        let local: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(std::io::Error::other)?;
        let s = std::net::UdpSocket::bind(local)?;
        s.set_read_timeout(Some(timeout))?;
        if connect {
            s.connect(addr)?;
            s.send(text.as_bytes())?;
        } else {
            s.send_to(text.as_bytes(), addr)?;
        }
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })();
    Attempt::of(result.map(|reply| (reply, None)))
}

#[derive(serde::Serialize)]
struct Attempt {
    ok: bool,
    reply: String,
    errno: Option<i32>,
    error: Option<String>,
    /// The address the TCP socket ended up connected to (after any rewrite by the kernel).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
}

impl Attempt {
    fn of(result: std::io::Result<(String, Option<SocketAddr>)>) -> Self {
        match result {
            Ok((reply, peer)) => Attempt {
                ok: true,
                reply,
                errno: None,
                error: None,
                peer: peer.map(|p| p.to_string()),
            },
            Err(e) => Attempt {
                ok: false,
                reply: String::new(),
                errno: e.raw_os_error(),
                error: Some(e.to_string()),
                peer: None,
            },
        }
    }
}

fn attempt(addr: SocketAddr, text: &str, timeout: Duration) -> Attempt {
    Attempt::of(TcpStream::connect_timeout(&addr, timeout).and_then(|s| exchange(s, text, timeout)))
}

/// Like [`attempt`] from a chosen source address (e.g. a host process posing as the agent).
fn attempt_from(src: std::net::IpAddr, addr: SocketAddr, text: &str, timeout: Duration) -> Attempt {
    let connected = (|| -> std::io::Result<TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.bind(&SocketAddr::new(src, 0).into())?;
        socket.connect_timeout(&addr.into(), timeout)?;
        Ok(socket.into())
    })();
    Attempt::of(connected.and_then(|s| exchange(s, text, timeout)))
}

/// Sends `text`, half-closes, and reads the reply to its end; with the address the socket is
/// connected to (after any rewrite by the kernel).
fn exchange(
    mut s: TcpStream,
    text: &str,
    timeout: Duration,
) -> std::io::Result<(String, Option<SocketAddr>)> {
    let peer = s.peer_addr().ok();
    s.set_read_timeout(Some(timeout))?;
    s.write_all(text.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    Ok((reply, peer))
}

fn connect(addr: SocketAddr, text: &str, count: u32, timeout: Duration) -> Result<()> {
    for _ in 0..count {
        println!("{}", serde_json::to_string(&attempt(addr, text, timeout))?);
    }
    Ok(())
}

/// Sends `bytes` bytes on one connection and counts the reply bytes; reading on another thread so
/// neither side blocks on a full buffer whatever the size.
fn send(addr: SocketAddr, bytes: usize) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)?;
    s.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    s.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
    let mut reader = s.try_clone()?;
    let received = std::thread::spawn(move || -> std::io::Result<u64> {
        std::io::copy(&mut reader, &mut std::io::sink())
    });
    let chunk = [b'x'; 16 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(Shutdown::Write)?;
    let received = received
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    println!("{{\"sent\":{bytes},\"received\":{received}}}");
    Ok(())
}

/// Outcome counts of `meshprobe loop`.
#[derive(serde::Serialize, Default)]
struct LoopSummary {
    attempts: u64,
    ok: u64,
    failed: u64,
    /// errno (or "timeout"/"other") -> count.
    errors: std::collections::BTreeMap<String, u64>,
    /// reply -> count of successful attempts.
    replies: std::collections::BTreeMap<String, u64>,
}

/// Continuous traffic: back-to-back connections (a short pause between them) for `length`.
fn connect_loop(addr: SocketAddr, text: &str, length: Duration, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + length;
    let mut summary = LoopSummary::default();
    while Instant::now() < deadline {
        let a = attempt(addr, text, timeout);
        summary.attempts += 1;
        if a.ok {
            summary.ok += 1;
            *summary.replies.entry(a.reply).or_default() += 1;
        } else {
            summary.failed += 1;
            let key = a
                .errno
                .map_or_else(|| "other".to_owned(), |e| e.to_string());
            *summary.errors.entry(key).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// Many concurrent connections from one process (one calling identity).
fn many(addr: SocketAddr, count: usize, hold: Duration) -> Result<()> {
    let mut open = Vec::new();
    let mut failed = 0usize;
    for _ in 0..count {
        let attempt = (|| -> std::io::Result<TcpStream> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"m")?;
            let mut buf = [0u8; 64];
            if s.read(&mut buf)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(s)
        })();
        match attempt {
            Ok(s) => open.push(s),
            Err(_) => failed += 1,
        }
    }
    let ok = open.len();
    println!("{{\"ok\":{ok},\"failed\":{failed}}}");
    std::io::stdout().flush()?;
    std::thread::sleep(hold);
    drop(open);
    Ok(())
}

/// Keeps one connection busy for `secs`, failing if any exchange breaks (used across reloads).
fn hold(addr: SocketAddr, text: &str, secs: u64) -> Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut exchanges = 0u64;
    while Instant::now() < deadline {
        s.write_all(text.as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed after {exchanges} exchanges");
        }
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{{\"exchanges\":{exchanges}}}");
    Ok(())
}

/// One benchmark connection: connect, send a byte, read the echo, close. Returns the latency.
fn one_round_trip(addr: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    s.write_all(b"x")?;
    let mut buf = [0u8; 64];
    if s.read(&mut buf)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before reply",
        ));
    }
    Ok(start.elapsed())
}

#[derive(serde::Serialize)]
struct BenchResult {
    connections: usize,
    errors: usize,
    seconds: f64,
    connections_per_second: f64,
    p50_us: u128,
    p99_us: u128,
}

fn bench(addr: SocketAddr, secs: u64, workers: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut latencies, mut errors) = (Vec::new(), 0usize);
                while Instant::now() < deadline {
                    match one_round_trip(addr) {
                        Ok(l) => latencies.push(l),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for h in handles {
        let (l, e) = h
            .join()
            .map_err(|_| anyhow::anyhow!("bench worker panicked"))?;
        latencies.extend(l);
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: usize| {
        latencies
            .get(latencies.len().saturating_sub(1) * p / 100)
            .map_or(0, |d| d.as_micros())
    };
    let result = BenchResult {
        connections: latencies.len(),
        errors,
        seconds,
        connections_per_second: latencies.len() as f64 / seconds,
        p50_us: pct(50),
        p99_us: pct(99),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// How the HTTP server misbehaves (fault injection for the traffic-policy tests).
#[derive(Clone, Debug)]
enum Behaviour {
    Ok,
    Always503,
    /// The first N requests get 503.
    First503(u64),
    Reset,
    Hang,
    Slow(Duration),
    /// Serves every request; `/health` fails while the file exists.
    HealthSwitch(std::path::PathBuf),
}

impl std::str::FromStr for Behaviour {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ok" => Behaviour::Ok,
            "503" => Behaviour::Always503,
            "reset" => Behaviour::Reset,
            "hang" => Behaviour::Hang,
            _ => {
                if let Some(n) = s.strip_prefix("503x") {
                    Behaviour::First503(n.parse()?)
                } else if let Some(file) = s.strip_prefix("health=") {
                    Behaviour::HealthSwitch(file.into())
                } else if let Some(ms) = s.strip_prefix("slow") {
                    Behaviour::Slow(Duration::from_millis(ms.parse()?))
                } else {
                    bail!("unknown behaviour {s:?}")
                }
            }
        })
    }
}

fn http_serve(port: u16, name: &str, behaviour: Behaviour, record: Option<&str>) -> Result<()> {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    println!("listening on {port}");
    std::io::stdout().flush()?;
    let served = Arc::new(AtomicU64::new(0));
    let record = record.map(|r| {
        Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(r)
                .expect("record file"),
        ))
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (name, served, record) = (name.to_owned(), served.clone(), record.clone());
        let behaviour = behaviour.clone();
        std::thread::spawn(move || {
            let _ = http_connection(stream, &name, &behaviour, &served, record.as_deref());
        });
    }
    Ok(())
}

/// Serves requests on one keep-alive connection.
fn http_connection(
    stream: TcpStream,
    name: &str,
    behaviour: &Behaviour,
    served: &std::sync::atomic::AtomicU64,
    record: Option<&std::sync::Mutex<std::fs::File>>,
) -> Result<()> {
    use std::io::BufRead;
    let _ = stream.set_nodelay(true);
    // Reported as `x-peer`, so tests see which source address reached the server.
    let peer = stream.peer_addr()?;
    let mut reader = std::io::BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        let mut close = false;
        let mut upgrade = false;
        let mut traceparent = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if lower.starts_with("upgrade:") && lower.contains("echo") {
                upgrade = true;
            }
            if lower.starts_with("traceparent:") {
                traceparent = format!("x-traceparent: {}\r\n", line[12..].trim());
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if let Some(record) = record {
            let mut f = record.lock().unwrap_or_else(|p| p.into_inner());
            writeln!(f, "{method} {path}")?;
        }
        if upgrade {
            // `Upgrade: echo`: switch protocols, then echo raw bytes until the peer half-closes.
            write!(
                writer,
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\nx-served-by: {name}\r\n\r\n"
            )?;
            writer.flush()?;
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                writer.write_all(&buf[..n])?;
            }
            writer.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let status = match behaviour {
            _ if path.starts_with("/missing") => 404,
            Behaviour::Ok => 200,
            Behaviour::Always503 => 503,
            Behaviour::First503(k) if n < *k => 503,
            Behaviour::First503(_) => 200,
            Behaviour::Reset => {
                // SO_LINGER 0: close() sends RST instead of FIN.
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: valid fd and a live linger struct of the given size.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&writer),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                return Ok(());
            }
            Behaviour::Hang => {
                std::thread::sleep(Duration::from_secs(3600));
                return Ok(());
            }
            Behaviour::Slow(d) => {
                std::thread::sleep(*d);
                200
            }
            Behaviour::HealthSwitch(file) if path == "/health" && file.exists() => 503,
            Behaviour::HealthSwitch(_) => 200,
        };
        let text = format!("{name}\n");
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            _ => "Service Unavailable",
        };
        write!(
            writer,
            "HTTP/1.1 {status} {reason}\r\nx-served-by: {name}\r\nx-peer: {peer}\r\n{traceparent}content-length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "connection: close\r\n" } else { "" }
        )?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

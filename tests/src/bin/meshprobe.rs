//! meshprobe: the processes tests and the demo run inside pods.
//!
//!   meshprobe serve <port> <name> [record-file]   echo server: replies "<name>:<data>", appends
//!                                                 "<peer> <data>" lines to record-file
//!   meshprobe connect <ip:port> <text> [count] [timeout-ms]
//!                                                 connects `count` times, sends text, half-closes,
//!                                                 prints one JSON line per attempt; connect and
//!                                                 read give up after timeout-ms (default 5000)
//!   meshprobe hold <ip:port> <text> <seconds>      one connection that exchanges text every 100 ms

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
        _ => bail!("usage: meshprobe serve <port> <name> [record] | connect <ip:port> <text> [count] [timeout-ms] | hold <ip:port> <text> <seconds>"),
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

#[derive(serde::Serialize)]
struct Attempt {
    ok: bool,
    reply: String,
    errno: Option<i32>,
    error: Option<String>,
}

fn attempt(addr: SocketAddr, text: &str, timeout: Duration) -> Attempt {
    let result = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(text.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    })();
    match result {
        Ok(reply) => Attempt {
            ok: true,
            reply,
            errno: None,
            error: None,
        },
        Err(e) => Attempt {
            ok: false,
            reply: String::new(),
            errno: e.raw_os_error(),
            error: Some(e.to_string()),
        },
    }
}

fn connect(addr: SocketAddr, text: &str, count: u32, timeout: Duration) -> Result<()> {
    for _ in 0..count {
        println!("{}", serde_json::to_string(&attempt(addr, text, timeout))?);
    }
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

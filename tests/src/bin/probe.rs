//! `shunt-probe`: a tiny client/server the kernel tests run inside "pods"
//! and the "node". It reports outcomes as one parseable line (errno, the
//! addresses the kernel reported, bytes verified) so that tests assert on
//! facts rather than on a client's exit code.

#[path = "probe/soak.rs"]
mod soak;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn usage() -> ! {
    eprintln!(
        "usage:\n  shunt-probe connect ADDR [--echo BYTES] [--bind SRC_IP]\n  shunt-probe loop ADDR --for-ms N\n  shunt-probe listen ADDR --count-file PATH\n  shunt-probe soak ADDR [--rate N] [--streams N] [--seconds N] [--workers N]"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(addr)) = (args.first(), args.get(1)) else {
        usage()
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match cmd.as_str() {
        "connect" => connect(
            addr,
            flag("--echo").map(|n| n.parse().unwrap_or_else(|_| usage())),
            flag("--bind").map(|ip| ip.parse().unwrap_or_else(|_| usage())),
            args.iter().any(|a| a == "--raw"),
            flag("--hold-ms").and_then(|n| n.parse().ok()).unwrap_or(0),
        ),
        "many" => many(
            addr,
            flag("--n").and_then(|n| n.parse().ok()).unwrap_or(10),
            flag("--echo").and_then(|n| n.parse().ok()).unwrap_or(1000),
        ),
        "serve" => serve(addr),
        "loop" => run_loop(
            addr,
            flag("--for-ms")
                .and_then(|n| n.parse().ok())
                .unwrap_or(3000),
        ),
        "listen" => listen(addr, &flag("--count-file").unwrap_or_else(|| usage())),
        "soak" => soak::run(
            addr,
            soak::Load {
                rate: flag("--rate").and_then(|n| n.parse().ok()).unwrap_or(1000),
                streams: flag("--streams")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(500),
                seconds: flag("--seconds").and_then(|n| n.parse().ok()).unwrap_or(60),
                workers: flag("--workers")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(128),
            },
        ),
        _ => usage(),
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Connect; print `err errno=N` or `ok local=.. peer=..`; with `--echo N`,
/// read the handler's `dst=ADDR` line, send N pattern bytes, half-close and
/// verify the same bytes come back.
fn connect(
    addr: SocketAddr,
    echo: Option<usize>,
    bind: Option<std::net::IpAddr>,
    raw: bool,
    hold_ms: u64,
) {
    let r = match bind {
        None => TcpStream::connect_timeout(&addr, Duration::from_secs(5)),
        Some(ip) => connect_from(ip, addr),
    };
    let s = match r {
        Ok(s) => s,
        Err(e) => {
            println!("err errno={}", errno(&e));
            return;
        }
    };
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let Some(n) = echo else {
        println!("ok local={local} peer={peer}");
        return;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut first = String::new();
    // --raw: the peer is a plain echo server (no `dst=` line first).
    if !raw {
        if let Err(e) = r.read_line(&mut first) {
            println!("err read errno={}", errno(&e));
            return;
        }
    }
    let dst = first.trim().strip_prefix("dst=").unwrap_or("?").to_string();
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    let mut w = s;
    let writer = {
        let data = data.clone();
        let mut w2 = w.try_clone().expect("clone");
        std::thread::spawn(move || {
            // --hold-ms: pause halfway, keeping the connection open (tests
            // run a handover meanwhile).
            let half = data.len() / 2;
            let r = w2.write_all(&data[..half]).and_then(|()| {
                std::thread::sleep(Duration::from_millis(hold_ms));
                w2.write_all(&data[half..])
            });
            let _ = w2.shutdown(Shutdown::Write);
            r
        })
    };
    let mut got = Vec::with_capacity(n);
    let rr = r.read_to_end(&mut got);
    let wr = writer.join().expect("writer");
    let _ = w.flush();
    match (wr, rr) {
        (Ok(()), Ok(_)) if got == data => {
            println!(
                "ok local={local} peer={peer} dst={dst} echoed={}",
                got.len()
            )
        }
        (Ok(()), Ok(_)) => println!("err mismatch got={} want={n} dst={dst}", got.len()),
        (Err(e), _) | (_, Err(e)) => println!("err io errno={} dst={dst}", errno(&e)),
    }
}

/// `n` connections, each echoing `bytes` through a plain echo server. Every
/// connection stays open until all are done, so at the end all `n` tunnels
/// exist at once. Prints `ok=N failed=M`.
fn many(addr: SocketAddr, n: usize, bytes: usize) {
    let handles: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || -> Result<TcpStream, String> {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let data: Vec<u8> = (0..bytes).map(|k| ((k + i) % 251) as u8).collect();
                let mut w = s.try_clone().map_err(|e| e.to_string())?;
                w.write_all(&data).map_err(|e| e.to_string())?;
                let mut got = vec![0u8; bytes];
                let mut r = s.try_clone().map_err(|e| e.to_string())?;
                r.read_exact(&mut got).map_err(|e| e.to_string())?;
                if got == data {
                    Ok(s)
                } else {
                    Err("mismatch".into())
                }
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    let mut errors = std::collections::BTreeSet::new();
    let mut open = Vec::new();
    for h in handles {
        match h.join().unwrap_or(Err("panic".into())) {
            Ok(s) => {
                ok += 1;
                open.push(s);
            }
            Err(e) => {
                failed += 1;
                errors.insert(e);
            }
        }
    }
    println!("ok={ok} failed={failed} errors={errors:?}");
    drop(open);
}

/// A plain TCP echo server (thread per connection, half-close honoured).
fn serve(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1)
    });
    println!("listening");
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut r = s.try_clone().expect("clone");
            let mut w = s;
            let _ = std::io::copy(&mut r, &mut w);
            let _ = w.shutdown(Shutdown::Write);
        });
    }
}

/// Connect in a loop for a while; print `ok=N failed=M errnos=[..]`.
fn run_loop(addr: SocketAddr, for_ms: u64) {
    let end = Instant::now() + Duration::from_millis(for_ms);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut errnos = std::collections::BTreeMap::<i32, u64>::new();
    while Instant::now() < end {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                // A connection counts only if the agent really serves it: the
                // echo handler's first line must arrive.
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let mut b = [0u8; 4];
                match s.read_exact(&mut b) {
                    Ok(()) if &b == b"dst=" => ok += 1,
                    Ok(()) => {
                        failed += 1;
                        *errnos.entry(-2).or_default() += 1;
                    }
                    Err(e) => {
                        failed += 1;
                        *errnos.entry(errno(&e)).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                failed += 1;
                *errnos.entry(errno(&e)).or_default() += 1;
            }
        }
    }
    println!("ok={ok} failed={failed} errnos={errnos:?}");
}

/// Accept forever, writing the number of accepted connections to a file
/// after each one (and 0 at start, as a readiness signal).
fn listen(addr: SocketAddr, count_file: &str) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1)
    });
    let mut n = 0u64;
    std::fs::write(count_file, "0").expect("count file");
    for s in l.incoming() {
        if s.is_ok() {
            n += 1;
            std::fs::write(count_file, n.to_string()).expect("count file");
        }
    }
}

/// Connect from a given source address (tests use it to spoof another
/// pod's address).
fn connect_from(ip: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_freebind_v4(true).ok();
    sock.bind(&SocketAddr::new(ip, 0).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

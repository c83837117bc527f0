//! `shunt-probe soak`: the load of `cargo xtask soak`, run inside a pod.
//! Short connections at a fixed rate (each echoes 1 KiB, checked) and
//! long-lived streams (each echoes 4 KiB every 100 ms for 5–20 s, every
//! byte checked, then reopens), through a plain echo server. Prints a
//! progress line every 10 s and a final `soak ...` line of counters.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

pub struct Load {
    /// Short connections per second.
    pub rate: u64,
    /// Long-lived streams open at once.
    pub streams: usize,
    pub seconds: u64,
    /// Threads making the short connections.
    pub workers: usize,
}

const SHORT_BYTES: usize = 1024;
const CHUNK: usize = 4096;
/// A short connection slower than this counts as stalled.
const STALL: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Counters {
    short_ok: AtomicU64,
    /// Connect refused or reset before any byte came back.
    refused: AtomicU64,
    /// Other failures (timeouts, resets mid-stream, early EOF).
    failed: AtomicU64,
    /// Bytes came back different.
    corrupted: AtomicU64,
    /// Succeeded, but took longer than `STALL`.
    stalled: AtomicU64,
    max_latency_ms: AtomicU64,
    streams_opened: AtomicU64,
    streams_ok: AtomicU64,
    streams_failed: AtomicU64,
    streams_corrupted: AtomicU64,
    stream_bytes: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn error(&self, what: &str, e: &std::io::Error) {
        let key = format!(
            "{what}:{}",
            e.raw_os_error()
                .map_or(e.kind().to_string(), |n| n.to_string())
        );
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    fn line(&self, elapsed: Duration) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let short = l(&self.short_ok) + l(&self.refused) + l(&self.failed) + l(&self.corrupted);
        format!(
            "t={}s short={short} short_ok={} rate={:.0} refused={} failed={} corrupted={} stalled={} max_latency_ms={} streams_opened={} streams_ok={} streams_failed={} streams_corrupted={} stream_bytes={} errors={:?}",
            elapsed.as_secs(),
            l(&self.short_ok),
            short as f64 / elapsed.as_secs_f64().max(0.001),
            l(&self.refused),
            l(&self.failed),
            l(&self.corrupted),
            l(&self.stalled),
            l(&self.max_latency_ms),
            l(&self.streams_opened),
            l(&self.streams_ok),
            l(&self.streams_failed),
            l(&self.streams_corrupted),
            l(&self.stream_bytes),
            self.errors.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// xorshift64*: the bytes a connection sends, reproducible from its seed.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
    )
}

pub fn run(addr: SocketAddr, load: Load) {
    let c = Arc::new(Counters::default());
    let start = Instant::now();
    let end = start + Duration::from_secs(load.seconds);
    let ticket = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(f)
            .expect("thread")
    };
    for i in 0..load.streams {
        let c = c.clone();
        threads.push(spawn(Box::new(move || streams(addr, i as u64, end, &c))));
    }
    for _ in 0..load.workers {
        let (c, ticket) = (c.clone(), ticket.clone());
        let rate = load.rate.max(1);
        threads.push(spawn(Box::new(move || loop {
            let t = ticket.fetch_add(1, Ordering::Relaxed);
            let due = start + Duration::from_secs_f64(t as f64 / rate as f64);
            // Behind schedule (the machine cannot sustain the rate), the
            // tickets left are not worked off after the end.
            if due >= end || Instant::now() >= end {
                return;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            short(addr, t, &c);
        })));
    }
    let mut next = start + Duration::from_secs(10);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next {
            println!("progress {}", c.line(start.elapsed()));
            next += Duration::from_secs(10);
        }
    }
    for t in threads {
        let _ = t.join();
    }
    println!("soak {}", c.line(Duration::from_secs(load.seconds)));
}

/// One short connection: connect, send 1 KiB, read it back, close.
fn short(addr: SocketAddr, seed: u64, c: &Counters) {
    let begin = Instant::now();
    let mut s = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            c.error("connect", &e);
            if refused(&e) {
                c.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_nodelay(true);
    let mut data = [0u8; SHORT_BYTES];
    Pattern::new(seed).fill(&mut data);
    let mut got = [0u8; SHORT_BYTES];
    let r = s
        .write_all(&data)
        .and_then(|()| s.shutdown(Shutdown::Write))
        .and_then(|()| s.read_exact(&mut got))
        .and_then(|()| {
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).map(|_| rest.len())
        });
    match r {
        Ok(0) if got == data => {
            let ms = begin.elapsed().as_millis() as u64;
            c.max_latency_ms.fetch_max(ms, Ordering::Relaxed);
            if begin.elapsed() > STALL {
                c.stalled.fetch_add(1, Ordering::Relaxed);
            }
            c.short_ok.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            c.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            c.error("short", &e);
            // Reset before a single byte came back: the agent refused it.
            if refused(&e) && got == [0u8; SHORT_BYTES] {
                c.refused.fetch_add(1, Ordering::Relaxed);
            } else {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Stream `i`: one connection after another until `end`, each living 5–20 s.
fn streams(addr: SocketAddr, i: u64, end: Instant, c: &Counters) {
    // Spread the first connects over a second.
    std::thread::sleep(Duration::from_millis(i * 1000 / 500 % 1000));
    let mut generation = 0u64;
    while Instant::now() + Duration::from_secs(1) < end {
        generation += 1;
        let seed = i << 32 | generation;
        let life = Duration::from_millis(5_000 + seed.wrapping_mul(7919) % 15_000);
        let until = (Instant::now() + life).min(end);
        c.streams_opened.fetch_add(1, Ordering::Relaxed);
        match stream(addr, seed, until, c) {
            Ok(true) => {
                c.streams_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {
                c.streams_corrupted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                c.error("stream", &e);
                c.streams_failed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `Ok(false)`: the echo differed.
fn stream(addr: SocketAddr, seed: u64, until: Instant, c: &Counters) -> std::io::Result<bool> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let _ = s.set_nodelay(true);
    let mut pattern = Pattern::new(seed);
    let (mut out, mut back) = ([0u8; CHUNK], [0u8; CHUNK]);
    while Instant::now() < until {
        pattern.fill(&mut out);
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        if out != back {
            return Ok(false);
        }
        c.stream_bytes.fetch_add(CHUNK as u64, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(rest.is_empty())
}

//! One line per connection at close, in ztunnel's text form (field order and
//! quoting of `src/proxy/metrics.rs`): strings are quoted the way tracing
//! prints `Debug` values, addresses and numbers are bare.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{rfc3339_micros, LogAddr, LogStr, TelemetryError};

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = TelemetryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(TelemetryError::UnknownLogFormat(other.to_string())),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    #[default]
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// The fields of ztunnel's `connection complete` line; `None` is omitted.
/// The names and identities are shared ([`super::intern`]) and the HBONE
/// address formatted when the line is written: a held connection's record
/// copies no text.
#[derive(Clone, Debug)]
pub struct ConnectionLog {
    /// When the line is written (the connection's close).
    pub time: SystemTime,
    pub src_addr: SocketAddr,
    pub src_workload: Option<Arc<str>>,
    pub src_namespace: Option<Arc<str>>,
    /// SPIFFE URI, only when the connection was mTLS.
    pub src_identity: Option<Arc<str>>,
    pub dst_addr: SocketAddr,
    /// The HBONE `:authority` (original VIP:port) when tunnelled.
    pub dst_hbone_addr: Option<LogStr>,
    pub dst_service: Option<Arc<str>>,
    pub dst_workload: Option<Arc<str>>,
    pub dst_namespace: Option<Arc<str>>,
    pub dst_identity: Option<Arc<str>>,
    pub direction: Direction,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration: Duration,
    /// Set on failure: the line is logged at ERROR with `error="..."`.
    pub error: Option<String>,
    /// The TLS SNI the client sent (waypoint, TLS ports).
    pub sni: Option<String>,
    /// The dry-run policies' would-be decision, when one applied.
    pub shadow: Option<String>,
}

impl ConnectionLog {
    /// A log entry with only the mandatory fields filled in.
    pub fn new(src_addr: SocketAddr, dst_addr: SocketAddr, direction: Direction) -> Self {
        ConnectionLog {
            time: SystemTime::now(),
            src_addr,
            src_workload: None,
            src_namespace: None,
            src_identity: None,
            dst_addr,
            dst_hbone_addr: None,
            dst_service: None,
            dst_workload: None,
            dst_namespace: None,
            dst_identity: None,
            direction,
            bytes_sent: 0,
            bytes_recv: 0,
            duration: Duration::ZERO,
            error: None,
            sni: None,
            shadow: None,
        }
    }

    fn level(&self) -> &'static str {
        if self.error.is_some() {
            "error"
        } else {
            "info"
        }
    }

    fn duration_str(&self) -> String {
        format!("{}ms", self.duration.as_millis())
    }

    /// ztunnel's text line, without a trailing newline.
    pub fn format_text(&self) -> String {
        let mut out = String::with_capacity(512);
        // `write!` into a String cannot fail.
        let _ = write!(
            out,
            "{} {} access connection complete src.addr={}",
            rfc3339_micros(self.time),
            self.level(),
            LogAddr(self.src_addr)
        );
        fn quoted<T: std::fmt::Debug>(out: &mut String, key: &str, v: &Option<T>) {
            if let Some(v) = v {
                let _ = write!(out, " {key}={v:?}");
            }
        }
        quoted(&mut out, "src.workload", &self.src_workload);
        quoted(&mut out, "src.namespace", &self.src_namespace);
        quoted(&mut out, "src.identity", &self.src_identity);
        let _ = write!(out, " dst.addr={}", LogAddr(self.dst_addr));
        if let Some(h) = &self.dst_hbone_addr {
            let _ = write!(out, " dst.hbone_addr={h}");
        }
        quoted(&mut out, "dst.service", &self.dst_service);
        quoted(&mut out, "dst.workload", &self.dst_workload);
        quoted(&mut out, "dst.namespace", &self.dst_namespace);
        quoted(&mut out, "dst.identity", &self.dst_identity);
        quoted(&mut out, "sni", &self.sni);
        let _ = write!(
            out,
            " direction={:?} bytes_sent={} bytes_recv={} duration={:?}",
            self.direction.as_str(),
            self.bytes_sent,
            self.bytes_recv,
            self.duration_str()
        );
        quoted(&mut out, "shadow", &self.shadow);
        quoted(&mut out, "error", &self.error);
        out
    }

    /// ztunnel's JSON line (`--log-format json`): same fields, same order.
    pub fn format_json(&self) -> String {
        let mut out = String::with_capacity(640);
        let mut field = |key: &str, value: serde_json::Value| {
            out.push(if out.is_empty() { '{' } else { ',' });
            // Serializing a str or a JSON value into a String cannot fail.
            out.push_str(&serde_json::to_string(key).unwrap_or_default());
            out.push(':');
            out.push_str(&value.to_string());
        };
        let s = |v: &str| serde_json::Value::String(v.to_string());
        field("level", s(self.level()));
        field("time", s(&rfc3339_micros(self.time)));
        field("scope", s("access"));
        field("message", s("connection complete"));
        field("src.addr", s(&LogAddr(self.src_addr).to_string()));
        fn opt<T: std::fmt::Display>(
            field: &mut dyn FnMut(&str, serde_json::Value),
            k: &str,
            v: &Option<T>,
        ) {
            if let Some(v) = v {
                field(k, serde_json::Value::String(v.to_string()));
            }
        }
        opt(&mut field, "src.workload", &self.src_workload);
        opt(&mut field, "src.namespace", &self.src_namespace);
        opt(&mut field, "src.identity", &self.src_identity);
        field("dst.addr", s(&LogAddr(self.dst_addr).to_string()));
        opt(&mut field, "dst.hbone_addr", &self.dst_hbone_addr);
        opt(&mut field, "dst.service", &self.dst_service);
        opt(&mut field, "dst.workload", &self.dst_workload);
        opt(&mut field, "dst.namespace", &self.dst_namespace);
        opt(&mut field, "dst.identity", &self.dst_identity);
        opt(&mut field, "sni", &self.sni);
        field("direction", s(self.direction.as_str()));
        field("bytes_sent", self.bytes_sent.into());
        field("bytes_recv", self.bytes_recv.into());
        field("duration", s(&self.duration_str()));
        opt(&mut field, "shadow", &self.shadow);
        opt(&mut field, "error", &self.error);
        out.push('}');
        out
    }

    pub fn format(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Text => self.format_text(),
            LogFormat::Json => self.format_json(),
        }
    }
}

/// A connection the kernel let past the mesh (ALLOW_ANY passthrough) or
/// refused at connect() (REGISTRY_ONLY), as reported through the `events`
/// ring buffer.
#[derive(Clone, Debug)]
pub struct EgressLog {
    pub time: SystemTime,
    /// Refused (REGISTRY_ONLY) rather than passed through.
    pub denied: bool,
    pub udp: bool,
    pub dst_addr: SocketAddr,
    /// Workload name, namespace and identity, when the cgroup is known.
    pub src: Option<(String, String, String)>,
    pub src_cgroup: u64,
}

impl EgressLog {
    fn parts(&self) -> (&'static str, &'static str, &'static str) {
        let (level, msg) = if self.denied {
            ("warn", "connection refused (REGISTRY_ONLY)")
        } else {
            ("info", "connection passthrough")
        };
        (level, msg, if self.udp { "udp" } else { "tcp" })
    }

    pub fn format(&self, format: LogFormat) -> String {
        let time = super::rfc3339_micros(self.time);
        let (level, msg, proto) = self.parts();
        if format == LogFormat::Json {
            let src = self.src.as_ref();
            return serde_json::json!({
                "time": time, "level": level, "scope": "access", "message": msg,
                "src.workload": src.map(|s| s.0.as_str()),
                "src.namespace": src.map(|s| s.1.as_str()),
                "src.identity": src.map(|s| s.2.as_str()),
                "dst.addr": LogAddr(self.dst_addr).to_string(), "protocol": proto, "direction": "outbound",
            })
            .to_string();
        }
        let mut s = format!("{time} {level} access {msg}");
        match &self.src {
            Some((name, ns, id)) => s.push_str(&format!(
                " src.workload=\"{name}\" src.namespace=\"{ns}\" src.identity=\"{id}\""
            )),
            None => s.push_str(&format!(" src.cgroup={}", self.src_cgroup)),
        }
        s.push_str(&format!(
            " dst.addr={} protocol=\"{proto}\" direction=\"outbound\"",
            LogAddr(self.dst_addr)
        ));
        s
    }
}

/// Writes access-log lines (connection, request and egress lines) to a
/// sink, stdout by default: the one writer of the access log. Lines obey
/// the log filter's `access` target (`SHUNT_LOG=access=off` switches them
/// off, `access=warn` keeps only failures). The lock is taken once per
/// line, never per byte.
pub struct AccessLogger {
    format: LogFormat,
    sink: Mutex<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLogger {
    pub fn stdout(format: LogFormat) -> Self {
        Self::to_writer(format, Box::new(std::io::stdout()))
    }

    pub fn to_writer(format: LogFormat, sink: Box<dyn std::io::Write + Send>) -> Self {
        AccessLogger {
            format,
            sink: Mutex::new(sink),
        }
    }

    pub fn format(&self) -> LogFormat {
        self.format
    }

    pub fn connection(&self, entry: &ConnectionLog) {
        if enabled(entry.error.is_some()) {
            self.write_line(entry.format(self.format));
        }
    }

    pub fn request(&self, entry: &super::RequestLog) {
        if enabled(false) {
            self.write_line(entry.format(self.format));
        }
    }

    pub fn egress(&self, entry: &EgressLog) {
        if enabled(entry.denied) {
            self.write_line(entry.format(self.format));
        }
    }
}

/// Whether the log filter lets access lines through (`access` target):
/// failures at `warn`, the rest at `info`.
fn enabled(failure: bool) -> bool {
    // Without a subscriber (library use, tests) there is no filter to obey.
    if !tracing::dispatcher::has_been_set() {
        return true;
    }
    if failure {
        tracing::enabled!(target: "access", tracing::Level::WARN)
    } else {
        tracing::enabled!(target: "access", tracing::Level::INFO)
    }
}

impl AccessLogger {
    fn write_line(&self, mut line: String) {
        line.push('\n');
        let mut sink = match self.sink.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = sink.write_all(line.as_bytes()).and_then(|_| sink.flush()) {
            tracing::warn!(error = %e, "writing access log line");
        }
    }
}

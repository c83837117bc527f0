//! Telemetry: ztunnel-format connection access logs, Envoy-format request
//! logs (waypoint), and the process-wide Prometheus registry.

mod access_log;
mod addr;
mod envoy_log;
mod metrics;
mod ratelimit;
mod shared;

pub use access_log::{AccessLogger, ConnectionLog, Direction, EgressLog, LogFormat};
pub use addr::{LogAddr, LogIp};
pub use envoy_log::RequestLog;
pub use metrics::{
    count_accept_error, count_refused_connection, ConnectionLabels, ConnectionRecorder,
    DnsDropLabels, DnsMetrics, Metrics, MetricsBuilder, Reporter, RequestLabels, ShadowLabels,
};
pub use ratelimit::LogLimit;
pub use shared::{intern, LogStr};

use std::time::SystemTime;

/// Errors of the telemetry stage.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("unknown log format {0:?} (expected \"text\" or \"json\")")]
    UnknownLogFormat(String),
    #[error("encoding metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// Civil UTC date-time of `t`: (year, month, day, hour, minute, second, micros).
fn utc_parts(t: SystemTime) -> (i32, u8, u8, u8, u8, u8, u32) {
    let dt = time::OffsetDateTime::from(t);
    (
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.microsecond(),
    )
}

/// RFC 3339 with microseconds and `Z`, as ztunnel prints: `2024-10-29T02:10:57.056612Z`.
pub fn rfc3339_micros(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, us) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z")
}

/// Envoy's `%START_TIME%` default: milliseconds and `Z`: `2024-10-29T01:24:32.608Z`.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s, us) = utc_parts(t);
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        us / 1000
    )
}

//! How operator commands (`shunt status`, `shunt get`) find the running
//! agent: its pid from its control socket `<state-dir>/agent.sock` (peer
//! credentials, right across PID namespaces: an agent pod without hostPID)
//! or else `<state-dir>/agent.pid`, its network namespace from
//! that pid (or `--netns`), and a small HTTP/1.1 client for its admin
//! endpoints, which listen on localhost *inside* that namespace.
//!
//! Joining the agent's namespace (rather than asking for a unix socket or a
//! flag) means the flags an operator already passes to the agent
//! (`--state-dir`) are all it takes; `--netns` overrides.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

/// Flags of commands that ask the running agent.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminArgs {
    /// The agent's admin listener (its --admin-addr, default
    /// 127.0.0.1:15000), in the agent's network namespace. Given, it is
    /// asked even without a running agent in the pid file.
    #[arg(long, env = "SHUNT_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// The agent's network namespace (a name under /run/netns, or a path).
    /// Default: the running agent's own, found through its pid file.
    #[arg(long, env = "SHUNT_NETNS", value_parser = parse_netns)]
    pub netns: Option<PathBuf>,
}

/// The agent's default `--admin-addr`.
pub const DEFAULT_ADMIN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

/// The agent's process, as its pid file says.
#[derive(Clone, Debug, Serialize)]
pub struct AgentProcess {
    pub pid_file: PathBuf,
    pub pid: Option<u32>,
    pub running: bool,
    pub exe: Option<String>,
}

impl AgentProcess {
    pub fn find(state_dir: &Path) -> AgentProcess {
        let pid_file = state_dir.join(shunt_agent::proxy::capture::PIDFILE);
        let pid = shunt_agent::proxy::handover::agent_pid(state_dir).or_else(|| {
            std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        });
        let exe = pid.and_then(|p| {
            std::fs::read_link(format!("/proc/{p}/exe"))
                .ok()
                .map(|e| e.display().to_string())
        });
        // A pid file left by a dead agent may name an unrelated process now:
        // only a process running a `shunt` binary counts.
        let running = pid.is_some_and(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            comm.trim() == "shunt"
                || exe
                    .as_deref()
                    .is_some_and(|e| e.trim_end_matches(" (deleted)").ends_with("/shunt"))
        });
        AgentProcess {
            pid_file,
            pid,
            running,
            exe,
        }
    }
}

/// The network namespace a command looked at the agent from.
#[derive(Clone, Debug, Serialize)]
pub struct NetnsView {
    /// What was entered (`--netns`, or `/proc/PID/ns/net` of the agent);
    /// `None`: this command's own namespace.
    pub entered: Option<PathBuf>,
    /// Why the agent's namespace could not be entered, when it could not.
    pub error: Option<String>,
}

/// Joins the namespace the agent's localhost endpoints live in: `explicit`
/// (`--netns`), else the running agent's own. Must run before any thread is
/// spawned (a tokio runtime's workers keep the namespace they were created
/// in). Joining fails without CAP_SYS_ADMIN; the command then looks from
/// its own namespace and says so.
pub fn join_agent_netns(explicit: Option<&Path>, agent: &AgentProcess) -> NetnsView {
    let target = match (explicit, agent.pid.filter(|_| agent.running)) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(pid)) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        (None, None) => {
            return NetnsView {
                entered: None,
                error: None,
            }
        }
    };
    if explicit.is_none() && same_netns(&target) {
        return NetnsView {
            entered: None,
            error: None,
        };
    }
    match shunt_agent::proxy::capture::enter_netns(&target) {
        Ok(()) => NetnsView {
            entered: Some(target),
            error: None,
        },
        Err(e) => NetnsView {
            entered: None,
            error: Some(e.to_string()),
        },
    }
}

fn same_netns(other: &Path) -> bool {
    match (
        std::fs::metadata("/proc/self/ns/net"),
        std::fs::metadata(other),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `--netns` value: a path, or a name under /run/netns (as `ip netns` names
/// them).
pub fn parse_netns(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("empty network namespace".into());
    }
    Ok(if s.contains('/') {
        PathBuf::from(s)
    } else {
        Path::new("/run/netns").join(s)
    })
}

/// Upper bound on an admin answer (the config in force is the largest).
const MAX_BODY: usize = 64 << 20;

/// GET `path` on an admin listener: the status code and the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, bytes::Bytes), String> {
    use http_body_util::{BodyExt as _, Empty, Limited};
    use hyper_util::rt::TokioIo;
    let go = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(3), go)
        .await
        .map_err(|_| "no answer within 3s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_netns_name_is_one_of_ip_netns() {
        assert_eq!(
            parse_netns("shunt-demo-node").unwrap(),
            PathBuf::from("/run/netns/shunt-demo-node")
        );
        assert_eq!(
            parse_netns("/proc/1/ns/net").unwrap(),
            PathBuf::from("/proc/1/ns/net")
        );
        assert!(parse_netns("").is_err());
    }

    #[test]
    fn own_namespace_is_not_entered_again() {
        let me = AgentProcess {
            pid_file: PathBuf::new(),
            pid: Some(std::process::id()),
            running: true,
            exe: None,
        };
        let v = join_agent_netns(None, &me);
        assert!(v.entered.is_none() && v.error.is_none(), "{v:?}");
    }
}

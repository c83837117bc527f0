//! `shunt`: the node agent, the egress waypoint and their tools. Each
//! subcommand lives in `cmd/`; this is the binary's edge, where errors
//! become one sentence on stderr and exit code 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "shunt",
    version,
    about = "eBPF egress data plane for Istio-ambient-style meshes",
    long_about = long_about(),
    after_help = "Examples:\n  shunt agent --config-dir /etc/shunt/config\n  shunt waypoint --config-dir /etc/shunt/config --name egress-gateway --namespace common-infrastructure\n  shunt get serviceentries -o yaml\n  shunt maps\n  shunt uninstall"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The VIP prefixes as the allocator (and the kernel side) use them.
fn long_about() -> String {
    let vips = shunt_agent::alloc::Prefixes::default();
    format!(
        "shunt steers pod connections to ServiceEntry VIPs ({}, {}) \
into the node agent with kernel programs, and carries them over HBONE to the egress waypoint.",
        vips.v4, vips.v6
    )
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: load and attach the kernel programs, capture VIP
    /// connections and DNS, and carry connections to their waypoint.
    Agent(Box<cmd::agent::Args>),
    /// Run an egress waypoint: HBONE server, authorization, TLS origination.
    Waypoint(cmd::waypoint::Args),
    /// Run the cluster controller: the one (Lease-elected) allocator of
    /// ServiceEntry VIPs, writing status.addresses and WaypointBound.
    Controller(cmd::controller::Args),
    /// Manage the mesh CA (local CA or Istio's plug-in CA layout).
    Ca(cmd::ca::Args),
    /// Print the services, enrolled workloads and counters from the pinned maps.
    Maps(cmd::maps::Args),
    /// Summarize agent health, programs, services and counters.
    Status(cmd::status::Args),
    /// Show Istio objects with their status (e.g. `shunt get serviceentries -o yaml`).
    Get(cmd::get::Args),
    /// Validate a config directory (`shunt config check DIR`).
    Config(cmd::config::Args),
    /// Explain an authorization decision for a hand-made request.
    Policy(cmd::policy::Args),
    /// Remove shunt's pinned links (detaching the programs), maps, VIP routes and DNS interface. Nothing else.
    Uninstall(cmd::uninstall::Args),
}

/// mimalloc: freed memory goes back to the kernel about a second after a
/// burst (glibc kept what relays and h2 freed: 27 MB of heap in agent and
/// waypoint 12 s after `cargo xtask bench`'s load, 5 MB with mimalloc;
/// jemalloc did as well but builds slower), and small allocations stay
/// thread-local.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc v3's defaults keep memory: arenas committed eagerly (on Linux,
/// overcommit) and freed pages purged only after 1 s (and arenas 10 s).
/// Committed lazily and purged soon, agent and waypoint held 0.66× the RSS
/// 12 s after `cargo xtask bench`'s load (anonymous 27.8 → 5.6 MB) at 0.95×
/// the CPU per GB. Purged 10 ms after they are freed (v2's default), not at
/// once: at once, a parse of 100,000 ServiceEntries on two threads spent
/// ~30% of its samples in the TLB shootdowns of the purges' `madvise`
/// (2.5 s against 0.95 s). A purge left pending when the process goes quiet
/// is done by [`purge_ticker`]. Ids of the vendored mimalloc 3.3's
/// `mi_option_t` (libmimalloc-sys's own constants are v2's); `MIMALLOC_*`
/// environment variables still override them.
mod mimalloc_options {
    use std::ffi::{c_int, c_long};

    /// The mimalloc these ids are from (`MI_MALLOC_VERSION`).
    #[cfg(test)]
    pub const VERSION: c_int = 30302;
    pub const ARENA_EAGER_COMMIT: c_int = 4;
    pub const PURGE_DELAY: c_int = 15;
    /// Milliseconds.
    pub const PURGE_DELAY_MS: c_long = 10;

    // SAFETY: these are mimalloc's exported C functions (mimalloc.h), linked
    // in by libmimalloc-sys; `mi_option_t` is a C enum (an int).
    unsafe extern "C" {
        #[cfg(test)]
        pub safe fn mi_version() -> c_int;
        #[cfg(test)]
        pub safe fn mi_option_get(option: c_int) -> c_long;
        safe fn mi_option_set_default(option: c_int, value: c_long);
        /// Collects the calling thread's heap and purges what the arenas
        /// (process-wide) have had pending for longer than the delay.
        pub safe fn mi_collect(force: bool);
    }

    /// Runs as a constructor (below), before `main` and before Rust's
    /// runtime allocates: the first arena is reserved with these settings.
    /// `set_default` only writes mimalloc's static option table, and yields
    /// to an option already read from the environment.
    extern "C" fn configure() {
        mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        mi_option_set_default(PURGE_DELAY, PURGE_DELAY_MS);
    }

    #[used]
    #[unsafe(link_section = ".init_array.00102")]
    static CONFIGURE: extern "C" fn() = configure;
}

/// mimalloc purges pending pages only from inside its own calls: a process
/// that goes quiet after a burst would keep them. Once a second this thread
/// asks it to, so memory still goes back about a second after load.
fn purge_ticker() {
    let spawned = std::thread::Builder::new()
        .name("mimalloc-purge".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            mimalloc_options::mi_collect(false);
        });
    // Without it memory returns at the next allocation burst instead.
    drop(spawned);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Agent(_) | Cmd::Waypoint(_) | Cmd::Controller(_)
    ) {
        purge_ticker();
    }
    let r = match cli.cmd {
        Cmd::Agent(a) => cmd::agent::run(*a),
        Cmd::Waypoint(a) => cmd::waypoint::run(a),
        Cmd::Controller(a) => cmd::controller::run(a),
        Cmd::Ca(a) => cmd::ca::run(a),
        Cmd::Maps(a) => cmd::maps::run(a),
        Cmd::Status(a) => cmd::status::run(a),
        Cmd::Get(a) => cmd::get::run(a),
        Cmd::Config(a) => cmd::config::run(a),
        Cmd::Policy(a) => cmd::policy::run(a),
        Cmd::Uninstall(a) => cmd::uninstall::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shunt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mimalloc_commits_arenas_lazily_and_purges_soon() {
        use mimalloc_options::*;
        // Other versions may number `mi_option_t` differently: check the
        // ids against its mimalloc.h, then this version.
        assert_eq!(mi_version(), VERSION, "vendored mimalloc changed");
        // The test binary links the same constructor.
        assert_eq!(mi_option_get(ARENA_EAGER_COMMIT), 0);
        assert_eq!(mi_option_get(PURGE_DELAY), PURGE_DELAY_MS);
    }

    /// The agent container of deploy/agent.yaml (the DaemonSet).
    fn daemonset() -> serde_yaml_ng::Value {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.yaml");
        serde_yaml_ng::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn the_daemonset_passes_only_flags_the_agent_accepts_and_outlives_its_drain() {
        let ds = daemonset();
        let pod = &ds["spec"]["template"]["spec"];
        let args = container_args(pod);
        let cli = Cli::try_parse_from(std::iter::once("shunt".to_string()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("deploy/agent.yaml args rejected: {e}"));
        assert!(matches!(cli.cmd, Cmd::Agent(_)));
        assert!(args.iter().any(|a| a == "--source=kubernetes"));
        let drain = args
            .iter()
            .find_map(|a| a.strip_prefix("--drain-timeout="))
            .map(|d| cmd::common::parse_duration(d).unwrap())
            .expect("the DaemonSet sets --drain-timeout");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace >= drain.as_secs() + 10,
            "terminationGracePeriodSeconds {grace} must exceed --drain-timeout {drain:?} with margin"
        );
        // Handover is through the control socket in the hostPath state
        // dir, not signals: no shared PID namespace needed.
        assert_ne!(pod["hostPID"].as_bool(), Some(true));
        assert!(args.iter().any(|a| a == "--state-dir=/var/lib/shunt"));
        let state = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "state")
            .expect("a state volume");
        assert_eq!(state["hostPath"]["path"], "/var/lib/shunt");
        let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(
            (ru["maxSurge"].as_u64(), ru["maxUnavailable"].as_u64()),
            (Some(1), Some(0))
        );
    }

    #[test]
    fn the_controller_deployment_passes_only_flags_the_controller_accepts() {
        let d = deployment("controller.yaml");
        let args = container_args(&d["spec"]["template"]["spec"]);
        let argv = ["shunt", &args[0], "--identity=x"]
            .into_iter()
            .map(str::to_string)
            .chain(args[1..].iter().cloned());
        let cli = Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("deploy/controller.yaml args rejected: {e}"));
        assert!(matches!(cli.cmd, Cmd::Controller(_)));
        assert!(args.iter().any(|a| a.starts_with("--csr-listen=")));
        assert!(
            secrets(&d["spec"]["template"]["spec"]).contains(&"shunt-ca".to_string()),
            "the controller mounts the CA key"
        );
    }

    /// The Deployment document of a deploy/ file.
    fn deployment(file: &str) -> serde_yaml_ng::Value {
        let p = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(p).unwrap();
        let d = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
            .find(|v: &serde_yaml_ng::Value| v["kind"] == "Deployment")
            .unwrap();
        d
    }

    /// The args of a pod spec's first container.
    fn container_args(pod: &serde_yaml_ng::Value) -> Vec<String> {
        pod["containers"][0]["args"]
            .as_sequence()
            .expect("the container has args")
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    /// Names of the Secrets a pod spec mounts.
    fn secrets(pod: &serde_yaml_ng::Value) -> Vec<String> {
        pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn agents_and_waypoints_hold_no_ca_key_and_ask_the_csr_api_with_an_istio_ca_token() {
        let ds = daemonset();
        for (what, pod) in [
            ("agent", &ds["spec"]["template"]["spec"]),
            (
                "waypoint",
                &deployment("waypoint.yaml")["spec"]["template"]["spec"],
            ),
        ] {
            assert!(secrets(pod).is_empty(), "the {what} mounts a Secret");
            assert!(
                container_args(pod)
                    .iter()
                    .any(|a| a.starts_with("--ca-address=")),
                "the {what} has no --ca-address"
            );
            let audience = pod["volumes"].as_sequence().unwrap().iter().find_map(|v| {
                v["projected"]["sources"][0]["serviceAccountToken"]["audience"].as_str()
            });
            assert_eq!(audience, Some("istio-ca"), "the {what}'s projected token");
        }
    }

    #[test]
    fn the_waypoint_deployment_passes_only_flags_the_waypoint_accepts() {
        let d = deployment("waypoint.yaml");
        let args = container_args(&d["spec"]["template"]["spec"]);
        let cli = Cli::try_parse_from(std::iter::once("shunt".to_string()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("deploy/waypoint.yaml args rejected: {e}"));
        assert!(matches!(cli.cmd, Cmd::Waypoint(_)));
        assert!(args.iter().any(|a| a == "--source=kubernetes"));
        assert!(args.iter().any(|a| a.ends_with(":15008")));
    }

    #[test]
    fn the_mesh_config_map_is_a_valid_shunt_mesh_config() {
        let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/mesh.yaml");
        let cm: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mesh.yaml"),
            cm["data"]["mesh.yaml"].as_str().unwrap(),
        )
        .unwrap();
        let cfg = shunt_agent::config::Config::load_dir(dir.path()).unwrap();
        assert_eq!(cfg.trust_domain(), "cluster.local");
    }
}

//! `shunt agent`: the node agent.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use shunt_agent::{
    agent::{self, Agent, AgentOptions, RefuseHandler},
    capture::KernelPaths,
    prereq,
};

use super::common::{parse_duration, runtime, KernelArgs, LogArgs, StateArgs};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  shunt agent --pin-dir /sys/fs/bpf/shunt --cgroup-root /sys/fs/cgroup/unified/kubepods"
)]
pub struct Args {
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    log: LogArgs,
    /// cgroup v2 directory where the cgroup hooks are attached once; only
    /// enrolled cgroups below it are acted on. Default: the cgroup2 mount.
    #[arg(long, env = "SHUNT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Address of the capture listener. Only sk_lookup feeds it; the
    /// ephemeral port lets a successor bind its own during a handover.
    #[arg(
        long,
        env = "SHUNT_CAPTURE_ADDR",
        default_value = "[::ffff:127.0.0.1]:0"
    )]
    capture_addr: SocketAddr,
    /// How long open connections may finish after a shutdown or handover.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.log.init();
    // Before the runtime starts: its threads inherit the namespace.
    if let Some(ns) = &args.kernel.netns {
        agent::enter_netns(ns)?;
    }
    let cgroup_root = match args.cgroup_root {
        Some(p) => p,
        None => PathBuf::from(
            prereq::cgroup2_mount()
                .context("no cgroup2 filesystem is mounted: mount one or pass --cgroup-root")?,
        ),
    };
    let opts = AgentOptions {
        paths: KernelPaths {
            pin_dir: args.kernel.pin_dir,
            cgroup_root,
        },
        state_dir: args.state.state_dir,
        capture_addr: args.capture_addr,
        drain_timeout: args.drain_timeout,
        meta: shunt_common::Meta::default(),
    };
    runtime()?.block_on(async {
        let agent = Agent::start(opts).await?;
        agent.serve(Arc::new(RefuseHandler)).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

//! Issue #15 on the real kernel: `shunt agent --source kubernetes` on a
//! node whose pods' cgroups are laid out as the kubelet lays them out (the
//! systemd driver's `kubepods.slice/…/cri-containerd-<id>.scope` and
//! cgroupfs's `kubepods/<qos>/pod<uid>/<id>`), fed Namespaces, Pods and the
//! seed's objects by the in-process fake API server
//! (`shunt_agent::config::kube::fake`, objects in the API's own JSON,
//! ServiceEntry and Gateway addresses in `status` as the controller and
//! Istio write them). Real clients in the pods' containers: glibc and dig
//! through DNS capture, curl through the agent and `shunt waypoint` (also
//! `--source kubernetes`) to nginx, allowed and denied by the seed's
//! AuthorizationPolicy; a container started after the pod was seen is
//! enrolled from its first packet; and a DaemonSet-style surge handover
//! through the control socket, with the old agent told to stop while the
//! new one is still starting, under a steady connect loop.
//!
//! What it cannot show: a real kubelet and container runtime creating the
//! cgroups (here the test makes the same directories), a real API server.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use serde_json::{json, Value};
use shunt_agent::config::kube::fake::FakeApi;
use shunt_common::{Counter, ENR_F_DESCENDANTS};
use shunt_testbed::{
    code_and_text, mesh, probe_bin, seed, shunt_bin, wait_for, CgroupDriver, Enter, Internet,
    KubeletPod, Netns, Node, Proc, Result,
};

const NODE: &str = "node-a";
/// What the pods' resolv.conf names: only DNS capture makes names resolve.
const POD_RESOLVER: &str = "10.96.0.10";
/// dnsmasq on the node: the agent's upstream and the waypoint's resolver.
const UPSTREAM_DNS: &str = "192.0.2.53";
const VIP4: &str = "240.240.0.1";
const VIP6: &str = "2001:2::1";

/// A pod as the kubelet runs it: its network namespace (a testbed pod)
/// and its cgroups below the node's cgroup root.
struct KubePod {
    name: &'static str,
    cgroups: KubeletPod,
    /// The first container's cgroup.
    app: PathBuf,
}

/// Field order is drop order: processes in pods, the API and its runtime,
/// then the node (pods, namespace, cgroup tree, pins, files).
struct Env {
    waypoint: Proc,
    inet: Internet,
    _api: FakeApi,
    _rt: tokio::runtime::Runtime,
    pods: Vec<KubePod>,
    node: Node,
    agent_kubeconfig: PathBuf,
}

/// A listener inside `ns` (a socket keeps the namespace it was made in).
fn listener_in(ns: &Netns) -> Result<std::net::TcpListener> {
    let path = ns.path();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let f = std::fs::File::open(&path)?;
        // SAFETY: valid fd; this thread only binds and ends.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(std::net::TcpListener::bind("0.0.0.0:0")?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
}

fn kubeconfig(path: &Path, server: &str) -> Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\nusers:\n- name: none\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: none}}\ncurrent-context: fake\n"
        ),
    )?;
    Ok(())
}

/// The documents of one of the seed's files, as the API's JSON.
fn seed_docs(name: &str) -> Result<Vec<Value>> {
    let text = seed::file(name)?;
    let mut out = Vec::new();
    for doc in text.split("\n---\n") {
        let v: Value = serde_yaml_ng::from_str(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn pod_object(name: &str, uid: &str, qos: &str, ip4: &str, ip6: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "labels": {"app": name}},
        "spec": {"nodeName": NODE, "serviceAccountName": name,
                 "containers": [{"name": name, "image": "curlimages/curl"}]},
        "status": {"phase": "Running", "qosClass": qos, "podIP": ip4,
                   "podIPs": [{"ip": ip4}, {"ip": ip6}]}})
}

/// The seed's objects as they stand in a cluster: Namespaces, the waypoint
/// Gateway with its address in status (Istio writes it), the ServiceEntry
/// with the VIPs the controller allocated in status, the policy. The
/// seed's WorkloadEntries are the Pods here.
fn feed_seed(api: &FakeApi, wp_ip: &str) -> Result<()> {
    for file in [seed::WORKLOADS, seed::NAMESPACE] {
        for d in seed_docs(file)? {
            if d["kind"] == "Namespace" {
                api.apply(d);
            }
        }
    }
    let mut gw = seed_docs(seed::WAYPOINT)?.remove(0);
    gw["spec"].as_object_mut().unwrap().remove("addresses");
    gw["status"] = json!({"addresses": [{"type": "IPAddress", "value": wp_ip}]});
    api.apply(gw);
    let mut se = seed_docs(seed::SERVICE_ENTRY)?.remove(0);
    se["status"] = json!({"addresses": [
        {"host": "httpbin.org", "value": VIP4},
        {"host": "httpbin.org", "value": VIP6}]});
    api.apply(se);
    for d in seed_docs(seed::POLICY)? {
        api.apply(d);
    }
    Ok(())
}

fn setup() -> Result<Env> {
    let mut node = Node::new()?;
    node.add_pod("curl")?;
    node.add_pod("admin")?;
    node.add_pod("wp")?;
    node.add_pod("inet")?;
    node.enable_forwarding()?;
    let wp_ip = node.pod("wp").ip4.clone();
    let inet_ip = node.pod("inet").ip4.clone();
    let inet = Internet::start(
        node.pod("inet"),
        &inet_ip,
        &["httpbin.org"],
        &node.work_dir.join("internet"),
    )?;
    node.start_upstream_dns(UPSTREAM_DNS, &[("httpbin.org", &inet_ip)])?;

    // The API server, reachable from the node (127.0.0.1) and from pods
    // (their gateway, the node's address).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = listener_in(&node.ns)?;
    let port = listener.local_addr()?.port();
    let api = {
        let _g = rt.enter();
        FakeApi::serve(listener)
    };
    let agent_kubeconfig = node.work_dir.join("kubeconfig");
    kubeconfig(&agent_kubeconfig, &format!("http://127.0.0.1:{port}"))?;
    let wp_kubeconfig = node.work_dir.join("kubeconfig-wp");
    kubeconfig(
        &wp_kubeconfig,
        &format!("http://{}:{port}", node.pod("wp").gateway4()),
    )?;

    // Pods before the agent starts, as on a running node: curl with the
    // systemd driver (Burstable), admin with cgroupfs (BestEffort).
    let mut pods = Vec::new();
    for (name, driver, qos, class, uid) in [
        (
            "curl",
            CgroupDriver::Systemd,
            "burstable",
            "Burstable",
            "1b2c3d4e-0000-4000-8000-00000000c0c1",
        ),
        (
            "admin",
            CgroupDriver::Cgroupfs,
            "besteffort",
            "BestEffort",
            "1b2c3d4e-0000-4000-8000-00000000ad01",
        ),
    ] {
        let cgroups = KubeletPod::new(&node.cgroup_root.path, driver, qos, uid);
        cgroups.create()?;
        let app = cgroups.add_container(&format!("{name}0123456789abcdef"))?;
        let p = node.pod(name);
        api.apply(pod_object(name, uid, class, &p.ip4, &p.ip6));
        pods.push(KubePod { name, cgroups, app });
    }
    feed_seed(&api, &wp_ip)?;

    let ca_dir = node.work_dir.join("ca");
    shunt_agent::identity::Ca::init(&ca_dir, "cluster.local", false)?;
    let mesh = seed::path(seed::MESH).display().to_string();
    let ca = ca_dir.display().to_string();
    let kc = agent_kubeconfig.display().to_string();
    node.start_agent(&shunt_bin(), &["agent"], &agent_flags(&kc, &mesh, &ca))?;
    let maps = node.maps()?;
    wait_for(
        "the ServiceEntry's status VIPs programmed",
        Duration::from_secs(30),
        || (maps.read_services().ok()?.len() == 2).then_some(()),
    )?;

    let wp_state = node.work_dir.join("wp-state");
    let waypoint = mesh::start_waypoint(
        &node,
        Some(UPSTREAM_DNS),
        &[
            "waypoint",
            "--source",
            "kubernetes",
            "--kubeconfig",
            &wp_kubeconfig.display().to_string(),
            "--mesh-config",
            &mesh,
            "--state-dir",
            &wp_state.display().to_string(),
            "--ca-dir",
            &ca,
            "--name",
            "egress-gateway",
            "--namespace",
            "common-infrastructure",
        ],
        "info",
    )?;
    Ok(Env {
        waypoint,
        inet,
        _api: api,
        _rt: rt,
        pods,
        node,
        agent_kubeconfig,
    })
}

fn agent_flags<'a>(kubeconfig: &'a str, mesh: &'a str, ca: &'a str) -> Vec<&'a str> {
    vec![
        "--source",
        "kubernetes",
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        NODE,
        "--mesh-config",
        mesh,
        "--ca-dir",
        ca,
        "--dns-upstream",
        UPSTREAM_DNS,
        "--drain-timeout",
        "10s",
    ]
}

impl Env {
    fn pod(&self, name: &str) -> &KubePod {
        self.pods.iter().find(|p| p.name == name).expect("kube pod")
    }

    /// `program` in container cgroup `cgroup` of pod `pod`, with the pod's
    /// resolv.conf naming an ordinary cluster resolver.
    fn run_in(&self, pod: &str, cgroup: &Path, program: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = self.enter(pod, cgroup)?.command(program);
        cmd.args(args);
        Ok(cmd.output()?)
    }

    /// Where a process of `pod`'s container `cgroup` runs.
    fn enter(&self, pod: &str, cgroup: &Path) -> Result<Enter> {
        let resolv = self.node.work_dir.join(format!("resolv-{pod}"));
        std::fs::write(
            &resolv,
            format!("nameserver {POD_RESOLVER}\noptions timeout:2 attempts:1\n"),
        )?;
        Ok(self
            .node
            .pod(pod)
            .ns
            .enter()
            .cgroup(cgroup)
            .bind(&resolv, "/etc/resolv.conf"))
    }

    fn run(&self, pod: &str, program: &str, args: &[&str]) -> Result<Output> {
        let app = self.pod(pod).app.clone();
        self.run_in(pod, &app, Path::new(program), args)
    }

    /// curl's exit code and body for `url` from `pod`'s first container.
    fn curl(&self, pod: &str, url: &str) -> Result<(i32, String)> {
        let out = self.run(
            pod,
            "curl",
            &["-4", "-sS", "--max-time", "10", "-w", " %{http_code}", url],
        )?;
        Ok(code_and_text(&out))
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn pods_from_the_api_in_kubelet_cgroups_follow_the_seed_through_dns_the_waypoint_and_policy(
) -> Result<()> {
    let env = setup()?;
    // Enrolled by their pod-level cgroups (both drivers), for descendants.
    let enrolled = env.node.maps()?.read_enrolled()?;
    for p in &env.pods {
        let id = std::fs::metadata(&p.cgroups.dir).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })?;
        let e = enrolled
            .get(&id)
            .unwrap_or_else(|| panic!("{}'s pod cgroup enrolled: {enrolled:?}", p.name));
        assert_ne!(e.flags & ENR_F_DESCENDANTS, 0, "{}", p.name);
    }
    assert_eq!(enrolled.len(), 2, "{enrolled:?}");

    // DNS: glibc and dig in the containers get the status VIPs.
    let out = env.run("curl", "getent", &["ahostsv4", "httpbin.org"])?;
    assert!(text(&out).starts_with(VIP4), "getent: {}", text(&out));
    let out = env.run(
        "admin",
        "dig",
        &["+short", "+tries=1", "+time=2", "AAAA", "httpbin.org"],
    )?;
    assert_eq!(text(&out), VIP6, "dig AAAA");

    // The seed's policy at the waypoint: curl may GET /get only; admin
    // anything.
    let (code, out) = env.curl("curl", "http://httpbin.org/get")?;
    assert_eq!(
        (code, out.trim()),
        (0, "httpbin.org /get\n 200".trim()),
        "{out}"
    );
    let (code, out) = env.curl("curl", "http://httpbin.org/headers")?;
    assert!(code == 0 && out.ends_with(" 403"), "curl /headers: {out}");
    let (code, out) = env.curl("admin", "http://httpbin.org/headers")?;
    assert!(
        code == 0 && out.contains("httpbin.org /headers") && out.ends_with(" 200"),
        "admin /headers: {out}"
    );
    // The waypoint saw each pod's own identity. Its log lines are written
    // as each tunnel ends, which can be a moment after curl has its answer.
    for sa in ["curl", "admin"] {
        let line = format!("src.identity=\"spiffe://cluster.local/ns/default/sa/{sa}\"");
        let seen = wait_for(
            &format!("{sa} in the waypoint log"),
            Duration::from_secs(10),
            || env.waypoint.log_text().contains(&line).then_some(()),
        );
        assert!(
            seen.is_ok(),
            "{sa} in the waypoint log:\n{}",
            env.waypoint.log_text()
        );
    }
    // nginx saw only the waypoint, never a pod directly.
    let wp_ip = env.node.pod("wp").ip4.clone();
    for l in env.inet.log().lines() {
        assert!(
            l.starts_with(&wp_ip),
            "nginx line not from the waypoint: {l}"
        );
    }
    assert_eq!(env.inet.log().lines().count(), 2, "{}", env.inet.log());
    Ok(())
}

#[test]
fn a_container_started_after_the_pod_was_seen_is_enrolled_from_its_first_packet() -> Result<()> {
    let env = setup()?;
    let maps = env.node.maps()?;
    let before = maps.read_enrolled()?;
    // The runtime starts a new container in curl's pod (an init or
    // ephemeral container, a restart): a new cgroup the agent never saw.
    let late = env.pod("curl").cgroups.add_container("late0000feedbeef")?;
    // First packet: a DNS query, only answered when captured.
    let out = env.run_in(
        "curl",
        &late,
        Path::new("getent"),
        &["ahostsv4", "httpbin.org"],
    )?;
    assert!(
        text(&out).starts_with(VIP4),
        "the new container's first lookup was captured: {:?}",
        text(&out)
    );
    // An unknown VIP port is refused at connect() (enrolled sockets only;
    // a SYN would have been dropped by sk_lookup instead).
    let (refused, dropped) = (
        env.node.counter(Counter::Refused)?,
        env.node.counter(Counter::Dropped)?,
    );
    let out = env.run_in(
        "curl",
        &late,
        &probe_bin(),
        &["connect", &format!("{VIP4}:81")],
    )?;
    assert!(text(&out).contains("errno=111"), "{}", text(&out));
    assert_eq!(env.node.counter(Counter::Refused)?, refused + 1);
    assert_eq!(env.node.counter(Counter::Dropped)?, dropped);
    // And the VIP is steered to the waypoint with the pod's identity.
    let out = env.run_in(
        "curl",
        &late,
        Path::new("curl"),
        &["-4", "-sS", "--max-time", "10", "http://httpbin.org/get"],
    )?;
    assert_eq!(text(&out), "httpbin.org /get");
    // The kernel did it: the map is as it was (no scan added the cgroup).
    assert_eq!(maps.read_enrolled()?, before);
    // A cgroup outside every pod stays out: its lookup is not captured.
    let outside = shunt_testbed::Cgroup::new(env.node.cgroup_root.path.join("not-a-pod"))?;
    let out = env.run_in(
        "curl",
        &outside.path,
        Path::new("getent"),
        &["ahostsv4", "httpbin.org"],
    )?;
    assert!(text(&out).is_empty(), "not enrolled: {}", text(&out));
    Ok(())
}

#[test]
fn a_surge_handover_through_the_control_socket_refuses_no_connect() -> Result<()> {
    let mut env = setup()?;
    let old_pid = env.node.agents[1].pid();
    let old_log = env.node.agents[1].log.clone();
    let mesh = seed::path(seed::MESH).display().to_string();
    let ca = env.node.work_dir.join("ca").display().to_string();
    let kc = env.agent_kubeconfig.display().to_string();
    let refused = env.node.counter(Counter::NoSocket)?;
    // Steady load: the seed's request from curl's container, one curl
    // after the other (DNS capture, connect to the VIP, HTTP through the
    // waypoint), printing each status code.
    let enter = env.enter("curl", &env.pod("curl").app.clone())?;
    let looper = std::thread::spawn(move || {
        let mut cmd = enter.command("sh");
        cmd.args([
            "-c",
            "end=$(( $(date +%s) + 15 )); while [ $(date +%s) -lt $end ]; do \
             curl -4 -sS -o /dev/null -w '%{http_code}\\n' --max-time 5 http://httpbin.org/get 2>&1; done",
        ]);
        cmd.output()
    });
    std::thread::sleep(Duration::from_millis(1000));
    // The DaemonSet's surge: the old pod is told to stop as soon as the new
    // one has announced itself, while it still loads config (the race the
    // pid file lost: SIGTERM between the new socket and its record).
    let stopper = std::thread::spawn(move || {
        let r = wait_for("successor announced", Duration::from_secs(30), || {
            shunt_testbed::read_lossy(&old_log)
                .contains("a successor agent is starting")
                .then_some(())
        });
        // SAFETY: plain kill(2) of the test's own child.
        unsafe { libc::kill(old_pid as i32, libc::SIGTERM) };
        r
    });
    env.node
        .start_agent(&shunt_bin(), &["agent"], &agent_flags(&kc, &mesh, &ca))?;
    stopper.join().expect("stopper")?;
    let out = looper.join().expect("loop thread")?;
    let codes = String::from_utf8_lossy(&out.stdout).to_string();
    let ok = codes.lines().filter(|l| *l == "200").count();
    let failed: Vec<&str> = codes.lines().filter(|l| *l != "200").collect();
    eprintln!(
        "surge handover: {ok} requests answered 200, {} not: {failed:?}",
        failed.len()
    );
    assert!(ok > 20, "the load must have run: {codes}");
    assert!(
        failed.is_empty(),
        "requests failed during handover: {failed:?}"
    );
    let old = &mut env.node.agents[1];
    assert!(
        old.wait_exit(Duration::from_secs(30)),
        "old agent did not exit"
    );
    let log = old.log_text();
    assert!(
        log.contains("serving until it takes over") && log.contains("successor took over"),
        "{log}"
    );
    // Its DNS sockets left the reuseport group before it closed them: no
    // lookup hashed to it is dropped with its queue.
    assert!(log.contains("DNS listener left to the successor"), "{log}");
    // The kernel never met an empty capture slot.
    assert_eq!(env.node.counter(Counter::NoSocket)?, refused);
    // The new agent serves the seed's flow.
    let (code, out) = env.curl("curl", "http://httpbin.org/get")?;
    assert!(code == 0 && out.ends_with(" 200"), "{out}");
    Ok(())
}

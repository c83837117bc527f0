//! Issue #12 item 5 on the real kernel: `shunt status` and `shunt get` run
//! from the host's network namespace against a real `shunt agent` living in
//! its node namespace, as the demo's agent does: both join the agent's
//! namespace through its pid, `status` finds the DNS proxy's addresses
//! wherever the agent put them (on `lo` where the kernel has no dummy
//! driver), and `get` shows the agent's config in force while the directory
//! holds a broken file.

use std::process::Output;
use std::time::Duration;

use shunt_testbed::{shunt_bin, wait_for, Node, Result};

const SERVICE_ENTRY: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: httpbin.org\n  namespace: default\nspec:\n  hosts: [httpbin.org]\n  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n  resolution: DNS\n";

fn shunt(args: &[&str]) -> Output {
    std::process::Command::new(shunt_bin())
        .args(args)
        .env_remove("SHUNT_NETNS")
        .env_remove("SHUNT_ADMIN_ADDR")
        .env_remove("SHUNT_READY_ADDR")
        .output()
        .expect("run shunt")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn status_and_get_reach_an_agent_in_another_network_namespace() -> Result<()> {
    let mut node = Node::new()?;
    let ca = node.work_dir.join("ca");
    shunt_agent::identity::Ca::init(&ca, "cluster.local", false)?;
    node.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\nshunt:\n  dnsCapture: true\n",
    )?;
    node.write_config("00-httpbin.yaml", SERVICE_ENTRY)?;
    let (cfg, ca) = (
        node.config_dir().display().to_string(),
        ca.display().to_string(),
    );
    node.start_agent(
        &shunt_bin(),
        &["agent"],
        &[
            "--config-dir",
            &cfg,
            "--ca-dir",
            &ca,
            "--dns-upstream",
            "192.0.2.53:53",
        ],
    )?;
    let (pins, state) = (
        node.pin_dir.display().to_string(),
        node.state_dir.display().to_string(),
    );

    // From the host's namespace, with only the flags the agent was given.
    let status = || {
        shunt(&[
            "status",
            "--pin-dir",
            &pins,
            "--state-dir",
            &state,
            "-o",
            "json",
        ])
    };
    let healthy = wait_for("status healthy", Duration::from_secs(20), || {
        let out = status();
        (out.status.code() == Some(0)).then_some(out)
    });
    let out = match healthy {
        Ok(o) => o,
        Err(e) => {
            let out = status();
            anyhow::bail!(
                "{e}: {}{}\nagent log:\n{}",
                text(&out.stdout),
                text(&out.stderr),
                node.agents[0].log_text()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["healthy"], true, "{v}");
    assert_eq!(v["ready"]["code"], 200, "{v}");
    let pid = v["agent"]["pid"].as_u64().expect("pid");
    assert_eq!(
        v["netns"]["entered"].as_str(),
        Some(format!("/proc/{pid}/ns/net").as_str()),
        "{v}"
    );
    // Both DNS proxy addresses on an interface of the agent's namespace:
    // shunt-dns0, or lo on a kernel without the dummy driver.
    let ifs = v["dns"]["interfaces"].as_array().expect("dns status");
    assert_eq!(ifs.len(), 2, "{v}");
    for i in ifs {
        let i = i.as_array().unwrap();
        assert!(i.iter().any(|n| n == "lo" || n == "shunt-dns0"), "{v}");
    }
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");

    // `get`: the config in force, agreeing with the directory.
    let get = || {
        shunt(&[
            "get",
            "se",
            "-o",
            "yaml",
            "--config-dir",
            &cfg,
            "--state-dir",
            &state,
        ])
    };
    let out = get();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    assert!(
        text(&out.stdout).contains("value: 240.240.0.1"),
        "{}",
        text(&out.stdout)
    );

    // A broken file: the agent keeps its config; `get` still shows it.
    node.write_config("99-broken.yaml", "kind: [unclosed\n")?;
    let out = wait_for("get sees the broken file", Duration::from_secs(10), || {
        let out = get();
        text(&out.stderr)
            .contains("holds a newer, invalid version")
            .then_some(out)
    })?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("value: 240.240.0.1"),
        "{}",
        text(&out.stdout)
    );
    // ... and the agent stays healthy.
    assert_eq!(status().status.code(), Some(0));
    Ok(())
}

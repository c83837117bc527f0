//! `shunt get`: Istio objects with the status the agent gives them, as
//! `kubectl get` would show them. The objects are the config in force in
//! the running agent (its `/config`, parsed by the same parser), else the
//! config directory; a directory that differs from what is in force (a
//! newer version not loaded yet, or an invalid one the agent refused) is
//! said on stderr. Reads the persisted allocation; never allocates.

use std::{collections::BTreeMap, process::ExitCode, sync::Arc};

use anyhow::Context as _;
use serde_yaml_ng::Value;
use shunt_agent::{
    alloc::{self, Allocation},
    config::{
        labels,
        render::{self, ServiceEntryStatus, TableRow, WAYPOINT_BOUND},
        Config, ConfigError, ObjectKey, Resource, Snapshot, WaypointRef,
    },
    model::{self, Model, NoCgroups, StatusClock},
};

use super::common::{runtime, ConfigDirArgs, StateArgs};
use super::reach::{self, AdminArgs, AgentProcess};

const EXAMPLES: &str = "Examples:\n  shunt get serviceentries\n  \
shunt get se httpbin.org -n common-infrastructure -o yaml\n  shunt get workloadentries -o wide\n  \
shunt get waypoints\n  shunt get authorizationpolicies -n common-infrastructure";

#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct Args {
    #[command(subcommand)]
    kind: Kind,
}

#[derive(clap::Subcommand, Debug)]
enum Kind {
    /// ServiceEntries with status.addresses and the istio.io/WaypointBound condition.
    #[command(
        visible_aliases = ["serviceentry", "se"],
        after_help = "Examples:\n  shunt get serviceentries\n  shunt get se httpbin.org -n common-infrastructure -o yaml"
    )]
    Serviceentries(GetArgs),
    /// WorkloadEntries: address, identity, cgroup, enrolment.
    #[command(
        visible_aliases = ["workloadentry", "we"],
        after_help = "Example:\n  shunt get workloadentries -n default -o wide"
    )]
    Workloadentries(GetArgs),
    /// Waypoint Gateways (gatewayClassName istio-waypoint) and what binds to them.
    #[command(
        visible_aliases = ["waypoint", "wp"],
        after_help = "Example:\n  shunt get waypoints"
    )]
    Waypoints(GetArgs),
    /// AuthorizationPolicies: action, targets, rule count.
    #[command(
        visible_aliases = ["authorizationpolicy", "ap"],
        after_help = "Example:\n  shunt get authorizationpolicies -n common-infrastructure"
    )]
    Authorizationpolicies(GetArgs),
}

#[derive(clap::Args, Debug)]
struct GetArgs {
    /// Only the object with this name.
    name: Option<String>,
    /// Only objects in this namespace. Without -n, every namespace is shown
    /// (there is no current-namespace context as in kubectl).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    namespace: Option<String>,
    /// Every namespace (the default; accepted for kubectl habits).
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format: table (default), wide, yaml or json.
    #[arg(short = 'o', long, value_parser = ["table", "wide", "yaml", "json"], default_value = "table")]
    output: String,
    #[command(flatten)]
    config: ConfigDirArgs,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

impl GetArgs {
    fn selects<S>(&self, r: &Resource<S>) -> bool {
        self.namespace.as_deref().is_none_or(|n| r.namespace() == n)
            && self.name.as_deref().is_none_or(|n| r.name() == n)
    }
}

/// A config directory and the persisted state, as the agent sees them.
pub struct View {
    pub cfg: Arc<Config>,
    pub alloc: Allocation,
    pub model: Model,
}

fn problems(n: usize) -> String {
    format!("{n} problem{}", if n == 1 { "" } else { "s" })
}

/// The config a `get` shows: the agent's in force when it answers, else the
/// directory's. Differences are printed on stderr as `warning:` lines.
fn config_for_get(a: &GetArgs) -> anyhow::Result<Config> {
    let dir = &a.config.config_dir;
    let agent = AgentProcess::find(&a.state.state_dir);
    let addr = a
        .admin
        .admin_addr
        .or(agent.running.then_some(reach::DEFAULT_ADMIN_ADDR));
    let in_force = addr.map(|addr| {
        // Before the runtime: its threads keep the namespace they start in.
        let ns = reach::join_agent_netns(a.admin.netns.as_deref(), &agent);
        let got = runtime()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(reach::admin_get(addr, "/config")))
            .and_then(|(code, body)| match code {
                200 => serde_json::from_slice::<shunt_agent::admin::ConfigInForce>(&body)
                    .map(|c| c.snapshot())
                    .map_err(|e| format!("unreadable answer: {e}")),
                c => Err(format!(
                    "answered {c}: {}",
                    String::from_utf8_lossy(&body).trim()
                )),
            });
        got.map_err(|e| match ns.error {
            Some(ne) => {
                format!("{e} (looked from this network namespace: cannot enter the agent's: {ne})")
            }
            None => e,
        })
        .map_err(|e| (addr, e))
    });
    let from_dir = Snapshot::read(dir).and_then(|s| s.parse().map(|c| (s, c)));
    match (in_force, from_dir) {
        (Some(Ok(snap)), from_dir) => {
            let cfg = snap.parse().map_err(|e| {
                anyhow::anyhow!(
                    "the agent's config in force does not parse with this shunt binary (a different version?): {e}"
                )
            })?;
            let agent_dir = snap.files.first().and_then(|(p, _)| p.parent());
            let same_dir = agent_dir.is_none_or(|d| {
                d.canonicalize()
                    .ok()
                    .zip(dir.canonicalize().ok())
                    .is_some_and(|(x, y)| x == y)
            });
            if !same_dir {
                eprintln!(
                    "warning: the agent reads {}, not {}: showing the agent's config in force",
                    agent_dir
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                    dir.display()
                );
                return Ok(cfg);
            }
            match from_dir {
                Ok((s, _)) if s.same_files(&snap) => {}
                Ok(_) => eprintln!(
                    "warning: the config directory {} differs from the config in force in the agent, shown here: the agent reloads within a second (if it did not, see its log)",
                    dir.display()
                ),
                Err(ConfigError::Invalid(p)) => eprintln!(
                    "warning: the config directory {} holds a newer, invalid version ({}: run `shunt config check {}`); the agent keeps the previous config in force, shown here",
                    dir.display(),
                    problems(p.len()),
                    dir.display()
                ),
                Err(e) => eprintln!("warning: {e}; showing the config in force in the agent"),
            }
            Ok(cfg)
        }
        (in_force, Ok((_, cfg))) => {
            if let Some(Err((addr, e))) = in_force {
                eprintln!(
                    "warning: cannot read the config in force from the agent's {addr}/config ({e}): showing the config directory {}",
                    dir.display()
                );
            }
            Ok(cfg)
        }
        (in_force, Err(e)) => {
            let agent = match in_force {
                Some(Err((addr, ae))) => format!(
                    "; the config in force could not be read from the agent's {addr}/config either ({ae})"
                ),
                _ => format!(
                    "; no running agent in {} to show the config in force",
                    agent.pid_file.display()
                ),
            };
            Err(match e {
                ConfigError::Invalid(p) => anyhow::anyhow!(
                    "the config directory {} has {}: run `shunt config check {}` to see them{agent}",
                    dir.display(),
                    problems(p.len()),
                    dir.display()
                ),
                e => anyhow::anyhow!(
                    "{e}: pass --config-dir (or SHUNT_CONFIG_DIR) naming a readable directory{agent}"
                ),
            })
        }
    }
}

/// Loads the config (see [`config_for_get`]), the persisted allocation and
/// status times.
fn load_view(a: &GetArgs) -> anyhow::Result<View> {
    let cfg = config_for_get(a)?;
    let state_dir = &a.state.state_dir;
    let alloc = alloc::load(state_dir).with_context(|| {
        format!(
            "cannot read the VIP allocation in {}: pass the agent's --state-dir (or SHUNT_STATE_DIR)",
            state_dir.display()
        )
    })?;
    // Cgroups are not resolved here: `get` shows config and status, and the
    // enrolment the agent actually programmed is in `shunt maps`.
    let cfg = Arc::new(cfg);
    let mut model = Model::build(cfg.clone(), &alloc, &NoCgroups);
    let mut clock = StatusClock::load(state_dir);
    // Not saved: the agent owns the times; unseen conditions show "now".
    clock.stamp(&mut model.status, &model::now_rfc3339());
    Ok(View { cfg, alloc, model })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.kind {
        Kind::Serviceentries(a) => service_entries(&a),
        Kind::Workloadentries(a) => workload_entries(&a),
        Kind::Waypoints(a) => waypoints(&a),
        Kind::Authorizationpolicies(a) => policies(&a),
    }
}

fn not_found(a: &GetArgs, kind: &str) -> anyhow::Error {
    let name = a.name.as_deref().unwrap_or("");
    match &a.namespace {
        Some(ns) => anyhow::anyhow!(
            "no {kind} {name:?} in namespace {ns:?} of {}: check the name, or drop -n to search every namespace",
            a.config.config_dir.display()
        ),
        None => anyhow::anyhow!(
            "no {kind} {name:?} in {}: check the name and --config-dir",
            a.config.config_dir.display()
        ),
    }
}

fn yaml_to_json(yaml: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_yaml_ng::from_str(yaml)?;
    Ok(serde_json::to_string_pretty(&v)? + "\n")
}

fn service_entries(a: &GetArgs) -> anyhow::Result<ExitCode> {
    let view = load_view(a)?;
    let empty = ServiceEntryStatus::default();
    let items: Vec<(&shunt_agent::config::ServiceEntry, &ServiceEntryStatus)> = view
        .cfg
        .service_entries
        .iter()
        .filter(|se| a.selects(se))
        .map(|se| {
            (
                &**se,
                view.model.status.get(&se.key()).map_or(&empty, |s| &**s),
            )
        })
        .collect();
    if a.name.is_some() && items.is_empty() {
        return Err(not_found(a, "ServiceEntry"));
    }
    // Warnings on stderr so that -o yaml/json stay machine-readable.
    let mut unallocated = Vec::new();
    for (se, st) in &items {
        let key = se.key();
        for w in view.alloc.warnings_for(&key) {
            eprintln!("warning: {w}");
        }
        if st.addresses.is_empty() && model::service::no_auto_allocation_reason(se).is_none() {
            unallocated.push(key);
        }
    }
    if !unallocated.is_empty() && view.alloc.hosts.is_empty() {
        // Nothing allocated at all: one line, not one per entry.
        eprintln!(
            "warning: {} ha{} no addresses yet: {} holds no VIP allocation (start `shunt agent` with this --state-dir)",
            if unallocated.len() == 1 {
                format!("ServiceEntry {}", unallocated[0])
            } else {
                format!("{} ServiceEntries", unallocated.len())
            },
            if unallocated.len() == 1 { "s" } else { "ve" },
            a.state.state_dir.join(alloc::STATE_FILE).display()
        );
    } else {
        for key in &unallocated {
            eprintln!(
                "warning: ServiceEntry {key} has no addresses yet: the agent has not allocated them (it allocates on its next config reload)"
            );
        }
    }
    match a.output.as_str() {
        "yaml" | "json" => {
            let y = if a.name.is_some() && items.len() == 1 {
                render::render_yaml(items[0].0, items[0].1)
            } else {
                render::render_yaml_list(items.iter().copied())
            };
            if a.output == "yaml" {
                print!("{y}");
            } else {
                print!("{}", yaml_to_json(&y)?);
            }
        }
        "wide" => {
            let mut t = Table::new(&[
                "NAMESPACE",
                "NAME",
                "HOSTS",
                "ADDRESSES",
                "PORTS",
                "RESOLUTION",
                "WAYPOINT",
                "BOUND",
                "REASON",
                "ID",
            ]);
            for (se, st) in &items {
                let row = TableRow::new(se, st, waypoint_of(&view.cfg, se));
                let cond = st.condition(WAYPOINT_BOUND);
                t.row(vec![
                    row.namespace,
                    row.name,
                    join(&row.hosts),
                    join(&row.addresses),
                    join(
                        &se.spec
                            .ports
                            .iter()
                            .map(|p| format!("{}/{}", p.number.0, p.protocol().as_str()))
                            .collect::<Vec<_>>(),
                    ),
                    se.spec.resolution().as_str().to_string(),
                    row.waypoint.unwrap_or_else(|| "<none>".into()),
                    row.bound,
                    cond.map(|c| c.reason.to_string()).unwrap_or_default(),
                    view.alloc
                        .service_id(&se.key())
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{}", t.render());
        }
        _ => {
            let rows: Vec<TableRow> = items
                .iter()
                .map(|(se, st)| TableRow::new(se, st, waypoint_of(&view.cfg, se)))
                .collect();
            if rows.is_empty() {
                eprintln!("No ServiceEntries found.");
            } else {
                print!("{}", render::render_table(&rows));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn waypoint_of(cfg: &Config, se: &shunt_agent::config::ServiceEntry) -> Option<String> {
    match cfg.waypoint_ref(se) {
        WaypointRef::Gateway { gateway, .. } => Some(gateway.to_string()),
        WaypointRef::Unbound => None,
    }
}

fn join(v: &[String]) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.join(",")
    }
}

/// metadata + spec of any object as a Kubernetes-shaped YAML value.
fn object_value<S: serde::Serialize>(
    api_version: &str,
    kind: &str,
    r: &Resource<S>,
) -> anyhow::Result<Value> {
    let mut m = serde_yaml_ng::Mapping::new();
    m.insert("apiVersion".into(), api_version.into());
    m.insert("kind".into(), kind.into());
    let mut meta = r.metadata.clone();
    meta.namespace = Some(r.namespace().into());
    m.insert("metadata".into(), serde_yaml_ng::to_value(&meta)?);
    m.insert("spec".into(), serde_yaml_ng::to_value(&r.spec)?);
    Ok(Value::Mapping(m))
}

fn print_objects(a: &GetArgs, items: Vec<Value>) -> anyhow::Result<()> {
    let v = if a.name.is_some() && items.len() == 1 {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        let mut m = serde_yaml_ng::Mapping::new();
        m.insert("apiVersion".into(), "v1".into());
        m.insert("items".into(), Value::Sequence(items));
        m.insert("kind".into(), "List".into());
        Value::Mapping(m)
    };
    let y = serde_yaml_ng::to_string(&v)?;
    if a.output == "json" {
        print!("{}", yaml_to_json(&y)?);
    } else {
        print!("{y}");
    }
    Ok(())
}

fn workload_entries(a: &GetArgs) -> anyhow::Result<ExitCode> {
    let view = load_view(a)?;
    let cfg = &view.cfg;
    let items: Vec<_> = cfg
        .workload_entries
        .iter()
        .filter(|w| a.selects(w))
        .collect();
    if a.name.is_some() && items.is_empty() {
        return Err(not_found(a, "WorkloadEntry"));
    }
    if matches!(a.output.as_str(), "yaml" | "json") {
        let v = items
            .iter()
            .map(|w| object_value("networking.istio.io/v1", "WorkloadEntry", w))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print_objects(a, v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let wide = a.output == "wide";
    let mut head = vec!["NAMESPACE", "NAME", "ADDRESS", "SERVICE ACCOUNT", "AMBIENT"];
    if wide {
        head.extend(["IDENTITY", "CGROUP", "ID"]);
    }
    let mut t = Table::new(&head);
    for w in items {
        let mut row = vec![
            w.namespace().to_string(),
            w.name().to_string(),
            if w.spec.address.is_empty() {
                "<none>".into()
            } else {
                w.spec.address.clone()
            },
            w.spec.service_account().to_string(),
            if cfg.namespace_is_ambient(w.namespace()) {
                "yes".into()
            } else {
                "no".into()
            },
        ];
        if wide {
            row.push(cfg.spiffe_id(w.namespace(), w.spec.service_account()));
            row.push(
                w.metadata
                    .annotations
                    .get(labels::CGROUP_ANNOTATION)
                    .cloned()
                    .unwrap_or_else(|| "<none>".into()),
            );
            row.push(
                view.alloc
                    .workload_id(&w.key())
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        t.row(row);
    }
    t.print_or_none("WorkloadEntries");
    Ok(ExitCode::SUCCESS)
}

fn waypoints(a: &GetArgs) -> anyhow::Result<ExitCode> {
    let view = load_view(a)?;
    let cfg = &view.cfg;
    let items: Vec<_> = cfg
        .gateways
        .iter()
        .filter(|g| g.spec.is_waypoint() && a.selects(g))
        .collect();
    if a.name.is_some() && items.is_empty() {
        return Err(not_found(a, "waypoint Gateway"));
    }
    if matches!(a.output.as_str(), "yaml" | "json") {
        let v = items
            .iter()
            .map(|g| object_value("gateway.networking.k8s.io/v1", "Gateway", g))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print_objects(a, v)?;
        return Ok(ExitCode::SUCCESS);
    }
    // ServiceEntries bound (condition True) per waypoint.
    let mut bound: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    for se in &cfg.service_entries {
        let ok = view
            .model
            .status
            .get(&se.key())
            .and_then(|s| s.condition(WAYPOINT_BOUND))
            .is_some_and(|c| c.status == "True");
        if let (true, WaypointRef::Gateway { gateway, .. }) = (ok, cfg.waypoint_ref(se)) {
            bound.entry(gateway).or_default().push(se.key().to_string());
        }
    }
    let wide = a.output == "wide";
    let mut head = vec!["NAMESPACE", "NAME", "ADDRESS", "FOR", "SERVICES"];
    if wide {
        head.extend(["IDENTITY", "BOUND SERVICEENTRIES"]);
    }
    let mut t = Table::new(&head);
    for g in items {
        let b = bound.get(&g.key()).cloned().unwrap_or_default();
        let mut row = vec![
            g.namespace().to_string(),
            g.name().to_string(),
            g.spec
                .address()
                .map(|ip| std::net::SocketAddr::new(ip, g.spec.hbone_port()).to_string())
                .unwrap_or_else(|| "<none>".into()),
            g.label(labels::WAYPOINT_FOR)
                .unwrap_or("service")
                .to_string(),
            b.len().to_string(),
        ];
        if wide {
            row.push(cfg.spiffe_id(g.namespace(), g.name()));
            row.push(join(&b));
        }
        t.row(row);
    }
    t.print_or_none("waypoints");
    Ok(ExitCode::SUCCESS)
}

fn policies(a: &GetArgs) -> anyhow::Result<ExitCode> {
    let view = load_view(a)?;
    let items: Vec<_> = view
        .cfg
        .authorization_policies
        .iter()
        .filter(|p| a.selects(p))
        .collect();
    if a.name.is_some() && items.is_empty() {
        return Err(not_found(a, "AuthorizationPolicy"));
    }
    if matches!(a.output.as_str(), "yaml" | "json") {
        let v = items
            .iter()
            .map(|p| object_value("security.istio.io/v1", "AuthorizationPolicy", p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print_objects(a, v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["NAMESPACE", "NAME", "ACTION", "TARGETS", "RULES"]);
    for p in items {
        let s = &p.spec;
        let targets: Vec<String> = s
            .target_ref
            .iter()
            .chain(&s.target_refs)
            .map(|r| {
                format!(
                    "{}/{}",
                    r.kind,
                    match &r.namespace {
                        Some(ns) => format!("{ns}/{}", r.name),
                        None => r.name.clone(),
                    }
                )
            })
            .collect();
        let targets = if !targets.is_empty() {
            targets.join(",")
        } else if let Some(sel) = &s.selector {
            format!(
                "selector {}",
                sel.match_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        } else {
            "<namespace>".into()
        };
        t.row(vec![
            p.namespace().to_string(),
            p.name().to_string(),
            s.action.clone().unwrap_or_else(|| "ALLOW".into()),
            targets,
            s.rules.as_ref().map(Vec::len).unwrap_or(0).to_string(),
        ]);
    }
    t.print_or_none("AuthorizationPolicies");
    Ok(ExitCode::SUCCESS)
}

/// Columns padded like kubectl's (three spaces between columns).
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Self {
        Table {
            rows: vec![head.iter().map(|s| s.to_string()).collect()],
        }
    }
    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    pub fn render(&self) -> String {
        let n = self.rows[0].len();
        let mut width = vec![0; n];
        for r in &self.rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut l = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 == n {
                    l.push_str(c);
                } else {
                    l.push_str(&format!("{:<w$}   ", c, w = width[i]));
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        }
        out
    }
    fn print_or_none(&self, what: &str) {
        if self.rows.len() == 1 {
            eprintln!("No {what} found.");
        } else {
            print!("{}", self.render());
        }
    }
}

//! `shunt config check DIR`: validate a config directory the way the agent
//! and the waypoint would read it, without touching anything.
//!
//! Errors: every object problem (file, document, object, field) and every
//! AuthorizationPolicy the waypoint would refuse to compile. Warnings: what
//! would load but not work as written (unbound waypoints, VIP collisions,
//! policies a waypoint ignores, unsupported kinds). Exit 1 on any error.

use std::{
    collections::BTreeSet,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use shunt_agent::{
    alloc::{Allocator, Prefixes},
    config::{render::WAYPOINT_BOUND, Config, ConfigError, Origin, Problem},
    kernel::projection::Capacity,
    model::Model,
    policy::PolicyError,
    validate::{self, Rejected, Rejection},
    waypoint::WaypointError,
};

use super::policy::{build_policies, flatten_errors, waypoints};

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  shunt config check /etc/shunt/config")]
pub struct Args {
    #[command(subcommand)]
    cmd: ConfigCmd,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a config directory: every error with file, document, object
    /// and field; warnings for what would not work as written.
    #[command(after_help = "Examples:\n  shunt config check /etc/shunt/config\n  \
shunt config check examples/egress\n\nExit status: 0 when the directory is valid (warnings allowed), 1 on any error.\n\
Paths are printed relative to DIR.")]
    Check {
        /// The config directory.
        #[arg(env = "SHUNT_CONFIG_DIR")]
        dir: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.cmd {
        ConfigCmd::Check { dir } => check(&dir),
    }
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

/// Like `Problem`'s Display, with the path relative to `dir`.
fn problem_line(dir: &Path, p: &Problem) -> String {
    let mut s = rel(dir, &p.file);
    if let Some(d) = p.doc {
        s.push_str(&format!(": document {d}"));
    }
    if let Some(o) = &p.object {
        s.push_str(&format!(" ({o})"));
    }
    if let Some(f) = &p.field {
        s.push_str(&format!(": {f}"));
    }
    // Messages may name another file ("first defined in DIR/a.yaml").
    let prefix = format!("{}/", dir.display());
    s.push_str(&format!(": {}", p.message.replace(&prefix, "")));
    s
}

fn origin_prefix(dir: &Path, kind: &str, key: &str, o: &Origin) -> String {
    format!("{}: document {} ({kind} {key})", rel(dir, &o.file), o.doc)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn check(dir: &Path) -> anyhow::Result<ExitCode> {
    let cfg = match Config::load_dir(dir) {
        Ok(c) => c,
        Err(ConfigError::Invalid(problems)) => {
            for p in &problems {
                println!("error: {}", problem_line(dir, p));
            }
            println!(
                "{} found: the agent would reject this directory and keep its previous configuration",
                plural(problems.len(), "error", "errors")
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            anyhow::bail!("{e}: pass a readable config directory")
        }
    };
    let mut errors: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();

    // Policies: compiled for each waypoint as that waypoint would. Errors do
    // not depend on the waypoint; a warning counts only if every waypoint
    // gives it (a policy bound to Gateway A is "not this waypoint" for B).
    let origin_of = |policy: &str| {
        cfg.authorization_policies
            .iter()
            .find(|p| p.key().to_string() == policy)
            .map(|p| origin_prefix(dir, "AuthorizationPolicy", policy, &p.origin))
            .unwrap_or_else(|| format!("AuthorizationPolicy {policy}"))
    };
    let targets: Vec<_> = {
        let w = waypoints(&cfg);
        if w.is_empty() {
            vec![None]
        } else {
            w.into_iter().map(Some).collect()
        }
    };
    let mut policy_errors = BTreeSet::new();
    let mut policy_warnings: Option<BTreeSet<String>> = None;
    for t in targets {
        match build_policies(&cfg, t) {
            Ok(set) => {
                let w: BTreeSet<String> = set
                    .warnings()
                    .iter()
                    .map(|w| format!("{}: {}", origin_of(&w.policy), w.message))
                    .collect();
                policy_warnings = Some(match policy_warnings {
                    None => w,
                    Some(prev) => prev.intersection(&w).cloned().collect(),
                });
            }
            Err(e) => {
                for e in flatten_errors(e) {
                    policy_errors.insert(match e {
                        PolicyError::Invalid {
                            policy,
                            field,
                            message,
                        } => format!("{}: {field}: {message}", origin_of(&policy)),
                        PolicyError::CustomNotSupported { policy } => format!(
                            "{}: spec.action: CUSTOM is not supported by shunt (use ALLOW, DENY or AUDIT)",
                            origin_of(&policy)
                        ),
                        other => other.to_string(),
                    });
                }
            }
        }
    }
    errors.extend(policy_errors);
    warnings.extend(policy_warnings.unwrap_or_default());

    // Desired state from a fresh allocation in a scratch directory, as the
    // agent would compute it on first start: VIP:port collisions, host
    // conflicts, waypoint binding.
    let scratch = std::env::temp_dir().join(format!("shunt-config-check-{}", std::process::id()));
    let alloc = Allocator::open(&scratch).and_then(|mut a| a.allocate(&cfg).cloned());
    let _ = std::fs::remove_dir_all(&scratch);
    match alloc {
        Ok(alloc) => {
            for w in &alloc.warnings {
                warnings.push(w.to_string());
            }
            let left = alloc.hosts_without_address("IPv4");
            if left > 0 {
                warnings.push(format!(
                    "IPv4 VIP range {} exhausted: {} left without an IPv4 address",
                    Prefixes::default().v4,
                    plural(left, "host", "hosts")
                ));
            }
            // Cgroups do not exist here: give each annotation a distinct
            // stand-in id so that only shared cgroups are reported.
            let stand_in = |cg: &str| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                cg.hash(&mut h);
                Some(h.finish() | 1)
            };
            let d = Arc::new(Model::build(Arc::new(cfg.clone()), &alloc, &stand_in));
            warnings.extend(d.warnings().map(|w| w.to_string()));
            // The acceptance step the agent and the waypoint run (policy
            // errors are reported above).
            let projection = validate::projection_of(&d);
            if let Err(Rejected(rs)) = validate::validate(&d, &projection, &Capacity::KERNEL) {
                for r in rs {
                    if !matches!(
                        r,
                        Rejection::Waypoint {
                            error: WaypointError::Policy(_),
                            ..
                        }
                    ) {
                        errors.push(r.to_string());
                    }
                }
            }
            for se in &cfg.service_entries {
                let key = se.key();
                if let Some(c) = d
                    .status
                    .get(&key)
                    .and_then(|s| s.condition(WAYPOINT_BOUND))
                    .filter(|c| c.status != "True" && c.reason != "NotBound")
                {
                    warnings.push(format!(
                        "{}: not bound to its waypoint ({}): {}",
                        origin_prefix(dir, "ServiceEntry", &key.to_string(), &se.origin),
                        c.reason,
                        c.message
                    ));
                }
            }
        }
        Err(e) => warnings.push(format!("VIP allocation could not be simulated: {e}")),
    }
    for (kind, n) in &cfg.ignored_kinds {
        warnings.push(format!(
            "{} of unsupported kind {kind} ignored",
            plural(*n, "object", "objects")
        ));
    }

    for e in &errors {
        println!("error: {e}");
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    let waypoint_count = cfg.gateways.iter().filter(|g| g.spec.is_waypoint()).count();
    let summary = [
        plural(cfg.namespaces.len(), "Namespace", "Namespaces"),
        plural(cfg.service_entries.len(), "ServiceEntry", "ServiceEntries"),
        format!(
            "{} ({})",
            plural(cfg.gateways.len(), "Gateway", "Gateways"),
            plural(waypoint_count, "waypoint", "waypoints")
        ),
        plural(
            cfg.workload_entries.len(),
            "WorkloadEntry",
            "WorkloadEntries",
        ),
        plural(
            cfg.destination_rules.len(),
            "DestinationRule",
            "DestinationRules",
        ),
        plural(
            cfg.authorization_policies.len(),
            "AuthorizationPolicy",
            "AuthorizationPolicies",
        ),
    ]
    .join(", ");
    if errors.is_empty() {
        println!(
            "ok: {summary}; {}",
            plural(warnings.len(), "warning", "warnings")
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{} found ({summary}): the waypoint would reject this config",
            plural(errors.len(), "error", "errors")
        );
        Ok(ExitCode::FAILURE)
    }
}

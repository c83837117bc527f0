//! Human-readable account of a decision, for `shunt policy check`: which
//! policies applied, which rule matched or why each did not, and the result.
//! Uses the same per-field evaluation as the data path.

use std::fmt::{self, Write};

use super::compile::{Check, CompiledRule, Kind};
use super::eval::{rule_applies_on, Peer};
use super::{Decision, PolicySet, RequestContext};

/// The text and the decision it explains.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub decision: Decision,
    pub text: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Explains the decision for `req` to ServiceEntry `namespace/name`.
pub fn explain(
    set: &PolicySet,
    namespace: &str,
    name: &str,
    req: &RequestContext<'_>,
) -> Explanation {
    let sp = set.for_service(namespace, name);
    let decision = sp.evaluate(req);
    let peer = Peer::new(req.principal);
    let mut t = String::new();
    // Writing to a String cannot fail; results are ignored on purpose.
    let _ = writeln!(t, "service: ServiceEntry {namespace}/{name}");
    let _ = writeln!(t, "request: {}", describe_request(req));
    if !set.warnings().is_empty() {
        let _ = writeln!(t, "not enforced at the waypoint / notes:");
        for w in set.warnings() {
            let _ = writeln!(t, "  - {w}");
        }
    }
    let target = sp.target;
    let total = target.deny.len()
        + target.allow.len()
        + target.audit.len()
        + target.shadow_deny.len()
        + target.shadow_allow.len();
    if total == 0 {
        let _ = writeln!(t, "policies applied: none");
    } else {
        let _ = writeln!(t, "policies applied ({total}), in evaluation order:");
    }
    for &i in target
        .audit
        .iter()
        .chain(&target.deny)
        .chain(&target.allow)
        .chain(&target.shadow_deny)
        .chain(&target.shadow_allow)
    {
        let p = &set.policies[i as usize];
        let _ = writeln!(
            t,
            "  {}{} {} (bound to {})",
            if p.dry_run { "dry-run " } else { "" },
            p.action,
            p.name,
            p.bindings.join(", ")
        );
        if p.rules.is_empty() {
            let _ = writeln!(t, "    no rules: matches nothing");
        }
        for (ri, rule) in p.rules.iter().enumerate() {
            explain_rule(&mut t, ri, rule, req, &peer, p.action);
        }
    }
    let _ = writeln!(
        t,
        "decision: {}",
        if decision.allowed { "ALLOW" } else { "DENY" }
    );
    let _ = writeln!(t, "  {decision}");
    Explanation { decision, text: t }
}

fn describe_request(req: &RequestContext<'_>) -> String {
    let mut s = String::new();
    let _ = write!(s, "principal={}", req.principal.unwrap_or("(none)"));
    if let Some(ip) = req.source_ip {
        let _ = write!(s, " source.ip={ip}");
    }
    if let Some(ip) = req.remote_ip {
        let _ = write!(s, " remote.ip={ip}");
    }
    if let Some(ip) = req.destination_ip {
        let _ = write!(s, " destination.ip={ip}");
    }
    let _ = write!(s, " destination.port={}", req.destination_port);
    if let Some(sni) = req.sni {
        let _ = write!(s, " sni={sni}");
    }
    match &req.http {
        Some(h) => {
            let _ = write!(
                s,
                " HTTP {} {} host={} (normalized)",
                h.method(),
                h.path(),
                h.host()
            );
        }
        None => s.push_str(" TCP (no HTTP attributes)"),
    }
    s
}

fn explain_rule(
    t: &mut String,
    ri: usize,
    rule: &CompiledRule,
    req: &RequestContext<'_>,
    peer: &Peer<'_>,
    action: super::Action,
) {
    if !rule_applies_on(rule, req, action) {
        let _ = writeln!(
            t,
            "    rule {ri}: skipped: uses HTTP-only fields and this is TCP (Istio drops such {action} rules)"
        );
        return;
    }
    let mut lines = Vec::new();
    let from_ok = group(&mut lines, "from", &rule.from, req, peer);
    let to_ok = group(&mut lines, "to", &rule.to, req, peer);
    let mut when_ok = true;
    for c in &rule.when {
        let ok = c.eval(req, peer);
        when_ok &= ok;
        lines.push(format!("{}: {}", c.field, check_text(c, ok, req, peer)));
    }
    let m = from_ok && to_ok && when_ok;
    let summary = if rule.from.is_empty() && rule.to.is_empty() && rule.when.is_empty() {
        " (empty rule: matches everything)"
    } else {
        ""
    };
    let _ = writeln!(
        t,
        "    rule {ri}: {}{summary}",
        if m { "MATCH" } else { "no match" }
    );
    if req.http.is_none() && rule.http_only {
        let _ = writeln!(
            t,
            "      (TCP: HTTP-only fields count as matching in a DENY rule, fail closed)"
        );
    }
    for l in lines {
        let _ = writeln!(t, "      {l}");
    }
}

fn group(
    lines: &mut Vec<String>,
    what: &str,
    items: &[Vec<Check>],
    req: &RequestContext<'_>,
    peer: &Peer<'_>,
) -> bool {
    if items.is_empty() {
        return true;
    }
    let mut any = false;
    for (i, checks) in items.iter().enumerate() {
        let mut all = true;
        for c in checks {
            let ok = c.eval(req, peer);
            all &= ok;
            let short = c.field.rsplit('.').next().unwrap_or(&c.field);
            lines.push(format!(
                "{what}[{i}].{short}: {}",
                check_text(c, ok, req, peer)
            ));
        }
        any |= all;
    }
    any
}

fn check_text(c: &Check, ok: bool, req: &RequestContext<'_>, peer: &Peer<'_>) -> String {
    let verdict = if ok { "ok" } else { "FAILS" };
    let list = c.raw.join(", ");
    if req.http.is_none() && c.kind.http_only() {
        return format!("{verdict}: HTTP-only field on TCP [{list}]");
    }
    let value = match &c.kind {
        Kind::Principal(_) => peer.principal.map(str::to_string),
        Kind::Namespace(_) => peer.namespace.map(str::to_string),
        Kind::ServiceAccount(_) => peer
            .namespace
            .zip(peer.service_account)
            .map(|(n, s)| format!("{n}/{s}")),
        Kind::TrustDomain(_) => peer.trust_domain.map(str::to_string),
        Kind::SourceIp(_) => req.source_ip.map(|i| i.to_string()),
        Kind::RemoteIp(_) => req.remote_ip.or(req.source_ip).map(|i| i.to_string()),
        Kind::DestIp(_) => req.destination_ip.map(|i| i.to_string()),
        Kind::Port(_) => Some(req.destination_port.to_string()),
        Kind::Sni(_) => req.sni.map(str::to_string),
        Kind::Host(_) => req.http.as_ref().map(|h| h.host().to_string()),
        Kind::Method(_) => req.http.as_ref().map(|h| h.method().to_string()),
        Kind::Path(_) => req.http.as_ref().map(|h| h.path().to_string()),
        Kind::Header(name, _) => req.http.as_ref().and_then(|h| {
            let mut vals: Vec<String> = Vec::new();
            h.headers.for_each_value(name, &mut |v| {
                vals.push(String::from_utf8_lossy(v).into_owned())
            });
            if vals.is_empty() {
                None
            } else {
                Some(vals.join(","))
            }
        }),
        Kind::NoJwt => Some("(no JWT: shunt does not authenticate requests)".to_string()),
    };
    let value = value
        .map(|v| format!("{v:?}"))
        .unwrap_or_else(|| "(absent)".into());
    let rel = match (c.negate, ok) {
        (false, true) => "matches one of",
        (false, false) => "matches none of",
        (true, true) => "matches none of the excluded",
        (true, false) => "matches an excluded value of",
    };
    format!("{verdict}: {value} {rel} [{list}]")
}

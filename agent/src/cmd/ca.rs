//! `shunt ca`: create, inspect and use the mesh CA (Istio's plug-in layout).

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use shunt_agent::identity::{Ca, SpiffeId, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};

use super::common::parse_duration;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  shunt ca init --ca-dir /etc/shunt/ca\n  shunt ca show\n  \
shunt ca issue --identity spiffe://cluster.local/ns/default/sa/curl --out /tmp/curl-cert"
)]
pub struct Args {
    #[command(subcommand)]
    cmd: CaCmd,
}

#[derive(clap::Args, Clone, Debug)]
pub struct CaDirArgs {
    /// Directory of the CA in Istio's plug-in layout (ca-cert.pem,
    /// ca-key.pem, root-cert.pem, cert-chain.pem).
    #[arg(long, env = "SHUNT_CA_DIR", default_value = "/etc/shunt/ca")]
    pub ca_dir: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
enum CaCmd {
    /// Create a new local root and signing CA (keys are written 0600).
    #[command(after_help = "Examples:\n  shunt ca init --ca-dir /etc/shunt/ca\n  \
shunt ca init --ca-dir /etc/shunt/ca --trust-domain example.org --force")]
    Init {
        #[command(flatten)]
        dir: CaDirArgs,
        /// Replace an existing CA in the directory. Certificates issued by the
        /// old CA stop being trusted.
        #[arg(long)]
        force: bool,
        /// Trust domain of the mesh; recorded as the CA's organization.
        #[arg(long, env = "SHUNT_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Print the signing CA and root: subject, validity, SHA-256 fingerprint.
    #[command(after_help = "Example:\n  shunt ca show --ca-dir /etc/shunt/ca")]
    Show {
        #[command(flatten)]
        dir: CaDirArgs,
    },
    /// Issue a workload certificate and key for manual testing and interop.
    #[command(
        after_help = "Example:\n  shunt ca issue --identity spiffe://cluster.local/ns/default/sa/curl --out /tmp/curl-cert\n\n\
Writes cert-chain.pem (leaf, then the CA chain), key.pem (0600) and root-cert.pem."
    )]
    Issue {
        #[command(flatten)]
        dir: CaDirArgs,
        /// SPIFFE identity of the workload: spiffe://<td>/ns/<ns>/sa/<sa>.
        #[arg(long)]
        identity: String,
        /// Directory to write the files to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
        lifetime: Duration,
        /// Overwrite existing files in --out.
        #[arg(long)]
        force: bool,
    },
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    match s.strip_suffix('h') {
        Some(h) => h
            .parse::<u64>()
            .map(|h| Duration::from_secs(h * 3600))
            .map_err(|_| format!("invalid lifetime {s:?}: use e.g. 24h, 30m")),
        None => parse_duration(s),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.cmd {
        CaCmd::Init {
            dir,
            force,
            trust_domain,
        } => init(&dir.ca_dir, force, &trust_domain),
        CaCmd::Show { dir } => show(&dir.ca_dir),
        CaCmd::Issue {
            dir,
            identity,
            out,
            lifetime,
            force,
        } => issue(&dir.ca_dir, &identity, &out, lifetime, force),
    }
}

fn init(dir: &Path, force: bool, trust_domain: &str) -> anyhow::Result<ExitCode> {
    if !force {
        if let Some(f) = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
        {
            anyhow::bail!(
                "{} already exists: keep the existing CA, or pass --force to replace it",
                f.display()
            );
        }
    }
    Ca::init(dir, trust_domain, force)
        .with_context(|| format!("could not create a CA in {}", dir.display()))?;
    println!("created a CA in {}:", dir.display());
    for (f, what) in [
        (ROOT_CERT, "root certificate (give this to peers)"),
        (CA_CERT, "signing CA certificate"),
        (CA_KEY, "signing CA key, mode 0600"),
        (CERT_CHAIN, "signing CA + root"),
    ] {
        println!("  {}  {what}", dir.join(f).display());
    }
    Ok(ExitCode::SUCCESS)
}

struct CertSummary {
    subject: String,
    issuer: String,
    not_before: String,
    not_after: String,
    expired: bool,
    fingerprint: String,
}

fn summarize(der: &[u8]) -> anyhow::Result<CertSummary> {
    let (_, c) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("invalid certificate: {e}"))?;
    let v = c.validity();
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(CertSummary {
        subject: c.subject().to_string(),
        issuer: c.issuer().to_string(),
        not_before: v.not_before.to_string(),
        not_after: v.not_after.to_string(),
        expired: !v.is_valid(),
        fingerprint: digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    })
}

fn read_first_cert(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read(path).with_context(|| {
        format!(
            "cannot read {}: create a CA with `shunt ca init --ca-dir {}`",
            path.display(),
            path.parent().unwrap_or(Path::new(".")).display()
        )
    })?;
    let p = pem::parse_many(&text)
        .ok()
        .and_then(|v| v.into_iter().find(|p| p.tag() == "CERTIFICATE"))
        .with_context(|| format!("{} holds no PEM CERTIFICATE", path.display()))?;
    Ok(p.contents().to_vec())
}

fn show(dir: &Path) -> anyhow::Result<ExitCode> {
    // Load it the way the agent does, so `show` also validates the layout.
    Ca::load(dir).with_context(|| {
        format!(
            "the CA in {} is not usable: fix the file named or run `shunt ca init --ca-dir {}`",
            dir.display(),
            dir.display()
        )
    })?;
    println!("CA directory: {}", dir.display());
    let mut expired = false;
    for (file, title) in [(CA_CERT, "signing CA"), (ROOT_CERT, "root")] {
        let path = dir.join(file);
        let s = summarize(&read_first_cert(&path)?)
            .with_context(|| format!("{}: not a valid certificate", path.display()))?;
        expired |= s.expired;
        println!("{title} ({file})");
        println!("  subject:     {}", s.subject);
        println!("  issuer:      {}", s.issuer);
        println!(
            "  validity:    {} to {}{}",
            s.not_before,
            s.not_after,
            if s.expired { "  EXPIRED" } else { "" }
        );
        println!("  fingerprint: SHA-256 {}", s.fingerprint);
    }
    Ok(if expired {
        eprintln!("shunt: the CA has expired: create a new one with `shunt ca init --force`");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn write_out(path: &Path, contents: &str, secret: bool, force: bool) -> anyhow::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    if secret {
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists: choose another --out or pass --force",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        }
    })?;
    if secret {
        // `mode` applies only on creation; a replaced file keeps its bits.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn issue(
    dir: &Path,
    identity: &str,
    out: &Path,
    lifetime: Duration,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let id: SpiffeId = identity.parse().map_err(|e| {
        anyhow::anyhow!("{e}: pass --identity spiffe://<trust-domain>/ns/<namespace>/sa/<name>")
    })?;
    let ca = Ca::load(dir).with_context(|| {
        format!(
            "cannot load the CA in {}: run `shunt ca init --ca-dir {}` first",
            dir.display(),
            dir.display()
        )
    })?;
    let cert = ca.issue(&id, lifetime)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // The root as the CA directory holds it, byte for byte.
    let root = std::fs::read_to_string(dir.join(ROOT_CERT)).unwrap_or_else(|_| ca.roots_pem());
    let files = [
        ("cert-chain.pem", cert.chain_pem(), false),
        ("key.pem", cert.key_pem(), true),
        ("root-cert.pem", root, false),
    ];
    for (name, _, _) in &files {
        let p = out.join(name);
        if !force && p.exists() {
            anyhow::bail!(
                "{} already exists: choose another --out or pass --force",
                p.display()
            );
        }
    }
    for (name, text, secret) in &files {
        write_out(&out.join(name), text, *secret, force)?;
    }
    let until = time::OffsetDateTime::from(cert.not_after)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    println!("issued {id}, valid until {until}:");
    for (name, _, secret) in &files {
        println!(
            "  {}{}",
            out.join(name).display(),
            if *secret { "  (mode 0600)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

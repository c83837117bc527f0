//! An "internet" for egress tests: nginx in a pod serving several names
//! over HTTP (80) and HTTPS (443, a certificate per name from a test CA
//! made here with the `openssl` CLI), each answering `<name> <path>` so a
//! client sees which server block it reached. nginx's access log records
//! every request with the client address, the SNI and the Host, so a test
//! can prove where each connection came from and that a refused one never
//! arrived. A TLS client naming no served name gets its handshake refused
//! (`ssl_reject_handshake`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{wait_for, Pod, Proc, Result};

/// A running nginx and its files.
pub struct Internet {
    pub proc: Proc,
    /// PEM of the CA that signed every name's certificate.
    pub ca_pem: PathBuf,
    /// `remote_addr sni host request status`, one line per request.
    pub access_log: PathBuf,
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A test CA in `dir` and a certificate for each name, signed by it.
fn pki(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    let p = |f: &str| dir.join(f).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=shunt test internet CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ])?;
    for n in names {
        let ext = dir.join(format!("{n}.ext"));
        std::fs::write(&ext, format!("subjectAltName=DNS:{n}\n"))?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={n}"),
            "-keyout",
            &p(&format!("{n}.key")),
            "-out",
            &p(&format!("{n}.csr")),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &p(&format!("{n}.csr")),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &p(&format!("{n}.pem")),
        ])?;
    }
    Ok(dir.join("ca.pem"))
}

impl Internet {
    /// Starts nginx in `pod` on `ip` (v4) for `names`, files under `dir`.
    pub fn start(pod: &Pod, ip: &str, names: &[&str], dir: &Path) -> Result<Internet> {
        std::fs::create_dir_all(dir)?;
        let ca_pem = pki(dir, names)?;
        let access_log = dir.join("access.log");
        let d = dir.display();
        let mut servers = String::new();
        for n in names {
            servers.push_str(&format!(
                r#"
  server {{
    listen {ip}:80;
    listen {ip}:443 ssl;
    server_name {n};
    ssl_certificate {d}/{n}.pem;
    ssl_certificate_key {d}/{n}.key;
    location / {{ default_type text/plain; return 200 "{n} $uri\n"; }}
  }}"#
            ));
        }
        let conf = format!(
            r#"daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
  log_format shunt '$remote_addr sni=$ssl_server_name host=$host "$request" $status';
  access_log {log} shunt;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  # A name no server block serves: no certificate, no answer.
  server {{
    listen {ip}:80 default_server;
    listen {ip}:443 ssl default_server;
    ssl_reject_handshake on;
    return 421;
  }}{servers}
}}
"#,
            log = access_log.display()
        );
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        std::fs::write(&access_log, "")?;
        let mut cmd = pod.enter().command("nginx");
        cmd.args(["-c", &conf_path.display().to_string(), "-p", &d.to_string()]);
        let proc = Proc::spawn("nginx", cmd, &dir.join("nginx.out"))?;
        wait_for("nginx listening", Duration::from_secs(10), || {
            let ss = pod.enter().command("ss").args(["-ltn"]).output().ok()?;
            String::from_utf8_lossy(&ss.stdout)
                .contains(&format!("{ip}:443"))
                .then_some(())
        })?;
        Ok(Internet {
            proc,
            ca_pem,
            access_log,
        })
    }

    /// The access log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }
}

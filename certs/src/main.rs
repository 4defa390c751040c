//! `dpfl-certs`: create a federation CA and per-host kits, sign node requests, renew and
//! describe certificates.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dpfl_certs::{KitOptions, Kits, Layout, Validity};
use std::path::PathBuf;

const EXAMPLES: &str = "\
Examples:
  # The operator makes the CA and one kit per host (ca/ stays on the operator's machine):
  dpfl-certs init --out fed --san fl.example.org --nodes 3
  #   fed/ca/       ca.pem ca.key                      (keep offline; signs everything)
  #   fed/server/   ca.pem server.pem server.key server.toml
  #   fed/node-1/   ca.pem node-1.pem node-1.key run-node.sh

  # A node that keeps its key to itself: it makes a request, the operator signs it.
  dpfl-certs request --name hospital-a --out certs          # on the node
  dpfl-certs sign --ca fed/ca --csr hospital-a.csr --out signed   # operator
  #   copy signed/hospital-a.pem and signed/ca.pem back into the node's certs/

  # Renewal keeps the key (and so the identity the server bound the name to):
  dpfl-certs renew --ca fed/ca --cert fed/node-1/node-1.pem --days 365
  dpfl-certs show fed/server/server.pem fed/node-1/node-1.pem";

#[derive(Parser)]
#[command(
    name = "dpfl-certs",
    version,
    allow_negative_numbers = true,
    about = "Certificates for a dpfl federation: a CA, the server certificate and one \
             client certificate per node, as PEM files (private keys mode 0600), laid out \
             as one kit per host.",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Validity flag shared by the subcommands that issue certificates.
#[derive(clap::Args)]
struct Days {
    /// Validity of the issued certificate(s), in days.
    #[arg(long, default_value_t = Validity::DEFAULT_DAYS, allow_negative_numbers = true)]
    days: i64,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new federation as per-host kits: OUT/ca (CA certificate and key: keep it
    /// apart, offline), OUT/server (server kit) and OUT/<node> for each node.
    #[command(after_help = EXAMPLES, allow_negative_numbers = true)]
    Init {
        /// Folder for the kits.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Names of the server (DNS names or IP addresses); repeatable.
        #[arg(long = "san", visible_alias = "server-san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        sans: Vec<String>,
        /// Number of node kits, named `<prefix>-1` .. `<prefix>-N`.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Prefix of the node names.
        #[arg(long, default_value = "node")]
        prefix: String,
        #[command(flatten)]
        days: Days,
        /// Validity of the CA, in days.
        #[arg(long, default_value_t = Validity::CA_DAYS)]
        ca_days: i64,
        /// host:port the nodes connect to, written into their command lines (default: the
        /// first --san, port 4433).
        #[arg(long)]
        server_addr: Option<String>,
        /// DP mode written into the server template and the nodes' command lines.
        #[arg(long, default_value = "none")]
        dp_mode: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a kit for one more node (the operator makes its key; see `request` and `sign`
    /// for a key that never leaves the node).
    #[command(allow_negative_numbers = true)]
    Node {
        /// Folder of the CA (ca.pem and ca.key).
        #[arg(long, default_value = "certs-dev/ca")]
        ca: PathBuf,
        /// Node name (1-64 characters from [A-Za-z0-9._-]); becomes the certificate CN.
        #[arg(long)]
        name: String,
        /// Folder of the node's kit (default: next to the CA folder, named after the node).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        days: Days,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue the server's kit again (other names, or a new key), signed by the CA.
    #[command(allow_negative_numbers = true)]
    Server {
        /// Folder of the CA (ca.pem and ca.key).
        #[arg(long, default_value = "certs-dev/ca")]
        ca: PathBuf,
        /// Names of the server (DNS names or IP addresses); repeatable.
        #[arg(long = "san", visible_alias = "server-san", required = true)]
        sans: Vec<String>,
        /// Folder of the server kit (default: `server` next to the CA folder).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        days: Days,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// On a node: make its private key (never leaves the node) and a certificate signing
    /// request `<name>.csr` to send to the operator.
    Request {
        /// Node name (1-64 characters from [A-Za-z0-9._-]).
        #[arg(long)]
        name: String,
        /// Folder for `<name>.key` and `<name>.csr` (the node's certs folder).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Keep the existing `<name>.key` (a renewal: same key, same identity).
        #[arg(long)]
        reuse_key: bool,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Operator: sign a node's request; writes `<name>.pem` and `ca.pem` to send back.
    #[command(allow_negative_numbers = true)]
    Sign {
        /// Folder of the CA (ca.pem and ca.key).
        #[arg(long, default_value = "certs-dev/ca")]
        ca: PathBuf,
        /// The node's request (`<name>.csr`).
        #[arg(long)]
        csr: PathBuf,
        /// Folder for the signed certificate and the CA certificate.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        days: Days,
        /// Overwrite an existing certificate.
        #[arg(long)]
        force: bool,
    },
    /// Re-sign a certificate's public key with a new validity (same names, same key: the
    /// server keeps the identity). Overwrites the certificate unless --out is given.
    #[command(allow_negative_numbers = true)]
    Renew {
        /// Folder of the CA (ca.pem and ca.key).
        #[arg(long, default_value = "certs-dev/ca")]
        ca: PathBuf,
        /// The certificate to renew (server.pem or <node>.pem).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the renewed certificate (default: over --cert).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        days: Days,
    },
    /// Describe certificates: CA, server (its names) or node (its name), expiry, the
    /// SHA-256 fingerprint of the certificate (for allow-lists) and of its public key (the
    /// identity the server binds the name to; for `rekey`).
    Show {
        /// PEM certificate files.
        #[arg(required = true)]
        certs: Vec<PathBuf>,
    },
}

fn sibling(ca: &std::path::Path, name: &str) -> PathBuf {
    ca.parent()
        .map_or_else(|| PathBuf::from(name), |p| p.join(name))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Init {
            out,
            sans,
            nodes,
            prefix,
            days,
            ca_days,
            server_addr,
            dp_mode,
            force,
        } => {
            let names: Vec<String> = (1..=nodes).map(|i| format!("{prefix}-{i}")).collect();
            dpfl_certs::create_kits(
                &out,
                &KitOptions {
                    sans: sans.clone(),
                    nodes: names.clone(),
                    days: days.days,
                    ca_days,
                    server_addr,
                    dp_mode,
                    force,
                },
            )?;
            let kits = Kits::new(&out);
            println!(
                "created a federation in {}:\n  {}  CA certificate and key: keep this folder \
                 apart (offline); it signs every identity\n  {}  server kit ({}): copy to the \
                 server\n  {} node kits ({} .. {}): copy each to its node",
                out.display(),
                kits.ca().dir().display(),
                kits.server().dir().display(),
                sans.join(", "),
                names.len(),
                names.first().map_or("-", String::as_str),
                names.last().map_or("-", String::as_str),
            );
        }
        Command::Node {
            ca,
            name,
            out,
            days,
            force,
        } => {
            let out = out.unwrap_or_else(|| sibling(&ca, &name));
            dpfl_certs::Federation::open(&ca)?.issue_node_to(
                &Layout::new(&out),
                &name,
                Validity::days(days.days)?,
                force,
            )?;
            println!("issued {name}'s kit in {}", out.display());
        }
        Command::Server {
            ca,
            sans,
            out,
            days,
            force,
        } => {
            let out = out.unwrap_or_else(|| sibling(&ca, "server"));
            dpfl_certs::Federation::open(&ca)?.issue_server_to(
                &Layout::new(&out),
                &sans,
                Validity::days(days.days)?,
                force,
            )?;
            println!(
                "issued the server certificate for {} in {}",
                sans.join(", "),
                out.display()
            );
        }
        Command::Request {
            name,
            out,
            reuse_key,
            force,
        } => {
            let csr = dpfl_certs::request(&out, &name, reuse_key, force)?;
            println!(
                "{}: key {} (stays here), request {}: send the request to the operator \
                 (dpfl-certs sign --csr {}), then put the returned {name}.pem and ca.pem in {}",
                name,
                Layout::new(&out).node_key(&name).display(),
                csr.display(),
                csr.file_name().map_or("-".into(), |f| f.to_string_lossy()),
                out.display()
            );
        }
        Command::Sign {
            ca,
            csr,
            out,
            days,
            force,
        } => {
            let fed = dpfl_certs::Federation::open(&ca)?;
            let (name, pem) = fed.sign_request(&csr, Validity::days(days.days)?)?;
            let layout = Layout::new(&out);
            let path = layout.node_cert(&name);
            if path.exists() && !force {
                anyhow::bail!(
                    "{} already exists (use --force to overwrite)",
                    path.display()
                );
            }
            std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
            std::fs::write(&path, &pem).with_context(|| path.display().to_string())?;
            if layout.ca_cert() != fed.layout().ca_cert() {
                std::fs::copy(fed.layout().ca_cert(), layout.ca_cert())
                    .with_context(|| layout.ca_cert().display().to_string())?;
            }
            let info = dpfl_certs::describe_file(&path)?;
            println!(
                "signed {name}: {} and {} to send back; key sha256:{} ({}); check the key \
                 fingerprint with the node out of band",
                path.display(),
                layout.ca_cert().display(),
                info.key_fingerprint,
                info.expiry(std::time::SystemTime::now())
            );
        }
        Command::Renew {
            ca,
            cert,
            out,
            days,
        } => {
            let fed = dpfl_certs::Federation::open(&ca)?;
            let pem = fed.renew(&cert, Validity::days(days.days)?)?;
            let out = out.unwrap_or_else(|| cert.clone());
            std::fs::write(&out, pem).with_context(|| out.display().to_string())?;
            let info = dpfl_certs::describe_file(&out)?;
            println!(
                "renewed {}: {}, same key sha256:{}",
                info.role,
                info.expiry(std::time::SystemTime::now()),
                info.key_fingerprint
            );
        }
        Command::Show { certs } => {
            let now = std::time::SystemTime::now();
            for path in certs {
                for c in dpfl_certs::load_certs(&path)? {
                    let info = dpfl_certs::describe(&c)?;
                    println!(
                        "{}: {}, {}, sha256:{} key sha256:{}",
                        path.display(),
                        info.role,
                        info.expiry(now),
                        info.fingerprint,
                        info.key_fingerprint
                    );
                }
            }
        }
    }
    Ok(())
}

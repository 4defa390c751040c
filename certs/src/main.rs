//! `dpfl-certs`: create a federation CA, the server certificate and node certificates.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dpfl-certs",
    version,
    about = "Certificates for a dpfl federation: a CA, the server certificate and one \
             client certificate per node, as PEM files (private keys mode 0600)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new federation: CA, server certificate and N node certificates.
    Init {
        /// Directory for the PEM files.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Subject alternative names of the server (DNS names or IP addresses); repeatable.
        #[arg(long = "server-san", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_sans: Vec<String>,
        /// Number of node certificates, named `<prefix>-1` .. `<prefix>-N`.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Prefix of the node names.
        #[arg(long, default_value = "node")]
        prefix: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for one more node, signed by the CA in `--dir`.
    Node {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "certs-dev")]
        dir: PathBuf,
        /// Node name (1-64 characters from [A-Za-z0-9._-]); becomes the certificate CN.
        #[arg(long)]
        name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Re-issue the server certificate with other SANs, signed by the CA in `--dir`.
    Server {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, default_value = "certs-dev")]
        dir: PathBuf,
        /// Subject alternative names; repeatable.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print the node name, the SHA-256 fingerprint of a certificate (for allow-lists) and
    /// of its public key (the identity the server binds the name to; for `rekey`).
    Show {
        /// PEM certificate file.
        cert: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Init {
            out,
            server_sans,
            nodes,
            prefix,
            force,
        } => {
            let names =
                dpfl_certs::create_dev_federation(&out, &server_sans, &prefix, nodes, force)?;
            println!(
                "created CA, server ({}) and {} node certificates in {}",
                server_sans.join(", "),
                names.len(),
                out.display()
            );
        }
        Command::Node { dir, name, force } => {
            dpfl_certs::Federation::open(&dir)?.issue_node(&name, force)?;
            println!("issued {name} in {}", dir.display());
        }
        Command::Server { dir, sans, force } => {
            dpfl_certs::Federation::open(&dir)?.issue_server(&sans, force)?;
            println!("issued server certificate for {}", sans.join(", "));
        }
        Command::Show { cert } => {
            for c in dpfl_certs::load_certs(&cert)? {
                let name = dpfl_certs::node_name(&c).unwrap_or_else(|e| format!("({e})"));
                let key = dpfl_certs::key_fingerprint(&c).unwrap_or_else(|e| format!("({e})"));
                println!(
                    "{name} sha256:{} key sha256:{key}",
                    dpfl_certs::fingerprint(&c)
                );
            }
        }
    }
    Ok(())
}

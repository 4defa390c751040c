//! Certificates for a dpfl federation and the TLS configurations built from them.
//!
//! - [`Federation::create`] makes a federation CA, a server certificate (SANs configurable)
//!   and per-node client certificates with distinct names, written as PEM; private keys get
//!   mode 0600 and nothing is overwritten unless asked. Certificates carry a real validity
//!   period ([`Validity`], a year by default; the CA ten years).
//! - [`create_kits`] writes one folder per host: the CA's (`ca/`, kept apart, offline), the
//!   server's kit (`server/`: CA certificate, server certificate and key, a configuration
//!   template) and one kit per node (`<name>/`: CA certificate, its own certificate and key,
//!   a ready-to-run command line). No host kit holds the CA key.
//! - [`request`] makes a node's key and a certificate signing request on the node itself;
//!   [`Federation::sign_request`] signs it without ever seeing the key, and
//!   [`Federation::renew`] re-signs an existing certificate's public key with a new validity
//!   (the server binds identities to keys, so a renewed certificate keeps its identity).
//! - [`describe`] says what a certificate is (CA, server or node), its names and its
//!   validity.
//! - [`server_tls`] and [`client_tls`] build rustls configs for **mutual** TLS 1.3: the
//!   server only accepts client certificates that chain to the federation CA, and clients
//!   only trust a server whose certificate chains to it.
//! - [`node_name`] and [`fingerprint`] identify a peer from its certificate.
//!
//! This crate knows nothing about the protocol, sockets or training.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Errors creating, reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file exists and `force` was not given.
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(String),
    /// A certificate could not be parsed or carries no usable name.
    #[error("peer certificate: {0}")]
    Identity(String),
    /// A node name that cannot be used.
    #[error("invalid node name {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    NodeName(String),
    /// A validity period that cannot be used.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// A certificate signing request that cannot be signed.
    #[error("certificate signing request {path}: {what}")]
    Request {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Paths of the files that make up a federation's credentials in one directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Files under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// Server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Server private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// A node's certificate.
    pub fn node_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// A node's private key.
    pub fn node_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

/// Checks a node name (it becomes a file name and the peer's identity).
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
        && name != "ca"
        && name != "server";
    if ok {
        Ok(())
    } else {
        Err(CertError::NodeName(name.to_string()))
    }
}

fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() && !force {
        return Err(CertError::Exists(path.to_path_buf()));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))?;
    if private {
        // An existing file keeps its old mode on open; enforce 0600 explicitly.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
    }
    f.sync_all().map_err(io_err(path))
}

fn read_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// A federation CA able to sign server and node certificates.
pub struct Federation {
    issuer: rcgen::Certificate,
    key: KeyPair,
    layout: Layout,
}

impl Federation {
    /// Creates a new CA in `dir` (fails if its files exist, unless `force`), valid for
    /// [`Validity::CA_DAYS`] days.
    pub fn create(dir: impl Into<PathBuf>, force: bool) -> Result<Self, CertError> {
        Self::create_with(dir, Validity::days(Validity::CA_DAYS)?, force)
    }

    /// Creates a new CA in `dir` with the given validity.
    pub fn create_with(
        dir: impl Into<PathBuf>,
        validity: Validity,
        force: bool,
    ) -> Result<Self, CertError> {
        let layout = Layout::new(dir);
        for p in [layout.ca_cert(), layout.ca_key()] {
            if p.exists() && !force {
                return Err(CertError::Exists(p));
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "dpfl federation CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        validity.apply(&mut params);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = params.self_signed(&key)?;
        write_file(&layout.ca_cert(), &issuer.pem(), false, force)?;
        write_file(&layout.ca_key(), &key.serialize_pem(), true, force)?;
        Ok(Self {
            issuer,
            key,
            layout,
        })
    }

    /// Loads an existing CA from `dir` to sign more certificates.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CertError> {
        let layout = Layout::new(dir);
        let cert_pem = read_string(&layout.ca_cert())?;
        let key_pem = read_string(&layout.ca_key())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Pem {
            path: layout.ca_key(),
            what: e.to_string(),
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| CertError::Pem {
                path: layout.ca_cert(),
                what: e.to_string(),
            })?;
        // Re-signing the same params with the same key reproduces an issuer whose name and
        // key match the certificate on disk, which is all signing needs.
        let issuer = params.self_signed(&key)?;
        Ok(Self {
            issuer,
            key,
            layout,
        })
    }

    /// The file layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Issues the server certificate for the given DNS names and IP addresses into the CA's
    /// own folder (development layout), valid for [`Validity::DEFAULT_DAYS`].
    pub fn issue_server(&self, sans: &[String], force: bool) -> Result<(), CertError> {
        self.issue_server_to(
            &self.layout.clone(),
            sans,
            Validity::days(Validity::DEFAULT_DAYS)?,
            force,
        )
    }

    /// Issues a server certificate and key into `to` (a server kit), with the CA
    /// certificate next to them.
    pub fn issue_server_to(
        &self,
        to: &Layout,
        sans: &[String],
        validity: Validity,
        force: bool,
    ) -> Result<(), CertError> {
        let key = KeyPair::generate()?;
        let cert = server_params(sans, validity)?.signed_by(&key, &self.issuer, &self.key)?;
        self.copy_ca_to(to, force)?;
        write_file(&to.server_cert(), &cert.pem(), false, force)?;
        write_file(&to.server_key(), &key.serialize_pem(), true, force)
    }

    /// Issues a client certificate for node `name` (its CN and DNS SAN) into the CA's own
    /// folder (development layout), valid for [`Validity::DEFAULT_DAYS`].
    pub fn issue_node(&self, name: &str, force: bool) -> Result<(), CertError> {
        self.issue_node_to(
            &self.layout.clone(),
            name,
            Validity::days(Validity::DEFAULT_DAYS)?,
            force,
        )
    }

    /// Issues a certificate and key for node `name` into `to` (the node's kit), with the CA
    /// certificate next to them. The operator sees the key; [`request`] and
    /// [`Federation::sign_request`] avoid that.
    pub fn issue_node_to(
        &self,
        to: &Layout,
        name: &str,
        validity: Validity,
        force: bool,
    ) -> Result<(), CertError> {
        let key = KeyPair::generate()?;
        let cert = node_params(name, validity)?.signed_by(&key, &self.issuer, &self.key)?;
        self.copy_ca_to(to, force)?;
        write_file(&to.node_cert(name), &cert.pem(), false, force)?;
        write_file(&to.node_key(name), &key.serialize_pem(), true, force)
    }

    /// Signs a node's certificate signing request (PEM, made by [`request`]): the node name
    /// is the request's common name (validated), the certificate is a client certificate
    /// whatever else the request asks for. Returns the node name and the certificate PEM.
    pub fn sign_request(
        &self,
        csr_path: &Path,
        validity: Validity,
    ) -> Result<(String, String), CertError> {
        let bad = |what: String| CertError::Request {
            path: csr_path.to_path_buf(),
            what,
        };
        let pem = read_string(csr_path)?;
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem)
            .map_err(|e| bad(format!("not a valid signed request: {e}")))?;
        let name = request_name(&pem).map_err(bad)?;
        validate_node_name(&name)?;
        let cert =
            node_params(&name, validity)?.signed_by(&csr.public_key, &self.issuer, &self.key)?;
        Ok((name, cert.pem()))
    }

    /// Re-signs the public key of an existing certificate (server or node) with a new
    /// validity: same names, same key, hence the same identity for the server's key
    /// binding. Returns the new certificate PEM.
    pub fn renew(&self, cert_path: &Path, validity: Validity) -> Result<String, CertError> {
        let der = load_certs(cert_path)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Pem {
                path: cert_path.to_path_buf(),
                what: "no certificate found".into(),
            })?;
        let info = describe(&der)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| CertError::Identity(e.to_string()))?;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(parsed.tbs_certificate.subject_pki.raw)?;
        let params = match &info.role {
            Role::Server { sans } => server_params(sans, validity)?,
            Role::Node { name } => node_params(name, validity)?,
            Role::Ca | Role::Other(_) => {
                return Err(CertError::Pem {
                    path: cert_path.to_path_buf(),
                    what: format!("cannot renew {}", info.role),
                })
            }
        };
        Ok(params.signed_by(&spki, &self.issuer, &self.key)?.pem())
    }

    /// Writes the CA certificate (never its key) into a kit.
    fn copy_ca_to(&self, to: &Layout, force: bool) -> Result<(), CertError> {
        if to.ca_cert() == self.layout.ca_cert() {
            return Ok(());
        }
        let pem = self.issuer.pem();
        // The same CA certificate already there is fine (a kit that gets a second file).
        if !force && std::fs::read_to_string(to.ca_cert()).is_ok_and(|old| same_pem(&old, &pem)) {
            return Ok(());
        }
        let ca = read_string(&self.layout.ca_cert())?;
        write_file(&to.ca_cert(), &ca, false, true)
    }
}

/// Whether two PEM texts hold the same certificates (the CA certificate re-encoded by
/// rcgen after [`Federation::open`] differs in bytes from the file on disk).
fn same_pem(a: &str, b: &str) -> bool {
    let first = |s: &str| {
        CertificateDer::pem_slice_iter(s.as_bytes())
            .next()
            .and_then(Result::ok)
            .and_then(|c| key_fingerprint(&c).ok())
    };
    first(a).is_some() && first(a) == first(b)
}

fn server_params(sans: &[String], validity: Validity) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_CN);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity.apply(&mut params);
    Ok(params)
}

fn node_params(name: &str, validity: Validity) -> Result<CertificateParams, CertError> {
    validate_node_name(name)?;
    let mut params = CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    validity.apply(&mut params);
    Ok(params)
}

/// The common name in a PEM certificate signing request (its signature is checked by
/// rcgen when the request is signed).
fn request_name(pem: &str) -> Result<String, String> {
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate request: {e}"))?;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| format!("not a certificate request: {e}"))?;
    let cn = req
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .ok_or("the request carries no common name (node name)")?
        .as_str()
        .map_err(|e| e.to_string())?;
    Ok(cn.to_string())
}

/// Common name of server certificates.
const SERVER_CN: &str = "dpfl aggregation server";

/// Creates a CA, a server certificate and `nodes` node certificates named
/// `{prefix}-1 .. {prefix}-{nodes}` in `dir`.
pub fn create_dev_federation(
    dir: &Path,
    sans: &[String],
    prefix: &str,
    nodes: usize,
    force: bool,
) -> Result<Vec<String>, CertError> {
    let fed = Federation::create(dir, force)?;
    fed.issue_server(sans, force)?;
    let names: Vec<String> = (1..=nodes).map(|i| format!("{prefix}-{i}")).collect();
    for n in &names {
        fed.issue_node(n, force)?;
    }
    Ok(names)
}

/// When a certificate is valid: `not_before` (an hour back, for clock skew) to `not_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start (UTC).
    pub not_before: time::OffsetDateTime,
    /// End (UTC).
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// Default validity of server and node certificates, in days.
    pub const DEFAULT_DAYS: i64 = 365;
    /// Default validity of the federation CA, in days.
    pub const CA_DAYS: i64 = 3650;

    /// From an hour ago until `days` days from now (1 to 36,500 days).
    pub fn days(days: i64) -> Result<Self, CertError> {
        if !(1..=36_500).contains(&days) {
            return Err(CertError::Validity(format!(
                "--days must be between 1 and 36500, got {days}"
            )));
        }
        let now = time::OffsetDateTime::now_utc();
        Ok(Self {
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(days),
        })
    }

    /// An explicit period (tests make expired certificates with it).
    pub fn between(
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Self, CertError> {
        if not_after <= not_before {
            return Err(CertError::Validity(
                "not_after must follow not_before".into(),
            ));
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    fn apply(&self, params: &mut CertificateParams) {
        params.not_before = self.not_before;
        params.not_after = self.not_after;
    }
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The federation CA.
    Ca,
    /// The aggregation server, with its subject alternative names.
    Server {
        /// DNS names and IP addresses the certificate is valid for.
        sans: Vec<String>,
    },
    /// A client node.
    Node {
        /// Its name (the certificate's common name).
        name: String,
    },
    /// None of these (not made by dpfl-certs), with what is wrong.
    Other(String),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Ca => write!(f, "federation CA"),
            Role::Server { sans } => write!(f, "server certificate for {}", sans.join(", ")),
            Role::Node { name } => write!(f, "node {name}"),
            Role::Other(why) => write!(f, "not a dpfl certificate ({why})"),
        }
    }
}

/// A certificate described: role, validity and fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// CA, server or node.
    pub role: Role,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// SHA-256 of the certificate (allow-lists).
    pub fingerprint: String,
    /// SHA-256 of its public key (the identity the server binds a node name to).
    pub key_fingerprint: String,
}

impl CertInfo {
    /// Seconds until expiry from `now` (negative: expired).
    pub fn seconds_left(&self, now: std::time::SystemTime) -> i64 {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.not_after - now
    }

    /// "expires 2027-11-30 00:26 UTC (in 364 days)" or "EXPIRED on ... (3 days ago)".
    pub fn expiry(&self, now: std::time::SystemTime) -> String {
        let left = self.seconds_left(now);
        let when = format_unix(self.not_after);
        if left < 0 {
            format!("EXPIRED on {when} ({} ago)", format_span(-left))
        } else {
            format!("expires {when} (in {})", format_span(left))
        }
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM UTC`.
pub fn format_unix(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{secs} (Unix time)"),
    }
}

fn format_span(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s if s >= 120 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

/// A TLS error message with its Unix times as dates: rustls reports an expired
/// certificate as "... not valid after 1732000000 ...", which becomes "... not valid after
/// 1732000000 (2024-11-19 07:06 UTC) ...".
pub fn explain_tls_error(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len() + 32);
    let mut rest = msg;
    while let Some(i) = ["not valid after ", "not valid before "]
        .iter()
        .filter_map(|p| rest.find(p).map(|i| i + p.len()))
        .min()
    {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        out.push_str(&digits);
        if let Ok(t) = digits.parse::<i64>() {
            out.push_str(&format!(" ({})", format_unix(t)));
        }
        rest = &tail[digits.len()..];
    }
    out.push_str(rest);
    out
}

/// Describes a certificate: what it is for, when it expires, its fingerprints.
pub fn describe(cert: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::Identity(e.to_string()))?;
    let eku = parsed
        .extended_key_usage()
        .ok()
        .flatten()
        .map(|e| (e.value.server_auth, e.value.client_auth));
    let role = if parsed.is_ca() {
        Role::Ca
    } else if eku.is_some_and(|(server, _)| server) {
        let sans = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| match n {
                        x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                        x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                            4 => <[u8; 4]>::try_from(*b)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .unwrap_or_default(),
                            16 => <[u8; 16]>::try_from(*b)
                                .map(|a| std::net::IpAddr::from(a).to_string())
                                .unwrap_or_default(),
                            _ => String::from("?"),
                        },
                        other => format!("{other}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Role::Server { sans }
    } else {
        match node_name(cert) {
            Ok(name) => Role::Node { name },
            Err(e) => Role::Other(e.to_string()),
        }
    };
    let validity = parsed.validity();
    Ok(CertInfo {
        role,
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        fingerprint: fingerprint(cert),
        key_fingerprint: key_fingerprint(cert)?,
    })
}

/// Describes the first certificate of a PEM file.
pub fn describe_file(path: &Path) -> Result<CertInfo, CertError> {
    let certs = load_certs(path)?;
    describe(&certs[0])
}

/// Whether a folder that a server or node reads its credentials from also holds the CA's
/// private key (it should live apart, offline: whoever holds it can mint identities).
pub fn holds_ca_key(dir: &Path) -> bool {
    Layout::new(dir).ca_key().exists()
}

/// Makes a node's key pair and a certificate signing request for `name` in `dir`
/// (`<name>.key`, mode 0600, and `<name>.csr`). Only the request leaves the node; the
/// operator signs it ([`Federation::sign_request`]). With `reuse_key` an existing
/// `<name>.key` is kept (renewal without a new identity).
pub fn request(dir: &Path, name: &str, reuse_key: bool, force: bool) -> Result<PathBuf, CertError> {
    validate_node_name(name)?;
    let layout = Layout::new(dir);
    let key = if reuse_key {
        let pem = read_string(&layout.node_key(name))?;
        KeyPair::from_pem(&pem).map_err(|e| CertError::Pem {
            path: layout.node_key(name),
            what: e.to_string(),
        })?
    } else {
        let key = KeyPair::generate()?;
        write_file(&layout.node_key(name), &key.serialize_pem(), true, force)?;
        key
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key)?.pem()?;
    let path = dir.join(format!("{name}.csr"));
    write_file(&path, &csr, false, true)?;
    Ok(path)
}

/// Where [`create_kits`] puts each host's files under one output folder.
#[derive(Debug, Clone)]
pub struct Kits {
    out: PathBuf,
}

impl Kits {
    /// Kits under `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self { out: out.into() }
    }
    /// The CA's folder (`ca.pem`, `ca.key`): keep it offline, on the operator's machine.
    pub fn ca(&self) -> Layout {
        Layout::new(self.out.join("ca"))
    }
    /// The server's kit.
    pub fn server(&self) -> Layout {
        Layout::new(self.out.join("server"))
    }
    /// A node's kit (node names cannot be `ca` or `server`).
    pub fn node(&self, name: &str) -> Layout {
        Layout::new(self.out.join(name))
    }
}

/// What [`create_kits`] makes.
#[derive(Debug, Clone)]
pub struct KitOptions {
    /// Server certificate names (DNS names or IP addresses).
    pub sans: Vec<String>,
    /// Node names.
    pub nodes: Vec<String>,
    /// Validity of server and node certificates, in days.
    pub days: i64,
    /// Validity of the CA, in days.
    pub ca_days: i64,
    /// `host:port` the nodes connect to (default: the first SAN, port 4433).
    pub server_addr: Option<String>,
    /// DP mode written into the server template and the nodes' command lines.
    pub dp_mode: String,
    /// Overwrite existing files.
    pub force: bool,
}

/// The files of a server kit besides the credentials.
pub const SERVER_TEMPLATE: &str = "server.toml";
/// The ready-to-run command line in a node kit.
pub const NODE_SCRIPT: &str = "run-node.sh";

/// Creates a federation as per-host kits under `out` (see [`Kits`]): the CA (certificate
/// and key) in `ca/`, a server kit and one kit per node. Returns the node names.
pub fn create_kits(out: &Path, o: &KitOptions) -> Result<Vec<String>, CertError> {
    if o.sans.is_empty() {
        return Err(CertError::Validity(
            "the server certificate needs at least one name (--san)".into(),
        ));
    }
    for n in &o.nodes {
        validate_node_name(n)?;
    }
    let kits = Kits::new(out);
    // Check everything before the first file is written.
    let validity = Validity::days(o.days)?;
    let ca_validity = Validity::days(o.ca_days)?;
    let fed = Federation::create_with(kits.ca().dir(), ca_validity, o.force)?;
    let server = kits.server();
    fed.issue_server_to(&server, &o.sans, validity, o.force)?;
    let addr =
        o.server_addr
            .clone()
            .unwrap_or_else(|| match o.sans[0].parse::<std::net::Ipv6Addr>() {
                Ok(_) => format!("[{}]:4433", o.sans[0]),
                Err(_) => format!("{}:4433", o.sans[0]),
            });
    let port = addr.rsplit(':').next().unwrap_or("4433");
    write_file(
        &server.dir().join(SERVER_TEMPLATE),
        &server_template(port, o.nodes.len(), &o.dp_mode),
        false,
        o.force,
    )?;
    for n in &o.nodes {
        let kit = kits.node(n);
        fed.issue_node_to(&kit, n, validity, o.force)?;
        let script = kit.dir().join(NODE_SCRIPT);
        write_file(&script, &node_script(n, &addr, &o.dp_mode), false, o.force)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(&script))?;
    }
    Ok(o.nodes.clone())
}

fn server_template(port: &str, nodes: usize, dp_mode: &str) -> String {
    format!(
        "# dpfl-server configuration of this federation (a template written by dpfl-certs).\n\
         # Run from this folder:   dpfl-server --config server.toml\n\
         # Add --http 127.0.0.1:9464 for the status page and metrics (operator-only data).\n\
         # Every key with its default and meaning:   dpfl-server config --defaults\n\
         listen = \"0.0.0.0:{port}\"\n\
         certs_dir = \".\"\n\
         out_dir = \"runs/federation\"\n\
         rounds = 10\n\
         min_clients = {nodes}\n\
         test_data = \"fashion-mnist-test\"\n\
         \n\
         [model]\n\
         layers = [784, 200, 200, 10]\n\
         \n\
         [dp]\n\
         mode = \"{dp_mode}\"\n"
    )
}

fn node_script(name: &str, addr: &str, dp_mode: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # {name}'s kit: the federation CA certificate, {name}'s certificate and key. Run on\n\
         # {name}'s machine:   ./{NODE_SCRIPT} csv:/data/records.csv,label=diagnosis\n\
         # (any --data source: fashion-mnist, idx:IMAGES,LABELS, csv:PATH[,label=COLUMN]);\n\
         # more flags after it are passed on (dpfl-client --help).\n\
         set -eu\n\
         cd \"$(dirname \"$0\")\"\n\
         DATA=\"${{1:?usage: $0 DATA [dpfl-client flags]}}\"\n\
         shift\n\
         exec \"${{DPFL_CLIENT:-dpfl-client}}\" --server {addr} --certs . --name {name} \\\n    \
         --dp-mode {dp_mode} --data \"$DATA\" \"$@\"\n"
    )
}

/// Reads all certificates from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, CertError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| CertError::Tls(format!("CA {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// Paths to one party's credentials.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Federation CA certificate (trust anchor).
    pub ca: PathBuf,
    /// Own certificate chain.
    pub cert: PathBuf,
    /// Own private key.
    pub key: PathBuf,
}

impl Credentials {
    /// The server's files in a layout.
    pub fn server(layout: &Layout) -> Self {
        Self {
            ca: layout.ca_cert(),
            cert: layout.server_cert(),
            key: layout.server_key(),
        }
    }
    /// A node's files in a layout.
    pub fn node(layout: &Layout, name: &str) -> Self {
        Self {
            ca: layout.ca_cert(),
            cert: layout.node_cert(name),
            key: layout.node_key(name),
        }
    }
}

/// TLS 1.3 server config that requires a client certificate chaining to the CA.
pub fn server_tls(creds: &Credentials, alpn: &[u8]) -> Result<rustls::ServerConfig, CertError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&creds.ca)?),
        provider(),
    )
    .build()
    .map_err(|e| CertError::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&creds.cert)?, load_key(&creds.key)?)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// TLS 1.3 client config that pins the federation CA and presents the node certificate.
pub fn client_tls(creds: &Credentials, alpn: &[u8]) -> Result<rustls::ClientConfig, CertError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CertError::Tls(e.to_string()))?
        .with_root_certificates(roots(&creds.ca)?)
        .with_client_auth_cert(load_certs(&creds.cert)?, load_key(&creds.key)?)
        .map_err(|e| CertError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// Checks node certificates that reach a node through the server rather than through a
/// TLS handshake (secure aggregation forwards each neighbour's certificate): the chain to
/// the federation CA, validity at the given time and client-authentication usage, exactly
/// as the server's TLS verifier checks a connecting node.
pub struct PeerCertificates {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for PeerCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCertificates").finish_non_exhaustive()
    }
}

impl PeerCertificates {
    /// Trusts the CA certificate(s) in `ca` (PEM).
    pub fn new(ca: &Path) -> Result<Self, CertError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(ca)?),
            provider(),
        )
        .build()
        .map_err(|e| CertError::Tls(e.to_string()))?;
        Ok(Self { verifier })
    }

    /// Verifies `der` at `now` (seconds since the Unix epoch) and returns the node name it
    /// carries.
    pub fn verify(&self, der: &[u8], now_unix_secs: u64) -> Result<String, CertError> {
        let cert = CertificateDer::from(der.to_vec());
        self.verifier
            .verify_client_cert(
                &cert,
                &[],
                rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    now_unix_secs,
                )),
            )
            .map_err(|e| CertError::Identity(format!("certificate does not verify: {e}")))?;
        node_name(&cert)
    }
}

/// The node name in a (verified) peer certificate: its subject common name.
pub fn node_name(cert: &CertificateDer<'_>) -> Result<String, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::Identity(e.to_string()))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| CertError::Identity("certificate has no common name".into()))?
        .as_str()
        .map_err(|e| CertError::Identity(e.to_string()))?
        .to_string();
    validate_node_name(&cn)
        .map_err(|_| CertError::Identity(format!("unusable node name {cn:?}")))?;
    Ok(cn)
}

/// SHA-256 of a certificate's public key (its SubjectPublicKeyInfo), lowercase hex: what a
/// node's identity is bound to. It survives certificate renewal with the same key and
/// changes with the key.
pub fn key_fingerprint(cert: &CertificateDer<'_>) -> Result<String, CertError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| CertError::Identity(e.to_string()))?;
    Ok(Sha256::digest(parsed.tbs_certificate.subject_pki.raw)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// SHA-256 fingerprint of a certificate, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_files_with_private_keys_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let names = create_dev_federation(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            "node",
            2,
            false,
        )
        .unwrap();
        assert_eq!(names, ["node-1", "node-2"]);
        let l = Layout::new(dir.path());
        for key in [l.ca_key(), l.server_key(), l.node_key("node-1")] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(matches!(
            create_dev_federation(dir.path(), &[], "node", 1, false),
            Err(CertError::Exists(_))
        ));
        create_dev_federation(dir.path(), &["localhost".into()], "node", 1, true).unwrap();
    }

    #[test]
    fn node_certificates_carry_their_names_and_chain_to_reopened_ca() {
        let dir = tempfile::tempdir().unwrap();
        create_dev_federation(dir.path(), &["localhost".into()], "node", 1, false).unwrap();
        let fed = Federation::open(dir.path()).unwrap();
        fed.issue_node("hospital-a", false).unwrap();
        let l = Layout::new(dir.path());
        let cert = &load_certs(&l.node_cert("hospital-a")).unwrap()[0];
        assert_eq!(node_name(cert).unwrap(), "hospital-a");
        assert_eq!(fingerprint(cert).len(), 64);
        // A re-issued certificate for the same name has a new key, hence a new identity.
        let key_a = key_fingerprint(cert).unwrap();
        fed.issue_node("hospital-a", true).unwrap();
        let cert_b = &load_certs(&l.node_cert("hospital-a")).unwrap()[0];
        assert_ne!(key_fingerprint(cert_b).unwrap(), key_a);
        assert_eq!(node_name(cert_b).unwrap(), "hospital-a");
        // TLS configs build from the files, including the re-signed node.
        server_tls(&Credentials::server(&l), b"x").unwrap();
        client_tls(&Credentials::node(&l, "hospital-a"), b"x").unwrap();
        // The re-opened CA signs certificates a verifier built from ca.pem accepts.
        let roots = Arc::new(roots(&l.ca_cert()).unwrap());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap();
        verifier
            .verify_client_cert(cert, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
    }

    #[test]
    fn forwarded_peer_certificates_are_chain_checked() {
        let dir = tempfile::tempdir().unwrap();
        create_dev_federation(dir.path(), &["localhost".into()], "node", 2, false).unwrap();
        let other = tempfile::tempdir().unwrap();
        create_dev_federation(other.path(), &["localhost".into()], "node", 1, false).unwrap();
        let l = Layout::new(dir.path());
        let peers = PeerCertificates::new(&l.ca_cert()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let cert = &load_certs(&l.node_cert("node-2")).unwrap()[0];
        assert_eq!(peers.verify(cert.as_ref(), now).unwrap(), "node-2");
        // A certificate of another federation with the same name does not verify.
        let foreign = &load_certs(&Layout::new(other.path()).node_cert("node-1")).unwrap()[0];
        assert!(peers.verify(foreign.as_ref(), now).is_err());
        // Nor does the server certificate (no client-auth usage), nor garbage.
        let server = &load_certs(&l.server_cert()).unwrap()[0];
        assert!(peers.verify(server.as_ref(), now).is_err());
        assert!(peers.verify(b"not a certificate", now).is_err());
        // Nor an expired one (far in the future).
        assert!(peers
            .verify(cert.as_ref(), now + 400 * 365 * 86_400)
            .is_err());
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn opts(nodes: &[&str]) -> KitOptions {
        KitOptions {
            sans: vec!["fl.example.org".into(), "127.0.0.1".into()],
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            days: 30,
            ca_days: 3650,
            server_addr: None,
            dp_mode: "central".into(),
            force: false,
        }
    }

    #[test]
    fn kits_hold_exactly_their_files_and_no_host_kit_holds_the_ca_key() {
        let dir = tempfile::tempdir().unwrap();
        create_kits(dir.path(), &opts(&["node-1", "node-2"])).unwrap();
        let kits = Kits::new(dir.path());
        assert_eq!(files(dir.path()), ["ca", "node-1", "node-2", "server"]);
        assert_eq!(files(kits.ca().dir()), ["ca.key", "ca.pem"]);
        assert_eq!(
            files(kits.server().dir()),
            ["ca.pem", "server.key", "server.pem", "server.toml"]
        );
        for n in ["node-1", "node-2"] {
            let kit = kits.node(n);
            assert_eq!(
                files(kit.dir()),
                [
                    "ca.pem",
                    &format!("{n}.key"),
                    &format!("{n}.pem"),
                    "run-node.sh"
                ]
            );
            assert!(!holds_ca_key(kit.dir()));
            let script = std::fs::read_to_string(kit.dir().join(NODE_SCRIPT)).unwrap();
            assert!(script.contains("--server fl.example.org:4433"), "{script}");
            assert!(script.contains(&format!("--name {n}")), "{script}");
            assert!(script.contains("--dp-mode central"), "{script}");
            let mode = std::fs::metadata(kit.node_key(n))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            // The kit is a working node layout: its TLS config builds.
            client_tls(&Credentials::node(&kit, n), b"x").unwrap();
        }
        assert!(holds_ca_key(kits.ca().dir()));
        assert!(!holds_ca_key(kits.server().dir()));
        server_tls(&Credentials::server(&kits.server()), b"x").unwrap();
        // Every host's CA certificate is the CA's.
        let ca = std::fs::read_to_string(kits.ca().ca_cert()).unwrap();
        for l in [kits.server(), kits.node("node-1")] {
            assert_eq!(std::fs::read_to_string(l.ca_cert()).unwrap(), ca);
        }
        // Nothing is overwritten without --force.
        assert!(matches!(
            create_kits(dir.path(), &opts(&["node-1"])),
            Err(CertError::Exists(_))
        ));
        // One more node from the reopened CA lands in its own kit.
        let fed = Federation::open(kits.ca().dir()).unwrap();
        fed.issue_node_to(
            &kits.node("node-3"),
            "node-3",
            Validity::days(1).unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(
            files(kits.node("node-3").dir()),
            ["ca.pem", "node-3.key", "node-3.pem"]
        );
    }

    #[test]
    fn certificates_expire_when_asked_and_show_says_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        create_kits(dir.path(), &opts(&["node-1"])).unwrap();
        let kits = Kits::new(dir.path());
        let now = std::time::SystemTime::now();
        let server = describe_file(&kits.server().server_cert()).unwrap();
        assert_eq!(
            server.role,
            Role::Server {
                sans: vec!["fl.example.org".into(), "127.0.0.1".into()]
            }
        );
        assert!(server
            .role
            .to_string()
            .starts_with("server certificate for fl.example.org"));
        let left = server.seconds_left(now);
        assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left}");
        let e = server.expiry(now);
        assert!(e.starts_with("expires 20") && e.contains(" days)"), "{e}");
        let node = describe_file(&kits.node("node-1").node_cert("node-1")).unwrap();
        assert_eq!(
            node.role,
            Role::Node {
                name: "node-1".into()
            }
        );
        let ca = describe_file(&kits.ca().ca_cert()).unwrap();
        assert_eq!(ca.role, Role::Ca);
        assert!(ca.seconds_left(now) > 3649 * 86_400);
        // Not year 4096 any more, and a validity is checked.
        assert!(Validity::days(0).is_err() && Validity::days(-5).is_err());
        let t = time::OffsetDateTime::now_utc();
        let past =
            Validity::between(t - time::Duration::days(10), t - time::Duration::days(3)).unwrap();
        let fed = Federation::open(kits.ca().dir()).unwrap();
        fed.issue_node_to(&kits.node("old"), "old", past, false)
            .unwrap();
        let old = describe_file(&kits.node("old").node_cert("old")).unwrap();
        assert!(old.seconds_left(now) < 0);
        assert!(
            old.expiry(now).starts_with("EXPIRED on "),
            "{}",
            old.expiry(now)
        );
        assert!(
            old.expiry(now).contains("(3 days ago)"),
            "{}",
            old.expiry(now)
        );
    }

    #[test]
    fn a_signed_request_keeps_the_key_on_the_node_and_renewal_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        create_kits(dir.path(), &opts(&[])).unwrap();
        let kits = Kits::new(dir.path());
        let node_dir = dir.path().join("on-the-node");
        let csr = request(&node_dir, "hospital-a", false, false).unwrap();
        let key_before = std::fs::read(node_dir.join("hospital-a.key")).unwrap();
        let fed = Federation::open(kits.ca().dir()).unwrap();
        let (name, pem) = fed.sign_request(&csr, Validity::days(10).unwrap()).unwrap();
        assert_eq!(name, "hospital-a");
        let cert_path = node_dir.join("hospital-a.pem");
        std::fs::write(&cert_path, &pem).unwrap();
        std::fs::copy(kits.ca().ca_cert(), node_dir.join("ca.pem")).unwrap();
        let layout = Layout::new(&node_dir);
        client_tls(&Credentials::node(&layout, "hospital-a"), b"x").unwrap();
        let info = describe_file(&cert_path).unwrap();
        assert_eq!(
            info.role,
            Role::Node {
                name: "hospital-a".into()
            }
        );
        // The certificate carries the node's own key.
        let key = KeyPair::from_pem(&String::from_utf8(key_before.clone()).unwrap()).unwrap();
        let spki_hex: String = Sha256::digest(key.public_key_der())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(info.key_fingerprint, spki_hex);
        // Renewal: a new validity, the same key, the same name.
        let renewed = fed.renew(&cert_path, Validity::days(400).unwrap()).unwrap();
        std::fs::write(&cert_path, &renewed).unwrap();
        let after = describe_file(&cert_path).unwrap();
        assert_eq!(after.key_fingerprint, info.key_fingerprint);
        assert_eq!(after.role, info.role);
        assert!(after.not_after > info.not_after + 300 * 86_400);
        client_tls(&Credentials::node(&layout, "hospital-a"), b"x").unwrap();
        // A renewal request from the same key signs to the same identity too.
        let csr2 = request(&node_dir, "hospital-a", true, false).unwrap();
        assert_eq!(
            std::fs::read(node_dir.join("hospital-a.key")).unwrap(),
            key_before
        );
        let (_, pem2) = fed
            .sign_request(&csr2, Validity::days(10).unwrap())
            .unwrap();
        let c2 = CertificateDer::from_pem_slice(pem2.as_bytes()).unwrap();
        assert_eq!(key_fingerprint(&c2).unwrap(), info.key_fingerprint);
        // A server certificate renews as a server certificate.
        let s = fed
            .renew(&kits.server().server_cert(), Validity::days(5).unwrap())
            .unwrap();
        let c3 = CertificateDer::from_pem_slice(s.as_bytes()).unwrap();
        assert!(matches!(describe(&c3).unwrap().role, Role::Server { .. }));
        // Requests with unusable names or garbage are refused.
        assert!(request(&node_dir, "../evil", false, false).is_err());
        std::fs::write(node_dir.join("junk.csr"), "not a request").unwrap();
        assert!(matches!(
            fed.sign_request(&node_dir.join("junk.csr"), Validity::days(1).unwrap()),
            Err(CertError::Request { .. })
        ));
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "server");
        let k = KeyPair::generate().unwrap();
        std::fs::write(
            node_dir.join("bad.csr"),
            params.serialize_request(&k).unwrap().pem().unwrap(),
        )
        .unwrap();
        assert!(matches!(
            fed.sign_request(&node_dir.join("bad.csr"), Validity::days(1).unwrap()),
            Err(CertError::NodeName(_))
        ));
    }

    #[test]
    fn bad_node_names_are_refused() {
        for bad in ["", "../x", "a b", "ca", "server", ".hidden"] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
        assert!(validate_node_name("node-7.eu_west").is_ok());
    }
}

/// QUIC endpoints over the mutual-TLS configs, with transport settings suited to FL:
/// keep-alives well inside the idle timeout so that minutes of local training never look
/// like a dead peer, flow-control windows sized from the largest legitimate message (see
/// [`quic::Windows`]), and a cap on the streams a peer may open.
///
/// Memory a peer can make this side hold is bounded by the connection receive window (data
/// sent but not yet read). The server starts every connection with a window that fits the
/// hello and one client-opened stream, and opens it to [`quic::Windows::for_messages`] only
/// after admission ([`quic::open_windows`]); the node does the same after the welcome.
pub mod quic {
    use super::{client_tls, server_tls, CertError, Credentials};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    /// Flow-control windows of a connection, in bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Windows {
        /// What the peer may send on one stream beyond what this side has read.
        pub stream: u64,
        /// What the peer may send on all streams together beyond what this side has read:
        /// the most memory the peer's unread data can take.
        pub connection: u64,
        /// Unacknowledged data this side buffers for sending on one connection.
        pub send: u64,
    }

    impl Windows {
        /// For messages of at most `max_message` bytes: one stream may carry a whole
        /// message, the connection two (an answer and another request's in flight), and
        /// as much may be in flight outbound. Nothing legitimate needs more.
        pub fn for_messages(max_message: u64) -> Self {
            let two = max_message.saturating_mul(2);
            Self {
                stream: max_message,
                connection: two,
                send: two,
            }
        }

        /// The same with the connection window lowered to `connection` bytes (the phase
        /// before the peer is admitted, when only a hello is expected).
        pub fn with_connection(self, connection: u64) -> Self {
            Self { connection, ..self }
        }
    }

    /// A window size as a QUIC variable-length integer (saturating at the largest one).
    pub fn varint(bytes: u64) -> quinn::VarInt {
        quinn::VarInt::from_u64(bytes).unwrap_or(quinn::VarInt::MAX)
    }

    /// Transport settings shared by server and clients: `peer_bidi_streams` streams the
    /// peer may open at once, no unidirectional streams, and the given windows.
    pub fn transport(
        idle_timeout: Duration,
        peer_bidi_streams: u32,
        windows: Windows,
    ) -> Result<quinn::TransportConfig, CertError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(idle_timeout)
            .map_err(|e| CertError::Tls(e.to_string()))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval(Some(idle_timeout / 3));
        t.max_concurrent_bidi_streams(peer_bidi_streams.into());
        t.max_concurrent_uni_streams(0u8.into());
        // dpfl sends no datagrams: accept none, or a peer could park a default 1.25 MB
        // of unread datagrams per connection, past every stream window.
        t.datagram_receive_buffer_size(None);
        t.stream_receive_window(varint(windows.stream));
        t.receive_window(varint(windows.connection));
        t.send_window(windows.send);
        Ok(t)
    }

    /// Opens an established connection's windows to `windows` (after admission or
    /// welcome). The stream window is a transport parameter fixed at the handshake; the
    /// connection and send windows change here.
    pub fn open_windows(conn: &quinn::Connection, windows: Windows) {
        conn.set_receive_window(varint(windows.connection));
        conn.set_send_window(windows.send);
    }

    /// A server endpoint bound to `listen` that requires client certificates from the CA.
    /// A client may open one bidirectional stream (the hello) and send at most
    /// `windows.connection` bytes until the server opens its windows ([`open_windows`]).
    pub fn server_endpoint(
        creds: &Credentials,
        alpn: &[u8],
        listen: SocketAddr,
        idle_timeout: Duration,
        windows: Windows,
    ) -> Result<quinn::Endpoint, CertError> {
        let tls = server_tls(creds, alpn)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| CertError::Tls(e.to_string()))?;
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        sc.transport_config(Arc::new(transport(idle_timeout, 1, windows)?));
        quinn::Endpoint::server(sc, listen)
            .map_err(|e| CertError::Tls(format!("bind {listen}: {e}")))
    }

    /// A client endpoint presenting the node certificate and pinning the CA, with windows
    /// for messages of up to 64 MiB (tools and tests; nodes use [`client_endpoint_with`]).
    pub fn client_endpoint(
        creds: &Credentials,
        alpn: &[u8],
        idle_timeout: Duration,
    ) -> Result<quinn::Endpoint, CertError> {
        client_endpoint_with(creds, alpn, idle_timeout, Windows::for_messages(64 << 20))
    }

    /// A client endpoint with the given windows (the server opens one stream per request,
    /// up to 8 at once).
    pub fn client_endpoint_with(
        creds: &Credentials,
        alpn: &[u8],
        idle_timeout: Duration,
        windows: Windows,
    ) -> Result<quinn::Endpoint, CertError> {
        let tls = client_tls(creds, alpn)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| CertError::Tls(e.to_string()))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
        cc.transport_config(Arc::new(transport(idle_timeout, 8, windows)?));
        let bind: SocketAddr = "0.0.0.0:0"
            .parse()
            .map_err(|e| CertError::Tls(format!("{e}")))?;
        let mut ep = quinn::Endpoint::client(bind)
            .map_err(|e| CertError::Tls(format!("client socket: {e}")))?;
        ep.set_default_client_config(cc);
        Ok(ep)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn windows_follow_the_message_size() {
            let w = Windows::for_messages(1000);
            assert_eq!((w.stream, w.connection, w.send), (1000, 2000, 2000));
            let pre = w.with_connection(70);
            assert_eq!((pre.stream, pre.connection, pre.send), (1000, 70, 2000));
            assert_eq!(varint(u64::MAX), quinn::VarInt::MAX);
            transport(Duration::from_secs(9), 1, Windows::for_messages(u64::MAX)).unwrap();
        }
    }
}

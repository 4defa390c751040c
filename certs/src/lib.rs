//! Certificates for a dpfl federation and the TLS configurations built from them.
//!
//! - [`Federation::create`] makes a federation CA, a server certificate (SANs configurable)
//!   and per-node client certificates with distinct names, written as PEM; private keys get
//!   mode 0600 and nothing is overwritten unless asked.
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
    /// Creates a new CA in `dir` (fails if its files exist, unless `force`).
    pub fn create(dir: impl Into<PathBuf>, force: bool) -> Result<Self, CertError> {
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

    /// Issues the server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, sans: &[String], force: bool) -> Result<(), CertError> {
        let key = KeyPair::generate()?;
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
            .push(DnType::CommonName, "dpfl aggregation server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        write_file(&self.layout.server_cert(), &cert.pem(), false, force)?;
        write_file(&self.layout.server_key(), &key.serialize_pem(), true, force)
    }

    /// Issues a client certificate for node `name` (its CN and DNS SAN).
    pub fn issue_node(&self, name: &str, force: bool) -> Result<(), CertError> {
        validate_node_name(name)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        write_file(&self.layout.node_cert(name), &cert.pem(), false, force)?;
        write_file(
            &self.layout.node_key(name),
            &key.serialize_pem(),
            true,
            force,
        )
    }
}

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

//! Signatures with the nodes' certificate keys: what stops a server from substituting a
//! node's advertised keys or telling nodes different survivor sets.
//!
//! The protocol only needs [`Signer`] (a node signs with its own key) and [`Verifier`] (a
//! node checks a peer's signature given the peer's name). [`EcdsaP256Signer`] and
//! [`EcdsaP256Verifier`] implement them with `ring`'s ECDSA P-256 / SHA-256 (fixed 64-byte
//! signatures), the algorithm rcgen uses by default for dpfl's node certificates: the
//! signer loads the node's PKCS#8 key (the `<node>.key` file), the verifier takes each
//! peer's public key from its certificate's SubjectPublicKeyInfo.
//!
//! The verifier does **not** check that a certificate chains to the federation CA or that
//! its name is the node's: the caller does that (with `dpfl-certs`, as for TLS) before
//! handing the certificate over.

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use std::collections::HashMap;

/// Signature errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No key is known for the signer.
    #[error("no public key known for node {0:?}")]
    UnknownSigner(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Invalid,
    /// A key could not be loaded.
    #[error("unusable key: {0}")]
    Key(String),
    /// A certificate could not be parsed or holds no P-256 key.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Signing failed.
    #[error("signing failed")]
    Signing,
}

/// Signs protocol messages with the node's identity key.
pub trait Signer {
    /// A signature over `message`.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignatureError>;
}

/// Verifies a named node's signatures.
///
/// Object safe so that the server can hold one behind a `Box<dyn Verifier>`.
pub trait Verifier {
    /// `Ok` if `signature` is `node`'s signature over `message`.
    fn verify(&self, node: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError>;
}

impl<T: Signer + ?Sized> Signer for &T {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignatureError> {
        (**self).sign(message)
    }
}

impl<T: Verifier + ?Sized> Verifier for &T {
    fn verify(&self, node: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        (**self).verify(node, message, signature)
    }
}

impl<T: Verifier + ?Sized> Verifier for std::sync::Arc<T> {
    fn verify(&self, node: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        (**self).verify(node, message, signature)
    }
}

/// ECDSA P-256 / SHA-256 signer over a PKCS#8 key. ECDSA needs randomness for its nonce:
/// ring draws it from the OS (hedged with the message digest), not from the protocol's RNG.
pub struct EcdsaP256Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for EcdsaP256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcdsaP256Signer").finish_non_exhaustive()
    }
}

impl EcdsaP256Signer {
    /// Loads an unencrypted PKCS#8 P-256 key (DER), such as rcgen's
    /// `KeyPair::serialize_der()` or the DER inside the node's `.key` PEM file.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SignatureError> {
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                .map_err(|e| SignatureError::Key(e.to_string()))?;
        Ok(Self { key, rng })
    }

    /// A fresh key (tests and simulations); returns the signer and its PKCS#8 DER.
    pub fn generate() -> Result<(Self, Vec<u8>), SignatureError> {
        let rng = SystemRandom::new();
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| SignatureError::Signing)?;
        let der = doc.as_ref().to_vec();
        Ok((Self::from_pkcs8(&der)?, der))
    }

    /// The public key as an uncompressed SEC1 point (what [`EcdsaP256Verifier`] takes).
    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }
}

impl Signer for EcdsaP256Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignatureError> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SignatureError::Signing)
    }
}

/// ECDSA P-256 / SHA-256 verifier over a table of node public keys.
#[derive(Debug, Clone, Default)]
pub struct EcdsaP256Verifier {
    keys: HashMap<String, Vec<u8>>,
}

/// OID 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID 1.2.840.10045.3.1.7 (prime256v1).
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// The P-256 public key (uncompressed SEC1 point) in a DER certificate's
/// SubjectPublicKeyInfo.
pub fn p256_public_key_from_certificate(der: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SignatureError::Certificate(e.to_string()))?;
    let spki = &cert.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY {
        return Err(SignatureError::Certificate(format!(
            "key algorithm {} is not id-ecPublicKey",
            spki.algorithm.algorithm.to_id_string()
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if curve.as_deref() != Some(OID_P256) {
        return Err(SignatureError::Certificate(format!(
            "curve {curve:?} is not P-256"
        )));
    }
    let point = spki.subject_public_key.data.to_vec();
    if point.len() != 65 || point[0] != 4 {
        return Err(SignatureError::Certificate(
            "public key is not an uncompressed P-256 point".into(),
        ));
    }
    Ok(point)
}

impl EcdsaP256Verifier {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `node`'s public key (uncompressed SEC1 point, 65 bytes).
    pub fn insert_public_key(&mut self, node: &str, key: &[u8]) -> Result<(), SignatureError> {
        if key.len() != 65 || key[0] != 4 {
            return Err(SignatureError::Key(
                "expected a 65-byte uncompressed P-256 point".into(),
            ));
        }
        self.keys.insert(node.to_string(), key.to_vec());
        Ok(())
    }

    /// Records the key of `node`'s certificate (DER). The caller has checked the chain and
    /// that the certificate names `node`.
    pub fn insert_certificate(&mut self, node: &str, der: &[u8]) -> Result<(), SignatureError> {
        let key = p256_public_key_from_certificate(der)?;
        self.insert_public_key(node, &key)
    }

    /// Number of known nodes.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Verifier for EcdsaP256Verifier {
    fn verify(&self, node: &str, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let key = self
            .keys
            .get(node)
            .ok_or_else(|| SignatureError::UnknownSigner(node.to_string()))?;
        UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key)
            .verify(message, signature)
            .map_err(|_| SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcgen_node_certificate_keys_sign_and_verify() {
        // dpfl-certs makes node keys with rcgen's default algorithm.
        let key = rcgen::KeyPair::generate().unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let mut params = rcgen::CertificateParams::new(vec!["node-1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "node-1");
        let cert = params.self_signed(&key).unwrap();

        let signer = EcdsaP256Signer::from_pkcs8(&key.serialize_der()).unwrap();
        let mut verifier = EcdsaP256Verifier::new();
        verifier.insert_certificate("node-1", cert.der()).unwrap();
        assert_eq!(
            p256_public_key_from_certificate(cert.der()).unwrap(),
            signer.public_key()
        );

        let sig = signer.sign(b"hello").unwrap();
        assert_eq!(sig.len(), 64);
        verifier.verify("node-1", b"hello", &sig).unwrap();
        assert_eq!(
            verifier.verify("node-1", b"hellp", &sig),
            Err(SignatureError::Invalid)
        );
        assert!(matches!(
            verifier.verify("node-2", b"hello", &sig),
            Err(SignatureError::UnknownSigner(_))
        ));
        assert_eq!(
            verifier.verify("node-1", b"hello", &sig[..63]),
            Err(SignatureError::Invalid)
        );
    }

    #[test]
    fn non_p256_certificates_and_garbage_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            p256_public_key_from_certificate(cert.der()),
            Err(SignatureError::Certificate(_))
        ));
        assert!(matches!(
            p256_public_key_from_certificate(b"not a certificate"),
            Err(SignatureError::Certificate(_))
        ));
        assert!(EcdsaP256Signer::from_pkcs8(b"junk").is_err());
        let mut v = EcdsaP256Verifier::new();
        assert!(v.insert_public_key("a", &[4; 33]).is_err());
    }
}

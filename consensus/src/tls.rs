//! The mesh's cluster CA and node certificates (rcgen), and the rustls configurations built
//! from them.
//!
//! ```text
//!  first hub:  CA key + self-signed CA cert --> its own node cert (SAN node-<id>.hubmesh)
//!  joiner:     Ed25519 key --JoinRequest(public key)--> a member signs a node cert with the CA
//!  every call: client verifies the server's SAN = node-<target>.hubmesh and the CA chain;
//!              server verifies the client's CA chain (joiners without a cert may only join)
//! ```
//! The CA key is replicated in the cluster state so that any member can admit a hub; whoever can
//! read a voter's data dir can read it (as with K3s' datastore), which the docs say.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SignatureAlgorithm, PKCS_ED25519,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// ALPN of the mesh protocol.
pub const ALPN: &[u8] = b"hubmesh/1";
/// Server name used by a joiner, whose verifier pins the CA instead of checking a name.
pub(crate) const JOIN_SERVER_NAME: &str = "join.hubmesh";

/// Why certificate work failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("a public key must be 32 bytes of Ed25519")]
    BadPublicKey,
    #[error("verifier: {0}")]
    Verifier(String),
}

/// The DNS name in a node's certificate.
pub fn server_name(node_id: u64) -> String {
    format!("node-{node_id}.hubmesh")
}

/// SHA-256 of a DER certificate: how tokens pin the CA and how members are recognised.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Whether `cert_der` (a certificate the handshake already verified against the cluster CA) names
/// hub `node_id`: the CA signs each hub's key under that hub's name only.
pub fn certifies(cert_der: &[u8], node_id: u64) -> bool {
    let der = CertificateDer::from(cert_der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else { return false };
    let Ok(name) = ServerName::try_from(server_name(node_id)) else { return false };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "hubmesh cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    p
}

/// The cluster CA: certificate and PKCS#8 key, both DER.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaMaterial {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CaMaterial({})", hex::encode(&fingerprint(&self.cert_der)[..6]))
    }
}

impl CaMaterial {
    /// Creates a new CA (the first hub of a mesh does this once).
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let cert = ca_params().self_signed(&key)?;
        Ok(Self { cert_der: cert.der().to_vec(), key_der: key.serialize_der() })
    }

    /// Signs a node certificate for `public_key` (raw Ed25519) as `node_id`.
    pub fn issue(&self, node_id: u64, public_key: &[u8]) -> Result<Vec<u8>, TlsError> {
        if public_key.len() != 32 {
            return Err(TlsError::BadPublicKey);
        }
        let key = KeyPair::try_from(self.key_der.as_slice())?;
        let issuer = Issuer::new(ca_params(), key);
        let name = server_name(node_id);
        let mut p = CertificateParams::new(vec![name.clone()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&RawEd25519(public_key), &issuer)?;
        Ok(cert.der().to_vec())
    }
}

struct RawEd25519<'a>(&'a [u8]);

impl PublicKeyData for RawEd25519<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// A hub's own key pair (Ed25519, PKCS#8 DER).
#[derive(Clone)]
pub struct NodeKey {
    pkcs8: Vec<u8>,
    public: Vec<u8>,
}

impl NodeKey {
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        Ok(Self { public: key.public_key_raw().to_vec(), pkcs8: key.serialize_der() })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TlsError> {
        let key = KeyPair::try_from(der)?;
        Ok(Self { public: key.public_key_raw().to_vec(), pkcs8: der.to_vec() })
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    fn private_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pkcs8.clone()))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

/// A member's identity: its certificate chain and key.
#[derive(Clone)]
pub struct Identity {
    pub ca_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub key: NodeKey,
}

impl Identity {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(self.cert_der.clone()), CertificateDer::from(self.ca_der.clone())]
    }

    /// Server side: present our certificate; accept clients with a CA-signed certificate, and
    /// clients without one (they may only use the join handler).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&self.ca_der)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.key.private_der())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side between members: trust the CA, present our certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(&self.ca_der)?)
            .with_client_auth_cert(self.chain(), self.key.private_der())?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

/// Client side of a joiner: no certificate yet; the server must present a chain ending in the CA
/// whose fingerprint the token carries (checked before the secret is sent).
pub fn join_client_config(ca_fingerprint: [u8; 32]) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCa { fingerprint: ca_fingerprint, provider: provider() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| rustls::Error::General("the hub's CA does not match the token's fingerprint".into()))?;
        // Any member may answer a join and its name is its own, so check the chain and usage
        // only (webpki without a name check); the CA is the pinned one.
        let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| rustls::Error::General(e.to_string()))?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &[anchor],
            &[],
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("the hub's certificate is not signed by the pinned CA: {e}")))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_certifies_only_its_own_hub() {
        let ca = CaMaterial::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = ca.issue(7, key.public_key()).unwrap();
        assert!(certifies(&cert, 7));
        assert!(!certifies(&cert, 8));
        assert!(!certifies(&cert, 77));
        assert!(!certifies(b"garbage", 7));
    }

    #[test]
    fn issued_certificates_carry_the_node_name() {
        let ca = CaMaterial::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = ca.issue(42, key.public_key()).unwrap();
        assert!(matches!(ca.issue(1, b"short"), Err(TlsError::BadPublicKey)));
        let id = Identity { ca_der: ca.cert_der.clone(), cert_der: cert, key };
        id.server_config().unwrap();
        id.client_config().unwrap();
        join_client_config(fingerprint(&ca.cert_der)).unwrap();
    }
}

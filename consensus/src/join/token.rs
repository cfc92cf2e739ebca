//! The join token a user passes to `hubmesh up --join`:
//!
//! ```text
//!  HM1.<CA sha256 hex>.<token id>.<secret hex, 128 bits>.<member mesh address>
//! ```

use std::net::SocketAddr;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Why a token does not parse.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("not a hubmesh join token (expected HM1.<ca>.<id>.<secret>.<address>)")]
    Format,
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_fingerprint: [u8; 32],
    pub id: String,
    pub secret: Vec<u8>,
    pub member: SocketAddr,
}

/// Hex SHA-256 of a secret, as the state stores it.
pub fn hash_secret(secret: &[u8]) -> String {
    hex::encode(Sha256::digest(secret))
}

impl JoinToken {
    /// A new token id and secret.
    pub fn fresh(ca_fingerprint: [u8; 32], member: SocketAddr) -> Self {
        let mut rng = rand::rng();
        let mut id = [0u8; 4];
        let mut secret = vec![0u8; 16];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        Self { ca_fingerprint, id: hex::encode(id), secret, member }
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let mut parts = s.trim().splitn(5, '.');
        let (Some("HM1"), Some(ca), Some(id), Some(secret), Some(addr)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Format);
        };
        let mut ca_fingerprint = [0u8; 32];
        hex::decode_to_slice(ca, &mut ca_fingerprint).map_err(|_| TokenError::Format)?;
        let secret = hex::decode(secret).map_err(|_| TokenError::Format)?;
        if secret.len() < 16 || id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Format);
        }
        let member = addr.parse().map_err(|_| TokenError::Format)?;
        Ok(Self { ca_fingerprint, id: id.to_owned(), secret, member })
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HM1.{}.{}.{}.{}", hex::encode(self.ca_fingerprint), self.id, hex::encode(&self.secret), self.member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let t = JoinToken::fresh([3; 32], "127.0.0.1:7071".parse().unwrap());
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        let v6 = JoinToken { member: "[::1]:7071".parse().unwrap(), ..t.clone() };
        assert_eq!(JoinToken::parse(&v6.to_string()).unwrap(), v6);
        for bad in ["", "HM1", "HM2.aa.bb.cc.127.0.0.1:1", "HM1.zz.00.00112233445566778899aabbccddeeff.127.0.0.1:1"] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
        let short = format!("HM1.{}.ab.0011.127.0.0.1:1", hex::encode([0u8; 32]));
        assert!(JoinToken::parse(&short).is_err());
    }
}

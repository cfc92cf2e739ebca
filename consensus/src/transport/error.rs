//! The errors of the mesh endpoint. A handler refuses with a [`Refusal`]: a wire
//! [`pb::ErrorCode`], a message for people and a [`pb::ErrorHint`]; the caller gets the same
//! value back as [`RpcError::Remote`] and decides on the code and the hint, never on the text.

use std::net::SocketAddr;

use hubmesh_proto::pb;

use crate::tls::TlsError;

/// A handler's refusal, as it travels to the caller.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// What kind of failure it is: the caller's decisions rest on this.
    pub code: pb::ErrorCode,
    /// For people.
    pub message: String,
    /// Values the code refers to (the leader, a limit); zero where they do not apply.
    pub hint: pb::ErrorHint,
}

impl Refusal {
    /// A refusal without hints.
    pub fn new(code: pb::ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), hint: pb::ErrorHint::default() }
    }

    /// The request does not decode or is not acceptable.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(pb::ErrorCode::BadRequest, message)
    }

    /// This hub failed to serve it — perhaps after running it (an answer that could not be sent
    /// back), so the outcome is unknown to the caller.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(pb::ErrorCode::Internal, message)
    }

    /// Adds hints.
    pub fn with_hint(mut self, hint: pb::ErrorHint) -> Self {
        self.hint = hint;
        self
    }

    /// The response that carries it.
    pub(crate) fn into_response(self) -> pb::MeshResponse {
        pb::MeshResponse {
            code: self.code as i32,
            message: self.message,
            payload: Vec::new(),
            hint: Some(self.hint),
            keeps_streams: false,
        }
    }

    /// The refusal a response carries, if it is one. An unknown code (a newer peer) reads as
    /// `Internal`.
    pub(crate) fn from_response(resp: &mut pb::MeshResponse) -> Option<Self> {
        if resp.code == pb::ErrorCode::Unspecified as i32 {
            return None;
        }
        Some(Self {
            code: pb::ErrorCode::try_from(resp.code).unwrap_or(pb::ErrorCode::Internal),
            message: std::mem::take(&mut resp.message),
            hint: resp.hint.take().unwrap_or_default(),
        })
    }
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached (no address, connection refused or lost).
    #[error("hub {0} is unreachable: {1}")]
    Unreachable(u64, String),
    /// No answer within the deadline; the outcome is unknown.
    #[error("the call timed out")]
    Timeout,
    /// The caller gave up before the request's end was sent: the peer never had all of it, so
    /// it cannot have acted on it.
    #[error("hub {0} did not receive the request")]
    NotDelivered(u64),
    /// The peer answered with a refusal.
    #[error(transparent)]
    Remote(#[from] Refusal),
    /// The peer's answer did not decode, or the request could not be encoded.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl RpcError {
    /// The peer's refusal code, if the peer refused.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            Self::Remote(r) => Some(r.code),
            _ => None,
        }
    }
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding the mesh endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("QUIC configuration: {0}")]
    Config(String),
}

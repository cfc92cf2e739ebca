//! Conversions between the node's typed errors and the mesh's wire refusals: an
//! [`InvokeError`] travels as a [`Refusal`] (code, the variant's text, hints) and comes back as
//! the same variant on the forwarding hub, so no decision there rests on an error's text.

use hubmesh_consensus::transport::Refusal;
use hubmesh_proto::pb;

use crate::executor::InvokeError;

impl From<InvokeError> for Refusal {
    fn from(e: InvokeError) -> Self {
        use pb::ErrorCode as C;
        let hint = |size: u64, limit: u64| pb::ErrorHint { size, limit, ..Default::default() };
        let (code, message, hint) = match e {
            InvokeError::NotFound(name) => (C::NotFound, name, hint(0, 0)),
            InvokeError::InputTooLarge { size, limit } => (C::PayloadTooLarge, String::new(), hint(size, limit)),
            InvokeError::OutputTooLarge { limit } => (C::OutputTooLarge, String::new(), hint(0, limit)),
            InvokeError::DeadlineExceeded { timeout_ms } => (C::DeadlineExceeded, String::new(), hint(0, timeout_ms)),
            InvokeError::MemoryLimit { limit } => (C::MemoryLimit, String::new(), hint(0, limit)),
            InvokeError::Trapped(m) => (C::TaskTrapped, m, hint(0, 0)),
            InvokeError::QueueFull { limit } => (C::QueueFull, String::new(), hint(0, limit.into())),
            InvokeError::Unavailable(m) => (C::Unavailable, m, hint(0, 0)),
            // Only a source relays a moved call; a peer hears that it may try again.
            e @ InvokeError::Moved { .. } => (C::Unavailable, e.to_string(), hint(0, 0)),
            InvokeError::OutcomeUnknown(m) => (C::OutcomeUnknown, m, hint(0, 0)),
        };
        Self { code, message, hint }
    }
}

impl From<Refusal> for InvokeError {
    /// A refusal before the call ran (membership, a bad request) reads as `Unavailable`: the
    /// router then tries another host or waits. `Internal` (the handler or its answer failed,
    /// after the call may have run) and a code this hub does not know read as `OutcomeUnknown`.
    fn from(r: Refusal) -> Self {
        use pb::ErrorCode as C;
        let pb::ErrorHint { size, limit, .. } = r.hint;
        match r.code {
            C::NotFound => Self::NotFound(r.message),
            C::PayloadTooLarge => Self::InputTooLarge { size, limit },
            C::OutputTooLarge => Self::OutputTooLarge { limit },
            C::DeadlineExceeded => Self::DeadlineExceeded { timeout_ms: limit },
            C::MemoryLimit => Self::MemoryLimit { limit },
            C::TaskTrapped => Self::Trapped(r.message),
            C::QueueFull => Self::QueueFull { limit: u32::try_from(limit).unwrap_or(u32::MAX) },
            C::OutcomeUnknown | C::Internal | C::Unspecified => Self::OutcomeUnknown(r.message),
            _ => Self::Unavailable(r.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_invoke_error_survives_the_wire() {
        let all = [
            InvokeError::NotFound("echo".into()),
            InvokeError::InputTooLarge { size: 2048, limit: 1024 },
            InvokeError::OutputTooLarge { limit: 77 },
            InvokeError::DeadlineExceeded { timeout_ms: 250 },
            InvokeError::MemoryLimit { limit: 1 << 20 },
            InvokeError::Trapped("unreachable executed".into()),
            InvokeError::QueueFull { limit: 16 },
            InvokeError::Unavailable("stopping".into()),
            InvokeError::OutcomeUnknown("cut short".into()),
        ];
        for e in all {
            let refusal = Refusal::from(e.clone());
            assert_ne!(refusal.code, pb::ErrorCode::Unspecified, "{e:?}");
            assert_eq!(InvokeError::from(refusal), e);
        }
    }

    #[test]
    fn a_refusal_before_running_reads_as_unavailable_a_failure_after_as_unknown() {
        let r = Refusal::new(pb::ErrorCode::Unauthorized, "not a member");
        assert_eq!(InvokeError::from(r), InvokeError::Unavailable("not a member".into()));
        let r = Refusal::new(pb::ErrorCode::Internal, "disk full");
        assert_eq!(InvokeError::from(r), InvokeError::OutcomeUnknown("disk full".into()));
        let r = Refusal::new(pb::ErrorCode::Unspecified, "from a newer release");
        assert_eq!(InvokeError::from(r), InvokeError::OutcomeUnknown("from a newer release".into()));
    }
}

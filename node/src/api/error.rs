//! The one place where errors become HTTP status codes and the `{code, message, hint}` body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hubmesh_consensus::ProposeError;
use hubmesh_proto::api::ErrorBody;

use crate::deploy::DeployError;
use crate::executor::InvokeError;
use crate::invoke::RouteError;
use crate::migration::MigrateError;

/// An error answer of the API.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { code: code.into(), message: message.into(), hint: None } }
    }

    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.body.hint = Some(hint.into());
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", what).hint("`hubmesh task list` shows the tasks")
    }

    pub(crate) fn no_quorum() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_quorum",
            "this hub cannot reach enough of the mesh to change it; nothing was changed",
        )
        .hint("`hubmesh node list` shows which hubs are down; bring a majority of voters back")
    }

    /// A name this hub does not know, and the leader could not be asked whether it exists.
    pub(crate) fn unconfirmed(name: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("this hub has no task named {name:?} and could not confirm with the leader that none exists"),
        )
        .hint("retry in a moment; `hubmesh node list` shows whether a leader is elected")
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
            .hint("`hubmesh api-token list` shows each token's scope; an admin token may do everything")
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong API token")
            .hint("send `Authorization: Bearer <token>`: a token from `hubmesh api-token create`, or any hub's DATA_DIR/admin.token (HUBMESH_TOKEN or --token-file for the CLI)")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("hubmesh_api_errors_total", "code" => self.body.code.clone()).increment(1);
        // States that pass by themselves (no quorum, an election, a task starting); not, say, a
        // compiler of another build, which waits for an operator.
        let passing = matches!(self.body.code.as_str(), "no_quorum" | "not_leader" | "unavailable");
        let mut resp = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if passing {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Rejected(r) => Self::new(StatusCode::CONFLICT, "rejected", r.to_string()),
            ProposeError::NotLeader { leader } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "not_leader", e.to_string()).hint(match leader {
                    Some(l) => format!("hub {l} leads; retry there"),
                    None => "no leader is known; the mesh may have lost its quorum".into(),
                })
            }
            ProposeError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", e.to_string())
                .hint("check with `hubmesh task list` before retrying"),
            ProposeError::Unavailable(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let msg = e.to_string();
        match e {
            DeployError::BadRequest(_) => Self::bad_request(msg),
            DeployError::InvalidModule(crate::executor::PrepareError::Compiler(_)) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "compiler_failed", msg)
                    .hint("the hub's compiler process failed (its log says why); nothing was changed, try again")
            }
            DeployError::InvalidModule(crate::executor::PrepareError::CompilerBuild(_)) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "compiler_mismatch", msg).hint(
                    "the hub's compiler program (hubmesh-compile) is of another build: restart the hub after an \
                     upgrade, else install the two together; nothing was changed",
                )
            }
            DeployError::InvalidModule(_) => Self::new(StatusCode::BAD_REQUEST, "invalid_module", msg)
                .hint("see docs/task-abi.md for what a task module must export and may import"),
            DeployError::TooLarge { .. } => Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", msg),
            DeployError::Exists(_) => Self::new(StatusCode::CONFLICT, "task_exists", msg)
                .hint("deploy with --update (HTTP PUT) to publish a new version"),
            DeployError::NotFound(_) => Self::not_found(msg),
            DeployError::Propose(p) => p.into(),
            DeployError::NoQuorum => Self::no_quorum(),
            DeployError::Storage(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg),
        }
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        let msg = e.to_string();
        let (status, code) = match e {
            InvokeError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            InvokeError::InputTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            InvokeError::OutputTooLarge { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "output_too_large"),
            InvokeError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
            InvokeError::MemoryLimit { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "memory_limit"),
            InvokeError::Trapped(_) => (StatusCode::UNPROCESSABLE_ENTITY, "task_trapped"),
            InvokeError::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            InvokeError::Unavailable(_) | InvokeError::Moved { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            InvokeError::OutcomeUnknown(_) => (StatusCode::GATEWAY_TIMEOUT, "outcome_unknown"),
        };
        Self::new(status, code, msg)
    }
}

impl From<MigrateError> for ApiError {
    fn from(e: MigrateError) -> Self {
        let msg = e.to_string();
        match e {
            MigrateError::NotFound(_) => Self::not_found(msg),
            MigrateError::NoTarget(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "no_target", msg)
                .hint("`hubmesh node list` shows which hubs are up, their labels and free slots"),
            MigrateError::InProgress(_) => Self::new(StatusCode::CONFLICT, "migration_in_progress", msg)
                .hint("wait for it to end (`hubmesh task show`), then retry"),
            MigrateError::NotNow(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg),
            MigrateError::Aborted(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "migration_aborted", msg)
                .hint("the task runs where it ran; a retry starts over from its last checkpoint"),
            MigrateError::Unknown(_) => Self::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", msg)
                .hint("`hubmesh task show NAME` says where the task runs now"),
            MigrateError::Propose(p) => p.into(),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::NotFound(_) => Self::not_found(msg),
            RouteError::NotReady(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg),
            RouteError::NoQuorum(_) => Self::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", msg)
                .hint("call another hub, or retry when this one is back in the mesh (`hubmesh node list` shows which hubs are down)"),
            RouteError::Unknown { .. } => Self::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", msg)
                .hint("retry with an idempotency key (--key) so that a retry cannot apply twice"),
            RouteError::Invoke(i) => i.into(),
        }
    }
}

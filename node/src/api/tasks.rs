//! `/v1/tasks/...` handlers.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hubmesh_consensus::state::{validate_task_name, MigrationReason};
use hubmesh_consensus::{ClusterState, NodeId};
use hubmesh_proto::api;
use std::sync::Arc;
use std::time::Duration;

use super::error::ApiError;
use super::{views, ApiState};

/// Header carrying an idempotency key.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";
const MAX_KEY: usize = 256;
/// How long a miss waits to catch up with the leader's commits before saying "no such task".
const CATCH_UP: Duration = Duration::from_secs(1);

fn no_such_task(name: &str) -> ApiError {
    ApiError::not_found(format!("no task named {name:?}"))
}

/// The applied state, holding `name` if the mesh has it. A miss first catches up with what the
/// leader has committed: a task whose creation was just answered through another hub is known
/// here too (read-your-writes across hubs); only misses pay for the round trip. When the leader
/// cannot be asked, the answer is 503 (retry), never a 404 that may be false.
async fn state_with(s: &ApiState, name: &str) -> Result<Arc<ClusterState>, ApiError> {
    let state = s.hub.consensus().state();
    if state.tasks.contains_key(name) {
        return Ok(state);
    }
    // A name no task can have needs no round trip.
    if validate_task_name(name).is_err() {
        return Err(no_such_task(name));
    }
    let confirmed = s.hub.consensus().catch_up(CATCH_UP).await;
    let state = s.hub.consensus().state();
    match (state.tasks.contains_key(name), confirmed) {
        (true, _) => Ok(state),
        (false, true) => Err(no_such_task(name)),
        (false, false) => Err(ApiError::unconfirmed(name)),
    }
}

pub(crate) async fn list(State(s): State<ApiState>) -> Json<Vec<api::TaskInfo>> {
    let state = s.hub.consensus().state();
    let near = s.hub.devices().near();
    Json(state.tasks.values().map(|r| views::task_info(&s.hub, &state, &near, r)).collect())
}

pub(crate) async fn show(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<api::TaskInfo>, ApiError> {
    let state = state_with(&s, &name).await?;
    let record = state.tasks.get(&name).ok_or_else(|| no_such_task(&name))?;
    Ok(Json(views::task_info(&s.hub, &state, &s.hub.devices().near(), record)))
}

/// `POST` creates a task, `PUT` publishes a new version of an existing one.
pub(crate) async fn deploy(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    method: Method,
    params: Result<Query<api::DeployParams>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let body = read_module(&s, body).await?;
    let update = method == Method::PUT;
    if update {
        state_with(&s, &name).await?;
    }
    let deployed = s.hub.deploy(&name, &body, &params, update).await?;
    // Committed; if this hub has not applied it yet, it catches up (or answers 503, never 404).
    let state = state_with(&s, &name).await?;
    let record = state.tasks.get(&name).ok_or_else(|| no_such_task(&name))?;
    let resp = api::DeployResponse {
        task: views::task_info(&s.hub, &state, &s.hub.devices().near(), record),
        created: deployed.created,
    };
    let status = if deployed.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(resp)).into_response())
}

async fn read_module(s: &ApiState, body: Body) -> Result<Bytes, ApiError> {
    let limit = s.hub.config().executor.max_module_size.as_u64();
    axum::body::to_bytes(body, limit as usize).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the module is over the limit of {limit} bytes"),
        )
        .hint("raise executor.max_module_size in the hub's config")
    })
}

pub(crate) async fn remove(State(s): State<ApiState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    use hubmesh_consensus::state::Rejected;
    use hubmesh_consensus::{Command, ProposeError};
    state_with(&s, &name).await?;
    if !s.hub.has_quorum() {
        return Err(ApiError::no_quorum());
    }
    match s.hub.consensus().propose(Command::DeleteTask { name: name.clone() }).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        Err(ProposeError::Rejected(Rejected::NoSuchTask(_))) => Err(no_such_task(&name)),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn invoke(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The request whole rather than a `HeaderMap` extractor, which would copy every header.
    let (parts, body) = req.into_parts();
    let key = match parts.headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::bad_request("the idempotency key must be visible ASCII"))?;
            if k.is_empty() || k.len() > MAX_KEY {
                return Err(ApiError::bad_request(format!("the idempotency key must be 1-{MAX_KEY} characters")));
            }
            Some(k.to_owned())
        }
    };
    let limit = match s.hub.input_limit(&name) {
        Some(limit) => limit,
        None => {
            state_with(&s, &name)
                .await?
                .tasks
                .get(&name)
                .ok_or_else(|| no_such_task(&name))?
                .spec
                .limits
                .max_input_bytes
        }
    };
    let input = axum::body::to_bytes(body, limit as usize).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the input is over the task's limit of {limit} bytes"),
        )
        .hint("deploy the task with a larger --max-input")
    })?;
    let res = s.hub.invoke(&name, input.to_vec(), key).await;
    let outcome = match &res {
        Ok((a, _)) if a.status == 0 => "ok",
        Ok(_) => "task_error",
        Err(_) => "error",
    };
    invoke_counter(outcome).increment(1);
    let (answer, placement) = res?;
    if answer.status != 0 {
        let text = String::from_utf8_lossy(&answer.output[..answer.output.len().min(1024)]).into_owned();
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "task_error",
            format!("the task answered status {}: {text}", answer.status),
        ));
    }
    let mut resp = answer.output.into_response();
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/octet-stream"));
    h.insert("x-hubmesh-epoch", HeaderValue::from(placement.epoch.0));
    h.insert("x-hubmesh-node", HeaderValue::from(placement.node.0));
    Ok(resp)
}

/// The `hubmesh_invoke_total` counter of an outcome, registered once (a lookup per call showed
/// in the profile).
fn invoke_counter(outcome: &'static str) -> &'static metrics::Counter {
    use std::sync::OnceLock;
    static OK: OnceLock<metrics::Counter> = OnceLock::new();
    static TASK_ERROR: OnceLock<metrics::Counter> = OnceLock::new();
    static ERROR: OnceLock<metrics::Counter> = OnceLock::new();
    let cell = match outcome {
        "ok" => &OK,
        "task_error" => &TASK_ERROR,
        _ => &ERROR,
    };
    cell.get_or_init(|| metrics::counter!("hubmesh_invoke_total", "outcome" => outcome))
}

pub(crate) async fn checkpoint(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<api::CheckpointResponse>, ApiError> {
    state_with(&s, &name).await?;
    let c = s.hub.executor().checkpoint(&name).await?;
    Ok(Json(api::CheckpointResponse { checkpoint: views::checkpoint_info(&c) }))
}

/// `POST /v1/tasks/{name}/migrate`: moves the running task to another hub (live migration).
pub(crate) async fn migrate(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Option<Json<api::MigrateRequest>>,
) -> Result<Json<api::MigrationInfo>, ApiError> {
    let state = state_with(&s, &name).await?;
    let to = match body.and_then(|Json(b)| b.to) {
        None => None,
        Some(to) => Some(
            state
                .nodes
                .values()
                .find(|n| n.name == to || n.id.0.to_string() == to)
                .ok_or_else(|| {
                    ApiError::not_found(format!("no hub named {to:?}")).hint("`hubmesh node list` shows the hubs")
                })?
                .id,
        ),
    };
    if !s.hub.has_quorum() {
        return Err(ApiError::no_quorum());
    }
    let r = s.hub.migrate(&name, to, MigrationReason::Manual).await?;
    let state = s.hub.consensus().state();
    let name_of = |id: u64| state.nodes.get(&NodeId(id)).map(|n| n.name.clone()).unwrap_or_default();
    Ok(Json(api::MigrationInfo {
        task: name,
        from_node_id: r.from,
        from_node_name: name_of(r.from),
        to_node_id: r.to,
        to_node_name: name_of(r.to),
        epoch: r.epoch,
        pause_us: r.pause_us,
        rounds: r.rounds,
        bytes: r.bytes,
        precopy_ms: r.precopy_ms,
        duration_ms: r.duration_ms,
        frozen_us: r.frozen_us,
        stored_us: r.stored_us,
        committed_us: r.committed_us,
        applied_us: r.applied_us,
        running_us: r.running_us,
    }))
}

//! The HTTP API (axum): `/v1/...` behind a bearer token, `/health` and `/metrics` open.
//! `docs/api.md` documents every route; `error.rs` is the only place that picks status codes.

mod api_tokens;
mod auth;
mod devices;
mod error;
mod tasks;
mod views;

use std::sync::Arc;

use axum::extract::State;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use hubmesh_proto::api;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::hub::Hub;

/// Shared state of the handlers.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Option<PrometheusHandle>,
}

/// Builds the router.
pub(crate) fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes))
        .route("/v1/workers", get(workers))
        .route("/v1/tokens", post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/api-tokens", get(api_tokens::list).post(api_tokens::create))
        .route("/v1/api-tokens/{name}", axum::routing::delete(api_tokens::revoke))
        .route("/v1/nodes/{name}/drain", post(drain))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/devices", get(devices::list))
        .route("/v1/devices/{*id}", get(devices::show))
        .route("/v1/tasks", get(tasks::list))
        .route("/v1/tasks/{name}", get(tasks::show).post(tasks::deploy).put(tasks::deploy).delete(tasks::remove))
        .route("/v1/tasks/{name}/invoke", post(tasks::invoke))
        .route("/v1/tasks/{name}/checkpoint", post(tasks::checkpoint))
        .route("/v1/tasks/{name}/migrate", post(tasks::migrate))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { error::ApiError::not_found("no such route").hint("see docs/api.md") })
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    let status = s.hub.consensus().status();
    Json(serde_json::json!({"status": "ok", "node_id": status.node_id, "leader": status.leader}))
}

async fn metrics(State(s): State<ApiState>) -> String {
    // The page log keeps its own figures; they are read when asked for, not on every write. Off
    // the runtime's threads: reading them waits for the log's lock, which a write holds through
    // its fdatasync.
    let pages = s.hub.executor().pages().clone();
    let log = tokio::task::spawn_blocking(move || pages.stats()).await.unwrap_or_default();
    metrics::gauge!("hubmesh_page_log_bytes").set(log.file_bytes as f64);
    metrics::gauge!("hubmesh_page_log_compactions").set(log.compactions as f64);
    metrics::gauge!("hubmesh_page_log_compaction_lock_micros_max").set(log.compaction_lock_micros_max as f64);
    metrics::gauge!("hubmesh_page_log_compaction_locked_bytes_max").set(log.compaction_locked_bytes_max as f64);
    let kept = s.hub.consensus().transport().kept_stream_stats();
    metrics::counter!("hubmesh_mesh_kept_streams_opened_total").absolute(kept.opened);
    metrics::counter!("hubmesh_mesh_kept_streams_reused_total").absolute(kept.reused);
    metrics::gauge!("hubmesh_mesh_kept_streams_idle").set(kept.idle as f64);
    metrics::gauge!("hubmesh_migration_staged_bytes").set(s.hub.migrations().staged_memory_bytes() as f64);
    s.metrics.as_ref().map(|h| h.render()).unwrap_or_default()
}

async fn status(State(s): State<ApiState>) -> Json<api::StatusInfo> {
    Json(views::status(&s.hub))
}

async fn nodes(State(s): State<ApiState>) -> Json<Vec<api::NodeInfo>> {
    Json(views::status(&s.hub).nodes)
}

async fn workers(State(s): State<ApiState>) -> Json<Vec<api::WorkerInfo>> {
    Json(views::workers(&s.hub))
}

async fn create_token(
    State(s): State<ApiState>,
    body: Option<Json<api::TokenRequest>>,
) -> Result<Json<api::TokenResponse>, error::ApiError> {
    let ttl = match body.and_then(|Json(b)| b.ttl) {
        None => std::time::Duration::from_secs(3600),
        Some(t) => humantime::parse_duration(&t)
            .map_err(|e| error::ApiError::bad_request(format!("ttl: {t:?} is not a duration like 1h ({e})")))?,
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 24 * 3600) {
        return Err(error::ApiError::bad_request("ttl must be between 1s and 30 days"));
    }
    if !s.hub.has_quorum() {
        return Err(error::ApiError::no_quorum());
    }
    let token = s.hub.consensus().create_token(ttl).await?;
    Ok(Json(api::TokenResponse { token, expires_in_ms: ttl.as_millis() as u64 }))
}

#[derive(serde::Deserialize)]
struct DrainQuery {
    #[serde(default)]
    undo: bool,
}

/// `POST /v1/nodes/{name}/drain[?undo=true]`: move every instance off a hub (or take it back).
async fn drain(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<DrainQuery>,
) -> Result<Json<Vec<api::NodeInfo>>, error::ApiError> {
    use hubmesh_consensus::state::NodeStatus;
    let state = s.hub.consensus().state();
    let node = state.nodes.values().find(|n| n.name == name || n.id.0.to_string() == name).ok_or_else(|| {
        error::ApiError::not_found(format!("no hub named {name:?}")).hint("`hubmesh node list` shows the hubs")
    })?;
    if !s.hub.has_quorum() {
        return Err(error::ApiError::no_quorum());
    }
    let status = if q.undo { NodeStatus::Up } else { NodeStatus::Draining };
    let id = node.id;
    s.hub.consensus().propose(hubmesh_consensus::Command::SetNodeStatus { node: id, status }).await?;
    // Committed at the leader; the listing answered is this hub's, once it has applied it.
    s.hub
        .wait_state(std::time::Duration::from_secs(2), |st| st.nodes.get(&id).is_some_and(|n| n.status == status))
        .await;
    Ok(Json(views::status(&s.hub).nodes))
}

/// `DELETE /v1/nodes/{name}`: removes a hub for good (record, Raft membership, certificate).
async fn remove_node(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<axum::http::StatusCode, error::ApiError> {
    let state = s.hub.consensus().state();
    let node = state.nodes.values().find(|n| n.name == name || n.id.0.to_string() == name).ok_or_else(|| {
        error::ApiError::not_found(format!("no hub named {name:?}")).hint("`hubmesh node list` shows the hubs")
    })?;
    if node.id == s.hub.consensus().node_id() {
        return Err(error::ApiError::bad_request("a hub cannot remove itself").hint("ask another hub of the mesh"));
    }
    if !s.hub.has_quorum() {
        return Err(error::ApiError::no_quorum());
    }
    s.hub.consensus().propose(hubmesh_consensus::Command::RemoveNode { node: node.id }).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `DELETE /v1/tokens/{id}`: the token admits no more hubs (hubs it admitted stay).
async fn revoke_token(
    State(s): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::http::StatusCode, error::ApiError> {
    if !s.hub.has_quorum() {
        return Err(error::ApiError::no_quorum());
    }
    match s.hub.consensus().revoke_token(&id).await {
        Ok(_) => Ok(axum::http::StatusCode::NO_CONTENT),
        Err(hubmesh_consensus::ProposeError::Rejected(r)) => Err(error::ApiError::not_found(r.to_string())),
        Err(e) => Err(e.into()),
    }
}

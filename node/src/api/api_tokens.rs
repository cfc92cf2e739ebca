//! `/v1/api-tokens`: mesh-wide API tokens (admin only; see `crate::access`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hubmesh_consensus::state::{validate_user_api_token_name, ApiScope, ApiTokenRecord};
use hubmesh_consensus::{Command, ProposeError, Rejected};
use hubmesh_proto::api;

use super::error::ApiError;
use super::ApiState;
use crate::access::{fresh_token, record_of};

fn info(name: &str, t: &ApiTokenRecord) -> api::ApiTokenInfo {
    api::ApiTokenInfo {
        name: name.to_owned(),
        scope: match t.scope {
            ApiScope::Admin => "admin",
            ApiScope::Invoke => "invoke",
        }
        .to_owned(),
        tasks: t.tasks.clone(),
        created_unix_ms: t.created_ms,
        expires_unix_ms: (t.expires_ms != u64::MAX).then_some(t.expires_ms),
        revoked: t.revoked,
        valid: t.is_valid_at(hubmesh_consensus::now_ms()),
    }
}

/// Waits (bounded) until this hub has applied the change: a follower's proposal returns once the
/// leader committed it, and the caller's next request to this hub must already see it.
async fn applied_here(s: &ApiState, done: impl Fn(&hubmesh_consensus::ClusterState) -> bool) {
    let mut state = s.hub.consensus().watch();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), state.wait_for(|st| done(st))).await;
}

/// `GET /v1/api-tokens`.
pub(crate) async fn list(State(s): State<ApiState>) -> Json<Vec<api::ApiTokenInfo>> {
    let state = s.hub.consensus().state();
    Json(state.api_tokens.iter().map(|(n, t)| info(n, t)).collect())
}

/// `POST /v1/api-tokens`: the token is in the answer, and nowhere else.
pub(crate) async fn create(
    State(s): State<ApiState>,
    Json(req): Json<api::ApiTokenRequest>,
) -> Result<(StatusCode, Json<api::ApiTokenCreated>), ApiError> {
    validate_user_api_token_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let scope = match req.scope.as_deref() {
        None | Some("admin") => ApiScope::Admin,
        Some("invoke") => ApiScope::Invoke,
        Some(other) => return Err(ApiError::bad_request(format!("scope {other:?}: expected admin or invoke"))),
    };
    let expires_ms = match &req.expires {
        None => u64::MAX,
        Some(t) => {
            let d = humantime::parse_duration(t)
                .map_err(|e| ApiError::bad_request(format!("expires: {t:?} is not a duration like 30d ({e})")))?;
            hubmesh_consensus::now_ms().saturating_add(d.as_millis().try_into().unwrap_or(u64::MAX))
        }
    };
    if !s.hub.has_quorum() {
        return Err(ApiError::no_quorum());
    }
    let token = fresh_token(&req.name);
    let record = record_of(&token, scope, req.tasks, expires_ms);
    let created = info(&req.name, &record);
    let name = req.name.clone();
    match s.hub.consensus().propose(Command::CreateApiToken { name: req.name, record }).await {
        Ok(_) => {
            applied_here(&s, |st| st.api_tokens.contains_key(&name)).await;
            Ok((StatusCode::CREATED, Json(api::ApiTokenCreated { token, info: created })))
        }
        Err(ProposeError::Rejected(r @ Rejected::ApiTokenExists(_))) => {
            Err(ApiError::new(StatusCode::CONFLICT, "exists", r.to_string())
                .hint("revoked names stay taken; pick another name"))
        }
        Err(ProposeError::Rejected(r @ Rejected::Invalid(_))) => Err(ApiError::bad_request(r.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /v1/api-tokens/{name}`: every hub refuses the token once the revocation is applied.
pub(crate) async fn revoke(State(s): State<ApiState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if !s.hub.has_quorum() {
        return Err(ApiError::no_quorum());
    }
    match s.hub.consensus().propose(Command::RevokeApiToken { name: name.clone() }).await {
        Ok(_) => {
            applied_here(&s, |st| st.api_tokens.get(&name).is_some_and(|t| t.revoked)).await;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(ProposeError::Rejected(r @ Rejected::NoSuchApiToken(_))) => {
            Err(ApiError::not_found(r.to_string()).hint("`hubmesh api-token list` shows the tokens"))
        }
        Err(e) => Err(e.into()),
    }
}

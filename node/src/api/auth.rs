//! Bearer-token check for `/v1/...`: the token's grant (see `crate::access`) must allow the route.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::ApiState;
use crate::access::{grant, Need};

pub(crate) async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let grant = presented.and_then(|t| grant(&s.hub, t)).ok_or_else(ApiError::unauthorized)?;
    let need = Need::of(req.method(), req.uri().path());
    if !grant.allows(&need) {
        return Err(ApiError::forbidden(match need {
            Need::Admin => "this token may only invoke tasks".to_owned(),
            Need::Invoke(task) => format!("this token may not invoke {task:?}"),
        }));
    }
    Ok(next.run(req).await)
}

//! Bearer-token check for `/v1/...`.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::ApiState;

pub(crate) async fn require_token(State(s): State<ApiState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if s.hub.token_matches(t.as_bytes()) => Ok(next.run(req).await),
        _ => Err(ApiError::unauthorized()),
    }
}

//! `GET /v1/devices` and `GET /v1/devices/{id}`: the device registry as this hub sees it (an id
//! may hold slashes: `mdns:_hap._tcp/Hall lamp`).

use axum::extract::{Path, State};
use axum::Json;
use hubmesh_proto::api;

use super::error::ApiError;
use super::ApiState;
use crate::devices::registry::{DeviceView, Reach};
use crate::hub::Hub;

fn info(hub: &Hub, v: DeviceView) -> api::DeviceInfo {
    let state = hub.consensus().state();
    let name_of = |n| state.nodes.get(&n).map(|r| r.name.clone()).unwrap_or_default();
    let (reach, unreachable_since_ms) = match v.reach {
        Reach::Seen => ("seen", None),
        Reach::Unreachable { since_ms } => ("unreachable", Some(since_ms)),
    };
    api::DeviceInfo {
        id: v.id,
        name: v.description.name,
        kind: v.description.kind,
        addresses: v.description.addresses.into_iter().collect(),
        properties: v.description.properties,
        seen_by: v
            .seen_by
            .into_iter()
            .map(|(n, at)| api::DeviceSeenBy { node_id: n.0, node_name: name_of(n), last_seen_ms: at })
            .collect(),
        reach: reach.to_owned(),
        unreachable_since_ms,
    }
}

pub(super) async fn list(State(s): State<ApiState>) -> Json<Vec<api::DeviceInfo>> {
    let views = s.hub.devices().view();
    Json(views.into_iter().map(|v| info(&s.hub, v)).collect())
}

pub(super) async fn show(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<api::DeviceInfo>, ApiError> {
    let view = s.hub.devices().view().into_iter().find(|v| v.id == id);
    match view {
        Some(v) => Ok(Json(info(&s.hub, v))),
        None => Err(ApiError::not_found(format!("no hub sees a device {id:?}"))
            .hint("`hubmesh device list` shows the devices the hubs see")),
    }
}

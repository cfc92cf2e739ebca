//! A typed client of the HTTP API, used by the CLI, the tests and the chaos suite.

use std::time::Duration;

use hubmesh_proto::api;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub answered with an error.
    #[error("{}{}", .body.message, .body.hint.as_ref().map(|h| format!("\n  hint: {h}")).unwrap_or_default())]
    Api { status: u16, body: api::ErrorBody },
    /// The hub could not be reached or the connection broke.
    #[error("cannot reach the hub at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The hub's answer did not parse.
    #[error("unexpected answer from the hub: {0}")]
    Decode(String),
}

impl ClientError {
    /// The API error code, if the hub answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }

    /// True when the request surely never reached the hub (the connection was refused), so it
    /// cannot have had any effect.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::Transport { source, .. } if source.is_connect())
    }

    /// The HTTP status, if the hub answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An invocation's answer and the instance that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoked {
    pub output: Vec<u8>,
    /// The epoch of the instance that ran the call (`x-hubmesh-epoch`).
    pub epoch: Option<u64>,
    /// The hub that ran the call (`x-hubmesh-node`).
    pub node: Option<u64>,
}

/// A client of one hub.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the hub at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: Option<String>) -> Self {
        Self::with_timeout(base, token, Duration::from_secs(120))
    }

    /// A client whose every request gives up after `timeout` (the chaos suite counts such a call
    /// as of unknown outcome).
    pub fn with_timeout(base: &str, token: Option<String>, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .build()
            .expect("a reqwest client without TLS always builds");
        Self { http, base: base.trim_end_matches('/').to_owned(), token }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, path: &str) -> Result<reqwest::Response, ClientError> {
        let resp = req.send().await.map_err(|source| ClientError::Transport { url: self.url(path), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<api::ErrorBody>(&text).unwrap_or_else(|_| api::ErrorBody {
            code: format!("http_{status}"),
            message: if text.is_empty() { format!("HTTP {status}") } else { text },
            hint: None,
        });
        Err(ClientError::Api { status, body })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(req, path).await?;
        resp.json().await.map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /health` (no token needed).
    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.json(self.http.get(self.url("/health")), "/health").await
    }

    /// `GET /metrics` (Prometheus text, no token needed).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.send(self.http.get(self.url("/metrics")), "/metrics").await?;
        resp.text().await.map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<api::StatusInfo, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/status"), "/v1/status").await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<api::NodeInfo>, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/nodes"), "/v1/nodes").await
    }

    /// `GET /v1/devices`.
    pub async fn devices(&self) -> Result<Vec<api::DeviceInfo>, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/devices"), "/v1/devices").await
    }

    /// `GET /v1/devices/{id}` (the id's slashes stay: the route takes the rest of the path).
    pub async fn device(&self, id: &str) -> Result<api::DeviceInfo, ClientError> {
        let mut escaped = String::new();
        for c in id.chars() {
            match c {
                '%' | ' ' | '#' | '?' | '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}' => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        escaped.push_str(&format!("%{b:02X}"));
                    }
                }
                c => escaped.push(c),
            }
        }
        let path = format!("/v1/devices/{escaped}");
        self.json(self.req(reqwest::Method::GET, &path), &path).await
    }

    /// The hub's background workers.
    pub async fn workers(&self) -> Result<Vec<api::WorkerInfo>, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/workers"), "/v1/workers").await
    }

    /// Deploys `module` (wasm or wat bytes) as `name`; `update` publishes a new version.
    pub async fn deploy(
        &self,
        name: &str,
        module: Vec<u8>,
        params: &api::DeployParams,
        update: bool,
    ) -> Result<api::DeployResponse, ClientError> {
        let path = format!("/v1/tasks/{name}");
        let method = if update { reqwest::Method::PUT } else { reqwest::Method::POST };
        let req = self.req(method, &path).query(params).body(module);
        self.json(req, &path).await
    }

    /// Invokes `name` with `input`; returns the output bytes.
    pub async fn invoke(&self, name: &str, input: Vec<u8>, key: Option<&str>) -> Result<Vec<u8>, ClientError> {
        Ok(self.invoke_placed(name, input, key).await?.output)
    }

    /// Invokes `name` with `input`; returns the output and the instance (hub, epoch) that ran it.
    pub async fn invoke_placed(&self, name: &str, input: Vec<u8>, key: Option<&str>) -> Result<Invoked, ClientError> {
        let path = format!("/v1/tasks/{name}/invoke");
        let mut req = self.req(reqwest::Method::POST, &path).body(input);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = self.send(req, &path).await?;
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()?.parse().ok());
        let (epoch, node) = (header("x-hubmesh-epoch"), header("x-hubmesh-node"));
        let bytes = resp.bytes().await.map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(Invoked { output: bytes.to_vec(), epoch, node })
    }

    /// `GET /v1/tasks`.
    pub async fn tasks(&self) -> Result<Vec<api::TaskInfo>, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/tasks"), "/v1/tasks").await
    }

    /// `GET /v1/tasks/{name}`.
    pub async fn task(&self, name: &str) -> Result<api::TaskInfo, ClientError> {
        let path = format!("/v1/tasks/{name}");
        self.json(self.req(reqwest::Method::GET, &path), &path).await
    }

    /// `DELETE /v1/tasks/{name}`.
    pub async fn remove(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/tasks/{name}");
        self.send(self.req(reqwest::Method::DELETE, &path), &path).await.map(|_| ())
    }

    /// `POST /v1/tasks/{name}/checkpoint`.
    pub async fn checkpoint(&self, name: &str) -> Result<api::CheckpointResponse, ClientError> {
        let path = format!("/v1/tasks/{name}/checkpoint");
        self.json(self.req(reqwest::Method::POST, &path), &path).await
    }

    /// `POST /v1/tasks/{name}/migrate`: live-migrates a task (to a hub by name or id, or where
    /// the scheduler says).
    pub async fn migrate(&self, name: &str, to: Option<&str>) -> Result<api::MigrationInfo, ClientError> {
        let path = format!("/v1/tasks/{name}/migrate");
        let body = api::MigrateRequest { to: to.map(str::to_owned) };
        self.json(self.req(reqwest::Method::POST, &path).json(&body), &path).await
    }

    /// `POST /v1/tokens`: a join token.
    pub async fn create_token(&self, ttl: Option<&str>) -> Result<api::TokenResponse, ClientError> {
        let body = api::TokenRequest { ttl: ttl.map(str::to_owned) };
        self.json(self.req(reqwest::Method::POST, "/v1/tokens").json(&body), "/v1/tokens").await
    }

    /// `POST /v1/nodes/{name}/drain`: moves every instance off a hub (`undo`: takes it back).
    pub async fn drain(&self, node: &str, undo: bool) -> Result<Vec<api::NodeInfo>, ClientError> {
        let path = format!("/v1/nodes/{node}/drain");
        let req = self.req(reqwest::Method::POST, &path).query(&[("undo", undo)]);
        self.json(req, &path).await
    }

    /// `DELETE /v1/nodes/{name}`: removes a hub for good.
    pub async fn remove_node(&self, node: &str) -> Result<(), ClientError> {
        let path = format!("/v1/nodes/{node}");
        self.send(self.req(reqwest::Method::DELETE, &path), &path).await.map(|_| ())
    }

    /// `DELETE /v1/tokens/{id}`.
    pub async fn revoke_token(&self, token_or_id: &str) -> Result<(), ClientError> {
        let id = hubmesh_consensus::join::JoinToken::parse(token_or_id)
            .map(|t| t.id)
            .unwrap_or_else(|_| token_or_id.to_owned());
        let path = format!("/v1/tokens/{id}");
        self.send(self.req(reqwest::Method::DELETE, &path), &path).await.map(|_| ())
    }

    /// `POST /v1/api-tokens`: a mesh-wide API token (shown once).
    pub async fn create_api_token(&self, req: &api::ApiTokenRequest) -> Result<api::ApiTokenCreated, ClientError> {
        self.json(self.req(reqwest::Method::POST, "/v1/api-tokens").json(req), "/v1/api-tokens").await
    }

    /// `GET /v1/api-tokens`.
    pub async fn api_tokens(&self) -> Result<Vec<api::ApiTokenInfo>, ClientError> {
        self.json(self.req(reqwest::Method::GET, "/v1/api-tokens"), "/v1/api-tokens").await
    }

    /// `DELETE /v1/api-tokens/{name}`.
    pub async fn revoke_api_token(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/api-tokens/{name}");
        self.send(self.req(reqwest::Method::DELETE, &path), &path).await.map(|_| ())
    }

    /// Whether an error means the hub is not there (as opposed to answering).
    pub fn is_unreachable(e: &ClientError) -> bool {
        matches!(e, ClientError::Transport { .. })
    }
}

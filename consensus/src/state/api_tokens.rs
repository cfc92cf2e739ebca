//! API tokens belong to the mesh: created, listed and revoked through Raft, stored as hashes, and
//! honoured by every hub (it looks the presented token's hash up in its applied state). Names
//! starting `hub-` are the hubs' own: `hub-<id>` holds hub `id`'s `admin.token` and is revoked
//! when the hub is removed. Users cannot ask for such a name (the API checks with
//! [`validate_user_api_token_name`] before proposing); apply does not check it, so that log
//! entries committed before the rule existed replay to the same state on every hub.

use super::{
    validate_name, validate_task_name, ApiScope, ApiTokenRecord, ClusterState, CommandResult, NodeId, Outcome, Rejected,
};

/// Longest API token name.
pub const MAX_API_TOKEN_NAME: usize = 64;
/// Most tasks one invoke token may name.
pub const MAX_API_TOKEN_TASKS: usize = 64;

/// What a hub's own token's name starts with.
const HUB_TOKEN_PREFIX: &str = "hub-";

/// Checks an API token's name: like a task name, 1–64 characters of `[a-z0-9_-]`.
pub fn validate_api_token_name(name: &str) -> Result<(), Rejected> {
    validate_name("API token name", name, MAX_API_TOKEN_NAME)
}

/// Checks the name of a token a user asks for: a valid name outside the hubs' own (`hub-…`).
pub fn validate_user_api_token_name(name: &str) -> Result<(), Rejected> {
    validate_api_token_name(name)?;
    if name.starts_with(HUB_TOKEN_PREFIX) {
        return Err(Rejected::Invalid(format!("API token names starting {HUB_TOKEN_PREFIX:?} belong to the hubs")));
    }
    Ok(())
}

/// The name of hub `node`'s own admin token.
pub fn hub_token_name(node: NodeId) -> String {
    format!("{HUB_TOKEN_PREFIX}{}", node.0)
}

impl ClusterState {
    pub(super) fn create_api_token(&mut self, name: &str, record: &ApiTokenRecord) -> CommandResult {
        validate_api_token_name(name)?;
        if self.api_tokens.contains_key(name) {
            return Err(Rejected::ApiTokenExists(name.to_owned()));
        }
        let hash_ok = record.token_hash.len() == 64 && record.token_hash.bytes().all(|b| b.is_ascii_hexdigit());
        if !hash_ok {
            return Err(Rejected::Invalid("an API token's hash is 64 hex digits".into()));
        }
        if self.api_tokens.values().any(|t| t.token_hash == record.token_hash) {
            return Err(Rejected::Invalid("that token is already registered under another name".into()));
        }
        if record.revoked {
            return Err(Rejected::Invalid("a new API token cannot be revoked".into()));
        }
        if record.scope == ApiScope::Admin && !record.tasks.is_empty() {
            return Err(Rejected::Invalid("an admin token cannot be limited to tasks".into()));
        }
        if record.tasks.len() > MAX_API_TOKEN_TASKS {
            return Err(Rejected::Invalid(format!("an API token names at most {MAX_API_TOKEN_TASKS} tasks")));
        }
        for t in &record.tasks {
            validate_task_name(t)?;
        }
        self.api_tokens.insert(name.to_owned(), record.clone());
        Ok(Outcome::ApiTokenCreated)
    }

    pub(super) fn revoke_api_token(&mut self, name: &str) -> CommandResult {
        let t = self.api_tokens.get_mut(name).ok_or_else(|| Rejected::NoSuchApiToken(name.to_owned()))?;
        t.revoked = true;
        Ok(Outcome::ApiTokenRevoked)
    }

    /// The API token whose hash is `token_hash`, with its name, whether or not it still works.
    pub fn api_token_by_hash(&self, token_hash: &str) -> Option<(&str, &ApiTokenRecord)> {
        self.api_tokens.iter().find(|(_, t)| t.token_hash == token_hash).map(|(n, t)| (n.as_str(), t))
    }
}

impl ApiTokenRecord {
    /// Whether it works at `now_ms`: not revoked, not expired.
    pub fn is_valid_at(&self, now_ms: u64) -> bool {
        !self.revoked && now_ms < self.expires_ms
    }

    /// Whether it may invoke `task` (an admin token may do everything).
    pub fn may_invoke(&self, task: &str) -> bool {
        match self.scope {
            ApiScope::Admin => true,
            ApiScope::Invoke => self.tasks.is_empty() || self.tasks.iter().any(|t| t == task),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Command;
    use super::*;

    fn record(hash_byte: char, scope: ApiScope, tasks: &[&str]) -> ApiTokenRecord {
        ApiTokenRecord {
            token_hash: hash_byte.to_string().repeat(64),
            scope,
            tasks: tasks.iter().map(|t| t.to_string()).collect(),
            created_ms: 1,
            expires_ms: 100,
            revoked: false,
        }
    }

    fn create(name: &str, r: ApiTokenRecord) -> Command {
        Command::CreateApiToken { name: name.into(), record: r }
    }

    #[test]
    fn api_tokens_are_created_once_found_by_hash_and_revoked() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&create("lights", record('a', ApiScope::Invoke, &["hall"]))), Ok(Outcome::ApiTokenCreated));
        let before = s.clone();
        for bad in [
            create("lights", record('b', ApiScope::Invoke, &[])),
            create("other", record('a', ApiScope::Admin, &[])),
            create("Bad Name", record('c', ApiScope::Admin, &[])),
            create("x", ApiTokenRecord { token_hash: "zz".into(), ..record('c', ApiScope::Admin, &[]) }),
            create("x", record('c', ApiScope::Admin, &["hall"])),
            create("x", record('c', ApiScope::Invoke, &["Not A Task"])),
            create("x", ApiTokenRecord { revoked: true, ..record('c', ApiScope::Admin, &[]) }),
            Command::RevokeApiToken { name: "nobody".into() },
        ] {
            assert!(s.apply(&bad).is_err(), "{bad:?}");
            assert_eq!(s, before, "a refused command changed the state: {bad:?}");
        }
        assert_eq!(s.apply(&create("lights2", record('b', ApiScope::Invoke, &[]))), Ok(Outcome::ApiTokenCreated));

        let (name, t) = s.api_token_by_hash(&"a".repeat(64)).unwrap();
        assert_eq!(name, "lights");
        assert!(t.is_valid_at(99) && !t.is_valid_at(100), "expires at expires_ms");
        assert!(t.may_invoke("hall") && !t.may_invoke("garage"));
        assert!(s.api_token_by_hash(&"b".repeat(64)).unwrap().1.may_invoke("garage"), "no task list: every task");
        assert!(s.api_token_by_hash(&"f".repeat(64)).is_none());

        assert_eq!(s.apply(&Command::RevokeApiToken { name: "lights".into() }), Ok(Outcome::ApiTokenRevoked));
        assert!(!s.api_token_by_hash(&"a".repeat(64)).unwrap().1.is_valid_at(0));
        assert_eq!(
            s.apply(&create("lights", record('d', ApiScope::Admin, &[]))),
            Err(Rejected::ApiTokenExists("lights".into())),
            "a revoked name stays taken"
        );
    }

    #[test]
    fn users_cannot_take_a_hubs_name_and_a_hubs_token_dies_with_it() {
        assert!(validate_user_api_token_name("hub-7").is_err(), "users cannot take the hubs' names");
        assert!(validate_user_api_token_name("hub-").is_err());
        assert!(validate_user_api_token_name("hubby").is_ok());
        assert!(validate_user_api_token_name("Bad Name").is_err());
        assert_eq!(hub_token_name(NodeId(4)), "hub-4");
        let mut s = ClusterState::default();
        let node = super::super::tests::node(2);
        // Either order replays: a hub's keeper may have committed its token before its record.
        assert_eq!(s.apply(&create("hub-2", record('a', ApiScope::Admin, &[]))), Ok(Outcome::ApiTokenCreated));
        s.apply(&Command::RegisterNode { node }).unwrap();
        s.apply(&Command::RemoveNode { node: NodeId(2) }).unwrap();
        assert!(s.api_tokens["hub-2"].revoked, "removing a hub revokes its own token");
        let before = s.clone();
        assert!(s.apply(&create("hub-2", record('b', ApiScope::Admin, &[]))).is_err(), "a revoked name stays taken");
        assert_eq!(s, before);
    }
}

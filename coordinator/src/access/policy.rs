//! The role rules as plain functions over data: which role each gRPC method and HTTP
//! route needs, and whether a caller (a role, or nobody) may go on. No sockets, no
//! store; the gRPC and HTTP layers call [`decide`] with what they know.

use std::fmt;
use std::str::FromStr;

/// What a token may do; each role may do everything the roles before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads pages, JSON, metrics, logs and try runs.
    Viewer,
    /// Also creates and uses their own gomote instances, submits and cancels their own
    /// try runs.
    Developer,
    /// Also cancels anyone's try runs.
    Operator,
    /// Also uses and destroys anyone's gomote instances and manages user tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Developer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected viewer, developer, operator or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// Something a caller asks to do; the label of `buildfarm_access_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Pages, JSON, metrics, logs; watching a try run; listing instances.
    Read,
    /// Creating a gomote instance.
    CreateInstance,
    /// Using or destroying one's own instance.
    UseInstance,
    /// Using or destroying another user's instance.
    UseOthersInstance,
    SubmitTry,
    /// Cancelling one's own try run.
    CancelTry,
    /// Cancelling another user's try run.
    CancelOthersTry,
    /// Issuing, listing and revoking user tokens.
    ManageTokens,
    /// An HTTP request that is not a read (no such page exists today; a new one is
    /// covered from the start).
    Change,
    /// A gRPC method this table does not know: refused to anyone but admins.
    Unknown,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::CreateInstance => "create_instance",
            Action::UseInstance => "use_instance",
            Action::UseOthersInstance => "use_others_instance",
            Action::SubmitTry => "submit_try",
            Action::CancelTry => "cancel_try",
            Action::CancelOthersTry => "cancel_others_try",
            Action::ManageTokens => "manage_tokens",
            Action::Change => "change",
            Action::Unknown => "unknown",
        }
    }

    /// The least role that may do this.
    pub fn required_role(self) -> Role {
        match self {
            Action::Read => Role::Viewer,
            Action::CreateInstance
            | Action::UseInstance
            | Action::SubmitTry
            | Action::CancelTry
            | Action::Change => Role::Developer,
            Action::CancelOthersTry => Role::Operator,
            Action::UseOthersInstance | Action::ManageTokens | Action::Unknown => Role::Admin,
        }
    }
}

/// The action of a gRPC method of the public API, by its path
/// (`/buildfarm.coordinator.v1.Coordinator/CreateInstance`). Ownership (whose instance,
/// whose try run) is checked in the handler, which knows the owner.
pub fn grpc_action(path: &str) -> Action {
    let Some(method) = path.strip_prefix("/buildfarm.coordinator.v1.Coordinator/") else {
        return Action::Unknown;
    };
    match method {
        "WatchTry" | "ListInstances" => Action::Read,
        "CreateInstance" => Action::CreateInstance,
        "DestroyInstance" | "PutTar" | "WriteFile" | "Exec" | "GetTar" | "Remove" | "List"
        | "Shell" => Action::UseInstance,
        "SubmitTry" => Action::SubmitTry,
        "CancelTry" => Action::CancelTry,
        "IssueToken" | "ListTokens" | "RevokeToken" => Action::ManageTokens,
        _ => Action::Unknown,
    }
}

/// What an HTTP request to `path` with `method` is. `None`: the route checks its own
/// credentials or is public on purpose (`/healthz` for probes, `/webhook/*` signed by
/// the forge, `/buildlet/*` fetched by machines booting with their own credentials).
pub fn http_action(method: &http::Method, path: &str) -> Option<Action> {
    if path == "/healthz" || path.starts_with("/webhook/") || path.starts_with("/buildlet/") {
        return None;
    }
    if method == http::Method::GET || method == http::Method::HEAD {
        Some(Action::Read)
    } else {
        Some(Action::Change)
    }
}

/// Why a caller was refused; the `reason` label of `buildfarm_access_denied_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No token, and anonymous callers may not do this.
    NoToken,
    /// A token that is malformed, unknown or whose secret does not match.
    BadToken,
    /// A revoked token.
    Revoked,
    /// A valid token whose role is below what the action needs.
    Role,
    /// Another user's instance or try run.
    NotOwner,
    /// Over a per-user rate limit.
    RateLimit,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoToken => "no_token",
            DenyReason::BadToken => "bad_token",
            DenyReason::Revoked => "revoked",
            DenyReason::Role => "role",
            DenyReason::NotOwner => "not_owner",
            DenyReason::RateLimit => "rate_limit",
        }
    }
}

/// May a caller with `role` (`None`: no token) do `action`, given whether anonymous
/// viewers are allowed?
pub fn decide(
    role: Option<Role>,
    action: Action,
    anonymous_viewers: bool,
) -> Result<(), DenyReason> {
    let need = action.required_role();
    match role {
        None if need == Role::Viewer && anonymous_viewers => Ok(()),
        None => Err(DenyReason::NoToken),
        Some(r) if r >= need => Ok(()),
        Some(_) => Err(DenyReason::Role),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "/buildfarm.coordinator.v1.Coordinator/";

    fn may(role: Option<Role>, method: &str, anonymous: bool) -> bool {
        decide(role, grpc_action(&format!("{SVC}{method}")), anonymous).is_ok()
    }

    #[test]
    fn roles_parse_print_and_order() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert_eq!("root".parse::<Role>(), Err(UnknownRole("root".into())));
        assert!(Role::Viewer < Role::Developer && Role::Operator < Role::Admin);
    }

    #[test]
    fn viewers_read_developers_change_admins_manage() {
        use Role::*;
        for (method, least) in [
            ("WatchTry", Viewer),
            ("ListInstances", Viewer),
            ("CreateInstance", Developer),
            ("Exec", Developer),
            ("Shell", Developer),
            ("PutTar", Developer),
            ("DestroyInstance", Developer),
            ("SubmitTry", Developer),
            ("CancelTry", Developer),
            ("IssueToken", Admin),
            ("ListTokens", Admin),
            ("RevokeToken", Admin),
            ("SomethingNew", Admin),
        ] {
            for r in Role::ALL {
                assert_eq!(may(Some(r), method, false), r >= least, "{r} {method}");
            }
        }
        assert_eq!(grpc_action("/other.Service/WatchTry"), Action::Unknown);
        assert_eq!(Action::CancelOthersTry.required_role(), Operator);
        assert_eq!(Action::UseOthersInstance.required_role(), Admin);
    }

    #[test]
    fn anonymous_callers_only_read_and_only_when_allowed() {
        assert!(may(None, "WatchTry", true));
        assert!(!may(None, "WatchTry", false));
        for method in [
            "CreateInstance",
            "SubmitTry",
            "CancelTry",
            "IssueToken",
            "Exec",
        ] {
            assert_eq!(
                decide(None, grpc_action(&format!("{SVC}{method}")), true),
                Err(DenyReason::NoToken),
                "{method}"
            );
        }
        assert_eq!(
            decide(Some(Role::Viewer), Action::SubmitTry, true),
            Err(DenyReason::Role)
        );
    }

    #[test]
    fn http_reads_are_views_changes_need_a_developer_and_some_routes_are_their_own() {
        use http::Method;
        assert_eq!(http_action(&Method::GET, "/"), Some(Action::Read));
        assert_eq!(http_action(&Method::GET, "/metrics"), Some(Action::Read));
        assert_eq!(http_action(&Method::HEAD, "/log/x"), Some(Action::Read));
        assert_eq!(
            http_action(&Method::POST, "/api/builds"),
            Some(Action::Change)
        );
        assert_eq!(http_action(&Method::DELETE, "/try/x"), Some(Action::Change));
        assert_eq!(http_action(&Method::GET, "/healthz"), None);
        assert_eq!(http_action(&Method::POST, "/webhook/go"), None);
        assert_eq!(http_action(&Method::GET, "/buildlet/linux-amd64"), None);
        assert_eq!(decide(None, Action::Change, true), Err(DenyReason::NoToken));
        assert_eq!(
            decide(Some(Role::Viewer), Action::Change, true),
            Err(DenyReason::Role)
        );
    }
}

//! Access control: who may do what on the gRPC API and the pages. `policy` holds the
//! role rules (pure), `registry` the valid user tokens (cached from the store), `rate`
//! the per-user rate limits (pure). [`Access`] ties them together for the gRPC and HTTP
//! layers and logs and counts every denial (`buildfarm_access_denied_total`).

pub mod dialin;
pub mod policy;
pub mod rate;
pub mod registry;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use buildfarm_config::AccessConfig;
use buildfarm_store::{Store, StoreError, UserToken};
use prometheus::{IntCounterVec, Opts};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use policy::{Action, DenyReason, Role};
use rate::RateWindow;
pub use registry::Principal;
use registry::{Rejected, TokenRegistry};

/// How often the token cache is read again from the store (for tokens revoked by
/// another process on the same store).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

const HOUR_MS: i64 = 3_600_000;

/// A refused request: why (for the counter) and what to tell the caller.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: DenyReason,
    pub message: String,
}

impl Refusal {
    /// The gRPC status: no or bad token is `Unauthenticated`, a role or owner problem
    /// `PermissionDenied`, a rate limit `ResourceExhausted`.
    pub fn to_status(&self) -> tonic::Status {
        let msg = self.message.clone();
        match self.reason {
            DenyReason::NoToken | DenyReason::BadToken | DenyReason::Revoked => {
                tonic::Status::unauthenticated(msg)
            }
            DenyReason::Role | DenyReason::NotOwner => tonic::Status::permission_denied(msg),
            DenyReason::RateLimit => tonic::Status::resource_exhausted(msg),
        }
    }

    /// The HTTP status: 401 (with a challenge, so a browser asks for the token), 403
    /// or 429.
    pub fn http_status(&self) -> http::StatusCode {
        match self.reason {
            DenyReason::NoToken | DenyReason::BadToken | DenyReason::Revoked => {
                http::StatusCode::UNAUTHORIZED
            }
            DenyReason::Role | DenyReason::NotOwner => http::StatusCode::FORBIDDEN,
            DenyReason::RateLimit => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// Why a request was not let through: refused, or the store could not tell.
#[derive(Debug, Clone)]
pub enum Denied {
    Refused(Refusal),
    Unavailable(String),
}

impl Denied {
    pub fn to_status(&self) -> tonic::Status {
        match self {
            Denied::Refused(r) => r.to_status(),
            Denied::Unavailable(m) => tonic::Status::unavailable(m.clone()),
        }
    }
}

/// The token in an `authorization` header: `Bearer <token>`, or HTTP Basic with the
/// token as the password (what a browser sends after the 401 challenge; the user name
/// is ignored). `Err` for a header that is neither.
pub fn token_from_header(value: &http::HeaderValue) -> Result<String, &'static str> {
    let v = value
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Ok(t.trim().to_owned());
    }
    if let Some(b) = v.strip_prefix("Basic ") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|_| "the Basic credentials are not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "the Basic credentials are not text")?;
        let (_, password) = text
            .split_once(':')
            .ok_or("the Basic credentials have no password")?;
        return Ok(password.to_owned());
    }
    Err("authorization must be `Bearer <token>`")
}

pub struct Access {
    anonymous_viewers: bool,
    try_runs_per_hour: u32,
    gomote_creates_per_hour: u32,
    registry: TokenRegistry,
    try_rate: Mutex<RateWindow>,
    create_rate: Mutex<RateWindow>,
    denied: IntCounterVec,
}

impl Access {
    /// Loads the tokens from `store`.
    pub async fn new(config: &AccessConfig, store: Arc<dyn Store>) -> anyhow::Result<Arc<Self>> {
        let denied = IntCounterVec::new(
            Opts::new(
                "buildfarm_access_denied_total",
                "Requests refused by access control, by reason and action.",
            ),
            &["reason", "action"],
        )?;
        let registry = TokenRegistry::new(store);
        let n = registry
            .refresh()
            .await
            .map_err(|e| anyhow::anyhow!("loading user tokens: {e}"))?;
        info!(
            tokens = n,
            anonymous_viewers = config.anonymous_viewers,
            "access control ready"
        );
        Ok(Arc::new(Access {
            anonymous_viewers: config.anonymous_viewers,
            try_runs_per_hour: config.try_runs_per_hour,
            gomote_creates_per_hour: config.gomote_creates_per_hour,
            registry,
            try_rate: Mutex::default(),
            create_rate: Mutex::default(),
            denied,
        }))
    }

    /// The denial counter, for the metrics registry.
    pub fn denied_counter(&self) -> IntCounterVec {
        self.denied.clone()
    }

    pub fn anonymous_viewers(&self) -> bool {
        self.anonymous_viewers
    }

    /// Reads the tokens from the store every [`REFRESH_EVERY`] until `shutdown`.
    pub async fn refresh_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            if let Err(e) = self.registry.refresh().await {
                warn!(error = %e, "refreshing user tokens failed; keeping the cached set");
            }
            let now = crate::farm::now_ms();
            for w in [&self.try_rate, &self.create_rate] {
                w.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .prune(now, HOUR_MS);
            }
        }
    }

    /// Logs and counts a denial and returns it.
    pub fn deny(
        &self,
        who: Option<&Principal>,
        action: Action,
        reason: DenyReason,
        message: impl Into<String>,
    ) -> Refusal {
        let message = message.into();
        warn!(
            user = who.map_or("anonymous", |p| p.user.as_str()),
            role = who.map_or("none", |p| p.role.as_str()),
            action = action.as_str(),
            reason = reason.as_str(),
            detail = %message,
            "access denied"
        );
        self.denied
            .with_label_values(&[reason.as_str(), action.as_str()])
            .inc();
        Refusal { reason, message }
    }

    /// Who sent `header` (none: anonymous), if they may do `action`.
    pub async fn authorize(
        &self,
        header: Option<&http::HeaderValue>,
        action: Action,
    ) -> Result<Option<Principal>, Denied> {
        let principal = match header {
            None => None,
            Some(h) => {
                let token = token_from_header(h).map_err(|m| {
                    Denied::Refused(self.deny(None, action, DenyReason::BadToken, m))
                })?;
                match self.registry.verify(&token).await {
                    Ok(p) => Some(p),
                    Err(Rejected::Denied(reason)) => {
                        let msg = match reason {
                            DenyReason::Revoked => "this user token was revoked",
                            _ => "invalid user token",
                        };
                        return Err(Denied::Refused(self.deny(None, action, reason, msg)));
                    }
                    Err(Rejected::Unavailable(e)) => {
                        warn!(error = %e, "cannot check a user token: store unavailable");
                        return Err(Denied::Unavailable(
                            "cannot check the token now (store unavailable); try again".into(),
                        ));
                    }
                }
            }
        };
        match policy::decide(
            principal.as_ref().map(|p| p.role),
            action,
            self.anonymous_viewers,
        ) {
            Ok(()) => Ok(principal),
            Err(reason) => {
                let msg = match (&principal, reason) {
                    (None, _) => format!(
                        "this needs a user token (role {} or above): send `authorization: Bearer <token>`; an admin issues one with `gomote token issue` or `coordinator token issue`",
                        action.required_role()
                    ),
                    (Some(p), _) => format!(
                        "user {} has role {}; {} needs role {} or above",
                        p.user,
                        p.role,
                        action.as_str(),
                        action.required_role()
                    ),
                };
                Err(Denied::Refused(self.deny(
                    principal.as_ref(),
                    action,
                    reason,
                    msg,
                )))
            }
        }
    }

    /// May `who` act on something `owner` owns? Their own needs `own`'s role (already
    /// checked by [`Access::authorize`]); anyone else's needs `others`'s role.
    pub fn check_owner(
        &self,
        who: &Principal,
        owner: &str,
        what: &str,
        others: Action,
    ) -> Result<(), Refusal> {
        if who.user == owner || who.role >= others.required_role() {
            return Ok(());
        }
        Err(self.deny(
            Some(who),
            others,
            DenyReason::NotOwner,
            format!(
                "{what} belongs to {owner}; only its owner or a user of role {} or above may use it",
                others.required_role()
            ),
        ))
    }

    fn take(
        &self,
        window: &Mutex<RateWindow>,
        who: &Principal,
        action: Action,
        limit: u32,
        field: &str,
        what: &str,
    ) -> Result<(), Refusal> {
        let now = crate::farm::now_ms();
        let r = window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&who.user, now, limit, HOUR_MS);
        r.map_err(|over| {
            self.deny(
                Some(who),
                action,
                DenyReason::RateLimit,
                format!(
                    "user {} reached the limit of {} {what} per hour (access.{field}); try again in {}s",
                    who.user,
                    over.limit,
                    (over.retry_after_ms + 999) / 1000
                ),
            )
        })
    }

    /// Counts a try run of `who` against `access.try_runs_per_hour`.
    pub fn take_try_run(&self, who: &Principal) -> Result<(), Refusal> {
        self.take(
            &self.try_rate,
            who,
            Action::SubmitTry,
            self.try_runs_per_hour,
            "try_runs_per_hour",
            "try runs",
        )
    }

    /// Counts a gomote create of `who` against `access.gomote_creates_per_hour`.
    pub fn take_gomote_create(&self, who: &Principal) -> Result<(), Refusal> {
        self.take(
            &self.create_rate,
            who,
            Action::CreateInstance,
            self.gomote_creates_per_hour,
            "gomote_creates_per_hour",
            "gomote creates",
        )
    }

    pub async fn issue(
        &self,
        user: &str,
        role: Role,
        note: &str,
    ) -> Result<(UserToken, String), StoreError> {
        self.registry.issue(user, role, note).await
    }

    pub async fn revoke(&self, id: &str) -> Result<UserToken, StoreError> {
        self.registry.revoke(id).await
    }

    pub async fn list(&self) -> Result<Vec<UserToken>, StoreError> {
        self.registry.list().await
    }

    /// `token` if it is still a valid token of `user` with `role`, else a new one:
    /// the coordinator's own user keeps one token across restarts.
    pub async fn ensure_token(
        &self,
        existing: Option<&str>,
        user: &str,
        role: Role,
        note: &str,
    ) -> Result<String, StoreError> {
        if let Some(t) = existing
            && let Ok(p) = self.registry.verify(t).await
            && p.user == user
            && p.role == role
        {
            return Ok(t.to_owned());
        }
        Ok(self.registry.issue(user, role, note).await?.1)
    }
}

/// Unix milliseconds as an RFC 3339 time (seconds), for listings.
pub fn fmt_unix_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_headers_carry_the_token() {
        let h = |s: &str| http::HeaderValue::from_str(s).expect("header");
        assert_eq!(
            token_from_header(&h("Bearer abc.def ")).as_deref(),
            Ok("abc.def")
        );
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:abc.def");
        assert_eq!(
            token_from_header(&h(&format!("Basic {basic}"))).as_deref(),
            Ok("abc.def")
        );
        assert!(token_from_header(&h("Token abc")).is_err());
        assert!(token_from_header(&h("Basic !!!")).is_err());
        let no_colon = base64::engine::general_purpose::STANDARD.encode("abc");
        assert!(token_from_header(&h(&format!("Basic {no_colon}"))).is_err());
    }
}

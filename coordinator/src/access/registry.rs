//! The valid set of user tokens, cached from the store so checking a token costs no
//! database round trip. Issue and revoke write the store first, then the cache, so a
//! revoked token is refused on the very next call. Tokens made or revoked by another
//! process on the same store (the `coordinator token` CLI) are seen when first presented
//! (a cache miss reads the store) and by the periodic refresh; a revocation is never
//! undone by a refresh that read the store before it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use buildfarm_store::{NewUserToken, Store, StoreError, UserToken};

use super::policy::{DenyReason, Role};
use crate::tokens;

#[derive(Debug, Clone)]
struct Entry {
    user: String,
    role: Role,
    secret_hash: String,
    revoked: bool,
}

fn entry(t: &UserToken) -> Option<Entry> {
    // A role the store holds but we do not know (a newer coordinator wrote it) is
    // treated as no token at all.
    Some(Entry {
        user: t.user.clone(),
        role: t.role.parse().ok()?,
        secret_hash: t.secret_hash.clone(),
        revoked: t.revoked_at.is_some(),
    })
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub role: Role,
    pub token_id: String,
}

/// Why a token was not accepted.
#[derive(Debug)]
pub enum Rejected {
    Denied(DenyReason),
    /// The token is not cached and the store could not be asked.
    Unavailable(StoreError),
}

pub struct TokenRegistry {
    store: Arc<dyn Store>,
    cache: RwLock<HashMap<String, Entry>>,
}

impl TokenRegistry {
    pub fn new(store: Arc<dyn Store>) -> Self {
        TokenRegistry {
            store,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// Reads every token from the store into the cache. A token revoked in the cache
    /// stays revoked whatever the list says (it may have been read before the revoke).
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let all = self.store.list_user_tokens().await?;
        let mut fresh: HashMap<String, Entry> = all
            .iter()
            .filter_map(|t| Some((t.id.clone(), entry(t)?)))
            .collect();
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        for (id, old) in cache.iter() {
            if old.revoked
                && let Some(e) = fresh.get_mut(id)
            {
                e.revoked = true;
            }
        }
        let n = fresh.len();
        *cache = fresh;
        Ok(n)
    }

    /// Checks a token and returns whose it is.
    pub async fn verify(&self, token: &str) -> Result<Principal, Rejected> {
        let Some((id, secret)) = tokens::parse(token) else {
            return Err(Rejected::Denied(DenyReason::BadToken));
        };
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        let e = match cached {
            Some(e) => e,
            None => match self.store.get_user_token(id).await {
                Ok(t) => {
                    let Some(e) = entry(&t) else {
                        return Err(Rejected::Denied(DenyReason::BadToken));
                    };
                    self.cache
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(id.to_owned())
                        .or_insert(e)
                        .clone()
                }
                Err(StoreError::NotFound { .. }) => {
                    return Err(Rejected::Denied(DenyReason::BadToken));
                }
                Err(err) => return Err(Rejected::Unavailable(err)),
            },
        };
        if !tokens::secret_matches(secret, &e.secret_hash) {
            return Err(Rejected::Denied(DenyReason::BadToken));
        }
        if e.revoked {
            return Err(Rejected::Denied(DenyReason::Revoked));
        }
        Ok(Principal {
            user: e.user,
            role: e.role,
            token_id: id.to_owned(),
        })
    }

    /// Makes a token for `user` with `role`; returns the record and the token text,
    /// which exists nowhere else.
    pub async fn issue(
        &self,
        user: &str,
        role: Role,
        note: &str,
    ) -> Result<(UserToken, String), StoreError> {
        let minted = tokens::mint();
        let t = self
            .store
            .create_user_token(&NewUserToken {
                id: minted.id.clone(),
                user: user.to_owned(),
                role: role.as_str().to_owned(),
                secret_hash: minted.secret_hash,
                note: note.to_owned(),
            })
            .await?;
        if let Some(e) = entry(&t) {
            self.cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.id.clone(), e);
        }
        Ok((t, minted.token))
    }

    /// Revokes token `id`: stored first, then refused by this registry at once.
    pub async fn revoke(&self, id: &str) -> Result<UserToken, StoreError> {
        let t = self.store.revoke_user_token(id).await?;
        if let Some(e) = entry(&t) {
            self.cache
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t.id.clone(), e);
        }
        Ok(t)
    }

    pub async fn list(&self) -> Result<Vec<UserToken>, StoreError> {
        self.store.list_user_tokens().await
    }
}

//! `gomote token issue|list|revoke`: user token management through the coordinator's
//! API (role admin). A revoke here is refused by the coordinator on the token's very
//! next call.

use anyhow::Result;
use clap::Subcommand;
use coordinator::client::TokenInfo;

use super::{Client, status_err};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a token for USER; prints it (shown once, the coordinator keeps only a hash).
    Issue {
        user: String,
        /// viewer, developer, operator or admin.
        #[arg(long, default_value = "developer")]
        role: String,
        /// What the token is for.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List every token (never the secrets).
    List,
    /// Revoke the token with this id (the part before the dot).
    Revoke { id: String },
}

fn info_json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "user": t.user,
        "role": t.role,
        "note": t.note,
        "created_unix_ms": t.created_unix_ms,
        "revoked_unix_ms": t.revoked_unix_ms,
    })
}

pub async fn run(c: &mut Client, cmd: &TokenCmd, json: bool) -> Result<()> {
    match cmd {
        TokenCmd::Issue { user, role, note } => {
            let r = c
                .issue_token(user, role, note)
                .await
                .map_err(|e| status_err("token issue", e))?;
            if json {
                let mut v = r.info.as_ref().map(info_json).unwrap_or_default();
                v["token"] = serde_json::Value::String(r.token);
                println!("{v}");
            } else {
                println!("{}", r.token);
            }
        }
        TokenCmd::List => {
            let tokens = c
                .list_tokens()
                .await
                .map_err(|e| status_err("token list", e))?;
            if json {
                let v: Vec<_> = tokens.iter().map(info_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<16}  {:<10}  {:<20}  {:<8}  note",
                    "id", "role", "user", "state"
                );
                for t in tokens {
                    let state = if t.revoked_unix_ms.is_some() {
                        "revoked"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<16}  {:<10}  {:<20}  {:<8}  {}",
                        t.id, t.role, t.user, state, t.note
                    );
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let info = c
                .revoke_token(id)
                .await
                .map_err(|e| status_err("token revoke", e))?;
            match (json, info) {
                (true, Some(i)) => println!("{}", info_json(&i)),
                (_, Some(i)) => println!("revoked {} ({}, {})", i.id, i.user, i.role),
                (_, None) => println!("revoked {id}"),
            }
        }
    }
    Ok(())
}

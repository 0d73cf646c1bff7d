//! The pure decision of the cloud pools' sweeper (kube pods, EC2 instances): given what
//! the pool tracks and what the cloud reports as owned by this coordinator, which
//! machines to delete and which leases have lost their machine. No I/O and no clock: the
//! caller passes `now` and applies the actions idempotently (deleting twice is fine).

use std::collections::HashMap;

/// Labels and tags the cloud pools put on every machine they make.
pub mod labels {
    /// The coordinator that owns the machine (the pool's `owner`).
    pub const OWNER: &str = "buildfarm.dev/owner";
    /// The host type the machine serves.
    pub const HOST_TYPE: &str = "buildfarm.dev/host-type";
    /// Unix seconds after which the machine is deleted, leased or not.
    pub const DEADLINE: &str = "buildfarm.dev/deadline";
    /// The pool's name for the machine (pod name, or the EC2 `Name` tag's value).
    pub const MACHINE: &str = "buildfarm.dev/machine";
}

/// What the cloud says about one machine carrying our owner label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The pool's name for the machine.
    pub machine: String,
    /// The deadline label, if present and a number.
    pub deadline: Option<u64>,
    pub state: MachineState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Starting or running.
    Alive,
    /// Stopped or failed but still there: it must be deleted.
    Dead,
    /// Already being deleted or terminated: nothing to do.
    Going,
}

/// What the pool itself holds for a machine it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// Being created; it may not be visible yet.
    Starting,
    /// Handed out in a lease.
    Leased,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delete or terminate this machine.
    Delete { machine: String, why: Why },
    /// The lease on this machine lost it: cancel its `lost` token.
    Lost { machine: String, why: Why },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Past its deadline.
    Expired,
    /// Carries our owner label but no readable deadline.
    NoDeadline,
    /// Ours, but no lease or start of this process holds it (left by a crash or restart).
    Orphan,
    /// It stopped or failed by itself.
    Died,
    /// The cloud no longer lists it.
    Vanished,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Expired => "past its deadline",
            Why::NoDeadline => "no deadline label",
            Why::Orphan => "held by no lease",
            Why::Died => "stopped or failed",
            Why::Vanished => "no longer listed",
        })
    }
}

/// Decides what to do; `now` is Unix seconds. Actions come in `observed` order, then
/// tracked machines the cloud no longer lists (sorted, so the result is stable).
pub fn reconcile(
    observed: &[Observed],
    tracked: &HashMap<String, Tracked>,
    now: u64,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for o in observed {
        let why = match (o.state, o.deadline) {
            (MachineState::Going, _) => None,
            (MachineState::Dead, _) => Some(Why::Died),
            (MachineState::Alive, None) => Some(Why::NoDeadline),
            (MachineState::Alive, Some(d)) if d <= now => Some(Why::Expired),
            (MachineState::Alive, Some(_)) if !tracked.contains_key(&o.machine) => {
                Some(Why::Orphan)
            }
            (MachineState::Alive, Some(_)) => None,
        };
        if let Some(why) = why {
            actions.push(Action::Delete {
                machine: o.machine.clone(),
                why,
            });
        }
        if tracked.get(&o.machine) == Some(&Tracked::Leased) {
            let lost = match o.state {
                MachineState::Going | MachineState::Dead => Some(Why::Died),
                MachineState::Alive => why.filter(|w| *w != Why::Orphan),
            };
            if let Some(why) = lost {
                actions.push(Action::Lost {
                    machine: o.machine.clone(),
                    why,
                });
            }
        }
    }
    let mut vanished: Vec<&String> = tracked
        .iter()
        .filter(|(m, t)| **t == Tracked::Leased && !observed.iter().any(|o| &o.machine == *m))
        .map(|(m, _)| m)
        .collect();
    vanished.sort();
    for m in vanished {
        actions.push(Action::Lost {
            machine: m.clone(),
            why: Why::Vanished,
        });
    }
    actions
}

/// A name for a new machine of `host_type` (pod name, EC2 `Name` tag):
/// `bf-<host type, DNS-safe>-<random>`.
pub fn machine_name(host_type: &str) -> String {
    let mut base: String = host_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(40);
    let base = base.trim_matches('-');
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    if base.is_empty() {
        format!("bf-{id}")
    } else {
        format!("bf-{base}-{id}")
    }
}

/// Unix seconds of `t`.
pub fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The default owner label of a coordinator's cloud machines: derived from the master
/// key, so it is stable across restarts and differs between farms.
pub fn default_owner(master_key: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"buildfarm pool owner\0");
    h.update(master_key);
    let d = h.finalize();
    format!("bf-{}", &hex::encode(&d[..5]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(machine: &str, deadline: Option<u64>, state: MachineState) -> Observed {
        Observed {
            machine: machine.into(),
            deadline,
            state,
        }
    }

    fn del(machine: &str, why: Why) -> Action {
        Action::Delete {
            machine: machine.into(),
            why,
        }
    }

    fn lost(machine: &str, why: Why) -> Action {
        Action::Lost {
            machine: machine.into(),
            why,
        }
    }

    #[test]
    fn table() {
        use MachineState::*;
        let tracked: HashMap<String, Tracked> = [
            ("leased".to_owned(), Tracked::Leased),
            ("starting".to_owned(), Tracked::Starting),
            ("leased-dead".to_owned(), Tracked::Leased),
            ("leased-expired".to_owned(), Tracked::Leased),
            ("leased-gone".to_owned(), Tracked::Leased),
            ("leased-vanished".to_owned(), Tracked::Leased),
            ("starting-unlisted".to_owned(), Tracked::Starting),
        ]
        .into_iter()
        .collect();
        let observed = [
            obs("leased", Some(200), Alive),
            obs("starting", Some(200), Alive),
            obs("orphan", Some(200), Alive),
            obs("orphan-going", Some(200), Going),
            obs("no-deadline", None, Alive),
            obs("leased-dead", Some(200), Dead),
            obs("leased-expired", Some(100), Alive),
            obs("leased-gone", Some(200), Going),
            obs("untracked-dead", Some(200), Dead),
        ];
        let actions = reconcile(&observed, &tracked, 100);
        assert_eq!(
            actions,
            [
                del("orphan", Why::Orphan),
                del("no-deadline", Why::NoDeadline),
                del("leased-dead", Why::Died),
                lost("leased-dead", Why::Died),
                del("leased-expired", Why::Expired),
                lost("leased-expired", Why::Expired),
                lost("leased-gone", Why::Died),
                del("untracked-dead", Why::Died),
                lost("leased-vanished", Why::Vanished),
            ]
        );
    }

    #[test]
    fn nothing_to_do_for_healthy_tracked_machines() {
        let tracked: HashMap<String, Tracked> = [("a".to_owned(), Tracked::Leased)].into();
        let observed = [obs("a", Some(1_000), MachineState::Alive)];
        assert!(reconcile(&observed, &tracked, 999).is_empty());
        assert_eq!(
            reconcile(&observed, &tracked, 1_000),
            [del("a", Why::Expired), lost("a", Why::Expired)]
        );
    }

    #[test]
    fn owner_defaults_differ_per_key_and_are_label_values() {
        let a = default_owner(b"key one");
        assert_eq!(a, default_owner(b"key one"));
        assert_ne!(a, default_owner(b"key two"));
        assert_eq!(a.len(), 13);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    }
}

//! Switching a slot between versions: activate, turn off, roll back (by hand, or automatically
//! after repeated faults). Each switch is one transaction, serialised per slot, recorded as an
//! event, and followed by a NOTIFY, after which every server swaps the slot's plugin.
//!
//! Rolling back walks the slot's history like a stack: activating a version pushes it, a
//! rollback pops back to the version active before, so rolling back twice from v3 reaches v1
//! (not v3 again), and a version rolled back from is not returned to by the next rollback.

use sqlx::{PgConnection, PgPool};

use super::{PluginError, PluginKind};
use crate::storage::{plugins, plugins_channel};

/// Activates `version` of `slot` on every server.
pub async fn activate(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    version: i32,
    actor: &str,
) -> Result<(), PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    plugins::lock_slot(&mut tx, slot).await?;
    if plugins::active_version(&mut tx, slot).await? == Some(version) {
        return Ok(());
    }
    if !plugins::activate(&mut tx, slot, version, "activated", actor, None).await? {
        return Err(PluginError::NotFound(format!(
            "{slot} has no version {version}"
        )));
    }
    plugins::notify_changed(&mut tx, &plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(slot, version, actor, "plugin activated");
    Ok(())
}

/// Turns `slot` off on every server (the built-in policy decides); returns the version that
/// was active, if one was.
pub async fn deactivate(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    actor: &str,
) -> Result<Option<i32>, PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    plugins::lock_slot(&mut tx, slot).await?;
    let Some(current) = plugins::active_version(&mut tx, slot).await? else {
        return Ok(None);
    };
    plugins::deactivate(&mut tx, slot, actor, "turned off").await?;
    plugins::notify_changed(&mut tx, &plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(slot, version = current, actor, "plugin slot turned off");
    Ok(Some(current))
}

/// Reactivates the version that was active before the current one; returns it.
pub async fn rollback(
    pool: &PgPool,
    schema: &str,
    slot: &str,
    actor: &str,
) -> Result<i32, PluginError> {
    PluginKind::of_slot(slot)?;
    let mut tx = pool.begin().await?;
    plugins::lock_slot(&mut tx, slot).await?;
    let current = plugins::active_version(&mut tx, slot)
        .await?
        .ok_or_else(|| {
            PluginError::NotFound(format!("{slot} has no active version to roll back from"))
        })?;
    let previous = previous_version(&mut tx, slot).await?.ok_or_else(|| {
        PluginError::NotFound(format!("{slot}@{current} has no earlier active version"))
    })?;
    plugins::activate(
        &mut tx,
        slot,
        previous,
        "rolled back",
        actor,
        Some(&format!("from version {current}")),
    )
    .await?;
    plugins::notify_changed(&mut tx, &plugins_channel(schema), slot).await?;
    tx.commit().await?;
    tracing::info!(
        slot,
        from = current,
        to = previous,
        actor,
        "plugin rolled back"
    );
    Ok(previous)
}

/// What an automatic rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRollback {
    /// The version active before the faulty one is active again.
    Restored(i32),
    /// The faulty version had no predecessor: the slot is off, the built-in policy decides.
    TurnedOff,
    /// The faulty version is no longer active (another server, or an operator, acted first).
    AlreadyReplaced,
}

/// The automatic rollback of a faulty plugin (label "slot@version#sha"): only if that version
/// is still the active one; with no earlier version the slot is turned off (built-in policy).
pub async fn rollback_faulty(
    pool: &PgPool,
    channel: &str,
    label: &str,
    reason: &str,
) -> Result<AutoRollback, PluginError> {
    let parsed = label.split_once('@').and_then(|(slot, rest)| {
        let version = rest.split('#').next()?.parse::<i32>().ok()?;
        Some((slot, version))
    });
    let Some((slot, version)) = parsed else {
        return Err(PluginError::Invalid(format!(
            "{label:?} is not a plugin label"
        )));
    };
    let mut tx = pool.begin().await?;
    plugins::lock_slot(&mut tx, slot).await?;
    if plugins::active_version(&mut tx, slot).await? != Some(version) {
        return Ok(AutoRollback::AlreadyReplaced);
    }
    let outcome = match previous_version(&mut tx, slot).await? {
        Some(previous) => {
            plugins::activate(
                &mut tx,
                slot,
                previous,
                "rolled back automatically",
                "hangar",
                Some(reason),
            )
            .await?;
            AutoRollback::Restored(previous)
        }
        None => {
            plugins::deactivate(&mut tx, slot, "hangar", reason).await?;
            AutoRollback::TurnedOff
        }
    };
    plugins::notify_changed(&mut tx, channel, slot).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// The version a rollback of `slot` returns to (the caller holds the slot's lock).
async fn previous_version(conn: &mut PgConnection, slot: &str) -> Result<Option<i32>, PluginError> {
    let switches = plugins::switches(conn, slot).await?;
    let stack = replay(
        switches
            .iter()
            .map(|(event, version)| (event.as_str(), *version)),
    );
    Ok(stack.iter().rev().skip(1).flatten().next().copied())
}

/// The slot's history as a stack of what was active (None: turned off), from its switches in
/// order. The top is what is active now.
fn replay<'a>(switches: impl Iterator<Item = (&'a str, Option<i32>)>) -> Vec<Option<i32>> {
    let mut stack: Vec<Option<i32>> = Vec::new();
    for (event, version) in switches {
        match event {
            "rolled back" | "rolled back automatically" => {
                // Back past the version rolled back from (and any time the slot was off) to
                // the one now active again.
                stack.pop();
                while stack.last().is_some_and(|top| top.is_none()) {
                    stack.pop();
                }
                if stack.last() != Some(&version) {
                    stack.push(version);
                }
            }
            "deactivated" => stack.push(None),
            _ => {
                if stack.last() != Some(&version) {
                    stack.push(version);
                }
            }
        }
    }
    stack
}

#[cfg(test)]
mod tests {
    use super::replay;

    fn previous(switches: &[(&'static str, Option<i32>)]) -> Option<i32> {
        let stack = replay(switches.iter().copied());
        stack.iter().rev().skip(1).flatten().next().copied()
    }

    #[test]
    fn rolling_back_walks_back_through_history() {
        let activate = |v| ("activated", Some(v));
        let rolled = |v| ("rolled back", Some(v));
        assert_eq!(previous(&[activate(1)]), None);
        assert_eq!(previous(&[activate(1), activate(2)]), Some(1));
        assert_eq!(previous(&[activate(1), activate(2), activate(3)]), Some(2));
        // From 3 back to 2, then from 2 back to 1 (not to 3 again).
        assert_eq!(
            previous(&[activate(1), activate(2), activate(3), rolled(2)]),
            Some(1)
        );
        assert_eq!(
            previous(&[activate(1), activate(2), activate(3), rolled(2), rolled(1)]),
            None
        );
        // An automatic rollback away from a faulty 2 does not lead back to it.
        assert_eq!(
            previous(&[
                activate(1),
                activate(2),
                ("rolled back automatically", Some(1))
            ]),
            None
        );
        // Turned off in between: the previous version is the last one that was active.
        assert_eq!(
            previous(&[activate(1), ("deactivated", None), activate(2)]),
            Some(1)
        );
    }
}

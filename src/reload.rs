//! A configuration reload (SIGHUP, `turnpike reload`): a newly read and validated [`RelayConfig`] is
//! compared with the running one; what cannot change live ([`Fixed`](crate::config::Fixed)) is
//! reported and kept, what can ([`Live`](crate::config::Live)) goes to the running relay without
//! dropping an allocation ([`Reloader::reload`]), then to the HTTP API ([`ApiReload`]). Every reload is counted in the relay's
//! [`Reloads`](crate::metrics::Reloads), as a success or a failure.
//!
//! The caller (`main`) reads the file, applies the command line's overrides and loads the TLS files
//! before calling [`apply`], so that a failure at any step changes nothing; it then sets the log level
//! and the TLS configuration from the returned settings.
//!
//! May use: config, control, server, metrics, api.

use crate::api::ApiReload;
use crate::clock::unix_now;
use crate::config::RelayConfig;
use crate::control::Reloader;
use crate::server::Revoked;

/// What a successful reload did.
#[derive(Debug)]
pub struct Applied {
    /// One line per fixed setting that differs in the new file (kept as it was).
    pub ignored: Vec<String>,
    /// The allocations whose permissions or channels the new peer policy removed.
    pub revoked: Vec<Revoked>,
}

/// Reload `running` from `new` (the file just read and validated, or why it could not be, as
/// `turnpike check-config` words it: `key: problem`): on success
/// `running.live` is the new file's and the relay runs with it; on failure nothing changes. Either way
/// the reload is counted. Logs the ignored fixed settings (one warning each) and the failure.
pub fn apply(
    running: &mut RelayConfig,
    new: Result<RelayConfig, String>,
    relay: &Reloader,
    api: Option<&ApiReload>,
) -> Result<Applied, String> {
    let result = try_apply(running, new, relay, api);
    relay.reloads().record(result.is_ok(), unix_now());
    match &result {
        Ok(a) => {
            for line in &a.ignored {
                tracing::warn!("reload: {line}");
            }
            tracing::info!(
                ignored = a.ignored.len(),
                allocations_changed = a.revoked.len(),
                "configuration reloaded"
            );
        }
        Err(e) => tracing::error!("reload failed, nothing changed: configuration error: {e}"),
    }
    result
}

fn try_apply(
    running: &mut RelayConfig,
    new: Result<RelayConfig, String>,
    relay: &Reloader,
    api: Option<&ApiReload>,
) -> Result<Applied, String> {
    let new = new?;
    let ignored = running.fixed.changes(&new.fixed);
    let mut applied = RelayConfig {
        fixed: running.fixed.clone(),
        live: new.live,
    };
    // `[api]` added or removed needs a restart (reported with the fixed changes): keep the API's.
    if applied.fixed.api.is_some() != new.fixed.api.is_some() {
        applied.live.api = running.live.api.clone();
    }
    let revoked = relay.reload(applied.server()).map_err(|e| e.to_string())?;
    if let (Some(handle), Some(config)) = (api, applied.api()) {
        handle.set(config, applied.live.rest_secrets.clone());
    }
    running.live = applied.live;
    Ok(Applied { ignored, revoked })
}

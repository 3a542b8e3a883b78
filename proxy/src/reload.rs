//! Reloads (SIGHUP, `portico reload`) of `portico serve` and `portico pool`: the config file
//! is read again, and each pooled app gets a new generation of workers with its code as it is
//! now and its new settings, as gunicorn's HUP and nginx's reload apply theirs. What the
//! server acts on itself (its listeners and threads, and how it routes and reads an app's
//! requests: [`portico_config::SERVER_SIDE_APP_KEYS`]) needs a restart, and the log names
//! what is left for one.

use portico_config::{changed_app_keys, changed_settings, Config, Routing};
use portico_core::{Dispatcher, Reloaded};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The config file's text as the server started with it: the pools' first generations run
/// it, and a reload compares the file with it to tell what it could not apply.
pub(crate) struct ConfigSnapshot {
    path: PathBuf,
    text: Arc<str>,
}

impl ConfigSnapshot {
    /// Reads the file once, for the server and its workers alike. Errors are the file's
    /// (named as `path` was given).
    pub(crate) fn read(path: &Path) -> Result<ConfigSnapshot, portico_config::ConfigErrors> {
        let text = Config::read_text(path)?;
        Ok(ConfigSnapshot {
            // Absolute: an in-process app's `chdir` changes the working directory later.
            path: std::path::absolute(path).unwrap_or(path.to_path_buf()),
            text: text.into(),
        })
    }

    /// The file as the server started with it.
    pub(crate) fn text(&self) -> Arc<str> {
        self.text.clone()
    }

    /// The file, absolute.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// [`reload`] with a file: `None` when the file refused it.
    fn reload_settings(&self, dispatcher: &Dispatcher, scope: &Scope) -> Option<Vec<Reloaded>> {
        let read = Config::read_text(&self.path).and_then(|text| {
            Config::from_text(&text, &self.path, scope.routing).map(|config| (config, text))
        });
        let (mut config, text) = match read {
            Ok(read) => read,
            Err(errors) => {
                // Each error names the file, and its line and key where it has them.
                let why: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                log::error!(
                    "reload refused, everything goes on as it was: {}",
                    why.join("; ")
                );
                return None;
            }
        };
        (scope.prepare)(&mut config);
        let text: Arc<str> = text.into();
        let outcomes = dispatcher.reload(Some((&config.app, text.clone())));
        // Pools are compared with the settings their generation kept, read from the text it
        // came from (an earlier reload may have applied others than the server started with).
        let pooled = |app: &str| outcomes.iter().any(|r| r.app == app);
        let mut unapplied =
            changed_settings(&self.text, &text, |app| !(scope.serves)(app) || pooled(app));
        if !scope.uses_server_table {
            unapplied.retain(|change| !change.starts_with("server."));
        }
        for reloaded in &outcomes {
            if let Some(kept) = &reloaded.kept_settings_of {
                let keys = changed_app_keys(kept, &text, &reloaded.app);
                if !keys.is_empty() {
                    unapplied.push(format!("app `{}`: {}", reloaded.app, keys.join(", ")));
                }
            }
        }
        if !unapplied.is_empty() {
            log::warn!(
                "{}: a reload does not apply these changes to the settings running ({}): restart the server to apply them",
                self.path.display(),
                unapplied.join("; ")
            );
        }
        Some(outcomes)
    }
}

/// What a process runs of its config file, which a reload reads again.
pub(crate) struct Scope<'a> {
    /// How the file is read (`portico serve` routes by mount; a pool server routes nothing).
    pub(crate) routing: Routing,
    /// Makes the file's apps what this process runs of them.
    pub(crate) prepare: &'a dyn Fn(&mut Config),
    /// Whether this process runs an app: changes to the others are not its to report.
    pub(crate) serves: &'a dyn Fn(&str) -> bool,
    /// Whether this process acts on `[server]` (a pool server does not).
    pub(crate) uses_server_table: bool,
}

/// Reloads the pooled apps of `dispatcher`: with `snapshot`, the file is read again and each
/// pooled app gets a new generation with its new settings (see [`Dispatcher::reload`]), and
/// the log names the changes in `scope` the reload did not apply. A file that is now invalid
/// refuses the reload, with its errors: every generation goes on as it is. Without a file
/// (`portico run`), the pools load their new code only.
pub(crate) fn reload(dispatcher: &Dispatcher, snapshot: Option<&ConfigSnapshot>, scope: &Scope) {
    let outcomes = match snapshot {
        Some(snapshot) => match snapshot.reload_settings(dispatcher, scope) {
            Some(outcomes) => outcomes,
            None => return,
        },
        None => dispatcher.reload(None),
    };
    for reloaded in outcomes {
        if let Err(e) = reloaded.outcome {
            log::error!(
                "app `{}`: reload failed, the old workers go on: {e}",
                reloaded.app
            );
        }
    }
}

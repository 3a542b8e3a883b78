//! `touch_reload`: a pooled app reloads when one of its listed files changes, as Passenger's
//! app pools restart on a touched `tmp/restart.txt`, mod_wsgi's daemon processes on a
//! touched WSGI script, and uWSGI on its `touch-reload` files. So a developer who may not
//! signal the server (nginx's master runs as root) deploys new code with `touch`.
//!
//! The reload is [`Pool::reload`] with the settings the pool runs: the new generation gets
//! the app's code as it is now; changed settings still take `portico reload` or
//! `nginx -s reload`, which are the sysadmin's.

use super::Pool;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

/// How often the files are looked at: a `stat` each, cheap enough to do every second, and
/// soon enough for someone who has just deployed.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Starts the thread that watches the pool's `touch_reload` files, unless its current
/// generation lists none or the thread runs already (it follows the list of whichever
/// generation is current, so a reload may add files or take them away).
pub(super) fn watch(pool: &Arc<Pool>) {
    if pool.current().settings.app.touch_reload.is_empty()
        || pool.touch_watched.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let weak = Arc::downgrade(pool);
    let spawned = std::thread::Builder::new()
        .name(format!("{}-touch", pool.name))
        .spawn(move || run(&weak));
    if let Err(e) = spawned {
        pool.touch_watched.store(false, Ordering::Release);
        log::error!(
            "app `{}`: cannot watch its touch_reload files, touching them will not reload it: {e}",
            pool.name
        );
    }
}

/// Looks at the files every [`LOOK_EVERY`] until the pool stops, and reloads the pool when
/// one was touched. It holds the pool only while it looks, so a pool dropped without being
/// stopped ends it too.
fn run(pool: &Weak<Pool>) {
    let mut seen = Seen::default();
    loop {
        let Some(pool) = pool.upgrade() else {
            return;
        };
        if pool.stopping.load(Ordering::Acquire) {
            return;
        }
        let files = pool.current().settings.app.touch_reload.clone();
        if let Some(file) = seen.touched(&files) {
            log::info!(
                "app `{}`: {} was touched: reloading (touch_reload)",
                pool.name,
                file.display()
            );
            pool.record_event(format!("{} was touched: reloading", file.display()));
            // A failure is logged and recorded by the reload; the old generation serves on,
            // and the next touch tries again.
            let _ = pool.reload(None);
        }
        drop(pool);
        std::thread::sleep(LOOK_EVERY);
    }
}

/// The modification time of each file as last seen; `None` while it does not exist.
#[derive(Default)]
struct Seen(HashMap<PathBuf, Option<SystemTime>>);

impl Seen {
    /// Looks at `files` and says the first one touched since the last look: modified, or
    /// created. A file seen for the first time (at start, or new in the list after a
    /// reload) is only noted, and one that was removed reloads nothing.
    fn touched(&mut self, files: &[PathBuf]) -> Option<PathBuf> {
        self.0.retain(|file, _| files.contains(file));
        let mut touched = None;
        for file in files {
            let now = modified(file);
            let before = self.0.insert(file.clone(), now);
            if matches!(before, Some(before) if now.is_some() && now != before) {
                touched.get_or_insert_with(|| file.clone());
            }
        }
        touched
    }
}

fn modified(file: &Path) -> Option<SystemTime> {
    std::fs::metadata(file).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_touch_or_a_creation_counts_a_first_sight_or_a_removal_does_not() {
        let dir = std::env::temp_dir().join(format!("portico-touch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (there, later) = (dir.join("restart.txt"), dir.join("later.txt"));
        std::fs::write(&there, "").unwrap();
        let files = [there.clone(), later.clone()];
        let mut seen = Seen::default();
        assert_eq!(seen.touched(&files), None, "first sight");
        assert_eq!(seen.touched(&files), None, "nothing changed");
        let touch = |file: &Path, at: u64| {
            let time = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(file)
                .unwrap()
                .set_modified(time)
                .unwrap();
        };
        touch(&there, 1_000_000);
        assert_eq!(seen.touched(&files), Some(there.clone()));
        assert_eq!(seen.touched(&files), None, "counted once");
        touch(&later, 2_000_000);
        assert_eq!(seen.touched(&files), Some(later.clone()), "created");
        std::fs::remove_file(&there).unwrap();
        assert_eq!(seen.touched(&files), None, "removed");
        // A file new to the list is noted, not counted.
        let more = [there.clone(), later.clone(), dir.join("wsgi.py")];
        std::fs::write(&more[2], "").unwrap();
        assert_eq!(seen.touched(&more), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

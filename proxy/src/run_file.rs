//! `portico run --workers N`: pool workers load their app from a config file, and `run` has
//! none, so it writes the `[[app]]` its flags make to a private file in `TMPDIR`, which the
//! workers (and their replacements) read, and removes it when the server stops.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The app of `portico run`, as the flags gave it, for its workers.
pub(crate) struct RunApp<'a> {
    pub(crate) target: &'a str,
    pub(crate) interface: &'a str,
    pub(crate) event_loop: &'a str,
    pub(crate) lifespan: &'a str,
    pub(crate) ws_deflate: bool,
    pub(crate) threads: usize,
    pub(crate) processes: usize,
    pub(crate) chdir: Option<&'a Path>,
    pub(crate) python_home: Option<&'a Path>,
    pub(crate) python_path: &'a [PathBuf],
}

impl RunApp<'_> {
    /// The portico.toml text with this one app, in pool mode. Paths are made absolute: the
    /// file lives elsewhere than the directory `run` started in.
    pub(crate) fn to_toml(&self, name: &str) -> String {
        use toml::Value;
        let path = |p: &Path| {
            Value::String(
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let mut app = toml::Table::new();
        let text = |s: &str| Value::String(s.to_owned());
        app.insert("name".into(), text(name));
        app.insert("target".into(), text(self.target));
        app.insert("interface".into(), text(self.interface));
        app.insert("mode".into(), text("pool"));
        app.insert("processes".into(), Value::Integer(self.processes as i64));
        app.insert("threads".into(), Value::Integer(self.threads as i64));
        app.insert("loop".into(), text(self.event_loop));
        app.insert("lifespan".into(), text(self.lifespan));
        app.insert(
            "websocket_per_message_deflate".into(),
            Value::Boolean(self.ws_deflate),
        );
        if let Some(dir) = self.chdir {
            app.insert("chdir".into(), path(dir));
        }
        if let Some(home) = self.python_home {
            app.insert("python_home".into(), path(home));
        }
        app.insert(
            "python_path".into(),
            Value::Array(self.python_path.iter().map(|p| path(p)).collect()),
        );
        let mut doc = toml::Table::new();
        doc.insert("app".into(), Value::Array(vec![Value::Table(app)]));
        format!(
            "# Written by `portico run --workers` for its pool workers; removed when it stops.\n{doc}"
        )
    }
}

/// The file, removed when dropped.
pub(crate) struct RunFile(PathBuf);

impl RunFile {
    /// Writes `text` to a new file readable by this user only.
    pub(crate) fn write(text: &str) -> std::io::Result<RunFile> {
        let path = std::env::temp_dir().join(format!("portico-run-{}.toml", std::process::id()));
        // One left by an earlier process with the same pid is stale.
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        file.write_all(text.as_bytes())?;
        Ok(RunFile(path))
    }

    /// Where it is.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

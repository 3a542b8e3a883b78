//! `portico run --workers N`: pool workers load their app from a config file, and `run` has
//! none, so it writes the `[[app]]` its flags make to a file in a private directory of its
//! own in `TMPDIR`, which the workers (and their replacements) read, and removes both when
//! the server stops.

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
    /// file lives elsewhere than the directory `run` started in. Relative `python_path`
    /// entries are relative to `chdir` when it is set, as in-process, where they are added
    /// after the change of directory.
    pub(crate) fn to_toml(&self, name: &str) -> String {
        use toml::Value;
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let path = |p: &Path| Value::String(absolute(p).to_string_lossy().into_owned());
        let import_path = |p: &Path| match self.chdir {
            Some(dir) if p.is_relative() => path(&absolute(dir).join(p)),
            _ => path(p),
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
            Value::Array(self.python_path.iter().map(|p| import_path(p)).collect()),
        );
        let mut doc = toml::Table::new();
        doc.insert("app".into(), Value::Array(vec![Value::Table(app)]));
        format!(
            "# Written by `portico run --workers` for its pool workers; removed when it stops.\n{doc}"
        )
    }
}

/// The file (`portico.toml` in a directory of its own), removed with its directory when
/// dropped.
pub(crate) struct RunFile(PathBuf);

impl RunFile {
    /// Writes `text` to a new file in a new directory that only this user can enter
    /// (`mkdtemp`: a name nobody can take first, in a directory nobody can swap the file in).
    pub(crate) fn write(text: &str) -> std::io::Result<RunFile> {
        let dir = private_dir()?;
        let path = dir.join("portico.toml");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ));
        }
        Ok(RunFile(path))
    }

    /// Where it is.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A new directory `portico-run-XXXXXX` in `TMPDIR`, mode 0700.
fn private_dir() -> std::io::Result<PathBuf> {
    let template = std::env::temp_dir().join("portico-run-XXXXXX");
    let mut bytes = template.into_os_string().into_encoded_bytes();
    bytes.push(0);
    // SAFETY: `bytes` is a NUL-terminated path template that mkdtemp rewrites in place (only
    // its X's, with ASCII).
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "cannot make a directory in {}: {e}",
                std::env::temp_dir().display()
            ),
        ));
    }
    bytes.pop();
    // SAFETY: mkdtemp kept the bytes a path of the same encoding (it replaced X's by ASCII).
    Ok(PathBuf::from(unsafe {
        std::ffi::OsString::from_encoded_bytes_unchecked(bytes)
    }))
}

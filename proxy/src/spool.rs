//! Request bodies read whole before the app is called (`request_buffering`): in memory up to
//! [`IN_MEMORY`], past it in an unlinked file in `TMPDIR`, as nginx spills a body larger than
//! `client_body_buffer_size` to `client_body_temp_path`.

use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes of one body kept in memory; a larger body goes to a file.
pub(crate) const IN_MEMORY: u64 = 1 << 20;

/// Largest piece read back from the file at once.
const PIECE: u64 = 64 * 1024;

/// A body being read.
#[derive(Default)]
pub(crate) struct Spool {
    pieces: Vec<Bytes>,
    file: Option<Arc<File>>,
    len: u64,
}

/// A body read whole.
pub(crate) enum Buffered {
    /// In memory, in the pieces it arrived in.
    Memory(Vec<Bytes>),
    /// In a file, read back piece by piece as the app asks.
    File(SpooledFile),
}

impl Spool {
    /// Adds the next piece of the body.
    pub(crate) async fn push(&mut self, data: Bytes) -> io::Result<()> {
        let len = data.len() as u64;
        if self.file.is_none() && self.len + len > IN_MEMORY {
            let held = std::mem::take(&mut self.pieces);
            let file = blocking(move || {
                let file = temp_file()?;
                let mut at = 0;
                for piece in held {
                    file.write_all_at(&piece, at)?;
                    at += piece.len() as u64;
                }
                Ok(file)
            })
            .await?;
            self.file = Some(Arc::new(file));
        }
        match &self.file {
            Some(file) => {
                let (file, at) = (file.clone(), self.len);
                blocking(move || file.write_all_at(&data, at)).await?;
            }
            None => self.pieces.push(data),
        }
        self.len += len;
        Ok(())
    }

    /// How many bytes the body has.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The whole body.
    pub(crate) fn finish(self) -> Buffered {
        match self.file {
            Some(file) => Buffered::File(SpooledFile {
                file,
                at: 0,
                len: self.len,
            }),
            None => Buffered::Memory(self.pieces),
        }
    }
}

/// A body in a file, handed to the app piece by piece.
pub(crate) struct SpooledFile {
    file: Arc<File>,
    at: u64,
    len: u64,
}

impl SpooledFile {
    /// The next piece, or `None` at the end.
    pub(crate) async fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        let want = PIECE.min(self.len - self.at) as usize;
        if want == 0 {
            return Ok(None);
        }
        let (file, at) = (self.file.clone(), self.at);
        let data = blocking(move || {
            let mut buf = vec![0; want];
            file.read_exact_at(&mut buf, at)?;
            Ok(buf)
        })
        .await?;
        self.at += want as u64;
        Ok(Some(Bytes::from(data)))
    }
}

/// File work off the event loop's thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// A new file in `TMPDIR` that only this process can reach: an anonymous one (`O_TMPFILE`)
/// where the file system has them, else one created exclusively under a name of its own,
/// readable by its owner only, and unlinked at once. Either way it goes away with its last
/// descriptor, whatever happens to the server.
fn temp_file() -> io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    let failed = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot create a file for a request body in {}: {e}",
                dir.display()
            ),
        )
    };
    let anonymous = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir);
    // Where it is not offered (EOPNOTSUPP; EISDIR on old kernels), a named file; a real
    // problem (no such directory, no permission) fails that one too, and is reported.
    if let Ok(file) = anonymous {
        return Ok(file);
    }
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for _ in 0..16 {
        let path = dir.join(format!(
            "portico-body-{}-{}-{salt:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            // Taken (by a stale file, or by someone else): try another name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(failed(e)),
        }
    }
    Err(failed(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "every name tried was taken",
    )))
}

//! Follows the error log a process writes to on its standard error when the file is rotated
//! under it: logrotate renames the file, `nginx -s reopen` creates a new one at the old path,
//! and a descriptor opened before goes on writing into the renamed file. nginx's own
//! processes reopen on the signal; the pool nginx starts (its watchdog, its server and their
//! workers) has no such signal, so each of its processes looks at the path once a second, as
//! Python's `WatchedFileHandler` does, and moves its standard error (and its standard output,
//! when that is the same file) to the file now there.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The variable that names the file: set by the nginx module for the pool it starts, and
/// passed on to the pool's workers with the rest of its environment.
pub const ERROR_LOG_VARIABLE: &str = "PORTICO_ERROR_LOG";

/// How often the path is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Starts following the file named by [`ERROR_LOG_VARIABLE`], if it names an absolute path;
/// does nothing otherwise (a `portico serve` under systemd writes to the journal).
pub fn follow_from_environment() {
    let Some(path) = std::env::var_os(ERROR_LOG_VARIABLE).map(PathBuf::from) else {
        return;
    };
    if !path.is_absolute() {
        return;
    }
    // The thread starts with every signal blocked (it inherits the mask of the thread that
    // starts it): the process's signals (SIGCHLD, SIGTERM, SIGHUP) are for the threads that
    // wait for them, and one delivered here would be lost.
    // SAFETY: sigset_t is plain data; sigfillset and pthread_sigmask only read and write
    // the sets given, and the caller's mask is put back right after the spawn.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
        let _ = std::thread::Builder::new()
            .name("error-log".into())
            .spawn(move || loop {
                std::thread::sleep(LOOK_EVERY);
                reopen_if_replaced(&path);
            });
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
    }
}

/// The (device, inode) of an open descriptor.
fn identity_of(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: a stat is plain data, valid all zero; fstat only writes into it.
    let mut info: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a live, writable stat.
    if unsafe { libc::fstat(fd, &mut info) } != 0 {
        return None;
    }
    Some((info.st_dev, info.st_ino))
}

/// Moves standard error (and standard output, if it was the same file) to the file at
/// `path` when that is no longer the file they write to. A path with no file yet (between
/// the rename and the reopen) or one this process may not open leaves them as they are.
fn reopen_if_replaced(path: &Path) {
    let Ok(now) = std::fs::metadata(path) else {
        return;
    };
    let Some(current) = identity_of(libc::STDERR_FILENO) else {
        return;
    };
    if (now.dev(), now.ino()) == current {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new().append(true).open(path) else {
        return;
    };
    let stdout_too = identity_of(libc::STDOUT_FILENO) == Some(current);
    // SAFETY: dup2 onto the standard descriptors, which this process owns; it swaps the
    // file under them atomically, so a write in another thread goes to one file or the other.
    unsafe {
        libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO);
        if stdout_too {
            libc::dup2(file.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

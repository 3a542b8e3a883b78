//! The core's `log` records (app tracebacks, protocol errors) into nginx's error log.
//!
//! Records come from Python threads, where nginx's log objects must not be touched. nginx
//! points a worker's standard error at its main `error_log` file (`ngx_log_redirect_stderr`),
//! so each record is formatted as nginx formats its own lines and written to fd 2 with one
//! `write`, which the kernel keeps whole against other writers of the file (`O_APPEND`).

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct ErrorLog;

static LOGGER: ErrorLog = ErrorLog;

/// Installs the logger (once per process) and keeps records at or above nginx's `error_log`
/// level (`level`: nginx's numeric level, `NGX_LOG_ERR` = 4 ... `NGX_LOG_DEBUG` = 8).
pub fn install(level: usize) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter_for(level));
}

/// The records nginx's `error_log` level keeps (`level` as in [`install`]): the module's own
/// and, as `PORTICO_LOG`, the pool's.
pub fn filter_for(level: usize) -> LevelFilter {
    match level {
        // `crit`, `alert`, `emerg`: above anything the core logs (its worst is `error`).
        1..=3 => LevelFilter::Off,
        0 | 4 => LevelFilter::Error,
        5 => LevelFilter::Warn,
        6 | 7 => LevelFilter::Info,
        _ => LevelFilter::Debug,
    }
}

impl Log for ErrorLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug | Level::Trace => "debug",
        };
        let line = format!(
            "{} [{level}] {}#{}: portico: {}\n",
            now(),
            std::process::id(),
            thread_id(),
            record.args()
        );
        // One write for the whole record: nginx's error log is opened with O_APPEND.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Local time as nginx writes it in the error log: `2024/05/01 12:00:00`.
fn now() -> String {
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes only to
    // the `tm` it is given.
    unsafe {
        let t = libc::time(core::ptr::null_mut());
        let mut tm: libc::tm = core::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!(
            "{:04}/{:02}/{:02} {:02}:{:02}:{:02}",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec
        )
    }
}

/// The kernel's id of the calling thread (nginx prints its own thread's the same way).
fn thread_id() -> i64 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

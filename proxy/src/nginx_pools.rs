//! Finding the pools an nginx master started, for `portico status --nginx`: the master runs
//! each as `portico pool --watchdog --config FILE --socket-dir DIR --app NAME...` (the
//! module's `pool.rs`), so its children's command lines say where every app's socket is, as
//! `passenger-status` finds the agents of Passenger's nginx module.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// A pool server an nginx master started, as its watchdog's command line describes it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NginxPool {
    /// The watchdog's pid.
    pub pid: u32,
    /// The `portico.toml` it serves.
    pub config: PathBuf,
    /// Where the socket of each app is (`DIR/NAME.sock`).
    pub socket_dir: PathBuf,
    /// The apps it serves; empty: every pooled app of `config` without a `pool_socket`.
    pub apps: Vec<String>,
    /// The descriptor its end of the master's lifeline is on (`--lifeline-fd`).
    pub lifeline_fd: Option<u32>,
}

/// The master's pid, from nginx's pid file.
pub(crate) fn master_pid(pid_file: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("{}: {e} (is nginx running?)", pid_file.display()))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{}: not a pid: {:?}", pid_file.display(), text.trim()))
}

/// The pools `master` runs, oldest first: two for a moment after a reload that changed
/// their settings, while the old one finishes its requests.
///
/// A watchdog is the master's when it is its child (nginx with `daemon off`, or a pool a
/// reload started), or when its lifeline (`--lifeline-fd`) is a pipe the master holds the
/// other end of. With `daemon on` the process that read the configuration first, and started
/// the pool, exits as nginx daemonizes; its watchdog then belongs to init, and only the
/// lifeline, which the master inherited, ties the two. (Reading the master's descriptors
/// needs root, or nginx's master user.)
pub(crate) fn pools_of(master: u32) -> Vec<NginxPool> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let master_pipes = pipes_of(master);
    let mut pools: Vec<NginxPool> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = cmdline
                .split(|&b| b == 0)
                .filter(|arg| !arg.is_empty())
                .map(|arg| OsString::from_vec(arg.to_vec()));
            parse_watchdog(pid, args)
        })
        .filter(|pool| {
            parent_of(pool.pid) == Some(master)
                || pool
                    .lifeline_fd
                    .and_then(|fd| pipe_at(pool.pid, fd))
                    .is_some_and(|pipe| master_pipes.contains(&pipe))
        })
        .collect();
    pools.sort_by_key(|pool| pool.pid);
    pools
}

/// Whether a process with this pid runs.
pub(crate) fn is_running(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pipes process `pid` has open, by inode.
fn pipes_of(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| pipe_inode(&fd.path()))
        .collect()
}

/// The inode of the pipe on descriptor `fd` of process `pid`, if it is one.
fn pipe_at(pid: u32, fd: u32) -> Option<u64> {
    pipe_inode(Path::new(&format!("/proc/{pid}/fd/{fd}")))
}

/// A `/proc/PID/fd/N` link's pipe inode (the link reads `pipe:[INODE]`).
fn pipe_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("pipe:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The parent of `pid`, from `/proc/PID/stat` (proc(5): the field after the state, which
/// follows the command name's closing parenthesis).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// A watchdog's pool, from its command line; `None` for any other process.
fn parse_watchdog(pid: u32, args: impl IntoIterator<Item = OsString>) -> Option<NginxPool> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != "pool" {
        return None;
    }
    let (mut watchdog, mut config, mut socket_dir, mut apps) = (false, None, None, Vec::new());
    let mut lifeline_fd = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--watchdog") => watchdog = true,
            Some("--config") => config = args.next().map(PathBuf::from),
            Some("--socket-dir") => socket_dir = args.next().map(PathBuf::from),
            Some("--app") => apps.extend(args.next()?.into_string().ok()),
            Some("--lifeline-fd") => lifeline_fd = args.next()?.to_str()?.parse().ok(),
            _ => {}
        }
    }
    Some(NginxPool {
        pid,
        config: config?,
        socket_dir: socket_dir?,
        apps,
        lifeline_fd,
    })
    .filter(|_| watchdog)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<OsString> {
        line.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn a_watchdog_s_command_line_names_its_config_sockets_and_apps() {
        let line = "/usr/bin/portico pool --watchdog --config /etc/p.toml --socket-dir \
                    /tmp/portico-nginx-a1 --lifeline-fd 3 --app site --app api --user 33:33";
        assert_eq!(
            parse_watchdog(7, args(line)),
            Some(NginxPool {
                pid: 7,
                config: "/etc/p.toml".into(),
                socket_dir: "/tmp/portico-nginx-a1".into(),
                apps: vec!["site".into(), "api".into()],
                lifeline_fd: Some(3),
            })
        );
    }

    #[test]
    fn other_children_of_the_master_are_not_pools() {
        for line in [
            "nginx: worker process",
            "/usr/bin/portico pool --config /etc/p.toml --socket-dir /tmp/d",
            "/usr/bin/portico serve --config /etc/p.toml --watchdog",
            "/usr/bin/portico pool --watchdog --config /etc/p.toml",
        ] {
            assert_eq!(parse_watchdog(7, args(line)), None, "{line}");
        }
    }

    #[test]
    fn a_process_parent_is_read_from_proc() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }
}

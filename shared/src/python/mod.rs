//! The embedded interpreter: starting it, activating a virtualenv, importing apps, and the
//! Python threads that run them.
//!
//! Rules learned the hard way (see the team's python-embedding facts): Python never runs on a
//! host thread; app threads hold the GIL while they have work and release it whenever they
//! wait (for a job, a body piece, or room in the response channel); a Rust lock is never
//! waited on with the GIL held.

pub(crate) mod asgi;
pub(crate) mod event_loop;
pub(crate) mod threads;
pub(crate) mod wsgi;

use crate::error::LoadError;
use portico_config::AppConfig;
use pyo3::prelude::*;
use pyo3::types::PyList;
use std::path::Path;
use std::sync::OnceLock;

/// The shared Python library this process runs, as the dynamic loader found it (from
/// `/proc/self/maps`); `None` for a Python linked in statically.
///
/// A pool worker compares its own with its host's: run as another `user`, the loader may
/// not be able to read the library the binary was built against (a Python under `/root`)
/// and silently take another of the same name from the system's directories.
pub fn loaded_libpython() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libpython") && name.contains(".so"))
        })
        .map(std::path::PathBuf::from)
}

/// Where the standard library of the loaded libpython lies (its `sys.base_prefix`): the
/// library's own prefix (`PREFIX/lib/libpython...`, or `PREFIX/lib/TRIPLET/libpython...` as
/// Debian lays it out) when it holds `lib/pythonX.Y/os.py` (or `lib64/...`) and its
/// `lib-dynload`. `None` when no library is loaded, or its prefix holds no such library.
///
/// An embedded interpreter that is not told its home guesses it from `PATH` or from the
/// current directory (CPython's getpath): nginx started by systemd from `/` found Debian's
/// `/lib/python3.11` beside a pyenv libpython, and every app failed to import `math`.
/// mod_wsgi's `WSGIPythonHome` and uWSGI's `home` pin it the same way.
fn stdlib_home() -> Option<std::path::PathBuf> {
    let library = loaded_libpython()?;
    let name = library.file_name()?.to_str()?;
    // `libpython3.11.so.1.0`; `libpython3.13t.so` (free-threaded) keeps its `t`, which its
    // library directory has too (`lib/python3.13t`); a debug build's `d` is not in it.
    let version = name
        .strip_prefix("libpython")?
        .split(".so")
        .next()?
        .trim_end_matches('d');
    let holds_stdlib = |prefix: &Path| {
        ["lib", "lib64"].iter().any(|lib| {
            let stdlib = prefix.join(lib).join(format!("python{version}"));
            stdlib.join("os.py").is_file() && stdlib.join("lib-dynload").is_dir()
        })
    };
    // The library's directory's parent, and its grandparent (Debian's multiarch directory).
    let prefixes: Vec<std::path::PathBuf> = library
        .parent()?
        .ancestors()
        .skip(1)
        .take(2)
        .map(Path::to_path_buf)
        .collect();
    prefixes.into_iter().find(|prefix| holds_stdlib(prefix))
}

/// Starts the interpreter (PEP 587) the way an embedding server should, whatever directory
/// and `PATH` it was started with: with its home pinned to the loaded library's standard
/// library ([`stdlib_home`]) unless the user set `PYTHONHOME`; with no signal handlers of
/// Python's (the host's threads take the signals); leaving the process's locale and C stdio
/// as they are (no C locale coercion: nginx's environment is not Python's to change); with
/// `sys.argv` `['portico']`, as mod_wsgi gives `['mod_wsgi']`. As `python3` itself, it runs in
/// UTF-8 mode under the C or POSIX locale. The GIL is released once it has started. Does
/// nothing if the process runs an interpreter already.
fn start_interpreter() -> Result<(), String> {
    use pyo3::ffi;
    use std::os::unix::ffi::OsStrExt;
    let user_home = std::env::var_os("PYTHONHOME").is_some_and(|home| !home.is_empty());
    let home = if user_home { None } else { stdlib_home() };
    let home = home
        .map(|home| std::ffi::CString::new(home.as_os_str().as_bytes()))
        .transpose()
        .map_err(|_| "the Python library's path has a NUL byte".to_owned())?;
    let argv0 = c"portico";
    let failed = |status: ffi::PyStatus, what: &str| -> String {
        // SAFETY: a status CPython returned; its `err_msg` is null or a static C string.
        let message = unsafe {
            (!status.err_msg.is_null()).then(|| {
                std::ffi::CStr::from_ptr(status.err_msg)
                    .to_string_lossy()
                    .into_owned()
            })
        };
        format!(
            "cannot start Python ({what}): {}",
            message.unwrap_or_default()
        )
    };
    // SAFETY: the CPython C API for an embedding program (PEP 587), called once (the caller's
    // `OnceLock`) before any other Python call of this process. The preconfig and the config are
    // initialized by their `_Init` functions before use, accessed through one raw pointer
    // each and not moved meanwhile, and the config is cleared after use; the strings given
    // are copied by CPython.
    unsafe {
        if ffi::Py_IsInitialized() != 0 {
            return Ok(());
        }
        let mut preconfig = std::mem::MaybeUninit::<ffi::PyPreConfig>::uninit();
        let pre = preconfig.as_mut_ptr();
        ffi::PyPreConfig_InitPythonConfig(pre);
        (*pre).coerce_c_locale = 0;
        (*pre).coerce_c_locale_warn = 0;
        (*pre).parse_argv = 0;
        let status = ffi::Py_PreInitialize(pre);
        if ffi::PyStatus_Exception(status) != 0 {
            return Err(failed(status, "pre-initialization"));
        }
        let mut config = std::mem::MaybeUninit::<ffi::PyConfig>::uninit();
        let c = config.as_mut_ptr();
        ffi::PyConfig_InitPythonConfig(c);
        (*c).install_signal_handlers = 0;
        (*c).parse_argv = 0;
        (*c).configure_c_stdio = 0;
        let mut argv = [argv0.as_ptr()];
        let mut status = ffi::PyConfig_SetBytesArgv(c, 1, argv.as_mut_ptr());
        if let Some(home) = &home {
            if ffi::PyStatus_Exception(status) == 0 {
                status = ffi::PyConfig_SetBytesString(c, &raw mut (*c).home, home.as_ptr());
            }
        }
        if ffi::PyStatus_Exception(status) == 0 {
            status = ffi::Py_InitializeFromConfig(c);
        }
        ffi::PyConfig_Clear(c);
        if ffi::PyStatus_Exception(status) != 0 {
            // Not retried: a half-started runtime cannot be started again.
            return Err(failed(status, "initialization"));
        }
        // As `Python::initialize` does: the GIL goes back for any thread to take.
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

/// The virtualenv an activated shell names (`VIRTUAL_ENV`, set by its `activate`), when no
/// `python_home` is given: an embedded interpreter with its home pinned does not find it
/// through `PATH` as `python3` would, and apps run from an activated shell expect its
/// packages, as gunicorn and uvicorn installed there see them.
fn activated_virtualenv() -> Option<std::path::PathBuf> {
    let venv = std::path::PathBuf::from(std::env::var_os("VIRTUAL_ENV")?);
    venv.join("pyvenv.cfg").is_file().then_some(venv)
}

/// Whether this process started its interpreter, and how that went.
static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

/// Runs what the apps registered with `atexit` (`logging`'s final flush among them) once, as
/// CPython does as it exits: the embedded interpreter is never finalized, so nothing would
/// run them otherwise (mod_wsgi and gunicorn's workers run them). Call it last, once no app
/// serves any more and their lifespan shutdowns are done; a process with no interpreter
/// skips it. Waits up to `limit`: a function that hangs (a join of a child process, a thread
/// that never lets go of the GIL) must not keep the server from stopping.
pub fn run_exit_functions(limit: std::time::Duration) {
    static RAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !matches!(STARTED.get(), Some(Ok(()))) || RAN.swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    let (done, finished) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("py-atexit".into())
        .spawn(move || {
            Python::attach(|py| {
                // It prints what a function raised itself, and goes on with the next.
                let ran = py
                    .import("atexit")
                    .and_then(|atexit| atexit.call_method0("_run_exitfuncs"));
                if let Err(e) = ran {
                    log::warn!(
                        "the apps' atexit functions failed:\n{}",
                        format_exception(py, &e)
                    );
                }
            });
            let _ = done.send(());
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread for the apps' atexit functions: {e}");
    } else if finished.recv_timeout(limit).is_err() {
        log::warn!("the apps' atexit functions did not finish within {limit:?}; going on");
    }
}

/// Starts the interpreter once per process and activates `python_home` if given. Later calls
/// do nothing. Must run after any fork the host does (daemonizing, nginx workers).
pub fn init_interpreter(python_home: Option<&Path>, app: &str) -> Result<(), LoadError> {
    if let Err(message) = STARTED.get_or_init(start_interpreter) {
        return Err(LoadError {
            app: app.to_owned(),
            message: message.clone(),
        });
    }
    let venv = match python_home {
        Some(_) => None,
        None => activated_virtualenv(),
    };
    if let Some(venv) = &venv {
        log::info!(
            "app `{app}`: no python_home: using the activated virtualenv {} (VIRTUAL_ENV)",
            venv.display()
        );
    }
    let python_home = python_home.or(venv.as_deref());
    Python::attach(|py| -> PyResult<Result<(), String>> {
        let sys = py.import("sys")?;
        // `import portico` gives apps the server's own exception types.
        let modules = sys.getattr("modules")?;
        if !modules.contains("portico")? {
            let portico = pyo3::types::PyModule::new(py, "portico")?;
            portico.add(
                "ClientDisconnected",
                py.get_type::<asgi::ClientDisconnected>(),
            )?;
            modules.set_item("portico", portico)?;
        }
        let version_info = sys.getattr("version_info")?;
        let version: (u8, u8) = (
            version_info.getattr("major")?.extract()?,
            version_info.getattr("minor")?.extract()?,
        );
        let Some(home) = python_home else {
            // `sys.executable` is found on PATH by an embedded interpreter (a pyenv shim,
            // say, which may run another Python); name the Python that is embedded, which
            // `subprocess` and `multiprocessing`'s spawn then run.
            let base: String = sys.getattr("base_prefix")?.extract()?;
            let embedded =
                Path::new(&base).join(format!("bin/python{}.{}", version.0, version.1));
            if embedded.is_file() {
                sys.setattr("executable", embedded.to_string_lossy().as_ref())?;
            }
            return Ok(Ok(()));
        };
        let site_packages = home.join(format!("lib/python{}.{}/site-packages", version.0, version.1));
        if !site_packages.is_dir() {
            return Ok(Err(format!(
                "python_home {} has no lib/python{}.{}/site-packages: is it a virtualenv made with Python {}.{} (the one Portico embeds)?",
                home.display(),
                version.0,
                version.1,
                version.0,
                version.1
            )));
        }
        // What a virtualenv's own interpreter does at start-up (and virtualenv's
        // activate_this): its site-packages go first and sys.prefix names it.
        let path = sys.getattr("path")?.cast_into::<PyList>()?;
        let before = path.len();
        py.import("site")?
            .call_method1("addsitedir", (site_packages.to_string_lossy().as_ref(),))?;
        let added: Vec<Bound<'_, PyAny>> = path.iter().skip(before).collect();
        for (i, entry) in added.iter().enumerate() {
            path.call_method1("remove", (entry,))?;
            path.insert(i, entry)?;
        }
        sys.setattr("prefix", home.to_string_lossy().as_ref())?;
        sys.setattr("exec_prefix", home.to_string_lossy().as_ref())?;
        // The virtualenv's interpreter, as `sys.executable` says when it runs.
        if let Some(python) = ["bin/python", "bin/python3"]
            .iter()
            .map(|name| home.join(name))
            .find(|path| path.exists())
        {
            sys.setattr("executable", python.to_string_lossy().as_ref())?;
        }
        Ok(Ok(()))
    })
    .map_err(|e| Python::attach(|py| format_exception(py, &e)))
    .and_then(|r| r)
    .map_err(|message| LoadError {
        app: app.to_owned(),
        message,
    })
}

/// A Python script doing what [`init_interpreter`] and the app loading do, for a child
/// interpreter that checks an app before a host commits to it (nginx's `nginx -t`): the
/// Python home's site-packages first and `sys.prefix` naming it, then `python_path` first,
/// then the import and the callable. Arguments: HOME (empty for none), MODULE, CALLABLE,
/// then the `python_path` entries; it exits non-zero with the reason on stderr.
pub const IMPORT_CHECK: &str = r#"
import sys, os, site, importlib
if sys.path and sys.path[0] == "":
    del sys.path[0]
home, module, attr, *paths = sys.argv[1:]
if home:
    sp = os.path.join(home, "lib", "python%d.%d" % sys.version_info[:2], "site-packages")
    if not os.path.isdir(sp):
        sys.exit("python_home %s has no %s: is it a virtualenv made with Python %d.%d (the one Portico embeds)?" % ((home, sp) + tuple(sys.version_info[:2])))
    before = len(sys.path)
    site.addsitedir(sp)
    sys.path[0:0] = [sys.path.pop(before) for _ in range(len(sys.path) - before)]
    sys.prefix = sys.exec_prefix = home
sys.path[0:0] = paths
m = importlib.import_module(module)
obj = getattr(m, attr, None)
if obj is None:
    sys.exit("module `%s` has no attribute `%s`" % (module, attr))
if not callable(obj):
    sys.exit("`%s:%s` is a %s, not a callable" % (module, attr, type(obj).__name__))
"#;

/// Imports an app's module (after its `chdir` and `python_path`) and returns its callable.
pub(crate) fn load_callable(py: Python<'_>, config: &AppConfig) -> Result<Py<PyAny>, LoadError> {
    let fail = |message: String| LoadError {
        app: config.name.clone(),
        message,
    };
    if let Some(dir) = &config.chdir {
        std::env::set_current_dir(dir)
            .map_err(|e| fail(format!("cannot change directory to {}: {e}", dir.display())))?;
    }
    let (module_name, callable_name) = config.target_parts();
    let load = || -> PyResult<Result<Py<PyAny>, String>> {
        let path = py.import("sys")?.getattr("path")?.cast_into::<PyList>()?;
        for (i, dir) in config.python_path.iter().enumerate() {
            let dir = dir.to_string_lossy();
            if !path.contains(dir.as_ref())? {
                path.insert(i, dir.as_ref())?;
            }
        }
        if config.python_path.is_empty() && config.chdir.is_some() && !path.contains("")? {
            // With only a working directory given, import from it, as gunicorn's --chdir does.
            path.insert(0, "")?;
        }
        let module = py.import(module_name)?;
        let Ok(callable) = module.getattr(callable_name) else {
            return Ok(Err(format!(
                "module `{module_name}` has no attribute `{callable_name}`"
            )));
        };
        if !callable.is_callable() {
            return Ok(Err(format!(
                "`{module_name}:{callable_name}` is a {}, not a callable",
                callable.get_type().name()?
            )));
        }
        Ok(Ok(callable.unbind()))
    };
    match load() {
        Ok(result) => result.map_err(fail),
        Err(e) => Err(fail(format!(
            "importing `{module_name}` failed:\n{}",
            format_exception(py, &e)
        ))),
    }
}

/// A Python exception with its traceback, as `traceback.format_exception` prints it.
pub(crate) fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py.import("traceback").and_then(|tb| {
        tb.call_method1(
            "format_exception",
            (err.get_type(py), err.value(py), err.traceback(py)),
        )?
        .extract::<Vec<String>>()
    });
    match formatted {
        Ok(lines) => lines.concat().trim_end().to_owned(),
        Err(_) => err.to_string(),
    }
}

/// An IP address as text, for `REMOTE_ADDR` and the ASGI `client`/`server` (RFC 3875 section
/// 4.1.8). IPv4 is written by hand: `Display` goes through the formatting machinery, which
/// costs more per request than the rest of the environ's fixed keys.
pub(crate) fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

#[cfg(test)]
mod ip_text_tests {
    use super::ip_text;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.100.255",
            "192.168.1.20",
            "::1",
            "fe80::1",
        ] {
            let ip: std::net::IpAddr = text.parse().unwrap();
            assert_eq!(ip_text(ip), text);
        }
    }
}

//! The directives, one `cmd_*` function each, and the configuration-time check that every
//! app can be imported.
//!
//! Everything here runs in the nginx master (or in `nginx -t`) while the configuration is
//! parsed, on the nginx thread. Python is not started here: the import check runs the
//! embedded interpreter's executable as a child process, so the master stays free of Python
//! and a broken app fails `nginx -t` (and a reload) instead of making workers exit.

use crate::PorticoModule;
use core::ffi::{c_char, c_void};
use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_int_t, ngx_str_t, NGX_ERROR, NGX_LOG_EMERG, NGX_OK,
    NGX_PROCESS_SIGNALLER,
};
use ngx::core::NGX_CONF_ERROR;
use ngx::http::{HttpModuleLocationConf, HttpModuleMainConf, NgxHttpCoreModule};
use portico_config::{AppConfig, Config, Interface, Mode, Routing};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The module's `http`-level configuration: every app of every location, in the order the
/// `portico_app` directives appear. A worker loads them in this order, so an app's index here
/// is its index in the worker's `Dispatcher`.
#[derive(Default)]
pub struct MainConf {
    /// The apps.
    pub apps: Vec<AppEntry>,
    /// `portico_python_home`: the virtualenv every app uses.
    pub python_home: Option<PathBuf>,
    /// `portico_config`: the apps of a `portico.toml`, for `portico_pass`.
    pub config: Option<LoadedConfig>,
    /// `portico_pool_binary`: the `portico` executable that runs the pooled apps.
    pub pool_binary: Option<PathBuf>,
    /// The user and group nginx's workers run as (when the master is root): the owner of
    /// the pool's sockets, and the user of pool workers whose app sets none.
    pub pool_identity: Option<(u32, u32)>,
    /// The environment nginx gives its workers (its `env` directives): the pool's too, so
    /// a pooled app sees what an in-process one sees.
    pub pool_environment: Vec<(OsString, OsString)>,
}

/// The `portico.toml` of `portico_config`.
pub struct LoadedConfig {
    /// The file, for messages.
    pub file: PathBuf,
    /// Its `[[app]]` tables, validated, with paths resolved against its directory.
    pub apps: Vec<AppConfig>,
}

/// One `portico_app` or `portico_pass` directive.
pub struct AppEntry {
    /// The app, as the core wants it (`mount` is the location's prefix).
    pub config: AppConfig,
    /// The directive, for messages: `portico_app "mod:app"`.
    pub label: String,
    /// Where the directive is, for messages: `file:line`.
    pub source: String,
    /// The app's name in the `portico.toml` (`config.name` may have gained `@location`):
    /// the pool nginx starts serves it under this name.
    pub toml_name: String,
}

/// The module's location configuration.
#[derive(Default)]
pub struct LocConf {
    /// The index of the app this location serves in [`MainConf::apps`], if any.
    pub app: Option<usize>,
    /// `portico_status`: the location answers with the pools' status.
    pub status: bool,
}

/// Merges a location's configuration. Nothing is inherited: nested locations do not inherit
/// `portico_app` or `portico_pass` (as with `proxy_pass`, the content handler belongs to the
/// location that names it). Then, for a location whose app has its bodies buffered by nginx (`request_buffering`) and a
/// `max_body_size`, lowers the location's `client_max_body_size` to that size when it is
/// larger or unlimited: nginx writes a buffered body to its temporary file as it reads it,
/// and only its own limit stops an endless chunked upload before it fills the disk (the app's
/// limit is checked once the body is whole).
///
/// # Safety
/// Called by nginx while merging, with `cf->ctx` holding the location's configurations (the
/// core module's, merged before ours) and `conf` this module's [`LocConf`] of it.
pub unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    _prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes this module's location configuration, created by create_loc_conf.
    let conf = unsafe { &*conf.cast::<LocConf>() };
    let Some(index) = conf.app else {
        return core::ptr::null_mut();
    };
    // SAFETY: `cf` is the configuration being merged; the main configuration is ours.
    let Some(main) = (unsafe { PorticoModule::main_conf(&*cf) }) else {
        return core::ptr::null_mut();
    };
    let Some(app) = main.apps.get(index).map(|e| &e.config) else {
        return core::ptr::null_mut();
    };
    let limit = app.max_body_size.0;
    if !app.buffers_request_body() || limit == 0 {
        return core::ptr::null_mut();
    }
    // SAFETY: while a location is merged, `cf->ctx`'s location configurations are its own,
    // and the core module's has been merged already (modules merge in order, core first).
    if let Some(clcf) = unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) } {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if clcf.client_max_body_size == 0 || clcf.client_max_body_size > limit {
            clcf.client_max_body_size = limit;
        }
    }
    core::ptr::null_mut()
}

/// The arguments of the directive being parsed, the directive's name first.
///
/// # Safety
/// `cf` must be the configuration nginx passed to a directive handler.
unsafe fn args<'a>(cf: *mut ngx_conf_t) -> Vec<&'a [u8]> {
    // SAFETY: while a directive handler runs, `cf->args` is an array of `ngx_str_t` whose
    // data lives in the configuration pool, longer than this call.
    unsafe {
        (*(*cf).args)
            .as_slice::<ngx_str_t>()
            .iter()
            .map(|s| {
                if s.len == 0 {
                    &[][..]
                } else {
                    core::slice::from_raw_parts(s.data, s.len)
                }
            })
            .collect()
    }
}

/// `file:line` of the directive being parsed.
///
/// # Safety
/// `cf` must be the configuration nginx passed to a directive handler.
unsafe fn source_of(cf: *mut ngx_conf_t) -> String {
    // SAFETY: while a directive is parsed, `conf_file` names the file being read.
    unsafe {
        let file = &*(*cf).conf_file;
        let name = &file.file.name;
        let name = if name.len == 0 {
            String::new()
        } else {
            String::from_utf8_lossy(core::slice::from_raw_parts(name.data, name.len)).into_owned()
        };
        format!("{name}:{}", file.line)
    }
}

/// The server prefix (`-p`), which relative paths in directives are relative to.
///
/// # Safety
/// `cf` must be the configuration nginx passed to a directive handler.
unsafe fn prefix_of(cf: *mut ngx_conf_t) -> PathBuf {
    // SAFETY: the cycle being configured outlives its configuration; its prefix is set.
    unsafe {
        let prefix = &(*(*cf).cycle).prefix;
        if prefix.len == 0 {
            return PathBuf::from("/");
        }
        PathBuf::from(
            String::from_utf8_lossy(core::slice::from_raw_parts(prefix.data, prefix.len))
                .into_owned(),
        )
    }
}

/// The directive's one argument as a path; a relative one is relative to the server prefix.
///
/// # Safety
/// `cf` must be the configuration nginx passed to a directive handler of one argument.
unsafe fn path_argument(cf: *mut ngx_conf_t) -> PathBuf {
    // SAFETY: the caller's.
    let (args, prefix) = unsafe { (args(cf), prefix_of(cf)) };
    prefix.join(String::from_utf8_lossy(args[1]).as_ref())
}

/// Logs a configuration error at `emerg` with the directive's file and line and returns
/// nginx's "configuration failed" value.
fn conf_error(cf: *mut ngx_conf_t, message: &str) -> *mut c_char {
    ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", message);
    NGX_CONF_ERROR
}

/// `portico_app MODULE[:CALLABLE] [interface=wsgi|asgi] [threads=N] [python_path=DIR]...;`
/// in a location: this location is served by that app, mounted at the location's prefix
/// (its `SCRIPT_NAME`).
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's location
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_app(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's location configuration, created by `create_loc_conf`.
    let loc = unsafe { &mut *conf.cast::<LocConf>() };
    if loc.app.is_some() || loc.status {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: nginx calls directive handlers with a valid `cf`.
    let (args, source, prefix) = unsafe { (args(cf), source_of(cf), prefix_of(cf)) };
    let target = String::from_utf8_lossy(args[1]).into_owned();
    if let Err(why) = check_target(&target) {
        return conf_error(cf, &format!("invalid app \"{target}\": {why}"));
    }

    // SAFETY: nginx calls directive handlers with a valid `cf`, in a location here.
    let Some((location, mount)) = (unsafe { location_mount(cf) }) else {
        return conf_error(cf, "portico_app: no location configuration");
    };

    let mut app = AppConfig::new(&target, &target);
    app.mount = mount;
    for arg in &args[2..] {
        let arg = String::from_utf8_lossy(arg);
        let Some((key, value)) = arg.split_once('=') else {
            return conf_error(cf, &format!("portico_app: \"{arg}\": want key=value"));
        };
        match key {
            "interface" => {
                app.interface = match value {
                    "wsgi" => Interface::Wsgi,
                    "asgi" => Interface::Asgi,
                    _ => {
                        return conf_error(
                            cf,
                            &format!("portico_app: interface=\"{value}\": want wsgi or asgi"),
                        )
                    }
                }
            }
            "threads" => match value.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => app.threads = n,
                _ => {
                    return conf_error(
                        cf,
                        &format!("portico_app: threads=\"{value}\": want a number from 1 to 1024"),
                    )
                }
            },
            "python_path" if !value.is_empty() => app.python_path.push(prefix.join(value)),
            _ => {
                return conf_error(
                    cf,
                    &format!(
                        "portico_app: unknown option \"{arg}\" (known: interface=, threads=, python_path=)"
                    ),
                )
            }
        }
    }

    let label = format!("portico_app \"{target}\"");
    // SAFETY: nginx calls directive handlers with a valid `cf`; `loc` is this location's.
    unsafe { add_app(cf, loc, app, &location, label, source) }
}

/// The location being parsed: its name, and the mount an app serving it gets (its prefix;
/// `/` for a regex or named location, where `SCRIPT_NAME` is empty and `PATH_INFO` is the
/// whole path).
///
/// # Safety
/// `cf` must be the configuration nginx passed to a location-level directive handler.
unsafe fn location_mount(cf: *mut ngx_conf_t) -> Option<(String, String)> {
    // SAFETY: `cf->ctx` is the location's HTTP context while a location-level directive is
    // parsed, so the core module's location configuration is there.
    let clcf = unsafe { NgxHttpCoreModule::location_conf(&*cf) }?;
    let location = if clcf.name.len == 0 {
        String::new()
    } else {
        // SAFETY: the location's name is a string in the configuration pool.
        String::from_utf8_lossy(unsafe {
            core::slice::from_raw_parts(clcf.name.data, clcf.name.len)
        })
        .into_owned()
    };
    #[cfg(ngx_feature = "pcre")]
    let is_regex = !clcf.regex.is_null();
    #[cfg(not(ngx_feature = "pcre"))]
    let is_regex = false;
    let mount = if is_regex || clcf.named() != 0 || !location.starts_with('/') {
        "/".to_owned()
    } else {
        location.clone()
    };
    Some((location, mount))
}

/// Adds `app` to the module's apps and makes the location being parsed serve it.
///
/// # Safety
/// `cf` must be the configuration nginx passed to a location-level directive handler, and
/// `loc` this module's configuration of that location.
unsafe fn add_app(
    cf: *mut ngx_conf_t,
    loc: &mut LocConf,
    mut app: AppConfig,
    location: &str,
    label: String,
    source: String,
) -> *mut c_char {
    // SAFETY: the module's main configuration exists in every HTTP context.
    let Some(main) = (unsafe { PorticoModule::main_conf_mut(&*cf) }) else {
        return conf_error(cf, &format!("{label}: no http configuration"));
    };
    let toml_name = app.name.clone();
    // Names are for logs; two locations may serve the same app (two thread pools).
    if main.apps.iter().any(|a| a.config.name == app.name) {
        app.name = format!("{}@{location}", app.name);
    }
    // SAFETY: `cf->ctx` is the location's HTTP context while a location-level directive is
    // parsed, so the core module's location configuration is there.
    let Some(clcf) = (unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) }) else {
        return conf_error(cf, &format!("{label}: no location configuration"));
    };
    loc.app = Some(main.apps.len());
    main.apps.push(AppEntry {
        config: app,
        label,
        source,
        toml_name,
    });
    clcf.handler = Some(crate::handler::content_handler);
    core::ptr::null_mut()
}

/// `portico_config FILE;` at `http` level: the `portico.toml` whose `[[app]]` tables
/// `portico_pass` serves (its `[server]` table is not used by nginx). A relative FILE is
/// relative to the server prefix (`-p`); relative paths inside it to the file's directory.
/// Every error in the file fails the configuration, one `emerg` line each.
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's main
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_config(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main configuration, created by `create_main_conf`.
    let main = unsafe { &mut *conf.cast::<MainConf>() };
    if main.config.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: nginx calls directive handlers with a valid `cf`.
    let file = unsafe { path_argument(cf) };
    // nginx's locations route requests, not the file's `mount`s.
    match Config::load_for(&file, Routing::Elsewhere) {
        Ok(config) => {
            main.config = Some(LoadedConfig {
                file,
                apps: config.app,
            });
            core::ptr::null_mut()
        }
        Err(errors) => {
            for error in &errors.0 {
                ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "portico_config: {}", error);
            }
            NGX_CONF_ERROR
        }
    }
}

/// `portico_pass NAME;` in a location: this location is served by the `[[app]]` named NAME
/// in the file of `portico_config`, mounted at the location's prefix (the TOML's `mount` is
/// replaced, as `portico_app` mounts its app).
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's location
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_pass(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's location configuration, created by `create_loc_conf`.
    let loc = unsafe { &mut *conf.cast::<LocConf>() };
    if loc.app.is_some() || loc.status {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: nginx calls directive handlers with a valid `cf`.
    let (args, source) = unsafe { (args(cf), source_of(cf)) };
    let name = String::from_utf8_lossy(args[1]).into_owned();
    // SAFETY: the module's main configuration exists in every HTTP context.
    let Some(main) = (unsafe { PorticoModule::main_conf(&*cf) }) else {
        return conf_error(cf, "portico_pass: no http configuration");
    };
    let Some(loaded) = main.config.as_ref() else {
        return conf_error(
            cf,
            &format!(
                "portico_pass \"{name}\": no portico_config before it (put `portico_config /path/to/portico.toml;` in the http block, above the servers)"
            ),
        );
    };
    let Some(found) = loaded.apps.iter().find(|a| a.name == name) else {
        let known: Vec<&str> = loaded.apps.iter().map(|a| a.name.as_str()).collect();
        return conf_error(
            cf,
            &format!(
                "portico_pass \"{name}\": no app named \"{name}\" in {} (known: {})",
                loaded.file.display(),
                known.join(", ")
            ),
        );
    };
    let mut app = found.clone();
    // SAFETY: nginx calls directive handlers with a valid `cf`, in a location here.
    let Some((location, mount)) = (unsafe { location_mount(cf) }) else {
        return conf_error(cf, "portico_pass: no location configuration");
    };
    app.mount = mount;
    let label = format!("portico_pass \"{name}\" ({})", loaded.file.display());
    // SAFETY: nginx calls directive handlers with a valid `cf`; `loc` is this location's.
    unsafe { add_app(cf, loc, app, &location, label, source) }
}

/// `portico_pool_binary FILE;` at `http` level: the `portico` executable (with
/// `portico-worker` beside it) that nginx starts to run the apps with `mode = "pool"`.
/// Default: `portico`, looked up in the master's `PATH`.
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's main
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_pool_binary(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main configuration, created by `create_main_conf`.
    let main = unsafe { &mut *conf.cast::<MainConf>() };
    if main.pool_binary.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: nginx calls directive handlers with a valid `cf`.
    let file = unsafe { path_argument(cf) };
    if !file.is_file() {
        return conf_error(
            cf,
            &format!("portico_pool_binary \"{}\" is not a file", file.display()),
        );
    }
    main.pool_binary = Some(file);
    core::ptr::null_mut()
}

/// `portico_status;` in a location: it answers with the status of every pooled app (JSON;
/// `?format=text` for lines), as `portico serve`'s `status_path` does. Restrict it as any
/// location (`allow`, `deny`).
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's location
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's location configuration, created by `create_loc_conf`.
    let loc = unsafe { &mut *conf.cast::<LocConf>() };
    if loc.app.is_some() || loc.status {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: `cf->ctx` is the location's HTTP context while a location-level directive is
    // parsed, so the core module's location configuration is there.
    let Some(clcf) = (unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) }) else {
        return conf_error(cf, "portico_status: no location configuration");
    };
    loc.status = true;
    clcf.handler = Some(crate::handler::content_handler);
    core::ptr::null_mut()
}

/// `portico_python_home DIR;` at `http` level: the virtualenv every app imports from.
///
/// # Safety
/// Called by nginx with the configuration being parsed and this module's main
/// configuration (`conf`).
pub unsafe extern "C" fn cmd_portico_python_home(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main configuration, created by `create_main_conf`.
    let main = unsafe { &mut *conf.cast::<MainConf>() };
    if main.python_home.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }
    // SAFETY: nginx calls directive handlers with a valid `cf`.
    let dir = unsafe { path_argument(cf) };
    if !dir.is_dir() {
        return conf_error(
            cf,
            &format!(
                "portico_python_home \"{}\" is not a directory",
                dir.display()
            ),
        );
    }
    main.python_home = Some(dir);
    core::ptr::null_mut()
}

/// `module[:callable]` with dotted Python identifiers for the module and one identifier for
/// the callable.
fn check_target(target: &str) -> Result<(), String> {
    let is_identifier = |s: &str| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c == '_' || c.is_alphabetic())
            && chars.all(|c| c == '_' || c.is_alphanumeric())
    };
    let (module, callable) = portico_config::split_target(target);
    if module.is_empty() || !module.split('.').all(is_identifier) {
        return Err(format!(
            "module \"{module}\" is not a dotted Python name (want MODULE:CALLABLE, e.g. mysite.wsgi:application)"
        ));
    }
    if !is_identifier(callable) {
        return Err(format!(
            "callable \"{callable}\" is not a Python identifier"
        ));
    }
    Ok(())
}

/// After the whole configuration is read: gives every app the Python home, and checks that
/// each can be imported (skipped when nginx only signals a running master, `nginx -s`).
///
/// # Safety
/// Called by nginx with the configuration of the `http` block just parsed.
pub unsafe fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: the module's main configuration exists once the `http` block is parsed.
    let Some(main) = (unsafe { PorticoModule::main_conf_mut(&*cf) }) else {
        return NGX_OK as ngx_int_t;
    };
    // One interpreter per worker: `portico_python_home`, else the `python_home` of the
    // portico.toml's in-process apps, is every in-process app's; one that names another is
    // an error. A pool's workers have an interpreter of their own, set up from the
    // portico.toml by the pool itself: a pooled app keeps its own `python_home` (one
    // virtualenv per app, as with Passenger, uWSGI or mod_wsgi's daemons), or none.
    let mut home = main.python_home.clone();
    for entry in &main.apps {
        if entry.config.mode == Mode::Pool {
            continue;
        }
        let Some(own) = &entry.config.python_home else {
            continue;
        };
        match &home {
            None => home = Some(own.clone()),
            Some(shared) if shared != own => {
                // SAFETY: `cf->log` is the log of the configuration being read.
                let log = unsafe { (*cf).log };
                ngx::ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "{} in {}: python_home \"{}\" differs from \"{}\" (portico_python_home or another app's): the apps of an nginx worker share one interpreter",
                    entry.label,
                    entry.source,
                    own.display(),
                    shared.display()
                );
                return NGX_ERROR as ngx_int_t;
            }
            Some(_) => {}
        }
    }
    for entry in &mut main.apps {
        if entry.config.mode != Mode::Pool {
            entry.config.python_home = home.clone();
        }
    }
    // SAFETY: `ngx_process` is written only by nginx's startup code on this thread.
    if unsafe { nginx_sys::ngx_process } == NGX_PROCESS_SIGNALLER as usize {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: `cf` is the configuration being read.
    let (identity, environment) = unsafe { (worker_identity(cf), worker_environment(cf)) };
    main.pool_identity = identity;
    main.pool_environment = environment.clone();
    // What the pool needs to start is checked now, so that `nginx -t` says what is missing,
    // not the start.
    if main.apps.iter().any(|e| crate::pool::is_managed(&e.config)) {
        if let Err(why) = crate::pool::check_prerequisites(main.pool_binary.as_deref()) {
            // SAFETY: `cf->log` is the log of the configuration being read.
            let log = unsafe { (*cf).log };
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "portico: {}", why);
            return NGX_ERROR as ngx_int_t;
        }
    }
    for entry in &main.apps {
        // A pool run on its own (`pool_socket`) imports its apps itself, as its own user.
        if entry.config.mode == Mode::Pool && !crate::pool::is_managed(&entry.config) {
            continue;
        }
        // Pooled apps are checked as the user their workers will run as.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // Only root switches users (the pool would refuse to start otherwise, and a test run
        // as another user checks as itself).
        let own = match entry.config.mode {
            Mode::Pool if root => portico_core::pool::worker_identity(&entry.config),
            _ => Ok(None),
        };
        let checked_as = match own {
            Ok(Some((uid, gid))) => Ok(Some((uid, gid, "the app's `user`"))),
            Ok(None) => Ok(identity.map(|(uid, gid)| (uid, gid, "nginx's `user` directive"))),
            Err(why) => Err(why),
        };
        let checked =
            checked_as.and_then(|as_user| check_import(&entry.config, as_user, &environment));
        if let Err(why) = checked {
            // SAFETY: `cf->log` is the log of the configuration being read.
            let log = unsafe { (*cf).log };
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "{} in {}: the app cannot be loaded: {}",
                entry.label,
                entry.source,
                fit_log_line(&why)
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_OK as ngx_int_t
}

/// nginx cuts a log line at 2048 bytes; of a long traceback, the first line (what failed)
/// and the end (the exception) are what matter.
fn fit_log_line(message: &str) -> String {
    const ROOM: usize = 1600;
    if message.len() <= ROOM {
        return message.to_owned();
    }
    let first = message.lines().next().unwrap_or_default();
    let mut cut = first.len().min(400);
    while !first.is_char_boundary(cut) {
        cut -= 1;
    }
    let first = &first[..cut];
    let mut start = message.len() - (ROOM - first.len());
    while !message.is_char_boundary(start) {
        start += 1;
    }
    format!("{first}\n[...]\n{}", &message[start..])
}

/// The interpreter the module embeds (from the build); the import check runs it.
const PYTHON: Option<&str> = option_env!("PORTICO_PYTHON_EXECUTABLE");

/// How long an app's import may take at configuration time.
const IMPORT_CHECK_LIMIT: Duration = Duration::from_secs(60);

/// The user and group the workers will run as, when the master runs as root (nginx's
/// `user` directive, else nginx's default, `nobody`); `None` when nginx will not switch.
///
/// # Safety
/// `cf` must be the configuration being read.
unsafe fn worker_identity(cf: *mut ngx_conf_t) -> Option<(u32, u32)> {
    use ngx::core::{CoreModuleMainConf, NgxCoreModule};
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    // SAFETY: the core module's configuration exists once the main context is parsed.
    let core = unsafe { NgxCoreModule::main_conf(&*cf) }?;
    if core.user != u32::MAX {
        return Some((core.user, core.group));
    }
    // `user` is not set (or comes later in the file): nginx's default.
    portico_config::lookup_user("nobody").ok()
}

/// The environment nginx gives its workers, as far as the configuration read so far says:
/// nginx clears the rest, and keeps each variable of an `env` directive, `env NAME=VALUE;`
/// with that value and `env NAME;` with the master's, and TZ unless one names it. An
/// `env` directive after the `http` block is not read yet; the worker's own check of
/// Python's standard library catches a PYTHONHOME given there.
///
/// # Safety
/// `cf` must be the configuration being read.
unsafe fn worker_environment(cf: *mut ngx_conf_t) -> Vec<(OsString, OsString)> {
    use ngx::core::{CoreModuleMainConf, NgxCoreModule};
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: the core module's configuration exists once the main context is parsed.
    let Some(core) = (unsafe { NgxCoreModule::main_conf(&*cf) }) else {
        return Vec::new();
    };
    let mut environment = Vec::new();
    // SAFETY: `env` is an array of `ngx_str_t` in the configuration pool. nginx's `env`
    // handler keeps a variable's whole NUL-terminated token and shortens `len` to the name,
    // so the token goes on with `=VALUE` or ends (what nginx's ngx_set_environment reads).
    for var in unsafe { core.env.as_slice::<ngx_str_t>() } {
        if var.len == 0 || var.data.is_null() {
            continue;
        }
        // SAFETY: see above: `len` bytes of name, then the rest of the C string.
        let (name, rest) = unsafe {
            (
                core::slice::from_raw_parts(var.data, var.len),
                core::ffi::CStr::from_ptr(var.data.add(var.len).cast()).to_bytes(),
            )
        };
        let name = std::ffi::OsStr::from_bytes(name);
        if let Some(value) = rest.strip_prefix(b"=") {
            environment.push((
                name.to_owned(),
                std::ffi::OsStr::from_bytes(value).to_owned(),
            ));
        } else if let Some(value) = std::env::var_os(name) {
            environment.push((name.to_owned(), value));
        }
    }
    // nginx keeps TZ for its workers unless an `env` directive names it.
    if !environment.iter().any(|(name, _)| name == "TZ") {
        if let Some(tz) = std::env::var_os("TZ") {
            environment.push(("TZ".into(), tz));
        }
    }
    environment
}

/// The name of user `uid`, for messages ("" when it has none).
pub(crate) fn user_name(uid: u32) -> String {
    portico_config::user_name(uid).unwrap_or_default()
}

/// Imports the app in a child interpreter with the environment and the user a worker has
/// (nginx clears the environment but for its `env` directives), and returns its error
/// output when that fails.
fn check_import(
    app: &AppConfig,
    identity: Option<(u32, u32, &str)>,
    environment: &[(OsString, OsString)],
) -> Result<(), String> {
    let Some(python) = PYTHON else {
        return Ok(());
    };
    let (module, callable) = app.target_parts();
    let mut command = Command::new(python);
    command
        .arg("-c")
        .arg(portico_core::python::IMPORT_CHECK)
        .arg(app.python_home.as_deref().unwrap_or(Path::new("")))
        .arg(module)
        .arg(callable)
        .args(&app.python_path)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(dir) = &app.chdir {
        command.current_dir(dir);
    }
    command.envs(environment.iter().map(|(k, v)| (k, v)));
    let as_user = match identity {
        Some((uid, gid, whose)) if uid != 0 => {
            use std::os::unix::process::CommandExt;
            // With the groups the workers will keep, so the check sees what they will see.
            let identity = portico_core::pool::ChildIdentity::new(uid, gid);
            // SAFETY: `assume` makes only async-signal-safe calls, as pre_exec requires.
            unsafe {
                command.pre_exec(move || identity.assume());
            }
            let name = user_name(uid);
            let name = if name.is_empty() {
                name
            } else {
                format!("{name} ")
            };
            format!(" as the workers' user {name}(uid {uid}, {whose})")
        }
        _ => String::new(),
    };
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {python}{as_user} to check the import: {e}"))?;
    // Read the error output as it comes, so a long one cannot fill the pipe and stall the child.
    let mut pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = pipe.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > IMPORT_CHECK_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "importing `{module}` took longer than {IMPORT_CHECK_LIMIT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the import check: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let stderr = reader.join().unwrap_or_default();
    Err(format!(
        "importing `{module}`{as_user} failed:\n{}",
        stderr.trim_end()
    ))
}

//! `ngx_http_portico_module`: Portico's nginx dynamic module. It serves Python web apps from
//! the nginx workers themselves, on Python threads of their own, through the same dispatch
//! core (`portico-core`) as the `portico` binary.
//!
//! ```nginx
//! load_module /path/to/ngx_http_portico_module.so;
//! http {
//!     portico_python_home /srv/site/.venv;          # optional
//!     portico_config /etc/portico.toml;             # optional: apps for portico_pass
//!     server {
//!         location /api/ {
//!             portico_app api:app threads=8 python_path=/srv/api;
//!         }
//!         location /site/ {
//!             portico_pass site;                    # the [[app]] named "site"
//!         }
//!     }
//! }
//! ```
//!
//! Layout:
//! - this file registers the module: its directives, its HTTP module context and its
//!   process hooks;
//! - [`config`]: one `cmd_*` function per directive, and the configuration-time check that
//!   each app imports (so `nginx -t` fails with the traceback);
//! - [`worker`]: per worker process, after the fork: the apps' Python threads, and the
//!   eventfd through which they wake the nginx thread;
//! - [`handler`]: the content handler: request body in as it arrives, response out with
//!   backpressure;
//! - [`request`]: nginx's request head and body as the core's owned data;
//! - [`websocket`]: the 101 and the takeover of an upgraded connection for ASGI apps;
//! - [`log_sink`]: the core's `log` records, into nginx's error log;
//! - [`pool`]: the `portico pool` server the master starts for apps with `mode = "pool"`.
//!
//! Threads: nginx objects are touched only on the nginx thread (the worker's event loop);
//! Python runs only on the apps' own threads. They meet in the core's `Exchange`, whose waker
//! here writes to an eventfd that the worker's event loop watches.

pub mod config;
pub mod handler;
pub mod log_sink;
pub mod pool;
pub mod request;
pub mod websocket;
pub mod worker;

use core::ffi::{c_char, c_void};
use core::ptr::{addr_of, addr_of_mut};
use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_http_module_t, ngx_module_t, ngx_str_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_MODULE,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};

/// The module as the `ngx` crate's traits see it: it owns a main configuration (the apps)
/// and a location configuration (which app a location serves).
pub struct PorticoModule;

impl HttpModule for PorticoModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: nginx writes the module's indexes while loading it, before any
        // configuration callback runs and on the one nginx thread; afterwards the static is
        // only read.
        unsafe { &*addr_of!(ngx_http_portico_module) }
    }

    unsafe extern "C" fn postconfiguration(cf: *mut nginx_sys::ngx_conf_t) -> nginx_sys::ngx_int_t {
        // SAFETY: nginx passes the configuration being parsed, valid for this call.
        unsafe { config::postconfiguration(cf) }
    }
}

// SAFETY: the main configuration slot of this module holds a `config::MainConf`, created by
// `create_main_conf` below and only ever read as that type.
unsafe impl HttpModuleMainConf for PorticoModule {
    type MainConf = config::MainConf;
}

// SAFETY: the location configuration slot holds a `config::LocConf`, created by
// `create_loc_conf` below.
unsafe impl HttpModuleLocationConf for PorticoModule {
    type LocationConf = config::LocConf;
}

static NGX_HTTP_PORTICO_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: None,
    postconfiguration: Some(PorticoModule::postconfiguration),
    create_main_conf: Some(PorticoModule::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(PorticoModule::create_loc_conf),
    merge_loc_conf: Some(config::merge_loc_conf),
};

/// The handler nginx calls for a directive.
type DirectiveHandler =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

/// One entry of the directive table: `name` in the contexts and arity of `type_`, handled by
/// `set` with the configuration at `conf` (main or location).
const fn directive(
    name: &'static core::ffi::CStr,
    type_: u32,
    set: DirectiveHandler,
    conf: ngx_uint_t,
) -> ngx_command_t {
    ngx_command_t {
        name: ngx_str_t {
            len: name.to_bytes().len(),
            data: name.as_ptr() as *mut u8,
        },
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf,
        offset: 0,
        post: core::ptr::null_mut(),
    }
}

static mut NGX_HTTP_PORTICO_COMMANDS: [ngx_command_t; 7] = [
    directive(
        c"portico_app",
        NGX_HTTP_LOC_CONF | NGX_CONF_1MORE,
        config::cmd_portico_app,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    directive(
        c"portico_python_home",
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        config::cmd_portico_python_home,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    directive(
        c"portico_config",
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        config::cmd_portico_config,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    directive(
        c"portico_pass",
        NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1,
        config::cmd_portico_pass,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    directive(
        c"portico_pool_binary",
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        config::cmd_portico_pool_binary,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    directive(
        c"portico_status",
        NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
        config::cmd_portico_status,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    ngx_command_t::empty(),
];

/// The module object nginx loads (`load_module`): directives, HTTP context and the hooks
/// that start the apps in each worker and stop them.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_portico_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_PORTICO_MODULE_CTX) as *mut _,
    commands: addr_of_mut!(NGX_HTTP_PORTICO_COMMANDS) as *mut _,
    type_: NGX_HTTP_MODULE as ngx_uint_t,
    init_module: Some(pool::init_module),
    init_process: Some(worker::init_process),
    exit_process: Some(worker::exit_process),
    exit_master: Some(pool::exit_master),
    ..ngx_module_t::default()
};

/// The tables nginx reads from a dynamic module (`ngx_modules`, `ngx_module_names`,
/// `ngx_module_order`); exported under those names whatever module they sit in.
#[allow(missing_docs)]
mod exports {
    use super::ngx_http_portico_module;
    ngx::ngx_modules!(ngx_http_portico_module);
}

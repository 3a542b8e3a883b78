//! Portico's dispatch core: everything between "a host has parsed an HTTP request" and "the
//! host writes the response", with no Pingora or nginx type in it.
//!
//! Layers, from the wire inwards:
//! - [`model`]: the host-neutral request head and response head, and the checks that keep an
//!   app's response head off the wire when it is not valid HTTP;
//! - [`exchange`]: the conversation between a host (async, never runs Python) and an app
//!   thread (runs Python, may block): [`exchange::AppEvent`]s out, request body pieces in;
//! - [`router`]: which app serves a path, and the `SCRIPT_NAME`/`PATH_INFO` split;
//! - [`python`]: the interpreter, app loading, and the gateway adapters (WSGI, PEP 3333) that
//!   run on Python threads of their own;
//! - [`Dispatcher`]: the one entry point a host calls.
//!
//! A host drives one request like this: [`Dispatcher::route`] picks the app, [`App::submit`]
//! queues the request to its Python threads and returns an [`exchange::Exchange`], and the
//! host loops over its events, answering [`exchange::AppEvent::NeedBody`] with body pieces and
//! writing everything else to the client. Errors become HTTP statuses in one place:
//! [`DispatchError::status`].

pub mod clock;
pub mod error;
pub mod exchange;
pub mod forwarded;
pub mod model;
pub mod pool;
pub mod python;
pub mod router;
pub mod websocket;

mod dispatcher;

pub use dispatcher::{App, Dispatcher, HostInfo, Reloaded};
pub use error::{DispatchError, LoadError};

/// Tunes glibc's allocator for a server that moves bodies of tens of KiB per request.
///
/// By default glibc gives freed memory at the top of a thread's heap back to the kernel and
/// serves large blocks with fresh mappings, so every 64 KiB body costs page faults to map
/// the same memory again (measured: a 64 KiB echo ran 35% faster with this). Hosts call this
/// once, early, in each process that serves requests.
pub fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; it takes the allocator's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

//! The WSGI adapter (PEP 3333), run on an app's Python threads.
//!
//! Where the PEP leaves Python objects to the server, they are built in Rust: the environ is a
//! copy of a per-app template dict filled with interned keys, and `wsgi.input`,
//! `start_response`, `wsgi.errors` and `wsgi.file_wrapper` are Rust classes. That is what
//! keeps per-request Python work small.

use super::format_exception;
use super::threads::{Job, Runner};
use crate::error::DispatchError;
use crate::exchange::{AppEvent, BodyPiece, FileBody, Responder};
use crate::model::{BodyLength, RequestHead, ResponseHead};
use bytes::{Buf, Bytes};
use pyo3::exceptions::{PyAssertionError, PyOSError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};
use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::FromRawFd;

/// A loaded WSGI app and what every request's environ shares.
pub(crate) struct WsgiRunner {
    name: String,
    callable: Py<PyAny>,
    /// Keys that are the same for every request (PEP 3333 "environ Variables").
    template: Py<PyDict>,
}

impl WsgiRunner {
    pub(crate) fn new(
        py: Python<'_>,
        name: &str,
        callable: Py<PyAny>,
        multithread: bool,
        multiprocess: bool,
        server_software: &str,
    ) -> PyResult<WsgiRunner> {
        let t = PyDict::new(py);
        t.set_item("wsgi.version", (1, 0))?;
        t.set_item("wsgi.errors", Py::new(py, ErrorStream::new(name))?)?;
        t.set_item("wsgi.multithread", multithread)?;
        t.set_item("wsgi.multiprocess", multiprocess)?;
        t.set_item("wsgi.run_once", false)?;
        t.set_item("wsgi.file_wrapper", py.get_type::<FileWrapper>())?;
        // Portico always signals the end of a body, chunked or not (the mod_wsgi/uWSGI
        // extension that lets `read()` without a size be safe).
        t.set_item("wsgi.input_terminated", true)?;
        t.set_item("SERVER_SOFTWARE", server_software)?;
        t.set_item("portico.app", name)?;
        Ok(WsgiRunner {
            name: name.to_owned(),
            callable,
            template: t.unbind(),
        })
    }

    fn environ<'py>(&self, py: Python<'py>, job: &Job) -> PyResult<Bound<'py, PyDict>> {
        let head = &job.head;
        let env = self.template.bind(py).copy()?;
        env.set_item(intern!(py, "REQUEST_METHOD"), method_str(py, &head.method))?;
        env.set_item(intern!(py, "SCRIPT_NAME"), job.route.script_name.as_str())?;
        env.set_item(intern!(py, "PATH_INFO"), latin1(py, &job.route.path_info))?;
        env.set_item(intern!(py, "QUERY_STRING"), latin1(py, &head.query))?;
        let mut uri = head.raw_path.to_vec();
        if !head.query.is_empty() {
            uri.push(b'?');
            uri.extend_from_slice(&head.query);
        }
        let uri = latin1(py, &uri);
        env.set_item(intern!(py, "RAW_URI"), &uri)?;
        env.set_item(intern!(py, "REQUEST_URI"), &uri)?;
        let protocol = match head.version {
            crate::model::HttpVersion::Http10 => intern!(py, "HTTP/1.0"),
            crate::model::HttpVersion::Http11 => intern!(py, "HTTP/1.1"),
            crate::model::HttpVersion::Http2 => intern!(py, "HTTP/2"),
        };
        env.set_item(intern!(py, "SERVER_PROTOCOL"), protocol)?;
        env.set_item(intern!(py, "portico.http_version"), head.version.short())?;
        let scheme = if head.secure {
            intern!(py, "https")
        } else {
            intern!(py, "http")
        };
        env.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
        if head.secure {
            env.set_item(intern!(py, "HTTPS"), intern!(py, "on"))?;
        }
        if let Some(tls) = &head.tls {
            env.set_item(intern!(py, "portico.tls_version"), tls.protocol.as_str())?;
            env.set_item(intern!(py, "portico.tls_cipher"), tls.cipher.as_str())?;
        }
        if let Some(client) = head.client {
            env.set_item(intern!(py, "REMOTE_ADDR"), super::ip_text(client.ip()))?;
            env.set_item(intern!(py, "REMOTE_PORT"), client.port().to_string())?;
        }
        let (server_name, server_port) = server_name_port(head);
        env.set_item(intern!(py, "SERVER_NAME"), latin1(py, &server_name))?;
        env.set_item(intern!(py, "SERVER_PORT"), server_port)?;
        for (key, value) in cgi_headers(&head.headers) {
            env.set_item(latin1(py, &key), latin1(py, &value))?;
        }
        Ok(env)
    }

    fn call_app(
        &self,
        py: Python<'_>,
        job: &Job,
        input: &Bound<'_, Input>,
        start: &Bound<'_, StartResponse>,
    ) -> Result<(), AppFailure> {
        let env = self.environ(py, job).map_err(AppFailure::Raised)?;
        env.set_item(intern!(py, "wsgi.input"), input)
            .map_err(AppFailure::Raised)?;
        let result = self
            .callable
            .bind(py)
            .call1((env, start))
            .map_err(AppFailure::Raised)?;
        let is_head = job.head.method == "HEAD";
        let sent = send_result(py, &result, start, &job.responder, is_head);
        // PEP 3333: close() is called whatever happened, client gone included. (A list has
        // none; asking would raise and discard an AttributeError on every request.)
        let closed = if result.is_exact_instance_of::<PyList>() {
            Ok(())
        } else {
            match result.getattr_opt(intern!(py, "close")) {
                Ok(Some(close)) => close.call0().map(drop).map_err(AppFailure::Raised),
                Ok(None) => Ok(()),
                Err(e) => Err(AppFailure::Raised(e)),
            }
        };
        sent.and(closed)
    }

    /// The host drops lent `bytes` objects without the GIL; pyo3 queues those releases and
    /// performs them when a thread next attaches. Detaching once after a request that lent
    /// keeps that queue short even when this thread never waits for work.
    fn release_lent(&self, py: Python<'_>) {
        if LENT.replace(false) {
            py.detach(|| ());
        }
    }
}

impl Runner for WsgiRunner {
    fn run(&self, py: Python<'_>, mut job: Job) {
        let responder = job.responder.clone();
        let outcome = Bound::new(
            py,
            Input::new(responder.clone(), job.head.body, job.body.take()),
        )
        .and_then(|input| {
            Ok((
                input,
                Bound::new(py, StartResponse::new(responder.clone()))?,
            ))
        })
        .map_err(AppFailure::Raised)
        .and_then(|(input, start)| {
            let _cut_off = CutOff(&input, &start);
            self.call_app(py, &job, &input, &start)
        });
        let event = match outcome {
            Ok(()) | Err(AppFailure::HostGone) => return self.release_lent(py),
            Err(AppFailure::Raised(err)) => {
                let traceback = format_exception(py, &err);
                log::error!(
                    "app `{}`: exception in {} {}:\n{}",
                    self.name,
                    job.head.method,
                    String::from_utf8_lossy(&job.head.raw_path),
                    traceback
                );
                AppEvent::Failed(DispatchError::AppRaised(
                    traceback.lines().last().unwrap_or_default().to_owned(),
                ))
            }
            Err(AppFailure::Protocol(why)) => {
                log::error!(
                    "app `{}`: {} {}: {}",
                    self.name,
                    job.head.method,
                    String::from_utf8_lossy(&job.head.raw_path),
                    why
                );
                AppEvent::Failed(DispatchError::BadResponse(why))
            }
        };
        let _ = send(py, &responder, event);
        self.release_lent(py);
    }
}

/// Cuts a request's Python objects off from the request when dropped, on a panic too: the app
/// may keep references to them, and a live responder would keep the host waiting for events.
struct CutOff<'a, 'py>(&'a Bound<'py, Input>, &'a Bound<'py, StartResponse>);

impl Drop for CutOff<'_, '_> {
    fn drop(&mut self) {
        if let Ok(mut input) = self.0.try_borrow_mut() {
            input.responder = None;
        }
        if let Ok(mut start) = self.1.try_borrow_mut() {
            start.responder = None;
        }
    }
}

/// Why an app call did not complete normally.
enum AppFailure {
    /// The app (or its iterable, or its close) raised.
    Raised(PyErr),
    /// The app broke the protocol in a way Python did not raise for.
    Protocol(String),
    /// The client went away; nothing more to send.
    HostGone,
}

impl From<PyErr> for AppFailure {
    fn from(e: PyErr) -> Self {
        AppFailure::Raised(e)
    }
}

/// Sends the app's response: a list (the common case) in one event, a `wsgi.file_wrapper` of
/// a real file as a file region, anything else chunk by chunk as the iterable yields.
fn send_result(
    py: Python<'_>,
    result: &Bound<'_, PyAny>,
    start: &Bound<'_, StartResponse>,
    responder: &Responder,
    is_head: bool,
) -> Result<(), AppFailure> {
    if let Ok(list) = result.cast::<PyList>() {
        if !start.borrow().sent {
            let body = match list.len() {
                0 => Bytes::new(),
                1 => body_chunk(&list.get_item(0)?)?,
                _ => {
                    let mut joined = Vec::new();
                    for item in list.iter() {
                        joined.extend_from_slice(body_bytes(&item)?);
                    }
                    Bytes::from(joined)
                }
            };
            let mut head = start.borrow_mut().take_head()?;
            // RFC 9110 section 8.6: no Content-Length on 204, and on 304 it would describe
            // the cached representation, not this empty body. Section 9.3.2: a HEAD answer's
            // length is the GET answer's, so an empty body (what werkzeug and Django give a
            // HEAD) says nothing of it: the length is left out rather than said to be 0.
            let unknown = is_head && body.is_empty();
            if !head.has_content_length() && !matches!(head.status, 204 | 304) && !unknown {
                head.headers.push((
                    Bytes::from_static(b"content-length"),
                    Bytes::from(body.len().to_string()),
                ));
            }
            return send(py, responder, AppEvent::Whole(head, body));
        }
    }
    // After write() the head is out: a file wrapper is then just iterated below.
    let wrapper = result
        .cast::<FileWrapper>()
        .ok()
        .filter(|_| !start.borrow().sent);
    if let Some(wrapper) = wrapper {
        if let Some(file) = wrapper.borrow().as_file_body(py) {
            let mut head = start.borrow_mut().take_head()?;
            let file = clamp_to_content_length(&head, file);
            if !head.has_content_length() {
                if let Some(len) = file.len {
                    head.headers.push((
                        Bytes::from_static(b"content-length"),
                        Bytes::from(len.to_string()),
                    ));
                }
            }
            send(py, responder, AppEvent::Head(head))?;
            send(py, responder, AppEvent::File(file))?;
            return send(py, responder, AppEvent::End);
        }
    }
    for item in result.try_iter()? {
        let chunk = body_chunk(&item?)?;
        if chunk.is_empty() {
            // PEP 3333: an empty string must not cause the headers to be sent yet.
            continue;
        }
        start.borrow_mut().ensure_head_sent(py)?;
        send(py, responder, AppEvent::Body(chunk))?;
    }
    start.borrow_mut().ensure_head_sent(py)?;
    send(py, responder, AppEvent::End)
}

fn clamp_to_content_length(head: &ResponseHead, mut file: FileBody) -> FileBody {
    if let Some(declared) = head.content_length() {
        file.len = Some(file.len.map_or(declared, |len| len.min(declared)));
    }
    file
}

/// PEP 3333: the iterable yields bytestrings, nothing else.
fn body_bytes<'a>(item: &'a Bound<'_, PyAny>) -> Result<&'a [u8], AppFailure> {
    item.cast::<PyBytes>().map(|b| b.as_bytes()).map_err(|_| {
        let type_name = item
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        AppFailure::Protocol(format!(
            "the response iterable yielded a {type_name}, not bytes (PEP 3333 requires bytestrings)"
        ))
    })
}

/// Body chunks at least this large are lent to the host rather than copied: the host keeps a
/// reference to the Python `bytes` object until it has written them, so a large response is
/// never held twice in memory. (Below this, copying measured as fast as lending: a 64 KiB
/// echo ran at the same rate either way.)
const LEND_THRESHOLD: usize = 1024 * 1024;

thread_local! {
    /// Whether this thread lent a `bytes` object to the host during the current request.
    static LENT: Cell<bool> = const { Cell::new(false) };
}

/// A response body chunk as [`Bytes`]: copied when small, lent when large.
fn body_chunk(item: &Bound<'_, PyAny>) -> Result<Bytes, AppFailure> {
    let data = body_bytes(item)?;
    if data.len() < LEND_THRESHOLD {
        return Ok(Bytes::copy_from_slice(data));
    }
    LENT.set(true);
    let bytes = item.cast::<PyBytes>().map_err(PyErr::from)?;
    Ok(Bytes::from_owner(PyBackedBytes::from(bytes.clone())))
}

/// Sends an event, waiting with the GIL released when the channel is full.
fn send(py: Python<'_>, responder: &Responder, event: AppEvent) -> Result<(), AppFailure> {
    if matches!(event, AppEvent::Head(_) | AppEvent::Whole(..)) {
        // `request_timeout` ends with the head (a long download is not a stuck thread).
        super::threads::response_started();
    }
    match responder.try_send(event) {
        Ok(()) => Ok(()),
        Err(Ok(event)) => py
            .detach(|| responder.send_blocking(event))
            .map_err(|_| AppFailure::HostGone),
        Err(Err(_)) => Err(AppFailure::HostGone),
    }
}

fn to_pyerr(failure: AppFailure) -> PyErr {
    match failure {
        AppFailure::Raised(e) => e,
        AppFailure::Protocol(why) => PyValueError::new_err(why),
        AppFailure::HostGone => PyOSError::new_err("client disconnected"),
    }
}

/// The `start_response` callable; its `write` method is the PEP's `write()` callable.
#[pyclass(module = "portico", name = "StartResponse")]
pub(crate) struct StartResponse {
    responder: Option<Responder>,
    /// Set by a successful call; taken when the head is sent.
    head: Option<ResponseHead>,
    /// Whether the head went to the host (after which exc_info re-raises).
    sent: bool,
    /// A call was refused (bad status or header): the response must be a 500 whatever the
    /// app does next, even if it caught the exception.
    refused: Option<String>,
}

impl StartResponse {
    fn new(responder: Responder) -> StartResponse {
        StartResponse {
            responder: Some(responder),
            head: None,
            sent: false,
            refused: None,
        }
    }

    fn take_head(&mut self) -> Result<ResponseHead, AppFailure> {
        if let Some(why) = &self.refused {
            return Err(AppFailure::Protocol(why.clone()));
        }
        self.sent = true;
        self.head.take().ok_or_else(|| {
            AppFailure::Protocol("the app returned without calling start_response".into())
        })
    }

    fn ensure_head_sent(&mut self, py: Python<'_>) -> Result<(), AppFailure> {
        if self.sent {
            return Ok(());
        }
        let head = self.take_head()?;
        let responder = self.responder.clone().ok_or(AppFailure::HostGone)?;
        send(py, &responder, AppEvent::Head(head))
    }
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        {
            let mut this = slf.borrow_mut();
            match exc_info {
                // PEP 3333: with exc_info after the head went out, re-raise the app's error.
                Some(exc) if this.sent => return Err(PyErr::from_value(exc.get_item(1)?)),
                Some(_) => {}
                None if this.head.is_some() || this.sent => {
                    return Err(PyAssertionError::new_err(
                        "start_response called a second time without exc_info",
                    ))
                }
                None => {}
            }
            let status: String = status
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("status must be a str such as '200 OK'"))?
                .to_str()?
                .to_owned();
            let headers = parse_headers(headers)?;
            match ResponseHead::new(&status, headers) {
                Ok(head) => this.head = Some(head),
                Err(why) => {
                    this.refused = Some(why.clone());
                    return Err(PyValueError::new_err(why));
                }
            }
        }
        slf.getattr(intern!(slf.py(), "write"))
    }

    /// PEP 3333's `write(data)`: sends the head if needed, then `data`, before returning.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let chunk = body_chunk(data).map_err(to_pyerr)?;
        if self.head.is_none() && !self.sent {
            return Err(PyAssertionError::new_err(
                "write() called before start_response",
            ));
        }
        self.ensure_head_sent(py).map_err(to_pyerr)?;
        if chunk.is_empty() {
            return Ok(());
        }
        let responder = self
            .responder
            .clone()
            .ok_or_else(|| PyOSError::new_err("the request is over"))?;
        send(py, &responder, AppEvent::Body(chunk)).map_err(to_pyerr)
    }
}

/// PEP 3333: `response_headers` is a list of `(header_name, header_value)` tuples of str.
fn parse_headers(headers: &Bound<'_, PyAny>) -> PyResult<Vec<(Bytes, Bytes)>> {
    let list = headers.cast::<PyList>().map_err(|_| {
        PyTypeError::new_err("response headers must be a list of (name, value) tuples")
    })?;
    let mut out = Vec::with_capacity(list.len());
    for item in list.iter() {
        let pair = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err("each response header must be a (name, value) tuple")
        })?;
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "each response header must be a (name, value) tuple",
            ));
        }
        let field = |i: usize| -> PyResult<Bytes> {
            let s = pair.get_item(i)?;
            let s = s.cast::<PyString>().map_err(|_| {
                PyTypeError::new_err("response header names and values must be str")
            })?;
            // PEP 3333: header strings are latin-1 ("native strings").
            latin1_bytes(s.to_str()?)
        };
        out.push((field(0)?, field(1)?));
    }
    Ok(out)
}

fn latin1_bytes(s: &str) -> PyResult<Bytes> {
    if s.is_ascii() {
        return Ok(Bytes::copy_from_slice(s.as_bytes()));
    }
    s.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
        .ok_or_else(|| PyValueError::new_err("response header is not latin-1 (PEP 3333)"))
}

/// `wsgi.input`: the request body, pulled from the host as the app reads.
///
/// Pieces are kept as the host delivered them and copied once, straight into the `bytes`
/// object a read returns.
#[pyclass(module = "portico", name = "InputStream")]
pub(crate) struct Input {
    responder: Option<Responder>,
    pieces: VecDeque<Bytes>,
    available: usize,
    done: bool,
    /// Why the body could not be read; every later read raises it again, so a truncated
    /// body never reads as a complete one.
    failed: Option<String>,
}

impl Input {
    /// `buffered` is the whole body when the host read it before submitting.
    fn new(responder: Responder, body: BodyLength, buffered: Option<Vec<Bytes>>) -> Input {
        let done = buffered.is_some() || matches!(body, BodyLength::Empty | BodyLength::Known(0));
        let pieces: VecDeque<Bytes> = buffered.unwrap_or_default().into();
        Input {
            responder: Some(responder),
            available: pieces.iter().map(Bytes::len).sum(),
            pieces,
            done,
            failed: None,
        }
    }

    /// Fetches one more piece from the host; `false` at the end of the body.
    fn fill(&mut self, py: Python<'_>) -> PyResult<bool> {
        if let Some(why) = &self.failed {
            return Err(PyOSError::new_err(why.clone()));
        }
        if self.done {
            return Ok(false);
        }
        let responder = self
            .responder
            .clone()
            .ok_or_else(|| PyOSError::new_err("the request is over"))?;
        send(py, &responder, AppEvent::NeedBody).map_err(to_pyerr)?;
        match py.detach(|| responder.recv_body_blocking()) {
            BodyPiece::Data(data) => {
                self.available += data.len();
                self.pieces.push_back(data);
                Ok(true)
            }
            BodyPiece::End => {
                self.done = true;
                Ok(false)
            }
            BodyPiece::Failed(e) => {
                self.done = true;
                self.pieces.clear();
                self.available = 0;
                self.failed = Some(e.to_string());
                Err(PyOSError::new_err(e.to_string()))
            }
        }
    }

    /// The first `n` buffered bytes (fewer if fewer are buffered) as one `bytes` object.
    fn take<'py>(&mut self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let n = n.min(self.available);
        self.available -= n;
        if let Some(front) = self.pieces.front_mut().filter(|f| f.len() >= n) {
            // The usual case: one piece holds it all (no zero-filling, one copy).
            let out = PyBytes::new(py, &front[..n]);
            front.advance(n);
            if front.is_empty() {
                self.pieces.pop_front();
            }
            return Ok(out);
        }
        let pieces = &mut self.pieces;
        PyBytes::new_with(py, n, |out| {
            let mut filled = 0;
            while filled < n {
                let Some(front) = pieces.front_mut() else {
                    break;
                };
                let k = front.len().min(n - filled);
                out[filled..filled + k].copy_from_slice(&front[..k]);
                front.advance(k);
                if front.is_empty() {
                    pieces.pop_front();
                }
                filled += k;
            }
            Ok(())
        })
    }

    /// Where the first line ends (just past `\n`) among the buffered bytes, if it does.
    fn line_end(&self) -> Option<usize> {
        let mut offset = 0;
        for piece in &self.pieces {
            if let Some(i) = piece.iter().position(|&b| b == b'\n') {
                return Some(offset + i + 1);
            }
            offset += piece.len();
        }
        None
    }
}

#[pymethods]
impl Input {
    #[pyo3(signature = (size = None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let want = size.filter(|&n| n >= 0).map_or(usize::MAX, |n| n as usize);
        while self.available < want && self.fill(py)? {}
        self.take(py, want)
    }

    #[pyo3(signature = (size = None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let limit = size.filter(|&n| n >= 0).map_or(usize::MAX, |n| n as usize);
        loop {
            if let Some(end) = self.line_end() {
                return self.take(py, end.min(limit));
            }
            if self.available >= limit || !self.fill(py)? {
                return self.take(py, limit);
            }
        }
    }

    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let hint = hint.filter(|&h| h > 0).map(|h| h as usize);
        let mut lines = Vec::new();
        let mut total = 0;
        loop {
            let line = self.readline(py, None)?;
            if line.as_bytes().is_empty() {
                return Ok(lines);
            }
            total += line.as_bytes().len();
            lines.push(line);
            if hint.is_some_and(|h| total >= h) {
                return Ok(lines);
            }
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.readline(py, None)?;
        Ok((!line.as_bytes().is_empty()).then_some(line))
    }
}

/// `wsgi.errors`: text written here goes to the server's log, a line at a time.
#[pyclass(module = "portico", name = "ErrorStream")]
pub(crate) struct ErrorStream {
    app: String,
    pending: std::sync::Mutex<String>,
}

impl ErrorStream {
    fn new(app: &str) -> ErrorStream {
        ErrorStream {
            app: app.to_owned(),
            pending: std::sync::Mutex::new(String::new()),
        }
    }

    fn emit(&self, text: &str) {
        for line in text.lines() {
            log::error!("app `{}`: {}", self.app, line);
        }
    }
}

#[pymethods]
impl ErrorStream {
    fn write(&self, text: &str) -> usize {
        // Only this thread holds the lock, and never across Python calls.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.push_str(text);
        if let Some(end) = pending.rfind('\n') {
            let complete: String = pending.drain(..=end).collect();
            drop(pending);
            self.emit(&complete);
        }
        text.len()
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(line?.extract::<&str>()?);
        }
        Ok(())
    }

    fn flush(&self) {
        let rest: String =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if !rest.is_empty() {
            self.emit(&rest);
        }
    }
}

/// `wsgi.file_wrapper` (PEP 3333 "Optional Platform-Specific File Handling"): a real file is
/// sent by the host straight from its descriptor; anything else is read in blocks.
#[pyclass(module = "portico", name = "FileWrapper")]
pub(crate) struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

impl FileWrapper {
    /// A duplicate of the wrapped file's descriptor with the region left to send, if the
    /// object is a regular file with a descriptor.
    fn as_file_body(&self, py: Python<'_>) -> Option<FileBody> {
        let filelike = self.filelike.bind(py);
        let fd: i32 = filelike.call_method0("fileno").ok()?.extract().ok()?;
        let offset: u64 = match filelike.call_method0("tell") {
            Ok(pos) => pos.extract().ok()?,
            Err(_) => 0,
        };
        // SAFETY: dup returns a new descriptor that nobody else owns (or -1, checked); the
        // File takes sole ownership of it and closes it when dropped.
        let file = unsafe {
            let dup = libc::dup(fd);
            if dup < 0 {
                return None;
            }
            std::fs::File::from_raw_fd(dup)
        };
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        Some(FileBody {
            file,
            offset,
            len: Some(meta.len().saturating_sub(offset)),
        })
    }
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize = 8192))]
    fn py_new(filelike: Py<PyAny>, blksize: usize) -> FileWrapper {
        FileWrapper {
            filelike,
            blksize: blksize.max(1),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let block = self
            .filelike
            .bind(py)
            .call_method1(intern!(py, "read"), (self.blksize,))?;
        Ok((block.len()? > 0).then_some(block))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if let Some(close) = self.filelike.bind(py).getattr_opt(intern!(py, "close"))? {
            close.call0()?;
        }
        Ok(())
    }
}

/// HTTP methods are tokens; the usual ones come from interned strings.
fn method_str<'py>(py: Python<'py>, method: &str) -> Bound<'py, PyString> {
    match method {
        "GET" => intern!(py, "GET").clone(),
        "POST" => intern!(py, "POST").clone(),
        "HEAD" => intern!(py, "HEAD").clone(),
        _ => PyString::new(py, method),
    }
}

/// PEP 3333 "Unicode Issues": environ strings carry bytes as latin-1 code points.
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> Bound<'py, PyString> {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.is_ascii() => PyString::new(py, s),
        _ => PyString::new(py, &bytes.iter().map(|&b| b as char).collect::<String>()),
    }
}

/// `SERVER_NAME`/`SERVER_PORT` from the Host header, else from the local address
/// (RFC 3875 sections 4.1.14-15, as gunicorn and mod_wsgi fill them).
fn server_name_port(head: &RequestHead) -> (Vec<u8>, String) {
    let default_port = if head.secure { "443" } else { "80" };
    if let Some(host) = head.header("host").filter(|h| !h.is_empty()) {
        // `[v6]:port`, `name:port` or a bare name.
        let split = match host.iter().rposition(|&b| b == b':') {
            Some(i) if !host[i..].contains(&b']') => Some(i),
            _ => None,
        };
        return match split {
            Some(i) => (
                host[..i].to_vec(),
                String::from_utf8_lossy(&host[i + 1..]).into_owned(),
            ),
            None => (host.to_vec(), default_port.to_owned()),
        };
    }
    match head.server {
        Some(addr) => (
            super::ip_text(addr.ip()).into_bytes(),
            addr.port().to_string(),
        ),
        None => (b"localhost".to_vec(), default_port.to_owned()),
    }
}

/// The CGI names of the request headers (RFC 3875 section 4.1.18): `HTTP_` + upper case with
/// `-` as `_`, repeated fields joined (RFC 9110 section 5.3; cookies with `; `, RFC 9113
/// section 8.2.3), `Content-Type`/`Content-Length` without the prefix.
///
/// A name that contains `_` is dropped, as nginx does by default: otherwise `X_Forwarded_For`
/// would land on the same key as `X-Forwarded-For` and could pose as it.
pub(crate) fn cgi_headers(headers: &[(Bytes, Bytes)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if name.contains(&b'_') || name.first() == Some(&b':') {
            continue;
        }
        let key: Vec<u8> = if name.eq_ignore_ascii_case(b"content-type") {
            b"CONTENT_TYPE".to_vec()
        } else if name.eq_ignore_ascii_case(b"content-length") {
            b"CONTENT_LENGTH".to_vec()
        } else {
            b"HTTP_"
                .iter()
                .copied()
                .chain(name.iter().map(|&b| match b {
                    b'-' => b'_',
                    b => b.to_ascii_uppercase(),
                }))
                .collect()
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            // Repeated identical lengths are allowed (RFC 9110 section 8.6) and mean one.
            Some(_) if key == b"CONTENT_LENGTH" => {}
            Some((_, joined)) => {
                let sep: &[u8] = if name.eq_ignore_ascii_case(b"cookie") {
                    b"; "
                } else {
                    b", "
                };
                joined.extend_from_slice(sep);
                joined.extend_from_slice(value);
            }
            None => out.push((key, value.to_vec())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::cgi_headers;
    use bytes::Bytes;

    fn h(n: &'static str, v: &'static str) -> (Bytes, Bytes) {
        (
            Bytes::from_static(n.as_bytes()),
            Bytes::from_static(v.as_bytes()),
        )
    }

    #[test]
    fn underscore_headers_cannot_pose_as_dashed_ones() {
        let env = cgi_headers(&[
            h("x-forwarded-for", "1.2.3.4"),
            h("x_forwarded_for", "6.6.6.6"),
        ]);
        assert_eq!(
            env,
            vec![(b"HTTP_X_FORWARDED_FOR".to_vec(), b"1.2.3.4".to_vec())]
        );
    }

    #[test]
    fn repeated_headers_join_and_cookies_use_semicolons() {
        let env = cgi_headers(&[
            h("accept", "a"),
            h("cookie", "x=1"),
            h("accept", "b"),
            h("cookie", "y=2"),
            h("content-type", "text/plain"),
        ]);
        assert_eq!(
            env,
            vec![
                (b"HTTP_ACCEPT".to_vec(), b"a, b".to_vec()),
                (b"HTTP_COOKIE".to_vec(), b"x=1; y=2".to_vec()),
                (b"CONTENT_TYPE".to_vec(), b"text/plain".to_vec()),
            ]
        );
    }
}

//! The request as the core sees it: nginx's request head, route and body bytes, copied into
//! owned data on the nginx thread (the app's threads never see an nginx object).

use bytes::Bytes;
use nginx_sys::{
    ngx_connection_local_sockaddr, ngx_http_request_t, ngx_int_t, ngx_str_t, NGX_HTTP_VERSION_10,
    NGX_HTTP_VERSION_20, NGX_OK,
};
use portico_core::model::{BodyLength, HttpVersion, RequestHead};
use portico_core::router::Route;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// The route of `r` under `mount`: nginx picked the location; the path below the mount is
/// `PATH_INFO` (nginx's decoded, normalized URI).
///
/// # Safety
/// `r` is live.
pub unsafe fn route_of(r: *mut ngx_http_request_t, app: usize, mount: &str) -> Route {
    // SAFETY: the request's URI is in its pool.
    let uri = unsafe { bytes_of(&(*r).uri) };
    let mount = mount.trim_end_matches('/');
    let m = mount.as_bytes();
    if uri.starts_with(m) && (uri.len() == m.len() || uri[m.len()] == b'/') {
        Route {
            app,
            script_name: mount.to_owned(),
            path_info: uri[m.len()..].to_vec(),
        }
    } else {
        Route {
            app,
            script_name: String::new(),
            path_info: uri.to_vec(),
        }
    }
}

/// The bytes of an nginx string.
///
/// # Safety
/// `s` must point to `len` readable bytes (or have `len` 0).
pub unsafe fn bytes_of(s: &ngx_str_t) -> &[u8] {
    if s.len == 0 || s.data.is_null() {
        &[]
    } else {
        // SAFETY: the caller's.
        unsafe { core::slice::from_raw_parts(s.data, s.len) }
    }
}

/// A socket address nginx holds, as Rust's.
///
/// # Safety
/// `sa` is null or points to a socket address of its family's size.
unsafe fn socket_addr(sa: *const libc::sockaddr) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller's; the family says which structure it is.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET => {
                let sin = &*sa.cast::<libc::sockaddr_in>();
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6 = &*sa.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// What the connection's TLS negotiated, if it is TLS (`https` for the app).
///
/// # Safety
/// `r` is live.
#[cfg(ngx_feature = "http_ssl")]
unsafe fn tls_info(r: *mut ngx_http_request_t) -> Option<portico_core::model::TlsInfo> {
    // SAFETY: the caller's; nginx's getters write pool strings into `s`.
    unsafe {
        let c = (*r).connection;
        if (*c).ssl.is_null() {
            return None;
        }
        let get = |f: unsafe extern "C" fn(
            *mut nginx_sys::ngx_connection_t,
            *mut nginx_sys::ngx_pool_t,
            *mut ngx_str_t,
        ) -> ngx_int_t| {
            let mut s = ngx_str_t {
                len: 0,
                data: core::ptr::null_mut(),
            };
            // These getters point `data` at OpenSSL's own NUL-terminated name and leave
            // `len` unset.
            if f(c, (*r).pool, &mut s) == NGX_OK as ngx_int_t && !s.data.is_null() {
                core::ffi::CStr::from_ptr(s.data.cast())
                    .to_string_lossy()
                    .into_owned()
            } else {
                String::new()
            }
        };
        let protocol = get(nginx_sys::ngx_ssl_get_protocol);
        let version = match protocol.as_str() {
            "TLSv1.3" => Some(0x0304),
            "TLSv1.2" => Some(0x0303),
            _ => None,
        };
        let ssl = (*(*c).ssl).connection;
        let cipher = nginx_sys::SSL_get_current_cipher(ssl);
        Some(portico_core::model::TlsInfo {
            server_cert: server_cert_pem(nginx_sys::SSL_get_certificate(ssl)),
            cipher: get(nginx_sys::ngx_ssl_get_cipher_name),
            protocol,
            version,
            // The IANA number (RFC 8446 appendix B.4; the registry for TLS 1.2's).
            cipher_suite: (!cipher.is_null())
                .then(|| nginx_sys::SSL_CIPHER_get_protocol_id(cipher)),
        })
    }
}

#[cfg(ngx_feature = "http_ssl")]
thread_local! {
    /// The PEM of each server certificate met, by its OpenSSL object (one per `ssl_certificate`,
    /// alive as long as the worker's configuration).
    static CERT_PEM: std::cell::RefCell<std::collections::HashMap<usize, std::sync::Arc<str>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The certificate a TLS connection presented, PEM-encoded (RFC 7468 section 2), for the
/// ASGI `tls` extension's `server_cert`.
///
/// # Safety
/// `x509` is null or a live OpenSSL certificate.
#[cfg(ngx_feature = "http_ssl")]
unsafe fn server_cert_pem(x509: *mut nginx_sys::X509) -> Option<std::sync::Arc<str>> {
    use base64::Engine;
    if x509.is_null() {
        return None;
    }
    if let Some(pem) = CERT_PEM.with(|m| m.borrow().get(&(x509 as usize)).cloned()) {
        return Some(pem);
    }
    // SAFETY: i2d_X509 with a null output returns the DER length; then it writes that many
    // bytes at the pointer it is given (and advances it).
    let der = unsafe {
        let len = nginx_sys::i2d_X509(x509, core::ptr::null_mut());
        if len <= 0 {
            return None;
        }
        let mut der = vec![0u8; len as usize];
        let mut out = der.as_mut_ptr();
        if nginx_sys::i2d_X509(x509, &mut out) != len {
            return None;
        }
        der
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let pem: std::sync::Arc<str> = pem.into();
    CERT_PEM.with(|m| m.borrow_mut().insert(x509 as usize, pem.clone()));
    Some(pem)
}

#[cfg(not(ngx_feature = "http_ssl"))]
unsafe fn tls_info(_r: *mut ngx_http_request_t) -> Option<portico_core::model::TlsInfo> {
    None
}

/// The request head, owned. The body is described (`Content-Length`, chunked, or a
/// length-less HTTP/2 stream) but not read.
///
/// # Safety
/// `r` is live.
pub unsafe fn request_head(r: *mut ngx_http_request_t) -> RequestHead {
    // SAFETY: the caller's; everything read here lives in the request or its connection.
    unsafe {
        let req = &*r;
        let c = req.connection;
        let unparsed = bytes_of(&req.unparsed_uri);
        let path_end = unparsed
            .iter()
            .position(|&b| b == b'?')
            .unwrap_or(unparsed.len());
        let version = match req.http_version as u32 {
            v if v >= NGX_HTTP_VERSION_20 => HttpVersion::Http2,
            v if v <= NGX_HTTP_VERSION_10 => HttpVersion::Http10,
            _ => HttpVersion::Http11,
        };
        let request = ngx::http::Request::from_ngx_http_request(r);
        let mut headers: Vec<(Bytes, Bytes)> = request
            .headers_in_iterator()
            .map(|(name, value)| {
                (
                    Bytes::from(name.as_bytes().to_ascii_lowercase()),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect();
        if !headers.iter().any(|(n, _)| n.as_ref() == b"host") && req.headers_in.server.len > 0 {
            // HTTP/2's `:authority` stands in for Host (RFC 9113 section 8.3.1).
            headers.insert(
                0,
                (
                    Bytes::from_static(b"host"),
                    Bytes::copy_from_slice(bytes_of(&req.headers_in.server)),
                ),
            );
        }
        let client = socket_addr((*c).sockaddr.cast());
        let server =
            if ngx_connection_local_sockaddr(c, core::ptr::null_mut(), 0) == NGX_OK as ngx_int_t {
                socket_addr((*c).local_sockaddr.cast())
            } else {
                None
            };
        let length = req.headers_in.content_length_n;
        // Checked first: while reading a chunked body nginx counts the bytes read so far in
        // `content_length_n`.
        let body = if req.headers_in.chunked() != 0 {
            // Chunked (HTTP/1.1), or an HTTP/2 stream without content-length that goes on
            // after its headers.
            BodyLength::Unknown
        } else if length > 0 {
            BodyLength::Known(length as u64)
        } else {
            BodyLength::Empty
        };
        let tls = tls_info(r);
        RequestHead {
            method: String::from_utf8_lossy(bytes_of(&req.method_name)).into_owned(),
            raw_path: Bytes::copy_from_slice(&unparsed[..path_end]),
            query: Bytes::copy_from_slice(bytes_of(&req.args)),
            version,
            headers,
            // nginx's realip module and `X-Forwarded-Proto` handling are nginx's own business
            // (set_real_ip_from): the scheme is the connection's.
            secure: tls.is_some(),
            tls,
            // nginx's HTTP/2 filter sends `headers_out.trailers` with the last buffer.
            trailers: version == HttpVersion::Http2,
            early_hints: false,
            client,
            server,
            body,
        }
    }
}

/// A piece of the request body as nginx holds it.
pub enum BodyPart {
    /// In memory, copied out of nginx's buffer.
    Bytes(Bytes),
    /// A region of nginx's temporary file for a buffered body (`client_body_temp_path`), read
    /// a piece at a time as the app asks, so a large upload never sits whole in memory. The
    /// descriptor is the request's: nginx closes it when it frees the request.
    File {
        /// nginx's descriptor of the file.
        fd: RawFd,
        /// Where the region starts and ends in it.
        at: u64,
        /// Where the region ends.
        end: u64,
    },
}

impl BodyPart {
    /// Bytes in the piece.
    pub fn size(&self) -> u64 {
        match self {
            BodyPart::Bytes(data) => data.len() as u64,
            BodyPart::File { at, end, .. } => end - at,
        }
    }
}

/// Largest piece read from nginx's temporary file at once.
const FILE_PIECE: u64 = 64 * 1024;

/// The next piece of a file region: its bytes, and the rest of the region if any is left.
///
/// # Safety
/// `fd` must be the descriptor of a [`BodyPart::File`] taken from a request that is still
/// live: nginx closes it when it frees the request (its temporary file's cleanup runs after
/// ours, which was registered later).
pub unsafe fn read_file_part(
    fd: RawFd,
    at: u64,
    end: u64,
) -> std::io::Result<(Bytes, Option<BodyPart>)> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    let len = FILE_PIECE.min(end - at) as usize;
    // SAFETY: the caller's: `fd` is open for as long as this call; `ManuallyDrop` leaves it
    // open afterwards, since nginx owns it.
    let file = core::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, at)?;
    let next = at + len as u64;
    let rest = (next < end).then_some(BodyPart::File { fd, at: next, end });
    Ok((Bytes::from(data), rest))
}

/// Takes the body nginx has read so far (`r->request_body->bufs`): memory buffers are copied,
/// regions of its temporary file are noted to be read later. Marks them consumed, so nginx
/// can reuse its buffer and read on (unbuffered reading: see
/// `ngx_http_read_unbuffered_request_body`).
///
/// # Safety
/// `r` is live; nginx thread only.
pub unsafe fn take_body(r: *mut ngx_http_request_t, into: &mut Vec<BodyPart>) {
    // SAFETY: the caller's; the chain and its buffers belong to the live request.
    unsafe {
        let rb = (*r).request_body;
        if rb.is_null() {
            return;
        }
        let mut cl = (*rb).bufs;
        (*rb).bufs = core::ptr::null_mut();
        while !cl.is_null() {
            let b = &mut *(*cl).buf;
            if b.in_file() != 0 && !b.file.is_null() {
                let (at, end) = (b.file_pos.max(0) as u64, b.file_last.max(0) as u64);
                if end > at {
                    into.push(BodyPart::File {
                        fd: (*b.file).fd,
                        at,
                        end,
                    });
                }
                b.file_pos = b.file_last;
            } else if b.last > b.pos {
                let len = b.last.offset_from(b.pos) as usize;
                into.push(BodyPart::Bytes(Bytes::copy_from_slice(
                    core::slice::from_raw_parts(b.pos, len),
                )));
            }
            // Consumed: nginx frees a buffer for reuse once its data is gone.
            b.pos = b.last;
            cl = (*cl).next;
        }
    }
}

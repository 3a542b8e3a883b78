//! Proxy headers: what a trusted proxy in front says of the client (`X-Forwarded-For`) and of
//! the scheme it used (`X-Forwarded-Proto`), as gunicorn (`forwarded_allow_ips`) and uvicorn
//! (`--proxy-headers`) take them. The headers stay in the request for apps that look
//! themselves; only the client address and the scheme change.

use crate::model::RequestHead;
use portico_config::TrustedProxies;
use std::net::{IpAddr, SocketAddr};

/// Applies the proxy headers of `head` when its peer is one of `trusted`:
///
/// - `X-Forwarded-Proto`: the last value (the one the nearest proxy added) decides whether
///   the request counts as secure: `https` and `wss` do, `http` and `ws` do not; anything
///   else is ignored.
/// - `X-Forwarded-For`: read from the right, addresses of trusted proxies are skipped and the
///   first other one is the client (port 0: the proxy does not say); when every address is a
///   trusted proxy, the leftmost is. A value that is no address ends the search, and the
///   client stays the last address found before it (or the peer).
pub fn apply(head: &mut RequestHead, trusted: &TrustedProxies) {
    let Some(peer) = head.client else {
        return;
    };
    if trusted.is_empty() || !trusted.trusts(peer.ip()) {
        return;
    }
    if let Some(proto) = last_value(head, "x-forwarded-proto") {
        if proto.eq_ignore_ascii_case("https") || proto.eq_ignore_ascii_case("wss") {
            head.secure = true;
        } else if proto.eq_ignore_ascii_case("http") || proto.eq_ignore_ascii_case("ws") {
            head.secure = false;
        }
    }
    if let Some(client) = forwarded_client(head, trusted) {
        head.client = Some(SocketAddr::new(client, 0));
    }
}

/// The last comma-separated value of the last `name` field, trimmed.
fn last_value(head: &RequestHead, name: &str) -> Option<String> {
    let (_, value) = head
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))?;
    let value = std::str::from_utf8(value).ok()?;
    Some(value.rsplit(',').next()?.trim().to_owned())
}

/// The client an `X-Forwarded-For` chain names (all its fields, in order).
fn forwarded_client(head: &RequestHead, trusted: &TrustedProxies) -> Option<IpAddr> {
    chain_client(
        head.headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"x-forwarded-for"))
            .map(|(_, value)| value.as_ref()),
        trusted,
    )
}

/// The client address of a request from `peer` whose `X-Forwarded-For` fields are
/// `forwarded_for` (in order), as [`apply`] gives it to the app: the peer itself unless it
/// is trusted and the chain names another. The access log shows this address.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    trusted: &TrustedProxies,
) -> IpAddr {
    if trusted.is_empty() || !trusted.trusts(peer) {
        return peer;
    }
    chain_client(forwarded_for, trusted).unwrap_or(peer)
}

/// Reads an `X-Forwarded-For` chain from the right (see [`apply`]).
fn chain_client<'a>(
    fields: impl Iterator<Item = &'a [u8]>,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let hops: Vec<&[u8]> = fields
        .flat_map(|value| value.split(|&b| b == b','))
        .collect();
    let mut client = None;
    for hop in hops.iter().rev() {
        let Some(ip) = std::str::from_utf8(hop).ok().and_then(parse_hop) else {
            break;
        };
        client = Some(ip);
        if !trusted.trusts(ip) {
            break;
        }
    }
    client
}

/// An address as proxies write them: `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]`, with
/// or without a port (`203.0.113.7:4711`, `[2001:db8::1]:4711`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BodyLength, HttpVersion};
    use bytes::Bytes;

    fn head(peer: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            raw_path: Bytes::from_static(b"/"),
            query: Bytes::new(),
            version: HttpVersion::Http11,
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        Bytes::copy_from_slice(n.as_bytes()),
                        Bytes::copy_from_slice(v.as_bytes()),
                    )
                })
                .collect(),
            tls: None,
            secure: false,
            trailers: false,
            early_hints: false,
            client: Some(peer.parse().unwrap()),
            server: None,
            body: BodyLength::Empty,
        }
    }

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn applied(peer: &str, headers: &[(&str, &str)], trust: &[&str]) -> (String, bool) {
        let mut h = head(peer, headers);
        apply(&mut h, &trusted(trust));
        (h.client.unwrap().to_string(), h.secure)
    }

    #[test]
    fn a_trusted_peer_names_the_client_and_scheme() {
        let got = applied(
            "127.0.0.1:5000",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            &["127.0.0.1"],
        );
        assert_eq!(got, ("203.0.113.7:0".into(), true));
    }

    #[test]
    fn the_logged_client_is_the_one_the_app_sees() {
        let chain = [b"1.1.1.1, 203.0.113.7".as_slice()];
        let peer = "127.0.0.1".parse().unwrap();
        let logged = client_address(peer, chain.into_iter(), &trusted(&["127.0.0.1"]));
        assert_eq!(logged.to_string(), "203.0.113.7");
        let untrusted = "198.51.100.1".parse().unwrap();
        let logged = client_address(untrusted, chain.into_iter(), &trusted(&["127.0.0.1"]));
        assert_eq!(logged, untrusted);
        assert_eq!(
            client_address(peer, std::iter::empty(), &trusted(&["127.0.0.1"])),
            peer
        );
    }

    #[test]
    fn an_untrusted_peer_is_not_believed() {
        let got = applied(
            "198.51.100.1:5000",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-proto", "https"),
            ],
            &["127.0.0.1"],
        );
        assert_eq!(got, ("198.51.100.1:5000".into(), false));
    }

    #[test]
    fn the_chain_is_read_from_the_right_past_trusted_proxies() {
        // A client that sends its own X-Forwarded-For cannot pose as another: the proxy
        // appends the address it saw, and that is the first untrusted one from the right.
        let chain = [("x-forwarded-for", "1.1.1.1, 203.0.113.7, 10.0.0.2")];
        let got = applied("127.0.0.1:1", &chain, &["127.0.0.1", "10.0.0.0/8"]);
        assert_eq!(got.0, "203.0.113.7:0");
        let split = [
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "[2001:db8::5]:4711"),
        ];
        assert_eq!(
            applied("127.0.0.1:1", &split, &["127.0.0.1"]).0,
            "[2001:db8::5]:0"
        );
        let all_trusted = [("x-forwarded-for", "10.0.0.3, 10.0.0.2")];
        let got = applied("127.0.0.1:1", &all_trusted, &["127.0.0.1", "10.0.0.0/8"]);
        assert_eq!(got.0, "10.0.0.3:0");
        let garbage = [("x-forwarded-for", "unknown")];
        assert_eq!(
            applied("127.0.0.1:1", &garbage, &["127.0.0.1"]).0,
            "127.0.0.1:1"
        );
    }

    #[test]
    fn the_nearest_proxys_scheme_counts() {
        let proto = [("x-forwarded-proto", "https, http")];
        assert!(!applied("127.0.0.1:1", &proto, &["*"]).1);
        let odd = [("x-forwarded-proto", "gopher")];
        assert!(!applied("127.0.0.1:1", &odd, &["*"]).1);
        let wss = [("x-forwarded-proto", "WSS")];
        assert!(applied("127.0.0.1:1", &wss, &["*"]).1);
    }
}

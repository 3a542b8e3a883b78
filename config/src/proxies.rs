//! `server.forwarded_allow_ips`: the peers whose `X-Forwarded-For` and `X-Forwarded-Proto`
//! are believed, as gunicorn's `forwarded_allow_ips` and uvicorn's `--forwarded-allow-ips`.

use std::net::IpAddr;

/// The proxies a server trusts to tell it who the client is and which scheme it used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    /// `*`: every peer.
    any: bool,
    /// Networks, as an address and a prefix length.
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parses entries as the config takes them: an address (`127.0.0.1`, `::1`), a network
    /// (`10.0.0.0/8`, `fd00::/8`), or `*`. Errors name the entry's index and what is wrong.
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, Vec<(usize, String)>> {
        let mut trusted = TrustedProxies::default();
        let mut errors = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let entry = entry.trim();
            if entry == "*" {
                trusted.any = true;
                continue;
            }
            match parse_net(entry) {
                Some(net) => trusted.nets.push(net),
                None => errors.push((
                    i,
                    format!("`{entry}` is not an IP address, a network (ADDRESS/BITS) or `*`"),
                )),
            }
        }
        if errors.is_empty() {
            Ok(trusted)
        } else {
            Err(errors)
        }
    }

    /// Whether `ip` is one of the trusted proxies. An IPv4-mapped IPv6 address counts as
    /// its IPv4 address.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        if self.any {
            return true;
        }
        let ip = ip.to_canonical();
        self.nets.iter().any(|&(net, bits)| in_net(ip, net, bits))
    }

    /// Whether no peer is trusted (the headers are never looked at).
    pub fn is_empty(&self) -> bool {
        !self.any && self.nets.is_empty()
    }
}

fn parse_net(entry: &str) -> Option<(IpAddr, u8)> {
    let (addr, bits) = match entry.split_once('/') {
        Some((addr, bits)) => (addr, Some(bits.parse::<u8>().ok()?)),
        None => (entry, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let bits = bits.unwrap_or(max);
    if bits > max {
        return None;
    }
    // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is stored as the IPv4 network it is, as
    // peers are compared in their IPv4 form; one shorter than the mapped prefix covers more
    // than IPv4 and stays IPv6.
    match addr.to_canonical() {
        IpAddr::V4(v4) if addr.is_ipv6() && bits >= 96 => Some((IpAddr::V4(v4), bits - 96)),
        _ => Some((addr, bits)),
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX
                .checked_shl(32u32.saturating_sub(u32::from(bits)))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX
                .checked_shl(128u32.saturating_sub(u32::from(bits)))
                .unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn addresses_networks_and_star() {
        let t = parse(&["127.0.0.1", "10.0.0.0/8", "fd00::/8"]);
        assert!(t.trusts("127.0.0.1".parse().unwrap()));
        assert!(t.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!t.trusts("127.0.0.2".parse().unwrap()));
        assert!(t.trusts("10.200.3.4".parse().unwrap()));
        assert!(!t.trusts("11.0.0.1".parse().unwrap()));
        assert!(t.trusts("fd12::1".parse().unwrap()));
        assert!(!t.trusts("fe80::1".parse().unwrap()));
        assert!(parse(&["*"]).trusts("203.0.113.9".parse().unwrap()));
        assert!(parse(&["0.0.0.0/0"]).trusts("203.0.113.9".parse().unwrap()));
        assert!(parse(&[]).is_empty());
    }

    #[test]
    fn an_ipv4_mapped_entry_trusts_its_ipv4_address_only() {
        let one = parse(&["::ffff:127.0.0.1"]);
        assert!(one.trusts("127.0.0.1".parse().unwrap()));
        assert!(one.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!one.trusts("203.0.113.9".parse().unwrap()));
        let net = parse(&["::ffff:10.0.0.0/104"]);
        assert!(net.trusts("10.9.9.9".parse().unwrap()));
        assert!(!net.trusts("11.0.0.1".parse().unwrap()));
        assert!(!parse(&["::/96"]).trusts("203.0.113.9".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_named() {
        let entries: Vec<String> = ["127.0.0.1", "localhost", "10.0.0.0/33"]
            .iter()
            .map(|e| e.to_string())
            .collect();
        let errors = TrustedProxies::parse(&entries).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!(errors[0].1.contains("`localhost`"), "{errors:?}");
    }
}

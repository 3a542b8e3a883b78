//! Routing by mount: the longest mount prefix that ends at a path-segment boundary wins, and
//! the path splits there into `SCRIPT_NAME` and `PATH_INFO` (PEP 3333, "URL Reconstruction";
//! ASGI's `root_path`).

use percent_encoding::percent_decode;

/// Mounts, longest first.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// (mount without trailing slash, app index)
    mounts: Vec<(String, usize)>,
}

/// Where a request goes and how its path splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Index of the app in the dispatcher.
    pub app: usize,
    /// The mount, without trailing slash (`""` for `/`).
    pub script_name: String,
    /// The percent-decoded path below the mount, as raw bytes (latin-1 when it becomes a
    /// Python `str`, PEP 3333 "Unicode Issues").
    pub path_info: Vec<u8>,
}

impl Router {
    /// Builds a router from `(mount, app index)` pairs; mounts may have a trailing slash.
    pub fn new<'a>(mounts: impl IntoIterator<Item = (&'a str, usize)>) -> Router {
        let mut mounts: Vec<(String, usize)> = mounts
            .into_iter()
            .map(|(m, i)| (m.trim_end_matches('/').to_owned(), i))
            .collect();
        mounts.sort_by_key(|(mount, _)| std::cmp::Reverse(mount.len()));
        Router { mounts }
    }

    /// Routes a raw (percent-encoded) path. Matching is done on the decoded path, as the
    /// split the app sees is of the decoded path.
    pub fn route(&self, raw_path: &[u8]) -> Option<Route> {
        let decoded: std::borrow::Cow<'_, [u8]> = percent_decode(raw_path).into();
        for (mount, app) in &self.mounts {
            let m = mount.as_bytes();
            if decoded.starts_with(m) && (decoded.len() == m.len() || decoded[m.len()] == b'/') {
                return Some(Route {
                    app: *app,
                    script_name: mount.clone(),
                    path_info: decoded[m.len()..].to_vec(),
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_at_segment_boundary() {
        let r = Router::new([("/", 0), ("/api/", 1), ("/api/v2", 2)]);
        let route = |p: &str| {
            let r = r.route(p.as_bytes()).unwrap();
            (
                r.app,
                r.script_name,
                String::from_utf8(r.path_info).unwrap(),
            )
        };
        assert_eq!(route("/api/x"), (1, "/api".into(), "/x".into()));
        assert_eq!(route("/api"), (1, "/api".into(), "".into()));
        assert_eq!(route("/apix"), (0, "".into(), "/apix".into()));
        assert_eq!(route("/api/v2/y"), (2, "/api/v2".into(), "/y".into()));
        assert_eq!(route("/api/v22"), (1, "/api".into(), "/v22".into()));
        assert_eq!(route("/a%20b"), (0, "".into(), "/a b".into()));
    }

    #[test]
    fn no_root_mount_means_no_route() {
        let r = Router::new([("/app", 0)]);
        assert!(r.route(b"/other").is_none());
    }
}

//! Request URLs under a base URL, for Photon's HTTP clients (the proxy's connection to the
//! broker, the loadtest's apps): the base is parsed once, and each request's URL is a copy with
//! its path and query set, so the scheme and host (IDNA included) are not parsed again.

pub use url::{Host, Url};

/// The URL of `path_and_query` (which starts with `/`) after `base`'s own path: the same URL as
/// parsing `{base}{path_and_query}`, except that a `#` is kept (encoded) rather than taken for
/// the start of a fragment and dropped.
pub fn at(base: &Url, path_and_query: &str) -> Url {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let mut url = base.clone();
    match base.path().trim_end_matches('/') {
        "" => url.set_path(path),
        prefix => url.set_path(&format!("{prefix}{path}")),
    }
    url.set_query(query);
    url
}

#[cfg(test)]
mod tests {
    use super::{at, Url};

    #[test]
    fn urls_are_the_parsed_concatenation() {
        let bases = ["http://broker:8080", "https://broker.example/", "http://127.0.0.1:1/beam", "http://[::1]:9/a/b/"];
        let paths = [
            "/v1/tasks",
            "/v1/tasks?filter=todo&wait_count=1&wait_time=10000ms",
            "/v1/tasks/2c1a7e4e-3f7f-4d8b-9b1e-1d6f0c7a9e11/results/app1.proxy2.broker",
            "/v1/tasks?from=app1.proxy1.broker&x=a%20b&y=ä",
            "/v1/odd path/%41?q=1?2",
        ];
        for base in bases {
            for path in paths {
                let parsed = Url::parse(&format!("{}{path}", base.trim_end_matches('/'))).unwrap();
                assert_eq!(at(&Url::parse(base).unwrap(), path), parsed, "{base} + {path}");
            }
        }
        let url = at(&Url::parse("http://broker:8080").unwrap(), "/v1/tasks?from=a#b");
        assert_eq!((url.query(), url.fragment()), (Some("from=a%23b"), None));
    }
}

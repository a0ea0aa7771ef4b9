//! The HTTP side of every request vmrootfs makes to a registry or a token server itself:
//! one client with a connect timeout, a stall timeout and a redirect limit; bodies read with
//! a cap; error bodies cut short and made printable. A registry is untrusted: nothing it
//! sends can make vmrootfs wait forever, grow without bound, or write to the terminal.

use std::time::Duration;

use futures_util::StreamExt;

/// Largest manifest or index accepted: distribution refuses to store a larger one (its
/// `maxManifestBodySize`), and containerd refuses to fetch one.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest token server answer accepted (a token is a JWT of a few KiB).
pub const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// Most of an error body read; what is shown of it is shorter still (`SHOWN_ERROR_CHARS`).
pub const MAX_ERROR_BODY: u64 = 64 << 10;
/// Characters of an error body shown in a message.
const SHOWN_ERROR_CHARS: usize = 300;
/// Redirects followed for one request (registries redirect a blob once, to its storage).
pub const MAX_REDIRECTS: usize = 10;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transfer may go without progress ([`stall_timeout`]) unless told otherwise.
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable that sets the stall timeout (`30s`, `2m`).
pub const STALL_TIMEOUT_VAR: &str = "VMROOTFS_STALL_TIMEOUT";
/// Fewer bytes than this in one stall timeout is a stall, not a slow link (a trickle of a
/// byte a second would otherwise hold a download open for ever).
pub const STALL_MIN_BYTES: u64 = 1024;

/// Why talking to a registry or token server over HTTP failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The request failed before an answer (connection, timeout, redirects, scheme).
    #[error("requesting {url}")]
    Send {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("reading the answer of {url}")]
    Read {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the {what} from {url} is larger than {max} bytes")]
    TooLarge { what: &'static str, url: String, max: u64 },
    #[error("{url} answered HTTP {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("the upload location {location:?} given by {url} is not a URL")]
    BadLocation {
        url: String,
        location: String,
        #[source]
        source: url::ParseError,
    },
    #[error("{from} redirects to {to}, which is not an http(s) URL")]
    BadRedirect { from: String, to: String },
    #[error("{url}: too many redirects (more than {MAX_REDIRECTS})")]
    TooManyRedirects { url: String },
    #[error("{url} stalled: fewer than {STALL_MIN_BYTES} bytes arrived in {}", humantime::format_duration(*.window))]
    Stalled { url: String, window: Duration },
}

/// The stall timeout: `$VMROOTFS_STALL_TIMEOUT` if set and readable, else one minute.
pub fn stall_timeout() -> Duration {
    std::env::var(STALL_TIMEOUT_VAR)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(DEFAULT_STALL_TIMEOUT)
}

/// The client registry and token server requests go through; with `follow_redirects` false,
/// the caller follows them itself (blobs: so that an error names the hop that failed).
pub fn client(follow_redirects: bool) -> reqwest::Client {
    let policy = if follow_redirects {
        reqwest::redirect::Policy::limited(MAX_REDIRECTS)
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(stall_timeout())
        .redirect(policy)
        .build()
        .expect("a client of fixed settings builds")
}

/// Whether asking again may help: a connection or a read that failed or timed out may work the
/// next time; a bad URL, a scheme other than HTTP(S) or a redirect loop never will.
pub fn transient(e: &reqwest::Error) -> bool {
    !(e.is_builder() || e.is_redirect() || e.is_status() || e.is_decode())
}

/// The body of `response`, refusing more than `max` bytes (read no further than that).
pub async fn read_capped(
    response: reqwest::Response,
    max: u64,
    what: &'static str,
) -> Result<Vec<u8>, HttpError> {
    let url = response.url().to_string();
    let too_large = || HttpError::TooLarge { what, url: url.clone(), max };
    if response.content_length().is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| HttpError::Read { url: url.clone(), source })?;
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A failed answer as an error: its status and the start of its body, printable.
pub async fn status_error(response: reqwest::Response) -> HttpError {
    let url = response.url().to_string();
    let status = response.status().as_u16();
    HttpError::Status { url, status, body: printable(&error_body(response).await) }
}

/// Up to [`MAX_ERROR_BODY`] bytes of an error answer's body (what arrived, if it breaks off).
pub async fn error_body(response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        let room = (MAX_ERROR_BODY as usize).saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    body
}

/// The start of `bytes` as text fit for a terminal: invalid UTF-8 replaced, control
/// characters escaped, surrounding whitespace trimmed, at most `SHOWN_ERROR_CHARS` characters.
pub fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    if text.is_empty() {
        return "(no body)".into();
    }
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_ERROR_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `location` (an absolute URL or a reference relative to `base`, as HTTP allows) as a URL.
pub fn resolve(base: &str, location: &str) -> Result<reqwest::Url, HttpError> {
    let bad =
        |source| HttpError::BadLocation { url: base.to_string(), location: location.to_string(), source };
    reqwest::Url::parse(base).map_err(bad)?.join(location).map_err(bad)
}

/// Scheme, host and port of `url`: requests to the same origin may carry the same credentials.
pub fn origin(url: &reqwest::Url) -> (String, Option<String>, Option<u16>) {
    (url.scheme().to_string(), url.host_str().map(str::to_string), url.port_or_known_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_and_cuts() {
        assert_eq!(printable(b"\x1b[2J\x07 bad\0"), "\\u{1b}[2J\\u{7} bad\\u{0}");
        assert_eq!(printable(b"\xff ok \n"), "\u{fffd} ok");
        assert_eq!(printable(b"  "), "(no body)");
        let long = printable(&[b'x'; 1000]);
        assert_eq!(long.chars().count(), SHOWN_ERROR_CHARS + 1);
    }

    #[test]
    fn locations_resolve_against_the_request_url() {
        let base = "http://127.0.0.1:5000/v2/lab/t/blobs/uploads/";
        for (location, want) in [
            ("uploads/u0", "http://127.0.0.1:5000/v2/lab/t/blobs/uploads/uploads/u0"),
            (
                "/v2/lab/t/blobs/uploads/u1?_state=x",
                "http://127.0.0.1:5000/v2/lab/t/blobs/uploads/u1?_state=x",
            ),
            ("https://storage.example/u2", "https://storage.example/u2"),
        ] {
            assert_eq!(resolve(base, location).unwrap().as_str(), want, "{location}");
        }
    }
}

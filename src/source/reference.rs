//! Image references (`alpine:3.20`, `127.0.0.1:5000/lab/img@sha256:…`) parsed by hand, with
//! docker's grammar and completion (`app` → `docker.io/library/app:latest`), into
//! oci-client's [`Reference`].
//!
//! `Reference::from_str` does the same through one large regex whose compilation (Unicode
//! `\w` classes) took 40 ms of CPU at every registry build, pull and push — 5% of pulling
//! the test image on loopback. The grammar is distribution's: a name of `/`-separated
//! lowercase components (`[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`), optionally
//! after a domain (hostname components, optional `:port`); a tag of `[A-Za-z0-9_]` then up
//! to 127 of those, `.` or `-` (ASCII, as docker's Go grammar has it); a digest
//! `algorithm:hex` of 32 or more hex digits. The unit tests hold it to oci-client's parser.

use oci_client::Reference;

/// Why a reference does not parse, in oci-client's words.
pub type ParseError = oci_client::ParseError;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const NAME_MAX: usize = 255;

/// Parses `text` as docker would.
pub fn parse(text: &str) -> Result<Reference, ParseError> {
    if text.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    let (rest, digest) = match text.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (text, None),
    };
    // A tag is after the last ':' that follows the last '/' (before it, a ':' is a port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
        None => (rest, None),
    };
    if !valid_name(name) || tag.is_some_and(|t| !valid_tag(t)) || digest.is_some_and(|d| !valid_digest(d)) {
        return Err(ParseError::ReferenceInvalidFormat);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_MAX {
        return Err(ParseError::NameTooLong);
    }
    if let Some(d) = digest {
        let (algorithm, hex) = d.split_once(':').expect("a valid digest has a ':'");
        let want = match algorithm {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(ParseError::DigestUnsupported),
        };
        if hex.len() != want {
            return Err(ParseError::DigestInvalidLength);
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(registry, repository, t.into(), d.into()),
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[domain/]component(/component)*`.
fn valid_name(name: &str) -> bool {
    let path_ok = |p: &str| !p.is_empty() && p.split('/').all(valid_component);
    path_ok(name) || name.split_once('/').is_some_and(|(domain, path)| valid_domain(domain) && path_ok(path))
}

/// `[a-z0-9]+` runs joined by one separator each: `.`, `_`, `__` or any run of `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        match b[i] {
            b'.' => i += 1,
            b'_' if b.get(i + 1) == Some(&b'_') => i += 2,
            b'_' => i += 1,
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// Hostname components (`[A-Za-z0-9]` at both ends, `-` inside) joined by `.`, then an
/// optional `:port`.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label) && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = t.as_bytes();
    !b.is_empty() && b.len() <= 128 && word(b[0]) && b[1..].iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// `[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`.
fn valid_digest(d: &str) -> bool {
    let Some((algorithm, hex)) = d.split_once(':') else { return false };
    let part = |p: &str| {
        let b = p.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(|x| x.is_ascii_alphanumeric())
    };
    algorithm.split(['-', '_', '+', '.']).all(part)
        && hex.len() >= 32
        && hex.bytes().all(|x| x.is_ascii_hexdigit())
}

/// Registry and repository of a valid name, completed as docker does.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if domain == DOCKER_HUB_LEGACY {
        domain = DOCKER_HUB.to_string();
    }
    if domain == DOCKER_HUB && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    (domain, repository)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Every case parses (or fails) as oci-client's regex parser has it.
    #[test]
    fn parses_as_oci_client_does() {
        let digest = format!("sha256:{HEX}");
        let cases = [
            "alpine".to_string(),
            "alpine:3.20".into(),
            "library/alpine".into(),
            "docker.io/alpine".into(),
            "index.docker.io/library/alpine:edge".into(),
            "127.0.0.1:5000/lab/img:tag".into(),
            "localhost/img".into(),
            "localhost:5000/a/b/c:v1.2-rc_3".into(),
            "ghcr.io/org/app:v1".into(),
            "my-reg.example.com:443/a.b/c__d/e---f:T_ag".into(),
            "test.com:tag".into(),
            "test.com:5000".into(),
            "foo/bar:baz".into(),
            "Foo/bar".into(),
            format!("alpine@{digest}"),
            format!("reg.io/x/y:tag@{digest}"),
            format!("x@sha512:{HEX}{HEX}"),
            format!("x@sha256:{}", &HEX[..40]),
            format!("x@md5:{HEX}"),
            format!("x@sha256:{}", &HEX[..31]),
            format!("x@sha256+b64:{HEX}"),
            "Alpine".into(),
            "alpine:".into(),
            ":tag".into(),
            "alpine:-x".into(),
            "a//b".into(),
            "a/".into(),
            "/a".into(),
            "a_-b".into(),
            "a___b".into(),
            "a..b".into(),
            "a.b".into(),
            "a-b".into(),
            "reg:port/x".into(),
            "-reg.io/x".into(),
            "reg-.io/x".into(),
            "reg.io:/x".into(),
            format!("a:{}", "t".repeat(128)),
            format!("a:{}", "t".repeat(129)),
            format!("docker.io/{}", "a".repeat(250)),
            format!("a/{}", "b".repeat(254)),
            "a b".into(),
            "a@".into(),
            "".into(),
        ];
        for case in &cases {
            let ours = parse(case).map(|r| (r.registry().to_string(), r.repository().to_string(), r.whole()));
            let theirs = Reference::from_str(case)
                .map(|r| (r.registry().to_string(), r.repository().to_string(), r.whole()));
            match (&ours, &theirs) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{case}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{case}"),
                _ => panic!("{case}: ours {ours:?}, oci-client's {theirs:?}"),
            }
        }
    }
}

//! Registries (OCI distribution API), behind a small tokio runtime: the rest of vmrootfs stays
//! synchronous. Authorization (tokens and their renewal) is the `auth` module's; every request
//! goes through [`super::http`]'s client (timeouts, caps). Manifests and indexes are read
//! whole up to [`http::MAX_MANIFEST`]. Layer blobs stream through a bounded channel into the
//! converting thread; a cut connection or a stall (fewer than [`http::STALL_MIN_BYTES`] in a
//! stall timeout) resumes with a Range request from the last byte received, and connection
//! errors, 5xx and 429 are retried with backoff; what can never work (a bad scheme, a
//! redirect loop) is not. The bytes are checked against the layer digest by the converter,
//! so nothing unchecked is published. Referrers are asked through `oci-client`.

use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::Reference;
use oci_spec::image::{Digest, ImageIndex, ImageManifest};

use super::auth::{Authorizer, Credential, Hop};
use super::http::{self, HttpError};
use super::oci::select_platform;
use super::{ImageSource, LayerRef, ResolvedImage, SourceError};
use crate::digest;
use crate::erofs_image;
use crate::platform::Platform;

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const RETRIES: u32 = 5;

/// Why a blob download failed; it reaches the converter inside an `io::Error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error(
        "blob {digest} from registry {registry} stalled: fewer than {} bytes arrived in {}, {attempts} times",
        http::STALL_MIN_BYTES,
        humantime::format_duration(*.window)
    )]
    Stalled { digest: String, registry: String, window: Duration, attempts: u32 },
    #[error("fetching blob {digest} from registry {registry}")]
    Failed {
        digest: String,
        registry: String,
        #[source]
        source: Box<SourceError>,
    },
}

/// Whether `e` (from a layer's byte stream) is a failed download rather than bad bytes.
pub fn is_download_error(e: &io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(c) = cause {
        if c.is::<FetchError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// How to reach registries (`--creds`, `--insecure-registry`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RegistryOptions {
    /// `USER:PASS` for every registry (else docker's config.json, else anonymous).
    pub creds: Option<(String, String)>,
    /// Hosts (`host` or `host:port`) spoken to over plain HTTP besides localhost/127.0.0.0/8.
    pub insecure: Vec<String>,
}

pub struct RegistrySource {
    reference: Reference,
    authorizer: Arc<Authorizer>,
    rt: Arc<tokio::runtime::Runtime>,
    spec: String,
    /// Whether credentials were given (a 401 then means "denied", not "log in").
    with_credentials: bool,
}

/// Plain HTTP for localhost, 127.0.0.0/8 and hosts given with `--insecure-registry`, as docker.
pub(crate) fn insecure(registry: &str, extra: &[String]) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost"
        || Ipv4Addr::from_str(host).is_ok_and(|ip| ip.octets()[0] == 127)
        || extra.iter().any(|e| e == registry || e == host)
}

/// docker's `config.json`: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn docker_config() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// The helper config.json names for `server` (`credHelpers`, else `credsStore`), for errors.
fn helper_for(config: &[u8], server: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(config).ok()?;
    let name = v.get("credHelpers").and_then(|h| h.get(server)).or_else(|| v.get("credsStore"))?;
    Some(format!("docker-credential-{}", name.as_str()?))
}

/// What docker's credential helpers print when they hold nothing for a server (the
/// docker-credential-helpers protocol): no credentials, not a failure.
const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";

/// Credentials: `--creds`, else docker's config.json (`auths`, `credHelpers`, `credsStore`),
/// else anonymous. Without a config.json, or with no entry for the registry, access is
/// anonymous; a config that cannot be read or a helper that fails is an error (going
/// anonymous would hide why a pull is refused, or pull another image than the user's).
pub(crate) fn auth_for(registry: &str, opts: &RegistryOptions) -> Result<Credential, SourceError> {
    use docker_credential::CredentialRetrievalError as E;
    if let Some((u, p)) = &opts.creds {
        return Ok(Credential::Basic { user: u.clone(), password: p.clone() });
    }
    let Some(path) = docker_config() else {
        // Neither $DOCKER_CONFIG nor $HOME: there is no config.json to read.
        return Ok(Credential::Anonymous);
    };
    let config = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Credential::Anonymous),
        Err(source) => return Err(SourceError::Io { path, source }),
    };
    let server = if registry == "docker.io" { "https://index.docker.io/v1/" } else { registry };
    let registry = registry.to_string();
    match docker_credential::get_credential_from_reader(&config[..], server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(user, password)) => {
            Ok(Credential::Basic { user, password })
        }
        // A refresh token for the registry's token server, never for the registry itself.
        Ok(docker_credential::DockerCredential::IdentityToken(t)) => Ok(Credential::IdentityToken(t)),
        Err(E::NoCredentialConfigured) => Ok(Credential::Anonymous),
        Err(E::HelperFailure { stdout, .. }) if stdout.contains(HELPER_NOT_FOUND) => {
            Ok(Credential::Anonymous)
        }
        Err(E::HelperFailure { helper, stdout, stderr }) => {
            let said = if stderr.trim().is_empty() { stdout } else { stderr };
            Err(SourceError::CredentialHelper { registry, helper, detail: said.trim().to_string() })
        }
        Err(e @ (E::HelperCommunicationError | E::MalformedHelperResponse)) => {
            Err(SourceError::CredentialHelper {
                registry,
                helper: helper_for(&config, server).unwrap_or_else(|| "docker-credential-*".into()),
                detail: e.to_string(),
            })
        }
        Err(e) => Err(SourceError::Credentials { path, registry, detail: e.to_string() }),
    }
}

/// How long to wait before attempt `attempt + 1`.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

impl RegistrySource {
    /// This repository's manifest `digest`, as a reference: `host/repo@sha256:…`.
    pub(crate) fn pinned(&self, digest: &Digest) -> String {
        format!("{}/{}@{digest}", self.reference.registry(), self.reference.repository())
    }

    pub fn new(spec: &str, opts: &RegistryOptions) -> Result<Self, SourceError> {
        let text = spec.strip_prefix("docker://").unwrap_or(spec);
        let reference =
            super::reference::parse(text).map_err(|e| SourceError::BadReference(format!("{text}: {e}")))?;
        let registry = reference.resolve_registry().to_string();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|source| SourceError::Io { path: "tokio runtime".into(), source })?;
        let credential = auth_for(reference.registry(), opts)?;
        let with_credentials = !matches!(credential, Credential::Anonymous);
        let plain_http = insecure(&registry, &opts.insecure);
        let authorizer = Authorizer::new(&registry, reference.repository(), "pull", credential, plain_http);
        Ok(RegistrySource {
            spec: format!("docker://{}", reference.whole()),
            reference,
            authorizer: Arc::new(authorizer),
            rt: Arc::new(rt),
            with_credentials,
        })
    }

    /// A 401 for the user: log in, or (with credentials) not allowed.
    fn unauthorized(&self) -> SourceError {
        let registry = self.reference.registry().to_string();
        if self.with_credentials {
            SourceError::Denied { registry, repository: self.reference.repository().to_string() }
        } else {
            SourceError::Unauthorized { registry }
        }
    }

    /// A manifest or index by tag or digest, at most [`http::MAX_MANIFEST`] bytes; transient
    /// errors are retried, a 401 renews the credentials once.
    fn manifest(&self, reference: &Reference) -> Result<Vec<u8>, SourceError> {
        let name = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!("{}/v2/{}/manifests/{name}", self.authorizer.base_url(), reference.repository());
        self.rt.block_on(async {
            let accept = ACCEPT.join(", ");
            let response = self
                .authorizer
                .send(|c| c.get(&url).header(reqwest::header::ACCEPT, &accept), &url, RETRIES)
                .await?;
            match response.status().as_u16() {
                200..=299 => Ok(http::read_capped(response, http::MAX_MANIFEST, "manifest or index").await?),
                404 => Err(SourceError::NotFound(reference.whole())),
                401 | 403 => Err(self.unauthorized()),
                _ => Err(http::status_error(response).await.into()),
            }
        })
    }

    /// The referrers index of `subject`: the referrers API's answer, else (a registry without
    /// the API answers 404) the index under the fallback tag `sha256-<hex>`, else none.
    fn referrers(&self, subject: &Digest) -> Result<Option<Vec<u8>>, SourceError> {
        let url =
            format!("{}/v2/{}/referrers/{subject}", self.authorizer.base_url(), self.reference.repository());
        let answer = self.rt.block_on(async {
            let accept = "application/vnd.oci.image.index.v1+json";
            let response = self
                .authorizer
                .send(|c| c.get(&url).header(reqwest::header::ACCEPT, accept), &url, RETRIES)
                .await?;
            match response.status().as_u16() {
                200..=299 => {
                    Ok(Some(http::read_capped(response, http::MAX_MANIFEST, "referrers index").await?))
                }
                404 => Ok(None),
                401 | 403 => Err(self.unauthorized()),
                _ => Err(http::status_error(response).await.into()),
            }
        })?;
        if answer.is_some() {
            return Ok(answer);
        }
        let tag = subject.to_string().replacen(':', "-", 1);
        let fallback = Reference::with_tag(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            tag,
        );
        match self.manifest(&fallback) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(SourceError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A small blob (config), read whole and checked.
    fn small_blob(&self, d: &Digest) -> Result<Vec<u8>, SourceError> {
        let mut out = Vec::new();
        self.open_blob(d.to_string(), None)?
            .take(super::MAX_JSON + 1)
            .read_to_end(&mut out)
            .map_err(|source| SourceError::Read { what: format!("blob {d}"), source })?;
        if out.len() as u64 > super::MAX_JSON {
            return Err(SourceError::TooLarge { what: format!("blob {d}") });
        }
        digest::check("config", d, &digest::sha256_of(&out))?;
        Ok(out)
    }

    fn open_blob(&self, digest: String, size: Option<u64>) -> Result<BlobReader, SourceError> {
        Ok(self.open_range(digest, 0, size))
    }

    /// Bytes `start..end` of the blob `digest` (to its end without `end`), resumed and retried
    /// as whole blobs are: what a lazy blob's chunks and dm-verity tree are read through.
    /// Unchecked bytes: the reader verifies them.
    pub(crate) fn open_range(&self, digest: String, start: u64, end: Option<u64>) -> BlobReader {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let blob = Blob {
            url: format!("{}/v2/{}/blobs/{digest}", self.authorizer.base_url(), self.reference.repository()),
            registry: self.reference.registry().to_string(),
            digest,
            start,
            end,
        };
        self.rt.spawn(download(self.authorizer.clone(), blob, tx));
        BlobReader { rx, chunk: bytes::Bytes::new() }
    }
}

/// One blob (or a byte range of it) to download.
struct Blob {
    url: String,
    registry: String,
    digest: String,
    /// The first byte wanted.
    start: u64,
    /// The end of the bytes wanted (exclusive): the blob's size, or a range's end.
    end: Option<u64>,
}

impl Blob {
    fn failed(&self, e: impl Into<SourceError>) -> io::Error {
        io::Error::other(FetchError::Failed {
            digest: self.digest.clone(),
            registry: self.registry.clone(),
            source: Box::new(e.into()),
        })
    }
}

/// Why one connection's body stopped before its end.
enum Cut {
    Stalled,
    Failed(reqwest::Error),
}

/// Streams one blob into `tx`, resuming after cuts and stalls and retrying transient errors.
/// Each (re)connection takes the authorizer's current session, so a resumed download carries a
/// renewed token; a 401 renews it once more.
async fn download(
    authorizer: Arc<Authorizer>,
    blob: Blob,
    tx: tokio::sync::mpsc::Sender<io::Result<bytes::Bytes>>,
) {
    let stall = http::stall_timeout();
    let mut offset = blob.start;
    let mut failures = 0u32;
    loop {
        // A range (`bytes=START-END` at first): a resumption asks for what is missing. An
        // empty blob has no byte 0 to ask for.
        let range = match blob.end {
            Some(0) => None,
            Some(end) => Some(format!("bytes={offset}-{}", end - 1)),
            _ => Some(format!("bytes={offset}-")),
        };
        let response = match get_blob(&authorizer, &blob.url, range.as_deref()).await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(blob.failed(e))).await;
                return;
            }
        };
        let mut skip = match response.status().as_u16() {
            206 => 0,
            // The registry ignored the Range header: skip what we already have.
            200..=299 => offset,
            404 => {
                let _ =
                    tx.send(Err(blob.failed(SourceError::NotFound(format!("blob {}", blob.digest))))).await;
                return;
            }
            _ => {
                let e = http::status_error(response).await;
                let _ = tx.send(Err(blob.failed(e))).await;
                return;
            }
        };
        let mut stream = response.bytes_stream();
        let mut window_end = tokio::time::Instant::now() + stall;
        let mut window_bytes = 0u64;
        let cut = loop {
            match tokio::time::timeout_at(window_end, stream.next()).await {
                Err(_) if window_bytes >= http::STALL_MIN_BYTES => {
                    window_end = tokio::time::Instant::now() + stall;
                    window_bytes = 0;
                }
                Err(_) => break Some(Cut::Stalled),
                Ok(None) => break None,
                Ok(Some(Err(e))) if e.is_timeout() => break Some(Cut::Stalled),
                Ok(Some(Err(e))) => break Some(Cut::Failed(e)),
                Ok(Some(Ok(mut b))) => {
                    if skip > 0 {
                        let n = (skip as usize).min(b.len());
                        b = b.slice(n..);
                        skip -= n as u64;
                    }
                    // A registry that answers a range with more: only what was asked for.
                    if let Some(end) = blob.end {
                        b.truncate(end.saturating_sub(offset) as usize);
                    }
                    offset += b.len() as u64;
                    window_bytes += b.len() as u64;
                    if !b.is_empty() && tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                    if blob.end.is_some_and(|end| offset >= end) {
                        return;
                    }
                }
            }
        };
        let Some(cut) = cut else {
            // All bytes arrived (a failed digest check at the very end is reported by the
            // converter, which names both digests).
            return;
        };
        if blob.end.is_some_and(|end| offset >= end) {
            return;
        }
        if failures < RETRIES {
            let why = match &cut {
                Cut::Stalled => format!("stalled for {}", humantime::format_duration(stall)),
                Cut::Failed(e) => format!("connection cut: {e}"),
            };
            crate::progress::info(&format!("{} after {offset} bytes of {}; resuming", why, blob.digest));
            tokio::time::sleep(backoff(failures)).await;
            failures += 1;
            continue;
        }
        let error = match cut {
            Cut::Stalled => io::Error::other(FetchError::Stalled {
                digest: blob.digest.clone(),
                registry: blob.registry.clone(),
                window: stall,
                attempts: failures + 1,
            }),
            Cut::Failed(source) => blob.failed(HttpError::Read { url: blob.url.clone(), source }),
        };
        let _ = tx.send(Err(error)).await;
        return;
    }
}

/// GETs `url` (with `range`), following redirects here: the credentials go to the registry's
/// origin only, a target that is not http(s) or a loop fails at once, and an error names the
/// hop that failed.
async fn get_blob(
    authorizer: &Authorizer,
    url: &str,
    range: Option<&str>,
) -> Result<reqwest::Response, SourceError> {
    let registry = http::resolve(url, "/")?;
    let mut url = http::resolve(url, url)?;
    for _ in 0..=http::MAX_REDIRECTS {
        let hop = if http::origin(&url) == http::origin(&registry) { Hop::Registry } else { Hop::Elsewhere };
        let request = |c: &reqwest::Client| {
            let get = c.get(url.clone());
            match range {
                Some(r) => get.header(reqwest::header::RANGE, r),
                None => get,
            }
        };
        let response = authorizer.send_hop(request, url.as_str(), RETRIES, hop).await?;
        let location = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
        let (true, Some(location)) = (response.status().is_redirection(), location) else {
            return Ok(response);
        };
        let next = http::resolve(url.as_str(), location)?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(HttpError::BadRedirect { from: url.to_string(), to: next.to_string() }.into());
        }
        url = next;
    }
    Err(HttpError::TooManyRedirects { url: url.to_string() }.into())
}

/// The converting thread's end of a blob download.
pub(crate) struct BlobReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

fn media_type_of(bytes: &[u8]) -> (Option<String>, Option<i64>, bool) {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    (
        v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string),
        v.get("schemaVersion").and_then(|s| s.as_i64()),
        v.get("manifests").is_some(),
    )
}

impl ImageSource for RegistrySource {
    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, SourceError> {
        let mut bytes = self.manifest(&self.reference)?;
        // A pinned reference names the bytes it fetched, an index or a manifest; what an index
        // leads to is checked against the index's descriptor below.
        if let Some(want) = self.reference.digest() {
            let want: Digest = want.parse().map_err(|_| SourceError::BadDigest(want.to_string()))?;
            digest::check("pinned manifest or index", &want, &digest::sha256_of(&bytes))?;
        }
        let mut via_index = false;
        for _ in 0..=super::MAX_INDEX_DEPTH {
            let (media_type, schema, is_index) = media_type_of(&bytes);
            if schema == Some(1) {
                return Err(SourceError::UnsupportedManifest(
                    "application/vnd.docker.distribution.manifest.v1+json (schema 1)".into(),
                ));
            }
            let found = digest::sha256_of(&bytes);
            if is_index {
                let index: ImageIndex = serde_json::from_slice(&bytes)
                    .map_err(|source| SourceError::Json { what: "image index".into(), source })?;
                let desc = select_platform(&index, platform)?;
                let by_digest = self.reference.clone_with_digest(desc.digest().to_string());
                bytes = self.manifest(&by_digest)?;
                digest::check("manifest", desc.digest(), &digest::sha256_of(&bytes))?;
                via_index = true;
                continue;
            }
            if let Some(mt) = media_type.filter(|mt| !super::oci::is_manifest_type(mt)) {
                return Err(SourceError::UnsupportedManifest(mt));
            }
            let manifest: ImageManifest = serde_json::from_slice(&bytes)
                .map_err(|source| SourceError::Json { what: "manifest".into(), source })?;
            let config_bytes = self.small_blob(manifest.config().digest())?;
            let super::ConfigJson(config) = serde_json::from_slice(&config_bytes)
                .map_err(|source| SourceError::Json { what: "config".into(), source })?;
            if !via_index {
                super::check_config_platform(&config, platform, &self.spec)?;
            }
            return ResolvedImage::from_manifest(found, bytes, &manifest, (config, config_bytes), |d| {
                d.to_string()
            });
        }
        Err(SourceError::IndexTooDeep { reference: self.reference.whole() })
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        Ok(Box::new(self.open_blob(layer.location.clone(), layer.size)?))
    }

    /// Any blob of the repository, by digest (a missing one fails when it is read).
    fn locate_by_digest(&self, layer: LayerRef) -> Option<LayerRef> {
        Some(LayerRef { location: layer.digest.to_string(), ..layer })
    }

    /// The referrers of `manifest` (the referrers API, else the `sha256-<hex>` fallback tag):
    /// the first image manifest vmrootfs pushed from it with `recipe`.
    fn converted(&self, manifest: &Digest, recipe: u32) -> Result<Option<String>, SourceError> {
        let Some(bytes) = self.referrers(manifest)? else {
            return Ok(None);
        };
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|source| SourceError::Json { what: format!("referrers of {manifest}"), source })?;
        let recipe = recipe.to_string();
        let found = index.manifests().iter().find(|m| {
            let a = m.annotations().as_ref();
            let says = |k: &str, v: &str| a.and_then(|a| a.get(k)).is_some_and(|x| x == v);
            m.media_type().to_string() == "application/vnd.oci.image.manifest.v1+json"
                && says(erofs_image::SOURCE_MANIFEST, manifest.as_ref())
                && says(erofs_image::RECIPE, &recipe)
        });
        Ok(found.map(|m| {
            format!("docker://{}/{}@{}", self.reference.registry(), self.reference.repository(), m.digest())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_local_and_named_hosts() {
        let extra = vec!["reg.lan:5000".to_string(), "other.lan".to_string()];
        for (registry, want) in [
            ("localhost:5000", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("128.0.0.1:5000", false),
            ("ghcr.io", false),
            ("reg.lan:5000", true),
            ("other.lan:443", true),
            ("reg.lan:6000", false),
        ] {
            assert_eq!(insecure(registry, &extra), want, "{registry}");
        }
    }

    #[test]
    fn references_parse_as_docker_does() {
        for (input, registry, repo, tag) in [
            ("alpine", "docker.io", "library/alpine", Some("latest")),
            ("alpine:3.20", "docker.io", "library/alpine", Some("3.20")),
            ("127.0.0.1:5000/lab/img:tag", "127.0.0.1:5000", "lab/img", Some("tag")),
            ("ghcr.io/org/app:v1", "ghcr.io", "org/app", Some("v1")),
        ] {
            let r = crate::source::reference::parse(input).unwrap();
            assert_eq!((r.registry(), r.repository(), r.tag()), (registry, repo, tag), "{input}");
        }
    }
}

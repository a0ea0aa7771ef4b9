//! Registries (OCI distribution API) through `oci-client`, behind a small tokio runtime: the
//! rest of vmrootfs stays synchronous. Authorization (tokens and their renewal) is
//! [`super::auth`]'s. Layer blobs stream through a bounded channel into the
//! converting thread; a cut connection resumes with a Range request from the last byte
//! received, and connection errors, 5xx and 429 are retried with backoff. The bytes are
//! checked against the layer digest by the converter, so nothing unchecked is published.

use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::Reference;
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use oci_spec::image::{Digest, ImageConfiguration, ImageIndex, ImageManifest};

use super::auth::{Authorizer, Credential, Session};
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

/// How to reach registries (`--creds`, `--insecure-registry`).
#[derive(Debug, Clone, Default)]
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

fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        _ => false,
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200 << attempt.min(5))
}

impl RegistrySource {
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

    fn registry_error(&self, e: OciDistributionError, what: &str) -> SourceError {
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => self.unauthorized(),
            OciDistributionError::ServerError { code: 404, .. } => SourceError::NotFound(what.to_string()),
            OciDistributionError::RegistryError { envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|e| format!("{:?}", e.code).to_uppercase().contains("UNKNOWN")) =>
            {
                SourceError::NotFound(what.to_string())
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    format!("{:?}", e.code).to_uppercase().contains("UNAUTHORIZED")
                        || format!("{:?}", e.code).to_uppercase().contains("DENIED")
                }) =>
            {
                self.unauthorized()
            }
            e => SourceError::Registry { what: what.to_string(), detail: e.to_string() },
        }
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

    /// A manifest or index by tag or digest, retried on transient errors; a 401 renews the
    /// token once.
    fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, String), SourceError> {
        let mut attempt = 0;
        let mut session = self.rt.block_on(self.authorizer.session())?;
        let mut renewed = false;
        loop {
            let result = self.rt.block_on(session.client.pull_manifest_raw(reference, &session.auth, ACCEPT));
            match result {
                Ok((bytes, digest)) => return Ok((bytes.to_vec(), digest)),
                Err(OciDistributionError::UnauthorizedError { .. }) if session.renewable() && !renewed => {
                    session = self.rt.block_on(self.authorizer.renew(&session))?;
                    renewed = true;
                }
                Err(e) if retryable(&e) && attempt < RETRIES => {
                    std::thread::sleep(backoff(attempt));
                    attempt += 1;
                }
                Err(e) => return Err(self.registry_error(e, &reference.whole())),
            }
        }
    }

    /// A small blob (config), read whole and checked.
    fn small_blob(&self, d: &Digest) -> Result<Vec<u8>, SourceError> {
        let mut out = Vec::new();
        self.open_blob(d.to_string(), None)?
            .take(super::MAX_JSON + 1)
            .read_to_end(&mut out)
            .map_err(|e| SourceError::Registry { what: format!("blob {d}"), detail: e.to_string() })?;
        if out.len() as u64 > super::MAX_JSON {
            return Err(SourceError::TooLarge { what: format!("blob {d}") });
        }
        digest::check("config", d, &digest::sha256_of(&out))?;
        Ok(out)
    }

    fn open_blob(&self, digest: String, size: Option<u64>) -> Result<BlobReader, SourceError> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let authorizer = self.authorizer.clone();
        let reference = self.reference.clone();
        self.rt.spawn(download(authorizer, reference, digest, size, tx));
        Ok(BlobReader { rx, chunk: bytes::Bytes::new() })
    }
}

/// Streams one blob into `tx`, resuming after cuts and retrying transient errors. Each
/// (re)connection takes the authorizer's current session, so a resumed download carries a
/// renewed token; a 401 renews it once more.
async fn download(
    authorizer: Arc<Authorizer>,
    reference: Reference,
    digest: String,
    size: Option<u64>,
    tx: tokio::sync::mpsc::Sender<io::Result<bytes::Bytes>>,
) {
    let mut offset = 0u64;
    let mut failures = 0u32;
    let fail = |msg: String| io::Error::other(msg);
    let mut refused: Option<Session> = None;
    loop {
        let session = match &refused {
            Some(stale) => authorizer.renew(stale).await,
            None => authorizer.session().await,
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(fail(format!("fetching blob {digest}: {e}")))).await;
                return;
            }
        };
        let client = &session.client;
        // A range (`bytes=0-` at first): oci-client then leaves the stream unhashed (every
        // reader of it checks the digest itself), where a plain GET hashed every blob a second
        // time, on the runtime's threads. An empty blob has no byte 0 to ask for.
        let response = if size == Some(0) {
            client.pull_blob_stream(&reference, digest.as_str()).await.map(|s| (s.stream, 0))
        } else {
            match client.pull_blob_stream_partial(&reference, digest.as_str(), offset, None).await {
                Ok(BlobResponse::Partial(s)) => Ok((s.stream, 0)),
                // The registry ignored the Range header: skip what we already have.
                Ok(BlobResponse::Full(s)) => Ok((s.stream, offset)),
                Err(e) => Err(e),
            }
        };
        let (mut stream, mut skip) = match response {
            Ok(r) => r,
            Err(OciDistributionError::UnauthorizedError { .. })
                if session.renewable() && refused.is_none() =>
            {
                refused = Some(session.clone());
                continue;
            }
            Err(e) if retryable(&e) && failures < RETRIES => {
                crate::progress::info(&format!("retrying blob {digest}: {e}"));
                tokio::time::sleep(backoff(failures)).await;
                failures += 1;
                continue;
            }
            Err(e) => {
                let _ = tx.send(Err(fail(format!("fetching blob {digest}: {e}")))).await;
                return;
            }
        };
        refused = None;
        let mut cut = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(mut b) => {
                    if skip > 0 {
                        let n = (skip as usize).min(b.len());
                        b = b.slice(n..);
                        skip -= n as u64;
                    }
                    offset += b.len() as u64;
                    if !b.is_empty() && tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            }
        }
        match cut {
            // All bytes arrived (a failed digest check at the very end is reported by the
            // converter, which names both digests).
            None => return,
            Some(_) if size.is_some_and(|s| offset >= s) => return,
            Some(e) if failures < RETRIES => {
                crate::progress::info(&format!(
                    "connection cut after {offset} bytes of {digest} ({e}); resuming"
                ));
                tokio::time::sleep(backoff(failures)).await;
                failures += 1;
            }
            Some(e) => {
                let _ = tx.send(Err(fail(format!("fetching blob {digest}: {e}")))).await;
                return;
            }
        }
    }
}

/// The converting thread's end of a blob download.
struct BlobReader {
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
        let (mut bytes, _) = self.manifest(&self.reference)?;
        // A pinned reference names the bytes it fetched, an index or a manifest; what an index
        // leads to is checked against the index's descriptor below.
        if let Some(want) = self.reference.digest() {
            let want: Digest = want.parse().map_err(|_| SourceError::BadDigest(want.to_string()))?;
            digest::check("pinned manifest or index", &want, &digest::sha256_of(&bytes))?;
        }
        let mut via_index = false;
        for _ in 0..3 {
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
                (bytes, _) = self.manifest(&by_digest)?;
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
            let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
                .map_err(|source| SourceError::Json { what: "config".into(), source })?;
            if !via_index {
                super::check_config_platform(&config, platform, &self.spec)?;
            }
            return ResolvedImage::from_manifest(found, bytes, &manifest, (config, config_bytes), |d| {
                d.to_string()
            });
        }
        Err(SourceError::UnsupportedManifest("index nested too deeply".into()))
    }

    fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send + '_>, SourceError> {
        Ok(Box::new(self.open_blob(layer.location.clone(), layer.size)?))
    }

    /// The referrers of `manifest` (the referrers API, else the `sha256-<hex>` fallback tag):
    /// the first image manifest vmrootfs pushed from it with `recipe`.
    fn converted(&self, manifest: &Digest, recipe: u32) -> Result<Option<String>, SourceError> {
        let subject = self.reference.clone_with_digest(manifest.to_string());
        let session = self.rt.block_on(self.authorizer.session())?;
        let index = self
            .rt
            .block_on(session.client.pull_referrers(&subject, None))
            .map_err(|e| self.registry_error(e, &format!("referrers of {manifest}")))?;
        let recipe = recipe.to_string();
        let found = index.manifests.iter().find(|m| {
            let a = m.annotations.as_ref();
            let says = |k: &str, v: &str| a.and_then(|a| a.get(k)).is_some_and(|x| x == v);
            m.media_type == "application/vnd.oci.image.manifest.v1+json"
                && says(erofs_image::SOURCE_MANIFEST, manifest.as_ref())
                && says(erofs_image::RECIPE, &recipe)
        });
        Ok(found.map(|m| {
            format!("docker://{}/{}@{}", self.reference.registry(), self.reference.repository(), m.digest)
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

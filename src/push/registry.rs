//! Pushing to a registry (OCI distribution API): blobs the repository lacks are uploaded in
//! one streamed `PUT` each (`POST` an upload, `PUT ?digest=`), then the manifest by tag. The
//! credentials and tokens are [`crate::source::auth`]'s, for `pull,push`.
//!
//! When the manifest has a `subject` and the registry does not say it indexed it (no
//! `OCI-Subject` header), the distribution spec's fallback is kept: the tag `sha256-<hex of
//! the subject>` names an index listing the subject's referrers, and the pushed manifest is
//! added to it.

use futures_util::StreamExt;

use reqwest::StatusCode;

use super::{Composed, PushError, PushedLayer};
use crate::digest;
use crate::source::RegistryOptions;
use crate::source::auth::{Authorizer, Session};
use crate::source::registry::{auth_for, insecure};

const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

struct Target {
    authorizer: Authorizer,
    repository: String,
    destination: String,
}

impl Target {
    fn err(&self, detail: impl std::fmt::Display) -> PushError {
        PushError::Registry { destination: self.destination.clone(), detail: detail.to_string() }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{}/{path}", self.authorizer.base_url(), self.repository)
    }

    /// Sends the request `build` makes with the current credentials; a 401 renews a token once.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PushError> {
        let mut session: Session = self.authorizer.session().await?;
        let mut renewed = false;
        loop {
            let response =
                session.authorize(build(self.authorizer.http())).send().await.map_err(|e| self.err(e))?;
            if response.status() == StatusCode::UNAUTHORIZED && session.renewable() && !renewed {
                session = self.authorizer.renew(&session).await?;
                renewed = true;
                continue;
            }
            if response.status() == StatusCode::UNAUTHORIZED {
                return Err(self.err("the registry refused the credentials for pushing (HTTP 401)"));
            }
            return Ok(response);
        }
    }

    /// A failed answer, with what the registry said.
    async fn refused(&self, what: &str, response: reqwest::Response) -> PushError {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        self.err(format!("{what}: HTTP {status}: {}", body.trim().chars().take(300).collect::<String>()))
    }

    async fn has_blob(&self, d: &str) -> Result<bool, PushError> {
        let url = self.url(&format!("blobs/{d}"));
        let r = self.send(|c| c.head(&url)).await?;
        Ok(r.status().is_success())
    }

    /// Uploads a blob from `body` (one monolithic `PUT`).
    async fn upload(&self, d: &str, size: u64, body: impl Fn() -> reqwest::Body) -> Result<(), PushError> {
        let start = self.url("blobs/uploads/");
        let r = self.send(|c| c.post(&start).header(reqwest::header::CONTENT_LENGTH, 0)).await?;
        if r.status() != StatusCode::ACCEPTED {
            return Err(self.refused(&format!("starting the upload of {d}"), r).await);
        }
        let location = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.err(format!("the upload of {d} got no Location")))?
            .to_string();
        let mut url = if location.starts_with('/') {
            format!("{}{location}", self.authorizer.base_url())
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={d}"));
        let r = self
            .send(|c| {
                c.put(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, size)
                    .body(body())
            })
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(self.refused(&format!("uploading {d}"), r).await);
        }
        Ok(())
    }

    /// PUTs a manifest or index under `reference` (tag or digest); whether the registry said it
    /// indexed the subject (`OCI-Subject`).
    async fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<bool, PushError> {
        let url = self.url(&format!("manifests/{reference}"));
        let r = self
            .send(|c| c.put(&url).header(reqwest::header::CONTENT_TYPE, media_type).body(bytes.to_vec()))
            .await?;
        if r.status() != StatusCode::CREATED {
            return Err(self.refused(&format!("putting the manifest {reference}"), r).await);
        }
        Ok(r.headers().contains_key("oci-subject"))
    }

    /// Adds `entry` to the referrers index under the fallback tag of `subject`.
    async fn add_fallback_referrer(&self, subject: &str, entry: serde_json::Value) -> Result<(), PushError> {
        let tag = subject.replacen(':', "-", 1);
        let url = self.url(&format!("manifests/{tag}"));
        let r = self.send(|c| c.get(&url).header(reqwest::header::ACCEPT, INDEX_TYPE)).await?;
        let mut index = match r.status() {
            StatusCode::OK => {
                let body = r.bytes().await.map_err(|e| self.err(e))?;
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .filter(|v| v.get("manifests").is_some_and(|m| m.is_array()))
                    .ok_or_else(|| self.err(format!("the referrers tag {tag} names no image index")))?
            }
            StatusCode::NOT_FOUND => {
                serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []})
            }
            _ => return Err(self.refused(&format!("reading the referrers tag {tag}"), r).await),
        };
        let list = index["manifests"].as_array_mut().expect("checked above");
        if list.iter().any(|m| m["digest"] == entry["digest"]) {
            return Ok(());
        }
        list.push(entry);
        let bytes = serde_json::to_vec(&index).expect("an index serializes");
        self.put_manifest(&tag, INDEX_TYPE, &bytes).await?;
        Ok(())
    }
}

/// Pushes `composed` to the registry reference `reference`.
pub fn push(
    reference: &str,
    composed: &Composed,
    opts: &RegistryOptions,
) -> Result<Vec<PushedLayer>, PushError> {
    let parsed = crate::source::reference::parse(reference)
        .map_err(|e| PushError::BadDestination(format!("{reference}: {e}")))?;
    let registry = parsed.resolve_registry().to_string();
    let credential = auth_for(parsed.registry(), opts)?;
    let authorizer = Authorizer::new(
        &registry,
        parsed.repository(),
        "pull,push",
        credential,
        insecure(&registry, &opts.insecure),
    );
    let target = Target {
        authorizer,
        repository: parsed.repository().to_string(),
        destination: reference.to_string(),
    };
    let name = parsed.digest().or(parsed.tag()).unwrap_or("latest").to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PushError::Io { path: "tokio runtime".into(), source: e })?;
    rt.block_on(async {
        // All layers at once, as docker and skopeo do: the registry, not one stream, is the limit.
        let total = composed.layers.len();
        let uploads = composed.layers.iter().enumerate().map(|(i, blob)| {
            let target = &target;
            async move {
                let d = blob.digest.to_string();
                let existed = target.has_blob(&d).await?;
                if existed {
                    crate::progress::info(&format!("layer {}/{total} {d}: already in the registry", i + 1));
                } else {
                    crate::progress::info(&format!(
                        "layer {}/{total} {d}: pushing {:.1} MB",
                        i + 1,
                        blob.size as f64 / 1e6
                    ));
                    // Each attempt reads the parts afresh from their start, in 1 MiB chunks.
                    let body = || {
                        let files: Result<Vec<_>, _> = blob.parts.iter().map(std::fs::File::open).collect();
                        match files {
                            Ok(files) => {
                                reqwest::Body::wrap_stream(futures_util::stream::iter(files).flat_map(|f| {
                                    tokio_util::io::ReaderStream::with_capacity(
                                        tokio::fs::File::from_std(f),
                                        1 << 20,
                                    )
                                }))
                            }
                            // Gone meanwhile (the store lock forbids it): the registry sees a
                            // short body and refuses the digest.
                            Err(_) => reqwest::Body::from(Vec::new()),
                        }
                    };
                    target.upload(&d, blob.size, body).await?;
                }
                Ok::<_, PushError>(PushedLayer {
                    media_type: blob.media_type.clone(),
                    digest: d,
                    size: blob.size,
                    existed,
                })
            }
        });
        let pushed = futures_util::future::try_join_all(uploads).await?;
        let config_digest = digest::sha256_of(&composed.config).to_string();
        if !target.has_blob(&config_digest).await? {
            let bytes = composed.config.clone();
            target.upload(&config_digest, bytes.len() as u64, || reqwest::Body::from(bytes.clone())).await?;
        }
        let indexed = target.put_manifest(&name, super::MANIFEST_TYPE, &composed.manifest).await?;
        if let (Some(subject), false) = (&composed.subject, indexed) {
            let manifest: serde_json::Value =
                serde_json::from_slice(&composed.manifest).expect("our manifest");
            let entry = serde_json::json!({
                "mediaType": super::MANIFEST_TYPE,
                "digest": digest::sha256_of(&composed.manifest).to_string(),
                "size": composed.manifest.len(),
                "artifactType": super::CONFIG_TYPE,
                "annotations": manifest["annotations"],
            });
            target.add_fallback_referrer(subject["digest"].as_str().unwrap_or_default(), entry).await?;
        }
        Ok(pushed)
    })
}

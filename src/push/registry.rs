//! Pushing to a registry (OCI distribution API): blobs the repository lacks are uploaded in
//! one streamed `PUT` each (`POST` an upload, `PUT ?digest=`), then the manifest by tag. The
//! credentials and tokens are [`crate::source::auth`]'s, for `pull,push`.
//!
//! When the manifest has a `subject` and the registry does not say it indexed it (no
//! `OCI-Subject` header), the distribution spec's fallback is kept: the tag `sha256-<hex of
//! the subject>` names an index listing the subject's referrers, and the pushed manifest is
//! added to it.
//!
//! Credentials go only to the registry that asked for them: an upload `Location` on another
//! origin (scheme, host, port), a storage service say, gets the bytes without them, as docker
//! authorizes only the hosts it has pinged.

use futures_util::StreamExt;

use reqwest::StatusCode;

use super::{Composed, PushError, PushedLayer};
use crate::digest;
use crate::source::RegistryOptions;
use crate::source::auth::Authorizer;
use crate::source::http::{self, HttpError};
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

    fn http_err(&self, what: impl Into<String>, source: HttpError) -> PushError {
        PushError::Http { destination: self.destination.clone(), what: what.into(), source }
    }

    /// Sends the request `build` makes to `url`: with the current credentials when `url` is
    /// on the registry's own origin (a 401 renews them once), without any elsewhere.
    async fn send(
        &self,
        url: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PushError> {
        let ours = http::resolve(self.authorizer.base_url(), url)
            .map(|u| http::origin(&u))
            .map_err(|e| self.http_err(format!("sending to {url}"), e))?;
        let registry = http::resolve(self.authorizer.base_url(), "/").map(|u| http::origin(&u));
        let response = if registry.is_ok_and(|r| r == ours) {
            self.authorizer.send(build, url, 0).await?
        } else {
            build(self.authorizer.http()).send().await.map_err(|source| {
                self.http_err(format!("sending to {url}"), HttpError::Send { url: url.into(), source })
            })?
        };
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.err("the registry refused the credentials for pushing (HTTP 401)"));
        }
        Ok(response)
    }

    /// A failed answer, with (the start of) what the registry said.
    async fn refused(&self, what: &str, response: reqwest::Response) -> PushError {
        self.http_err(what, http::status_error(response).await)
    }

    async fn has_blob(&self, d: &str) -> Result<bool, PushError> {
        let url = self.url(&format!("blobs/{d}"));
        let r = self.send(&url, |c| c.head(&url)).await?;
        Ok(r.status().is_success())
    }

    /// Asks the registry to mount blob `d` from its repository `from` (no bytes move): whether
    /// it did (201). An upload it starts instead (202: it lacks the blob there, or the
    /// credentials do not reach `from`) is cancelled, and the caller sends the bytes.
    async fn mount(&self, d: &str, from: &str) -> Result<bool, PushError> {
        let mut url = reqwest::Url::parse(&self.url("blobs/uploads/"))
            .map_err(|e| self.err(format!("the upload URL of {d}: {e}")))?;
        url.query_pairs_mut().append_pair("mount", d).append_pair("from", from);
        let url = url.to_string();
        let r = self.send(&url, |c| c.post(&url).header(reqwest::header::CONTENT_LENGTH, 0)).await?;
        match r.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                let location = r.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
                if let Some(Ok(cancel)) = location.map(|l| http::resolve(&url, l)) {
                    let cancel = cancel.to_string();
                    // Best effort: an upload left open expires on the registry by itself
                    // (distribution purges them), so a failed cancel changes nothing pushed.
                    let _ = self.send(&cancel, |c| c.delete(&cancel)).await;
                }
                Ok(false)
            }
            _ => Err(self.refused(&format!("mounting {d} from {from}"), r).await),
        }
    }

    /// Uploads a blob from `body` (one monolithic `PUT`).
    async fn upload(&self, d: &str, size: u64, body: impl Fn() -> reqwest::Body) -> Result<(), PushError> {
        let start = self.url("blobs/uploads/");
        let r = self.send(&start, |c| c.post(&start).header(reqwest::header::CONTENT_LENGTH, 0)).await?;
        if r.status() != StatusCode::ACCEPTED {
            return Err(self.refused(&format!("starting the upload of {d}"), r).await);
        }
        let location = r
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| self.err(format!("the upload of {d} got no Location")))?;
        // Relative to the request it answers (RFC 9110), as distribution's own `uploads/…`.
        let mut url = http::resolve(&start, location)
            .map_err(|e| self.http_err(format!("starting the upload of {d}"), e))?;
        url.query_pairs_mut().append_pair("digest", d);
        let url = url.to_string();
        let r = self
            .send(&url, |c| {
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
            .send(&url, |c| {
                c.put(&url).header(reqwest::header::CONTENT_TYPE, media_type).body(bytes.to_vec())
            })
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
        let r = self.send(&url, |c| c.get(&url).header(reqwest::header::ACCEPT, INDEX_TYPE)).await?;
        let mut index = match r.status() {
            StatusCode::OK => {
                let body = http::read_capped(r, http::MAX_MANIFEST, "referrers index")
                    .await
                    .map_err(|e| self.http_err(format!("reading the referrers tag {tag}"), e))?;
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
    composed: &mut Composed,
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
    // Which layers the repository has, or gets by a mount from the source's repository (no
    // bytes sent); the others are fetched from the source if they come from it, then sent.
    let total = composed.layers.len();
    let present = rt.block_on(futures_util::future::try_join_all(composed.layers.iter().enumerate().map(
        |(i, blob)| {
            let target = &target;
            async move {
                let d = blob.digest.to_string();
                if target.has_blob(&d).await? {
                    crate::progress::info(&format!("layer {}/{total} {d}: already in the registry", i + 1));
                    return Ok::<_, PushError>((true, false));
                }
                let Some(from) = blob.from_source.as_ref().and_then(|s| s.mount_from.as_deref()) else {
                    return Ok((false, false));
                };
                let mounted = target.mount(&d, from).await?;
                if mounted {
                    crate::progress::info(&format!("layer {}/{total} {d}: mounted from {from}", i + 1));
                }
                Ok((false, mounted))
            }
        },
    )))?;
    composed.fetch(|i| present[i] == (false, false))?;
    let composed = &*composed;
    rt.block_on(async {
        // All layers at once, as docker and skopeo do: the registry, not one stream, is the limit.
        let uploads =
            composed.layers.iter().zip(&present).enumerate().map(|(i, (blob, &(existed, mounted)))| {
                let target = &target;
                async move {
                    let d = blob.digest.to_string();
                    if !existed && !mounted {
                        crate::progress::info(&format!(
                            "layer {}/{total} {d}: pushing {:.1} MB",
                            i + 1,
                            blob.size as f64 / 1e6
                        ));
                        // Each attempt reads the parts afresh from their start, in 1 MiB chunks.
                        let body = || {
                            let files: Result<Vec<_>, _> =
                                blob.parts.iter().map(std::fs::File::open).collect();
                            match files {
                                Ok(files) => reqwest::Body::wrap_stream(
                                    futures_util::stream::iter(files).flat_map(|f| {
                                        tokio_util::io::ReaderStream::with_capacity(
                                            tokio::fs::File::from_std(f),
                                            1 << 20,
                                        )
                                    }),
                                ),
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
                        mounted,
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

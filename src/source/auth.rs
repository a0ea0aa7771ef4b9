//! Registry authorization, done here rather than inside oci-client, so that:
//!
//! - the token flow of the distribution spec (a `Bearer` challenge from `GET /v2/` names a
//!   token server; it is asked for a pull-scoped token) reports a token server's refusal in
//!   its own words ("incorrect username or password");
//! - an identity token (what `docker login` stores for registries such as Azure's) goes only
//!   to the token server, exchanged through the OAuth2 `refresh_token` grant — never to the
//!   registry;
//! - a token is renewed when its `expires_in` runs out and when the registry answers 401, so
//!   a download that resumes after a long stall carries a valid token.
//!
//! A `Basic` challenge gets the credentials directly; no challenge means open access, and no
//! credentials are sent (a registry that later answers 401 with a challenge of its own gets
//! what that challenge asks for). A token server is asked over HTTPS, or over plain HTTP only
//! for a registry that is itself spoken to over plain HTTP: credentials never travel in
//! cleartext for an HTTPS registry. The credentials of the moment are a [`Session`], which
//! every request ([`Authorizer::send`]) carries.

use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;

use super::SourceError;
use super::http::{self, HttpError};

/// What the user gave to authenticate with.
#[derive(Clone)]
pub enum Credential {
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
    /// A refresh token for the token server (`identitytoken` in docker's config.json).
    IdentityToken(String),
}

/// How the registry's `GET /v2/` asks clients to authenticate.
#[derive(Debug, Clone, PartialEq)]
enum Challenge {
    Open,
    Basic,
    Bearer { realm: String, service: Option<String> },
}

/// A token's default lifetime when the token server gives none (distribution's token spec).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
const TOKEN_ATTEMPTS: u32 = 3;

/// Credentials ready for requests, and until when they hold.
#[derive(Clone)]
pub struct Session {
    pub auth: RegistryAuth,
    /// Only bearer tokens can be renewed; a 401 with anything else is final.
    renewable: bool,
    expires: Option<Instant>,
    generation: u64,
}

impl Session {
    /// Whether asking again could turn a 401 into access (a token that may have expired).
    pub fn renewable(&self) -> bool {
        self.renewable
    }

    /// `request` with this session's credentials.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            RegistryAuth::Bearer(token) => request.bearer_auth(token),
            RegistryAuth::Basic(user, password) => request.basic_auth(user, Some(password)),
            RegistryAuth::Anonymous => request,
        }
    }
}

/// How [`Authorizer::send_hop`] sends a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hop {
    /// To the registry, redirects followed by the HTTP client (which drops the credentials
    /// when one leaves the registry's origin).
    Follow,
    /// To the registry's origin, a redirect returned as it is.
    Registry,
    /// To another origin (a redirect's target), without credentials, redirects returned.
    Elsewhere,
}

/// Hands out sessions for one repository of one registry, renewing tokens as they run out.
pub struct Authorizer {
    http: reqwest::Client,
    /// For requests whose redirects the caller follows itself (see [`Hop`]).
    http_one_hop: reqwest::Client,
    registry: String,
    base_url: String,
    scope: String,
    credential: Credential,
    plain_http: bool,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    challenge: Option<Challenge>,
    session: Option<Session>,
    generations: u64,
}

impl Authorizer {
    /// For `actions` (`pull`, or `pull,push`) on `repository` of `registry`.
    pub fn new(
        registry: &str,
        repository: &str,
        actions: &str,
        credential: Credential,
        plain_http: bool,
    ) -> Self {
        let scheme = if plain_http { "http" } else { "https" };
        Authorizer {
            http: http::client(true),
            http_one_hop: http::client(false),
            registry: registry.to_string(),
            base_url: format!("{scheme}://{registry}"),
            scope: format!("repository:{repository}:{actions}"),
            credential,
            plain_http,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The current session, renewed first if its token has expired.
    pub async fn session(&self) -> Result<Session, SourceError> {
        let mut state = self.state.lock().await;
        if let Some(s) = &state.session
            && s.expires.is_none_or(|e| Instant::now() < e)
        {
            return Ok(s.clone());
        }
        self.start_session(&mut state).await
    }

    /// A new session after the registry refused `stale` (a token that expired early, say); if
    /// another request renewed it meanwhile, that session. `challenge` is the refusal's
    /// `WWW-Authenticate`: the registry's own word on what it wants now.
    pub async fn renew(&self, stale: &Session, challenge: Option<&str>) -> Result<Session, SourceError> {
        let mut state = self.state.lock().await;
        if let Some(s) = &state.session
            && s.generation != stale.generation
        {
            return Ok(s.clone());
        }
        if let Some(c) = challenge.and_then(parse_challenge) {
            state.challenge = Some(c);
        }
        self.start_session(&mut state).await
    }

    async fn start_session(&self, state: &mut State) -> Result<Session, SourceError> {
        let challenge = match &state.challenge {
            Some(c) => c.clone(),
            None => {
                let c = self.challenge().await?;
                state.challenge = Some(c.clone());
                c
            }
        };
        let (auth, expires) = match (&challenge, &self.credential) {
            (Challenge::Bearer { realm, service }, _) => {
                self.check_realm(realm)?;
                let (token, lifetime) = self.token(realm, service.as_deref()).await?;
                // Renew a little early: the token must still hold when the request arrives.
                (RegistryAuth::Bearer(token), Some(Instant::now() + lifetime.mul_f64(0.9)))
            }
            (Challenge::Basic, Credential::Basic { user, password }) => {
                (RegistryAuth::Basic(user.clone(), password.clone()), None)
            }
            (Challenge::Basic, Credential::IdentityToken(_)) => {
                // An identity token is for a token server only; this registry has none.
                return Err(SourceError::IdentityTokenWithoutTokenServer { registry: self.registry.clone() });
            }
            // Open access: the registry asked for nothing, so it gets nothing.
            (Challenge::Open, _) | (Challenge::Basic, Credential::Anonymous) => {
                (RegistryAuth::Anonymous, None)
            }
        };
        state.generations += 1;
        let session = Session {
            auth,
            // A token may have run out; an open registry may challenge on a later request.
            renewable: matches!(challenge, Challenge::Bearer { .. } | Challenge::Open),
            expires,
            generation: state.generations,
        };
        state.session = Some(session.clone());
        Ok(session)
    }

    /// Sends the request `build` makes with the current credentials: a 401 renews them once
    /// (with the challenge it carries), and up to `retries` transient failures (connection
    /// errors, timeouts, 5xx, 429) are retried with backoff. The answer is returned whatever
    /// its status.
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        url: &str,
        retries: u32,
    ) -> Result<reqwest::Response, SourceError> {
        self.send_hop(build, url, retries, Hop::Follow).await
    }

    /// [`Self::send`], one hop of a redirect chain the caller follows: with the credentials
    /// on the registry's origin, without them elsewhere.
    pub async fn send_hop(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        url: &str,
        retries: u32,
        hop: Hop,
    ) -> Result<reqwest::Response, SourceError> {
        let (client, with_credentials) = match hop {
            Hop::Follow => (&self.http, true),
            Hop::Registry => (&self.http_one_hop, true),
            Hop::Elsewhere => (&self.http_one_hop, false),
        };
        let mut session = self.session().await?;
        let (mut attempt, mut renewed) = (0, false);
        loop {
            let request = build(client);
            let request = if with_credentials { session.authorize(request) } else { request };
            match request.send().await {
                Ok(r)
                    if r.status() == reqwest::StatusCode::UNAUTHORIZED
                        && with_credentials
                        && session.renewable()
                        && !renewed =>
                {
                    let challenge =
                        r.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|h| h.to_str().ok());
                    session = self.renew(&session, challenge).await?;
                    renewed = true;
                }
                Ok(r)
                    if (r.status().is_server_error() || r.status().as_u16() == 429) && attempt < retries =>
                {
                    crate::progress::info(&format!("retrying {url}: HTTP {}", r.status()));
                    tokio::time::sleep(super::registry::backoff(attempt)).await;
                    attempt += 1;
                }
                Ok(r) => return Ok(r),
                Err(e) if http::transient(&e) && attempt < retries => {
                    crate::progress::info(&format!("retrying {url}: {e}"));
                    tokio::time::sleep(super::registry::backoff(attempt)).await;
                    attempt += 1;
                }
                Err(source) => return Err(HttpError::Send { url: url.to_string(), source }.into()),
            }
        }
    }

    /// `https://host[:port]` (or `http://` for plain-HTTP registries).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The HTTP client the authorizer's own requests use.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The realm of a bearer challenge is asked for tokens, with the credentials: only over
    /// HTTP(S), and over plain HTTP only when the registry itself is spoken to so.
    fn check_realm(&self, realm: &str) -> Result<(), SourceError> {
        check_realm(&self.registry, self.plain_http, realm)
    }

    /// `GET /v2/`: what the registry asks for.
    async fn challenge(&self) -> Result<Challenge, SourceError> {
        let url = format!("{}/v2/", self.base_url);
        let response = self.send_retrying(|| self.http.get(&url), &url).await?;
        let Some(header) = response.headers().get(reqwest::header::WWW_AUTHENTICATE) else {
            return Ok(Challenge::Open);
        };
        let text = header.to_str().unwrap_or_default();
        parse_challenge(text).ok_or_else(|| SourceError::Registry {
            what: url.clone(),
            detail: format!("cannot read its WWW-Authenticate challenge {text:?}"),
        })
    }

    /// A pull token from the token server at `realm`, and how long it lasts.
    async fn token(&self, realm: &str, service: Option<&str>) -> Result<(String, Duration), SourceError> {
        let mut query: Vec<(&str, &str)> = vec![("scope", &self.scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let build = || match &self.credential {
            Credential::IdentityToken(refresh) => {
                let mut form = query.clone();
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "vmrootfs"),
                ]);
                self.http.post(realm).form(&form)
            }
            Credential::Basic { user, password } => {
                let mut q = query.clone();
                q.push(("account", user));
                self.http.get(realm).query(&q).basic_auth(user, Some(password))
            }
            Credential::Anonymous => self.http.get(realm).query(&query),
        };
        let response = self.send_retrying(build, realm).await?;
        let status = response.status();
        if status.is_server_error() {
            let body = http::error_body(response).await;
            return Err(SourceError::TokenServerFailed {
                realm: realm.to_string(),
                registry: self.registry.clone(),
                status: status.as_u16(),
                detail: http::printable(&body),
            });
        }
        if !status.is_success() {
            let body = String::from_utf8_lossy(&http::error_body(response).await).into_owned();
            return Err(SourceError::TokenRefused {
                realm: realm.to_string(),
                registry: self.registry.clone(),
                who: match &self.credential {
                    Credential::Anonymous => "anonymous access".into(),
                    Credential::Basic { user, .. } => format!("the credentials of {user}"),
                    Credential::IdentityToken(_) => "the identity token".into(),
                },
                status: status.as_u16(),
                detail: http::printable(refusal_reason(&body).as_bytes()),
            });
        }
        let body = http::read_capped(response, http::MAX_TOKEN_ANSWER, "token server answer").await?;
        let body = String::from_utf8_lossy(&body);
        parse_token(&body).ok_or_else(|| SourceError::Registry {
            what: format!("token server {realm}"),
            detail: "its answer holds no token".into(),
        })
    }

    /// Sends a request, retrying transient failures (connection errors, timeouts, 5xx and
    /// 429 answers) with backoff.
    async fn send_retrying(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, SourceError> {
        let mut attempt = 0;
        loop {
            let result = build().send().await;
            let transient = match &result {
                Ok(r) => r.status().is_server_error() || r.status().as_u16() == 429,
                Err(e) => http::transient(e),
            };
            if transient && attempt + 1 < TOKEN_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                attempt += 1;
                continue;
            }
            return Ok(result.map_err(|source| HttpError::Send { url: url.to_string(), source })?);
        }
    }
}

/// See [`Authorizer::check_realm`].
fn check_realm(registry: &str, plain_http: bool, realm: &str) -> Result<(), SourceError> {
    let scheme = reqwest::Url::parse(realm).map(|u| u.scheme().to_string()).unwrap_or_default();
    match scheme.as_str() {
        "https" => Ok(()),
        "http" if plain_http => Ok(()),
        "http" => Err(SourceError::PlainHttpTokenServer {
            registry: registry.to_string(),
            realm: realm.to_string(),
        }),
        _ => Err(SourceError::BadTokenServer { registry: registry.to_string(), realm: realm.to_string() }),
    }
}

/// `Bearer realm="…",service="…"` or `Basic realm="…"`; `None` for anything else.
fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (mut realm, mut service) = (None, None);
    for (key, value) in challenge_params(params) {
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {} // scope, error: not needed to ask for a pull token
        }
    }
    Some(Challenge::Bearer { realm: realm?, service })
}

/// The `key="value"` (or bare `key=value`) pairs of a challenge; quoted values may hold commas.
fn challenge_params(mut s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        let Some((key, rest)) = s.split_once('=') else { return out };
        let (value, rest) = if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            (rest[..end].trim().to_string(), &rest[end..])
        };
        out.push((key.trim().to_string(), value));
        s = rest;
    }
}

/// The token and its lifetime from a token server's JSON answer (`token` or `access_token`).
fn parse_token(body: &str) -> Option<(String, Duration)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let token = v.get("token").or_else(|| v.get("access_token"))?.as_str()?.to_string();
    let lifetime = v
        .get("expires_in")
        .and_then(|e| e.as_u64())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_LIFETIME, Duration::from_secs);
    Some((token, lifetime))
}

/// Why a token server refused, in its words: Docker Hub's `details`, OAuth2's
/// `error_description`/`error`, distribution's `errors[].message`, else the body itself.
fn refusal_reason(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        if let Some(reason) =
            text("details").or_else(|| text("error_description")).or_else(|| text("message"))
        {
            return reason;
        }
        if let Some(errors) = v.get("errors").and_then(|e| e.as_array()) {
            let messages: Vec<&str> =
                errors.iter().filter_map(|e| e.get("message").and_then(|m| m.as_str())).collect();
            if !messages.is_empty() {
                return messages.join("; ");
            }
        }
        if let Some(reason) = text("error") {
            return reason;
        }
    }
    let body = body.trim();
    if body.is_empty() { "no reason given".into() } else { body.chars().take(300).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="http://127.0.0.1:1/t,x",scope="repository:a/b:pull,push",error="insufficient_scope""#
            ),
            Some(Challenge::Bearer { realm: "http://127.0.0.1:1/t,x".into(), service: None })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=x"), None, "a bearer challenge needs a realm");
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }

    #[test]
    fn token_servers_are_asked_no_less_safely_than_their_registry() {
        assert!(check_realm("ghcr.io", false, "https://ghcr.io/token").is_ok());
        assert!(check_realm("127.0.0.1:5000", true, "http://127.0.0.1:5001/token").is_ok());
        assert!(check_realm("127.0.0.1:5000", true, "https://auth.example/token").is_ok());
        let e = check_realm("reg.example", false, "http://auth.example/token").unwrap_err();
        assert!(matches!(e, SourceError::PlainHttpTokenServer { .. }), "{e}");
        assert!(
            e.to_string().contains("reg.example") && e.to_string().contains("http://auth.example/token"),
            "{e}"
        );
        for realm in ["ftp://auth.example/token", "/token", ""] {
            let e = check_realm("127.0.0.1:5000", true, realm).unwrap_err();
            assert!(matches!(e, SourceError::BadTokenServer { .. }), "{realm}: {e}");
        }
    }

    #[test]
    fn token_answers_and_refusals_read_as_servers_write_them() {
        assert_eq!(
            parse_token(r#"{"token":"t1","expires_in":300}"#),
            Some(("t1".into(), Duration::from_secs(300)))
        );
        assert_eq!(parse_token(r#"{"access_token":"t2"}"#), Some(("t2".into(), DEFAULT_LIFETIME)));
        assert_eq!(parse_token(r#"{"expires_in":3}"#), None);
        assert_eq!(
            refusal_reason(r#"{"details":"incorrect username or password"}"#),
            "incorrect username or password"
        );
        assert_eq!(
            refusal_reason(r#"{"error":"invalid_grant","error_description":"refresh token expired"}"#),
            "refresh token expired"
        );
        assert_eq!(refusal_reason(r#"{"errors":[{"code":"UNAUTHORIZED","message":"denied"}]}"#), "denied");
        assert_eq!(refusal_reason("  nope \n"), "nope");
        assert_eq!(refusal_reason(""), "no reason given");
    }
}

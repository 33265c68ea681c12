//! API keys (`Authorization: Bearer KEY`), the admin key and per-key concurrency (`[auth]`).
//!
//! With no key configured the server is open, as a local tool should be; with at least one,
//! every route but the probes in [`OPEN_PATHS`] needs one. `/metrics` needs a key as well:
//! its series tell request volumes, error rates and the A/B arms' results, which are not for
//! anyone who can reach the port, and Prometheus sends a bearer token
//! (`authorization: {credentials_file: ...}` in a scrape config).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{AuthSection, FullScope};

use super::error::ApiError;
use super::App;

/// Routes answered without credentials: the probes, which tell nothing but liveness, and the
/// A/B page, a static page that asks the browser's user for a key before it reads any data.
pub const OPEN_PATHS: &[&str] = &["/health", "/ready", "/ab"];

/// Seconds a client refused by the per-key limit is told to wait: requests take about that
/// long, and OpenAI's clients retry a 429 after `Retry-After`.
const RETRY_AFTER_SECS: u64 = 1;

/// Which key a caller presented, by position, never by content: safe in logs and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyId {
    /// `api_keys[i]` (the configured list, or `TTARAG_API_KEYS` where that is set).
    Api(usize),
    Admin,
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyId::Api(i) => write!(f, "key{i}"),
            KeyId::Admin => f.write_str("admin"),
        }
    }
}

/// The authenticated caller, in every request's extensions. `key` is `None` on an open server
/// and on [`OPEN_PATHS`] reached without a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub key: Option<KeyId>,
    pub admin: bool,
}

/// The configured keys as SHA-256 digests, and one concurrency slot per key.
pub struct Keys {
    api: Vec<[u8; 32]>,
    admin: Option<[u8; 32]>,
    /// `api_keys` in order, then the admin key; empty when the limit is off.
    slots: Vec<Arc<Semaphore>>,
    max_per_key: usize,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equal digests, in time independent of where they differ. Comparing digests rather than the
/// keys also keeps a key's length and prefix out of the timing.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Keys {
    pub fn new(cfg: &AuthSection) -> Self {
        let api: Vec<[u8; 32]> = cfg.api_keys.iter().map(|k| digest(k.expose())).collect();
        let admin = cfg.admin_key.as_ref().map(|k| digest(k.expose()));
        let n = api.len() + usize::from(admin.is_some());
        let max = cfg.max_concurrent_per_key.min(Semaphore::MAX_PERMITS);
        let slots = match max {
            0 => vec![],
            m => (0..n).map(|_| Arc::new(Semaphore::new(m))).collect(),
        };
        Self {
            api,
            admin,
            slots,
            max_per_key: max,
        }
    }

    /// Whether requests need a key at all.
    pub fn required(&self) -> bool {
        !self.api.is_empty() || self.admin.is_some()
    }

    /// The caller whose key `token` is. Every configured key is compared, so the time taken
    /// does not tell which one (or whether any) matched.
    pub fn identify(&self, token: &str) -> Option<Principal> {
        let d = digest(token);
        let mut found = None;
        for (i, k) in self.api.iter().enumerate() {
            if same(k, &d) && found.is_none() {
                found = Some(KeyId::Api(i));
            }
        }
        if let Some(k) = &self.admin {
            if same(k, &d) {
                found = Some(KeyId::Admin);
            }
        }
        found.map(|id| Principal {
            key: Some(id),
            admin: id == KeyId::Admin,
        })
    }

    fn slot(&self, id: KeyId) -> Option<&Arc<Semaphore>> {
        let i = match id {
            KeyId::Api(i) => i,
            KeyId::Admin => self.api.len(),
        };
        self.slots.get(i)
    }
}

/// The token of an `Authorization: Bearer TOKEN` header (scheme case-insensitive, token
/// trimmed); `None` when the header is absent, not Bearer, not text, or empty.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(message: &str, challenge: &'static str) -> Response {
    let mut resp = ApiError::invalid(message, None)
        .with_status(StatusCode::UNAUTHORIZED)
        .with_code("invalid_api_key")
        .into_response();
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    resp
}

/// Middleware over the whole router: identifies the caller or answers 401, and puts the
/// [`Principal`] in the request's extensions for what runs after.
pub async fn authenticate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let keys = &app.auth;
    let token = bearer(req.headers());
    let found = token.and_then(|t| keys.identify(t));
    let principal = match found {
        Some(p) => p,
        // An open server ignores whatever token a client sends (OpenAI's clients always send
        // one); the probes answer anyone.
        None if !keys.required() || OPEN_PATHS.contains(&req.uri().path()) => Principal::default(),
        None => {
            let path = req.uri().path();
            return match token {
                None => {
                    tracing::info!(%path, "refused: no API key");
                    unauthorized(
                        "no API key: send it as `Authorization: Bearer KEY`",
                        "Bearer realm=\"ttarag\"",
                    )
                }
                Some(_) => {
                    tracing::info!(%path, "refused: unknown API key");
                    unauthorized(
                        "incorrect API key",
                        "Bearer realm=\"ttarag\", error=\"invalid_token\"",
                    )
                }
            };
        }
    };
    if let Some(key) = principal.key {
        tracing::debug!(%key, path = %req.uri().path(), "authenticated");
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

/// Middleware over routes that run model work: a key with `max_concurrent_per_key` requests
/// in flight gets 429 at once. The slot is held until the response body has been sent or
/// dropped, so a stream counts while it streams. Callers without a key (an open server) are
/// not limited: behind a proxy every client has the proxy's address, so a per-address limit
/// would throttle them all as one, and the queue's own bound (429 when full) still holds.
pub async fn limit_per_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let key = req.extensions().get::<Principal>().and_then(|p| p.key);
    let Some((key, slot)) = key.and_then(|k| Some((k, app.auth.slot(k)?))) else {
        return next.run(req).await;
    };
    let Ok(permit) = slot.clone().try_acquire_owned() else {
        tracing::info!(%key, "refused: per-key concurrency limit");
        let mut e = ApiError::invalid(
            format!(
                "this API key already has {} requests running; retry when one has finished",
                app.auth.max_per_key
            ),
            None,
        )
        .with_status(StatusCode::TOO_MANY_REQUESTS)
        .with_code("concurrency_limit_exceeded")
        .with_retry_after(RETRY_AFTER_SECS);
        e.kind = "rate_limit_error";
        return e.into_response();
    };
    hold_until_sent(next.run(req).await, permit)
}

/// `resp` with `permit` tied to its body: released when the body ends or is dropped (the
/// client has gone).
fn hold_until_sent(resp: Response, permit: OwnedSemaphorePermit) -> Response {
    let (mut parts, body) = resp.into_parts();
    // A stream body has no known length; keep a buffered body's as a header so it is still
    // sent with `Content-Length`, not chunked.
    if let Some(n) = body.size_hint().exact() {
        parts
            .headers
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(n));
    }
    let held = Held {
        inner: body.into_data_stream(),
        _permit: permit,
    };
    Response::from_parts(parts, Body::from_stream(held))
}

struct Held {
    inner: BodyDataStream,
    _permit: OwnedSemaphorePermit,
}

impl Stream for Held {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        Stream::size_hint(&self.inner)
    }
}

/// Whether a request's own `rag.tta` asks for scope `full`.
pub fn asks_full(tta: Option<&crate::engine::TtaOverrides>) -> bool {
    tta.and_then(|t| t.scope.as_deref()) == Some("full")
}

/// Refuses (403) a request that asked for scope `full` itself unless `principal` holds the
/// admin key or `[auth] full_scope = "any"`: full scope trains a private copy of every weight
/// and runs one such request at a time, so it holds the server for everyone. A default scope
/// or an A/B arm's is the operator's choice and is not checked here.
pub fn check_scope(
    principal: &Principal,
    asked_full: bool,
    cfg: &AuthSection,
) -> Result<(), ApiError> {
    if !asked_full || principal.admin || cfg.full_scope == FullScope::Any {
        return Ok(());
    }
    let how = if cfg.admin_key.is_some() {
        "it needs the admin key"
    } else {
        "this server allows it to no one"
    };
    Err(ApiError::invalid(
        format!(
            "rag.tta.scope \"full\" trains every weight and holds the server for everyone; {how}"
        ),
        Some("rag.tta.scope"),
    )
    .with_status(StatusCode::FORBIDDEN)
    .with_code("permission_denied"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn section(api: &[&str], admin: Option<&str>) -> AuthSection {
        AuthSection {
            api_keys: api.iter().map(|k| Secret::from(k.to_string())).collect(),
            admin_key: admin.map(|k| Secret::from(k.to_string())),
            ..AuthSection::default()
        }
    }

    #[test]
    fn keys_are_told_apart_by_position_and_admin() {
        let k = Keys::new(&section(
            &["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"],
            Some("cccccccccccccccc"),
        ));
        assert!(k.required());
        assert_eq!(
            k.identify("bbbbbbbbbbbbbbbb").unwrap().key,
            Some(KeyId::Api(1))
        );
        let admin = k.identify("cccccccccccccccc").unwrap();
        assert!(admin.admin && admin.key == Some(KeyId::Admin));
        assert!(!k.identify("aaaaaaaaaaaaaaaa").unwrap().admin);
        assert_eq!(k.identify("aaaaaaaaaaaaaaa"), None);
        assert_eq!(k.identify(""), None);
        assert!(!Keys::new(&AuthSection::default()).required());
        assert_eq!(KeyId::Api(3).to_string(), "key3");
    }

    #[test]
    fn bearer_tokens_are_read_leniently() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer   abc  ")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn explicit_full_scope_needs_admin_unless_allowed_to_any() {
        let cfg = section(&["aaaaaaaaaaaaaaaa"], Some("cccccccccccccccc"));
        let user = Principal {
            key: Some(KeyId::Api(0)),
            admin: false,
        };
        let admin = Principal {
            key: Some(KeyId::Admin),
            admin: true,
        };
        let e = check_scope(&user, true, &cfg).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, Some("permission_denied"))
        );
        assert_eq!(e.param.as_deref(), Some("rag.tta.scope"));
        assert!(check_scope(&user, false, &cfg).is_ok());
        assert!(check_scope(&admin, true, &cfg).is_ok());
        // An open server refuses it too, and says no one may.
        let open = AuthSection::default();
        let e = check_scope(&Principal::default(), true, &open).unwrap_err();
        assert!(e.message.contains("no one"), "{}", e.message);
        let any = AuthSection {
            full_scope: FullScope::Any,
            ..open
        };
        assert!(check_scope(&Principal::default(), true, &any).is_ok());
    }
}

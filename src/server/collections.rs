//! The collections API: list collections, ingest documents, delete a document or a whole
//! collection, on a running server. Writes need the admin key. Each write is one commit of the
//! index (tantivy's commits are atomic and searches reload on a new commit), so a search
//! running meanwhile sees the collection before or after it, never half of it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiError;
use super::App;
use crate::retrieval::{Document, RetrievalError};

/// A retrieval error as the client sees it.
fn api_error(e: RetrievalError) -> ApiError {
    let msg = e.to_string();
    match e {
        RetrievalError::UnknownCollection(_) => ApiError::invalid(msg, None)
            .with_status(StatusCode::NOT_FOUND)
            .with_code("collection_not_found"),
        RetrievalError::BadName(_) | RetrievalError::BadInput(_) => ApiError::invalid(msg, None),
        // Another writer (a concurrent ingest, the CLI) holds the index's lock.
        RetrievalError::Index(tantivy::TantivyError::LockFailure(..)) => ApiError::invalid(
            "another write to this collection is under way; retry when it is done",
            None,
        )
        .with_status(StatusCode::CONFLICT)
        .with_code("collection_busy")
        .with_retry_after(1),
        _ => ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, msg),
    }
}

/// Writes change what every client retrieves: only the admin key may.
fn require_admin(app: &App, caller: Option<&Principal>) -> Result<(), ApiError> {
    let forbidden = |m: &str| {
        Err(ApiError::invalid(m, None)
            .with_status(StatusCode::FORBIDDEN)
            .with_code("admin_key_required"))
    };
    match (&app.config.auth.admin_key, caller) {
        (None, _) => forbidden(
            "collections change over HTTP only with the admin key, and this server has none: \
             set [auth] admin_key (or use `ttarag index`)",
        ),
        (Some(_), Some(p)) if p.admin => Ok(()),
        _ => forbidden("changing a collection needs the admin key"),
    }
}

/// Runs index work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RetrievalError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(api_error)
}

/// `GET /v1/collections`.
pub async fn list(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let cols = app.engine.collections.clone();
    let stats = blocking(move || cols.stats()).await?;
    let adapters = app.config.domain.dir.clone();
    let data: Vec<Value> = stats
        .into_iter()
        .map(|s| {
            let adapter = adapters.join(&s.name).join("card.json").is_file();
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["object"] = json!("collection");
            v["domain_adapter"] = json!(adapter);
            v
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

/// The documents of an ingest body: a JSON array of objects, or JSON Lines (one object per
/// line, blank lines skipped). Errors name the item (array) or line (JSONL) at fault.
fn parse_documents(body: &[u8], max: usize) -> Result<Vec<Document>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::invalid(format!("the body is not UTF-8: {e}"), None))?;
    let too_many = || {
        ApiError::invalid(
            format!(
                "more than {max} documents in one request (retrieval.max_ingest_documents): \
                 send them in several"
            ),
            None,
        )
        .with_code("too_many_documents")
    };
    let doc = |v: Value, at: String| {
        Document::from_json(v).map_err(|e| ApiError::invalid(format!("{at}: {e}"), None))
    };
    let mut out = Vec::new();
    if text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                format!("the body is not a JSON array of documents: {e}"),
                None,
            )
        })?;
        if items.len() > max {
            return Err(too_many());
        }
        for (i, v) in items.into_iter().enumerate() {
            out.push(doc(v, format!("item {i}"))?);
        }
    } else {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if out.len() == max {
                return Err(too_many());
            }
            let at = format!("line {}", n + 1);
            let v = serde_json::from_str(line)
                .map_err(|e| ApiError::invalid(format!("{at}: {e}"), None))?;
            out.push(doc(v, at)?);
        }
    }
    if out.is_empty() {
        return Err(ApiError::invalid("no documents in the body", None));
    }
    Ok(out)
}

/// `POST /v1/collections/{name}/documents`: creates the collection when missing; re-sent ids
/// replace their passages; the whole body is one commit or none.
pub async fn ingest(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Principal>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require_admin(&app, caller.as_deref())?;
    let body = body.map_err(|rej| {
        ApiError::invalid(
            format!("could not read the request body: {}", rej.body_text()),
            None,
        )
        .with_status(rej.status())
    })?;
    let docs = parse_documents(&body, app.config.retrieval.max_ingest_documents)?;
    let cols = app.engine.collections.clone();
    let max_chars = app.config.retrieval.passage_max_chars;
    let coll = name.clone();
    let (stats, created) = blocking(move || cols.ingest_documents(&coll, &docs, max_chars)).await?;
    tracing::info!(collection = %name, documents = stats.documents, passages = stats.passages, created, "ingested");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "object": "collection.ingest",
            "collection": name,
            "created": created,
            "documents": stats.documents,
            "passages": stats.passages,
        })),
    ))
}

#[derive(Debug, serde::Deserialize)]
pub struct SearchQuery {
    q: String,
    k: Option<usize>,
}

/// `GET /v1/collections/{name}/search?q=TEXT&k=N`: the passages a request would retrieve (BM25,
/// the same lenient parsing), and how long the search took: to check a collection without
/// running the model.
pub async fn search(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    axum::extract::Query(query): axum::extract::Query<SearchQuery>,
) -> Result<Json<Value>, ApiError> {
    let max = app.config.retrieval.max_top_k;
    let k = query.k.unwrap_or(app.config.retrieval.top_k);
    if !(1..=max).contains(&k) {
        return Err(ApiError::invalid(
            format!("k {k} is outside 1..={max}"),
            Some("k"),
        ));
    }
    let cols = app.engine.collections.clone();
    let (passages, ms) = blocking(move || {
        let t = std::time::Instant::now();
        let hits = cols.get(&name)?.search(&query.q, k)?;
        Ok((hits, t.elapsed().as_secs_f64() * 1e3))
    })
    .await?;
    Ok(Json(
        json!({"object": "list", "data": passages, "search_ms": ms}),
    ))
}

/// `DELETE /v1/collections/{name}/documents/{id}`.
pub async fn delete_document(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Principal>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&app, caller.as_deref())?;
    let cols = app.engine.collections.clone();
    let (coll, doc) = (name.clone(), id.clone());
    if !blocking(move || cols.delete_document(&coll, &doc)).await? {
        return Err(
            ApiError::invalid(format!("collection `{name}` has no document `{id}`"), None)
                .with_status(StatusCode::NOT_FOUND)
                .with_code("document_not_found"),
        );
    }
    tracing::info!(collection = %name, document = %id, "deleted a document");
    Ok(Json(
        json!({"object": "collection.document", "collection": name, "id": id, "deleted": true}),
    ))
}

/// `DELETE /v1/collections/{name}`.
pub async fn delete_collection(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&app, caller.as_deref())?;
    let cols = app.engine.collections.clone();
    let coll = name.clone();
    blocking(move || cols.delete(&coll)).await?;
    tracing::info!(collection = %name, "deleted a collection");
    Ok(Json(
        json!({"object": "collection", "name": name, "deleted": true}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_as_an_array_or_json_lines_and_errors_name_the_place() {
        let a = parse_documents(
            br#"[{"id": 1, "text": "a"}, {"id": "x", "text": "b", "title": "T"}]"#,
            10,
        )
        .unwrap();
        assert_eq!(
            a[1],
            Document {
                id: "x".into(),
                title: "T".into(),
                text: "b".into(),
                metadata: None,
            }
        );
        let l = parse_documents(
            b"{\"id\": 1, \"text\": \"a\"}\n\n{\"id\": 2, \"text\": \"b\"}\n",
            10,
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        let e = parse_documents(b"{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2}\n", 10).unwrap_err();
        assert!(
            e.message.starts_with("line 2: missing field `text`"),
            "{}",
            e.message
        );
        let e = parse_documents(b"{\"id\": 1, \"text\": \"a\"}\nnot json\n", 10).unwrap_err();
        assert!(e.message.starts_with("line 2:"), "{}", e.message);
        let e = parse_documents(br#"[{"id": 1, "text": "a"}, {"id": "", "text": "b"}]"#, 10)
            .unwrap_err();
        assert!(e.message.starts_with("item 1: `id`"), "{}", e.message);
        let e = parse_documents(
            b"{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2, \"text\": \"b\"}",
            1,
        )
        .unwrap_err();
        assert_eq!(e.code, Some("too_many_documents"));
        assert!(parse_documents(b" \n", 10).is_err());
        assert!(parse_documents(b"\xff", 10).is_err());
    }
}

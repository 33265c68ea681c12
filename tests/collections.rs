//! The collections API over real loopback connections, on the tiny model: what it lists, that
//! ingested documents are what chat requests retrieve at once, replacement by id, refusals that
//! name the bad line and change nothing, deletes, the admin key, and searches during an ingest
//! seeing all of it or none.

mod common;

use serde_json::{json, Value};

const USER: &str = "sk-test-user-0123456789";
const ADMIN: &str = "sk-test-admin-0123456789";

async fn server() -> common::TestServer {
    let toml = format!("[auth]\napi_keys = [\"{USER}\"]\nadmin_key = \"{ADMIN}\"\n");
    common::start_tiny_toml(1, 8, false, &toml).await
}

enum Body<'a> {
    None,
    Raw(&'a str),
    Json(&'a Value),
}

async fn call(base: &str, method: &str, path: &str, key: &str, body: Body<'_>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{base}{path}");
    let req = match method {
        "GET" => c.get(url),
        "POST" => c.post(url),
        "DELETE" => c.delete(url),
        m => panic!("{m}"),
    }
    .bearer_auth(key);
    let req = match body {
        Body::None => req,
        Body::Raw(s) => req.body(s.to_string()),
        Body::Json(v) => req.json(v),
    };
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The passages a static chat request on `collection` retrieves for `question`, by id.
async fn retrieved(base: &str, collection: &str, question: &str) -> (u16, Vec<String>) {
    let body = json!({"model": "tiny", "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": question}],
        "rag": {"mode": "static", "collection": collection, "top_k": 5}});
    let (s, v) = call(
        base,
        "POST",
        "/v1/chat/completions",
        USER,
        Body::Json(&body),
    )
    .await;
    let ids = v["rag"]["passages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    (s, ids)
}

fn listed(v: &Value, name: &str) -> Option<Value> {
    v["data"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_documents_are_retrieved_at_once_replaced_by_id_and_deleted() {
    let s = server().await;
    let b = &s.base;
    let docs = "{\"id\": \"v1\", \"text\": \"Volcanoes erupt molten lava and ash.\", \"title\": \"Geo\"}\n\
                {\"id\": 7, \"text\": \"Glaciers carve valleys slowly.\"}\n";
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/geo/documents",
        ADMIN,
        Body::Raw(docs),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["created"].clone(), v["documents"].clone()),
        (json!(true), json!(2))
    );

    let (st, v) = call(b, "GET", "/v1/collections", USER, Body::None).await;
    assert_eq!(st, 200, "{v}");
    let geo = listed(&v, "geo").expect("listed");
    assert_eq!(
        (geo["documents"].clone(), geo["passages"].clone()),
        (json!(2), json!(2))
    );
    assert!(geo["size_bytes"].as_u64().unwrap() > 0 && geo["last_commit"].as_u64().is_some());
    assert_eq!(geo["domain_adapter"], json!(false));
    assert!(
        listed(&v, "facts").is_some(),
        "the server's own collection is listed too"
    );

    // The running server retrieves them without a restart, in chat requests and searches.
    assert_eq!(
        retrieved(b, "geo", "volcanoes lava").await,
        (200, vec!["v1".to_string()])
    );
    let (st, v) = call(
        b,
        "GET",
        "/v1/collections/geo/search?q=glaciers&k=1",
        USER,
        Body::None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"][0]["id"], "7");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert!(v["search_ms"].as_f64().unwrap() >= 0.0);
    let (st, _) = call(
        b,
        "GET",
        "/v1/collections/geo/search?q=x&k=0",
        USER,
        Body::None,
    )
    .await;
    assert_eq!(st, 400);
    let (st, _) = call(
        b,
        "GET",
        "/v1/collections/nope/search?q=x",
        USER,
        Body::None,
    )
    .await;
    assert_eq!(st, 404);
    // Passages name their document; `rag.cite` numbers them in the prompt.
    let ask = |cite: bool| {
        json!({"model": "tiny", "max_tokens": 1, "temperature": 0,
               "messages": [{"role": "user", "content": "volcanoes lava"}],
               "rag": {"mode": "static", "collection": "geo", "cite": cite}})
    };
    let (_, plain) = call(
        b,
        "POST",
        "/v1/chat/completions",
        USER,
        Body::Json(&ask(false)),
    )
    .await;
    let (st, cited) = call(
        b,
        "POST",
        "/v1/chat/completions",
        USER,
        Body::Json(&ask(true)),
    )
    .await;
    assert_eq!(st, 200, "{cited}");
    assert_eq!(cited["rag"]["passages"][0]["document"], "v1");
    assert_eq!(cited["rag"]["passages"][0]["title"], "Geo");
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens(&cited) > tokens(&plain), "{cited}");
    // A cited answer lists what its markers cite (the tiny model's text may cite nothing);
    // an uncited one has no list.
    assert!(plain["rag"].get("citations").is_none(), "{plain}");
    let answer = cited["choices"][0]["message"]["content"].as_str().unwrap();
    for c in cited["rag"]["citations"].as_array().expect("citations") {
        let n = c["marker"].as_u64().unwrap() as usize;
        assert!(answer.contains(&n.to_string()), "{c} not in {answer:?}");
        assert_eq!(c["passage"], cited["rag"]["passages"][n - 1]["id"]);
    }

    // Same id again: replaced, not added.
    let again = json!([{"id": "v1", "text": "Geysers spout hot water."}]);
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/geo/documents",
        ADMIN,
        Body::Json(&again),
    )
    .await;
    assert_eq!((st, v["created"].clone()), (200, json!(false)), "{v}");
    assert_eq!(
        retrieved(b, "geo", "volcanoes lava").await.1,
        Vec::<String>::new()
    );
    assert_eq!(
        retrieved(b, "geo", "geysers").await.1,
        vec!["v1".to_string()]
    );

    // A bad line refuses the whole body by its line number and commits nothing.
    let bad = "{\"id\": \"ok\", \"text\": \"Rivers carry sand.\"}\n{\"id\": \"no-text\"}\n";
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/geo/documents",
        ADMIN,
        Body::Raw(bad),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("line 2: missing field `text`"), "{msg}");
    assert_eq!(
        retrieved(b, "geo", "rivers sand").await.1,
        Vec::<String>::new()
    );

    // Deletes: a document, an unknown document, the collection.
    let (st, _) = call(
        b,
        "DELETE",
        "/v1/collections/geo/documents/7",
        ADMIN,
        Body::None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        retrieved(b, "geo", "glaciers valleys").await.1,
        Vec::<String>::new()
    );
    let (st, v) = call(
        b,
        "DELETE",
        "/v1/collections/geo/documents/7",
        ADMIN,
        Body::None,
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (404, json!("document_not_found"))
    );
    let (st, _) = call(b, "DELETE", "/v1/collections/geo", ADMIN, Body::None).await;
    assert_eq!(st, 200);
    let (st, v) = call(b, "GET", "/v1/collections", USER, Body::None).await;
    assert!(st == 200 && listed(&v, "geo").is_none(), "{v}");
    let (st, _) = retrieved(b, "geo", "geysers").await;
    assert_eq!(st, 400, "a deleted collection is unknown to chat requests");
    let (st, _) = call(b, "DELETE", "/v1/collections/geo", ADMIN, Body::None).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_admin_key_changes_collections_and_bad_requests_are_named() {
    let s = server().await;
    let b = &s.base;
    let one = json!([{"id": 1, "text": "Bees carry pollen."}]);
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/bees/documents",
        USER,
        Body::Json(&one),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (403, json!("admin_key_required"))
    );
    let (st, _) = call(b, "DELETE", "/v1/collections/facts", USER, Body::None).await;
    assert_eq!(st, 403);
    let (st, _) = call(
        b,
        "GET",
        "/v1/collections",
        "sk-wrong-0123456789",
        Body::None,
    )
    .await;
    assert_eq!(st, 401);
    // Nothing was created by the refused request.
    let (_, v) = call(b, "GET", "/v1/collections", USER, Body::None).await;
    assert!(listed(&v, "bees").is_none());

    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/bad%20name/documents",
        ADMIN,
        Body::Json(&one),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/bees/documents",
        ADMIN,
        Body::Raw("[]"),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let many: Vec<Value> = (0..1001).map(|i| json!({"id": i, "text": "x"})).collect();
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/bees/documents",
        ADMIN,
        Body::Json(&json!(many)),
    )
    .await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (400, json!("too_many_documents"))
    );
    let (st, _) = call(b, "DELETE", "/v1/collections/nope", ADMIN, Body::None).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_during_an_ingest_sees_all_of_it_or_none() {
    let s = server().await;
    let b = s.base.clone();
    let seed = json!([{"id": "seed", "text": "Sand dunes move with the wind."}]);
    let (st, _) = call(
        &b,
        "POST",
        "/v1/collections/dunes/documents",
        ADMIN,
        Body::Json(&seed),
    )
    .await;
    assert_eq!(st, 201);
    let cols = s.app.engine.collections.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let c = cols.get("dunes").unwrap();
            seen.insert(c.search("zebra", 1000).unwrap().len());
            if seen.contains(&300) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        seen
    });
    let batch: Vec<Value> = (0..300)
        .map(|i| json!({"id": format!("z{i}"), "text": format!("A zebra number {i} grazes.")}))
        .collect();
    let (st, v) = call(
        &b,
        "POST",
        "/v1/collections/dunes/documents",
        ADMIN,
        Body::Json(&json!(batch)),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter().all(|&n| n == 0 || n == 300),
        "a search saw part of an ingest: {seen:?}"
    );
    assert!(
        seen.contains(&300),
        "the ingest never became visible: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collections_own_settings_serve_its_requests_unless_they_say_otherwise() {
    let toml = format!(
        "[auth]\napi_keys = [\"{USER}\"]\nadmin_key = \"{ADMIN}\"\n\
         [collections.terse]\nprompt_template = \"{{{{ question }}}}\"\ntop_k = 1\n\
         [collections.quiet]\nmode = \"none\"\n[collections.quiet.tta]\nsteps = 1\nmin_words = 3\n"
    );
    let s = common::start_tiny_toml(1, 8, false, &toml).await;
    let b = &s.base;
    let docs = json!([{"id": "a", "text": "Volcanoes erupt molten lava and ash."},
                      {"id": "b", "text": "Volcanoes can also release lava domes."}]);
    for c in ["terse", "quiet", "plain"] {
        let path = format!("/v1/collections/{c}/documents");
        assert_eq!(
            call(b, "POST", &path, ADMIN, Body::Json(&docs)).await.0,
            201
        );
    }
    let ask = |collection: &str, rag: Value| {
        let mut r = rag;
        r["collection"] = json!(collection);
        json!({"model": "tiny", "max_tokens": 1, "temperature": 0, "rag": r,
               "messages": [{"role": "user", "content": "What do volcanoes erupt?"}]})
    };
    let chat = |body: Value| async move {
        let (st, v) = call(b, "POST", "/v1/chat/completions", USER, Body::Json(&body)).await;
        assert_eq!(st, 200, "{v}");
        v
    };
    // `terse`: its own template (the question alone) and top_k.
    let terse = chat(ask("terse", json!({"mode": "static"}))).await;
    let plain = chat(ask("plain", json!({"mode": "static"}))).await;
    let bare = chat(ask("plain", json!({"mode": "none"}))).await;
    assert_eq!(terse["rag"]["passages"].as_array().unwrap().len(), 1);
    assert_eq!(plain["rag"]["passages"].as_array().unwrap().len(), 2);
    assert_eq!(
        terse["usage"]["prompt_tokens"], bare["usage"]["prompt_tokens"],
        "the collection's template shows the question alone"
    );
    assert!(plain["usage"]["prompt_tokens"].as_u64() > bare["usage"]["prompt_tokens"].as_u64());
    // The request's own top_k wins.
    let wide = chat(ask("terse", json!({"mode": "static", "top_k": 2}))).await;
    assert_eq!(wide["rag"]["passages"].as_array().unwrap().len(), 2);
    // `quiet`: mode `none` unless the request names one; its TTA recipe under the request's.
    let quiet = chat(ask("quiet", json!({}))).await;
    assert_eq!(quiet["rag"]["mode"], "none", "{quiet}");
    let adapted = chat(ask("quiet", json!({"mode": "tta"}))).await;
    assert_eq!(adapted["rag"]["tta"]["steps"], 1, "{adapted}");
    let more = chat(ask("quiet", json!({"mode": "tta", "tta": {"steps": 2}}))).await;
    assert_eq!(more["rag"]["tta"]["steps"], 2, "{more}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_body_may_be_larger_than_other_requests_up_to_its_own_bound() {
    let s = server().await;
    let b = &s.base;
    // The test server takes 64 KiB bodies elsewhere; this one is ~200 KB.
    let docs: Vec<Value> = (0..100)
        .map(|i| json!({"id": i, "text": format!("Sediment layer {i}. {}", "Silt settles. ".repeat(140))}))
        .collect();
    let body = json!(docs);
    assert!(body.to_string().len() > 150_000);
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/big/documents",
        ADMIN,
        Body::Json(&body),
    )
    .await;
    assert_eq!((st, v["documents"].clone()), (201, json!(100)), "{v}");
    let chat =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(150_000)}]});
    let (st, _) = call(b, "POST", "/v1/chat/completions", USER, Body::Json(&chat)).await;
    assert_eq!(st, 413);
    // Past its own bound (16 MiB by default) an ingest is refused too. The server answers 413
    // and closes once it has read its bound; a client still writing the rest may see the
    // connection closed before it reads the status, so such an attempt is tried again.
    let huge = "{\"id\": 1, \"text\": \"a\"}\n".repeat(800_000);
    assert_eq!(
        refusal(b, "/v1/collections/big/documents", &huge).await,
        413
    );
}

/// The status a POST of `body` gets; a transport error (the server closed while the body was
/// still being written) is tried again, a few times at most.
async fn refusal(base: &str, path: &str, body: &str) -> u16 {
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let sent = client
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .body(body.to_string())
            .send()
            .await;
        match sent {
            Ok(r) => return r.status().as_u16(),
            Err(e) if e.is_request() => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no answer in 5 attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_metadata_comes_back_with_searches_and_chat_passages() {
    let s = server().await;
    let b = &s.base;
    let meta = json!({"source": "pubmed", "pmid": 12345, "year": 2019});
    let docs = json!([
        {"id": "m1", "text": "Aspirin lowers the risk of heart attacks.", "title": "Cardio",
         "metadata": meta},
        {"id": "m2", "text": "Statins lower cholesterol in the blood."},
    ]);
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/med/documents",
        ADMIN,
        Body::Json(&docs),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = call(
        b,
        "GET",
        "/v1/collections/med/search?q=aspirin&k=1",
        USER,
        Body::None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["data"][0]["document"], &v["data"][0]["metadata"]),
        (&json!("m1"), &meta)
    );
    let chat = json!({"model": "tiny", "max_tokens": 1, "temperature": 0,
        "messages": [{"role": "user", "content": "Does aspirin help the heart?"}],
        "rag": {"mode": "static", "collection": "med", "top_k": 2}});
    let (st, v) = call(b, "POST", "/v1/chat/completions", USER, Body::Json(&chat)).await;
    assert_eq!(st, 200, "{v}");
    let passages = v["rag"]["passages"].as_array().unwrap();
    let m1 = passages
        .iter()
        .find(|p| p["id"] == "m1")
        .expect("m1 retrieved");
    assert_eq!(m1["metadata"], meta);
    assert!(
        passages
            .iter()
            .filter(|p| p["id"] != "m1")
            .all(|p| p.get("metadata").is_none()),
        "{passages:?}"
    );

    // Metadata that is not an object is named by its index, and nothing is written.
    let bad = json!([{"id": "m3", "text": "x"}, {"id": "m4", "text": "y", "metadata": [1, 2]}]);
    let (st, v) = call(
        b,
        "POST",
        "/v1/collections/med/documents",
        ADMIN,
        Body::Json(&bad),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("item 1") && msg.contains("metadata"), "{msg}");
    let (_, v) = call(b, "GET", "/v1/collections", USER, Body::None).await;
    assert_eq!(listed(&v, "med").unwrap()["documents"], json!(2));
}

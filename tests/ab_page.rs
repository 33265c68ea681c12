//! The A/B page (`GET /ab`) in a real headless browser (Debian's chromium, which `make setup`
//! installs): it loads without a key, reads `/v1/ab/summary` and shows each arm with its
//! comparison, verdict and chart point. Also the page's own refusal when the server wants a key.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::post_json;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The page's DOM after its scripts ran, as headless chromium serialises it.
fn rendered(url: &str) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} missing: run `make setup` (it installs Debian's chromium)"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of the row of `arm` in the page's table.
fn row<'a>(dom: &'a str, arm: &str) -> &'a str {
    let start = dom
        .find(&format!("data-arm=\"{arm}\""))
        .unwrap_or_else(|| panic!("no row for {arm}: {dom}"));
    let end = dom[start..].find("</tr>").unwrap() + start;
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_each_arm_its_comparison_and_verdict_in_a_browser() {
    let cfg = ttarag::config::Config::from_toml(
        "[ab]\narms = [{name = \"static\", weight = 1.0, mode = \"static\"}, \
         {name = \"none\", weight = 1.0, mode = \"none\"}]\n",
    )
    .unwrap();
    let s = common::start_tiny_with(1, 64, false, cfg).await;
    let mut ids: HashMap<&str, Vec<String>> = HashMap::new();
    for arm in ["static", "none"] {
        for _ in 0..30 {
            let body = json!({"model": "tiny", "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": "What can damage buildings?"}],
                "rag": {"arm": arm}});
            let (st, v) = post_json(&s.base, "/v1/chat/completions", &body).await;
            assert_eq!(st, 200, "{v}");
            ids.entry(arm)
                .or_default()
                .push(v["id"].as_str().unwrap().into());
        }
    }
    for (arm, correct) in [("static", true), ("none", false)] {
        for id in &ids[arm] {
            let fb = json!({"id": id, "correct": correct});
            assert_eq!(post_json(&s.base, "/v1/feedback", &fb).await.0, 200);
        }
    }
    let url = format!("{}/ab", s.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the script never rendered: {dom}"
    );
    let base = row(&dom, "static");
    assert!(
        base.contains("baseline") && base.contains("100.0 %"),
        "{base}"
    );
    let none = row(&dom, "none");
    assert!(none.contains("-100.0 pts"), "{none}");
    assert!(
        none.contains("class=\"worse\"") && none.contains(">worse<"),
        "{none}"
    );
    // One chart point per arm with feedback.
    assert_eq!(dom.matches("class=\"point\"").count(), 2, "{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_keyed_server_the_page_loads_and_asks_for_a_key() {
    let s =
        common::start_tiny_toml(1, 8, false, "[auth]\napi_keys = [\"sk-test-0123456789\"]\n").await;
    let url = format!("{}/ab", s.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert!(dom.contains("This server needs an API key."), "{dom}");
    // The data itself stays behind the key.
    let r = reqwest::get(format!("{}/v1/ab/summary", s.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

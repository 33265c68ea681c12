//! `ttarag index adapt` on the real default model: trains a small adapter with a card, which
//! `ttarag ask` then uses, and refuses once the collection has changed.

mod common;

use std::process::{Command, Output};

fn ttarag(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ttarag"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_trained_adapter_is_carded_used_by_ask_and_refused_once_its_collection_changes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let corpus = root.join("facts.jsonl");
    std::fs::write(&corpus, common::FACTS).unwrap();
    let questions = root.join("questions.jsonl");
    std::fs::write(
        &questions,
        "{\"id\": \"q1\", \"question\": \"What can damage buildings?\", \"answers\": [\"earthquakes\"]}\n\
         {\"id\": \"q2\", \"question\": \"What do plants need to grow?\", \"answers\": [\"sunlight\"]}\n\
         {\"id\": \"q3\", \"question\": \"At what temperature does water boil?\", \"answers\": [\"100 degrees Celsius\"]}\n\
         {\"id\": \"q4\", \"question\": \"What do plants need to grow?\", \"answers\": [\"light\"]}\n",
    )
    .unwrap();
    let config = root.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[retrieval]\nindex_dir = \"{}\"\n[domain]\ndir = \"{}\"\n[domain.train]\nbatch = 2\nrank = 4\n",
            root.join("index").display(),
            root.join("adapters").display()
        ),
    )
    .unwrap();
    let build = ttarag(
        &config,
        &[
            "index",
            "build",
            "--collection",
            "facts",
            "--input",
            corpus.to_str().unwrap(),
        ],
    );
    assert!(build.status.success(), "{}", stderr(&build));

    let unknown = ttarag(&config, &["index", "adapt", "--collection", "nope"]);
    assert!(!unknown.status.success());
    let err = stderr(&unknown);
    assert!(err.contains("unknown collection `nope`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    let q = questions.to_str().unwrap();
    let adapt = ttarag(
        &config,
        &[
            "index",
            "adapt",
            "--collection",
            "facts",
            "--questions",
            q,
            "--part",
            "all",
            "--quiet",
        ],
    );
    assert!(adapt.status.success(), "{}", stderr(&adapt));
    let out = String::from_utf8_lossy(&adapt.stdout);
    assert!(out.contains("4 labelled questions"), "{out}");
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("adapters/facts/card.json")).unwrap())
            .unwrap();
    assert_eq!(card["collection"], "facts");
    assert_eq!(card["fingerprint"]["passages"], 3);
    assert_eq!(card["data"]["questions"], 4);
    assert_eq!(card["steps"], 2, "4 questions in batches of 2, one epoch");
    assert_eq!(card["shape"]["rank"], 4);
    assert_eq!(card["model_sha256"].as_str().unwrap().len(), 64);
    assert!(
        !root.join("adapters/facts/work").exists(),
        "checkpoints are removed at the end"
    );

    let ask = |extra: &[&str]| {
        let mut args = vec!["ask", "--collection", "facts", "--max-tokens", "8"];
        args.extend_from_slice(extra);
        args.push("What can damage buildings?");
        ttarag(&config, &args)
    };
    let used = ask(&["--domain-adapter", "true"]);
    assert!(used.status.success(), "{}", stderr(&used));

    // Another passage: the adapter no longer matches the collection's content.
    let more = root.join("more.jsonl");
    std::fs::write(
        &more,
        "{\"id\": \"f4\", \"text\": \"Ice floats on water.\"}\n",
    )
    .unwrap();
    let add = ttarag(
        &config,
        &[
            "index",
            "build",
            "--collection",
            "facts",
            "--input",
            more.to_str().unwrap(),
        ],
    );
    assert!(add.status.success(), "{}", stderr(&add));
    let refused = ask(&["--domain-adapter", "true"]);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(err.contains("changed since it was trained"), "{err}");
    let without = ask(&[]);
    assert!(without.status.success(), "{}", stderr(&without));
}

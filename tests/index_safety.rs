//! Collections under crashes and concurrent processes, through the real `ttarag index` binary:
//! a build killed at any moment leaves the old collection or none, and an open `Collections`
//! sees what other processes commit, create and delete.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ttarag::retrieval::{Collections, RetrievalError};

struct Env {
    dir: tempfile::TempDir,
    config: PathBuf,
    root: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("index");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[retrieval]\nindex_dir = {}\npassage_max_chars = 1000\n",
            toml_string(&root)
        ),
    )
    .unwrap();
    Env { dir, config, root }
}

fn toml_string(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap()
}

fn ttarag(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ttarag"));
    c.arg("--config")
        .arg(&env.config)
        .args(args)
        .current_dir(env.dir.path())
        .env_remove("TTARAG_CONFIG")
        .env_remove("TTARAG_INDEX_DIR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn build_args<'a>(name: &'a str, input: &'a Path) -> Vec<&'a str> {
    vec![
        "index",
        "build",
        "--collection",
        name,
        "--input",
        input.to_str().unwrap(),
    ]
}

fn run_ok(env: &Env, args: &[&str]) -> Output {
    let out = ttarag(env, args).output().unwrap();
    assert!(
        out.status.success(),
        "ttarag {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `n` one-passage documents with ids `{prefix}{i}`, ~200 characters of varied words each.
fn write_corpus(path: &Path, prefix: &str, n: usize) {
    const WORDS: &[&str] = &[
        "river", "stone", "energy", "plant", "cell", "magnet", "orbit", "heat", "water", "light",
        "sound", "metal", "cloud", "root", "seed", "wave", "force", "gravity", "carbon", "oxygen",
        "mineral", "fossil", "glacier", "volcano", "desert", "forest", "insect", "mammal",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ prefix.len() as u64;
    let mut body = String::with_capacity(n * 240);
    for i in 0..n {
        let mut text = String::new();
        while text.len() < 200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(WORDS[(x >> 33) as usize % WORDS.len()]);
            let sep = if (x >> 20).is_multiple_of(9) {
                ". "
            } else {
                " "
            };
            text.push_str(sep);
        }
        body.push_str(&serde_json::json!({"id": format!("{prefix}{i}"), "text": text}).to_string());
        body.push('\n');
    }
    std::fs::write(path, body).unwrap();
}

/// The collection's passage count as a fresh process would see it; `None` when absent.
fn count(root: &Path, name: &str) -> Option<u64> {
    let cols = Collections::new(root);
    let found = match cols.get(name) {
        Ok(c) => Some(c.len()),
        Err(RetrievalError::UnknownCollection(_)) => None,
        Err(e) => panic!("collection `{name}` is unreadable: {e}"),
    };
    assert_eq!(
        root.join(name).exists(),
        found.is_some(),
        "a folder named `{name}` that is not a collection"
    );
    let listed: Vec<String> = cols.list().unwrap().into_iter().map(|i| i.name).collect();
    assert!(
        listed.iter().all(|n| !n.starts_with('.')),
        "temporary folders listed: {listed:?}"
    );
    found
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Starts a build, SIGKILLs it after `delay` (a no-op if it finished) and reaps it.
fn build_killed_after(env: &Env, name: &str, input: &Path, delay: Duration) -> bool {
    let mut child = ttarag(env, &build_args(name, input)).spawn().unwrap();
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    child.wait().unwrap();
    !finished
}

const DOCS: usize = 20_000;
const DOCS_U64: u64 = DOCS as u64;

#[test]
fn killed_builds_leave_the_old_collection_or_none() {
    let env = env();
    let corpus = env.dir.path().join("corpus.jsonl");
    write_corpus(&corpus, "d", DOCS);
    let n = DOCS_U64;

    let t = Instant::now();
    run_ok(&env, &build_args("fresh", &corpus));
    let full = t.elapsed();
    assert_eq!(count(&env.root, "fresh"), Some(n));
    run_ok(&env, &["index", "delete", "--collection", "fresh"]);
    assert_eq!(count(&env.root, "fresh"), None);

    // Kills spread over a whole build's time, from process start to after the end.
    let fractions = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.5, 3.0];
    let mut outcomes = vec![];
    for f in fractions {
        let killed = build_killed_after(&env, "fresh", &corpus, full.mul_f64(f));
        let c = count(&env.root, "fresh");
        assert!(
            c.is_none() || c == Some(n),
            "a new collection killed at {f} of its build holds {c:?} of {n} passages"
        );
        outcomes.push((f, killed, c.is_some()));
        if c.is_some() {
            Collections::new(&env.root).delete("fresh").unwrap();
        }
    }
    // One more kill mid-build, so the next build usually finds a killed build's folder.
    build_killed_after(&env, "fresh", &corpus, full.mul_f64(0.5));
    assert!(matches!(count(&env.root, "fresh"), None | Some(DOCS_U64)));
    let leftovers: Vec<String> = entries(&env.root)
        .into_iter()
        .filter(|e| e.starts_with('.'))
        .collect();
    eprintln!(
        "full build {full:?}; (fraction, killed, collection present): {outcomes:?}; \
         left before the next build: {leftovers:?}"
    );
    run_ok(&env, &build_args("fresh", &corpus));
    assert_eq!(count(&env.root, "fresh"), Some(n));
    assert_eq!(
        entries(&env.root),
        vec!["fresh".to_string()],
        "a normal build must remove the killed builds' folders"
    );

    // Re-ingesting more documents into an existing collection: old count or new, never between.
    let more = env.dir.path().join("more.jsonl");
    let mut expected = n;
    let mut outcomes = vec![];
    for (i, f) in [0.1, 0.35, 0.6, 0.85, 1.2, 3.0].into_iter().enumerate() {
        write_corpus(&more, &format!("m{i}-"), DOCS);
        let killed = build_killed_after(&env, "fresh", &more, full.mul_f64(f));
        let c = count(&env.root, "fresh");
        assert!(
            c == Some(expected) || c == Some(expected + n),
            "re-ingest killed at {f}: {c:?} passages, expected {expected} or {}",
            expected + n
        );
        outcomes.push((f, killed, c != Some(expected)));
        expected = c.unwrap();
    }
    eprintln!("re-ingest (fraction, killed, committed): {outcomes:?}");
    write_corpus(&more, "final-", 10);
    run_ok(&env, &build_args("fresh", &more));
    assert_eq!(count(&env.root, "fresh"), Some(expected + 10));
}

#[test]
fn a_bad_line_leaves_no_new_collection_and_the_old_one_unchanged() {
    let env = env();
    let bad = env.dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": 1, \"text\": \"Rocks erode.\"}\n{\"id\": 2, \"text\": \"Ice melts.\"}\n{oops\n",
    )
    .unwrap();
    let out = ttarag(&env, &build_args("b", &bad)).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:3"), "{err}");
    assert_eq!(count(&env.root, "b"), None);
    assert_eq!(entries(&env.root), Vec::<String>::new());

    let good = env.dir.path().join("good.jsonl");
    write_corpus(&good, "g", 5);
    run_ok(&env, &build_args("b", &good));
    let out = ttarag(&env, &build_args("b", &bad)).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(count(&env.root, "b"), Some(5));
}

/// Polls `f` for up to five seconds.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_open_collections_sees_other_processes_changes() {
    let env = env();
    let write = |file: &str, docs: &[(&str, &str)]| {
        let p = env.dir.path().join(file);
        let body: String = docs
            .iter()
            .map(|(id, text)| format!("{}\n", serde_json::json!({"id": id, "text": text})))
            .collect();
        std::fs::write(&p, body).unwrap();
        p
    };
    let first = write(
        "1.jsonl",
        &[
            ("a", "Copper conducts electricity."),
            ("b", "Owls hunt at night."),
        ],
    );
    let second = write("2.jsonl", &[("z", "Zebras have black and white stripes.")]);
    let third = write("3.jsonl", &[("y", "Yaks live in the mountains.")]);

    let server = Collections::new(&env.root);
    assert!(matches!(
        server.get("live"),
        Err(RetrievalError::UnknownCollection(_))
    ));
    // Created by another process after the server looked.
    run_ok(&env, &build_args("live", &first));
    let c = server.get("live").unwrap();
    assert_eq!(c.len(), 2);
    assert!(c.search("zebras stripes", 3).unwrap().is_empty());

    // Committed by another process: seen through the same open collection.
    run_ok(&env, &build_args("live", &second));
    assert!(
        eventually(|| c
            .search("zebras stripes", 3)
            .unwrap()
            .first()
            .is_some_and(|p| p.id == "z")),
        "the open reader never saw another process's commit"
    );
    assert_eq!(c.len(), 3);
    assert!(Arc::ptr_eq(&c, &server.get("live").unwrap()));

    // Deleted, then rebuilt with other content: never the stale copy.
    run_ok(&env, &["index", "delete", "--collection", "live"]);
    assert!(matches!(
        server.get("live"),
        Err(RetrievalError::UnknownCollection(_))
    ));
    run_ok(&env, &build_args("live", &third));
    let c = server.get("live").unwrap();
    assert_eq!(c.len(), 1);
    assert!(c.search("zebras stripes", 3).unwrap().is_empty());
    assert_eq!(c.search("yaks", 3).unwrap()[0].id, "y");
}

#[test]
fn the_cli_refuses_bad_collection_names() {
    let env = env();
    let good = env.dir.path().join("good.jsonl");
    write_corpus(&good, "g", 3);
    for name in ["../x", "a/b", ".tmp", "", ".."] {
        for args in [
            build_args(name, &good),
            vec!["index", "delete", "--collection", name],
        ] {
            let out = ttarag(&env, &args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert!(err.contains("invalid collection name"), "{args:?}: {err}");
        }
    }
    assert!(!env.root.exists() || entries(&env.root).is_empty());
    assert_eq!(
        entries(env.dir.path()),
        vec!["config.toml".to_string(), "good.jsonl".to_string()]
    );
}

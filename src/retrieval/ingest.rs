//! Ingestion: JSONL (`{"id", "text", "title"?}` per line), `.txt` and `.md` files, a file or a
//! folder tree. Re-ingesting the same document id replaces its passages. All or nothing: a bad
//! line aborts before the commit, so a failed run leaves the collection as it was.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Deserialize;
use tantivy::{doc, IndexWriter, Term};

use super::{split_passages, Collection, RetrievalError};

/// What one ingestion did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IngestStats {
    pub files: usize,
    pub documents: usize,
    pub passages: usize,
}

#[derive(Deserialize)]
struct JsonDoc {
    id: serde_json::Value,
    text: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Longest accepted `metadata`, as compact JSON: it is stored with every passage of the
/// document and returned with each retrieved one.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// One document to ingest: its id (re-ingesting an id replaces its passages), title, text and
/// optional metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub id: String,
    pub title: String,
    pub text: String,
    /// A JSON object as compact text, returned with each of the document's passages.
    pub metadata: Option<String>,
}

impl Document {
    /// A document from one JSON object `{"id", "text", "title"?, "metadata"?}`; the id a
    /// non-empty string or a number, the metadata an object. Other keys are ignored, as in
    /// JSONL files.
    pub fn from_json(v: serde_json::Value) -> Result<Self, String> {
        let d: JsonDoc = serde_json::from_value(v).map_err(|e| e.to_string())?;
        let id = match &d.id {
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            serde_json::Value::Number(x) => x.to_string(),
            _ => return Err("`id` must be a non-empty string or a number".into()),
        };
        let metadata = match d.metadata {
            None | Some(serde_json::Value::Null) => None,
            Some(m @ serde_json::Value::Object(_)) => {
                let text = m.to_string();
                if text.len() > MAX_METADATA_BYTES {
                    return Err(format!(
                        "`metadata` is {} bytes as JSON, over {MAX_METADATA_BYTES}",
                        text.len()
                    ));
                }
                Some(text)
            }
            Some(_) => return Err("`metadata` must be a JSON object".into()),
        };
        Ok(Self {
            id,
            title: d.title.unwrap_or_default(),
            text: d.text,
            metadata,
        })
    }
}

fn io_err(p: &Path, e: std::io::Error) -> RetrievalError {
    RetrievalError::Io(p.display().to_string(), e)
}

fn input_files(path: &Path) -> Result<Vec<PathBuf>, RetrievalError> {
    if !path.exists() {
        return Err(RetrievalError::BadInput(format!(
            "{}: no such file or folder",
            path.display()
        )));
    }
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("jsonl" | "txt" | "md")
            )
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(RetrievalError::BadInput(format!(
            "{}: no .jsonl, .txt or .md files",
            path.display()
        )));
    }
    Ok(files)
}

/// Documents added under one index writer, committed together by [`IngestBatch::finish`]: one
/// ingest request or file set is one commit.
struct IngestBatch<'a> {
    coll: &'a Collection,
    writer: IndexWriter,
    max_chars: usize,
    stats: IngestStats,
}

impl IngestBatch<'_> {
    fn add(
        &mut self,
        doc_id: &str,
        title: &str,
        text: &str,
        metadata: Option<&str>,
    ) -> Result<(), RetrievalError> {
        let f = self.coll.fields;
        let metadata = match (metadata, f.metadata) {
            (None, _) => None,
            (Some(m), Some(field)) => Some((field, m)),
            (Some(_), None) => {
                return Err(RetrievalError::BadInput(format!(
                    "document `{doc_id}` has metadata, but this collection was built before \
                     documents could carry it: rebuild it (`ttarag index build`) to store metadata"
                )))
            }
        };
        self.writer
            .delete_term(Term::from_field_text(f.doc, doc_id));
        let parts = split_passages(text, self.max_chars);
        let single = parts.len() == 1;
        for (i, p) in parts.iter().enumerate() {
            let id = if single {
                doc_id.to_string()
            } else {
                format!("{doc_id}#{i}")
            };
            let mut d = doc!(
                f.id => id, f.doc => doc_id, f.title => title, f.text => p.as_str()
            );
            if let Some((field, m)) = metadata {
                d.add_text(field, m);
            }
            self.writer.add_document(d)?;
        }
        self.stats.documents += 1;
        self.stats.passages += parts.len();
        Ok(())
    }

    /// Commits everything added, as one commit, and has the collection's reader see it.
    fn finish(self) -> Result<IngestStats, RetrievalError> {
        let mut writer = self.writer;
        writer.commit()?;
        writer.wait_merging_threads()?;
        self.coll.reload()?;
        Ok(self.stats)
    }
}

/// Ingests a file or folder into `coll`, splitting documents into passages of at most
/// `max_chars` characters.
pub fn ingest_path(
    coll: &Collection,
    path: &Path,
    max_chars: usize,
    progress: Option<&ProgressBar>,
) -> Result<IngestStats, RetrievalError> {
    let files = input_files(path)?;
    let total: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    if let Some(pb) = progress {
        pb.set_position(0);
        pb.set_length(total);
    }
    let writer = coll.index.writer(50_000_000)?;
    let mut batch = IngestBatch {
        coll,
        writer,
        max_chars,
        stats: IngestStats::default(),
    };
    for file in &files {
        let ext = file.extension().and_then(|x| x.to_str()).unwrap_or("");
        if ext == "jsonl" {
            ingest_jsonl(&mut batch, file, progress)?;
        } else {
            let text = std::fs::read_to_string(file).map_err(|e| io_err(file, e))?;
            let rel = file.strip_prefix(path).unwrap_or(file);
            let rel = if rel.as_os_str().is_empty() {
                file.file_name().map(Path::new).unwrap_or(file)
            } else {
                rel
            };
            let title = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            batch.add(&rel.to_string_lossy(), title, &text, None)?;
            if let Some(pb) = progress {
                pb.inc(text.len() as u64);
            }
        }
        batch.stats.files += 1;
    }
    batch.finish()
}

fn ingest_jsonl(
    batch: &mut IngestBatch,
    file: &Path,
    progress: Option<&ProgressBar>,
) -> Result<(), RetrievalError> {
    let f = std::fs::File::open(file).map_err(|e| io_err(file, e))?;
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| io_err(file, e))?;
        if let Some(pb) = progress {
            pb.inc(line.len() as u64 + 1);
        }
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |why: String| RetrievalError::BadInput(format!("{}:{}: {why}", file.display(), n + 1));
        let v = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let d = Document::from_json(v).map_err(bad)?;
        batch.add(&d.id, &d.title, &d.text, d.metadata.as_deref())?;
    }
    Ok(())
}

/// Ingests `docs` into `coll` in one commit (all or none), splitting each into passages of at
/// most `max_chars` characters.
pub fn ingest_documents(
    coll: &Collection,
    docs: &[Document],
    max_chars: usize,
) -> Result<IngestStats, RetrievalError> {
    let mut batch = IngestBatch {
        coll,
        writer: coll.index.writer(50_000_000)?,
        max_chars,
        stats: IngestStats::default(),
    };
    for d in docs {
        batch.add(&d.id, &d.title, &d.text, d.metadata.as_deref())?;
    }
    batch.finish()
}

/// Deletes document `id`'s passages from `coll` in one commit; `false` when it has none.
pub fn delete_document(coll: &Collection, id: &str) -> Result<bool, RetrievalError> {
    let f = coll.fields;
    let term = Term::from_field_text(f.doc, id);
    let query =
        tantivy::query::TermQuery::new(term.clone(), tantivy::schema::IndexRecordOption::Basic);
    if coll.searcher().search(&query, &tantivy::collector::Count)? == 0 {
        return Ok(false);
    }
    let mut writer: IndexWriter = coll.index.writer(15_000_000)?;
    writer.delete_term(term);
    writer.commit()?;
    writer.wait_merging_threads()?;
    coll.reload()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::super::Collections;
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn ingest_is_idempotent_and_search_is_lenient() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = Collections::new(tmp.path().join("index"));
        let input = write(
            tmp.path(),
            "a.jsonl",
            "{\"id\": \"f1\", \"text\": \"Earthquakes can damage buildings.\"}\n\n\
             {\"id\": 2, \"text\": \"Plants need sunlight to grow.\", \"title\": \"Botany\"}\n",
        );
        let c = cols.get_or_create("sci").unwrap();
        let s = ingest_path(&c, &input, 500, None).unwrap();
        assert_eq!((s.documents, s.passages), (2, 2));
        ingest_path(&c, &input, 500, None).unwrap();
        assert_eq!(c.len(), 2, "re-ingesting must replace, not duplicate");

        let hits = c.search("What can damage buildings?", 3).unwrap();
        assert_eq!(hits[0].id, "f1");
        assert!(hits[0].score > 0.0);
        for q in [
            "\"unbalanced",
            "title:(",
            "a:b:c] ^ ~ * AND OR",
            "((",
            "-",
            "\\",
            // `field:*` asks whether a field exists: an unknown field must not fail the search.
            "\u{b}:*",
            "note:*",
            "What is stated under heading:* here?",
        ] {
            c.search(q, 3)
                .unwrap_or_else(|e| panic!("query {q:?} failed: {e}"));
        }
        assert_eq!(
            c.search("sunlight", 3).unwrap()[0].title.as_deref(),
            Some("Botany")
        );
        assert_eq!(cols.list().unwrap()[0].passages, 2);
    }

    #[test]
    fn metadata_comes_back_with_every_passage_of_its_document() {
        use serde_json::json;
        let tmp = tempfile::tempdir().unwrap();
        let cols = Collections::new(tmp.path().join("index"));
        let c = cols.get_or_create("meta").unwrap();
        let meta = json!({"source": "pubmed", "year": 2019, "tags": ["a", "b"]});
        let long = "Earthquakes damage old buildings. ".repeat(6);
        let docs = [
            json!({"id": "d1", "text": long, "metadata": meta}),
            json!({"id": "d2", "text": "Earthquakes shake the ground.", "metadata": null}),
        ]
        .map(|v| Document::from_json(v).unwrap());
        let s = ingest_documents(&c, &docs, 80).unwrap();
        assert!(s.passages > 2, "d1 is cut into several passages");
        let hits = c.search("earthquakes", 10).unwrap();
        assert_eq!(hits.len(), s.passages);
        for h in &hits {
            match h.document.as_deref() {
                Some("d1") => assert_eq!(h.metadata.as_ref(), Some(&meta), "{}", h.id),
                _ => assert_eq!(h.metadata, None, "{}", h.id),
            }
        }
        for (v, want) in [
            (
                json!({"id": 1, "text": "t", "metadata": [1]}),
                "must be a JSON object",
            ),
            (
                json!({"id": 1, "text": "t", "metadata": "x"}),
                "must be a JSON object",
            ),
            (
                json!({"id": 1, "text": "t", "metadata": {"k": "x".repeat(MAX_METADATA_BYTES)}}),
                "over 16384",
            ),
        ] {
            let e = Document::from_json(v).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_collection_built_before_metadata_serves_and_refuses_only_metadata() {
        use tantivy::schema::{Schema, STORED, STRING, TEXT};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        // The schema collections had before documents carried metadata.
        let mut b = Schema::builder();
        b.add_text_field("id", STRING | STORED);
        b.add_text_field("doc", STRING | STORED);
        b.add_text_field("title", TEXT | STORED);
        b.add_text_field("text", TEXT | STORED);
        let dir = root.join("old");
        std::fs::create_dir_all(&dir).unwrap();
        tantivy::Index::create_in_dir(&dir, b.build()).unwrap();
        let c = Collections::new(&root).get("old").unwrap();
        let plain = Document::from_json(serde_json::json!({"id": "a", "text": "Rivers carve."}));
        ingest_documents(&c, &[plain.unwrap()], 500).unwrap();
        let hit = &c.search("rivers", 1).unwrap()[0];
        assert_eq!((hit.id.as_str(), hit.metadata.as_ref()), ("a", None));
        let with = Document::from_json(
            serde_json::json!({"id": "b", "text": "Rocks erode.", "metadata": {"k": 1}}),
        );
        let e = ingest_documents(&c, &[with.unwrap()], 500).unwrap_err();
        assert!(e.to_string().contains("rebuild it"), "{e}");
        assert_eq!(c.len(), 1, "nothing of the refused batch was written");
    }

    #[test]
    fn text_and_markdown_folders_and_bad_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let docs = tmp.path().join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        write(&docs, "one.txt", &"Cells divide by mitosis. ".repeat(20));
        write(
            &docs.join("sub"),
            "two.md",
            "# Heat\nHeat flows from hot to cold.",
        );
        write(&docs, "skip.bin", "ignored");
        let cols = Collections::new(tmp.path().join("index"));
        let c = cols.get_or_create("docs").unwrap();
        let s = ingest_path(&c, &docs, 100, None).unwrap();
        assert_eq!(s.files, 2);
        assert!(s.passages > 2, "long text must split: {s:?}");
        let hit = &c.search("heat flows", 1).unwrap()[0];
        assert_eq!(hit.id, "sub/two.md");

        let bad = write(
            tmp.path(),
            "bad.jsonl",
            "{\"id\": \"x\", \"text\": \"fine\"}\nnot json\n",
        );
        let before = c.len();
        let err = ingest_path(&c, &bad, 100, None).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        c.reader.reload().unwrap();
        assert_eq!(
            c.len(),
            before,
            "a failed ingest must not change the collection"
        );
    }

    #[test]
    fn names_are_validated_and_unknown_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = Collections::new(tmp.path());
        assert!(cols.get_or_create("../etc").is_err());
        let err = cols.get("nope").err().unwrap().to_string();
        assert!(err.contains("nope"), "{err}");
        cols.get_or_create("x").unwrap();
        assert!(cols.exists("x"));
        cols.delete("x").unwrap();
        assert!(!cols.exists("x"));
    }
}

//! The retrieval stage: named tantivy (BM25) collections under one folder, ingestion of
//! JSONL / text / Markdown files, and lenient search over raw questions.

mod ingest;
mod passages;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{Field, Schema, Value, STORED, STRING, TEXT};
use tantivy::{Index, IndexReader, ReloadPolicy, TantivyDocument};

pub use ingest::{ingest_path, IngestStats};
pub use passages::split_passages;

/// Errors of the retrieval stage.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    #[error("unknown collection `{0}`")]
    UnknownCollection(String),
    #[error("invalid collection name `{0}`: use 1-64 letters, digits, `-` or `_`")]
    BadName(String),
    #[error("{0}")]
    BadInput(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("index: {0}")]
    Index(#[from] tantivy::TantivyError),
}

/// One retrieved passage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Passage {
    pub id: String,
    pub score: f32,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    doc: Field,
    title: Field,
    text: Field,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_text_field("id", STRING | STORED);
    let doc = b.add_text_field("doc", STRING | STORED);
    let title = b.add_text_field("title", TEXT | STORED);
    let text = b.add_text_field("text", TEXT | STORED);
    (
        b.build(),
        Fields {
            id,
            doc,
            title,
            text,
        },
    )
}

/// One open collection: a tantivy index and a reader shared by all searches.
pub struct Collection {
    index: Index,
    reader: IndexReader,
    fields: Fields,
}

impl Collection {
    fn open_or_create(dir: &Path) -> Result<Self, RetrievalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| RetrievalError::Io(dir.display().to_string(), e))?;
        let (schema, fields) = schema();
        let mmap = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| RetrievalError::BadInput(format!("{}: {e}", dir.display())))?;
        let index = Index::open_or_create(mmap, schema)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Self {
            index,
            reader,
            fields,
        })
    }

    /// Number of passages.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// BM25 top-`k` for a raw question. Any text is accepted: syntax the query language would
    /// reject (quotes, colons, brackets) is read leniently instead of failing.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>, RetrievalError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(vec![]);
        }
        let parser = QueryParser::for_index(&self.index, vec![self.fields.title, self.fields.text]);
        let (q, _ignored) = parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let hits = searcher.search(&q, &TopDocs::with_limit(k).order_by_score())?;
        let get = |d: &TantivyDocument, f: Field| {
            d.get_first(f).and_then(|v| v.as_str()).map(String::from)
        };
        hits.into_iter()
            .map(|(score, addr)| {
                let d: TantivyDocument = searcher.doc(addr)?;
                Ok(Passage {
                    id: get(&d, self.fields.id).unwrap_or_default(),
                    score,
                    text: get(&d, self.fields.text).unwrap_or_default(),
                    title: get(&d, self.fields.title).filter(|t| !t.is_empty()),
                })
            })
            .collect()
    }
}

/// Summary of a collection for listings.
#[derive(Debug, Clone, Serialize)]
pub struct CollectionInfo {
    pub name: String,
    pub passages: u64,
}

/// All collections under one root folder, opened lazily and kept open.
pub struct Collections {
    root: PathBuf,
    open: RwLock<HashMap<String, Arc<Collection>>>,
}

/// Collection names become folder names: keep them to a safe alphabet.
pub fn validate_name(name: &str) -> Result<(), RetrievalError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(RetrievalError::BadName(name.to_string()))
    }
}

impl Collections {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            open: RwLock::new(HashMap::new()),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn exists(&self, name: &str) -> bool {
        validate_name(name).is_ok() && self.dir(name).join("meta.json").exists()
    }

    /// Opens an existing collection.
    pub fn get(&self, name: &str) -> Result<Arc<Collection>, RetrievalError> {
        validate_name(name)?;
        if let Some(c) = self.open.read().expect("lock").get(name) {
            return Ok(c.clone());
        }
        if !self.exists(name) {
            return Err(RetrievalError::UnknownCollection(name.to_string()));
        }
        let c = Arc::new(Collection::open_or_create(&self.dir(name))?);
        self.open
            .write()
            .expect("lock")
            .insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Opens a collection, creating it empty when missing.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Collection>, RetrievalError> {
        validate_name(name)?;
        if self.exists(name) {
            return self.get(name);
        }
        let c = Arc::new(Collection::open_or_create(&self.dir(name))?);
        self.open
            .write()
            .expect("lock")
            .insert(name.to_string(), c.clone());
        Ok(c)
    }

    pub fn list(&self) -> Result<Vec<CollectionInfo>, RetrievalError> {
        let mut names: Vec<String> = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| self.exists(n))
                .collect(),
            Err(_) => vec![],
        };
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let passages = self.get(&name)?.len();
                Ok(CollectionInfo { name, passages })
            })
            .collect()
    }

    pub fn delete(&self, name: &str) -> Result<(), RetrievalError> {
        validate_name(name)?;
        if !self.exists(name) {
            return Err(RetrievalError::UnknownCollection(name.to_string()));
        }
        self.open.write().expect("lock").remove(name);
        let dir = self.dir(name);
        std::fs::remove_dir_all(&dir).map_err(|e| RetrievalError::Io(dir.display().to_string(), e))
    }
}

//! The retrieval stage: named tantivy (BM25) collections under one folder, ingestion of
//! JSONL / text / Markdown files, and lenient search over raw questions.
//!
//! A new collection is built in a temporary folder under the root (a `.tmp.` name, never a
//! valid collection name) and renamed into place once committed, so a crash leaves either no
//! collection or a complete one. Updating an existing collection happens in place: tantivy's
//! commit swaps `meta.json` atomically. Readers check `meta.json` before each search, so a
//! running server sees commits made by other processes.

mod fingerprint;
mod ingest;
mod passages;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::file_stamp::FileStamp;
use indicatif::ProgressBar;
use serde::Serialize;
use tantivy::collector::TopDocs;
use tantivy::query::QueryParser;
use tantivy::schema::{Field, Schema, Value, STORED, STRING, TEXT};
use tantivy::{Index, IndexReader, IndexSettings, ReloadPolicy, Searcher, TantivyDocument};

pub use fingerprint::Fingerprint;
pub use ingest::{delete_document, ingest_documents, ingest_path, Document, IngestStats};
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

fn io_err(p: &Path, e: std::io::Error) -> RetrievalError {
    RetrievalError::Io(p.display().to_string(), e)
}

/// One retrieved passage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Passage {
    pub id: String,
    pub score: f32,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The id of the document it was cut from (as ingested), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// The document's `metadata` object, as ingested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    doc: Field,
    title: Field,
    text: Field,
    /// The document's metadata as JSON text, stored only. `None` in a collection built before
    /// the field existed: it still serves, and refuses documents that carry metadata.
    metadata: Option<Field>,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let id = b.add_text_field("id", STRING | STORED);
    let doc = b.add_text_field("doc", STRING | STORED);
    let title = b.add_text_field("title", TEXT | STORED);
    let text = b.add_text_field("text", TEXT | STORED);
    let metadata = Some(b.add_text_field("metadata", STORED));
    (
        b.build(),
        Fields {
            id,
            doc,
            title,
            text,
            metadata,
        },
    )
}

const META: &str = "meta.json";

/// A collection folder's identity: a folder deleted and rebuilt under the same name is a
/// different folder (the birth time guards against a reused inode number).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct DirId {
    dev: u64,
    ino: u64,
    born: Option<SystemTime>,
}

fn dir_id(dir: &Path) -> Option<DirId> {
    let m = std::fs::metadata(dir).ok().filter(|m| m.is_dir())?;
    Some(DirId {
        dev: m.dev(),
        ino: m.ino(),
        born: m.created().ok(),
    })
}

/// One open collection: a tantivy index and a reader shared by all searches.
pub struct Collection {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    meta: PathBuf,
    /// Which `meta.json` the reader last loaded: tantivy replaces it on every commit.
    seen: Mutex<Option<FileStamp>>,
    fingerprint: fingerprint::Cached,
}

impl Collection {
    fn with_index(
        dir: &Path,
        index: Index,
        seen: Option<FileStamp>,
    ) -> Result<Self, RetrievalError> {
        let (_, mut fields) = schema();
        fields.metadata = index.schema().get_field("metadata").ok();
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Self {
            index,
            reader,
            fields,
            meta: dir.join(META),
            seen: Mutex::new(seen),
            fingerprint: Default::default(),
        })
    }

    fn mmap(dir: &Path) -> Result<tantivy::directory::MmapDirectory, RetrievalError> {
        tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| RetrievalError::BadInput(format!("{}: {e}", dir.display())))
    }

    /// Opens the committed index in `dir`.
    fn open(dir: &Path) -> Result<Self, RetrievalError> {
        // Stamped before the reader loads, so a commit landing in between is reloaded later.
        let seen = FileStamp::of(&dir.join(META));
        let index = Index::open(Self::mmap(dir)?)?;
        Self::with_index(dir, index, seen)
    }

    /// Creates an empty index in the existing, empty folder `dir`.
    fn create(dir: &Path) -> Result<Self, RetrievalError> {
        let index = Index::create(Self::mmap(dir)?, schema().0, IndexSettings::default())?;
        Self::with_index(dir, index, FileStamp::of(&dir.join(META)))
    }

    /// Reloads the reader now.
    fn reload(&self) -> Result<(), RetrievalError> {
        let stamp = FileStamp::of(&self.meta);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.reader.reload()?;
        *seen = stamp;
        Ok(())
    }

    /// The searcher over the latest commit, whichever process made it.
    fn searcher(&self) -> Searcher {
        let now = FileStamp::of(&self.meta);
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_some() && now != *seen {
            // Recorded even on failure, so a broken commit is reported once, not per search;
            // the previous commit keeps serving meanwhile.
            *seen = now;
            if let Err(e) = self.reader.reload() {
                tracing::warn!(index = %self.meta.display(), "reloading after a commit: {e}");
            }
        }
        self.reader.searcher()
    }

    /// Number of passages.
    pub fn len(&self) -> u64 {
        self.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct documents (ingested ids) of the latest commit.
    pub fn documents(&self) -> Result<u64, RetrievalError> {
        let s = self.searcher();
        let mut ids = std::collections::HashSet::new();
        for (ord, reader) in s.segment_readers().iter().enumerate() {
            for doc in reader.doc_ids_alive() {
                let d: TantivyDocument = s.doc(tantivy::DocAddress::new(ord as u32, doc))?;
                if let Some(id) = d.get_first(self.fields.doc).and_then(|v| v.as_str()) {
                    ids.insert(id.to_string());
                }
            }
        }
        Ok(ids.len() as u64)
    }

    /// Every passage, in id order (score 0): what offline training reads of a collection.
    pub fn passages(&self) -> Result<Vec<Passage>, RetrievalError> {
        let rows = fingerprint::read_all(&self.searcher(), self.fields)?;
        Ok(rows
            .into_iter()
            .map(|(id, title, text)| Passage {
                id,
                score: 0.0,
                text,
                title: Some(title).filter(|t| !t.is_empty()),
                document: None,
                metadata: None,
            })
            .collect())
    }

    /// The content identity of the latest commit (see [`Fingerprint`]); cached per commit.
    pub fn fingerprint(&self) -> Result<Fingerprint, RetrievalError> {
        self.fingerprint.get(&self.searcher(), self.fields)
    }

    /// BM25 top-`k` for a raw question. Any text is accepted: syntax the query language would
    /// reject (quotes, colons, brackets) is read leniently instead of failing.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Passage>, RetrievalError> {
        if k == 0 || query.trim().is_empty() {
            return Ok(vec![]);
        }
        let parser = QueryParser::for_index(&self.index, vec![self.fields.title, self.fields.text]);
        let searcher = self.searcher();
        let top = TopDocs::with_limit(k).order_by_score();
        let (q, _ignored) = parser.parse_query_lenient(query);
        let hits = match searcher.search(&q, &top) {
            // The lenient parser still reads `word:*` as "has field `word`", which fails at
            // search time when no such field exists: such a question is read as plain words.
            // Only failing queries are rewritten, so every other keeps its ranking.
            Err(tantivy::TantivyError::FieldNotFound(_)) => {
                let (q, _ignored) = parser.parse_query_lenient(&query.replace(':', " "));
                searcher.search(&q, &top)?
            }
            r => r?,
        };
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
                    document: get(&d, self.fields.doc),
                    metadata: self
                        .fields
                        .metadata
                        .and_then(|f| get(&d, f))
                        .and_then(|m| serde_json::from_str(&m).ok()),
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

/// What the collections API lists of one collection.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CollectionStats {
    pub name: String,
    pub documents: u64,
    pub passages: u64,
    /// Bytes of its folder.
    pub size_bytes: u64,
    /// When its latest commit landed (Unix seconds).
    pub last_commit: Option<u64>,
}

struct OpenEntry {
    id: DirId,
    coll: Arc<Collection>,
}

/// All collections under one root folder, opened lazily and kept open while their folder is
/// the same one.
pub struct Collections {
    root: PathBuf,
    open: RwLock<HashMap<String, OpenEntry>>,
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

/// Temporary folders (builds in progress, deletions) are `.tmp.<name>.<pid>.<n>`: the leading
/// dot keeps them out of the collection namespace.
const TMP_PREFIX: &str = ".tmp.";
/// Held (flock) by a build for its whole life, so a build is known to be alive even where its
/// pid is not visible (another pid namespace sharing the folder).
const BUILD_LOCK: &str = ".ttarag-build.lock";

fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn tmp_pid(file_name: &str) -> Option<i32> {
    let rest = file_name.strip_prefix(TMP_PREFIX)?;
    let mut parts = rest.rsplitn(3, '.');
    let _n = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

/// A fresh temporary path under the root for `name`; the counter keeps this process's paths
/// apart, the pid other processes'.
fn tmp_path(root: &Path, name: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    root.join(format!("{TMP_PREFIX}{name}.{}.{n}", std::process::id()))
}

/// A build's temporary folder, holding the build lock; removed when dropped unless it was
/// renamed into place.
struct TmpBuild {
    path: PathBuf,
    _lock: File,
    keep: bool,
}

impl TmpBuild {
    fn new(root: &Path, name: &str) -> Result<Self, RetrievalError> {
        loop {
            let path = tmp_path(root, name);
            match std::fs::create_dir(&path) {
                Ok(()) => {}
                // Left by a dead process that had our pid.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path, e)),
            }
            let lock_path = path.join(BUILD_LOCK);
            let lock = File::create(&lock_path).and_then(|f| f.lock().map(|()| f));
            return match lock {
                Ok(f) => Ok(TmpBuild {
                    path,
                    _lock: f,
                    keep: false,
                }),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&path);
                    Err(io_err(&lock_path, e))
                }
            };
        }
    }
}

impl Drop for TmpBuild {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), RetrievalError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(dir, e))
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

    fn forget(&self, name: &str) {
        self.open
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    pub fn exists(&self, name: &str) -> bool {
        validate_name(name).is_ok() && self.dir(name).join(META).is_file()
    }

    /// Opens an existing collection. A collection whose folder was replaced since it was opened
    /// (deleted and rebuilt, maybe by another process) is opened again.
    pub fn get(&self, name: &str) -> Result<Arc<Collection>, RetrievalError> {
        validate_name(name)?;
        let dir = self.dir(name);
        // Identity first, open second: a swap in between only costs one more reopen.
        let id = match dir_id(&dir) {
            Some(id) if self.exists(name) => id,
            _ => {
                self.forget(name);
                return Err(RetrievalError::UnknownCollection(name.to_string()));
            }
        };
        if let Some(e) = self
            .open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .filter(|e| e.id == id)
        {
            return Ok(e.coll.clone());
        }
        let coll = Arc::new(Collection::open(&dir)?);
        self.open.write().unwrap_or_else(|e| e.into_inner()).insert(
            name.to_string(),
            OpenEntry {
                id,
                coll: coll.clone(),
            },
        );
        Ok(coll)
    }

    /// Opens a collection, creating it empty when missing.
    pub fn get_or_create(&self, name: &str) -> Result<Arc<Collection>, RetrievalError> {
        validate_name(name)?;
        if !self.exists(name) {
            self.remove_stale_tmp();
            self.create_new(name, |_| Ok(()))?;
        }
        self.get(name)
    }

    /// Ingests a file or folder into collection `name`, creating it when missing (see
    /// [`ingest_path`] for the formats). A new collection appears only once complete; an
    /// existing one changes in one commit. Either way a failed or killed run leaves the
    /// collection as it was.
    pub fn ingest(
        &self,
        name: &str,
        path: &Path,
        max_chars: usize,
        progress: Option<&ProgressBar>,
    ) -> Result<IngestStats, RetrievalError> {
        validate_name(name)?;
        self.remove_stale_tmp();
        if !self.exists(name) {
            if let Some(stats) =
                self.create_new(name, |c| ingest_path(c, path, max_chars, progress))?
            {
                return Ok(stats);
            }
        }
        ingest_path(&*self.get(name)?, path, max_chars, progress)
    }

    /// Builds a collection with `fill` in a temporary folder and renames it into place. `None`
    /// when another process created `name` meanwhile (the build is discarded).
    fn create_new<T>(
        &self,
        name: &str,
        fill: impl FnOnce(&Collection) -> Result<T, RetrievalError>,
    ) -> Result<Option<T>, RetrievalError> {
        std::fs::create_dir_all(&self.root).map_err(|e| io_err(&self.root, e))?;
        let mut tmp = TmpBuild::new(&self.root, name)?;
        let out = {
            let c = Collection::create(&tmp.path)?;
            fill(&c)?
        };
        sync_dir(&tmp.path)?;
        let dest = self.dir(name);
        if let Err(e) = std::fs::rename(&tmp.path, &dest) {
            if self.exists(name) {
                return Ok(None);
            }
            if dest.exists() {
                return Err(RetrievalError::BadInput(format!(
                    "{} exists but holds no collection (no {META}); remove it",
                    dest.display()
                )));
            }
            return Err(io_err(&dest, e));
        }
        tmp.keep = true;
        let _ = std::fs::remove_file(dest.join(BUILD_LOCK));
        sync_dir(&self.root)?;
        self.forget(name);
        Ok(Some(out))
    }

    /// Removes temporary folders left by killed builds and deletions: those whose process is
    /// gone and whose build lock nobody holds. Others may belong to a running build.
    fn remove_stale_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let Some(pid) = e.file_name().to_str().and_then(tmp_pid) else {
                continue;
            };
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if pid_alive(pid) {
                continue;
            }
            let path = e.path();
            let lock = File::open(path.join(BUILD_LOCK)).ok();
            if lock.as_ref().is_some_and(|f| f.try_lock().is_err()) {
                continue;
            }
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed a leftover temporary folder")
                }
                // Another process's clean-up got there first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(dir = %path.display(), "removing a leftover temporary folder: {e}")
                }
            }
        }
    }

    /// Ingests `docs` into collection `name` in one commit, creating it when missing (a new
    /// collection appears only once complete). Returns what was ingested and whether the
    /// collection was created.
    pub fn ingest_documents(
        &self,
        name: &str,
        docs: &[Document],
        max_chars: usize,
    ) -> Result<(IngestStats, bool), RetrievalError> {
        validate_name(name)?;
        self.remove_stale_tmp();
        if !self.exists(name) {
            if let Some(stats) = self.create_new(name, |c| ingest_documents(c, docs, max_chars))? {
                return Ok((stats, true));
            }
        }
        Ok((ingest_documents(&*self.get(name)?, docs, max_chars)?, false))
    }

    /// Deletes document `id` of collection `name`; `false` when it has no such document.
    pub fn delete_document(&self, name: &str, id: &str) -> Result<bool, RetrievalError> {
        delete_document(&*self.get(name)?, id)
    }

    /// [`CollectionStats`] of every collection, by name.
    pub fn stats(&self) -> Result<Vec<CollectionStats>, RetrievalError> {
        self.list()?
            .into_iter()
            .map(|info| {
                let c = self.get(&info.name)?;
                let dir = self.dir(&info.name);
                let size_bytes = walkdir::WalkDir::new(&dir)
                    .into_iter()
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum();
                let last_commit = std::fs::metadata(dir.join(META))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                Ok(CollectionStats {
                    documents: c.documents()?,
                    passages: c.len(),
                    name: info.name,
                    size_bytes,
                    last_commit,
                })
            })
            .collect()
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

    /// Copies collection `name`'s latest commit into `out`/`name` (which must not exist): a
    /// read-only snapshot to ship to replicas, whose `retrieval.index_dir` can be `out` as is.
    /// It holds the collection's writer lock while it copies, so no commit or merge removes a
    /// file under it (a write under way elsewhere makes it fail at once, to be retried), and
    /// it writes the copy in a temporary folder renamed into place, so a failed one leaves none.
    /// Returns the bytes copied.
    pub fn snapshot(&self, name: &str, out: &Path) -> Result<u64, RetrievalError> {
        let coll = self.get(name)?;
        let dest = out.join(name);
        if dest.exists() {
            return Err(RetrievalError::BadInput(format!(
                "{} exists: snapshot into a new folder",
                dest.display()
            )));
        }
        let _lock: tantivy::IndexWriter = coll.index.writer(15_000_000)?;
        let metas = coll.index.load_metas()?;
        let src = self.dir(name);
        std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        let tmp = out.join(format!(".{name}.snapshot.{}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        // The commit's files: meta.json and every component of its segments (named by the
        // segment's id), nothing of segments a merge left behind.
        let ids: Vec<String> = metas
            .segments
            .iter()
            .map(|s| s.id().uuid_string())
            .collect();
        let mut bytes = 0;
        for e in std::fs::read_dir(&src).map_err(|e| io_err(&src, e))? {
            let e = e.map_err(|e| io_err(&src, e))?;
            let f = e.file_name().to_string_lossy().to_string();
            if f == META || ids.iter().any(|id| f.starts_with(id.as_str())) {
                let from = e.path();
                bytes += std::fs::copy(&from, tmp.join(&f)).map_err(|e| io_err(&from, e))?;
            }
        }
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dest).map_err(|e| io_err(&dest, e))?;
        sync_dir(out)?;
        Ok(bytes)
    }

    /// Deletes a collection: renamed out of the namespace first, so a crash while removing its
    /// files leaves no half collection, only a temporary folder that the next build removes.
    pub fn delete(&self, name: &str) -> Result<(), RetrievalError> {
        validate_name(name)?;
        if !self.exists(name) {
            return Err(RetrievalError::UnknownCollection(name.to_string()));
        }
        self.forget(name);
        let dir = self.dir(name);
        let trash = loop {
            let p = tmp_path(&self.root, name);
            if !p.exists() {
                break p;
            }
        };
        std::fs::rename(&dir, &trash).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RetrievalError::UnknownCollection(name.to_string()),
            _ => io_err(&dir, e),
        })?;
        sync_dir(&self.root)?;
        std::fs::remove_dir_all(&trash).map_err(|e| io_err(&trash, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(dir: &Path, file: &str, docs: &[(&str, &str)]) -> PathBuf {
        let p = dir.join(file);
        let body: String = docs
            .iter()
            .map(|(id, text)| format!("{}\n", serde_json::json!({"id": id, "text": text})))
            .collect();
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn a_snapshot_serves_the_commit_it_was_taken_of_and_nothing_later() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = Collections::new(tmp.path().join("index"));
        let a = corpus(
            tmp.path(),
            "a.jsonl",
            &[("1", "Basalt is volcanic rock."), ("2", "Granite is hard.")],
        );
        cols.ingest("rocks", &a, 500, None).unwrap();
        // Replace one document, so the index has deletes and more than one segment.
        let b = corpus(
            tmp.path(),
            "b.jsonl",
            &[("2", "Granite cools slowly underground.")],
        );
        cols.ingest("rocks", &b, 500, None).unwrap();
        let out = tmp.path().join("snap");
        assert!(cols.snapshot("rocks", &out).unwrap() > 0);
        let shipped = Collections::new(&out);
        let ids = |c: &Collections, q: &str| -> Vec<String> {
            c.get("rocks")
                .unwrap()
                .search(q, 5)
                .unwrap()
                .into_iter()
                .map(|p| p.id)
                .collect()
        };
        assert_eq!(shipped.get("rocks").unwrap().len(), 2);
        assert_eq!(
            ids(&shipped, "granite underground"),
            ids(&cols, "granite underground")
        );
        assert_eq!(
            ids(&shipped, "hard"),
            Vec::<String>::new(),
            "the replaced text is gone"
        );
        // Later commits stay out of it.
        let c = corpus(tmp.path(), "c.jsonl", &[("3", "Marble is metamorphic.")]);
        cols.ingest("rocks", &c, 500, None).unwrap();
        assert_eq!(ids(&shipped, "marble"), Vec::<String>::new());
        assert_eq!(
            entries(&out),
            vec!["rocks".to_string()],
            "no temporary folder is left"
        );
        // It never overwrites, and it does not copy under another writer.
        assert!(cols.snapshot("rocks", &out).is_err());
        let busy = cols.get("rocks").unwrap();
        let _writer: tantivy::IndexWriter = busy.index.writer(15_000_000).unwrap();
        let err = cols
            .snapshot("rocks", &tmp.path().join("snap2"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                RetrievalError::Index(tantivy::TantivyError::LockFailure(..))
            ),
            "{err}"
        );
        assert!(matches!(
            cols.snapshot("nope", &out),
            Err(RetrievalError::UnknownCollection(_))
        ));
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn the_fingerprint_follows_content_not_build_order() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = Collections::new(tmp.path().join("index"));
        let ab = corpus(
            tmp.path(),
            "ab.jsonl",
            &[("a", "Rivers carry sediment."), ("b", "Ice floats.")],
        );
        let ba = corpus(
            tmp.path(),
            "ba.jsonl",
            &[("b", "Ice floats."), ("a", "Rivers carry sediment.")],
        );
        cols.ingest("one", &ab, 500, None).unwrap();
        cols.ingest("two", &ba, 500, None).unwrap();
        let one = cols.get("one").unwrap().fingerprint().unwrap();
        assert_eq!(one.passages, 2);
        assert_eq!(one, cols.get("two").unwrap().fingerprint().unwrap());
        // An edited passage (re-ingesting an id replaces it) moves it; so does a new one.
        let edit = corpus(tmp.path(), "e.jsonl", &[("b", "Ice floats on water.")]);
        cols.ingest("two", &edit, 500, None).unwrap();
        let edited = cols.get("two").unwrap().fingerprint().unwrap();
        assert_eq!(edited.passages, 2);
        assert_ne!(edited, one);
        let more = corpus(tmp.path(), "m.jsonl", &[("c", "Salt dissolves.")]);
        cols.ingest("one", &more, 500, None).unwrap();
        assert_eq!(cols.get("one").unwrap().fingerprint().unwrap().passages, 3);
    }

    #[test]
    fn a_failed_first_build_leaves_no_collection() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let cols = Collections::new(&root);
        let bad = tmp.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"id\": 1, \"text\": \"fine\"}\nnot json\n").unwrap();
        let err = cols.ingest("new", &bad, 500, None).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        assert!(!cols.exists("new"));
        assert!(matches!(
            cols.get("new"),
            Err(RetrievalError::UnknownCollection(_))
        ));
        assert!(cols.list().unwrap().is_empty());
        assert_eq!(
            entries(&root),
            Vec::<String>::new(),
            "temporary folder left"
        );

        let good = corpus(tmp.path(), "good.jsonl", &[("a", "Rivers carry sediment.")]);
        let s = cols.ingest("new", &good, 500, None).unwrap();
        assert_eq!(s.passages, 1);
        assert_eq!(cols.get("new").unwrap().len(), 1);
        assert_eq!(entries(&root), vec!["new".to_string()]);
        assert!(
            !root.join("new").join(BUILD_LOCK).exists(),
            "the build lock must not stay in the collection"
        );
        // An existing collection is updated in place, and a bad run leaves it as it was.
        assert!(cols.ingest("new", &bad, 500, None).is_err());
        assert_eq!(cols.get("new").unwrap().len(), 1);
    }

    #[test]
    fn leftover_temporary_folders_are_ignored_then_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let cols = Collections::new(&root);
        let input = corpus(tmp.path(), "c.jsonl", &[("a", "Magnets attract iron.")]);
        cols.ingest("done", &input, 500, None).unwrap();
        // A committed build that was killed before its rename, from a process that is gone
        // (no pid reaches i32::MAX), and one of a live process (ours).
        let dead = root.join(".tmp.x.2147483646.0");
        std::fs::rename(root.join("done"), &dead).unwrap();
        let live = root.join(format!(".tmp.x.{}.999999", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        assert!(!cols.exists(".tmp.x.2147483646.0"));
        assert!(cols.list().unwrap().is_empty());
        assert!(matches!(
            cols.get("x"),
            Err(RetrievalError::UnknownCollection(_))
        ));

        cols.ingest("x", &input, 500, None).unwrap();
        assert!(!dead.exists(), "a dead build's folder must be removed");
        assert!(live.exists(), "a live build's folder must be left alone");
        assert_eq!(cols.get("x").unwrap().len(), 1);

        // Also by an update in place.
        std::fs::create_dir(&dead).unwrap();
        cols.ingest("x", &input, 500, None).unwrap();
        assert!(!dead.exists());
        assert_eq!(cols.get("x").unwrap().len(), 1);
    }

    #[test]
    fn a_locked_build_folder_is_left_alone_even_with_a_dead_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let held = root.join(".tmp.y.2147483646.1");
        std::fs::create_dir_all(&held).unwrap();
        let lock = File::create(held.join(BUILD_LOCK)).unwrap();
        lock.lock().unwrap();
        let cols = Collections::new(&root);
        let input = corpus(tmp.path(), "c.jsonl", &[("a", "Ice floats on water.")]);
        cols.ingest("y", &input, 500, None).unwrap();
        assert!(held.exists(), "a folder whose build lock is held is in use");
        drop(lock);
        cols.ingest("z", &input, 500, None).unwrap();
        assert!(!held.exists(), "once the lock is free the folder is stale");
    }

    #[test]
    fn commits_of_another_collections_object_are_seen_without_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let server = Collections::new(&root);
        let writer = Collections::new(&root);
        let first = corpus(
            tmp.path(),
            "1.jsonl",
            &[("a", "Copper conducts electricity.")],
        );
        let second = corpus(tmp.path(), "2.jsonl", &[("b", "Zebras have stripes.")]);
        assert!(matches!(
            server.get("live"),
            Err(RetrievalError::UnknownCollection(_))
        ));
        writer.ingest("live", &first, 500, None).unwrap();
        // Created after the server's first look: found now.
        let c = server.get("live").unwrap();
        assert!(c.search("zebras stripes", 3).unwrap().is_empty());

        writer.ingest("live", &second, 500, None).unwrap();
        assert_eq!(c.search("zebras stripes", 3).unwrap()[0].id, "b");
        assert_eq!(c.len(), 2);
        assert!(Arc::ptr_eq(&c, &server.get("live").unwrap()));
    }

    #[test]
    fn a_collection_deleted_and_rebuilt_elsewhere_is_not_served_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let server = Collections::new(&root);
        let other = Collections::new(&root);
        let apples = corpus(tmp.path(), "a.jsonl", &[("a", "Apples grow on trees.")]);
        let bananas = corpus(tmp.path(), "b.jsonl", &[("b", "Bananas are yellow.")]);
        other.ingest("swap", &apples, 500, None).unwrap();
        assert_eq!(
            server.get("swap").unwrap().search("apples", 1).unwrap()[0].id,
            "a"
        );

        other.delete("swap").unwrap();
        assert!(matches!(
            server.get("swap"),
            Err(RetrievalError::UnknownCollection(_))
        ));
        other.ingest("swap", &bananas, 500, None).unwrap();
        let c = server.get("swap").unwrap();
        assert!(c.search("apples", 1).unwrap().is_empty());
        assert_eq!(c.search("bananas", 1).unwrap()[0].id, "b");
        assert_eq!(c.len(), 1);
        assert_eq!(entries(&root), vec!["swap".to_string()]);
    }

    #[test]
    fn a_panic_while_holding_a_lock_does_not_break_collections() {
        let tmp = tempfile::tempdir().unwrap();
        let cols = Arc::new(Collections::new(tmp.path().join("index")));
        let input = corpus(tmp.path(), "c.jsonl", &[("a", "Salt dissolves in water.")]);
        cols.ingest("p", &input, 500, None).unwrap();
        let c = cols.get("p").unwrap();
        let (cols2, c2) = (cols.clone(), c.clone());
        let panicked = std::thread::spawn(move || {
            let _map = cols2.open.write().unwrap();
            let _seen = c2.seen.lock().unwrap();
            panic!("poison both locks");
        })
        .join();
        assert!(panicked.is_err());
        assert!(cols.open.is_poisoned() && c.seen.is_poisoned());

        assert_eq!(c.search("salt", 1).unwrap()[0].id, "a");
        assert_eq!(cols.get("p").unwrap().len(), 1);
        cols.ingest("q", &input, 500, None).unwrap();
        assert_eq!(cols.list().unwrap().len(), 2);
        cols.delete("p").unwrap();
        assert!(!cols.exists("p"));
    }

    #[test]
    fn bad_names_are_refused_by_every_entry_point() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("index");
        let cols = Collections::new(&root);
        let input = corpus(tmp.path(), "c.jsonl", &[("a", "Wind moves sand.")]);
        // A folder that looks like a collection under a name outside the namespace.
        cols.ingest("real", &input, 500, None).unwrap();
        std::fs::rename(root.join("real"), root.join(".tmp")).unwrap();
        let long = "a".repeat(65);
        for name in [
            "../x",
            "a/b",
            ".tmp",
            "",
            ".",
            "..",
            "a b",
            "x\0",
            "/abs",
            long.as_str(),
        ] {
            let bad = |r: Result<(), RetrievalError>| matches!(r, Err(RetrievalError::BadName(_)));
            assert!(!cols.exists(name), "{name:?}");
            assert!(bad(cols.get(name).map(drop)), "get {name:?}");
            assert!(
                bad(cols.get_or_create(name).map(drop)),
                "get_or_create {name:?}"
            );
            assert!(
                bad(cols.ingest(name, &input, 500, None).map(drop)),
                "ingest {name:?}"
            );
            assert!(bad(cols.delete(name)), "delete {name:?}");
        }
        assert!(cols.list().unwrap().is_empty());
        assert_eq!(entries(&root), vec![".tmp".to_string()]);
        assert_eq!(
            entries(tmp.path()),
            vec!["c.jsonl".to_string(), "index".to_string()]
        );
    }
}

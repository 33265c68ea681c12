//! A collection's content identity: what an artefact trained on a collection (a domain
//! adapter) is tied to. It is the passage count and a SHA-256 over every passage's id, title
//! and text in id order, so it does not move when tantivy merges segments, and moves with any
//! added, removed or edited passage.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tantivy::schema::Value;
use tantivy::{DocAddress, Searcher, TantivyDocument};

use super::{Fields, RetrievalError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub passages: u64,
    pub content_sha256: String,
}

/// Which committed state a fingerprint was computed over: segment ids and their deletions.
type StateKey = Vec<(String, u32)>;

fn state_key(s: &Searcher) -> StateKey {
    s.segment_readers()
        .iter()
        .map(|r| (r.segment_id().uuid_string(), r.num_deleted_docs()))
        .collect()
}

/// The last fingerprint and the state it was computed over (a search-free request path
/// asks for it per request; recomputing means reading every stored passage).
#[derive(Default)]
pub(super) struct Cached(Mutex<Option<(StateKey, Fingerprint)>>);

impl Cached {
    pub(super) fn get(&self, s: &Searcher, f: Fields) -> Result<Fingerprint, RetrievalError> {
        let key = state_key(s);
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, fp)) = &*slot {
            if *k == key {
                return Ok(fp.clone());
            }
        }
        let fp = compute(s, f)?;
        *slot = Some((key, fp.clone()));
        Ok(fp)
    }
}

/// Every live passage as (id, title, text), in id order.
pub(super) fn read_all(
    s: &Searcher,
    f: Fields,
) -> Result<Vec<(String, String, String)>, RetrievalError> {
    let mut rows = Vec::new();
    for (ord, reader) in s.segment_readers().iter().enumerate() {
        for doc in reader.doc_ids_alive() {
            let d: TantivyDocument = s.doc(DocAddress::new(ord as u32, doc))?;
            let get = |field| {
                d.get_first(field)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            rows.push((get(f.id), get(f.title), get(f.text)));
        }
    }
    rows.sort_unstable();
    Ok(rows)
}

fn compute(s: &Searcher, f: Fields) -> Result<Fingerprint, RetrievalError> {
    let rows = read_all(s, f)?;
    let mut h = Sha256::new();
    for (id, title, text) in &rows {
        for part in [id, title, text] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    Ok(Fingerprint {
        passages: rows.len() as u64,
        content_sha256: format!("{:x}", h.finalize()),
    })
}

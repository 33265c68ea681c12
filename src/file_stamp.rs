//! A file's identity at one moment: inode, modification time and length. A file replaced by
//! write-then-rename (tantivy's `meta.json`, an adapter's card) shows a new stamp, which is how
//! a reader learns to reload without reading the file itself.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::SystemTime;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStamp {
    ino: u64,
    mtime: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    /// `None` when the file does not exist (or cannot be read).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            ino: m.ino(),
            mtime: m.modified().ok(),
            len: m.len(),
        })
    }
}

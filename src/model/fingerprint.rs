//! A model's identity for artefacts trained on its internals (the gate probe): the SHA-256 of
//! its weight bytes. Hidden states depend on every weight, so anything less than the bytes
//! (name, size, config) would let a probe run on a model it was never fitted to.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

/// Hex SHA-256 of a `.gguf` file, or of a Hugging Face folder's `*.safetensors` files taken in
/// name order (each file's name, then its bytes).
pub fn weights_sha256(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        ensure!(!files.is_empty(), "no *.safetensors in {}", path.display());
        for f in files {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            hasher.update(name.as_bytes());
            hash_file(&f, &mut hasher)?;
        }
    } else {
        hash_file(path, &mut hasher)?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Hex SHA-256 of any one file, read in 1 MB blocks.
pub fn file_sha256(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    hash_file(path, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// The serving model's identity, hashed from its weight files on first need and then shared:
/// every artefact checked against it (gate cards, domain adapters) costs one hash per
/// process, and none when nothing asks. Clones share the one digest.
#[derive(Clone)]
pub struct WeightsDigest(Arc<DigestCell>);

struct DigestCell {
    weights: Option<PathBuf>,
    sha: OnceLock<Result<String, String>>,
}

impl WeightsDigest {
    /// The digest of the weights at `path` (a `.gguf` file or a Hugging Face folder).
    pub fn of(path: impl Into<PathBuf>) -> Self {
        Self(Arc::new(DigestCell {
            weights: Some(path.into()),
            sha: OnceLock::new(),
        }))
    }

    /// A digest given outright (tests, models built in memory).
    pub fn known(sha: impl Into<String>) -> Self {
        let sha = OnceLock::from(Ok(sha.into()));
        Self(Arc::new(DigestCell { weights: None, sha }))
    }

    /// The hex SHA-256 (see [`weights_sha256`]), computed by the first caller.
    pub fn sha256(&self) -> Result<&str> {
        let cell = &*self.0;
        let r = cell.sha.get_or_init(|| match &cell.weights {
            Some(p) => weights_sha256(p).map_err(|e| format!("{e:#}")),
            None => Err("no weights to fingerprint".into()),
        });
        r.as_deref()
            .map_err(|e| anyhow::anyhow!("cannot fingerprint the model weights: {e}"))
    }
}

impl std::fmt::Debug for WeightsDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsDigest")
            .field("weights", &self.0.weights)
            .field("hashed", &self.0.sha.get().is_some())
            .finish()
    }
}

fn hash_file(path: &Path, hasher: &mut Sha256) -> Result<()> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_folder_hashes_follow_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"abc").unwrap();
        // The well-known SHA-256 of "abc".
        assert_eq!(
            weights_sha256(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let hf = dir.path().join("hf");
        std::fs::create_dir(&hf).unwrap();
        assert!(weights_sha256(&hf).is_err(), "a folder without weights");
        std::fs::write(hf.join("b.safetensors"), b"2").unwrap();
        std::fs::write(hf.join("a.safetensors"), b"1").unwrap();
        std::fs::write(hf.join("config.json"), b"{}").unwrap();
        let one = weights_sha256(&hf).unwrap();
        std::fs::write(hf.join("config.json"), b"{\"x\":1}").unwrap();
        assert_eq!(weights_sha256(&hf).unwrap(), one, "only weights count");
        std::fs::write(hf.join("b.safetensors"), b"3").unwrap();
        assert_ne!(weights_sha256(&hf).unwrap(), one);
    }

    #[test]
    fn a_digest_hashes_once_and_its_clones_share_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"abc").unwrap();
        let d = WeightsDigest::of(&f);
        let copy = d.clone();
        let first = d.sha256().unwrap().to_string();
        assert_eq!(first, weights_sha256(&f).unwrap());
        // Rewritten weights go unseen: the bytes were read once, at the first call.
        std::fs::write(&f, b"abd").unwrap();
        assert_eq!(copy.sha256().unwrap(), first);
        assert_ne!(WeightsDigest::of(&f).sha256().unwrap(), first);
        let gone = WeightsDigest::of(dir.path().join("missing.gguf"));
        assert!(gone
            .sha256()
            .unwrap_err()
            .to_string()
            .contains("fingerprint"));
        assert_eq!(WeightsDigest::known("x").sha256().unwrap(), "x");
    }
}

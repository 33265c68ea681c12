//! Text <-> token ids, via the `tokenizers` crate, built from `tokenizer.json` or from GGUF metadata.

use std::path::Path;

use super::ModelError;

/// A tokenizer plus the ids generation stops on.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn from_json(json: &serde_json::Value) -> Result<Self, ModelError> {
        let inner: tokenizers::Tokenizer = serde_json::from_value(json.clone())
            .map_err(|e| ModelError::Tokenizer(format!("building tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// Encodes `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids.
    /// No BOS/EOS is added: chat templates write those explicitly.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; special tokens are dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The text of one token id, special tokens included.
    pub fn decode_special(&self, id: u32) -> Result<String, ModelError> {
        self.inner
            .id_to_token(id)
            .ok_or_else(|| ModelError::Tokenizer(format!("no token with id {id}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        self.inner
            .save(path, false)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))
    }
}

/// Turns a growing list of generated ids into text pieces, holding back incomplete UTF-8 so a
/// multi-byte character split across tokens is never emitted as a replacement character.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for IncrementalDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds one id and returns the newly completed text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }

    /// Releases the text held back so far (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, ModelError> {
        let text = tok.decode(&self.ids)?;
        let rest = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len();
        Ok(rest)
    }
}

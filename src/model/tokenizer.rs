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
/// Only a short window of recent ids is decoded per step (not the whole answer), and always
/// with one already-emitted token in front, so decoders that treat a leading space specially
/// still produce the same text as decoding everything at once.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is decoded.
    prefix: usize,
    /// Ids before this were emitted.
    read: usize,
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
            prefix: 0,
            read: 0,
        }
    }

    /// The text that ids `read..` add after `prefix..read`, if it is complete.
    fn pending(
        &self,
        tok: &TextTokenizer,
        complete_only: bool,
    ) -> Result<Option<String>, ModelError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if complete_only && now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(match now.get(before.len()..) {
            Some(piece) if now.starts_with(&before) => Some(piece.to_string()),
            _ => None,
        })
    }

    /// Adds one id and returns the newly completed text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        match self.pending(tok, true)? {
            Some(piece) if !piece.is_empty() => {
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(piece)
            }
            _ => Ok(String::new()),
        }
    }

    /// Releases the text held back so far (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String, ModelError> {
        let rest = self.pending(tok, false)?.unwrap_or_default();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_tokenizer;

    #[test]
    fn pieces_add_up_to_the_whole_decode_even_across_split_characters() {
        let tok = tiny_tokenizer().unwrap();
        // One id per byte: "é" and "🤖" arrive split over 2 and 4 ids.
        let text = "héllo wörld 🤖 done";
        let ids = tok.encode(text).unwrap();
        let mut dec = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "half a character was emitted: {piece:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, text);
        // An unfinished character at the end is released as U+FFFD by finish().
        let mut dec = IncrementalDecoder::new();
        let robot = tok.encode("🤖").unwrap();
        for &id in &robot[..2] {
            assert_eq!(dec.push(&tok, id).unwrap(), "");
        }
        assert_eq!(dec.finish(&tok).unwrap(), "\u{FFFD}");
    }
}

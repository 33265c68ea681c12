//! Splitting documents into passages of bounded size along sentence boundaries.

use unicode_segmentation::UnicodeSegmentation;

use crate::sentences::sentences;

/// Splits `text` into passages of at most `max_chars` characters, packing whole sentences
/// ([`crate::sentences`], so none ends at "e.g."); a sentence longer than the bound is cut
/// between words (or, for one huge word, by characters).
pub fn split_passages(text: &str, max_chars: usize) -> Vec<String> {
    let max_chars = max_chars.max(16);
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim();
        if !t.is_empty() {
            out.push(t.to_string());
        }
        cur.clear();
    };
    for pieces in sentences(text) {
        let sentence = pieces.concat();
        let sentence = sentence.as_str();
        let n = sentence.chars().count();
        if cur.chars().count() + n <= max_chars {
            cur.push_str(sentence);
            continue;
        }
        flush(&mut cur, &mut out);
        if n <= max_chars {
            cur.push_str(sentence);
            continue;
        }
        for word in sentence.split_word_bounds() {
            if cur.chars().count() + word.chars().count() > max_chars {
                flush(&mut cur, &mut out);
            }
            if word.chars().count() > max_chars {
                let chars: Vec<char> = word.chars().collect();
                for chunk in chars.chunks(max_chars) {
                    out.push(chunk.iter().collect());
                }
            } else {
                cur.push_str(word);
            }
        }
    }
    flush(&mut cur, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_passage() {
        assert_eq!(
            split_passages("Earthquakes can damage buildings.", 100),
            vec!["Earthquakes can damage buildings."]
        );
        assert!(split_passages("   ", 100).is_empty());
    }

    #[test]
    fn long_text_splits_on_sentences_within_bound() {
        let text = "Plants need light. Light drives photosynthesis. Photosynthesis makes sugar. \
                    Sugar feeds the plant. The plant grows tall.";
        let parts = split_passages(text, 50);
        assert!(parts.len() >= 3, "{parts:?}");
        for p in &parts {
            assert!(p.chars().count() <= 50, "{p}");
            assert!(p.ends_with('.'), "sentence cut mid-way: {p}");
        }
        assert_eq!(
            parts.join(" "),
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }

    #[test]
    fn abbreviations_and_initials_do_not_end_a_passage() {
        let text = "Many plants, e.g. ferns and mosses, grow in shade. \
                    J. Smith et al. found more of them under trees.";
        let parts = split_passages(text, 60);
        assert_eq!(
            parts,
            [
                "Many plants, e.g. ferns and mosses, grow in shade.",
                "J. Smith et al. found more of them under trees."
            ]
        );
    }

    #[test]
    fn huge_sentence_and_word_are_cut() {
        let word = "x".repeat(100);
        let parts = split_passages(&format!("{word} tail words here"), 40);
        assert!(parts.iter().all(|p| p.chars().count() <= 40), "{parts:?}");
        assert_eq!(parts.concat().matches('x').count(), 100);
        let uni = "é".repeat(50);
        assert!(split_passages(&uni, 20)
            .iter()
            .all(|p| p.chars().count() <= 20));
    }
}

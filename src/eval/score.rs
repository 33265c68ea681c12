//! Answer scoring for short-answer QA, following the SQuAD conventions so numbers stay
//! comparable with published results.

use std::collections::HashMap;

use unicode_segmentation::UnicodeSegmentation;

/// SQuAD normalisation (lowercase, drop punctuation, drop a/an/the, collapse spaces), so that
/// surface variation in casing and punctuation does not count as a wrong answer.
///
/// Punctuation is deleted rather than replaced by a space, as SQuAD does ("don't" -> "dont").
/// A grapheme is kept when its base character is alphanumeric or whitespace, so combining
/// accents stay attached to their letter while symbols and punctuation of any script go.
pub fn normalize(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .graphemes(true)
        .filter(|g| {
            g.chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c.is_whitespace())
        })
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalised whitespace tokens: the unit every comparison below works on, which is what gives
/// whole-word matching its token boundaries.
fn tokens(s: &str) -> Vec<String> {
    normalize(s).split_whitespace().map(str::to_owned).collect()
}

/// Start of the first occurrence of `needle` as a contiguous token run in `hay`.
fn find_tokens(hay: &[String], needle: &[String]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// True when the prediction equals some gold after normalisation; any gold is acceptable
/// because datasets list alternative phrasings of the same answer.
pub fn exact_match(pred: &str, golds: &[String]) -> bool {
    let p = normalize(pred);
    golds.iter().any(|g| normalize(g) == p)
}

/// True when some gold appears as a whole-token run inside the prediction, so verbose answers
/// still count but "no" is not found inside "not"; an empty gold would match anything, so never.
pub fn contains_answer(pred: &str, golds: &[String]) -> bool {
    let p = tokens(pred);
    golds.iter().any(|g| find_tokens(&p, &tokens(g)).is_some())
}

/// SQuAD token F1 (multiset overlap), best over golds, giving partial credit for partly right
/// answers; an empty side scores 0 unless both sides are empty (then 1).
pub fn token_f1(pred: &str, golds: &[String]) -> f64 {
    let p = tokens(pred);
    golds
        .iter()
        .map(|g| f1_tokens(&p, &tokens(g)))
        .fold(0.0, f64::max)
}

fn f1_tokens(pred: &[String], gold: &[String]) -> f64 {
    if pred.is_empty() || gold.is_empty() {
        return if pred.is_empty() && gold.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut gold_counts: HashMap<&str, usize> = HashMap::new();
    for t in gold {
        *gold_counts.entry(t.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for t in pred {
        if let Some(c) = gold_counts.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pred.len() as f64;
    let recall = common as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Index of the choice mentioned first (as whole tokens) in the prediction, since a model's
/// verdict is usually its first word even when it hedges later ("Maybe, but yes" -> maybe).
/// Choices starting at the same token prefer the longer one, then the lower index; None if no
/// choice appears.
pub fn first_choice_mentioned(pred: &str, choices: &[String]) -> Option<usize> {
    let p = tokens(pred);
    let mut best: Option<(usize, usize, usize)> = None; // (start, len, index)
    for (i, choice) in choices.iter().enumerate() {
        let c = tokens(choice);
        if let Some(start) = find_tokens(&p, &c) {
            let better = match best {
                None => true,
                Some((bs, bl, _)) => start < bs || (start == bs && c.len() > bl),
            };
            if better {
                best = Some((start, c.len(), i));
            }
        }
    }
    best.map(|(_, _, i)| i)
}

pub use crate::numeric::argmax;

#[cfg(test)]
mod tests {
    use super::*;

    fn g(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn normalize_lowercases_strips_punctuation_and_articles() {
        // "The Earthquakes!" -> lower "the earthquakes!" -> drop "!" -> drop "the".
        assert_eq!(normalize("The Earthquakes!"), "earthquakes");
        // Whitespace of any kind collapses to single spaces and is trimmed.
        assert_eq!(normalize("  A   cat\tand\nAN owl  "), "cat and owl");
        // Articles are removed only as whole words: "theory", "apple", "another" stay.
        assert_eq!(
            normalize("the theory of an apple, another"),
            "theory of apple another"
        );
        // Punctuation is deleted, not replaced by a space (SQuAD): "don't" -> "dont".
        assert_eq!(normalize("Don't stop."), "dont stop");
        assert_eq!(normalize(""), "");
        assert_eq!(normalize("?!..."), "");
        assert_eq!(normalize("the a an"), "");
    }

    #[test]
    fn normalize_handles_non_ascii() {
        // "Ça va, très bien" -> lower "ça va, très bien" -> drop "," .
        assert_eq!(normalize("Ça va, très bien"), "ça va très bien");
        // Unicode punctuation (guillemets, em dash, CJK full stop, inverted marks) goes.
        assert_eq!(normalize("«Hola» — ¿qué tal?"), "hola qué tal");
        assert_eq!(normalize("東京。"), "東京");
        // Decomposed "é" (e + U+0301 combining acute) keeps its accent.
        assert_eq!(normalize("Cafe\u{301}!"), "cafe\u{301}");
        // Digits are alphanumeric and stay.
        assert_eq!(normalize("1,000 years"), "1000 years");
    }

    #[test]
    fn exact_match_uses_normalisation_and_any_gold() {
        assert!(exact_match("The Earthquakes!", &g(&["earthquakes"])));
        assert!(exact_match("paris", &g(&["London", "Paris."])));
        assert!(!exact_match("Paris, France", &g(&["Paris"])));
        assert!(!exact_match("anything", &[]));
        // Both normalise to "" -> equal.
        assert!(exact_match("The.", &g(&["a"])));
    }

    #[test]
    fn contains_answer_respects_word_boundaries() {
        // tokens [i, do, not, know]: "no" is not a token.
        assert!(!contains_answer("I do not know", &g(&["no"])));
        // tokens [yes, it, does]: "yes" is token 0.
        assert!(contains_answer("Yes, it does.", &g(&["yes"])));
        // Multi-token gold must appear contiguously: [new, york] in [in, new, york, city].
        assert!(contains_answer("In New York City.", &g(&["new york"])));
        assert!(!contains_answer("New jersey, not York", &g(&["New York"])));
        // Article in gold is normalised away: "the Nile" -> [nile].
        assert!(contains_answer("It is the river Nile", &g(&["The Nile"])));
        assert!(contains_answer("Maybe, perhaps.", &g(&["no", "maybe"])));
    }

    #[test]
    fn contains_answer_empty_gold_never_matches() {
        assert!(!contains_answer("anything at all", &g(&[""])));
        assert!(!contains_answer("anything at all", &g(&["the", "?!"])));
        assert!(!contains_answer("", &g(&[""])));
        assert!(!contains_answer("anything", &[]));
        // Gold longer than the prediction cannot be contained.
        assert!(!contains_answer("yes", &g(&["yes it is"])));
    }

    #[test]
    fn token_f1_worked_example() {
        // pred "the shaking ground" -> [shaking, ground] (2 tokens)
        // gold "The shaking of the ground causes damage" -> [shaking, of, ground, causes, damage] (5)
        // common = 2; precision = 2/2 = 1; recall = 2/5 = 0.4
        // F1 = 2 * 1 * 0.4 / (1 + 0.4) = 0.8 / 1.4 = 4/7
        let f1 = token_f1(
            "the shaking ground",
            &g(&["The shaking of the ground causes damage"]),
        );
        assert!((f1 - 4.0 / 7.0).abs() < 1e-12, "{f1}");
    }

    #[test]
    fn token_f1_multiset_and_max_over_golds() {
        // pred [a.. ] -> "x x y" = [x, x, y]; gold [x, y, y]
        // common: x min(2,1)=1, y min(1,2)=1 -> 2; P = 2/3, R = 2/3, F1 = 2/3.
        let f1 = token_f1("x x y", &g(&["x y y"]));
        assert!((f1 - 2.0 / 3.0).abs() < 1e-12, "{f1}");
        // Max over golds: first gold gives 0, second is exact -> 1.
        assert_eq!(token_f1("red car", &g(&["blue", "Red car!"])), 1.0);
        // No overlap -> 0.
        assert_eq!(token_f1("red", &g(&["blue"])), 0.0);
    }

    #[test]
    fn token_f1_empty_sides() {
        assert_eq!(token_f1("", &g(&["something"])), 0.0);
        assert_eq!(token_f1("something", &g(&[""])), 0.0);
        // Both normalise to empty -> 1.
        assert_eq!(token_f1("The!", &g(&["?"])), 1.0);
        // No golds at all -> 0.
        assert_eq!(token_f1("something", &[]), 0.0);
    }

    #[test]
    fn first_choice_mentioned_picks_earliest() {
        let yn = g(&["yes", "no", "maybe"]);
        // tokens [maybe, but, yes]: maybe@0 (index 2), yes@2 -> 2.
        assert_eq!(first_choice_mentioned("Maybe, but yes", &yn), Some(2));
        assert_eq!(first_choice_mentioned("No. Yes? maybe", &yn), Some(1));
        // [i, do, not, know]: no choice appears as a whole word.
        assert_eq!(first_choice_mentioned("I do not know", &yn), None);
        assert_eq!(first_choice_mentioned("", &yn), None);
        assert_eq!(first_choice_mentioned("yes", &[]), None);
        // Empty choices are ignored.
        assert_eq!(first_choice_mentioned("yes", &g(&["", "yes"])), Some(1));
    }

    #[test]
    fn first_choice_mentioned_tie_prefers_longer_choice() {
        // Both start at token 0; "new york" (2 tokens) is more specific than "new".
        let c = g(&["new", "new york"]);
        assert_eq!(first_choice_mentioned("New York, surely", &c), Some(1));
        // Same choice twice: lower index wins.
        assert_eq!(first_choice_mentioned("yes", &g(&["yes", "Yes"])), Some(0));
    }

    #[test]
    fn argmax_first_largest_finite() {
        assert_eq!(argmax::<f64>(&[]), None);
        assert_eq!(argmax(&[f64::NAN, f64::INFINITY, f64::NEG_INFINITY]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f64::NAN, -5.0, f64::INFINITY, -7.0]), Some(1));
        assert_eq!(argmax(&[-1.0]), Some(0));
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
    }
}

//! (prefix, suffix) training pairs cut from retrieved passages: at test time the model learns to
//! predict each suffix from its prefix ("Predict the Retrieval!").

use serde::Serialize;

use crate::sentences::{is_abbreviation, sentences};

/// One training example: the model learns to continue `prefix` with `suffix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pair {
    /// The leading part of a sentence; when cut at a punctuation mark, it ends with that mark.
    pub prefix: String,
    /// The rest of the sentence: the text to predict.
    pub suffix: String,
}

/// Where the pairs of a [`PairSet`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairSource {
    /// Sentences of the passages with at least [`PairOptions::min_words`] words.
    Sentences,
    /// Whole passages cut at their word midpoint, used when no sentence was long enough.
    PassageFallback,
}

/// Settings of [`build_pairs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairOptions {
    /// Sentences with fewer whitespace-separated words are skipped (default 6).
    pub min_words: usize,
    /// At most this many pairs are built (default 3).
    pub max_pairs: usize,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            min_words: 6,
            max_pairs: 3,
        }
    }
}

/// The pairs built from one list of passages, and how they were obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSet {
    /// The pairs, in retrieval order.
    pub pairs: Vec<Pair>,
    /// Whether the pairs come from sentences or from the whole-passage fallback.
    pub source: PairSource,
}

/// Split marks, most preferred first.
const MARKS: [char; 6] = ['.', ',', ';', ':', '!', '?'];

/// Fewest words a punctuation split leaves on either side.
const MIN_SIDE_WORDS: usize = 3;

/// Builds at most `opts.max_pairs` pairs from `passages` (in retrieval order, best first).
///
/// Every sentence with at least `opts.min_words` words gives one pair via [`split_pair`], in
/// passage order and then sentence order. When no sentence qualifies, each non-empty passage
/// is cut whole at its word midpoint instead ([`PairSource::PassageFallback`]); an empty set
/// also reports that source.
pub fn build_pairs(passages: &[&str], opts: &PairOptions) -> PairSet {
    // Lazy over passages: once `max_pairs` pairs exist, later passages are never segmented.
    let pairs: Vec<Pair> = passages
        .iter()
        .flat_map(|p| split_sentences(p))
        .filter(|s| s.split_whitespace().count() >= opts.min_words)
        .filter_map(|s| split_pair(&s))
        .take(opts.max_pairs)
        .collect();
    if !pairs.is_empty() {
        return PairSet {
            pairs,
            source: PairSource::Sentences,
        };
    }
    let pairs = passages
        .iter()
        .filter_map(|p| {
            let words: Vec<&str> = p.split_whitespace().collect();
            midpoint_pair(&words)
        })
        .take(opts.max_pairs)
        .collect();
    PairSet {
        pairs,
        source: PairSource::PassageFallback,
    }
}

/// Splits `text` into trimmed, non-empty sentences ([`crate::sentences`]: Unicode sentence
/// boundaries, re-joined after a known abbreviation or an initial), each sentence's pieces
/// joined by one space.
pub fn split_sentences(text: &str) -> Vec<String> {
    sentences(text)
        .into_iter()
        .map(|pieces| {
            let trimmed: Vec<&str> = pieces
                .into_iter()
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect();
            trimmed.join(" ")
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// Cuts one sentence into a pair.
///
/// The marks `.` `,` `;` `:` `!` `?` are tried in that order; for each, the first occurrence
/// leaving at least three words on both sides wins, and the prefix keeps the mark. A mark
/// between two digits ("3.14", "1,000") and the periods of abbreviations and initials are
/// never split points. Without such a mark the sentence is cut at its word midpoint (words
/// re-joined by single spaces). `None` when the sentence has fewer than two words.
pub fn split_pair(sentence: &str) -> Option<Pair> {
    let words = word_spans(sentence);
    if words.len() < 2 {
        return None;
    }
    for mark in MARKS {
        for (at, _) in sentence.match_indices(mark) {
            let end = at + mark.len_utf8();
            // A word straddling `end` (e.g. "a.b") counts on both sides, as it would after
            // trimming the two halves.
            let before = words.partition_point(|&(start, _)| start < end);
            let after = words.len() - words.partition_point(|&(_, stop)| stop <= end);
            if before < MIN_SIDE_WORDS || after < MIN_SIDE_WORDS {
                continue;
            }
            if between_digits(sentence, at, end) {
                continue;
            }
            if mark == '.' {
                // The mark is not whitespace, so it lies inside the last word starting before it.
                let (start, stop) = words[before - 1];
                let word = sentence[start..stop]
                    .trim_end_matches(|c: char| !c.is_alphanumeric() && c != '.');
                if is_abbreviation(word) {
                    continue;
                }
            }
            return Some(Pair {
                prefix: sentence[..end].trim().to_string(),
                suffix: sentence[end..].trim().to_string(),
            });
        }
    }
    let words: Vec<&str> = words.iter().map(|&(s, e)| &sentence[s..e]).collect();
    midpoint_pair(&words)
}

/// Byte ranges of the whitespace-separated words of `s` (the same words as `split_whitespace`).
fn word_spans(s: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        if c.is_whitespace() {
            if let Some(st) = start.take() {
                spans.push((st, i));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(st) = start {
        spans.push((st, s.len()));
    }
    spans
}

/// First half of the words (rounded down) against the rest; needs two words.
fn midpoint_pair(words: &[&str]) -> Option<Pair> {
    if words.len() < 2 {
        return None;
    }
    let half = words.len() / 2;
    Some(Pair {
        prefix: words[..half].join(" "),
        suffix: words[half..].join(" "),
    })
}

/// Whether the mark at `at..end` sits directly between two digits, as in "3.14" or "1,000".
fn between_digits(s: &str, at: usize, end: usize) -> bool {
    let prev = s[..at].chars().next_back();
    let next = s[end..].chars().next();
    matches!((prev, next), (Some(a), Some(b)) if a.is_numeric() && b.is_numeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(prefix: &str, suffix: &str) -> Pair {
        Pair {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }

    fn split(sentence: &str) -> (String, String) {
        let p = split_pair(sentence).expect("a pair");
        (p.prefix, p.suffix)
    }

    fn owned(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    // QASC science facts and PubMedQA abstract excerpts, copied verbatim.
    const QASC_EARTHQUAKE: &str =
        "when an earthquake causes the ground to shake, this shaking can damage buildings.";
    const PUBMED_TRIAL: &str = "Three-year randomized field trial. One thousand ninety-nine \
        women aged 50 and older recruited from a health maintenance organization in North \
        Carolina. Women were randomized to 1 of 3 groups: (1) usual care, (2) tailored print \
        communications, and (3) tailored telephone counseling.";
    const PUBMED_VS: &str = "Patients receiving UH vs. FH differed in several characteristics \
        including laboratory values and anticoagulation indications.";
    const PUBMED_EG: &str = "Communication disorders that impair transmitting or decoding of \
        structural features of music (e.g., pitch, timbre) and/or symbolic representation may \
        result in atypical musical communication, which can have a negative impact on music \
        therapy interventions.";
    const PUBMED_CIMT: &str = "cIMT was nearly identical between cases (0.66+/-0.17 cm) and \
        controls (0.65+/-0.18 cm) despite significantly lower HDL cholesterol (0.67 vs. 1.58 \
        mmol/l).";

    #[test]
    fn default_options() {
        assert_eq!(
            PairOptions::default(),
            PairOptions {
                min_words: 6,
                max_pairs: 3
            }
        );
    }

    #[test]
    fn comma_rule_on_qasc_fact() {
        assert_eq!(
            split_pair(QASC_EARTHQUAKE),
            Some(pair(
                "when an earthquake causes the ground to shake,",
                "this shaking can damage buildings."
            ))
        );
    }

    #[test]
    fn period_is_tried_before_other_marks() {
        // The comma after "water" qualifies too, but the period is tried first.
        assert_eq!(
            split("Plants need water, light and soil. They grow toward the sun."),
            (
                "Plants need water, light and soil.".into(),
                "They grow toward the sun.".into()
            )
        );
        // The first period leaves only two words before it; the next one qualifies.
        assert_eq!(
            split("Cells grow. Then cells divide. After that they rest quietly."),
            (
                "Cells grow. Then cells divide.".into(),
                "After that they rest quietly.".into()
            )
        );
        // The colon comes first in the text, but the comma comes first in mark order.
        let third = &split_sentences(PUBMED_TRIAL)[2];
        assert_eq!(
            split(third),
            (
                "Women were randomized to 1 of 3 groups: (1) usual care,".into(),
                "(2) tailored print communications, and (3) tailored telephone counseling.".into()
            )
        );
        assert_eq!(
            split("We measured three things; the cells grew fast: very fast indeed!"),
            (
                "We measured three things;".into(),
                "the cells grew fast: very fast indeed!".into()
            )
        );
    }

    #[test]
    fn midpoint_when_no_usable_punctuation() {
        assert_eq!(
            split("shaking of the earths crust is called an earthquake."),
            (
                "shaking of the earths".into(),
                "crust is called an earthquake.".into()
            )
        );
        assert_eq!(
            split("Lakes are formed by beavers"),
            ("Lakes are".into(), "formed by beavers".into())
        );
        // The comma leaves one word before it: too short a prefix.
        assert_eq!(
            split("Yes, the ground shook hard today."),
            ("Yes, the ground".into(), "shook hard today.".into())
        );
        // Irregular whitespace is normalised to single spaces.
        assert_eq!(
            split("  Fungi \t can\n\ncause   disease  "),
            ("Fungi can".into(), "cause disease".into())
        );
        assert_eq!(split("Fungi grow."), ("Fungi".into(), "grow.".into()));
        assert_eq!(split_pair("Earthquakes."), None);
        assert_eq!(split_pair("   "), None);
        assert_eq!(split_pair(""), None);
    }

    #[test]
    fn abbreviations_and_initials_do_not_end_sentences() {
        let text = "Dr. Smith examined the patient carefully. Cell division, e.g. Mitosis \
                    in skin cells, happens constantly. Smith et al. Found the same effect in \
                    older women. The survey was designed by J. Smith in Ohio. Most patients \
                    lived in the U.S. Midwest at the time. "
            .to_string()
            + PUBMED_VS
            + " We measured vitamin levels in group a. The results were clear.";
        assert_eq!(
            split_sentences(&text),
            owned(&[
                "Dr. Smith examined the patient carefully.",
                "Cell division, e.g. Mitosis in skin cells, happens constantly.",
                "Smith et al. Found the same effect in older women.",
                "The survey was designed by J. Smith in Ohio.",
                "Most patients lived in the U.S. Midwest at the time.",
                PUBMED_VS,
                "We measured vitamin levels in group a.",
                "The results were clear.",
            ])
        );
        // Ordinary sentence ends still split.
        assert_eq!(
            split_sentences(
                "earthquakes can damage buildings. The ground shaking can cause destruction."
            ),
            owned(&[
                "earthquakes can damage buildings.",
                "The ground shaking can cause destruction."
            ])
        );
    }

    #[test]
    fn abbreviation_periods_are_not_split_points() {
        assert_eq!(
            split(PUBMED_VS),
            (
                "Patients receiving UH vs. FH differed in".into(),
                "several characteristics including laboratory values and anticoagulation \
                 indications."
                    .into()
            )
        );
        // Neither period of "e.g." is used; the comma right after it is.
        assert_eq!(
            split(PUBMED_EG),
            (
                "Communication disorders that impair transmitting or decoding of structural \
                 features of music (e.g.,"
                    .into(),
                "pitch, timbre) and/or symbolic representation may result in atypical musical \
                 communication, which can have a negative impact on music therapy interventions."
                    .into()
            )
        );
        assert_eq!(
            split("The team led by Dr. Smith found it; nobody else did."),
            (
                "The team led by Dr. Smith found it;".into(),
                "nobody else did.".into()
            )
        );
    }

    #[test]
    fn numbers_are_not_split_points() {
        assert_eq!(
            split_sentences(
                "The constant pi equals 3.14 approximately. The survey counted 1,000 people."
            ),
            owned(&[
                "The constant pi equals 3.14 approximately.",
                "The survey counted 1,000 people."
            ])
        );
        assert_eq!(
            split("The constant pi equals 3.14 and the survey counted 1,000 people in total."),
            (
                "The constant pi equals 3.14 and".into(),
                "the survey counted 1,000 people in total.".into()
            )
        );
        assert_eq!(split_sentences(PUBMED_CIMT), owned(&[PUBMED_CIMT]));
        assert_eq!(
            split(PUBMED_CIMT),
            (
                "cIMT was nearly identical between cases (0.66+/-0.17 cm) and controls".into(),
                "(0.65+/-0.18 cm) despite significantly lower HDL cholesterol (0.67 vs. 1.58 \
                 mmol/l)."
                    .into()
            )
        );
    }

    #[test]
    fn non_ascii_text() {
        let german =
            "Die Zellteilung erfolgt durch Mitose, wobei zwei identische Tochterzellen entstehen.";
        assert_eq!(
            split(german),
            (
                "Die Zellteilung erfolgt durch Mitose,".into(),
                "wobei zwei identische Tochterzellen entstehen.".into()
            )
        );
        assert_eq!(
            split("Le café à Paris coûte cher, même pour les étudiants étrangers."),
            (
                "Le café à Paris coûte cher,".into(),
                "même pour les étudiants étrangers.".into()
            )
        );
        // Multi-byte letters right next to the marks and to a decimal number.
        assert_eq!(
            split("Größe 3.5 ändert sich,während die Zellen wachsen und teilen"),
            (
                "Größe 3.5 ändert sich,".into(),
                "während die Zellen wachsen und teilen".into()
            )
        );
        assert_eq!(
            split_sentences("細胞は分裂する。それから成長する。"),
            owned(&["細胞は分裂する。", "それから成長する。"])
        );
        // Unspaced CJK is a single word: nothing to split.
        assert_eq!(split_pair("細胞は分裂する。"), None);
        assert_eq!(
            split("東京 は 日本 の 首都 です"),
            ("東京 は 日本".into(), "の 首都 です".into())
        );
        let set = build_pairs(
            &[
                "細胞は分裂する。",
                "Le café à Paris coûte cher, même pour les étudiants étrangers.",
            ],
            &PairOptions::default(),
        );
        assert_eq!(set.source, PairSource::Sentences);
        assert_eq!(
            set.pairs,
            vec![pair(
                "Le café à Paris coûte cher,",
                "même pour les étudiants étrangers."
            )]
        );
    }

    #[test]
    fn min_words_filter_max_pairs_and_retrieval_order() {
        let passages = [
            PUBMED_TRIAL,
            "earthquakes can damage buildings.",
            QASC_EARTHQUAKE,
        ];
        let trial_second = pair(
            "One thousand ninety-nine women aged 50 and older",
            "recruited from a health maintenance organization in North Carolina.",
        );
        let trial_third = pair(
            "Women were randomized to 1 of 3 groups: (1) usual care,",
            "(2) tailored print communications, and (3) tailored telephone counseling.",
        );
        let quake = pair(
            "when an earthquake causes the ground to shake,",
            "this shaking can damage buildings.",
        );
        // "Three-year randomized field trial." and the 4-word fact are under 6 words.
        assert_eq!(
            build_pairs(&passages, &PairOptions::default()),
            PairSet {
                pairs: vec![trial_second.clone(), trial_third.clone(), quake.clone()],
                source: PairSource::Sentences
            }
        );
        let capped = PairOptions {
            max_pairs: 2,
            ..PairOptions::default()
        };
        assert_eq!(
            build_pairs(&passages, &capped).pairs,
            vec![trial_second.clone(), trial_third.clone()]
        );
        // Retrieval order decides, not sentence length.
        assert_eq!(
            build_pairs(&[QASC_EARTHQUAKE, PUBMED_TRIAL], &capped).pairs,
            vec![quake.clone(), trial_second.clone()]
        );
        let loose = PairOptions {
            min_words: 3,
            max_pairs: 10,
        };
        assert_eq!(
            build_pairs(&passages, &loose).pairs,
            vec![
                pair("Three-year randomized", "field trial."),
                trial_second,
                trial_third,
                pair("earthquakes can", "damage buildings."),
                quake,
            ]
        );
    }

    #[test]
    fn passage_fallback_when_all_sentences_are_short() {
        let passages = [
            "earthquakes can damage buildings.",
            "   ",
            "Earthquakes.",
            "Fungi can cause disease.",
            "glass keeps plants warm.",
            "Volcanic activity raises temperature.",
        ];
        assert_eq!(
            build_pairs(&passages, &PairOptions::default()),
            PairSet {
                pairs: vec![
                    pair("earthquakes can", "damage buildings."),
                    pair("Fungi can", "cause disease."),
                    pair("glass keeps", "plants warm."),
                ],
                source: PairSource::PassageFallback
            }
        );
        // The fallback cuts whole passages, across their sentence boundaries.
        assert_eq!(
            build_pairs(
                &["Plants grow. Cells divide fast."],
                &PairOptions::default()
            ),
            PairSet {
                pairs: vec![pair("Plants grow.", "Cells divide fast.")],
                source: PairSource::PassageFallback
            }
        );
    }

    #[test]
    fn empty_input() {
        let empty = PairSet {
            pairs: vec![],
            source: PairSource::PassageFallback,
        };
        assert_eq!(build_pairs(&[], &PairOptions::default()), empty);
        assert_eq!(
            build_pairs(&["", "  \n ", "Earthquakes."], &PairOptions::default()),
            empty
        );
        let none = PairOptions {
            max_pairs: 0,
            ..PairOptions::default()
        };
        assert_eq!(build_pairs(&[QASC_EARTHQUAKE], &none), empty);
        assert!(split_sentences("").is_empty());
        assert!(split_sentences(" \n\t ").is_empty());
    }

    #[test]
    fn huge_inputs() {
        let words = "word ".repeat(200_000);
        let set = build_pairs(&[&words], &PairOptions::default());
        assert_eq!(set.source, PairSource::Sentences);
        assert_eq!(set.pairs.len(), 1);
        assert_eq!(set.pairs[0].prefix.split_whitespace().count(), 100_000);
        assert_eq!(set.pairs[0].suffix.split_whitespace().count(), 100_000);

        // Many commas, none leaving three words after it.
        let commas = format!("alpha beta {} gamma", "x,".repeat(200_000));
        let p = split_pair(&commas).unwrap();
        assert_eq!(p.prefix, "alpha beta");
        assert_eq!(p.suffix.len(), 400_000 + " gamma".len());

        let many = "Earthquakes can damage buildings badly today. ".repeat(50_000);
        assert_eq!(split_sentences(&many).len(), 50_000);
        let set = build_pairs(&[&many], &PairOptions::default());
        assert_eq!(
            set.pairs,
            vec![pair("Earthquakes can damage", "buildings badly today."); 3]
        );

        // A long run of abbreviations merges into one sentence.
        let abbrevs = "Dr. ".repeat(50_000) + "Smith left.";
        assert_eq!(split_sentences(&abbrevs).len(), 1);
    }

    #[test]
    fn serializes_snake_case() {
        assert_eq!(
            serde_json::to_string(&PairSource::PassageFallback).unwrap(),
            "\"passage_fallback\""
        );
        assert_eq!(
            serde_json::to_string(&pair("a b,", "c d")).unwrap(),
            r#"{"prefix":"a b,","suffix":"c d"}"#
        );
    }
}

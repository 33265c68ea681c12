//! Sentence boundaries, for cutting documents into passages and retrieved text into training
//! pairs alike: Unicode's (UAX #29, from unicode-segmentation), re-joined where Unicode ends a
//! sentence after a known abbreviation ("e.g.", "et al.") or a one-letter initial ("J.").

use unicode_segmentation::UnicodeSegmentation;

/// Words whose final period does not end a sentence (compared ignoring ASCII case).
const ABBREVIATIONS: &[&str] = &[
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "fig.",
    "figs.", "no.", "al.", "approx.", "inc.", "ltd.", "jr.", "sr.", "u.s.", "u.k.", "ph.d.",
];

/// The sentences of `text`, each as the Unicode sentence pieces it was re-joined from,
/// whitespace included: the pieces of all sentences concatenate back to `text`.
pub fn sentences(text: &str) -> Vec<Vec<&str>> {
    let mut out: Vec<Vec<&str>> = Vec::new();
    let mut continues = false;
    for piece in text.split_sentence_bounds() {
        match out.last_mut() {
            Some(last) if continues => last.push(piece),
            _ => out.push(vec![piece]),
        }
        // Whitespace alone changes nothing; otherwise only the piece's last word matters.
        if let Some(word) = piece.trim().rsplit(char::is_whitespace).next() {
            if !word.is_empty() {
                continues = is_abbreviation(word);
            }
        }
    }
    out
}

/// Whether a whitespace-delimited `word` is a known abbreviation or a one-letter initial,
/// i.e. its period need not end a sentence.
pub fn is_abbreviation(word: &str) -> bool {
    let mut chars = word.chars();
    if let (Some(c), Some('.'), None) = (chars.next(), chars.next(), chars.next()) {
        if c.is_uppercase() {
            return true;
        }
    }
    // Opening brackets and quotes, as in "(e.g.", do not change the abbreviation.
    let core = word.trim_start_matches(|c: char| !c.is_alphanumeric());
    ABBREVIATIONS.iter().any(|a| a.eq_ignore_ascii_case(core))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abbreviations_and_initials_join_and_pieces_rebuild_the_text() {
        let text = "See e.g. Fig. 2 here. J. Smith et al. agree.  Done!\n";
        let s = sentences(text);
        let joined: Vec<String> = s.iter().map(|p| p.concat()).collect();
        assert_eq!(
            joined,
            [
                "See e.g. Fig. 2 here. ",
                "J. Smith et al. agree.  ",
                "Done!\n"
            ]
        );
        assert_eq!(joined.concat(), text);
        assert!(sentences("").is_empty());
        assert!(is_abbreviation("(e.g.") && is_abbreviation("J.") && !is_abbreviation("end."));
    }
}

//! The `[n]` markers of an answer asked to cite (`rag.cite`), mapped back to the passages the
//! prompt numbered, so a client can link each claim to its document without parsing text.

use serde::Serialize;

use crate::retrieval::Passage;

/// One passage the answer cites.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Citation {
    /// The number in the answer's marker: the passage's position in `rag.passages`, from 1.
    pub marker: usize,
    pub passage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Longest bracket content read as a marker list (`[1, 2, 3]`); longer brackets are prose.
const MAX_MARKER_CHARS: usize = 32;

/// The passages `answer` cites, in order of first use, each once. Markers are `[2]`, `[1, 3]`
/// or `[1][2]`; a number outside 1..=passages (a year, "[2019]") is not a citation.
/// Hand-written: a bracket scan is shorter than the regex dependency it would take.
pub fn cited(answer: &str, passages: &[Passage]) -> Vec<Citation> {
    let mut seen = vec![false; passages.len()];
    let mut out = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.find(']').filter(|&c| c <= MAX_MARKER_CHARS) else {
            continue;
        };
        let numbers: Option<Vec<usize>> = rest[..close]
            .split(',')
            .map(|n| n.trim().parse().ok())
            .collect();
        // Not a marker list: scan on from just inside the bracket, which may hold one.
        let Some(numbers) = numbers else {
            continue;
        };
        for n in numbers {
            if (1..=passages.len()).contains(&n) && !std::mem::replace(&mut seen[n - 1], true) {
                let p = &passages[n - 1];
                out.push(Citation {
                    marker: n,
                    passage: p.id.clone(),
                    document: p.document.clone(),
                    title: p.title.clone(),
                });
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(id: &str) -> Passage {
        Passage {
            id: id.into(),
            score: 1.0,
            text: String::new(),
            title: Some(format!("T{id}")),
            document: Some(format!("doc-{id}")),
            metadata: None,
        }
    }

    #[test]
    fn markers_map_to_passages_once_in_order_of_use() {
        let ps = [passage("a"), passage("b"), passage("c")];
        let markers = |s: &str| -> Vec<usize> { cited(s, &ps).iter().map(|c| c.marker).collect() };
        assert_eq!(
            markers("Rocks erode [2]. Rivers carve [1, 3]; again [2]."),
            [2, 1, 3]
        );
        assert_eq!(markers("Both [3][1]."), [3, 1]);
        assert_eq!(
            markers("In [2019] and [0] and [4] and [x] and []."),
            Vec::<usize>::new()
        );
        assert_eq!(markers("Unclosed [1 and [2]"), [2]);
        assert_eq!(markers("[ 1 ,2 ]"), [1, 2]);
        assert_eq!(markers(&format!("[{}] [1]", "1, ".repeat(20))), [1]);
        assert_eq!(markers("ünïcode [3] …"), [3]);
        let c = &cited("see [2]", &ps)[0];
        assert_eq!(
            (
                c.passage.as_str(),
                c.document.as_deref(),
                c.title.as_deref()
            ),
            ("b", Some("doc-b"), Some("Tb"))
        );
        assert!(cited("[1]", &[]).is_empty());
    }
}

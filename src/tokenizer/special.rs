//! Finding special and user-defined tokens written verbatim in text.
//!
//! Tokens such as `<|im_start|>` or `<start_of_turn>` must come out as one id
//! when they appear in the input, before any BPE runs on the text around them.
//! Matching is leftmost-longest over the raw bytes, the rule Hugging Face's
//! added-vocabulary splitter follows: the earliest position where any token
//! starts wins, and among tokens starting there the longest.

/// A byte trie over the tokens matched verbatim in text.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpecialMatcher {
    nodes: Vec<Node>,
    /// Whether any token starts with this byte (a fast skip for plain text).
    first: Vec<bool>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// Children sorted by byte.
    children: Vec<(u8, u32)>,
    /// The token ending here and whether it is a control token.
    token: Option<(u32, bool)>,
}

/// One piece of input text after special tokens were split out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Segment<'a> {
    /// Plain text for the tokenizer's model.
    Text(&'a str),
    /// A token written verbatim in the text.
    Token(u32),
}

impl SpecialMatcher {
    /// A matcher over `(text, id, is_control)` entries; empty texts are ignored.
    pub(crate) fn new<'a>(entries: impl IntoIterator<Item = (&'a str, u32, bool)>) -> Self {
        let mut m = SpecialMatcher {
            nodes: vec![Node::default()],
            first: vec![false; 256],
        };
        for (text, id, control) in entries {
            if text.is_empty() {
                continue;
            }
            m.first[text.as_bytes()[0] as usize] = true;
            let mut node = 0usize;
            for &b in text.as_bytes() {
                node = match m.nodes[node].children.binary_search_by_key(&b, |c| c.0) {
                    Ok(i) => m.nodes[node].children[i].1 as usize,
                    Err(i) => {
                        let next = m.nodes.len();
                        m.nodes.push(Node::default());
                        m.nodes[node].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            // A later duplicate wins, as in a dictionary built in vocabulary order.
            m.nodes[node].token = Some((id, control));
        }
        m
    }

    /// Whether no token is matched at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }

    /// The longest token starting at `start`, as `(end, id)`.
    fn longest_at(&self, bytes: &[u8], start: usize, with_control: bool) -> Option<(usize, u32)> {
        let mut node = 0usize;
        let mut best = None;
        for (i, b) in bytes[start..].iter().enumerate() {
            match self.nodes[node].children.binary_search_by_key(b, |c| c.0) {
                Ok(k) => node = self.nodes[node].children[k].1 as usize,
                Err(_) => break,
            }
            if let Some((id, control)) = self.nodes[node].token
                && (with_control || !control)
            {
                best = Some((start + i + 1, id));
            }
        }
        best
    }

    /// Split `text` into plain text and verbatim tokens. With `with_control`
    /// false only user-defined (non-control) tokens are recognised.
    pub(crate) fn split<'a>(&self, text: &'a str, with_control: bool) -> Vec<Segment<'a>> {
        let mut out = Vec::new();
        if self.is_empty() {
            if !text.is_empty() {
                out.push(Segment::Text(text));
            }
            return out;
        }
        let bytes = text.as_bytes();
        let mut plain_start = 0;
        let mut pos = 0;
        while pos < bytes.len() {
            if self.first[bytes[pos] as usize]
                && let Some((end, id)) = self.longest_at(bytes, pos, with_control)
            {
                if plain_start < pos {
                    out.push(Segment::Text(&text[plain_start..pos]));
                }
                out.push(Segment::Token(id));
                pos = end;
                plain_start = end;
                continue;
            }
            pos += 1;
        }
        if plain_start < bytes.len() {
            out.push(Segment::Text(&text[plain_start..]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftmost_longest() {
        let m = SpecialMatcher::new([
            ("<a>", 1, true),
            ("<a><b>", 2, true),
            ("\n", 3, false),
            ("\n\n", 4, false),
        ]);
        assert_eq!(
            m.split("x<a><b>y<a>\n\n\nz", true),
            vec![
                Segment::Text("x"),
                Segment::Token(2),
                Segment::Text("y"),
                Segment::Token(1),
                Segment::Token(4),
                Segment::Token(3),
                Segment::Text("z"),
            ]
        );
        assert_eq!(
            m.split("<a>\n", false),
            vec![Segment::Text("<a>"), Segment::Token(3)]
        );
        assert_eq!(m.split("", true), vec![]);
    }

    #[test]
    fn multibyte_text_is_kept_whole() {
        let m = SpecialMatcher::new([("<s>", 7, true)]);
        assert_eq!(
            m.split("é<s>東京", true),
            vec![Segment::Text("é"), Segment::Token(7), Segment::Text("東京")]
        );
    }
}

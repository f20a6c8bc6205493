//! SentencePiece BPE (`tokenizer.ggml.model = llama`): Llama 2, Gemma.
//!
//! The algorithm is llama.cpp's `llm_tokenizer_spm` in the form Hugging Face
//! runs it (the reference ids come from there):
//!
//! 1. the caller has replaced spaces with `▁` (U+2581) and added any prefix;
//! 2. each character becomes its piece, or its UTF-8 bytes as `<0xXX>` byte
//!    tokens when the vocabulary has no such piece (byte fallback), or UNK;
//! 3. adjacent symbols whose concatenation is a piece are merged, best merge
//!    first, from a priority queue; ties go to the leftmost pair.
//!
//! "Best" is the higher score ([`MergeOrder::Score`], SentencePiece) or the
//! lower id ([`MergeOrder::VocabOrder`], Gemma), then the longer left part.
//! Because every symbol is a vocabulary piece from step 2 on, nothing needs
//! re-segmenting afterwards.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

// `tokenizers` re-exports its fast-hashing string map; lookups of piece
// concatenations are the hot loop here.
use tokenizers::models::bpe::Vocab as PieceMap;

use super::parts::{MergeOrder, TokenType};
use crate::{Error, Result};

/// The SentencePiece merge table over one vocabulary.
#[derive(Debug)]
pub(crate) struct SentencePiece {
    /// Piece text → id, as merges look pieces up.
    ids: PieceMap,
    /// The text each id is looked up by (Gemma's space runs spelled with `▁`).
    pieces: Vec<String>,
    /// Characters in each piece (the tie-break between splits of one piece).
    piece_chars: Vec<u32>,
    /// Sort key of a merge producing this id; lower merges first.
    priority: Vec<u32>,
    /// `<0xXX>` token of each byte.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
}

/// Whether `t` is a run of whitespace containing a space (Gemma's `"  "`).
pub(crate) fn is_space_run(t: &str) -> bool {
    !t.is_empty() && t.contains(' ') && t.chars().all(char::is_whitespace)
}

/// The byte a `<0xXX>` token stands for.
pub(crate) fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Orders f32 as u32 so that a larger score gives a smaller key.
fn score_key(score: f32) -> u32 {
    let bits = (-score).to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

/// (priority of the merged piece, longer left part first, longer right part
/// first, merged id, position): the smallest merges first.
type MergeKey = (u32, Reverse<u32>, Reverse<u32>, u32, usize);

/// A candidate merge of the symbol at `left` with its right neighbour.
/// Ordered so that the max-heap pops the best merge, then the leftmost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate {
    key: Reverse<MergeKey>,
    left: usize,
    left_id: u32,
    right_id: u32,
    merged: u32,
}

impl SentencePiece {
    /// Build the table. `types` and `scores` may be empty (all normal, all
    /// zero); with `space_run_tokens`, whitespace-run tokens are looked up as
    /// runs of `▁`.
    pub(crate) fn new(
        tokens: &[String],
        types: &[TokenType],
        scores: &[f32],
        order: MergeOrder,
        space_run_tokens: bool,
        unk: Option<u32>,
    ) -> Result<Self> {
        let n = tokens.len();
        if n > u32::MAX as usize {
            return Err(Error::Tokenizer(format!("{n} tokens do not fit u32 ids")));
        }
        let mut ids = PieceMap::default();
        ids.reserve(n);
        let mut pieces = Vec::with_capacity(n);
        let mut piece_chars = Vec::with_capacity(n);
        let mut priority = Vec::with_capacity(n);
        let mut byte_ids = [None; 256];
        for (i, t) in tokens.iter().enumerate() {
            let piece = if space_run_tokens && is_space_run(t) {
                "▁".repeat(t.chars().count())
            } else {
                t.clone()
            };
            // A later duplicate wins, as in a dictionary built in vocabulary order.
            ids.insert(piece.clone(), i as u32);
            piece_chars.push(piece.chars().count() as u32);
            pieces.push(piece);
            priority.push(match order {
                MergeOrder::VocabOrder => i as u32,
                MergeOrder::Score => score_key(scores.get(i).copied().unwrap_or(0.0)),
            });
            let is_byte = types.get(i).is_none_or(|ty| *ty == TokenType::Byte);
            if is_byte && let Some(b) = parse_byte_token(t) {
                byte_ids[b as usize].get_or_insert(i as u32);
            }
        }
        Ok(SentencePiece {
            ids,
            pieces,
            piece_chars,
            priority,
            byte_ids,
            unk,
        })
    }

    /// The merge of `left` and `right` ids, if their concatenation is a piece.
    fn candidate(&self, buf: &mut String, pos: usize, left: u32, right: u32) -> Option<Candidate> {
        buf.clear();
        buf.push_str(&self.pieces[left as usize]);
        buf.push_str(&self.pieces[right as usize]);
        let merged = *self.ids.get(buf.as_str())?;
        let key = (
            self.priority[merged as usize],
            Reverse(self.piece_chars[left as usize]),
            Reverse(self.piece_chars[right as usize]),
            merged,
            pos,
        );
        Some(Candidate {
            key: Reverse(key),
            left: pos,
            left_id: left,
            right_id: right,
            merged,
        })
    }

    /// Append the ids of one normalized text segment (spaces already `▁`).
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        let mut last_was_unk = false;
        let mut cbuf = [0u8; 4];
        let push = |syms: &mut Vec<Symbol>, id: u32| {
            let idx = syms.len();
            if let Some(p) = syms.last_mut() {
                p.next = Some(idx);
            }
            syms.push(Symbol {
                id,
                prev: idx.checked_sub(1),
                next: None,
                alive: true,
            });
        };
        for c in text.chars() {
            let s: &str = c.encode_utf8(&mut cbuf);
            if let Some(&id) = self.ids.get(s) {
                push(&mut syms, id);
                last_was_unk = false;
            } else if let Some(bytes) = s
                .bytes()
                .map(|b| self.byte_ids[b as usize])
                .collect::<Option<Vec<u32>>>()
            {
                for id in bytes {
                    push(&mut syms, id);
                }
                last_was_unk = false;
            } else if let Some(unk) = self.unk {
                // Consecutive unknown characters fuse into one UNK.
                if !last_was_unk {
                    push(&mut syms, unk);
                }
                last_was_unk = true;
            } else {
                return Err(Error::Tokenizer(format!(
                    "character {c:?} has no piece, no byte tokens and the vocabulary has no unknown token"
                )));
            }
        }

        let mut buf = String::new();
        let mut heap = BinaryHeap::new();
        for i in 1..syms.len() {
            if let Some(c) = self.candidate(&mut buf, i - 1, syms[i - 1].id, syms[i].id) {
                heap.push(c);
            }
        }
        while let Some(c) = heap.pop() {
            let left = syms[c.left];
            let Some(right_pos) = left.next else { continue };
            // Skip candidates made stale by an earlier merge.
            if !left.alive || left.id != c.left_id || syms[right_pos].id != c.right_id {
                continue;
            }
            let right = syms[right_pos];
            syms[c.left].id = c.merged;
            syms[c.left].next = right.next;
            syms[right_pos].alive = false;
            if let Some(nn) = right.next {
                syms[nn].prev = Some(c.left);
            }
            if let Some(p) = left.prev
                && let Some(nc) = self.candidate(&mut buf, p, syms[p].id, c.merged)
            {
                heap.push(nc);
            }
            if let Some(nn) = right.next
                && let Some(nc) = self.candidate(&mut buf, c.left, c.merged, syms[nn].id)
            {
                heap.push(nc);
            }
        }

        let mut cur = if syms.is_empty() { None } else { Some(0) };
        while let Some(i) = cur {
            out.push(syms[i].id);
            cur = syms[i].next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(tokens: &[&str], order: MergeOrder, scores: &[f32]) -> SentencePiece {
        let tokens: Vec<String> = tokens.iter().map(|s| s.to_string()).collect();
        SentencePiece::new(&tokens, &[], scores, order, true, Some(0)).unwrap()
    }

    fn enc(t: &SentencePiece, s: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.encode(s, &mut out).unwrap();
        out
    }

    #[test]
    fn score_order_picks_highest_score() {
        //            0       1    2    3    4     5     6
        let toks = ["<unk>", "a", "b", "c", "ab", "bc", "abc"];
        // "bc" scores higher than "ab": a + bc, then abc.
        let t = table(
            &toks,
            MergeOrder::Score,
            &[0.0, 0.0, 0.0, 0.0, -2.0, -1.0, -3.0],
        );
        assert_eq!(enc(&t, "abc"), vec![6]);
        assert_eq!(enc(&t, "abcab"), vec![6, 4]);
        // With no "abc", the better pair wins and the rest stays.
        let t = table(
            &toks[..6],
            MergeOrder::Score,
            &[0.0, 0.0, 0.0, 0.0, -2.0, -1.0],
        );
        assert_eq!(enc(&t, "abc"), vec![1, 5]);
        let t = table(
            &toks[..6],
            MergeOrder::Score,
            &[0.0, 0.0, 0.0, 0.0, -1.0, -2.0],
        );
        assert_eq!(enc(&t, "abc"), vec![4, 3]);
    }

    #[test]
    fn vocab_order_ignores_scores_and_ties_go_left() {
        let toks = ["<unk>", "a", "aa", "b", "ab"];
        let t = table(&toks, MergeOrder::VocabOrder, &[0.0, 0.0, -9.0, 0.0, 5.0]);
        // "aa" (id 2) before "ab" (id 4) regardless of score; leftmost "aa" first.
        assert_eq!(enc(&t, "aaab"), vec![2, 4]);
        assert_eq!(enc(&t, "aaa"), vec![2, 1]);
    }

    #[test]
    fn byte_fallback_and_unk() {
        let mut toks: Vec<String> = vec!["<unk>".into(), "▁".into(), "x".into()];
        for b in 0..=255u8 {
            toks.push(format!("<0x{b:02X}>"));
        }
        let t = SentencePiece::new(&toks, &[], &[], MergeOrder::Score, false, Some(0)).unwrap();
        let mut out = Vec::new();
        t.encode("x▁é", &mut out).unwrap();
        assert_eq!(out, vec![2, 1, 3 + 0xC3, 3 + 0xA9]);

        let t = table(&["<unk>", "x"], MergeOrder::Score, &[]);
        assert_eq!(enc(&t, "xéèx"), vec![1, 0, 1]);
    }

    #[test]
    fn space_runs_merge_as_pieces() {
        // Gemma stores "  " as real spaces; it must merge from "▁▁".
        let toks = ["<unk>", "▁", "  ", "a", "▁a"];
        let t = table(&toks, MergeOrder::VocabOrder, &[]);
        assert_eq!(enc(&t, "a▁▁a"), vec![3, 2, 3]);
        assert_eq!(enc(&t, "a▁a"), vec![3, 4]);
    }
}

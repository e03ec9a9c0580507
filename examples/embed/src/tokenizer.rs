//! BERT's uncased WordPiece tokenizer, as Hugging Face's `BertTokenizer` runs it for
//! all-MiniLM-L6-v2 (`do_lower_case`, Chinese characters split, accents stripped):
//!
//! 1. clean: drop NUL, U+FFFD and control characters; every whitespace becomes a space;
//! 2. put spaces around CJK ideographs; split on whitespace;
//! 3. lowercase, decompose (NFD) and drop combining marks; split off punctuation;
//! 4. WordPiece: the longest vocabulary entry from the start of each word, then `##`
//!    continuations; a word that cannot be covered (or is over 100 characters) is `[UNK]`.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

include!(concat!(env!("OUT_DIR"), "/vocab.rs"));

/// Longest word WordPiece tries to split.
const MAX_WORD_CHARS: usize = 100;

/// The id of `token`, if the vocabulary has it.
pub fn id(token: &str) -> Option<u32> {
    VOCAB
        .binary_search_by(|(t, _)| (*t).cmp(token))
        .ok()
        .map(|i| VOCAB[i].1)
}

/// Special tokens' ids.
pub struct Specials {
    pub cls: u32,
    pub sep: u32,
    pub pad: u32,
    pub unk: u32,
}

/// The ids of `[CLS]`, `[SEP]`, `[PAD]` and `[UNK]`.
pub fn specials() -> Specials {
    Specials {
        cls: id("[CLS]").unwrap_or(101),
        sep: id("[SEP]").unwrap_or(102),
        pad: id("[PAD]").unwrap_or(0),
        unk: id("[UNK]").unwrap_or(100),
    }
}

/// `[CLS] wordpieces… [SEP]`, the wordpieces cut to fit `max_len` ids in all.
pub fn encode(text: &str, max_len: usize) -> Vec<u32> {
    let s = specials();
    let mut ids = vec![s.cls];
    for word in basic(text) {
        wordpiece(&word, s.unk, &mut ids);
        if ids.len() >= max_len - 1 {
            ids.truncate(max_len - 1);
            break;
        }
    }
    ids.push(s.sep);
    ids
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || c.general_category() == GeneralCategory::SpaceSeparator
}

fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.general_category_group() == GeneralCategoryGroup::Other
}

fn is_punctuation(c: char) -> bool {
    let cp = c as u32;
    (33..=47).contains(&cp)
        || (58..=64).contains(&cp)
        || (91..=96).contains(&cp)
        || (123..=126).contains(&cp)
        || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Steps 1 to 3: the words WordPiece splits.
fn basic(text: &str) -> Vec<String> {
    let mut clean = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_cjk(c) {
            clean.push(' ');
            clean.push(c);
            clean.push(' ');
        } else if is_whitespace(c) {
            clean.push(' ');
        } else {
            clean.push(c);
        }
    }
    let mut words = Vec::new();
    for token in clean.split(' ').filter(|t| !t.is_empty()) {
        let stripped: String = token
            .to_lowercase()
            .nfd()
            .filter(|c| c.general_category() != GeneralCategory::NonspacingMark)
            .collect();
        let mut current = String::new();
        for c in stripped.chars() {
            if is_punctuation(c) {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
    }
    words
}

/// Step 4 for one word, its ids appended to `ids`.
fn wordpiece(word: &str, unk: u32, ids: &mut Vec<u32>) {
    let chars: Vec<(usize, char)> = word.char_indices().collect();
    if chars.len() > MAX_WORD_CHARS {
        ids.push(unk);
        return;
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut piece = String::new();
    while start < chars.len() {
        let mut end = chars.len();
        let mut found = None;
        while start < end {
            let from = chars[start].0;
            let to = chars.get(end).map_or(word.len(), |(i, _)| *i);
            piece.clear();
            if start > 0 {
                piece.push_str("##");
            }
            piece.push_str(&word[from..to]);
            if let Some(id) = id(&piece) {
                found = Some(id);
                break;
            }
            end -= 1;
        }
        match found {
            Some(id) => pieces.push(id),
            None => {
                ids.push(unk);
                return;
            }
        }
        start = end;
    }
    ids.extend(pieces);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_as_bert_splits_them() {
        assert_eq!(basic("Héllo, World!"), ["hello", ",", "world", "!"]);
        assert_eq!(basic("a\tb\u{0}c 中文"), ["a", "bc", "中", "文"]);
    }
}

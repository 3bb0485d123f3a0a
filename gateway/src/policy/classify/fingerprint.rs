//! Fingerprints: a hash of the normalized token stream, the scope of fingerprint approvals.

use super::split::is_trivia;
use super::*;

pub(super) fn hash_text(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

pub(super) fn fingerprint(tokens: &[TokenWithSpan]) -> u64 {
    let mut norm = String::with_capacity(tokens.len() * 6);
    let significant = tokens.iter().map(|t| &t.token).filter(|t| !is_trivia(t));
    for t in significant {
        if !norm.is_empty() {
            norm.push(' ');
        }
        match t {
            Token::Word(w) if w.quote_style.is_none() => {
                norm.push_str(&w.value.to_ascii_lowercase())
            }
            Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::Placeholder(_) => norm.push('?'),
            other => norm.push_str(&other.to_string()),
        }
    }
    let trimmed = norm.trim_matches(|c| c == ';' || c == ' ');
    hash_text(trimmed)
}

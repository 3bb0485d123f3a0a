//! The shape scanner: a text with its literals blanked, when a simple scan can place them exactly
//! as PostgreSQL and sqlparser do.

/// Writes into `out` the shape of `sql`: NUL, then the text with each numeric literal replaced by
/// `?` and the inside of each string literal by `?`; everything else (words, quoted identifiers,
/// comments, operators) is kept byte for byte. Two texts of one shape differ only inside literals,
/// so they parse to the same tree with other constants. Returns false, leaving `out` unspecified,
/// for any text whose literal boundaries a simple scanner could place differently from
/// PostgreSQL or sqlparser: backslashes (escape strings, `standard_conforming_strings = off`),
/// `$` (dollar quotes, parameters), `U&` literals, nested or unterminated comments and quotes.
pub(super) fn shape_key(sql: &str, out: &mut String) -> bool {
    shape_key_with(sql, out, true)
}

/// [`shape_key`] that blanks numeric literals only, keeping string literals byte for byte: for
/// analyses a string's content can change (a json key: `->> 'ssn'`) but a number's cannot.
pub(crate) fn numeric_shape_key(sql: &str, out: &mut String) -> bool {
    shape_key_with(sql, out, false)
}

fn shape_key_with(sql: &str, out: &mut String, blank_strings: bool) -> bool {
    let b = sql.as_bytes();
    let is_word_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
    if memchr::memchr2(b'\\', b'$', b).is_some() || has_unicode_literal(b) {
        return false;
    }
    out.clear();
    out.push('\0');
    let mut copied = 0; // b[copied..i] is still to be copied verbatim
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => {
                // A string literal; `''` is a quote inside it.
                let Some(end) = closing_quote(b, i + 1, b'\'') else {
                    return false;
                };
                if blank_strings {
                    out.push_str(&sql[copied..=i]);
                    out.push_str("?'");
                    copied = end + 1;
                }
                i = end + 1;
            }
            b'"' => match closing_quote(b, i + 1, b'"') {
                Some(end) => i = end + 1,
                None => return false,
            },
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n' || c == b'\r')
                    .map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let body = &sql[i + 2..];
                let Some(end) = body.find("*/") else {
                    return false;
                };
                if body[..end].contains("/*") {
                    return false;
                }
                i += 2 + end + 2;
            }
            c if c.is_ascii_digit()
                && (i == 0 || !(is_word_byte(b[i - 1]) || b[i - 1] == b'.')) =>
            {
                let end = number_end(b, i);
                if b.get(end).is_some_and(|&c| is_word_byte(c) || c == b'.') {
                    // `1abc`, `1.`, `0x1f`: not a plain number to both lexers; keep it.
                    i = end;
                    continue;
                }
                out.push_str(&sql[copied..i]);
                out.push('?');
                i = end;
                copied = i;
            }
            // Words, spaces and operators: on to the next byte the scan has to look at.
            _ => {
                i += 1;
                while i < b.len() && !STOPS[usize::from(b[i])] {
                    i += 1;
                }
            }
        }
    }
    out.push_str(&sql[copied..]);
    true
}

/// The bytes where the scan has something to decide: quotes, the first byte of a comment, and
/// digits. Statements are mostly words, which are passed over a table lookup at a time.
const STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    stops[b'\'' as usize] = true;
    stops[b'"' as usize] = true;
    stops[b'-' as usize] = true;
    stops[b'/' as usize] = true;
    let mut digit = b'0';
    while digit <= b'9' {
        stops[digit as usize] = true;
        digit += 1;
    }
    stops
};

/// `U&'..'` and `U&"..."`, whose escapes a plain scanner does not read.
fn has_unicode_literal(b: &[u8]) -> bool {
    memchr::memchr_iter(b'&', b).any(|i| i > 0 && b[i - 1] | 0x20 == b'u')
}

/// The index of the quote closing a literal opened just before `from`, skipping doubled quotes.
fn closing_quote(b: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    loop {
        i += b[i..].iter().position(|&c| c == quote)?;
        if b.get(i + 1) == Some(&quote) {
            i += 2;
        } else {
            return Some(i);
        }
    }
}

/// The end of the number starting at `start`: digits, an optional fraction, an optional exponent.
fn number_end(b: &[u8], start: usize) -> usize {
    let digits = |i: usize| i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = digits(start);
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        i = digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign);
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan as it was before it skipped words by table and searched with memchr: one byte
    /// at a time, every byte through the match. The fast scan must agree with it on every text.
    fn byte_at_a_time(sql: &str, out: &mut String, blank_strings: bool) -> bool {
        let b = sql.as_bytes();
        let is_word_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80;
        if b.iter().any(|&c| c == b'\\' || c == b'$')
            || b.windows(2).any(|w| w[0] | 0x20 == b'u' && w[1] == b'&')
        {
            return false;
        }
        out.clear();
        out.push('\0');
        let mut copied = 0;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\'' => {
                    let Some(end) = closing_quote(b, i + 1, b'\'') else {
                        return false;
                    };
                    if blank_strings {
                        out.push_str(&sql[copied..=i]);
                        out.push_str("?'");
                        copied = end + 1;
                    }
                    i = end + 1;
                }
                b'"' => match closing_quote(b, i + 1, b'"') {
                    Some(end) => i = end + 1,
                    None => return false,
                },
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    i = b[i..]
                        .iter()
                        .position(|&c| c == b'\n' || c == b'\r')
                        .map_or(b.len(), |n| i + n);
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    let body = &sql[i + 2..];
                    let Some(end) = body.find("*/") else {
                        return false;
                    };
                    if body[..end].contains("/*") {
                        return false;
                    }
                    i += 2 + end + 2;
                }
                c if c.is_ascii_digit()
                    && (i == 0 || !(is_word_byte(b[i - 1]) || b[i - 1] == b'.')) =>
                {
                    let end = number_end(b, i);
                    if b.get(end).is_some_and(|&c| is_word_byte(c) || c == b'.') {
                        i = end;
                        continue;
                    }
                    out.push_str(&sql[copied..i]);
                    out.push('?');
                    i = end;
                    copied = i;
                }
                _ => i += 1,
            }
        }
        out.push_str(&sql[copied..]);
        true
    }

    /// Texts made of the pieces that decide a literal's bounds, side by side in every order:
    /// quotes doubled and not, comments nested and not, numbers glued to words, dots and
    /// exponents, the bytes that refuse a text (`\`, `$`, `U&`), and non-ASCII letters.
    #[test]
    fn the_fast_scan_agrees_with_a_byte_at_a_time_scan() {
        const PIECES: &[&str] = &[
            "SELECT", " ", "a", "t1", "_x", "é", "'", "''", "'abc'", "\"", "\"id\"", "-", "--",
            "/", "/*", "*/", "*", "\n", "\r", "1", "23", "4.5", "1e5", "2E-3", ".", "e", "0x1f",
            "\\", "$", "$1", "u", "U&", "&", "->", "#>", "[", "]", "=", ";", "(", ")", "+",
        ];
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15);
        let (mut fast, mut slow) = (String::new(), String::new());
        let mut shaped = 0;
        for _ in 0..50_000 {
            let text: String = (0..1 + next(12))
                .map(|_| PIECES[next(PIECES.len())])
                .collect();
            for blank_strings in [true, false] {
                let f = shape_key_with(&text, &mut fast, blank_strings);
                let s = byte_at_a_time(&text, &mut slow, blank_strings);
                assert_eq!(f, s, "{text:?} (blank strings: {blank_strings})");
                if f {
                    assert_eq!(fast, slow, "{text:?} (blank strings: {blank_strings})");
                    shaped += 1;
                }
            }
        }
        assert!(shaped > 20_000, "too few texts had a shape: {shaped}");
    }
}

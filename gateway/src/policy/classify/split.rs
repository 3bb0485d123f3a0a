//! Statement splitting: the request text is tokenized once and cut at top-level `;`, and each
//! fragment is parsed on its own, so one statement sqlparser rejects does not hide the others.

use super::fingerprint::{fingerprint, hash_text};
use super::keywords::classify_by_keywords;
use super::visitor::classify_statement;
use super::*;

pub(super) fn classify_unguarded(sql: &str) -> Classification {
    let dialect = PostgreSqlDialect {};
    let tokens = match Tokenizer::new(&dialect, sql).tokenize_with_location() {
        Ok(t) => t,
        Err(e) => {
            return Classification {
                statements: vec![StatementClass::unparsable(e.to_string())],
                fingerprint: hash_text(sql),
            };
        }
    };
    let fingerprint = fingerprint(&tokens);
    // `U&"\0070g_read_file"` is one identifier to PostgreSQL, but sqlparser reads `U & "..."`.
    if has_unicode_identifier(sql) {
        return Classification {
            statements: vec![StatementClass::unparsable(
                "Unicode-escaped identifiers (U&\"...\") are not supported".into(),
            )],
            fingerprint,
        };
    }
    if tokens.iter().all(|t| is_trivia(&t.token)) {
        return Classification {
            statements: Vec::new(),
            fingerprint,
        };
    }
    // Split at every `;` token (those in strings, comments and dollar quotes are inside other
    // tokens), as PostgreSQL does, rather than trusting sqlparser's statement boundaries: its COPY
    // parser takes everything after `COPY .. FROM STDIN;` as inline data, which would hide
    // `COPY t FROM STDIN; DROP TABLE t`. A statement sqlparser cannot parse does not hide the others,
    // and the few it cannot parse at all (DO, LOCK, ALTER SYSTEM, ...) get their proper class.
    let statements = tokens
        .split(|t| t.token == Token::SemiColon)
        .filter(|frag| !frag.iter().all(|t| is_trivia(&t.token)))
        .flat_map(classify_fragment)
        .collect();
    Classification {
        statements,
        fingerprint,
    }
}

pub(super) fn is_trivia(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::EOF)
}

fn has_unicode_identifier(sql: &str) -> bool {
    sql.as_bytes()
        .windows(3)
        .any(|w| w[0] | 0x20 == b'u' && w[1] == b'&' && w[2] == b'"')
}

/// Classifies the tokens of one statement (no `;` among them).
fn classify_fragment(frag: &[TokenWithSpan]) -> Vec<StatementClass> {
    let parse = |tokens: Vec<TokenWithSpan>| {
        Parser::new(&PostgreSqlDialect {})
            .with_tokens_with_locations(tokens)
            .parse_statements()
    };
    let first = first_word(frag);
    let mut parsed = if first.is_some_and(|w| w.eq_ignore_ascii_case("TABLE")) {
        // `TABLE t ...` is `SELECT * FROM t ...`, which sqlparser does take.
        let mut tokens = Vec::with_capacity(frag.len() + 2);
        let mut replaced = false;
        for t in frag {
            if !replaced && !is_trivia(&t.token) {
                replaced = true;
                tokens.extend(
                    [
                        Token::make_keyword("SELECT"),
                        Token::Mul,
                        Token::Whitespace(sqlparser::tokenizer::Whitespace::Space),
                        Token::make_keyword("FROM"),
                    ]
                    .map(TokenWithSpan::wrap),
                );
            } else {
                tokens.push(t.clone());
            }
        }
        parse(tokens)
    } else {
        parse(frag.to_vec())
    };
    if parsed.is_err() && first.is_some_and(|w| w.eq_ignore_ascii_case("COPY")) {
        // sqlparser wants `COPY .. FROM STDIN` followed by `;` and inline data up to `\.`; on the
        // wire the data comes in CopyData messages, so supply an empty data section.
        let mut tokens = frag.to_vec();
        tokens.extend([Token::SemiColon, Token::Backslash, Token::Period].map(TokenWithSpan::wrap));
        parsed = parse(tokens);
    }
    match parsed {
        // Anything taken as inline data was statement text.
        Ok(stmts)
            if stmts
                .iter()
                .any(|s| matches!(s, Statement::Copy { values, .. } if !values.is_empty())) =>
        {
            vec![StatementClass::unparsable(
                "unexpected text after COPY .. FROM STDIN".into(),
            )]
        }
        Ok(stmts) => stmts.iter().map(classify_statement).collect(),
        Err(e) => vec![
            classify_by_keywords(frag).unwrap_or_else(|| StatementClass::unparsable(e.to_string())),
        ],
    }
}

fn first_word(frag: &[TokenWithSpan]) -> Option<&str> {
    match &frag.iter().find(|t| !is_trivia(&t.token))?.token {
        Token::Word(w) if w.quote_style.is_none() => Some(&w.value),
        _ => None,
    }
}

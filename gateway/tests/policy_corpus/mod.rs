//! Statements and a deterministic mangler shared by the classification property tests.

/// Statements for the properties below: every class, with literals, comments and quoting.
pub const CORPUS: &[&str] = &[
    "SELECT 1",
    "SELECT * FROM users WHERE email = 'a@b.c'",
    "WITH x AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM x",
    "INSERT INTO t (a) VALUES ($1)",
    "UPDATE t SET a = 'it''s' WHERE id = 2",
    "DELETE FROM t",
    "TRUNCATE t",
    "DROP TABLE t",
    "CREATE TABLE x AS SELECT 1",
    "GRANT ALL ON t TO bob",
    "VACUUM",
    "SELECT pg_read_file('/etc/passwd')",
    "COPY t TO PROGRAM 'id'",
    "COPY t FROM STDIN",
    "COPY t TO STDOUT",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "DO $$ BEGIN END $$",
    "CALL p()",
    "BEGIN",
    "SET search_path = public",
    "SELECT $a$ ; DROP TABLE t $a$",
    "SELECT /* ; DROP TABLE t */ 1",
    "SELECT 1 -- ; DROP TABLE t",
    "SELECT \"pg_read_file\"('x')",
    "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
    "SELEKT 1",
    "SELECT E'\\\\'",
];

/// One of `bases` with 1-4 tricky pieces inserted at random places.
pub fn mangle_from(bases: &[&str], next: &mut impl FnMut() -> u64) -> String {
    const PIECES: &[&str] = &[
        "'",
        "\"",
        "$$",
        "$a$",
        "/*",
        "*/",
        "--",
        "\n",
        ";",
        "(",
        ")",
        "\\",
        "E'",
        "U&'",
        "::",
        "DROP TABLE t",
        "; DROP TABLE t",
        "pg_read_file(",
        " ",
        "SELECT",
        ",",
        "\r",
        "\u{0}",
        "é",
        "$1",
        "''",
    ];
    let mut s = bases[(next() as usize) % bases.len()].to_owned();
    for _ in 0..(next() % 4 + 1) {
        let piece = PIECES[(next() as usize) % PIECES.len()];
        let mut at = (next() as usize) % (s.len() + 1);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.insert_str(at, piece);
    }
    s
}

/// Deterministic xorshift, so every run tries the same cases.
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

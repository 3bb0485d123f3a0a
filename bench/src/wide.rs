//! The harness's wide-row table, `bench_wide` (`runner.rs` creates and fills it), for the benches
//! that play its rows without a server.

/// Its columns, in order, with their type oids (int4, then text).
pub const COLUMNS: [(&str, u32); 6] = [
    ("id", 23),
    ("customer", 25),
    ("email", 25),
    ("card_number", 25),
    ("city", 25),
    ("note", 25),
];

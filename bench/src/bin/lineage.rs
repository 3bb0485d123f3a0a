//! Column lineage cost per statement, cold (parse, resolve, walk) and cached (the per-session
//! cache hit plus pairing the result with its statement: what the data path pays per result set),
//! and the wide-row workload's masking CPU per query with rules following lineage against the same
//! rules matched by column name only (the code before lineage), in one run.
//!
//! `cargo run --release -p portcullis-bench --bin lineage [-- --iterations N]`
//!
//! Each figure is the median over batches of the per-call time within a batch. Goal for cached
//! statements: under 2 µs.

use std::hint::black_box;

#[path = "../wide.rs"]
mod wide;
use std::sync::Arc;
use std::time::Instant;

use portcullis::mask::lineage::{self, Catalog, SessionLineage, SourceColumn};
use portcullis::mask::{Column, MaskRules, Masker};

const MIX: &[(&str, &str)] = &[
    (
        "wide rows",
        "SELECT id, customer, email, card_number, city, note FROM bench_wide WHERE id BETWEEN $1 AND $1 + 99",
    ),
    (
        "point select",
        "SELECT id, email, name FROM users WHERE id = $1",
    ),
    ("star", "SELECT * FROM users WHERE id = $1"),
    (
        "join + group",
        "SELECT u.id, u.name, count(o.id) AS orders, sum(o.total) FROM users u \
         LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.id, u.name ORDER BY orders DESC LIMIT 50",
    ),
    (
        "cte report",
        "WITH recent AS (SELECT user_id, total FROM orders WHERE created_at > $1), \
         big AS (SELECT user_id, sum(total) s FROM recent GROUP BY user_id) \
         SELECT u.email, b.s FROM big b JOIN users u ON u.id = b.user_id ORDER BY b.s DESC",
    ),
    (
        "json",
        "SELECT row_to_json(u), json_agg(o) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.*",
    ),
    ("view", "SELECT * FROM active_users"),
    (
        "derived",
        "SELECT upper(password_hash) AS x, substr(ssn, 1, 3) FROM users",
    ),
];

fn catalog(masker: &Masker) -> Catalog {
    let mut c = Catalog::default();
    let tables: &[(&str, &[(&str, u32)])] = &[
        ("bench_wide", &wide::COLUMNS),
        (
            "users",
            &[
                ("id", 23),
                ("name", 25),
                ("email", 25),
                ("ssn", 25),
                ("password_hash", 25),
                ("created_at", 1184),
            ],
        ),
        (
            "orders",
            &[
                ("id", 23),
                ("user_id", 23),
                ("total", 1700),
                ("created_at", 1184),
            ],
        ),
        ("active_users", &[("id", 23), ("email", 25)]),
    ];
    for (oid, (table, cols)) in tables.iter().enumerate() {
        for (i, (col, ty)) in cols.iter().enumerate() {
            c.add_column(SourceColumn {
                schema: "public".into(),
                table: (*table).into(),
                column: (*col).into(),
                type_oid: *ty,
                table_oid: 16384 + oid as u32,
                attnum: i as i16 + 1,
            });
        }
    }
    c.set_view(
        "public",
        "active_users",
        "SELECT id, email FROM users WHERE created_at > now() - interval '1 day'",
    );
    c.set_search_path(vec!["public".into()]);
    masker.mark_catalog(&mut c);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn measure(batches: usize, per_batch: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..per_batch {
        f();
    }
    let samples = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_batch {
                f();
            }
            start.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    median(samples)
}

/// 100 wide rows as DataRow bodies, 10% with an email and a card, as bench/src/runner.rs seeds them.
fn wide_rows() -> Vec<Vec<u8>> {
    let cards = [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
    ];
    let cities = ["Lisbon", "Osaka", "Denver", "Nairobi", "Oslo", "Quito"];
    (1..=100u32)
        .map(|g| {
            let pii = g % 10 == 3;
            let email = format!("customer{g}@example.com");
            let values: [Option<String>; 6] = [
                Some(g.to_string()),
                Some(format!("customer {g}")),
                pii.then_some(email),
                pii.then(|| cards[g as usize % 4].to_owned()),
                Some(cities[g as usize % 6].to_owned()),
                Some(format!(
                    "{:048x}",
                    u64::from(g).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )),
            ];
            let mut body = 6u16.to_be_bytes().to_vec();
            for v in values {
                match v {
                    Some(v) => {
                        body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        body.extend_from_slice(v.as_bytes());
                    }
                    None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
            body
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: usize = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let masker = Masker::new(&MaskRules::builtin_pii()).expect("built-in rules");
    let catalog = Arc::new(catalog(&masker));
    println!("{:<14} {:>10} {:>12}", "statement", "cold µs", "cached µs");
    let mut cached_all = Vec::new();
    let mut cold_all = Vec::new();
    for (name, sql) in MIX {
        let cold = measure(20, scale.max(10), || {
            black_box(lineage::analyze(
                black_box(sql),
                &catalog,
                catalog.search_path(),
            ));
        });
        let mut session = SessionLineage::new(catalog.clone());
        let cached = measure(50, scale * 100, || {
            session.set_current(Some(black_box(sql)), 0);
            black_box(session.current_output().columns.len());
        });
        println!(
            "{name:<14} {:>10.2} {:>12.3}",
            cold / 1000.0,
            cached / 1000.0
        );
        cold_all.push(cold);
        cached_all.push(cached);
    }
    let worst = cached_all.iter().copied().fold(0.0, f64::max);
    println!(
        "median over the mix: cold {:.2} µs, cached {:.3} µs (worst {:.3} µs; goal < 2 µs: {})",
        median(cold_all) / 1000.0,
        median(cached_all) / 1000.0,
        worst / 1000.0,
        if worst < 2000.0 { "met" } else { "NOT met" }
    );

    // One wide-rows query: plan the result (RowDescription) and mask its 100 rows.
    let names = ["id", "customer", "email", "card_number", "city", "note"];
    let types = [23u32, 25, 25, 25, 25, 25];
    let cols: Vec<Column<'_>> = names
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (n, t))| Column {
            name: n.as_bytes(),
            table_oid: 16384,
            attnum: i as i16 + 1,
            type_oid: t,
            format: 0,
        })
        .collect();
    let rows = wide_rows();
    let sql = MIX[0].1;
    let mut out = Vec::with_capacity(64 * 1024);
    let before = measure(30, scale * 2, || {
        let plan = masker.plan(&cols, &|_, _| None);
        for r in &rows {
            out.clear();
            black_box(plan.mask_data_row(black_box(r), &mut out).unwrap());
        }
    });
    let mut session = SessionLineage::new(catalog.clone());
    let after = measure(30, scale * 2, || {
        session.set_current(Some(sql), 0);
        let stmt = session.current_output();
        let plan = masker.plan_lineage(&cols, Some(&stmt), session.catalog());
        for r in &rows {
            out.clear();
            black_box(plan.mask_data_row(black_box(r), &mut out).unwrap());
        }
    });
    println!(
        "wide rows (100 rows, 10% PII), masking CPU per query: by name {:.1} µs, by lineage {:.1} µs ({:+.1}%)",
        before / 1000.0,
        after / 1000.0,
        (after / before - 1.0) * 100.0
    );
}

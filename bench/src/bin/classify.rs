//! Classification time per statement, cold (parse and walk) and cached (the per-worker
//! `ClassifyCache` hit, and a full `Policy::decide` on a cached statement: the data-path cost).
//!
//! `cargo run --release -p portcullis-bench --bin classify [-- --iterations N]`
//!
//! Each figure is the median over batches of the per-call time within a batch, so one slow batch
//! (another process on the core) does not move it. Goal for cached statements: at most 2 µs.

use std::hint::black_box;
use std::time::Instant;

use portcullis::policy::{self, ClassifyCache, Identity, Request, TargetRef, classify::classify};

/// A realistic mix: ORM reads, pgbench's transaction, writes, session chatter, and a long report.
const MIX: &[(&str, &str)] = &[
    (
        "point select",
        "SELECT id, email, name FROM users WHERE id = $1",
    ),
    (
        "pgbench select",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    ),
    (
        "pgbench update",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    ),
    (
        "pgbench insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    ),
    (
        "join + group",
        "SELECT u.id, u.name, count(o.id) AS orders, sum(o.total) FROM users u \
         LEFT JOIN orders o ON o.user_id = u.id WHERE u.created_at > now() - interval '30 days' \
         GROUP BY u.id, u.name ORDER BY orders DESC LIMIT 50",
    ),
    (
        "orm select",
        "SELECT \"orders\".\"id\", \"orders\".\"user_id\", \"orders\".\"status\", \"orders\".\"total\", \
         \"orders\".\"currency\", \"orders\".\"created_at\", \"orders\".\"updated_at\", \
         \"orders\".\"shipping_address\", \"orders\".\"billing_address\", \"orders\".\"notes\" \
         FROM \"orders\" WHERE \"orders\".\"user_id\" = $1 AND \"orders\".\"status\" IN ($2, $3, $4) \
         ORDER BY \"orders\".\"created_at\" DESC LIMIT $5 OFFSET $6",
    ),
    (
        "cte report",
        "WITH recent AS (SELECT user_id, total FROM orders WHERE created_at > $1), \
         big AS (SELECT user_id, sum(total) s FROM recent GROUP BY user_id HAVING sum(total) > 1000) \
         SELECT u.email, b.s FROM big b JOIN users u ON u.id = b.user_id ORDER BY b.s DESC",
    ),
    ("begin", "BEGIN"),
    ("commit", "COMMIT"),
    ("set", "SET application_name = 'worker-7'"),
    ("delete by id", "DELETE FROM sessions WHERE id = $1"),
    (
        "multi-statement",
        "SELECT 1; SELECT count(*) FROM users; SELECT now()",
    ),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median per-call nanoseconds of `f`, over `batches` batches of `per_batch` calls.
fn measure(batches: usize, per_batch: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..per_batch {
        f(); // warm up
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let scale: usize = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let policy = policy::load("default").expect("built-in policy");
    let id = Identity {
        agent: Some("claude-code"),
        groups: &[],
        ..Identity::default()
    };
    let target = TargetRef {
        name: "prod",
        database: "app",
    };
    println!(
        "{:<18} {:>12} {:>12} {:>14}",
        "statement", "cold µs", "cached µs", "decide µs"
    );
    let (mut cold_all, mut cached_all, mut decide_all) = (Vec::new(), Vec::new(), Vec::new());
    for (name, sql) in MIX {
        let cold = measure(20, scale.max(10), || {
            black_box(classify(black_box(sql)));
        });
        let mut cache = ClassifyCache::new(1024);
        let cached = measure(50, scale * 100, || {
            black_box(cache.classify(black_box(sql)));
        });
        let decide = measure(50, scale * 100, || {
            black_box(policy.decide(&id, &target, &Request::Query(black_box(sql)), &mut cache));
        });
        println!(
            "{name:<18} {:>12.2} {:>12.3} {:>14.3}",
            cold / 1000.0,
            cached / 1000.0,
            decide / 1000.0
        );
        cold_all.push(cold);
        cached_all.push(cached);
        decide_all.push(decide);
    }
    let (cold, cached, decide) = (
        median(cold_all),
        median(cached_all),
        median(decide_all.clone()),
    );
    let worst = decide_all.iter().copied().fold(0.0, f64::max);
    println!(
        "median over the mix: cold {:.2} µs, cached {:.3} µs, decide on a cached statement {:.3} µs (worst {:.3} µs; goal <= 2 µs: {})",
        cold / 1000.0,
        cached / 1000.0,
        decide / 1000.0,
        worst / 1000.0,
        if worst <= 2000.0 { "met" } else { "NOT met" }
    );
}

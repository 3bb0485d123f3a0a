use super::*;
use crate::mask::Style;

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    let tables: &[(&str, &str, u32, &[&str])] = &[
        (
            "public",
            "users",
            100,
            &["id", "name", "email", "ssn", "password_hash"],
        ),
        (
            "public",
            "orders",
            101,
            &["id", "user_id", "amount", "note"],
        ),
        ("app", "users", 102, &["id", "nick"]),
        ("public", "v_users", 103, &["id", "s"]),
        ("public", "v_broken", 104, &["x"]),
        ("public", "v_nested", 105, &["s2"]),
    ];
    for (schema, table, oid, cols) in tables {
        for (i, col) in cols.iter().enumerate() {
            c.add_column(SourceColumn {
                schema: (*schema).into(),
                table: (*table).into(),
                column: (*col).into(),
                type_oid: 25,
                table_oid: *oid,
                attnum: i as i16 + 1,
            });
        }
    }
    c.set_view(
        "public",
        "v_users",
        " SELECT users.id,\n    users.ssn AS s\n   FROM users;",
    );
    c.set_view("public", "v_broken", "SELECT FROM WHERE nonsense(");
    c.set_view("public", "v_nested", "SELECT upper(s) AS s2 FROM v_users");
    c.add_user_function("leak");
    c.set_search_path(vec!["public".into()]);
    c.mark_rules(|col| {
        (col.column == "ssn" || col.column == "password_hash").then_some(SourceRule {
            rule: 0,
            style: Style::Partial,
        })
    });
    c
}

fn id(c: &Catalog, path: &str) -> SourceId {
    (0..)
        .map(|i| i as SourceId)
        .find(|i| c.column(*i).to_string() == path)
        .unwrap()
}

/// (name, sources as schema.table.column, direct, unknown) per column of the first statement.
fn cols(sql: &str) -> Vec<(String, Vec<String>, bool, bool)> {
    let c = catalog();
    let a = analyze(sql, &c, c.search_path());
    a.statements[0]
        .columns
        .iter()
        .map(|col| {
            (
                col.name.clone(),
                col.lineage
                    .sources
                    .iter()
                    .map(|s| c.column(*s).to_string())
                    .collect(),
                col.lineage.direct,
                col.lineage.unknown.is_some(),
            )
        })
        .collect()
}

fn masked(sql: &str) -> Vec<bool> {
    let c = catalog();
    let a = analyze(sql, &c, c.search_path());
    a.statements[0]
        .columns
        .iter()
        .map(|col| {
            col.lineage.unknown.is_some()
                || col.lineage.sources.iter().any(|s| c.rule(*s).is_some())
        })
        .collect()
}

const SSN: &str = "public.users.ssn";

#[test]
fn aliases_and_plain_references_stay_direct() {
    assert_eq!(
        cols("SELECT ssn AS x, u.name FROM users u"),
        vec![
            ("x".into(), vec![SSN.into()], true, false),
            ("name".into(), vec!["public.users.name".into()], true, false),
        ]
    );
    assert!(
        cols("SELECT \"SSN\" FROM users")[0].3,
        "quoted names are exact"
    );
    assert_eq!(
        cols("SELECT public.users.ssn FROM public.users")[0].1,
        vec![SSN]
    );
    assert_eq!(
        cols("SELECT nick FROM app.users")[0].1,
        vec!["app.users.nick"]
    );
}

#[test]
fn expressions_are_derived() {
    for sql in [
        "SELECT ssn || '' FROM users",
        "SELECT upper(ssn) FROM users",
        "SELECT substr(ssn, 1, 3) FROM users",
        "SELECT replace(ssn, '-', ' ') || password_hash FROM users",
        "SELECT ssn::text FROM users",
        "SELECT CAST(ssn AS varchar) FROM users",
        "SELECT CASE WHEN id > 0 THEN ssn ELSE 'x' END FROM users",
        "SELECT coalesce(null, ssn) FROM users",
        "SELECT string_agg(ssn, ',') FROM users",
        "SELECT array_agg(ssn ORDER BY id) FROM users",
        "SELECT ARRAY[ssn, name] FROM users",
        "SELECT ROW(id, ssn) FROM users",
        "SELECT (u.*)::text FROM users u",
        "SELECT u FROM users u",
        "SELECT first_value(ssn) OVER (PARTITION BY id) FROM users",
        "SELECT max(ssn) FILTER (WHERE id > 1) FROM users",
        "SELECT ssn COLLATE \"C\" FROM users",
        "SELECT (SELECT ssn FROM users LIMIT 1)",
        "SELECT ARRAY(SELECT ssn FROM users)",
        "SELECT encode(convert_to(ssn, 'UTF8'), 'base64') FROM users",
        "SELECT format('%s', ssn) FROM users",
        "SELECT (SELECT max(x.s) FROM (SELECT ssn AS s FROM users) x)",
    ] {
        let c = cols(sql);
        assert!(c[0].1.contains(&SSN.to_owned()), "{sql}: {c:?}");
        assert!(!c[0].2, "{sql} must not be direct");
    }
}

#[test]
fn subqueries_ctes_and_derived_tables_carry_sources() {
    for sql in [
        "SELECT x FROM (SELECT ssn AS x FROM users) t",
        "SELECT t.a FROM (SELECT ssn FROM users) t(a)",
        "WITH c AS (SELECT ssn AS z FROM users) SELECT z FROM c",
        "WITH c(z) AS (SELECT ssn FROM users) SELECT * FROM c",
        "WITH a AS (SELECT ssn FROM users), b AS (SELECT ssn AS q FROM a) SELECT q FROM b",
        "SELECT * FROM (SELECT * FROM (SELECT ssn FROM users) a) b",
        "SELECT l.v FROM users u, LATERAL (SELECT u.ssn AS v) l",
        "SELECT l.v FROM users u CROSS JOIN LATERAL (SELECT u.ssn AS v) l",
        "SELECT s FROM v_users",
        "SELECT * FROM v_users",
    ] {
        let c = cols(sql);
        let col = c.iter().find(|c| c.1.contains(&SSN.to_owned()));
        assert!(col.is_some(), "{sql}: {c:?}");
        assert!(
            col.unwrap().2,
            "{sql}: a renamed plain reference stays direct: {c:?}"
        );
    }
    assert!(!cols("SELECT s2 FROM v_nested")[0].2);
    assert!(masked("SELECT s2 FROM v_nested")[0]);
}

#[test]
fn recursive_ctes_and_set_operations_union_their_branches() {
    let c = cols(
        "WITH RECURSIVE r(n, v) AS (SELECT 1, name FROM users UNION ALL \
         SELECT n + 1, v || ssn FROM r, users WHERE n < 3) SELECT v FROM r",
    );
    assert!(c[0].1.contains(&SSN.to_owned()), "{c:?}");
    let c = cols("SELECT name FROM users UNION SELECT ssn FROM users");
    assert!(c[0].1.contains(&SSN.to_owned()) && !c[0].2, "{c:?}");
    let c = cols("SELECT id, name FROM users EXCEPT SELECT 1, password_hash FROM users");
    assert!(c[1].1.contains(&"public.users.password_hash".to_owned()));
    assert!(!c[0].1.contains(&SSN.to_owned()));
    assert!(masked("VALUES (1), ((SELECT ssn FROM users LIMIT 1))")[0]);
}

#[test]
fn stars_expand_through_the_catalog() {
    let c = cols("SELECT * FROM users u JOIN orders o ON o.user_id = u.id");
    assert_eq!(c.len(), 9);
    assert_eq!(c[3].1, vec![SSN]);
    let c = cols("SELECT o.*, u.ssn FROM users u, orders o");
    assert_eq!(c.len(), 5);
    assert_eq!(c[4].1, vec![SSN]);
    // USING merges columns: one spread column carrying everything.
    let c = cols("SELECT * FROM users JOIN orders USING (id)");
    assert!(c[0].1.contains(&SSN.to_owned()));
}

#[test]
fn json_constructors_keep_their_keys() {
    let c = catalog();
    let a = analyze(
        "SELECT row_to_json(u), json_build_object('a', ssn, 'b', name), json_agg(u), to_jsonb(u.*) FROM users u",
        &c,
        c.search_path(),
    );
    let shape = |i: usize| a.statements[0].columns[i].lineage.json.clone().unwrap();
    match &*shape(0) {
        JsonShape::Object(keys) => {
            assert_eq!(keys.len(), 5);
            assert_eq!(keys[3].0, "ssn");
            assert_eq!(keys[3].1.sources, vec![id(&c, SSN)]);
        }
        other => panic!("{other:?}"),
    }
    match &*shape(1) {
        JsonShape::Object(keys) => assert_eq!(keys[0].0, "a"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(&*shape(2), JsonShape::Array(l) if l.json.is_some()));
    assert!(matches!(&*shape(3), JsonShape::Object(_)));
    // Every source is still listed, so a consumer that ignores the structure masks everything.
    assert!(
        a.statements[0].columns[0]
            .lineage
            .sources
            .contains(&id(&c, SSN))
    );
    // A computed key loses the structure.
    let b = analyze(
        "SELECT json_build_object(name, ssn) FROM users",
        &c,
        c.search_path(),
    );
    assert!(b.statements[0].columns[0].lineage.json.is_none());
    assert!(masked("SELECT row_to_json(u)->>'ssn' FROM users u")[0]);
    assert!(masked("SELECT json_object_agg(id, ssn) FROM users")[0]);
}

#[test]
fn unknowns_fail_closed() {
    for sql in [
        "SELECT * FROM query_to_xml('select ssn from users', true, true, '') x",
        "SELECT query_to_xml('select ssn from users', true, true, '')",
        "SELECT table_to_xml('users', true, true, '')",
        "SELECT leak()",
        "SELECT leak(ssn) FROM users",
        "SELECT * FROM new_table",
        "SELECT x FROM v_broken",
        "SELECT most_common_vals FROM pg_stats",
        "SELECT query FROM pg_stat_activity",
        "FETCH ALL FROM c",
        "EXECUTE p",
        "SELECT nosuch FROM users",
        "SELEKT ssn FROM users",
        "SELECT ssn FROM users WHERE (",
    ] {
        let c = cols(sql);
        assert!(c.iter().all(|c| c.3), "{sql}: {c:?}");
    }
    // Unparsable text that names no masked relation is not unknown.
    assert!(!cols("SELEKT 1 FROM orders")[0].3);
    // Nothing masked: nothing is unknown either.
    let empty = Catalog::default();
    let a = analyze("SELECT * FROM anything", &empty, &[]);
    assert!(a.first_unknown().is_none());
}

#[test]
fn clean_columns_stay_clean() {
    assert_eq!(
        masked("SELECT id, name, upper(email), count(*) FROM users GROUP BY 1, 2, 3"),
        vec![false, false, false, false]
    );
    assert_eq!(
        masked("SELECT pg_catalog.now(), relname FROM pg_class"),
        vec![false, false]
    );
    assert_eq!(masked("SELECT id FROM users WHERE ssn = '1'"), vec![false]);
    assert_eq!(masked("SHOW search_path"), vec![false]);
    assert_eq!(
        masked("SELECT EXISTS (SELECT 1 FROM users WHERE ssn LIKE '1%')"),
        vec![false]
    );
    assert_eq!(masked("SELECT current_user, 1"), vec![false, false]);
}

#[test]
fn dml_returning_and_copy() {
    assert!(masked("INSERT INTO orders (note) SELECT ssn FROM users RETURNING note")[0]);
    assert!(masked("UPDATE orders SET note = u.ssn FROM users u RETURNING orders.note")[0]);
    assert_eq!(
        masked("UPDATE orders SET amount = 1 RETURNING note, id"),
        vec![false, false]
    );
    assert!(masked("DELETE FROM users RETURNING ssn")[0]);
    assert_eq!(masked("DELETE FROM users RETURNING id"), vec![false]);
    let c = cols("COPY users TO STDOUT");
    assert_eq!(c.len(), 5);
    assert_eq!(c[3].1, vec![SSN]);
    let c = cols("COPY users (ssn, id) TO STDOUT");
    assert_eq!(c[0].1, vec![SSN]);
    assert!(masked("COPY (SELECT upper(ssn) FROM users) TO STDOUT")[0]);
    assert!(masked("WITH d AS (DELETE FROM users RETURNING *) SELECT ssn FROM d")[0]);
}

#[test]
fn multi_statement_texts_align_by_index() {
    let c = catalog();
    let a = analyze(
        "SELECT id FROM users; SELECT ssn FROM users",
        &c,
        c.search_path(),
    );
    assert_eq!(a.statements.len(), 2);
    assert!(a.statements[1].columns[0].lineage.direct);
    let past = a.statement(5, &c);
    assert!(past.columns[0].spread && past.columns[0].lineage.unknown.is_some());
}

#[test]
fn align_spreads_and_mismatches() {
    let one = |s| OutColumn {
        name: "a".into(),
        lineage: Lineage::direct(s),
        spread: false,
    };
    let out = StatementOut {
        columns: vec![one(1), OutColumn::spread(Lineage::direct(2)), one(3)],
    };
    let al = out.align(4);
    assert_eq!(
        al.iter().map(|l| l.sources[0]).collect::<Vec<_>>(),
        vec![1, 2, 2, 3]
    );
    let out = StatementOut {
        columns: vec![one(1), one(2)],
    };
    let al = out.align(3);
    assert!(al.iter().all(|l| l.sources == vec![1, 2] && !l.direct));
}

#[test]
fn cache_returns_the_same_analysis() {
    let c = catalog();
    let mut cache = LineageCache::new(2);
    let a = cache.analysis("SELECT ssn FROM users", &c, c.search_path());
    let b = cache.analysis("SELECT ssn FROM users", &c, c.search_path());
    assert!(Arc::ptr_eq(&a, &b));
    cache.analysis("SELECT 1", &c, c.search_path());
    cache.analysis("SELECT name FROM users", &c, c.search_path());
    // Gone from the session's cache, still in the snapshot's.
    assert!(Arc::ptr_eq(
        &a,
        &cache.analysis("SELECT ssn FROM users", &c, c.search_path())
    ));
}

#[test]
fn a_repeated_text_is_analysed_anew_after_the_catalog_or_search_path_changes() {
    // An agent repeats one query while the view under it is redefined to expose the SSN: the
    // repeat must not keep the analysis of the view it read before.
    let mut harmless = catalog();
    harmless.set_view("public", "v_users", "SELECT id, name AS s FROM users");
    let mut session = SessionLineage::new(Arc::new(harmless));
    let sql = "SELECT s FROM v_users";
    session.set_current(Some(sql), 0);
    let before = session.current().expect("current").0.clone();
    session.set_current(Some(sql), 0);
    assert!(Arc::ptr_eq(&before, &session.current().expect("current").0));

    // `catalog()`'s v_users is `users.ssn AS s`.
    session.replace_catalog(Arc::new(catalog()));
    session.set_current(Some(sql), 0);
    let after = session.current().expect("current").0.clone();
    assert_ne!(*before, *after, "the view's new definition is read");

    // Under a search path where `users` is app.users, the same text reads another table.
    let text = "SELECT nick FROM users";
    session.set_current(Some(text), 0);
    let public = session.current().expect("current").0.clone();
    session.set_search_path(vec!["app".to_owned(), "public".to_owned()]);
    session.set_current(Some(text), 0);
    assert_ne!(*public, *session.current().expect("current").0);
}

#[test]
fn sessions_holding_one_snapshot_share_its_analyses_under_one_search_path() {
    let c = catalog();
    let p = c.search_path().to_vec();
    let first = LineageCache::new(16).analysis("SELECT ssn FROM users WHERE id = 1", &c, &p);
    let next = LineageCache::new(16).analysis("SELECT ssn FROM users WHERE id = 2", &c, &p);
    assert!(
        Arc::ptr_eq(&first, &next),
        "another session, the same shape"
    );

    // Under another search path `users` is app.users, which has no ssn.
    let app = vec!["app".to_owned(), "public".to_owned()];
    let elsewhere = LineageCache::new(16).analysis("SELECT ssn FROM users WHERE id = 1", &c, &app);
    assert_ne!(*first, *elsewhere);

    // A snapshot marked again after a reload starts with no analyses; so does one changed in place.
    let mut remarked = c.clone();
    remarked.mark_rules(|_| None);
    let after = LineageCache::new(16).analysis("SELECT ssn FROM users WHERE id = 1", &remarked, &p);
    assert!(!Arc::ptr_eq(&first, &after));
    let mut changed = catalog();
    let before = LineageCache::new(16).analysis("SELECT s FROM v_users", &changed, &p);
    changed.set_view("public", "v_users", "SELECT id, name AS s FROM users");
    let redefined = LineageCache::new(16).analysis("SELECT s FROM v_users", &changed, &p);
    assert_ne!(*before, *redefined, "the view's new definition is read");
}

#[test]
fn texts_differing_only_in_numbers_share_an_analysis_but_json_keys_and_subscripts_do_not() {
    let c = catalog();
    let p = c.search_path();
    let mut cache = LineageCache::new(16);
    let a = cache.analysis("SELECT name FROM users WHERE id = 1", &c, p);
    let b = cache.analysis("SELECT name FROM users WHERE id = 20.5e3", &c, p);
    assert!(Arc::ptr_eq(&a, &b), "one shape, one analysis");
    let other = cache.analysis("SELECT ssn FROM users WHERE id = 1", &c, p);
    assert!(!Arc::ptr_eq(&a, &other));
    // A string's content can name a masked json key: never shared.
    let nick = cache.analysis("SELECT name ->> 'nick' FROM users", &c, p);
    let ssn = cache.analysis("SELECT name ->> 'ssn' FROM users", &c, p);
    assert!(!Arc::ptr_eq(&nick, &ssn));
    for (x, y) in [
        ("SELECT name -> 0 FROM users", "SELECT name -> 1 FROM users"),
        (
            "SELECT (ARRAY[ssn])[1] FROM users",
            "SELECT (ARRAY[ssn])[2] FROM users",
        ),
        (
            "SELECT name #> '{0}' FROM users WHERE id = 1",
            "SELECT name #> '{0}' FROM users WHERE id = 2",
        ),
    ] {
        assert!(
            !Arc::ptr_eq(&cache.analysis(x, &c, p), &cache.analysis(y, &c, p)),
            "{x}"
        );
    }
    // The analysis of a shared shape is that of the first text: the same columns.
    assert_eq!(b.statements[0].columns.len(), 1);
    assert_eq!(b.statements[0].columns[0].name, "name");
}

#[test]
fn catalog_rows_build_a_snapshot() {
    let row = |v: &[Option<&str>]| v.iter().map(|s| s.map(str::to_owned)).collect::<Vec<_>>();
    let rows = vec![
        row(&[
            Some("c"),
            Some("7"),
            Some("2"),
            Some("s"),
            Some("t"),
            Some("b"),
            Some("25"),
            Some("r"),
            None,
        ]),
        row(&[
            Some("c"),
            Some("7"),
            Some("1"),
            Some("s"),
            Some("t"),
            Some("a"),
            Some("23"),
            Some("r"),
            None,
        ]),
        row(&[
            Some("c"),
            Some("8"),
            Some("1"),
            Some("s"),
            Some("v"),
            Some("a"),
            Some("23"),
            Some("v"),
            None,
        ]),
        row(&[
            Some("v"),
            Some("8"),
            None,
            Some("s"),
            Some("v"),
            None,
            None,
            Some("v"),
            Some("SELECT a FROM t"),
        ]),
        row(&[
            Some("f"),
            None,
            None,
            Some("s"),
            Some("leak"),
            None,
            None,
            None,
            None,
        ]),
        row(&[
            Some("s"),
            Some("2"),
            None,
            Some("public"),
            None,
            None,
            None,
            None,
            None,
        ]),
        row(&[
            Some("s"),
            Some("1"),
            None,
            Some("s"),
            None,
            None,
            None,
            None,
            None,
        ]),
        row(&[Some("c"), Some("bad")]),
    ];
    let c = Catalog::from_rows(&rows);
    assert_eq!(c.search_path(), ["s", "public"]);
    let t = c.relation("s", "t").unwrap();
    assert_eq!(
        c.column(t.columns[0]).column,
        "a",
        "columns in attnum order"
    );
    assert!(c.relation("s", "v").unwrap().view_sql.is_some());
    assert!(c.is_user_function("leak"));
    assert_eq!(c.by_attnum(7, 2), Some(t.columns[1]));
}

/// A subscript picks a path by its number, so a text holding one must not share an analysis
/// keyed by its numeric shape. The one-pass search finds exactly what the three searches did.
#[test]
fn subscripts_are_found_wherever_they_are() {
    let by_three_searches =
        |sql: &str| sql.contains("->") || sql.contains("#>") || sql.contains('[');
    for sql in [
        "SELECT doc->0 FROM t",
        "SELECT doc #> '{a,1}' FROM t",
        "SELECT arr[1] FROM t",
        ">- #",
        "[",
        "->",
        "#>",
        "SELECT a > 1, b - 1, c # 1 FROM t",
        "SELECT a >- 1",
        ">",
        "",
    ] {
        assert_eq!(has_subscript(sql), by_three_searches(sql), "{sql:?}");
    }
    for (i, a) in ["-", "#", ">", "[", "x", " "].iter().enumerate() {
        for b in ["-", "#", ">", "[", "x", " "] {
            for c in ["-", "#", ">", "x"] {
                let sql = format!("{a}{b}{c}{i}");
                assert_eq!(has_subscript(&sql), by_three_searches(&sql), "{sql:?}");
            }
        }
    }
}

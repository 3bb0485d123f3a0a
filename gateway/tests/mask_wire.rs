//! The masker against bytes a real PostgreSQL sends: text and binary DataRows (text, varchar, jsonb,
//! text[]), table rules resolved through the real catalog, and COPY TO STDOUT in text, CSV and binary.
//! Masked COPY output is loaded back with COPY FROM, which proves the rewritten rows are well formed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;

use portcullis::mask::{Column, ColumnOrigin, CopyOptions, MaskRules, Masker};
use testkit::{HbaAuth, Postgres};

/// A minimal frontend: startup, simple and extended queries, raw backend messages.
struct Wire(TcpStream);

type Msg = (u8, Vec<u8>);

impl Wire {
    fn connect(pg: &Postgres) -> Wire {
        let mut s = TcpStream::connect(pg.addr()).expect("connect");
        let params = format!("user\0{}\0database\0{}\0\0", pg.user, pg.database);
        let mut startup = ((8 + params.len()) as i32).to_be_bytes().to_vec();
        startup.extend_from_slice(&196608i32.to_be_bytes());
        startup.extend_from_slice(params.as_bytes());
        s.write_all(&startup).unwrap();
        let mut w = Wire(s);
        w.until_ready();
        w
    }

    fn send(&mut self, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        self.0.write_all(&m).unwrap();
    }

    fn recv(&mut self) -> Msg {
        let mut head = [0u8; 5];
        self.0.read_exact(&mut head).unwrap();
        let len = i32::from_be_bytes(head[1..].try_into().unwrap()) as usize - 4;
        let mut body = vec![0; len];
        self.0.read_exact(&mut body).unwrap();
        assert_ne!(
            head[0],
            b'E',
            "server error: {}",
            String::from_utf8_lossy(&body)
        );
        (head[0], body)
    }

    fn until_ready(&mut self) -> Vec<Msg> {
        let mut msgs = Vec::new();
        loop {
            let m = self.recv();
            if m.0 == b'Z' {
                return msgs;
            }
            msgs.push(m);
        }
    }

    fn query(&mut self, sql: &str) -> Vec<Msg> {
        self.send(b'Q', format!("{sql}\0").as_bytes());
        self.until_ready()
    }

    /// Extended protocol with every result column in binary.
    fn query_binary(&mut self, sql: &str) -> Vec<Msg> {
        self.send(b'P', format!("\0{sql}\0\0\0").as_bytes());
        self.send(b'B', &[0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
        self.send(b'D', b"P\0");
        self.send(b'E', &[0, 0, 0, 0, 0]);
        self.send(b'S', &[]);
        self.until_ready()
    }
}

struct Field {
    name: Vec<u8>,
    table_oid: u32,
    attnum: i16,
    type_oid: u32,
    format: i16,
}

fn row_description(body: &[u8]) -> Vec<Field> {
    let n = i16::from_be_bytes(body[..2].try_into().unwrap());
    let mut pos = 2;
    (0..n)
        .map(|_| {
            let end = pos + body[pos..].iter().position(|&b| b == 0).unwrap();
            let name = body[pos..end].to_vec();
            let f = &body[end + 1..end + 19];
            pos = end + 19;
            Field {
                name,
                table_oid: u32::from_be_bytes(f[0..4].try_into().unwrap()),
                attnum: i16::from_be_bytes(f[4..6].try_into().unwrap()),
                type_oid: u32::from_be_bytes(f[6..10].try_into().unwrap()),
                format: i16::from_be_bytes(f[16..18].try_into().unwrap()),
            }
        })
        .collect()
}

fn columns(fields: &[Field]) -> Vec<Column<'_>> {
    fields
        .iter()
        .map(|f| Column {
            name: &f.name,
            table_oid: f.table_oid,
            attnum: f.attnum,
            type_oid: f.type_oid,
            format: f.format,
        })
        .collect()
}

/// Field values of a DataRow body, or of the body of a DataRow message the masker wrote.
fn values(body: &[u8]) -> Vec<Option<Vec<u8>>> {
    let n = i16::from_be_bytes(body[..2].try_into().unwrap());
    let mut pos = 2;
    (0..n)
        .map(|_| {
            let len = i32::from_be_bytes(body[pos..pos + 4].try_into().unwrap());
            pos += 4;
            (len >= 0).then(|| {
                let v = body[pos..pos + len as usize].to_vec();
                pos += len as usize;
                v
            })
        })
        .collect()
}

/// Masks every DataRow of a result; returns each row's values and whether it changed.
fn mask_rows(
    masker: &Masker,
    msgs: &[Msg],
    resolve: &dyn Fn(u32, i16) -> Option<ColumnOrigin>,
) -> Vec<(bool, Vec<Option<Vec<u8>>>)> {
    let desc = msgs.iter().find(|m| m.0 == b'T').expect("RowDescription");
    let fields = row_description(&desc.1);
    let plan = masker.plan_with_origin(&columns(&fields), resolve);
    msgs.iter()
        .filter(|m| m.0 == b'D')
        .map(|(_, body)| {
            let mut out = Vec::new();
            if plan.mask_data_row(body, &mut out).unwrap() {
                assert_eq!(out[0], b'D');
                assert_eq!(
                    u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
                    out.len() - 1
                );
                (true, values(&out[5..]))
            } else {
                assert!(out.is_empty());
                (false, values(body))
            }
        })
        .collect()
}

fn text(v: &Option<Vec<u8>>) -> String {
    String::from_utf8_lossy(v.as_deref().expect("not NULL")).into_owned()
}

const SETUP: &str = "
    CREATE TABLE users (id int8, email text, note varchar, ssn text, profile jsonb, tags text[]);
    INSERT INTO users VALUES
      (1, 'nobody', 'all fine, order 48213', NULL, '{\"plan\": \"gold\", \"n\": 12345678901234567890123}', '{a,b}'),
      (2, 'alice@example.com', 'call (415) 555-0123 re card 4111 1111 1111 1111', '123-45-6789',
          '{\"user\": {\"email\": \"bob@example.org\", \"card\": \"5555555555554444\"}, \"ip\": \"10.1.2.3\"}',
          '{x,carol@example.net}');";

fn start() -> (Postgres, Wire) {
    let pg = Postgres::builder()
        .auth(HbaAuth::Trust)
        .start()
        .expect("start PostgreSQL");
    let mut wire = Wire::connect(&pg);
    wire.query(SETUP);
    (pg, wire)
}

fn builtin() -> Masker {
    Masker::new(&MaskRules::builtin_pii()).unwrap()
}

#[test]
fn text_and_binary_rows_from_postgres() {
    let (_pg, mut wire) = start();
    let sql = "SELECT id, email, note, ssn, profile, tags FROM users ORDER BY id";
    let masker = builtin();
    for msgs in [wire.query(sql), wire.query_binary(sql)] {
        let binary = row_description(&msgs.iter().find(|m| m.0 == b'T').unwrap().1)[0].format == 1;
        let rows = mask_rows(&masker, &msgs, &|_, _| None);
        assert!(!rows[0].0, "clean row passes untouched (binary: {binary})");
        let (changed, v) = &rows[1];
        assert!(changed);
        assert_eq!(text(&v[1]), "****");
        assert_eq!(text(&v[2]), "call **** re card ****");
        assert_eq!(text(&v[3]), "****", "*ssn* column rule");
        let profile = v[4].as_deref().unwrap();
        let json = if binary {
            assert_eq!(profile[0], 1, "jsonb binary keeps its version byte");
            &profile[1..]
        } else {
            profile
        };
        let parsed: serde_json::Value = serde_json::from_slice(json).expect("masked jsonb is JSON");
        assert_eq!(parsed["user"]["email"], "****");
        assert_eq!(parsed["user"]["card"], "****");
        assert_eq!(parsed["ip"], "****");
        if binary {
            assert_eq!(v[5], None, "binary text[] with a hit is dropped");
        } else {
            assert_eq!(text(&v[5]), "{x,****}");
        }
        assert_eq!(
            v[0],
            values(&msgs.iter().filter(|m| m.0 == b'D').nth(1).unwrap().1)[0],
            "id untouched"
        );
    }
}

#[test]
fn json_path_rules_and_table_rules_through_the_catalog() {
    let (_pg, mut wire) = start();
    let rules: MaskRules = toml::from_str(
        r#"
        [[columns]]
        table = "public.users"
        column = "note"
        style = "partial"
        [[json]]
        path = "$.user"
        style = "keyed_hash"
        [[json]]
        path = "$..n"
        "#,
    )
    .unwrap();
    let masker = Masker::new(&rules).unwrap();
    assert!(masker.needs_catalog());
    // Aliased: the rule must still find `users.note` through (table OID, attnum), looked up in the
    // catalog for every column that comes from a table, as the driver's cache does.
    let msgs = wire.query("SELECT note AS x, profile AS p FROM users ORDER BY id");
    let desc = row_description(&msgs.iter().find(|m| m.0 == b'T').unwrap().1);
    let origins: Vec<((u32, i16), ColumnOrigin)> = desc
        .iter()
        .map(|f| {
            let catalog = wire.query(&format!(
                "SELECT n.nspname, c.relname, a.attname FROM pg_attribute a \
                 JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.attrelid = {} AND a.attnum = {}",
                f.table_oid, f.attnum
            ));
            let v = values(&catalog.iter().find(|m| m.0 == b'D').unwrap().1);
            ((f.table_oid, f.attnum), ColumnOrigin { schema: text(&v[0]), table: text(&v[1]), column: text(&v[2]) })
        })
        .collect();
    assert_eq!(origins[0].1.column, "note");
    let resolve = |oid: u32, attnum: i16| {
        origins
            .iter()
            .find(|(k, _)| *k == (oid, attnum))
            .map(|(_, o)| o.clone())
    };
    let rows = mask_rows(&masker, &msgs, &resolve);
    assert_eq!(text(&rows[0].1[0]), "*** ****, ***** *8213");
    let p0: serde_json::Value = serde_json::from_slice(rows[0].1[1].as_deref().unwrap()).unwrap();
    assert_eq!(
        p0["n"], "****",
        "a 23-digit number is masked by path, not redacted with its document"
    );
    assert_eq!(p0["plan"], "gold");
    // Without the catalog, columns from a table cannot be matched to table rules: fail closed.
    let blind = mask_rows(&masker, &msgs, &|_, _| None);
    assert_eq!(text(&blind[0].1[1]), "\"****\"");
    let p1: serde_json::Value = serde_json::from_slice(rows[1].1[1].as_deref().unwrap()).unwrap();
    assert!(
        p1["user"]
            .as_str()
            .unwrap()
            .chars()
            .all(|c| c.is_ascii_hexdigit()),
        "{p1}"
    );
    assert_eq!(p1["ip"], "10.1.2.3", "no detectors configured");
}

/// Runs `COPY ... TO STDOUT`, masks each CopyData, and returns the masked payload stream.
fn masked_copy(
    wire: &mut Wire,
    masker: &Masker,
    sql: &str,
    options: &CopyOptions,
    names: &[String],
) -> (Vec<u8>, usize) {
    let msgs = wire.query(sql);
    let head = &msgs
        .iter()
        .find(|m| m.0 == b'H')
        .expect("CopyOutResponse")
        .1;
    let format = head[0];
    let n = i16::from_be_bytes(head[1..3].try_into().unwrap()) as usize;
    let formats: Vec<i16> = (0..n)
        .map(|i| i16::from_be_bytes(head[3 + 2 * i..5 + 2 * i].try_into().unwrap()))
        .collect();
    let plan = masker.copy_plan(format, &formats, Some(names), options);
    let mut stream = Vec::new();
    let mut changed = 0;
    for (_, data) in msgs.iter().filter(|m| m.0 == b'd') {
        let mut out = Vec::new();
        if plan.mask_copy_data(data, &mut out).unwrap() {
            assert_eq!(out[0], b'd');
            assert_eq!(
                u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize,
                out.len() - 1
            );
            stream.extend_from_slice(&out[5..]);
            changed += 1;
        } else {
            stream.extend_from_slice(data);
        }
    }
    (stream, changed)
}

/// Loads `data` with `COPY users_back FROM STDIN <with>` through psql; returns the table as text.
fn load_back(pg: &Postgres, with: &str, data: &[u8]) -> String {
    pg.app_superuser_sql("DROP TABLE IF EXISTS users_back; CREATE TABLE users_back (LIKE users)")
        .unwrap();
    let mut child = pg
        .client("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(&pg.socket_dir)
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "app",
            "-c",
        ])
        .arg(format!("COPY users_back FROM STDIN {with}"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "COPY FROM rejected the masked data: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.app_superuser_sql("SELECT * FROM users_back ORDER BY id")
        .unwrap()
}

#[test]
fn copy_text_csv_and_binary_from_postgres() {
    let (pg, mut wire) = start();
    let masker = builtin();
    let names: Vec<String> = ["id", "email", "note", "ssn", "profile", "tags"]
        .map(String::from)
        .to_vec();
    let types = vec![20, 25, 1043, 25, 3802, 1009];
    let pii = [
        "alice@",
        "555-0123",
        "4111",
        "123-45-6789",
        "bob@",
        "5555555555554444",
        "carol@",
        "10.1.2.3",
    ];

    for (copy_with, options) in [
        (
            "",
            CopyOptions {
                column_types: Some(types.clone()),
                ..CopyOptions::text()
            },
        ),
        (
            "WITH (FORMAT csv, HEADER)",
            CopyOptions {
                header: true,
                column_types: Some(types.clone()),
                ..CopyOptions::csv()
            },
        ),
        (
            "WITH (FORMAT csv, DELIMITER '|', QUOTE '''')",
            CopyOptions {
                delimiter: b'|',
                quote: b'\'',
                escape: b'\'',
                ..CopyOptions::csv()
            },
        ),
    ] {
        let (stream, changed) = masked_copy(
            &mut wire,
            &masker,
            &format!("COPY users TO STDOUT {copy_with}"),
            &options,
            &names,
        );
        assert_eq!(changed, 1, "{copy_with}: only the PII row is rewritten");
        let loaded = load_back(&pg, copy_with, &stream);
        for p in pii {
            assert!(!loaded.contains(p), "{copy_with}: {p} leaked into {loaded}");
        }
        assert!(
            loaded.contains("order 48213"),
            "{copy_with}: clean row intact: {loaded}"
        );
    }

    // Binary COPY: no types known, so a hit drops the field (NULL); the header and trailer pass.
    let (stream, changed) = masked_copy(
        &mut wire,
        &masker,
        "COPY users TO STDOUT WITH (FORMAT binary)",
        &CopyOptions::text(),
        &names,
    );
    assert_eq!(changed, 1);
    let loaded = load_back(&pg, "WITH (FORMAT binary)", &stream);
    for p in pii {
        assert!(!loaded.contains(p), "binary: {p} leaked into {loaded}");
    }
    assert!(
        loaded.contains("order 48213"),
        "binary: clean row intact: {loaded}"
    );
}

//! The `[mask]` table of a policy file, and its validation into compiled rules.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::MaskError;
use super::types;

/// The `[mask]` table of a policy file.
///
/// ```toml
/// [mask]
/// detectors = ["email", "card", "ssn"]   # default: none
/// default_style = "redact"               # default: "redact"
/// hash_key_env = "PORTCULLIS_MASK_KEY"    # optional, see below
///
/// [[mask.columns]]
/// name = "*ssn*"                          # glob on the column name, ASCII case-insensitive
/// [[mask.columns]]
/// table = "public.users"                  # resolved through the catalog, so aliases do not evade it
/// column = "email"                        # glob
/// style = "keyed_hash"
/// [[mask.columns]]
/// type = "inet"
///
/// [[mask.json]]
/// path = "$.user.email"
/// style = "partial"
/// ```
///
/// The keyed-hash key comes from `hash_key_env` (the variable's value) or `hash_key_file` (the file's
/// bytes, one trailing newline trimmed), at least 16 bytes. With neither, each process draws a random
/// key: hashes are then stable within one gateway run only. The key is never logged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskRules {
    /// Content detectors run over text-like columns (and json string values) that no column rule matched.
    pub detectors: Vec<DetectorKind>,
    /// Style for detector hits, and for column and json rules that name none. Default: `redact`.
    pub default_style: Style,
    /// `[[mask.columns]]`: whole-value rules. The first matching rule (file order) decides.
    pub columns: Vec<ColumnRule>,
    /// `[[mask.json]]`: whole-value rules inside json and jsonb values, by path.
    pub json: Vec<JsonRule>,
    /// Environment variable holding the keyed-hash key.
    pub hash_key_env: Option<String>,
    /// File holding the keyed-hash key.
    pub hash_key_file: Option<PathBuf>,
    /// What to do with a result column whose lineage cannot be decided (dynamic SQL, a view that
    /// cannot be expanded, a user-defined function, an unparsable statement naming a relation that
    /// holds a masked column). Default: `redact`.
    pub unknown_lineage: UnknownLineage,
    /// Name-glob column rules also mask the values under matching keys inside json and jsonb
    /// values (`{"ssn": ...}`). Default: true.
    pub json_keys: bool,
    /// How long a catalog snapshot (columns, views, search path) serves before it is read again,
    /// by live sessions too, at their next statement. DDL seen through the gateway and a reload
    /// refresh it at once. Default: 60 s.
    #[serde(deserialize_with = "crate::policy::de_duration")]
    pub catalog_ttl: Duration,
    /// Turns column lineage off: rules then match only the output column's name and origin, and an
    /// alias or an expression evades them. For differential tests only. Default: false.
    pub danger_disable_lineage: bool,
}

impl Default for MaskRules {
    fn default() -> Self {
        MaskRules {
            detectors: Vec::new(),
            default_style: Style::default(),
            columns: Vec::new(),
            json: Vec::new(),
            hash_key_env: None,
            hash_key_file: None,
            unknown_lineage: UnknownLineage::default(),
            json_keys: true,
            catalog_ttl: Duration::from_secs(60),
            danger_disable_lineage: false,
        }
    }
}

/// `mask.unknown_lineage`: the fail-closed action when lineage cannot be decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownLineage {
    /// Every output column of unknown lineage is redacted.
    #[default]
    Redact,
    /// The statement is refused with SQLSTATE 42501, naming `mask.unknown_lineage`.
    Block,
}

/// How a masked value or span is replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// `****` in text-like columns, `"****"` in json; NULL for every other type.
    #[default]
    Redact,
    /// Keep the last 4 characters, star the other letters and digits (punctuation stays), e.g.
    /// `**** **** **** 1111`. Values with fewer than 8 such characters are starred entirely, so a
    /// short value is never mostly revealed. Non-text types: NULL.
    Partial,
    /// HMAC-SHA256 of the value under the mask key, as 16 hex digits: equal inputs give equal outputs, so
    /// joins and GROUP BY still work. Integer and uuid columns get a number or uuid derived from the
    /// same digest; other non-text types NULL.
    KeyedHash,
    /// The whole value becomes NULL (for a detector hit: the whole field; inside json: the string value).
    Null,
}

/// A content detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// `alice@example.com`
    Email,
    /// E.164 (`+14155550123`), international with separators (`+44 20 7946 0958`) and North American
    /// national formats (`(415) 555-0123`, `415-555-0123`, `415.555.0123`).
    Phone,
    /// Payment cards: 13–19 digits (optionally grouped by spaces or dashes), Luhn-valid, leading 2–6.
    Card,
    /// US social security numbers `123-45-6789` (or space-separated), valid area/group/serial.
    Ssn,
    /// IBAN, mod-97 checked, compact or in groups of four.
    Iban,
    /// Dotted-quad IPv4, with an optional `/prefix`.
    Ipv4,
    /// IPv6 (compressed or full), with an optional `/prefix`.
    Ipv6,
    /// AWS access key ids (`AKIA…`, `ASIA…`) and values of `aws_secret_access_key`-like settings.
    AwsKey,
    /// JSON web tokens (`eyJ….….…`).
    Jwt,
    /// PEM private key blocks, from `-----BEGIN … PRIVATE KEY-----` to the matching END line.
    PrivateKey,
    /// `Bearer <token>` and `Authorization: <scheme> <credentials>` (the credentials are masked).
    Bearer,
    /// `password=…`, `api_key: …`, `"token": "…"` values, passwords in URLs, and well-known token
    /// formats (GitHub `ghp_…`, Slack `xoxb-…`, Stripe `sk_live_…`, OpenAI/Anthropic `sk-…`, Google
    /// `AIza…`, GitLab `glpat-…`).
    Secret,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 12] = [
        DetectorKind::Email,
        DetectorKind::Phone,
        DetectorKind::Card,
        DetectorKind::Ssn,
        DetectorKind::Iban,
        DetectorKind::Ipv4,
        DetectorKind::Ipv6,
        DetectorKind::AwsKey,
        DetectorKind::Jwt,
        DetectorKind::PrivateKey,
        DetectorKind::Bearer,
        DetectorKind::Secret,
    ];
}

/// `[[mask.columns]]`: one of `name`; `table` + `column`; or `type`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// Glob (`*`, `?`) on the column name as the result reports it, or on its catalog name.
    pub name: Option<String>,
    /// `schema.table`, or `table` for that table name in any schema.
    pub table: Option<String>,
    /// Glob on the catalog column name, with `table`.
    pub column: Option<String>,
    /// A built-in type name (`inet`, `text`, `jsonb`, `bigint`, ...).
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// Default: the table's `default_style`.
    pub style: Option<Style>,
}

/// `[[mask.json]]`: a path inside json/jsonb values: `$`, `.key`, `['key']`, `[0]`, `[*]`, `.*`,
/// and `..key` (the key at any depth).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRule {
    pub path: String,
    /// Default: the table's `default_style`.
    pub style: Option<Style>,
}

impl MaskRules {
    /// A policy's `[mask]` table as rules.
    pub fn from_policy(policy: &crate::policy::Policy) -> Result<MaskRules, toml::de::Error> {
        MaskRules::deserialize(toml::Value::Table(policy.mask_table().clone()))
    }

    /// The `[mask]` rules of the built-in `default` policy: every detector, redacted, plus the column
    /// names that always hold secrets.
    pub fn builtin_pii() -> MaskRules {
        let by_name = |glob: &str| ColumnRule {
            name: Some(glob.to_owned()),
            ..ColumnRule::default()
        };
        MaskRules {
            detectors: DetectorKind::ALL.to_vec(),
            default_style: Style::Redact,
            columns: [
                "*password*",
                "*passwd*",
                "*secret*",
                "*ssn*",
                "*private_key*",
            ]
            .into_iter()
            .map(by_name)
            .collect(),
            ..MaskRules::default()
        }
    }
}

/// What a column rule selects, compiled.
#[derive(Debug, Clone)]
pub(crate) enum Selector {
    Name(Glob),
    TableColumn {
        schema: Option<String>,
        table: String,
        column: Glob,
    },
    Type(u32),
}

#[derive(Debug, Clone)]
pub(crate) struct CompiledColumnRule {
    pub selector: Selector,
    pub style: Style,
}

pub(crate) fn compile_column_rules(
    rules: &MaskRules,
) -> Result<Vec<CompiledColumnRule>, MaskError> {
    rules
        .columns
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let at = || format!("mask.columns[{i}]");
            let selector = match (&rule.name, &rule.table, &rule.column, &rule.type_name) {
                (Some(name), None, None, None) => Selector::Name(Glob::new(name)),
                (None, Some(table), Some(column), None) => {
                    let (schema, table) = match table.split_once('.') {
                        Some((s, t)) if !s.is_empty() && !t.is_empty() => {
                            (Some(s.to_ascii_lowercase()), t)
                        }
                        None if !table.is_empty() => (None, table.as_str()),
                        _ => {
                            return Err(MaskError::Config(format!(
                                "{}.table: expected `table` or `schema.table`",
                                at()
                            )));
                        }
                    };
                    Selector::TableColumn {
                        schema,
                        table: table.to_ascii_lowercase(),
                        column: Glob::new(column),
                    }
                }
                (None, None, None, Some(type_name)) => match types::oid_by_name(type_name) {
                    Some(oid) => Selector::Type(oid),
                    None => {
                        return Err(MaskError::Config(format!(
                            "{}.type: unknown type `{type_name}` (known: {})",
                            at(),
                            types::known_names()
                        )));
                    }
                },
                _ => {
                    return Err(MaskError::Config(format!(
                        "{}: set exactly one of `name`, `table` with `column`, or `type`",
                        at()
                    )));
                }
            };
            Ok(CompiledColumnRule {
                selector,
                style: rule.style.unwrap_or(rules.default_style),
            })
        })
        .collect()
}

/// A `*`/`?` glob, matched ASCII case-insensitively (PostgreSQL folds unquoted names to lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(Vec<u8>);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.as_bytes().to_ascii_lowercase())
    }

    /// The longest run without wildcards (lower case): text without it cannot match.
    pub fn longest_literal(&self) -> &[u8] {
        self.0
            .split(|&b| b == b'*' || b == b'?')
            .max_by_key(|run| run.len())
            .unwrap_or(&[])
    }

    pub fn matches(&self, name: &[u8]) -> bool {
        // Iterative wildcard matching with single-star backtracking: linear in practice, no recursion.
        let (p, s) = (&self.0, name);
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            match p.get(pi) {
                Some(b'*') => {
                    star = Some((pi, si));
                    pi += 1;
                }
                Some(&c) if c == b'?' || c == s[si].to_ascii_lowercase() => {
                    pi += 1;
                    si += 1;
                }
                _ => match star {
                    Some((sp, ss)) => {
                        pi = sp + 1;
                        si = ss + 1;
                        star = Some((sp, ss + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_case_insensitively() {
        let g = Glob::new("*SSN*");
        assert!(g.matches(b"ssn"));
        assert!(g.matches(b"customer_ssn_hash"));
        assert!(!g.matches(b"sn"));
        assert!(Glob::new("e?ail").matches(b"EMAIL"));
        assert!(!Glob::new("email").matches(b"emails"));
        assert!(Glob::new("a*b*c").matches(b"axxbyyc"));
        assert!(!Glob::new("a*b*c").matches(b"axxbyy"));
    }

    #[test]
    fn policy_table_deserializes() {
        let rules: MaskRules = toml::from_str(
            r#"
            detectors = ["email", "card", "private_key"]
            default_style = "partial"
            [[columns]]
            name = "*ssn*"
            [[columns]]
            table = "public.users"
            column = "email"
            style = "keyed_hash"
            [[columns]]
            type = "inet"
            style = "null"
            [[json]]
            path = "$.user.email"
            "#,
        )
        .unwrap();
        assert_eq!(rules.detectors.len(), 3);
        assert_eq!(rules.default_style, Style::Partial);
        let compiled = compile_column_rules(&rules).unwrap();
        assert!(matches!(compiled[0].selector, Selector::Name(_)));
        assert_eq!(compiled[0].style, Style::Partial);
        assert!(
            matches!(&compiled[1].selector, Selector::TableColumn { schema: Some(s), table, .. } if s == "public" && table == "users")
        );
        assert_eq!(compiled[1].style, Style::KeyedHash);
        assert!(matches!(compiled[2].selector, Selector::Type(869)));
    }

    #[test]
    fn unknown_keys_and_bad_rules_are_refused() {
        assert!(toml::from_str::<MaskRules>("detector = [\"email\"]").is_err());
        assert!(toml::from_str::<MaskRules>("detectors = [\"emails\"]").is_err());
        let both: MaskRules = toml::from_str("[[columns]]\nname = \"a\"\ntype = \"inet\"").unwrap();
        let err = compile_column_rules(&both).unwrap_err().to_string();
        assert!(err.contains("mask.columns[0]"), "{err}");
        let bad_type: MaskRules = toml::from_str("[[columns]]\ntype = \"inett\"").unwrap();
        assert!(
            compile_column_rules(&bad_type)
                .unwrap_err()
                .to_string()
                .contains("inett")
        );
    }
}

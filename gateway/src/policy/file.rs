//! The policy file: TOML, validated while it is read, so every error names file, line, column
//! and key.
//!
//! ```toml
//! name = "team-a"              # default: the file name without extension
//! mode = "enforce"             # or "observe": evaluate and report, enforce nothing
//! unparsable = "block"         # action for SQL the classifier cannot parse: block|approve|allow
//! default_action = "block"     # action when no rule matches
//! function_call = "block"      # action for FunctionCall messages whose OID is not allowed
//! function_call_allow_oids = []
//! approval_timeout = "5m"      # how long a held statement waits for an operator
//! allowed_procedures = []      # CALL targets, patterns on the name as written and case-folded:
//!                              # "refresh_*" does not match `CALL public.refresh_x()`
//!
//! [[rules]]                    # first match wins; all selectors given must match
//! name = "no-ddl"              # default: rules[N]
//! agents = ["claude-*"]        # patterns (`*`, `?`) on the agent name; string or list
//! groups = ["oncall"]          # identity groups, any of
//! subjects = ["alice@*"]       # patterns on the token's subject (`sub`)
//! actors = ["agent-*"]         # patterns on the delegation chain (`act`), any actor
//! targets = ["prod-*"]         # patterns on the target name
//! databases = ["app"]          # patterns on the database name
//! kinds = ["ddl"]              # read|session|write|ddl|dcl|admin, any of
//! risks = ["drop"]             # see `Risk`, any of
//! objects = ["public.*"]       # every object touched matches (and there is at least one)
//! touches = ["public.secrets"] # any object touched matches
//! action = "block"             # allow|approve|block
//! reason = "schema changes go through migrations"
//!
//! [mask]                       # masking rules, read by `crate::mask`
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use super::classify::{Kind, Risk, RiskSet};
use super::decide::{BuiltinRules, Glob, Rule};
use super::{Action, Mode, Policy};

const BUILTINS: &[(&str, &str)] = &[
    ("default", include_str!("builtin/default.toml")),
    ("observe", include_str!("builtin/observe.toml")),
];

/// Names accepted by [`load`] besides file paths.
pub fn builtin_names() -> &'static [&'static str] {
    &["default", "observe"]
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("no built-in policy `{name}` and no such file (built-ins: {})", builtin_names().join(", "))]
    NotFound { name: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// ``FILE:LINE:COLUMN: key `rules[2].action`: message``.
    #[error("{file}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
}

/// Loads a built-in policy by name (`default`, `observe`) or a TOML file by path. Built-in names win
/// over files of the same name in the working directory; write `./default` for such a file.
pub fn load(name_or_path: &str) -> Result<Policy, PolicyError> {
    let is_path = name_or_path.contains('/') || name_or_path.ends_with(".toml");
    if !is_path && let Some((name, text)) = BUILTINS.iter().find(|(n, _)| *n == name_or_path) {
        return load_str(text, &format!("builtin:{name}"), Some(name));
    }
    let path = Path::new(name_or_path);
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound && !is_path {
            PolicyError::NotFound {
                name: name_or_path.into(),
            }
        } else {
            PolicyError::Io {
                path: name_or_path.into(),
                source,
            }
        }
    })?;
    let stem = path.file_stem().and_then(|s| s.to_str());
    load_str(&text, name_or_path, stem)
}

/// Compiles policy text. `origin` names it in errors (a path, or `builtin:NAME`); `default_name`
/// is used when the file has no `name`.
pub fn load_str(
    text: &str,
    origin: &str,
    default_name: Option<&str>,
) -> Result<Policy, PolicyError> {
    let file: PolicyFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
        .map_err(|e| {
            // `toml::Spanned` shows up in the path as a private field name.
            let path = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let (line, column) = inner
                .span()
                .map(|s| line_col(text, s.start))
                .unwrap_or((1, 1));
            PolicyError::Invalid {
                file: origin.into(),
                line,
                column,
                key: (path != "." && !path.is_empty()).then_some(path),
                message: inner.message().trim_end().to_owned(),
            }
        })?;
    file.compile(text, origin, default_name)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: Option<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "block")]
    unparsable: Action,
    #[serde(default = "block")]
    default_action: Action,
    #[serde(default = "block")]
    function_call: Action,
    #[serde(default)]
    function_call_allow_oids: Vec<u32>,
    #[serde(default = "five_minutes", deserialize_with = "de_duration")]
    approval_timeout: Duration,
    #[serde(default, deserialize_with = "de_globs")]
    allowed_procedures: Vec<Glob>,
    #[serde(default)]
    rules: Vec<toml::Spanned<RuleFile>>,
    #[serde(default)]
    mask: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: Option<String>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    agents: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_strings")]
    groups: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    subjects: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    actors: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    targets: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    databases: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_list")]
    kinds: Option<Vec<Kind>>,
    #[serde(default, deserialize_with = "de_opt_list")]
    risks: Option<Vec<Risk>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    objects: Option<Vec<Glob>>,
    #[serde(default, deserialize_with = "de_opt_globs")]
    touches: Option<Vec<Glob>>,
    action: Action,
    reason: Option<String>,
}

fn block() -> Action {
    Action::Block
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let v = humantime::parse_duration(&s).map_err(|e| {
        de::Error::custom(format!(
            "invalid duration `{s}`: {e} (e.g. \"5m\", \"90s\")"
        ))
    })?;
    if v.is_zero() {
        return Err(de::Error::custom("must be longer than zero"));
    }
    Ok(v)
}

/// A value or a list of values: `agents = "bot"` and `agents = ["bot"]` mean the same.
fn de_opt_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    // Untagged enums swallow the inner error message, so try the list shape explicitly.
    let v = toml::Value::deserialize(d)?;
    let items = match v {
        toml::Value::Array(a) => a,
        one => vec![one],
    };
    if items.is_empty() {
        return Err(de::Error::custom(
            "empty list never matches; remove the key to match everything",
        ));
    }
    items
        .into_iter()
        .map(|i| T::deserialize(i).map_err(de::Error::custom))
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
}

fn de_opt_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    de_opt_list(d)
}

fn de_opt_globs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Glob>>, D::Error> {
    let Some(v) = de_opt_list::<D, String>(d)? else {
        return Ok(None);
    };
    v.iter()
        .map(|p| Glob::new(p).map_err(|e| de::Error::custom(format!("pattern `{p}`: {e}"))))
        .collect::<Result<_, _>>()
        .map(Some)
}

fn de_globs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Glob>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|p| Glob::new(p).map_err(|e| de::Error::custom(format!("pattern `{p}`: {e}"))))
        .collect()
}

impl PolicyFile {
    fn compile(
        self,
        text: &str,
        origin: &str,
        default_name: Option<&str>,
    ) -> Result<Policy, PolicyError> {
        let invalid = |span: std::ops::Range<usize>, key: String, message: String| {
            let (line, column) = line_col(text, span.start);
            PolicyError::Invalid {
                file: origin.into(),
                line,
                column,
                key: Some(key),
                message,
            }
        };
        let mut rules: Vec<Rule> = Vec::with_capacity(self.rules.len());
        for (i, spanned) in self.rules.into_iter().enumerate() {
            let span = spanned.span();
            let r = spanned.into_inner();
            let name: Arc<str> = Arc::from(r.name.unwrap_or_else(|| format!("rules[{i}]")));
            if let Some(prev) = rules.iter().position(|p| p.name == name) {
                return Err(invalid(
                    span,
                    format!("rules[{i}].name"),
                    format!("rule name `{name}` is already used by rules[{prev}]"),
                ));
            }
            rules.push(Rule {
                name,
                agents: r.agents,
                groups: r.groups,
                subjects: r.subjects,
                actors: r.actors,
                targets: r.targets,
                databases: r.databases,
                kinds: r.kinds,
                risks: r.risks.map(|v| v.into_iter().collect::<RiskSet>()),
                objects: r.objects,
                touches: r.touches,
                action: r.action,
                reason: r.reason,
            });
        }
        Ok(Policy {
            name: self
                .name
                .or_else(|| default_name.map(str::to_owned))
                .unwrap_or_else(|| "policy".into()),
            source: origin.into(),
            mode: self.mode,
            unparsable: self.unparsable,
            default_action: self.default_action,
            function_call: self.function_call,
            function_call_allow_oids: self.function_call_allow_oids,
            approval_timeout: self.approval_timeout,
            allowed_procedures: self.allowed_procedures,
            rules,
            mask: self.mask,
            builtin_rules: BuiltinRules::default(),
        })
    }
}

impl Policy {
    /// Human warnings about a valid policy (unreachable rules), for `policy check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(i) = self.rules.iter().position(Rule::is_catch_all)
            && i + 1 < self.rules.len()
        {
            out.push(format!(
                "rule `{}` matches every statement: the {} rule(s) after it are never used",
                self.rules[i].name,
                self.rules.len() - i - 1
            ));
        }
        out
    }
}

//! The AST visitor: walks a whole parsed statement, resolving names the way PostgreSQL does, and
//! collects its kind, risks and objects.

use super::*;

/// Resolves an identifier the way PostgreSQL does in a UTF-8 database.
fn resolve(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_ascii_lowercase()
    }
}

/// Resolved name parts; a part that is not a plain identifier resolves to `None`.
fn name_parts(name: &ObjectName) -> Vec<Option<String>> {
    name.0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => Some(resolve(i)),
            ObjectNamePart::Function(_) => None,
        })
        .collect()
}

/// `schema.table` for a relation name.
fn relation(name: &ObjectName) -> String {
    let parts: Vec<String> = name_parts(name)
        .into_iter()
        .map(|p| p.unwrap_or_else(|| "?".into()))
        .collect();
    match parts.as_slice() {
        [] => "?".into(),
        [t] if t.starts_with("pg_") => format!("pg_catalog.{t}"),
        [t] => format!("public.{t}"),
        [.., s, t] => format!("{s}.{t}"),
    }
}

fn is_dangerous_function(name: &str) -> bool {
    DANGEROUS_FUNCTIONS.contains(&name)
        || DANGEROUS_FUNCTION_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// The text of a constant (what PostgreSQL would see after unquoting). `SET x = off` takes a bare
/// word as a value, so `words` admits identifiers; in function arguments they are columns.
fn literal_text(e: &Expr, words: bool) -> Option<String> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::UnicodeStringLiteral(s)
            | Value::NationalStringLiteral(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            Value::Number(n, _) => Some(n.clone()),
            Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        },
        Expr::Identifier(i) if words => Some(i.value.clone()),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => literal_text(expr, words),
        _ => None,
    }
}

fn arg_list(args: &FunctionArguments) -> &[FunctionArg] {
    match args {
        FunctionArguments::List(l) => &l.args,
        FunctionArguments::None | FunctionArguments::Subquery(_) => &[],
    }
}

fn arg_exprs(args: &[FunctionArg]) -> Vec<&Expr> {
    args.iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e))
            | FunctionArg::Named {
                arg: FunctionArgExpr::Expr(e),
                ..
            }
            | FunctionArg::ExprNamed {
                arg: FunctionArgExpr::Expr(e),
                ..
            } => Some(e),
            _ => None,
        })
        .collect()
}

/// The risk of setting `name` to `value` (`None`: not a literal we can read).
fn setting_risk(name: &str, value: Option<&str>) -> Option<Risk> {
    let name = name.to_ascii_lowercase();
    match name.as_str() {
        "role" => return Some(Risk::SetRole),
        "session_authorization" => return Some(Risk::SetSessionAuthorization),
        _ => {}
    }
    let (_, safe) = UNSAFE_SETTINGS.iter().find(|(n, _)| *n == name)?;
    match value {
        Some(v) if safe.contains(&v.trim().to_ascii_lowercase().as_str()) => None,
        _ => Some(Risk::UnsafeSetting),
    }
}

pub(super) fn classify_statement(stmt: &Statement) -> StatementClass {
    let mut v = StatementVisitor {
        class: StatementClass::new("", Kind::Read),
        noexec: Vec::new(),
        ctes: Vec::new(),
        skip_relation: false,
    };
    let _ = stmt.visit(&mut v);
    let mut class = v.class;
    class.objects.sort_unstable();
    class.objects.dedup();
    class.functions.sort_unstable();
    class.functions.dedup();
    class.procedures.sort_unstable();
    class.procedures.dedup();
    class.finish()
}

struct StatementVisitor {
    class: StatementClass,
    /// One entry per statement being visited: true when it does not execute what it contains
    /// (plain `EXPLAIN`), so nested statements add objects but no kind or statement risks.
    noexec: Vec<bool>,
    /// CTE names in scope: relations with these names are not tables.
    ctes: Vec<String>,
    /// Set when the next relation visited is the name of a table function, not a table.
    skip_relation: bool,
}

impl StatementVisitor {
    fn executes(&self) -> bool {
        !self.noexec.iter().any(|n| *n)
    }

    fn raise(&mut self, kind: Kind) {
        if self.executes() && kind > self.class.kind {
            self.class.kind = kind;
        }
    }

    fn risk(&mut self, risk: Risk) {
        if self.executes() {
            self.class.risks.insert(risk);
        }
    }

    fn object(&mut self, name: &ObjectName) {
        self.class.objects.push(relation(name));
    }

    fn function(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let parts = name_parts(name);
        let Some(Some(last)) = parts.last() else {
            // Not a plain identifier: cannot tell what it resolves to.
            self.class.risks.insert(Risk::DangerousFunction);
            self.class.functions.push("?".into());
            return;
        };
        if last == "set_config" {
            self.class.reads_literals = true;
            let args = arg_exprs(args);
            match args.first().and_then(|e| literal_text(e, false)) {
                Some(setting) => {
                    let value = args.get(1).and_then(|e| literal_text(e, false));
                    if let Some(r) = setting_risk(&setting, value.as_deref()) {
                        self.class.risks.insert(r);
                    }
                }
                None => {
                    self.class.risks.insert(Risk::DangerousFunction);
                    self.class.functions.push(last.clone());
                }
            }
            return;
        }
        // Functions are flagged even under plain EXPLAIN: the planner may evaluate them.
        if is_dangerous_function(last) {
            self.class.risks.insert(Risk::DangerousFunction);
            self.class.functions.push(last.clone());
        }
        if WRITE_FUNCTIONS.contains(&last.as_str()) {
            self.raise(Kind::Write);
        }
    }

    fn set(&mut self, set: &Set) {
        self.class.reads_literals = true;
        let mut check = |name: &ObjectName, value: Option<&Expr>| {
            // Custom settings are qualified (`app.user_id`): only a bare name is a server setting.
            let name = name_parts(name)
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect::<Vec<_>>()
                .join(".");
            let value = value.and_then(|v| literal_text(v, true));
            if let Some(r) = setting_risk(&name, value.as_deref()) {
                self.risk(r);
            }
        };
        match set {
            Set::SingleAssignment {
                variable, values, ..
            } => check(
                variable,
                if values.len() == 1 {
                    values.first()
                } else {
                    None
                },
            ),
            Set::ParenthesizedAssignments { variables, .. } => {
                for v in variables {
                    check(v, None);
                }
            }
            Set::MultipleAssignments { assignments } => {
                for a in assignments {
                    check(&a.name, Some(&a.value));
                }
            }
            Set::SetRole { role_name, .. } => {
                self.risk(if role_name.is_some() {
                    Risk::SetRole
                } else {
                    Risk::ResetRole
                });
            }
            Set::SetNames { charset_name, .. } => {
                if let Some(r) = setting_risk("client_encoding", Some(&charset_name.value)) {
                    self.risk(r);
                }
            }
            Set::SetTimeZone { .. }
            | Set::SetNamesDefault {}
            | Set::SetTransaction { .. }
            | Set::SetSessionParam(_) => {}
        }
    }

    /// Command and kind of one statement (nested statements come through here too); records its
    /// risks and the objects its children do not visit as relations.
    fn statement(&mut self, stmt: &Statement) -> (&'static str, Kind) {
        use Statement as S;
        match stmt {
            S::Query(q) => {
                if let Some(into) = select_into(&q.body) {
                    self.object(into);
                    return ("SELECT INTO", Kind::Ddl);
                }
                ("SELECT", Kind::Read)
            }
            S::Insert(_) => ("INSERT", Kind::Write),
            S::Update { selection, .. } => {
                if !filters_rows(selection.as_ref()) {
                    self.risk(Risk::UpdateWithoutWhere);
                }
                ("UPDATE", Kind::Write)
            }
            S::Delete(d) => {
                if !filters_rows(d.selection.as_ref()) {
                    self.risk(Risk::DeleteWithoutWhere);
                }
                for t in &d.tables {
                    self.object(t);
                }
                ("DELETE", Kind::Write)
            }
            S::Merge { .. } => ("MERGE", Kind::Write),
            S::Truncate { .. } => {
                self.risk(Risk::Truncate);
                ("TRUNCATE", Kind::Write)
            }
            S::Copy {
                source, to, target, ..
            } => {
                if let CopySource::Table { table_name, .. } = source {
                    self.object(table_name);
                }
                match target {
                    CopyTarget::Program { .. } => self.risk(Risk::CopyProgram),
                    CopyTarget::File { .. } => self.risk(Risk::CopyFile),
                    CopyTarget::Stdin | CopyTarget::Stdout => {}
                }
                ("COPY", if *to { Kind::Read } else { Kind::Write })
            }
            S::Call(f) => {
                let name = name_parts(&f.name)
                    .into_iter()
                    .map(|p| p.unwrap_or_else(|| "?".into()))
                    .collect::<Vec<_>>()
                    .join(".");
                self.function(&f.name, arg_list(&f.args));
                self.class.procedures.push(name);
                self.risk(Risk::Call);
                ("CALL", Kind::Write)
            }
            S::Execute { .. } => ("EXECUTE", Kind::Write),
            S::Prepare { .. } => ("PREPARE", Kind::Session),
            S::Explain { .. } => ("EXPLAIN", Kind::Read),
            S::ExplainTable { .. } => ("EXPLAIN", Kind::Read),
            S::Set(set) => {
                self.set(set);
                ("SET", Kind::Session)
            }
            S::ShowVariable { .. }
            | S::ShowVariables { .. }
            | S::ShowStatus { .. }
            | S::ShowCreate { .. }
            | S::ShowColumns { .. }
            | S::ShowTables { .. }
            | S::ShowViews { .. }
            | S::ShowFunctions { .. }
            | S::ShowDatabases { .. }
            | S::ShowSchemas { .. }
            | S::ShowObjects(_)
            | S::ShowCollation { .. }
            | S::ShowCharset(_) => ("SHOW", Kind::Read),
            S::StartTransaction { .. } => ("BEGIN", Kind::Session),
            S::Commit { .. } => ("COMMIT", Kind::Session),
            S::Rollback { .. } => ("ROLLBACK", Kind::Session),
            S::Savepoint { .. } => ("SAVEPOINT", Kind::Session),
            S::ReleaseSavepoint { .. } => ("RELEASE", Kind::Session),
            S::Discard { object_type } => {
                if matches!(object_type, sqlparser::ast::DiscardObject::ALL) {
                    self.risk(Risk::ResetRole);
                }
                ("DISCARD", Kind::Session)
            }
            S::Deallocate { .. } => ("DEALLOCATE", Kind::Session),
            S::LISTEN { .. } => ("LISTEN", Kind::Session),
            S::UNLISTEN { .. } => ("UNLISTEN", Kind::Session),
            S::NOTIFY { .. } => ("NOTIFY", Kind::Session),
            S::Declare { .. } => ("DECLARE", Kind::Read),
            S::Fetch { .. } => ("FETCH", Kind::Read),
            S::Close { .. } => ("CLOSE", Kind::Session),
            S::CreateTable(_) => ("CREATE TABLE", Kind::Ddl),
            S::CreateView { name, .. } => {
                self.object(name);
                ("CREATE VIEW", Kind::Ddl)
            }
            S::CreateIndex(_) => ("CREATE INDEX", Kind::Ddl),
            S::CreateSchema { .. } => ("CREATE SCHEMA", Kind::Ddl),
            S::CreateDatabase { .. } => ("CREATE DATABASE", Kind::Ddl),
            S::CreateFunction(_) => ("CREATE FUNCTION", Kind::Ddl),
            S::CreateProcedure { .. } => ("CREATE PROCEDURE", Kind::Ddl),
            S::CreateTrigger(_) => ("CREATE TRIGGER", Kind::Ddl),
            S::CreateSequence { .. } => ("CREATE SEQUENCE", Kind::Ddl),
            S::CreateDomain(_) => ("CREATE DOMAIN", Kind::Ddl),
            S::CreateType { .. } => ("CREATE TYPE", Kind::Ddl),
            S::CreateExtension { .. } => ("CREATE EXTENSION", Kind::Ddl),
            S::CreatePolicy { .. } => ("CREATE POLICY", Kind::Ddl),
            S::CreateServer(_) => ("CREATE SERVER", Kind::Ddl),
            S::CreateVirtualTable { .. } => ("CREATE TABLE", Kind::Ddl),
            S::Comment { .. } => ("COMMENT", Kind::Ddl),
            S::RenameTable(_) => {
                self.risk(Risk::Alter);
                ("ALTER TABLE", Kind::Ddl)
            }
            S::AlterTable { .. } => {
                self.risk(Risk::Alter);
                ("ALTER TABLE", Kind::Ddl)
            }
            S::AlterIndex { .. }
            | S::AlterView { .. }
            | S::AlterType(_)
            | S::AlterSchema(_)
            | S::AlterPolicy { .. } => {
                self.risk(Risk::Alter);
                ("ALTER", Kind::Ddl)
            }
            S::Drop {
                object_type, names, ..
            } => {
                self.risk(Risk::Drop);
                match object_type {
                    ObjectType::Role | ObjectType::User => ("DROP ROLE", Kind::Dcl),
                    ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => {
                        for n in names {
                            self.object(n);
                        }
                        ("DROP TABLE", Kind::Ddl)
                    }
                    _ => ("DROP", Kind::Ddl),
                }
            }
            S::DropFunction { .. }
            | S::DropProcedure { .. }
            | S::DropDomain(_)
            | S::DropTrigger(_)
            | S::DropExtension { .. }
            | S::DropPolicy { .. } => {
                self.risk(Risk::Drop);
                ("DROP", Kind::Ddl)
            }
            S::CreateRole { .. } | S::CreateUser(_) => ("CREATE ROLE", Kind::Dcl),
            S::AlterRole { .. } => {
                self.risk(Risk::Alter);
                ("ALTER ROLE", Kind::Dcl)
            }
            S::Grant { objects, .. } => {
                self.risk(Risk::Grant);
                if let Some(GrantObjects::Tables(t)) = objects {
                    for n in t {
                        self.object(n);
                    }
                }
                ("GRANT", Kind::Dcl)
            }
            S::Revoke { objects, .. } => {
                self.risk(Risk::Revoke);
                if let Some(GrantObjects::Tables(t)) = objects {
                    for n in t {
                        self.object(n);
                    }
                }
                ("REVOKE", Kind::Dcl)
            }
            S::Analyze { .. } => ("ANALYZE", Kind::Admin),
            S::Vacuum(_) => ("VACUUM", Kind::Admin),
            // Other dialects' statements, procedural blocks, and anything added to sqlparser later.
            _ => ("ADMIN", Kind::Admin),
        }
    }
}

/// `ANALYZE` in `EXPLAIN (...)` options, unless explicitly off.
fn is_analyze_on(o: &sqlparser::ast::UtilityOption) -> bool {
    o.name.value.eq_ignore_ascii_case("analyze")
        && !o
            .arg
            .as_ref()
            .and_then(|a| literal_text(a, true))
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "false" | "off" | "0"))
}

/// The target of `SELECT .. INTO`, wherever the `INTO` sits in a set operation.
fn select_into(body: &SetExpr) -> Option<&ObjectName> {
    match body {
        SetExpr::Select(s) => s.into.as_ref().map(|i| &i.name),
        SetExpr::Query(q) => select_into(&q.body),
        SetExpr::SetOperation { left, right, .. } => {
            select_into(left).or_else(|| select_into(right))
        }
        _ => None,
    }
}

/// Whether a `WHERE` clause can filter rows: it exists and mentions a column. `WHERE true` or
/// `WHERE 1 = 1` affect every row, just like no `WHERE`.
fn filters_rows(selection: Option<&Expr>) -> bool {
    struct Columns(bool);
    impl Visitor for Columns {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if matches!(
                e,
                Expr::Identifier(_)
                    | Expr::CompoundIdentifier(_)
                    | Expr::CompoundFieldAccess { .. }
            ) {
                self.0 = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        }
    }
    let Some(e) = selection else { return false };
    let mut v = Columns(false);
    let _ = e.visit(&mut v);
    v.0
}

impl Visitor for StatementVisitor {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        let (command, kind) = self.statement(stmt);
        if self.class.command.is_empty() {
            self.class.command = command;
        }
        self.raise(kind);
        // `EXPLAIN` runs what it explains only with ANALYZE.
        let noexec = match stmt {
            Statement::Explain {
                analyze, options, ..
            } => {
                self.class.reads_literals |= options.is_some();
                !(*analyze || options.iter().flatten().any(is_analyze_on))
            }
            _ => false,
        };
        self.noexec.push(noexec);
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &Statement) -> ControlFlow<()> {
        self.noexec.pop();
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.ctes.push(resolve(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            // `FROM pg_ls_dir('.')` parses as a table with arguments.
            TableFactor::Table {
                name,
                args: Some(args),
                ..
            } => {
                self.skip_relation = true;
                self.function(name, &args.args);
            }
            TableFactor::Function { name, args, .. } => self.function(name, args),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, name: &ObjectName) -> ControlFlow<()> {
        if std::mem::take(&mut self.skip_relation) {
            return ControlFlow::Continue(());
        }
        if let [ObjectNamePart::Identifier(i)] = name.0.as_slice()
            && self.ctes.contains(&resolve(i))
        {
            return ControlFlow::Continue(());
        }
        self.object(name);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            self.function(&f.name, arg_list(&f.args));
        }
        ControlFlow::Continue(())
    }
}

//! Least privilege upstream: which login or role an identity's groups map to.

use std::path::PathBuf;

use super::config::TargetIdentity;
use super::{IdentityError, VerifiedIdentity};

/// What the gateway does upstream for an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamRole {
    /// No `[[target.role]]` is configured: the target's own login, unchanged.
    TargetLogin,
    /// Log in as this user with the password in this file.
    Login {
        user: String,
        password_file: PathBuf,
    },
    /// Keep the target's login and issue [`set_role_sql`] after connect.
    SetRole(String),
}

/// The first `[[target.role]]` whose groups meet the identity's, else `default_role`, else a
/// refusal. Targets without roles use their login for everyone.
pub fn map_role(
    cfg: &TargetIdentity,
    identity: &VerifiedIdentity,
) -> Result<UpstreamRole, IdentityError> {
    if cfg.roles.is_empty() {
        return Ok(match &cfg.default_role {
            Some(r) => UpstreamRole::SetRole(r.clone()),
            None => UpstreamRole::TargetLogin,
        });
    }
    let mapped = cfg
        .roles
        .iter()
        .find(|r| r.groups.iter().any(|g| identity.groups.contains(g)));
    match mapped {
        Some(r) => match (&r.user, &r.password_file, &r.set_role) {
            (Some(user), Some(file), None) => Ok(UpstreamRole::Login {
                user: user.clone(),
                password_file: file.clone(),
            }),
            (None, None, Some(role)) => Ok(UpstreamRole::SetRole(role.clone())),
            _ => Err(IdentityError::Config(
                "a [[target.role]] needs either user and password_file, or set_role".into(),
            )),
        },
        None => match &cfg.default_role {
            Some(r) => Ok(UpstreamRole::SetRole(r.clone())),
            None => Err(IdentityError::NoRoleMapping {
                subject: identity.subject.clone(),
                groups: identity.groups.clone(),
            }),
        },
    }
}

/// `SET ROLE "name"` with the name quoted as an identifier.
pub fn set_role_sql(role: &str) -> String {
    format!("SET ROLE \"{}\"", role.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::config::RoleMapping;
    use std::time::SystemTime;

    fn identity(groups: &[&str]) -> VerifiedIdentity {
        VerifiedIdentity {
            subject: "alice".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            actors: vec![],
            jti: None,
            client_id: None,
            issuer: "https://idp".into(),
            audience: "pg".into(),
            token_hash: "00".into(),
            issued_at: None,
            expires_at: SystemTime::now(),
        }
    }

    #[test]
    fn first_matching_group_wins_and_unmapped_is_refused() {
        let mut cfg: TargetIdentity =
            toml::from_str("issuer = \"https://idp\"\naudience = \"pg\"\nmode = \"validate\"\n")
                .unwrap();
        assert_eq!(
            map_role(&cfg, &identity(&[])).unwrap(),
            UpstreamRole::TargetLogin
        );
        cfg.roles = vec![
            RoleMapping {
                groups: vec!["dba".into()],
                user: Some("admin".into()),
                password_file: Some("/pw".into()),
                set_role: None,
            },
            RoleMapping {
                groups: vec!["analysts".into(), "dba".into()],
                user: None,
                password_file: None,
                set_role: Some("reader".into()),
            },
        ];
        assert!(matches!(
            map_role(&cfg, &identity(&["dba"])).unwrap(),
            UpstreamRole::Login { user, .. } if user == "admin"
        ));
        assert_eq!(
            map_role(&cfg, &identity(&["x", "analysts"])).unwrap(),
            UpstreamRole::SetRole("reader".into())
        );
        let e = map_role(&cfg, &identity(&["sales"])).unwrap_err();
        assert_eq!(e.sqlstate(), "28000");
        cfg.default_role = Some("nobody".into());
        assert_eq!(
            map_role(&cfg, &identity(&["sales"])).unwrap(),
            UpstreamRole::SetRole("nobody".into())
        );
        assert_eq!(set_role_sql("a\"b"), "SET ROLE \"a\"\"b\"");
    }
}

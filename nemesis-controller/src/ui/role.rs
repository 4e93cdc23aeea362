//! Who may do what in the UI: the three roles, ordered (an admin may do all an operator
//! may, an operator all a viewer may), and the principal a request acts as. Decides
//! nothing about sessions or tokens; the guard finds the principal, the routes name the
//! least role they need.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A user's or a token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads every page and API; changes nothing.
    Viewer,
    /// Also wakes, pauses and resumes policies and acknowledges alerts.
    Operator,
    /// Also edits policies and manages users, tokens and sinks.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}; use viewer, operator or admin"))
    }
}

/// How a request proved who it is.
#[derive(Clone)]
pub enum Via {
    /// A browser session: changes need its CSRF token.
    Session {
        /// The session id (the cookie's value); never logged.
        id: String,
        csrf: String,
        expires_in: Duration,
    },
    /// An API token (`Authorization: Bearer nmt_...`): nothing ambient, so no CSRF.
    Token { id: String },
}

/// The user (or token) a request acts as, with the role in force right now.
#[derive(Clone)]
pub struct Principal {
    pub user: String,
    pub role: Role,
    pub via: Via,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via = match &self.via {
            Via::Session { .. } => "session".to_string(),
            Via::Token { id } => format!("token {id}"),
        };
        f.debug_struct("Principal")
            .field("user", &self.user)
            .field("role", &self.role)
            .field("via", &via)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_parse_back() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().unwrap_err().contains("viewer"));
    }
}

//! What is wrong with a policy, said so a user can fix it: the field path
//! (`spec.transitions[2].when`), the column in an expression, and the message. Owns the
//! wording of rejections; it never decides validity.

use std::fmt;

/// One problem with a policy (an error, or a warning that does not stop it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The field, as a path into the object (`spec.states[1].range.max`).
    pub path: String,
    /// For expressions: the 1-based column (in characters) where the problem starts.
    pub column: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            column: None,
            message: message.into(),
        }
    }

    /// A problem inside the expression `text`, at byte `offset`.
    pub fn in_expression(
        path: impl Into<String>,
        text: &str,
        offset: usize,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            column: Some(column_of(text, offset)),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(c) => write!(f, "{}: column {c}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// The 1-based character column of byte `offset` in `text`.
pub fn column_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.get(..offset).map_or(offset, |s| s.chars().count()) + 1
}

/// A policy that cannot run; nothing is scaled for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ScalingPolicy: {}", join(problems))]
pub struct InvalidPolicy {
    /// Every error found, in field order; never empty.
    pub problems: Vec<Problem>,
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(column_of("abc", 0), 1);
        assert_eq!(column_of("abc", 2), 3);
        assert_eq!(column_of("é > x", 3), 3);
        assert_eq!(column_of("abc", 99), 4);
    }

    #[test]
    fn display_names_the_field_and_column() {
        let p = Problem::in_expression("spec.transitions[2].when", "queu > 1", 0, "unknown metric");
        assert_eq!(
            p.to_string(),
            "spec.transitions[2].when: column 1: unknown metric"
        );
        let e = InvalidPolicy {
            problems: vec![p, Problem::at("spec.initialState", "is required")],
        };
        assert_eq!(
            e.to_string(),
            "invalid ScalingPolicy: spec.transitions[2].when: column 1: unknown metric; spec.initialState: is required"
        );
    }
}

//! The little of PromQL the controller checks before Prometheus sees a query: brackets
//! and quotes that match, so a typo in a policy is reported with its column when the
//! policy is applied rather than as a failed query in a report. It never parses PromQL.

/// `Err((byte offset, message))` at the first bracket that does not match or the quote
/// that is never closed.
pub fn check_brackets(q: &str) -> Result<(), (usize, String)> {
    let mut open: Vec<(usize, char)> = Vec::new();
    let mut chars = q.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // A string: skip to its closing quote (backslash escapes, except in
                // raw `...` strings).
                let mut closed = false;
                while let Some((_, d)) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        closed = true;
                        break;
                    }
                }
                if !closed {
                    return Err((
                        i,
                        format!("the string opened here with {c} is never closed"),
                    ));
                }
            }
            '(' | '[' | '{' => open.push((i, c)),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                match open.pop() {
                    Some((_, o)) if o == want => {}
                    Some((at, o)) => {
                        return Err((
                            i,
                            format!(
                                "`{c}` does not close the `{o}` at column {}",
                                super::problem::column_of(q, at)
                            ),
                        ));
                    }
                    None => return Err((i, format!("`{c}` closes nothing"))),
                }
            }
            _ => {}
        }
    }
    match open.pop() {
        Some((at, o)) => Err((at, format!("`{o}` is never closed"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_brackets_and_strings_pass_and_the_first_mismatch_is_located() {
        assert!(check_brackets(r#"sum(rate(x{code=~"5.."}[5m]))"#).is_ok());
        assert!(
            check_brackets(r#"x{a="(\")"}"#).is_ok(),
            "brackets in strings do not count"
        );
        let (at, msg) = check_brackets("sum(rate(x[5m])").unwrap_err();
        assert_eq!((at, msg.as_str()), (3, "`(` is never closed"));
        let (at, msg) = check_brackets("sum(x[5m)]").unwrap_err();
        assert_eq!(at, 8);
        assert!(msg.contains("does not close the `[` at column 6"), "{msg}");
        let (at, _) = check_brackets("x)").unwrap_err();
        assert_eq!(at, 1);
        let (at, msg) = check_brackets(r#"x{a="b}"#).unwrap_err();
        assert_eq!(at, 4);
        assert!(msg.contains("never closed"), "{msg}");
    }
}

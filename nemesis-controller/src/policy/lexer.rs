//! Splits a condition's text into tokens, each with the byte range it came from, so every
//! later error can point at a column. Owns spelling only: it never decides whether the
//! tokens make sense together (that is the parser's job).

use super::duration::scan_duration;

/// A byte range `start..end` in the expression text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start, other.end)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Number(f64),
    /// A number with a time unit, in milliseconds.
    Duration(i64),
    Str(String),
    /// A name, possibly dotted (`conns.active`).
    Ident(String),
    And,
    Or,
    Not,
    For,
    True,
    False,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    Plus,
    Minus,
    Star,
    Slash,
    LParen,
    RParen,
    Comma,
    Eof,
}

impl Tok {
    /// How the token reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Tok::Number(n) => format!("number `{n}`"),
            Tok::Duration(ms) => format!(
                "duration `{}`",
                super::duration::format_duration(chrono::TimeDelta::milliseconds(*ms))
            ),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Ident(name) => format!("`{name}`"),
            Tok::And => "`and`".into(),
            Tok::Or => "`or`".into(),
            Tok::Not => "`not`".into(),
            Tok::For => "`for`".into(),
            Tok::True => "`true`".into(),
            Tok::False => "`false`".into(),
            Tok::Lt => "`<`".into(),
            Tok::Le => "`<=`".into(),
            Tok::Gt => "`>`".into(),
            Tok::Ge => "`>=`".into(),
            Tok::Eq => "`==`".into(),
            Tok::Ne => "`!=`".into(),
            Tok::Plus => "`+`".into(),
            Tok::Minus => "`-`".into(),
            Tok::Star => "`*`".into(),
            Tok::Slash => "`/`".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::Comma => "`,`".into(),
            Tok::Eof => "the end of the expression".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub tok: Tok,
    pub span: Span,
}

/// A spelling error at a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError {
    pub offset: usize,
    pub message: String,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Tokenizes the whole text; the last token is always `Eof`.
pub fn tokenize(text: &str) -> Result<Vec<Token>, LexError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let c = bytes[pos];
        if c.is_ascii_whitespace() {
            pos += 1;
            continue;
        }
        let start = pos;
        let single = |tok: Tok| Token {
            tok,
            span: Span::new(start, start + 1),
        };
        let double = |tok: Tok| Token {
            tok,
            span: Span::new(start, start + 2),
        };
        let next = bytes.get(pos + 1).copied();
        let token = match c {
            b'(' => single(Tok::LParen),
            b')' => single(Tok::RParen),
            b',' => single(Tok::Comma),
            b'+' => single(Tok::Plus),
            b'-' => single(Tok::Minus),
            b'*' => single(Tok::Star),
            b'/' => single(Tok::Slash),
            b'<' if next == Some(b'=') => double(Tok::Le),
            b'<' => single(Tok::Lt),
            b'>' if next == Some(b'=') => double(Tok::Ge),
            b'>' => single(Tok::Gt),
            b'=' if next == Some(b'=') => double(Tok::Eq),
            b'=' => {
                return Err(LexError {
                    offset: start,
                    message: "`=` is not an operator here: compare with `==`".into(),
                });
            }
            b'!' if next == Some(b'=') => double(Tok::Ne),
            b'!' => {
                return Err(LexError {
                    offset: start,
                    message: "`!` is not an operator here: write `not`".into(),
                });
            }
            b'&' => {
                return Err(LexError {
                    offset: start,
                    message: "`&` is not an operator here: write `and`".into(),
                });
            }
            b'|' => {
                return Err(LexError {
                    offset: start,
                    message: "`|` is not an operator here: write `or`".into(),
                });
            }
            b'"' | b'\'' => {
                let quote = c;
                let body_start = pos + 1;
                let Some(len) = bytes[body_start..].iter().position(|&b| b == quote) else {
                    return Err(LexError {
                        offset: start,
                        message: "this string is never closed".into(),
                    });
                };
                let end = body_start + len + 1;
                Token {
                    tok: Tok::Str(text[body_start..body_start + len].to_string()),
                    span: Span::new(start, end),
                }
            }
            b'0'..=b'9' | b'.' => lex_number(text, start)?,
            c if is_ident_start(c) => {
                let mut end = pos;
                loop {
                    while end < bytes.len() && is_ident_char(bytes[end]) {
                        end += 1;
                    }
                    // A dot joins name parts only when a name part follows it.
                    if end + 1 < bytes.len() && bytes[end] == b'.' && is_ident_start(bytes[end + 1])
                    {
                        end += 1;
                        continue;
                    }
                    break;
                }
                let word = &text[start..end];
                let tok = match word {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "for" => Tok::For,
                    "true" => Tok::True,
                    "false" => Tok::False,
                    _ => Tok::Ident(word.to_string()),
                };
                Token {
                    tok,
                    span: Span::new(start, end),
                }
            }
            _ => {
                let ch = text[start..].chars().next().unwrap_or('?');
                return Err(LexError {
                    offset: start,
                    message: format!("unexpected character `{ch}`"),
                });
            }
        };
        pos = token.span.end;
        out.push(token);
    }
    out.push(Token {
        tok: Tok::Eof,
        span: Span::new(text.len(), text.len()),
    });
    Ok(out)
}

/// A number, or a duration when a unit letter follows the digits directly.
fn lex_number(text: &str, start: usize) -> Result<Token, LexError> {
    let bytes = text.as_bytes();
    let mut end = start;
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b'.') {
        end += 1;
    }
    if end < bytes.len() && bytes[end].is_ascii_alphabetic() {
        let (ms, used) = scan_duration(&text[start..]).map_err(|e| LexError {
            offset: start + e.offset,
            message: e.message,
        })?;
        let end = start + used;
        if end < bytes.len() && is_ident_char(bytes[end]) {
            return Err(LexError {
                offset: end,
                message: "a duration must be followed by a space or an operator".into(),
            });
        }
        return Ok(Token {
            tok: Tok::Duration(ms),
            span: Span::new(start, end),
        });
    }
    let digits = &text[start..end];
    let value: f64 = digits.parse().map_err(|_| LexError {
        offset: start,
        message: format!("`{digits}` is not a number"),
    })?;
    Ok(Token {
        tok: Tok::Number(value),
        span: Span::new(start, end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn dotted_names_are_one_token() {
        assert_eq!(
            toks("conns.active >= 0"),
            vec![
                Tok::Ident("conns.active".into()),
                Tok::Ge,
                Tok::Number(0.0),
                Tok::Eof
            ]
        );
    }

    #[test]
    fn numbers_with_units_are_durations_in_milliseconds() {
        assert_eq!(
            toks("x for 10m"),
            vec![
                Tok::Ident("x".into()),
                Tok::For,
                Tok::Duration(600_000),
                Tok::Eof
            ]
        );
        assert_eq!(toks("1h30m")[0], Tok::Duration(5_400_000));
        assert_eq!(toks("2.5")[0], Tok::Number(2.5));
    }

    #[test]
    fn spans_cover_the_source_bytes() {
        let tokens = tokenize("queue > 20 for 30s").unwrap();
        let spans: Vec<(usize, usize)> =
            tokens.iter().map(|t| (t.span.start, t.span.end)).collect();
        assert_eq!(
            spans,
            vec![(0, 5), (6, 7), (8, 10), (11, 14), (15, 18), (18, 18)]
        );
    }

    #[test]
    fn strings_take_either_quote() {
        assert_eq!(toks("'a b'")[0], Tok::Str("a b".into()));
        assert_eq!(
            toks("\"0 8 * * MON-FRI\"")[0],
            Tok::Str("0 8 * * MON-FRI".into())
        );
    }

    #[test]
    fn c_style_operators_get_a_hint() {
        let err = tokenize("a > 1 && b").unwrap_err();
        assert_eq!(err.offset, 6);
        assert!(err.message.contains("write `and`"));
        assert!(tokenize("a = 1").unwrap_err().message.contains("`==`"));
        assert!(tokenize("!a").unwrap_err().message.contains("`not`"));
    }

    #[test]
    fn unclosed_string_and_bad_unit_point_at_their_start() {
        assert_eq!(tokenize("schedule(\"0 8").unwrap_err().offset, 9);
        let err = tokenize("x for 10y").unwrap_err();
        assert_eq!(err.offset, 8);
        assert!(err.message.contains("unknown unit `y`"), "{}", err.message);
    }
}

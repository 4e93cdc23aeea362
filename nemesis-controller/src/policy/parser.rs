//! Recursive-descent parser for conditions and metric expressions. Owns the grammar and
//! its error messages (what was expected, at which byte); it never resolves names.
//!
//! Grammar, loosest binding first:
//! ```text
//! expr       := and_expr ("or" and_expr)*
//! and_expr   := not_expr ("and" not_expr)*
//! not_expr   := "not" not_expr | sustained
//! sustained  := comparison ("for" DURATION)?
//! comparison := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)?
//! sum        := product (("+" | "-") product)*
//! product    := unary (("*" | "/") unary)*
//! unary      := "-" unary | primary
//! primary    := NUMBER | DURATION | STRING | "true" | "false" | NAME
//!             | NAME "(" (arg ("," arg)*)? ")" | "(" expr ")"
//! arg        := "for" DURATION | expr
//! ```
//! So `a == 0 for 10m and b` is `(a == 0 for 10m) and b`, and `not a for 5m` is
//! `not (a for 5m)`; parentheses sustain a whole combination: `(a and b) for 5m`.

use super::ast::{BinOp, Node, NodeKind};
use super::lexer::{LexError, Span, Tok, Token, tokenize};

/// A syntax error at a byte offset of the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl From<LexError> for ParseError {
    fn from(e: LexError) -> Self {
        ParseError {
            offset: e.offset,
            message: e.message,
        }
    }
}

/// Deep nesting is refused rather than risking the controller's stack on a hostile policy.
const MAX_DEPTH: usize = 64;

pub fn parse(text: &str) -> Result<Node, ParseError> {
    let tokens = tokenize(text)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        depth: 0,
    };
    if p.peek() == &Tok::Eof {
        return Err(ParseError {
            offset: 0,
            message: "the expression is empty".into(),
        });
    }
    let node = p.expr()?;
    match p.peek() {
        Tok::Eof => Ok(node),
        Tok::RParen => Err(p.error_here("this `)` has no matching `(`")),
        Tok::For => Err(p.error_here(
            "`for` must follow a condition; to sustain a combination, put it in parentheses",
        )),
        _ => Err(p.expected("an operator (`and`, `or`, a comparison, arithmetic) or the end")),
    }
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.tokens[self.pos].tok
    }

    fn span(&self) -> Span {
        self.tokens[self.pos].span
    }

    fn bump(&mut self) -> Token {
        let t = self.tokens[self.pos].clone();
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        t
    }

    fn error_here(&self, message: &str) -> ParseError {
        ParseError {
            offset: self.span().start,
            message: message.to_string(),
        }
    }

    fn expected(&self, what: &str) -> ParseError {
        ParseError {
            offset: self.span().start,
            message: format!("expected {what}, found {}", self.peek().describe()),
        }
    }

    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_here("the expression is nested too deeply"));
        }
        Ok(())
    }

    fn binary(op: BinOp, lhs: Node, rhs: Node) -> Node {
        let span = lhs.span.to(rhs.span);
        Node {
            kind: NodeKind::Binary {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
            span,
        }
    }

    fn expr(&mut self) -> Result<Node, ParseError> {
        self.enter()?;
        let mut lhs = self.and_expr()?;
        while self.peek() == &Tok::Or {
            self.bump();
            let rhs = self.and_expr()?;
            lhs = Self::binary(BinOp::Or, lhs, rhs);
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn and_expr(&mut self) -> Result<Node, ParseError> {
        let mut lhs = self.not_expr()?;
        while self.peek() == &Tok::And {
            self.bump();
            let rhs = self.not_expr()?;
            lhs = Self::binary(BinOp::And, lhs, rhs);
        }
        Ok(lhs)
    }

    fn not_expr(&mut self) -> Result<Node, ParseError> {
        if self.peek() == &Tok::Not {
            self.enter()?;
            let start = self.bump().span;
            let inner = self.not_expr()?;
            self.depth -= 1;
            let span = start.to(inner.span);
            return Ok(Node {
                kind: NodeKind::Not(Box::new(inner)),
                span,
            });
        }
        self.sustained()
    }

    fn sustained(&mut self) -> Result<Node, ParseError> {
        let cond = self.comparison()?;
        if self.peek() != &Tok::For {
            return Ok(cond);
        }
        self.bump();
        let (window_ms, window_span) = self.duration_after_for()?;
        let span = cond.span.to(window_span);
        Ok(Node {
            kind: NodeKind::Sustained {
                cond: Box::new(cond),
                window_ms,
                window_span,
            },
            span,
        })
    }

    fn duration_after_for(&mut self) -> Result<(i64, Span), ParseError> {
        match *self.peek() {
            Tok::Duration(ms) => {
                let span = self.bump().span;
                Ok((ms, span))
            }
            Tok::Number(n) => Err(ParseError {
                offset: self.span().end,
                message: format!("`{n}` after `for` needs a unit, for example `{n}s` or `{n}m`"),
            }),
            _ => Err(self.expected("a duration such as `30s` or `10m` after `for`")),
        }
    }

    fn comparison(&mut self) -> Result<Node, ParseError> {
        let lhs = self.sum()?;
        let Some(op) = cmp_op(self.peek()) else {
            return Ok(lhs);
        };
        self.bump();
        let rhs = self.sum()?;
        if cmp_op(self.peek()).is_some() {
            return Err(self.error_here("comparisons cannot be chained: join them with `and`"));
        }
        Ok(Self::binary(op, lhs, rhs))
    }

    fn sum(&mut self) -> Result<Node, ParseError> {
        let mut lhs = self.product()?;
        loop {
            let op = match self.peek() {
                Tok::Plus => BinOp::Add,
                Tok::Minus => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.bump();
            let rhs = self.product()?;
            lhs = Self::binary(op, lhs, rhs);
        }
    }

    fn product(&mut self) -> Result<Node, ParseError> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek() {
                Tok::Star => BinOp::Mul,
                Tok::Slash => BinOp::Div,
                _ => return Ok(lhs),
            };
            self.bump();
            let rhs = self.unary()?;
            lhs = Self::binary(op, lhs, rhs);
        }
    }

    fn unary(&mut self) -> Result<Node, ParseError> {
        if self.peek() == &Tok::Minus {
            self.enter()?;
            let start = self.bump().span;
            let inner = self.unary()?;
            self.depth -= 1;
            let span = start.to(inner.span);
            return Ok(Node {
                kind: NodeKind::Neg(Box::new(inner)),
                span,
            });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Node, ParseError> {
        let span = self.span();
        let kind = match self.peek().clone() {
            Tok::Number(n) => NodeKind::Number(n),
            Tok::Duration(ms) => NodeKind::Duration(ms),
            Tok::Str(s) => NodeKind::Str(s),
            Tok::True => NodeKind::Bool(true),
            Tok::False => NodeKind::Bool(false),
            Tok::Ident(name) => {
                self.bump();
                if self.peek() == &Tok::LParen {
                    return self.call(name, span);
                }
                return Ok(Node {
                    kind: NodeKind::Name(name),
                    span,
                });
            }
            Tok::LParen => {
                self.bump();
                let mut inner = self.expr()?;
                if self.peek() != &Tok::RParen {
                    return Err(self.expected("`)` to close the `(`"));
                }
                let close = self.bump().span;
                // The parenthesised node covers its parentheses, so errors about the
                // whole group underline all of it.
                inner.span = span.to(close);
                return Ok(inner);
            }
            _ => return Err(self.expected("a number, a metric, a function or `(`")),
        };
        self.bump();
        Ok(Node { kind, span })
    }

    fn call(&mut self, name: String, name_span: Span) -> Result<Node, ParseError> {
        self.enter()?;
        self.bump(); // `(`
        let mut args = Vec::new();
        if self.peek() != &Tok::RParen {
            loop {
                if self.peek() == &Tok::For {
                    let for_span = self.bump().span;
                    let (ms, span) = self.duration_after_for()?;
                    args.push(Node {
                        kind: NodeKind::Duration(ms),
                        span: for_span.to(span),
                    });
                } else {
                    args.push(self.expr()?);
                }
                match self.peek() {
                    Tok::Comma => {
                        self.bump();
                    }
                    Tok::RParen => break,
                    _ => return Err(self.expected("`,` or `)` in the argument list")),
                }
            }
        }
        let close = self.bump().span;
        self.depth -= 1;
        Ok(Node {
            kind: NodeKind::Call {
                name,
                name_span,
                args,
            },
            span: name_span.to(close),
        })
    }
}

fn cmp_op(tok: &Tok) -> Option<BinOp> {
    Some(match tok {
        Tok::Lt => BinOp::Lt,
        Tok::Le => BinOp::Le,
        Tok::Gt => BinOp::Gt,
        Tok::Ge => BinOp::Ge,
        Tok::Eq => BinOp::Eq,
        Tok::Ne => BinOp::Ne,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders the tree with explicit parentheses, to check precedence at a glance.
    fn show(node: &Node) -> String {
        match &node.kind {
            NodeKind::Number(n) => format!("{n}"),
            NodeKind::Duration(ms) => format!("{ms}ms"),
            NodeKind::Str(s) => format!("{s:?}"),
            NodeKind::Bool(b) => format!("{b}"),
            NodeKind::Name(n) => n.clone(),
            NodeKind::Call { name, args, .. } => format!(
                "{name}({})",
                args.iter().map(show).collect::<Vec<_>>().join(", ")
            ),
            NodeKind::Neg(n) => format!("(-{})", show(n)),
            NodeKind::Not(n) => format!("(not {})", show(n)),
            NodeKind::Binary { op, lhs, rhs } => {
                format!("({} {} {})", show(lhs), op.symbol(), show(rhs))
            }
            NodeKind::Sustained {
                cond, window_ms, ..
            } => {
                format!("({} for {window_ms}ms)", show(cond))
            }
        }
    }

    fn p(text: &str) -> String {
        show(&parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}")))
    }

    fn err(text: &str) -> ParseError {
        parse(text).unwrap_err()
    }

    #[test]
    fn arithmetic_binds_tighter_than_comparison() {
        assert_eq!(p("a + b * 2 > 10"), "((a + (b * 2)) > 10)");
        assert_eq!(p("(a + b) * 2 > 10"), "(((a + b) * 2) > 10)");
        assert_eq!(p("a - b - c < 1"), "(((a - b) - c) < 1)");
        assert_eq!(p("-a / 2 <= -1"), "(((-a) / 2) <= (-1))");
    }

    #[test]
    fn and_binds_tighter_than_or_and_not_tighter_than_and() {
        assert_eq!(
            p("a > 1 or b > 2 and c > 3"),
            "((a > 1) or ((b > 2) and (c > 3)))"
        );
        assert_eq!(p("not a > 1 and b"), "((not (a > 1)) and b)");
        assert_eq!(p("not not demand"), "(not (not demand))");
    }

    #[test]
    fn for_sustains_the_comparison_before_it() {
        assert_eq!(
            p("conns.active == 0 for 10m and queue < 5"),
            "(((conns.active == 0) for 600000ms) and (queue < 5))"
        );
        assert_eq!(p("not a > 1 for 5s"), "(not ((a > 1) for 5000ms))");
        assert_eq!(
            p("(a > 1 and b > 2) for 30s"),
            "(((a > 1) and (b > 2)) for 30000ms)"
        );
    }

    #[test]
    fn calls_take_names_strings_and_for_windows() {
        assert_eq!(p("alert(GPUPressure)"), "alert(GPUPressure)");
        assert_eq!(
            p("schedule(\"0 8 * * MON-FRI\", \"Europe/Paris\", for 8h)"),
            "schedule(\"0 8 * * MON-FRI\", \"Europe/Paris\", 28800000ms)"
        );
        assert_eq!(p("f()"), "f()");
    }

    #[test]
    fn errors_say_what_was_expected_and_where() {
        let e = err("conns.active > ");
        assert_eq!(e.offset, 15);
        assert_eq!(
            e.message,
            "expected a number, a metric, a function or `(`, found the end of the expression"
        );
        let e = err("queue > 20 for 30");
        assert_eq!(e.offset, 17);
        assert!(e.message.contains("needs a unit"), "{}", e.message);
        let e = err("a > 1 b");
        assert_eq!(e.offset, 6);
        assert!(
            e.message.starts_with("expected an operator"),
            "{}",
            e.message
        );
        let e = err("(a > 1");
        assert_eq!(
            (e.offset, e.message.as_str()),
            (
                6,
                "expected `)` to close the `(`, found the end of the expression"
            )
        );
        let e = err("a > 1)");
        assert_eq!(e.offset, 5);
        let e = err("1 < a < 3");
        assert_eq!(e.offset, 6);
        assert!(e.message.contains("chained"));
        let e = err("a and for 5m");
        assert_eq!(e.offset, 6);
        assert_eq!(err("   ").message, "the expression is empty");
        let e = err("alert(A B)");
        assert_eq!(e.offset, 8);
        assert!(e.message.contains("`,` or `)`"), "{}", e.message);
    }

    #[test]
    fn a_double_for_is_explained() {
        let e = err("a > 1 for 5s for 3s");
        assert_eq!(e.offset, 13);
        assert!(e.message.contains("parentheses"));
    }

    #[test]
    fn hostile_nesting_is_refused_not_overflowing() {
        let text = format!("{}a{}", "(".repeat(500), ")".repeat(500));
        assert!(err(&text).message.contains("nested too deeply"));
        let text = format!("{}a", "not ".repeat(500));
        assert!(err(&text).message.contains("nested too deeply"));
    }
}

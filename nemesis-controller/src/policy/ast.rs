//! The syntax tree of a condition as written, with spans, before names are resolved.
//! Owns shape only: nothing here knows which metrics exist or what a value means.

use super::lexer::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::And => "and",
            BinOp::Or => "or",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    Number(f64),
    /// Milliseconds.
    Duration(i64),
    Str(String),
    Bool(bool),
    /// A metric or `demand`.
    Name(String),
    Call {
        name: String,
        name_span: Span,
        args: Vec<Node>,
    },
    Neg(Box<Node>),
    Not(Box<Node>),
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
    },
    /// `cond for window`: true once `cond` has been true without a break for `window`.
    Sustained {
        cond: Box<Node>,
        window_ms: i64,
        window_span: Span,
    },
}

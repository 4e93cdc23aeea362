//! The `ScalingPolicy` resource and its language: CRD types, the condition language
//! (lexer, parser, name resolution), the short form, and validation into a
//! `CompiledPolicy`. Owns what a policy means; it never evaluates one against live data
//! (that is `engine`) and never talks to Kubernetes.

pub mod ast;
pub mod compile;
pub mod crd;
pub mod duration;
pub mod expr;
pub mod lexer;
pub mod parser;
pub mod problem;
pub mod program;
pub mod resolve;
pub mod schedule;
pub mod short_form;
pub mod status;

pub use compile::{CompiledPolicy, CompiledSource, Replicas, compile};
pub use crd::{ScalingPolicy, ScalingPolicySpec, ScalingPolicyStatus, crd_yaml};
pub use problem::{InvalidPolicy, Problem};

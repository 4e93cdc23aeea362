//! Protobuf request bodies, which kubectl's generators (`kubectl create namespace`,
//! `create deployment`, `create configmap`, ...) send: decoded into JSON for the built-in
//! kinds the server serves. Responses are always JSON.

mod decode;
mod table;
mod table_auth;

pub use decode::{ProtoError, decode_object};

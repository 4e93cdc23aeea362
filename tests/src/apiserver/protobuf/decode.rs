//! A table-driven protobuf reader: the Kubernetes `k8s\0` envelope (runtime.Unknown) and
//! the messages of the built-in kinds, turned into the JSON the rest of the server
//! speaks. Anything the table does not describe is an error, never silently dropped.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::table::MESSAGES;
use crate::apiserver::schemas::builtin_schemas;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    I32,
    I64,
    Bool,
    Bytes,
    Msg,
    MapStr,
    MapBytes,
    MapMsg,
}

#[derive(Debug)]
pub struct Field {
    pub tag: u32,
    pub kind: Kind,
    pub repeated: bool,
    /// The field's name in snake case (as the Rust bindings spell it).
    pub name: &'static str,
    /// The message type of `Msg`/`MapMsg` fields.
    pub target: &'static str,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("the protobuf body does not start with the Kubernetes magic bytes \"k8s\\0\"")]
    ReadEnvelope,
    #[error("truncated or malformed protobuf in {0}")]
    ReadMessage(String),
    #[error("protobuf for {api_version} {kind} is not decoded by this test server")]
    UnknownKind { api_version: String, kind: String },
    #[error("protobuf field {tag} of {message} is not known to this test server")]
    UnknownField { message: String, tag: u32 },
    #[error("protobuf field {field} of {message} has wire type {wire}, expected another")]
    WireType {
        message: String,
        field: String,
        wire: u8,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn err(&self) -> ProtoError {
        ProtoError::ReadMessage(self.what.to_owned())
    }
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| self.err())?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err())
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let n = usize::try_from(self.varint()?).map_err(|_| self.err())?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn skip(&mut self, wire: u8) -> Result<(), ProtoError> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.advance(8),
            2 => self.bytes().map(|_| ()),
            5 => self.advance(4),
            _ => Err(self.err()),
        }
    }
    fn advance(&mut self, n: usize) -> Result<(), ProtoError> {
        if self.pos + n > self.buf.len() {
            return Err(self.err());
        }
        self.pos += n;
        Ok(())
    }
}

fn fields_of(message: &str) -> Option<&'static [Field]> {
    MESSAGES
        .iter()
        .chain(super::table_auth::MESSAGES)
        .find(|(m, _)| *m == message)
        .map(|(_, f)| *f)
}

fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The JSON name of a field: the OpenAPI property it corresponds to, else camelCase.
fn json_name(message: &str, field: &str) -> String {
    let defs = &builtin_schemas().defs;
    let want = normalise(field);
    if let Some(props) = defs
        .get(&format!("io.k8s.{message}"))
        .and_then(|d| d["properties"].as_object())
        && let Some(p) = props.keys().find(|k| normalise(k) == want)
    {
        return p.clone();
    }
    let mut out = String::new();
    let mut up = false;
    for c in field.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn rfc3339(secs: i64, nanos: i64, micros: bool) -> Value {
    match chrono::DateTime::from_timestamp(secs, nanos as u32) {
        Some(t) if micros => json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        Some(t) => json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => Value::Null,
    }
}

/// Messages whose JSON form is not an object.
fn special(message: &str, r: &mut Reader) -> Result<Option<Value>, ProtoError> {
    let mut ints = [0i64; 4];
    let mut strs: [Option<String>; 4] = Default::default();
    let mut raw: Option<Vec<u8>> = None;
    let known = matches!(
        message,
        "apimachinery.pkg.apis.meta.v1.Time"
            | "apimachinery.pkg.apis.meta.v1.MicroTime"
            | "apimachinery.pkg.api.resource.Quantity"
            | "apimachinery.pkg.util.intstr.IntOrString"
            | "apimachinery.pkg.apis.meta.v1.FieldsV1"
            | "apimachinery.pkg.runtime.RawExtension"
    );
    if !known {
        return Ok(None);
    }
    while !r.done() {
        let key = r.varint()?;
        let (tag, wire) = ((key >> 3) as usize, (key & 7) as u8);
        match wire {
            0 if tag < 4 => ints[tag] = r.varint()? as i64,
            2 if tag < 4 => {
                let b = r.bytes()?;
                raw = Some(b.to_vec());
                strs[tag] = Some(String::from_utf8_lossy(b).into_owned());
            }
            w => r.skip(w)?,
        }
    }
    Ok(Some(match message {
        "apimachinery.pkg.apis.meta.v1.Time" | "apimachinery.pkg.apis.meta.v1.MicroTime" => {
            if ints[1] == 0 && ints[2] == 0 {
                Value::Null
            } else {
                rfc3339(ints[1], ints[2], message.ends_with("MicroTime"))
            }
        }
        "apimachinery.pkg.api.resource.Quantity" => json!(strs[1].clone().unwrap_or_default()),
        "apimachinery.pkg.util.intstr.IntOrString" => {
            if ints[1] == 1 {
                json!(strs[3].clone().unwrap_or_default())
            } else {
                json!(ints[2] as i32)
            }
        }
        _ => raw
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null),
    }))
}

fn scalar(
    kind: Kind,
    wire: u8,
    r: &mut Reader,
    message: &str,
    field: &Field,
) -> Result<Value, ProtoError> {
    let wrong = || ProtoError::WireType {
        message: message.to_owned(),
        field: field.name.to_owned(),
        wire,
    };
    Ok(match (kind, wire) {
        (Kind::Str, 2) => json!(String::from_utf8_lossy(r.bytes()?)),
        (Kind::Bytes, 2) => json!(base64::engine::general_purpose::STANDARD.encode(r.bytes()?)),
        (Kind::I32, 0) => json!(r.varint()? as i64 as i32),
        (Kind::I64, 0) => json!(r.varint()? as i64),
        (Kind::Bool, 0) => json!(r.varint()? != 0),
        (Kind::Msg, 2) => {
            let b = r.bytes()?;
            decode_message(field.target, b)?
        }
        _ => return Err(wrong()),
    })
}

/// Decode one message of type `message` (`api.core.v1.Pod`, ...) into JSON.
pub fn decode_message(message: &str, buf: &[u8]) -> Result<Value, ProtoError> {
    let mut r = Reader {
        buf,
        pos: 0,
        what: message,
    };
    if let Some(v) = special(message, &mut r)? {
        return Ok(v);
    }
    let fields = fields_of(message).ok_or_else(|| ProtoError::UnknownField {
        message: message.to_owned(),
        tag: 0,
    })?;
    let mut obj = Map::new();
    while !r.done() {
        let key = r.varint()?;
        let (tag, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let f = fields
            .iter()
            .find(|f| f.tag == tag)
            .ok_or_else(|| ProtoError::UnknownField {
                message: message.to_owned(),
                tag,
            })?;
        let name = json_name(message, f.name);
        match f.kind {
            Kind::MapStr | Kind::MapBytes | Kind::MapMsg => {
                let entry = r.bytes()?;
                let mut er = Reader {
                    buf: entry,
                    pos: 0,
                    what: message,
                };
                let (mut k, mut v) = (String::new(), Value::Null);
                while !er.done() {
                    let ek = er.varint()?;
                    match (ek >> 3, (ek & 7) as u8) {
                        (1, 2) => k = String::from_utf8_lossy(er.bytes()?).into_owned(),
                        (2, w) => {
                            let vk = match f.kind {
                                Kind::MapStr => Kind::Str,
                                Kind::MapBytes => Kind::Bytes,
                                _ => Kind::Msg,
                            };
                            v = scalar(vk, w, &mut er, message, f)?;
                        }
                        (_, w) => er.skip(w)?,
                    }
                }
                let m = obj.entry(name).or_insert_with(|| json!({}));
                m[k] = if v.is_null() && f.kind == Kind::MapStr {
                    json!("")
                } else {
                    v
                };
            }
            _ if f.repeated
                && wire == 2
                && matches!(f.kind, Kind::I32 | Kind::I64 | Kind::Bool) =>
            {
                // Packed repeated scalars.
                let packed = r.bytes()?;
                let mut pr = Reader {
                    buf: packed,
                    pos: 0,
                    what: message,
                };
                let arr = obj.entry(name).or_insert_with(|| json!([]));
                while !pr.done() {
                    let v = scalar(f.kind, 0, &mut pr, message, f)?;
                    arr.as_array_mut().expect("array").push(v);
                }
            }
            _ => {
                let v = scalar(f.kind, wire, &mut r, message, f)?;
                if f.repeated {
                    obj.entry(name)
                        .or_insert_with(|| json!([]))
                        .as_array_mut()
                        .expect("array")
                        .push(v);
                } else if !(v.is_null() || v == "") {
                    // Go writes unset non-pointer strings as ""; JSON would omit them.
                    obj.insert(name, v);
                }
            }
        }
    }
    Ok(Value::Object(obj))
}

/// The protobuf package of an apiVersion (`apps/v1` -> `api.apps.v1`).
fn package(api_version: &str) -> String {
    match api_version.split_once('/') {
        None => format!("api.core.{api_version}"),
        Some((g, v)) => format!("api.{}.{v}", g.trim_end_matches(".k8s.io")),
    }
}

/// Decode a Kubernetes protobuf request body (`k8s\0` + runtime.Unknown) into JSON.
pub fn decode_object(body: &[u8]) -> Result<Value, ProtoError> {
    let env = body
        .strip_prefix(b"k8s\0")
        .ok_or(ProtoError::ReadEnvelope)?;
    let mut r = Reader {
        buf: env,
        pos: 0,
        what: "runtime.Unknown",
    };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while !r.done() {
        let key = r.varint()?;
        match (key >> 3, (key & 7) as u8) {
            (1, 2) => {
                let tm = r.bytes()?;
                let mut tr = Reader {
                    buf: tm,
                    pos: 0,
                    what: "TypeMeta",
                };
                while !tr.done() {
                    let k = tr.varint()?;
                    match (k >> 3, (k & 7) as u8) {
                        (1, 2) => api_version = String::from_utf8_lossy(tr.bytes()?).into_owned(),
                        (2, 2) => kind = String::from_utf8_lossy(tr.bytes()?).into_owned(),
                        (_, w) => tr.skip(w)?,
                    }
                }
            }
            (2, 2) => raw = r.bytes()?,
            (_, w) => r.skip(w)?,
        }
    }
    let message = format!("{}.{kind}", package(&api_version));
    if fields_of(&message).is_none() {
        return Err(ProtoError::UnknownKind { api_version, kind });
    }
    let mut obj = decode_message(&message, raw)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(tag: u32, wire: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![((tag << 3) | u32::from(wire)) as u8];
        if wire == 2 {
            v.push(payload.len() as u8);
        }
        v.extend_from_slice(payload);
        v
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = field(1, 2, api_version.as_bytes());
        tm.extend(field(2, 2, kind.as_bytes()));
        let mut unk = field(1, 2, &tm);
        unk.extend(field(2, 2, raw));
        let mut body = b"k8s\0".to_vec();
        body.extend(unk);
        body
    }

    #[test]
    fn decodes_a_namespace_with_labels() {
        let mut entry = field(1, 2, b"team");
        entry.extend(field(2, 2, b"a"));
        let mut md = field(1, 2, b"demo");
        md.extend(field(11, 2, &entry));
        md.extend(field(3, 2, b"")); // an unset string, as Go writes it
        let ns = field(1, 2, &md);
        let v = decode_object(&envelope("v1", "Namespace", &ns)).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"team": "a"}}})
        );
    }

    #[test]
    fn deployment_fields_get_their_json_names() {
        // spec.replicas (1, varint 0) and spec.progressDeadlineSeconds (9).
        let mut spec = vec![0x08, 0x00];
        spec.extend([0x48, 0x05]);
        let d = field(2, 2, &spec);
        let v = decode_object(&envelope("apps/v1", "Deployment", &d)).unwrap();
        assert_eq!(
            v["spec"],
            json!({"replicas": 0, "progressDeadlineSeconds": 5})
        );
    }

    #[test]
    fn unknown_kinds_and_fields_are_errors() {
        assert!(matches!(
            decode_object(&envelope("v1", "Binding", b"")),
            Err(ProtoError::UnknownKind { .. })
        ));
        let bad = field(15, 0, &[]);
        let mut bad = bad;
        bad.push(1);
        assert!(matches!(
            decode_object(&envelope("v1", "ConfigMap", &bad)),
            Err(ProtoError::UnknownField { tag: 15, .. })
        ));
        assert_eq!(decode_object(b"{}"), Err(ProtoError::ReadEnvelope));
    }
}

//! Extractors that turn axum's rejections into our error body with stable codes, and
//! refuse what no request body may hold: anything but a JSON object, and our own keys
//! outside the fields that ask for one.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use keywarden_core::key_format;
use keywarden_proto::ErrorCode;
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;

use crate::error::{violation, ApiError};

/// Which top-level fields of a request body may hold one of our keys (`/v1/verify`'s
/// `key`, `/v1/keys/identify`'s `keys`). Everywhere else, at any depth and in field
/// names too, a key is refused with `SECRET_IN_FIELD`. Every body type says so itself,
/// so a new field is checked unless someone decides otherwise.
pub trait KeyFields {
    const KEY_FIELDS: &'static [&'static str] = &[];
}

mod key_fields {
    use keywarden_proto::*;

    use super::KeyFields;

    impl KeyFields for VerifyRequest {
        const KEY_FIELDS: &'static [&'static str] = &["key"];
    }
    impl KeyFields for IdentifyRequest {
        const KEY_FIELDS: &'static [&'static str] = &["keys"];
    }
    impl KeyFields for CreateKeyRequest {}
    impl KeyFields for StateChangeRequest {}
    impl KeyFields for RotateRequest {}
    impl KeyFields for CreateTokenRequest {}
    impl KeyFields for CheckpointRequest {}
    impl KeyFields for ArchiveRequest {}
    impl KeyFields for PutOwnerRequest {}
    impl KeyFields for ApplyPolicyRequest {}
    impl KeyFields for ImportShadowKeys {}
    impl KeyFields for CreateServiceRequest {}
    impl KeyFields for AckRequest {}
}

/// JSON body. Unknown fields, bad types, bad syntax, a wrong content type and an oversized
/// body each get their own code.
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body means `T::default()` (for actions whose body is
/// optional, such as `{"reason": …}`).
pub struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned + KeyFields,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match read_json(req, state).await? {
            Some(v) => Ok(Self(v)),
            None => Err(ApiError::coded(
                ErrorCode::InvalidBody,
                "a JSON body is required",
            )),
        }
    }
}

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    T: DeserializeOwned + Default + KeyFields,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Self(read_json(req, state).await?.unwrap_or_default()))
    }
}

async fn read_json<S: Send + Sync, T: DeserializeOwned + KeyFields>(
    req: Request,
    state: &S,
) -> Result<Option<T>, ApiError> {
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("application/json") || v.ends_with("+json")
        })
        .unwrap_or(false);
    let bytes = Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::Coded {
                code: ErrorCode::BodyTooLarge,
                message: "request body is larger than 64 KiB".to_owned(),
            }
        } else {
            ApiError::coded(ErrorCode::InvalidBody, "could not read the request body")
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json {
        return Err(ApiError::Coded {
            code: ErrorCode::UnsupportedMediaType,
            message: "expected `Content-Type: application/json`".to_owned(),
        });
    }
    // serde reads a struct from an array of its fields in order too: `[]` would be an
    // empty revoke request.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::coded(
            ErrorCode::InvalidBody,
            "the request body must be a JSON object (`{…}`), not an array or a bare value",
        ));
    }
    if let Some(field) = key_field(&bytes, T::KEY_FIELDS) {
        return Err(secret_in_field(&field, "field"));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        let message = redact_quoted(&e.to_string());
        let code = match e.classify() {
            Category::Data if message.contains("unknown field") => ErrorCode::UnknownField,
            Category::Data => ErrorCode::InvalidBody,
            Category::Syntax | Category::Eof | Category::Io => ErrorCode::MalformedJson,
        };
        ApiError::coded(code, message)
    })
}

/// The 422 for a key where none belongs; names the field (`what`: field, path or query
/// parameter), never the value.
pub(crate) fn secret_in_field(field: &str, what: &str) -> ApiError {
    ApiError::Validation(vec![violation(
        ErrorCode::SecretInField,
        field,
        format!(
            "this {what} holds a keywarden key or admin token, which is accepted only where \
             a key is asked for; nothing was stored (the value is not shown)"
        ),
    )])
}

/// The field of a JSON body that holds one of our keys (see
/// [`key_format::find_key`]), outside the top-level fields in `allowed`: a path such as
/// `metadata.note` or `systems[1]` (a key used as a field name reports the object that
/// holds it; `body` is the top level). `None` when there is none, or when the body is
/// not JSON (which the typed parse reports).
pub(crate) fn key_field(bytes: &[u8], allowed: &[&str]) -> Option<String> {
    // Almost every body has no key in it; only a `\u` escape could spell one that the
    // raw bytes do not show. A body with a field for keys (verify's) has one, so there
    // the raw scan would only cost time: it is walked straight away.
    if allowed.is_empty()
        && key_format::find_key(bytes).is_none()
        && !bytes.windows(2).any(|w| w == b"\\u")
    {
        return None;
    }
    let found = RefCell::new(None);
    let walk = Walk {
        found: &found,
        allowed,
        top: true,
        free: false,
    };
    let _ = walk.deserialize(&mut serde_json::Deserializer::from_slice(bytes));
    let segments: Vec<String> = found.into_inner()?;
    let mut path = String::new();
    for seg in segments.iter().rev() {
        if !path.is_empty() && !seg.starts_with('[') {
            path.push('.');
        }
        path.push_str(seg);
    }
    if path.is_empty() {
        path.push_str("body");
    }
    Some(path)
}

/// Walks a JSON document without building it, and stops at the first string (value or
/// field name) that holds a key. On the way out, each level adds its segment of the path
/// to `found`.
#[derive(Clone, Copy)]
struct Walk<'a> {
    found: &'a RefCell<Option<Vec<String>>>,
    allowed: &'a [&'a str],
    /// At the top-level object, where `allowed` names fields.
    top: bool,
    /// Inside an allowed field: keys are expected here.
    free: bool,
}

impl Walk<'_> {
    fn refuse<E: de::Error>(&self, text: &str) -> Result<(), E> {
        if !self.free && key_format::find_key(text.as_bytes()).is_some() {
            *self.found.borrow_mut() = Some(Vec::new());
            return Err(E::custom("a key where none belongs"));
        }
        Ok(())
    }

    fn add_segment(&self, segment: impl FnOnce() -> String) {
        if let Some(path) = self.found.borrow_mut().as_mut() {
            path.push(segment());
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.refuse(s)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let item = Walk { top: false, ..self };
        let mut i = 0usize;
        loop {
            match seq.next_element_seed(item) {
                Ok(Some(())) => i += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.add_segment(|| format!("[{i}]"));
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key_seed(FieldName)? {
            self.refuse(&name)?;
            let free = self.free || (self.top && self.allowed.contains(&name.as_ref()));
            if let Err(e) = map.next_value_seed(Walk {
                top: false,
                free,
                ..self
            }) {
                self.add_segment(|| name.chars().take(64).collect());
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A field name, borrowed from the body unless it had escapes.
struct FieldName;

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
}

/// Query string; unknown parameters are errors so a typo does not silently widen a list.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::coded(ErrorCode::InvalidQuery, r.body_text())
}

/// serde quotes offending string values in its messages (`invalid type: string "…"`); a
/// caller who put a key in the wrong field must not get it echoed into an error.
/// Anything shaped like a key elsewhere in the message (say, sent as a field name, which
/// serde echoes in backticks) is redacted too.
pub(crate) fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    redact_key_shaped(&out)
}

/// Replaces runs of `[A-Za-z0-9_]` long enough to hold a key secret and containing `_`.
fn redact_key_shaped(msg: &str) -> String {
    const SHORTEST_KEY: usize = 1 + 1 + 1 + 1 + 16 + 1 + 38;
    let mut out = String::with_capacity(msg.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.len() >= SHORTEST_KEY && word.contains('_') {
            out.push_str("<redacted>");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in msg.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoted_values_are_redacted() {
        let m = super::redact_quoted(
            r#"invalid type: string "kw_prod_secret", expected u64 at line 1"#,
        );
        assert_eq!(m, "invalid type: string \"…\", expected u64 at line 1");
    }

    #[test]
    fn key_fields_are_named_by_their_path() {
        let key = keywarden_core::key_format::generate(&mut rand::rngs::OsRng, "kw", "prod")
            .unwrap()
            .plain
            .expose()
            .to_owned();
        let escaped = key.replace('_', "\\u005f");
        let cases = [
            (format!(r#"{{"a": 1, "b": ["x", "{key}"]}}"#), Some("b[1]")),
            (
                format!(r#"{{"m": {{"n": [{{"o": "see {key}"}}]}}}}"#),
                Some("m.n[0].o"),
            ),
            (format!(r#"{{"m": {{"{key}": 1}}}}"#), Some("m")),
            (format!(r#"{{"{key}": 1}}"#), Some("body")),
            (format!(r#"{{"d": "{escaped}"}}"#), Some("d")),
            (format!(r#"{{"key": "{key}", "s": "{key}"}}"#), Some("s")),
            (
                format!(r#"{{"key": "{key}", "n": {{"key": "{key}"}}}}"#),
                Some("n.key"),
            ),
            (format!(r#"{{"key": ["{key}", {{"k": "{key}"}}]}}"#), None),
            (format!(r#"{{"key": "{key}"}}"#), None),
            (
                r#"{"a": "kw_prod_x", "b": [1, 2.5, null, true]}"#.to_owned(),
                None,
            ),
            (format!(r#"{{"a": "{key}""#), Some("a")),
            (format!(r#"{{"a": 1 "b": "{key}"}}"#), None),
        ];
        for (body, expected) in cases {
            assert_eq!(
                super::key_field(body.as_bytes(), &["key"]).as_deref(),
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn key_shaped_words_are_redacted() {
        let key = format!("kw_prod_{}_{}", "A".repeat(16), "b".repeat(38));
        let m = super::redact_quoted(&format!(
            "unknown field `{key}`, expected one of `name`, `owner`"
        ));
        assert_eq!(
            m,
            "unknown field `<redacted>`, expected one of `name`, `owner`"
        );
    }
}

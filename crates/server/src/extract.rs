//! Extractors that turn axum's rejections into our error body with stable codes.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use keywarden_proto::codes;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use crate::error::ApiError;

/// JSON body. Unknown fields, bad types, bad syntax, a wrong content type and an oversized
/// body each get their own code.
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body means `T::default()` (for actions whose body is
/// optional, such as `{"reason": …}`).
pub struct OptionalJsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match read_json(req, state).await? {
            Some(v) => Ok(Self(v)),
            None => Err(ApiError::bad_request(
                codes::INVALID_BODY,
                "a JSON body is required",
            )),
        }
    }
}

impl<S, T> FromRequest<S> for OptionalJsonBody<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Ok(Self(read_json(req, state).await?.unwrap_or_default()))
    }
}

async fn read_json<S: Send + Sync, T: DeserializeOwned>(
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
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: codes::BODY_TOO_LARGE,
                message: "request body is larger than 64 KiB".to_owned(),
            }
        } else {
            ApiError::bad_request(codes::INVALID_BODY, "could not read the request body")
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json {
        return Err(ApiError::Coded {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: codes::UNSUPPORTED_MEDIA_TYPE,
            message: "expected `Content-Type: application/json`".to_owned(),
        });
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        let message = redact_quoted(&e.to_string());
        let code = match e.classify() {
            Category::Data if message.contains("unknown field") => codes::UNKNOWN_FIELD,
            Category::Data => codes::INVALID_BODY,
            Category::Syntax | Category::Eof | Category::Io => codes::MALFORMED_JSON,
        };
        ApiError::bad_request(code, message)
    })
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
    ApiError::bad_request(codes::INVALID_QUERY, r.body_text())
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

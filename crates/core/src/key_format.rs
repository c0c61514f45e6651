//! The key format: `{prefix}_{env}_{id}_{secret}{checksum}`.
//!
//! GitHub-style: a recognisable prefix and a CRC32 checksum let a scanner find our keys
//! with no false positives, and let verify reject typos and junk before any IO.

use std::fmt;

use crate::base62;
use thiserror::Error;
use zeroize::Zeroizing;

pub const ID_LEN: usize = 16;
pub const SECRET_LEN: usize = 32;
pub const CHECKSUM_LEN: usize = 6;
pub const DEFAULT_PREFIX: &str = "kw";
/// The environment tag carried by our own admin tokens; keys may not use it.
pub const ADMIN_ENV: &str = "admin";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a keywarden key: expected {{prefix}}_{{env}}_{{id}}_{{secret}}")]
    Shape,
    #[error("key prefix does not match this deployment")]
    Prefix,
    #[error("key environment tag is invalid")]
    Environment,
    #[error("key checksum does not match")]
    Checksum,
    #[error("invalid prefix {0:?}: 1-10 characters [a-z0-9], starting with a letter")]
    InvalidPrefix(String),
}

/// The public identity of a key (like Vault's accessor): safe to log, show and store.
/// Held inline: ids are cloned into every answer, usage event and cache lookup on the
/// verify path, and a heap string there cost an allocation each, freed on another thread.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId([u8; ID_LEN]);

impl KeyId {
    pub fn parse(s: &str) -> Result<Self, FormatError> {
        match s.as_bytes().try_into() {
            Ok(bytes) if base62::is_base62(s) => Ok(Self(bytes)),
            _ => Err(FormatError::Shape),
        }
    }

    pub fn generate<R: rand::RngCore + rand::CryptoRng>(rng: &mut R) -> Self {
        let id = base62::random(rng, ID_LEN);
        let mut bytes = [0; ID_LEN];
        bytes.copy_from_slice(id.as_bytes());
        Self(bytes)
    }

    pub fn as_str(&self) -> &str {
        // Only `parse` and `generate` build ids, both from base62 ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = FormatError;
    fn try_from(s: String) -> Result<Self, FormatError> {
        Self::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(id: KeyId) -> String {
        id.as_str().to_owned()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

/// A full key in clear. Only ever held in memory, zeroed on drop, never printed by Debug.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainKey(Zeroizing<String>);

impl PlainKey {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The clear text. Call sites are the few places allowed to see it: hashing and the
    /// single response that hands a new key to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The last four characters, stored as a hint so people can tell keys apart.
    pub fn hint(&self) -> String {
        let s = self.0.as_str();
        s[s.len().saturating_sub(4)..].to_owned()
    }
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainKey(<redacted>)")
    }
}

/// A key whose shape and checksum have been validated offline.
#[derive(Debug, Clone)]
pub struct ParsedKey {
    pub prefix: String,
    pub environment: String,
    pub id: KeyId,
    pub plain: PlainKey,
}

pub fn validate_prefix(prefix: &str) -> Result<(), FormatError> {
    let ok = (1..=10).contains(&prefix.len())
        && prefix.as_bytes()[0].is_ascii_lowercase()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(FormatError::InvalidPrefix(prefix.to_owned()))
    }
}

/// 1-16 of lowercase letters, digits and hyphens, not starting or ending with a hyphen,
/// and no two hyphens in a row (`prod`, `staging-eu`, `pre-prod`, `sandbox2eu`). The key
/// stays parseable: its parts are split on `_`, which an environment never holds.
pub fn is_valid_env_tag(env: &str) -> bool {
    (1..=MAX_ENV_LEN).contains(&env.len())
        && env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !env.starts_with('-')
        && !env.ends_with('-')
        && !env.contains("--")
}

/// The longest environment tag.
pub const MAX_ENV_LEN: usize = 16;

fn checksum(body: &str) -> String {
    base62::encode_fixed(u64::from(crc32fast::hash(body.as_bytes())), CHECKSUM_LEN)
}

/// Makes a new key with a fresh id and secret from the given cryptographic RNG.
pub fn generate<R: rand::RngCore + rand::CryptoRng>(
    rng: &mut R,
    prefix: &str,
    environment: &str,
) -> Result<ParsedKey, FormatError> {
    validate_prefix(prefix)?;
    if !is_valid_env_tag(environment) {
        return Err(FormatError::Environment);
    }
    let id = KeyId::generate(rng);
    let secret = Zeroizing::new(base62::random(rng, SECRET_LEN));
    Ok(assemble(prefix, environment, id, &secret))
}

/// Builds a key from its parts and appends the checksum (no validation of the parts).
pub fn assemble(prefix: &str, environment: &str, id: KeyId, secret: &str) -> ParsedKey {
    let mut body = Zeroizing::new(format!("{prefix}_{environment}_{id}_{secret}"));
    let sum = checksum(&body);
    body.push_str(&sum);
    ParsedKey {
        prefix: prefix.to_owned(),
        environment: environment.to_owned(),
        id,
        plain: PlainKey::new(std::mem::take(&mut *body)),
    }
}

/// A validated key's parts, borrowed from the text it was parsed from: the verify and
/// auth paths parse a key on every request and need no owned copies of them.
#[derive(Clone)]
pub struct KeyParts<'a> {
    pub prefix: &'a str,
    pub environment: &'a str,
    pub id: KeyId,
    /// The whole key in clear, as presented.
    pub plain: &'a str,
}

impl fmt::Debug for KeyParts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyParts")
            .field("prefix", &self.prefix)
            .field("environment", &self.environment)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Parses and validates a key without any IO. `expected_prefix` is the deployment's prefix.
pub fn parse(input: &str, expected_prefix: &str) -> Result<ParsedKey, FormatError> {
    let parts = parse_parts(input, expected_prefix)?;
    Ok(ParsedKey {
        prefix: parts.prefix.to_owned(),
        environment: parts.environment.to_owned(),
        id: parts.id,
        plain: PlainKey::new(input.to_owned()),
    })
}

/// [`parse`], borrowing the parts instead of copying them.
pub fn parse_parts<'a>(input: &'a str, expected_prefix: &str) -> Result<KeyParts<'a>, FormatError> {
    // Longest possible key: 10 + 1 + 16 + 1 + 16 + 1 + 32 + 6.
    if input.len() > 83 || !input.is_ascii() {
        return Err(FormatError::Shape);
    }
    let (head, tail) = input.rsplit_once('_').ok_or(FormatError::Shape)?;
    let (head, id) = head.rsplit_once('_').ok_or(FormatError::Shape)?;
    let (prefix, environment) = head.rsplit_once('_').ok_or(FormatError::Shape)?;
    if tail.len() != SECRET_LEN + CHECKSUM_LEN || !base62::is_base62(tail) {
        return Err(FormatError::Shape);
    }
    let id = KeyId::parse(id)?;
    validate_prefix(prefix).map_err(|_| FormatError::Shape)?;
    if !is_valid_env_tag(environment) {
        return Err(FormatError::Environment);
    }
    let (_, sum) = input.split_at(input.len() - CHECKSUM_LEN);
    let body = &input[..input.len() - CHECKSUM_LEN];
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        checksum(body).as_bytes(),
        sum.as_bytes(),
    )) {
        return Err(FormatError::Checksum);
    }
    if prefix != expected_prefix {
        return Err(FormatError::Prefix);
    }
    Ok(KeyParts {
        prefix,
        environment,
        id,
        plain: input,
    })
}

/// The byte range of the first key in `text` whose shape and checksum are valid, of any
/// prefix: a key pasted where it does not belong (a description, a metadata value, a
/// path segment). The prefix is not compared, so keys of another deployment (or issued
/// under an earlier prefix) are found too; a checksum makes a false match about one in
/// 57 billion per candidate. A key glued to other letters is still found.
pub fn find_key(text: &[u8]) -> Option<std::ops::Range<usize>> {
    const TAIL: usize = SECRET_LEN + CHECKSUM_LEN;
    let alnum = |r: std::ops::Range<usize>| {
        text.get(r)
            .is_some_and(|s| s.iter().all(u8::is_ascii_alphanumeric))
    };
    let lower = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let env_char = |b: u8| lower(b) || b == b'-';
    // `u` is the `_` before the secret; the shortest key has 20 bytes before it.
    for u in 20..text.len() {
        if text[u] != b'_'
            || u + 1 + TAIL > text.len()
            || text[u - ID_LEN - 1] != b'_'
            || !alnum(u - ID_LEN..u)
            || !alnum(u + 1..u + 1 + TAIL)
        {
            continue;
        }
        let end = u + 1 + TAIL;
        let env_end = u - ID_LEN - 1;
        let Some(env_start) = (1..=MAX_ENV_LEN + 1)
            .take_while(|n| *n <= env_end)
            .map(|n| env_end - n)
            .find(|i| !env_char(text[*i]))
            .filter(|i| text[*i] == b'_' && (1..=MAX_ENV_LEN).contains(&(env_end - *i - 1)))
        else {
            continue;
        };
        // The prefix: 1-10 of [a-z0-9] ending at `env_start`, starting with a letter.
        for len in 1..=10.min(env_start) {
            let start = env_start - len;
            if !lower(text[start]) {
                break;
            }
            let Some(candidate) = text
                .get(start..end)
                .and_then(|c| std::str::from_utf8(c).ok())
            else {
                continue;
            };
            if text[start].is_ascii_lowercase()
                && matches!(parse_parts(candidate, ""), Ok(_) | Err(FormatError::Prefix))
            {
                return Some(start..end);
            }
        }
    }
    None
}

/// Whether `text` holds a key of any prefix (see [`find_key`]).
pub fn holds_key(text: &str) -> bool {
    find_key(text.as_bytes()).is_some()
}

/// `text` with every key in it (see [`find_key`]) replaced by `<redacted>`.
pub fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(first) = find_key(text.as_bytes()) else {
        return std::borrow::Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = Some(first);
    while let Some(r) = found {
        // Key bytes are ASCII, so both ends are character boundaries.
        out.push_str(rest.get(..r.start).unwrap_or_default());
        out.push_str("<redacted>");
        rest = rest.get(r.end..).unwrap_or_default();
        found = find_key(rest.as_bytes());
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn key(seed: u64, env: &str) -> ParsedKey {
        // StdRng is a CSPRNG; seeding makes the property tests reproducible.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        generate(&mut rng, "kw", env).unwrap()
    }

    #[test]
    fn shape_matches_design() {
        let k = key(1, "prod");
        let s = k.plain.expose();
        assert!(s.starts_with("kw_prod_"));
        assert_eq!(s.len(), 3 + 5 + 16 + 1 + 32 + 6);
        assert_eq!(&s[8..24], k.id.as_str());
    }

    #[test]
    fn wrong_prefix_is_rejected() {
        let k = key(2, "dev");
        assert_eq!(
            parse(k.plain.expose(), "acme").unwrap_err(),
            FormatError::Prefix
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = key(3, "dev");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(k.plain.expose()));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn junk_is_rejected() {
        for bad in [
            "",
            "kw",
            "kw_prod",
            "kw_prod_x_y",
            "kw__aaaaaaaaaaaaaaaa_",
            "Bearer kw_",
        ] {
            assert!(parse(bad, "kw").is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_found_inside_text_whatever_their_prefix() {
        let k = key(7, "prod");
        let plain = k.plain.expose();
        let other = generate(&mut rand::rngs::StdRng::seed_from_u64(8), "acme9", "dev").unwrap();
        for (text, at) in [
            (plain.to_owned(), 0),
            (format!("my key is {plain}, keep it"), 10),
            (format!("x{plain}y"), 1),
            (format!("Z_{plain}"), 2),
            (format!("é{plain}"), 2),
        ] {
            assert_eq!(
                find_key(text.as_bytes()),
                Some(at..at + plain.len()),
                "{text}"
            );
        }
        assert!(holds_key(other.plain.expose()));
        // Environments with hyphens, up to 16 characters, parse and are found.
        for env in ["staging-eu", "sixteen-chars-ok"] {
            let h = generate(&mut rand::rngs::StdRng::seed_from_u64(9), "kw", env).unwrap();
            let hp = h.plain.expose();
            assert_eq!(parse_parts(hp, "kw").unwrap().environment, env);
            assert_eq!(
                find_key(format!("k={hp}").as_bytes()),
                Some(2..2 + hp.len())
            );
        }
        assert!(holds_key(&format!("{}.{}", plain, other.plain.expose())));
        // A near miss (one character changed) and key-like text are not keys.
        let mut typo = plain.to_owned().into_bytes();
        typo[30] = if typo[30] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        for text in [
            typo.as_str(),
            "kw_prod_AAAAAAAAAAAAAAAA_",
            "",
            "_",
            &plain[..plain.len() - 1],
            &plain[1..3],
        ] {
            assert!(!holds_key(text), "{text}");
        }
        let text = format!("a {plain} b {} c", other.plain.expose());
        assert_eq!(redact_keys(&text), "a <redacted> b <redacted> c");
        assert_eq!(redact_keys("nothing here"), "nothing here");
    }

    proptest! {
        #[test]
        fn round_trip(seed in any::<u64>(), env in "[a-z0-9]([a-z0-9]|-[a-z0-9]){0,7}") {
            let k = key(seed, &env);
            let parsed = parse(k.plain.expose(), "kw").unwrap();
            prop_assert_eq!(&parsed.id, &k.id);
            prop_assert_eq!(&parsed.environment, &env);
            prop_assert_eq!(&parsed.plain, &k.plain);
            let parts = parse_parts(k.plain.expose(), "kw").unwrap();
            prop_assert_eq!(
                (parts.prefix, parts.environment, &parts.id, parts.plain),
                ("kw", env.as_str(), &k.id, k.plain.expose())
            );
        }

        /// Any single-character change in the checksummed body or the checksum itself is
        /// caught offline (CRC32 detects every single-symbol error); the only other
        /// outcome would be a shape error.
        #[test]
        fn single_char_change_is_caught(seed in any::<u64>(), pos in 0usize..75, repl in 0usize..62) {
            let k = key(seed, "prod");
            let s = k.plain.expose().to_owned();
            let pos = pos % s.len();
            let new = char::from(crate::base62::ALPHABET[repl]);
            prop_assume!(s.as_bytes()[pos] != new as u8);
            let mut changed = s.clone().into_bytes();
            changed[pos] = new as u8;
            let changed = String::from_utf8(changed).unwrap();
            prop_assert!(parse(&changed, "kw").is_err());
            prop_assert!(parse_parts(&changed, "kw").is_err());
        }

        /// Ids are held as bytes but must behave as the strings they were: the same text
        /// back, and the same order (folds and key listings sort by id).
        #[test]
        fn key_ids_read_and_sort_as_their_text(a in "[0-9A-Za-z]{16}", b in "[0-9A-Za-z]{16}") {
            let (ia, ib) = (KeyId::parse(&a).unwrap(), KeyId::parse(&b).unwrap());
            prop_assert_eq!(ia.as_str(), a.as_str());
            prop_assert_eq!(ia.to_string(), a.clone());
            prop_assert_eq!(String::from(ia.clone()), a.clone());
            prop_assert_eq!(ia.cmp(&ib), a.cmp(&b));
            prop_assert_eq!(ia == ib, a == b);
        }

        /// Near misses: wrong lengths, `_`, and `é`, which is two bytes, so 15
        /// characters with one `é` have the right byte length.
        #[test]
        fn key_ids_of_another_shape_are_rejected(s in "[0-9A-Za-z_é]{14,18}") {
            let ok = s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric());
            prop_assert_eq!(KeyId::parse(&s).is_ok(), ok);
        }
    }
}

//! Keyed hashes at rest: HMAC-SHA256(pepper, full key), compared in constant time.
//!
//! The pepper is versioned so it can rotate: every stored hash records the version that
//! made it, and a [`KeyHasher`] holds all versions it knows.

use std::collections::BTreeMap;
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::key_format::PlainKey;

type HmacSha256 = Hmac<Sha256>;

pub const PEPPER_LEN: usize = 32;

#[derive(Debug, Error)]
pub enum PepperError {
    #[error("pepper line {line}: expected `v<N>:<64 hex characters>`")]
    Syntax { line: usize },
    #[error("no pepper version found")]
    Empty,
}

/// A secret pepper. Debug is redacted; the bytes are zeroed on drop.
pub struct Pepper {
    version: u32,
    bytes: Zeroizing<[u8; PEPPER_LEN]>,
}

impl Pepper {
    pub fn new(version: u32, bytes: [u8; PEPPER_LEN]) -> Self {
        Self {
            version,
            bytes: Zeroizing::new(bytes),
        }
    }

    pub fn generate<R: rand::RngCore + rand::CryptoRng>(rng: &mut R, version: u32) -> Self {
        let mut bytes = [0u8; PEPPER_LEN];
        rng.fill_bytes(&mut bytes);
        Self::new(version, bytes)
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The file line for this pepper; the caller writes it to a 0600 file and nowhere else.
    pub fn to_line(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("v{}:{}", self.version, hex::encode(*self.bytes)))
    }

    /// Parses a pepper file: one `v<N>:<hex>` per line; blank lines and `#` comments ignored.
    pub fn parse_file(text: &str) -> Result<Vec<Pepper>, PepperError> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = || PepperError::Syntax { line: i + 1 };
            let (v, hexpart) = line.split_once(':').ok_or_else(err)?;
            let version: u32 = v
                .strip_prefix('v')
                .ok_or_else(err)?
                .parse()
                .map_err(|_| err())?;
            let mut bytes = [0u8; PEPPER_LEN];
            hex::decode_to_slice(hexpart, &mut bytes).map_err(|_| err())?;
            out.push(Pepper::new(version, bytes));
        }
        if out.is_empty() {
            return Err(PepperError::Empty);
        }
        Ok(out)
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pepper(v{}, <redacted>)", self.version)
    }
}

/// A stored keyed hash with the pepper version that produced it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyHash {
    pub pepper_version: u32,
    pub digest: [u8; 32],
}

impl KeyHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.digest)
    }

    pub fn from_hex(pepper_version: u32, s: &str) -> Option<Self> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(s, &mut digest).ok()?;
        Some(Self {
            pepper_version,
            digest,
        })
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash(v{})", self.pepper_version)
    }
}

/// Hashes keys with the current pepper and checks them against any known version.
/// Holds pre-keyed HMAC states: cloning one is cheaper than re-keying per call.
#[derive(Clone)]
pub struct KeyHasher {
    current: u32,
    states: BTreeMap<u32, HmacSha256>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHasher(current v{})", self.current)
    }
}

impl KeyHasher {
    /// Uses the highest version as current.
    pub fn new(peppers: &[Pepper]) -> Result<Self, PepperError> {
        let mut states = BTreeMap::new();
        for p in peppers {
            // HMAC accepts keys of any length, so this cannot fail for 32 bytes.
            let mac = HmacSha256::new_from_slice(&*p.bytes).map_err(|_| PepperError::Empty)?;
            states.insert(p.version, mac);
        }
        let current = *states.keys().next_back().ok_or(PepperError::Empty)?;
        Ok(Self { current, states })
    }

    pub fn hash(&self, key: &PlainKey) -> KeyHash {
        self.hash_with(self.current, key)
            .unwrap_or_else(|| unreachable_hash(self.current))
    }

    fn hash_with(&self, version: u32, key: &PlainKey) -> Option<KeyHash> {
        self.hash_text(version, key.expose())
    }

    fn hash_text(&self, version: u32, key: &str) -> Option<KeyHash> {
        let mut mac = self.states.get(&version)?.clone();
        mac.update(key.as_bytes());
        Some(KeyHash {
            pepper_version: version,
            digest: mac.finalize().into_bytes().into(),
        })
    }

    /// The pepper version new secrets are derived with.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// A 32-byte secret derived from pepper `version` and `context`, for secrets keywarden
    /// must use again later (webhook signing) yet never store: the database holds only
    /// the context. Contexts start with a label and a NUL, which no key string holds, so
    /// they never collide with a key's hash.
    pub fn derive(&self, version: u32, label: &str, context: &[u8]) -> Option<[u8; 32]> {
        let mut mac = self.states.get(&version)?.clone();
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context);
        Some(mac.finalize().into_bytes().into())
    }

    /// Constant-time check of `key` against a stored hash. An unknown pepper version
    /// never matches.
    pub fn matches(&self, key: &PlainKey, stored: &KeyHash) -> bool {
        self.matches_text(key.expose(), stored)
    }

    /// [`Self::matches`] for a key still in the text it was presented in (a request
    /// body): the hot paths check it there rather than copy it into a [`PlainKey`].
    pub fn matches_text(&self, key: &str, stored: &KeyHash) -> bool {
        match self.hash_text(stored.pepper_version, key) {
            Some(h) => h.digest.ct_eq(&stored.digest).into(),
            None => false,
        }
    }
}

// `current` is always a key of `states` by construction; this keeps `hash` total
// without a panic path.
fn unreachable_hash(version: u32) -> KeyHash {
    KeyHash {
        pepper_version: version,
        digest: [0u8; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PlainKey {
        PlainKey::new(s.to_owned())
    }

    #[test]
    fn matches_only_same_key_and_pepper() {
        let p1 = Pepper::new(1, [7u8; 32]);
        let p2 = Pepper::new(2, [9u8; 32]);
        let old = KeyHasher::new(&[Pepper::new(1, [7u8; 32])]).unwrap();
        let both = KeyHasher::new(&[p1, p2]).unwrap();
        let h_old = old.hash(&key("a"));
        assert_eq!(h_old.pepper_version, 1);
        assert!(
            both.matches(&key("a"), &h_old),
            "old hashes still verify after rotation"
        );
        assert!(!both.matches(&key("b"), &h_old));
        let h_new = both.hash(&key("a"));
        assert_eq!(h_new.pepper_version, 2);
        assert_ne!(h_new.digest, h_old.digest);
        // The borrowed check the hot paths use gives the same answers.
        assert!(both.matches_text("a", &h_old));
        assert!(both.matches_text("a", &h_new));
        assert!(!both.matches_text("b", &h_new));
        assert!(!both.matches_text("a ", &h_new));
    }

    #[test]
    fn pepper_file_round_trip_and_redaction() {
        let p = Pepper::new(3, [0xab; 32]);
        let parsed =
            Pepper::parse_file(&format!("# keywarden pepper\n{}\n", *p.to_line())).unwrap();
        assert_eq!(parsed[0].version(), 3);
        assert!(!format!("{:?}", parsed[0]).contains("abab"));
        assert!(Pepper::parse_file("v1:zz").is_err());
        assert!(Pepper::parse_file("").is_err());
    }
}

//! Base62 alphabet shared by ids, secrets and checksums.

pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Encodes `value` in exactly `width` base62 digits, most significant first.
/// `width` must be large enough for `value` (6 digits hold any u32).
pub fn encode_fixed(mut value: u64, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    // Every byte comes from ALPHABET, which is ASCII.
    out.into_iter().map(char::from).collect()
}

/// Random base62 string from a cryptographic RNG, without modulo bias.
pub fn random<R: rand::RngCore + rand::CryptoRng>(rng: &mut R, len: usize) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut buf = [0u8; 32];
        rng.fill_bytes(&mut buf);
        for b in buf {
            // 248 = 4 * 62: reject the tail so every symbol is equally likely.
            if b < 248 && out.len() < len {
                out.push(char::from(ALPHABET[(b % 62) as usize]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_width_encoding() {
        assert_eq!(encode_fixed(0, 6), "000000");
        assert_eq!(encode_fixed(61, 2), "0z");
        assert_eq!(encode_fixed(62, 2), "10");
        assert_eq!(encode_fixed(u64::from(u32::MAX), 6), "4gfFC3");
    }

    #[test]
    fn random_is_base62_of_requested_length() {
        let mut rng = rand::rngs::OsRng;
        let s = random(&mut rng, 32);
        assert_eq!(s.len(), 32);
        assert!(is_base62(&s));
        assert_ne!(s, random(&mut rng, 32));
    }
}

//! Connected services: which key events they hear of, how webhooks are signed (the
//! Standard Webhooks spec), how retries back off, and which addresses outbound requests
//! may reach.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What a service can subscribe to. Each key event (`key_events.event`) falls in one.
pub const CATEGORIES: [&str; 7] = [
    "revoke", "suspend", "rotate", "expire", "alert", "create", "notice",
];

/// Subscribed when `service add` names none: what a gateway must hear to stop trusting a
/// key, and alerts.
pub const DEFAULT_CATEGORIES: [&str; 5] = ["alert", "expire", "revoke", "rotate", "suspend"];

/// The category of a key event, or `None` for an event no service is sent.
pub fn category(event: &str) -> Option<&'static str> {
    Some(match event {
        "revoked" => "revoke",
        "suspended" | "resumed" => "suspend",
        "rotated" => "rotate",
        "expired" => "expire",
        "still_in_use" | "alert" => "alert",
        "created" => "create",
        "expiry_notice" | "rotation_overdue" | "policy_violation" => "notice",
        _ => return None,
    })
}

/// Parses a comma-separated list (`revoke,alert`, or `all`); sorted, deduplicated.
pub fn parse_categories(list: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for item in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
        if item.is_empty() {
            continue;
        }
        if item == "all" {
            out.extend(CATEGORIES.iter().map(|c| (*c).to_owned()));
            continue;
        }
        if !CATEGORIES.contains(&item) {
            return Err(format!(
                "unknown event {item:?}: expected some of {} (or all)",
                CATEGORIES.join(", ")
            ));
        }
        out.push(item.to_owned());
    }
    if out.is_empty() {
        return Err("name at least one event".to_owned());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The Standard Webhooks secret as shown to the service: `whsec_` + base64.
pub fn secret_text(secret: &[u8]) -> String {
    format!("whsec_{}", STANDARD.encode(secret))
}

/// `webhook-signature` for a message: `v1,` + base64(HMAC-SHA256(secret,
/// "{id}.{timestamp}.{body}")), per <https://www.standardwebhooks.com/>.
pub fn sign(secret: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Delay before attempt `attempt + 1` (attempt ≥ 1 failed so far): `base · 2^(attempt-1)`,
/// capped, then scaled by `jitter` in [0, 1) to between half and all of it, so a crowd
/// of failed deliveries does not come back at once.
pub fn backoff(
    base: std::time::Duration,
    cap: std::time::Duration,
    attempt: u32,
    jitter: f64,
) -> std::time::Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let full = exp.min(cap);
    full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Whether an address is on the public internet. Outbound requests to anything else
/// (loopback, private, link-local including cloud metadata, CGNAT, multicast, …) are
/// refused unless the configuration allows them.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 IETF
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b)) // NAT64 can reach private v4
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // From the Standard Webhooks reference libraries' tests.
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn categories_parse_and_map() {
        assert_eq!(
            parse_categories(&["revoke, alert".into(), "revoke".into()]).unwrap(),
            vec!["alert", "revoke"]
        );
        assert_eq!(parse_categories(&["all".into()]).unwrap().len(), 7);
        assert!(parse_categories(&["revoked".into()])
            .unwrap_err()
            .contains("unknown event \"revoked\""));
        assert!(parse_categories(&[" , ".into()]).is_err());
        assert_eq!(category("resumed"), Some("suspend"));
        assert_eq!(category("still_in_use"), Some("alert"));
        assert_eq!(category("something_new"), None);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let s = std::time::Duration::from_secs;
        assert_eq!(backoff(s(1), s(3600), 1, 1.0), s(1));
        assert_eq!(backoff(s(1), s(3600), 4, 1.0), s(8));
        assert_eq!(backoff(s(1), s(3600), 4, 0.0), s(4));
        assert_eq!(backoff(s(1), s(3600), 30, 1.0), s(3600));
        assert_eq!(backoff(s(1), s(3600), 0, 1.0), s(1));
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}

//! Human durations as the CLI and API take them: `30d`, `12h`, `15m`, `45s`, `0s`.

use thiserror::Error;
use time::Duration;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: expected a whole number followed by s, m, h or d (e.g. 30d, 12h, 15m)")]
pub struct DurationError {
    pub input: String,
}

/// The largest duration we accept anywhere; keeps arithmetic on timestamps far from overflow.
const MAX_SECONDS: i64 = 100 * 365 * 86_400;

pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = || DurationError {
        input: input.chars().take(64).collect(),
    };
    let trimmed = input.trim();
    let unit = trimmed.chars().last().ok_or_else(err)?;
    let digits = &trimmed[..trimmed.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 12 {
        return Err(err());
    }
    let n: i64 = digits.parse().map_err(|_| err())?;
    let seconds = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3_600),
        'd' => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(err)?;
    if seconds > MAX_SECONDS {
        return Err(err());
    }
    Ok(Duration::seconds(seconds))
}

/// Formats a duration in the largest unit that represents it exactly.
pub fn format_duration(d: Duration) -> String {
    let s = d.whole_seconds();
    if s != 0 && s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s != 0 && s % 3_600 == 0 {
        format!("{}h", s / 3_600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("30d"), Ok(Duration::days(30)));
        assert_eq!(parse_duration("12h"), Ok(Duration::hours(12)));
        assert_eq!(parse_duration("15m"), Ok(Duration::minutes(15)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "d",
            "30",
            "-1d",
            "1.5h",
            "1w",
            "3 d",
            "99999999999999d",
            "1dd",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["30d", "12h", "15m", "45s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}

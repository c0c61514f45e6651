//! Rates: "100 uses per minute" as keys, policies and thresholds write them
//! (`100/min`, `10/s`, `5000/h`, `20/5m`), and the generic cell rate algorithm (GCRA)
//! that enforces one with a single timestamp of state.
//!
//! GCRA rather than a fixed window: a fixed window lets twice the limit through around
//! each boundary, and a sliding log keeps one timestamp per use. With GCRA a limit of
//! `N/T` lets at most `N` uses through at once, then one every `T/N`; over any interval
//! of length `t` at most `N + N·t/T` pass (so `2N` in any window of `T`, and the long-run
//! rate is exactly `N/T`).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;
use time::Duration;

use crate::duration::{format_duration, parse_duration};

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid rate {input:?}: expected COUNT/PERIOD, e.g. 100/min, 10/s, 5000/h or 20/5m \
     (count 1-1000000, period 1s-1d)"
)]
pub struct RateError {
    pub input: String,
}

/// `count` uses per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

const MAX_COUNT: u32 = 1_000_000;

impl Rate {
    /// The time one use "costs": `per / count`, in microseconds (at least 1).
    pub fn interval_us(&self) -> i64 {
        (self.micros() / i64::from(self.count.max(1))).max(1)
    }

    /// How far ahead of now the cell may run: `per - interval`.
    pub fn burst_us(&self) -> i64 {
        self.micros().saturating_sub(self.interval_us())
    }

    fn micros(&self) -> i64 {
        i64::try_from(self.per.whole_microseconds()).unwrap_or(i64::MAX)
    }

    /// Uses per second, for comparing two rates.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_seconds_f64()
    }

    /// Whether this rate lets through no more than `other` does.
    pub fn within(&self, other: &Rate) -> bool {
        // count/per <= other.count/other.per, in integers.
        i128::from(self.count) * i128::from(other.micros())
            <= i128::from(other.count) * i128::from(self.micros())
    }

    /// Admits one use at `now_us` (microseconds on any monotonic scale) given the stored
    /// theoretical arrival time `tat_us`: `Ok(new_tat)` to store, or `Err(retry_after_us)`.
    pub fn admit(&self, tat_us: i64, now_us: i64) -> Result<i64, i64> {
        let interval = self.interval_us();
        let burst = self.burst_us();
        let tat = tat_us.max(now_us);
        let allowed_at = tat.saturating_sub(burst);
        if now_us < allowed_at {
            return Err(allowed_at - now_us);
        }
        Ok(tat.saturating_add(interval))
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || RateError {
            input: input.chars().take(64).collect(),
        };
        let (count, per) = input.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        if count == 0 || count > MAX_COUNT {
            return Err(err());
        }
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::SECOND,
            "m" | "min" | "minute" => Duration::MINUTE,
            "h" | "hour" => Duration::HOUR,
            "d" | "day" => Duration::DAY,
            other => parse_duration(other).map_err(|_| err())?,
        };
        if per < Duration::SECOND || per > Duration::DAY {
            return Err(err());
        }
        Ok(Self { count, per })
    }
}

impl fmt::Display for Rate {
    /// The canonical form, which parses back to the same rate: `100/min`, `20/5m`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = [
            (Duration::SECOND, "s"),
            (Duration::MINUTE, "min"),
            (Duration::HOUR, "h"),
            (Duration::DAY, "d"),
        ]
        .iter()
        .find(|(d, _)| *d == self.per)
        .map_or_else(|| format_duration(self.per), |(_, unit)| (*unit).to_owned());
        write!(f, "{}/{per}", self.count)
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_canonically() {
        for (input, canonical) in [
            ("100/min", "100/min"),
            ("100/m", "100/min"),
            ("10/s", "10/s"),
            ("5000/h", "5000/h"),
            ("1/d", "1/d"),
            ("20/5m", "20/5m"),
            ("20/300s", "20/5m"),
            (" 7 / 60s ", "7/min"),
        ] {
            let r = rate(input);
            assert_eq!(r.to_string(), canonical, "{input}");
            assert_eq!(rate(canonical), r);
        }
        for bad in [
            "",
            "100",
            "/min",
            "0/min",
            "-1/min",
            "1.5/min",
            "100/fortnight",
            "1/0s",
            "1/2d",
            "1000001/s",
            "100/min/x",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn compares_rates() {
        assert!(rate("100/min").within(&rate("100/min")));
        assert!(rate("100/min").within(&rate("2/s")));
        assert!(!rate("3/s").within(&rate("100/min")));
        assert!(rate("1000/h").within(&rate("20/min")));
    }

    /// A burst of `count` passes at once, the next use waits one interval, and the
    /// long-run rate is the limit.
    #[test]
    fn admits_a_burst_then_the_rate() {
        let r = rate("10/s");
        let mut tat = 0;
        let now = 1_000_000_000;
        for i in 0..10 {
            tat = r
                .admit(tat, now)
                .unwrap_or_else(|_| panic!("use {i} refused"));
        }
        let wait = r.admit(tat, now).unwrap_err();
        assert_eq!(wait, 100_000);
        assert!(r.admit(tat, now + wait - 1).is_err());
        tat = r.admit(tat, now + wait).unwrap();
        // Over ten seconds of steady asking, 10 + 100 pass.
        let mut passed = 0;
        let mut tat2 = 0;
        let mut t = now;
        while t <= now + 10_000_000 {
            if let Ok(next) = r.admit(tat2, t) {
                tat2 = next;
                passed += 1;
            }
            t += 1_000;
        }
        assert_eq!(passed, 110);
        let _ = tat;
    }
}

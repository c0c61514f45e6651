//! The one seam through which the current time enters the domain.

use std::sync::atomic::{AtomicI64, Ordering};
use time::OffsetDateTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;
}

/// A clock that only moves when told to; tests use it to cross TTLs and grace periods.
#[derive(Debug)]
pub struct ManualClock {
    unix_nanos: AtomicI64,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            unix_nanos: AtomicI64::new(nanos_of(start)),
        }
    }

    pub fn advance(&self, by: time::Duration) {
        let nanos = i64::try_from(by.whole_nanoseconds()).unwrap_or(i64::MAX);
        self.unix_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    pub fn set(&self, to: OffsetDateTime) {
        self.unix_nanos.store(nanos_of(to), Ordering::SeqCst);
    }
}

fn nanos_of(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        let nanos = self.unix_nanos.load(Ordering::SeqCst);
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// Times are kept at millisecond precision everywhere, so what is stored reads back equal.
pub fn truncate_to_millis(t: OffsetDateTime) -> OffsetDateTime {
    from_millis(to_millis(t))
}

pub fn to_millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

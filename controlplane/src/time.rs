//! Time as Unix milliseconds: the one conversion every part uses. Logic
//! takes the time as an input; only the loops at the edges (the engine's
//! timer, a gRPC stream's arrival stamp, the CLI) read the clock, through
//! [`now_unix_ms`].

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` as Unix ms; 0 before the epoch, `u64::MAX` past what fits.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The wall clock as Unix ms.
pub fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Serializes a `SystemTime` as Unix ms (`#[serde(serialize_with = ...)]`
/// through `#[serde(with = "crate::time::serde_unix_ms")]`).
pub mod serde_unix_ms {
    use serde::Serializer;
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::unix_ms(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn before_the_epoch_is_0_and_ms_are_exact() {
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(
            unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            1_700_000_000_123
        );
    }
}

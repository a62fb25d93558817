//! Human-readable durations in configuration files.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// The longest duration a configuration may set: a century, longer than any
/// timeout or interval needs. Much longer ones (humantime takes up to
/// about 5·10^11 years) would overflow the deadlines made from them.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// A duration written as `"50ms"`, `"5s"`, `"1m 30s"` (humantime syntax),
/// at most `MAX_DURATION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = humantime::parse_duration(s).map_err(|e| {
            format!("invalid duration {s:?}: {e} (expected e.g. \"50ms\" or \"5s\")")
        })?;
        if d > MAX_DURATION {
            return Err(format!("duration {s:?} is longer than 100 years"));
        }
        Ok(Duration(d))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            "50ms".parse(),
            Ok(Duration(std::time::Duration::from_millis(50)))
        );
        assert_eq!("5s".parse::<Duration>().unwrap().to_string(), "5s");
        assert!("soon".parse::<Duration>().is_err());
        assert!("36500days".parse::<Duration>().is_ok());
        let err = "10000000000000000000s".parse::<Duration>().unwrap_err();
        assert!(err.contains("longer than 100 years"), "{err}");
    }
}

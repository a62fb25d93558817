//! Human-readable durations in configuration files.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A duration written as `"50ms"`, `"5s"`, `"1m 30s"` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl std::str::FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(Duration)
            .map_err(|e| format!("invalid duration {s:?}: {e} (expected e.g. \"50ms\" or \"5s\")"))
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
    }
}

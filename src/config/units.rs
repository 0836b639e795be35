//! Value types written with units in the file: byte sizes (`64MiB`) and durations (`30s`). The
//! file and the run-time configuration share them, as they share `u64` or `Duration`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// A byte count written as a number or with a unit: `64MiB`, `1GiB`, `512KiB`, `10MB`. At run
/// time it is the number (`.0`); its `Display` prints the unit back for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("expected a size like `64MiB` or `1048576`, got `{text}`"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The units a duration may be written in, for every duration error.
pub const DURATION_UNITS: &str =
    "units: ms, s, m (minutes), h, d; e.g. `500ms`, `30s`, `2m`, `1h 30m`";

/// Parses a duration such as `30s` or `1h 30m`. Month and year units are refused: humantime
/// reads `10M` as ten months, which in a timeout is always a typo for `10m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|_| format!("expected a duration, got `{text}` ({DURATION_UNITS})"))?;
    let calendar = text.split(|c: char| !c.is_alphabetic()).find(|unit| {
        matches!(
            *unit,
            "M" | "month" | "months" | "y" | "yr" | "yrs" | "year" | "years"
        )
    });
    match calendar {
        Some(unit) => Err(format!(
            "`{text}`: `{unit}` is a month or year unit, refused here (minutes are `m`; {DURATION_UNITS})"
        )),
        None => Ok(duration),
    }
}

/// Serde for duration keys: humantime's text, with [`parse_duration`]'s checks and messages.
pub mod duration_text {
    use serde::de::{self, Visitor};
    use std::fmt;
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::serialize(d, s)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a duration like `30s` ({})", super::DURATION_UNITS)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }

    /// The same for an optional duration (`null` or absent: none).
    pub mod option {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            humantime_serde::serialize(d, s)
        }

        pub fn deserialize<'de, D: serde::Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(serde::Deserialize)]
            struct Text(#[serde(with = "super")] Duration);
            let text: Option<Text> = serde::Deserialize::deserialize(d)?;
            Ok(text.map(|t| t.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{parse_err, parse_ok};

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("10MB").unwrap().0, 10_000_000);
        assert_eq!(ByteSize::parse("123").unwrap().0, 123);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        let c = parse_ok("limits:\n  max_body: 1MiB\nadmission:\n  max_queued_bytes: 4096\ninstances:\n  - name: a\n    url: x:1\n");
        assert_eq!(c.limits.max_body.0, 1 << 20);
        assert_eq!(c.admission.max_queued_bytes.0, 4096);
        assert!(
            parse_err("limits:\n  max_body: lots\ninstances:\n  - name: a\n    url: x:1\n")
                .contains("limits.max_body")
        );
    }

    #[test]
    fn durations_refuse_calendar_units() {
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        for text in ["10M", "1y", "2 months", "1year"] {
            assert!(
                parse_duration(text).unwrap_err().contains(DURATION_UNITS),
                "{text}"
            );
        }
    }
}

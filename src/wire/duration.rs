//! Durations as API.md writes them (`ttl`, `wait_time`): a number with an optional unit
//! `ms`, `s`, `m`, `h`, `d`; no unit means seconds.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("invalid duration {0:?}: use a non-negative number with an optional unit ms, s, m, h or d, e.g. \"60s\"")]
    Syntax(String),
    #[error("duration {given:?} is longer than the maximum of {max_secs} s")]
    TooLong { given: String, max_secs: u64 },
}

/// Parses `text`, refusing anything negative, non-finite or over `max`.
pub fn parse_duration(text: &str, max: Duration) -> Result<Duration, DurationError> {
    let t = text.trim();
    let syntax = || DurationError::Syntax(text.to_owned());
    let (number, unit_ms) = [("ms", 1.0), ("s", 1e3), ("m", 60e3), ("h", 3_600e3), ("d", 86_400e3)]
        .iter()
        .find_map(|(suffix, ms)| t.strip_suffix(suffix).map(|n| (n, *ms)))
        .unwrap_or((t, 1e3));
    // f64's parser accepts "inf" and "NaN": only plain decimal numbers are durations.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(syntax());
    }
    let value: f64 = number.parse().map_err(|_| syntax())?;
    let millis = value * unit_ms;
    if !millis.is_finite() {
        return Err(syntax());
    }
    if millis > max.as_millis() as f64 {
        return Err(DurationError::TooLong { given: text.to_owned(), max_secs: max.as_secs() });
    }
    Ok(Duration::from_micros((millis * 1e3).round() as u64))
}

/// A duration as written in JSON: a string (`"60s"`) or a plain number of seconds. The bound is
/// applied later by the caller, who knows the configured maximum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(serde_json::Number),
        }
        match Raw::deserialize(d)
            .map_err(|_| de::Error::custom("a duration must be a string like \"60s\" or a number of seconds"))?
        {
            Raw::Text(s) => Ok(Self(s)),
            Raw::Number(n) => Ok(Self(n.to_string())),
        }
    }
}

impl serde::Serialize for DurationText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(7 * 86_400);

    #[test]
    fn units() {
        assert_eq!(parse_duration("60", MAX), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("60s", MAX), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms", MAX), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m", MAX), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h", MAX), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d", MAX), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0", MAX), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_bad_input() {
        for bad in ["", "inf", "infs", "NaN", "-5", "-5s", "5x", "s", "1e3", "ms", "5 s s", "+inf"] {
            assert!(matches!(parse_duration(bad, MAX), Err(DurationError::Syntax(_))), "{bad}");
        }
        assert!(matches!(parse_duration("8d", MAX), Err(DurationError::TooLong { .. })));
        assert!(matches!(
            parse_duration("99999999999999999999999999999999999999d", MAX),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn json_forms() {
        let t: DurationText = serde_json::from_str("\"30s\"").unwrap();
        assert_eq!(t.0, "30s");
        let n: DurationText = serde_json::from_str("30").unwrap();
        assert_eq!(parse_duration(&n.0, MAX), Ok(Duration::from_secs(30)));
        assert!(serde_json::from_str::<DurationText>("null").is_err());
    }
}

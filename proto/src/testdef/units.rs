//! Units and value checks of a test block, run while the TOML is deserialized so the
//! parser attaches the value's span to an error: durations ("500ms", "30s", "1h"; humantime),
//! IANA time zones (chrono-tz's compiled-in database), cron schedules, agent ids and
//! labels against `bounds`. The `ser_*` functions write values back in the same syntax.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Deserializer, Serializer};
use toml::Spanned;

use super::CronSchedule;
use crate::bounds;

/// Parses "250ms", "30s", "5m", "1h", "1d", or combinations like "1m30s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("invalid duration `{s}` ({e}); use e.g. \"500ms\", \"30s\", \"5m\", \"1h\"")
    })
}

pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Parsed by the scheduler's own parser, so `check` and the run agree.
pub fn de_opt_cron<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<CronSchedule>>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let span = s.span();
    CronSchedule::parse(s.get_ref())
        .map(|c| Some(Spanned::new(span, c)))
        .map_err(serde::de::Error::custom)
}

/// An IANA time zone name ("Europe/Berlin", "UTC"), from chrono-tz's compiled-in database.
pub fn parse_timezone(s: &str) -> Result<Tz, String> {
    s.parse::<Tz>().map_err(|_| {
        format!("unknown time zone `{s}`; use an IANA name such as \"Europe/Berlin\" or \"UTC\"")
    })
}

pub fn de_timezone<'de, D: Deserializer<'de>>(d: D) -> Result<Tz, D::Error> {
    parse_timezone(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

pub fn de_opt_timezone<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tz>, D::Error> {
    de_timezone(d).map(Some)
}

pub fn de_opt_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    bounds::agent_id(&s).map_err(serde::de::Error::custom)?;
    Ok(Some(s))
}

pub fn de_labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(d)?;
    bounds::labels(labels.iter()).map_err(serde::de::Error::custom)?;
    Ok(labels)
}

pub fn de_spanned_labels<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Spanned<BTreeMap<String, String>>, D::Error> {
    let labels = Spanned::<BTreeMap<String, String>>::deserialize(d)?;
    bounds::labels(labels.get_ref().iter()).map_err(serde::de::Error::custom)?;
    Ok(labels)
}

pub fn de_opt_spanned_labels<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Spanned<BTreeMap<String, String>>>, D::Error> {
    de_spanned_labels(d).map(Some)
}

/// A duration as `parse_duration` reads it back ("30s", "1m 30s", "500ms").
pub fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// A time zone by its IANA name.
pub fn ser_opt_timezone<S: Serializer>(tz: &Option<Tz>, s: S) -> Result<S::Ok, S::Error> {
    match tz {
        Some(tz) => s.serialize_str(tz.name()),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_written_back_read_the_same() {
        for text in ["500ms", "30s", "1m30s", "5m", "1h", "90d", "1h 2m 3s 4ms"] {
            let d = parse_duration(text).unwrap();
            let written = humantime::format_duration(d).to_string();
            assert_eq!(parse_duration(&written), Ok(d), "{text} -> {written}");
        }
        assert!(parse_duration("soon").unwrap_err().contains("use e.g."));
    }
}

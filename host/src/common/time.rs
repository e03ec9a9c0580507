//! Times as the API reads and writes them. Answers carry RFC 3339 in UTC
//! (`2026-12-03T08:00:00.000Z`); parameters take RFC 3339 with any offset
//! (`2026-12-03T09:00:00+01:00`), a date and time without an offset (read as UTC), a bare
//! date (midnight UTC), unix milliseconds, or a span back from now (`90s`, `30m`, `1h`,
//! `7d`, `1h30m`, optionally followed by `ago`). A `+` offset that reached us as a space
//! (an unencoded `+` in a query string decodes to one) is read as the `+` it was.
//! Parsed by jiff, so offsets, leap years and the edges of the calendar are someone's
//! well-tested code rather than ours.

use std::time::Duration;

/// Parses a time parameter to unix milliseconds, `now_ms` being the present (for spans).
pub fn parse_time_at(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(t) = instant(s).or_else(|| instant(&plus_from_space(s)?)) {
        return Ok(t.as_millisecond());
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return d
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp().as_millisecond())
            .map_err(|e| format!("{s:?}: {e}"));
    }
    let span = s.strip_suffix("ago").unwrap_or(s).trim();
    if span.starts_with(|c: char| c.is_ascii_digit())
        && let Ok(d) = humantime::parse_duration(span)
    {
        return Ok(now_ms.saturating_sub(millis(d)));
    }
    Err(format!(
        "{s:?} is not a time: use RFC 3339 (2026-12-03T10:00:00Z, 2026-12-03T11:00:00+01:00), \
         a date (2026-12-03), unix milliseconds, or a span back from now (30m, 1h, 7d)"
    ))
}

/// RFC 3339 with an offset, or a date and time without one (UTC).
fn instant(s: &str) -> Option<jiff::Timestamp> {
    s.parse::<jiff::Timestamp>().ok().or_else(|| {
        let civil = s.parse::<jiff::civil::DateTime>().ok()?;
        civil
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp())
    })
}

/// `2026-12-03T09:00:00 01:00` (a `+` decoded as a space) back to `...+01:00`.
fn plus_from_space(s: &str) -> Option<String> {
    let (time, offset) = s.rsplit_once(' ')?;
    let (h, m) = offset.split_once(':')?;
    let digits = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
    (time.contains(':') && digits(h) && digits(m)).then(|| format!("{time}+{offset}"))
}

/// Parses a time parameter against the clock (see [`parse_time_at`]).
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, crate::unix_ms())
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339 in UTC with milliseconds, of unix milliseconds (clamped to what RFC 3339 can
/// write).
pub fn format_time(ms: i64) -> String {
    let t = jiff::Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    format!("{t:.3}")
}

/// RFC 3339 of unix seconds (the stores keep creation times in seconds).
pub fn format_secs(secs: i64) -> String {
    format_time(secs.saturating_mul(1000))
}

/// Serializes unix seconds as RFC 3339 (`#[serde(serialize_with = ...)]`).
pub fn serialize_secs<S: serde::Serializer>(secs: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_secs(*secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_748_800_000; // 2025-12-03T08:00:00Z

    #[test]
    fn offsets_dates_spans_and_millis_all_read() {
        let utc = parse_time_at("2025-12-03T08:00:00Z", 0).unwrap();
        assert_eq!(utc, NOW);
        assert_eq!(parse_time_at("2025-12-03T09:00:00+01:00", 0).unwrap(), NOW);
        assert_eq!(parse_time_at("2025-12-03T03:30:00-04:30", 0).unwrap(), NOW);
        assert_eq!(parse_time_at("2025-12-03", 0).unwrap(), NOW - 8 * 3_600_000);
        assert_eq!(parse_time_at("1764748800000", 0).unwrap(), NOW);
        assert_eq!(parse_time_at("1h", NOW).unwrap(), NOW - 3_600_000);
        assert_eq!(parse_time_at("1h30m", NOW).unwrap(), NOW - 5_400_000);
        assert_eq!(parse_time_at("7d ago", NOW).unwrap(), NOW - 7 * 86_400_000);
        assert_eq!(parse_time_at(" 90s ", NOW).unwrap(), NOW - 90_000);
        // No offset: UTC, as earlier Kiln read it; a `+` that arrived as a space.
        assert_eq!(parse_time_at("2025-12-03T08:00:00", 0).unwrap(), NOW);
        assert_eq!(parse_time_at("2025-12-03 08:00:00", 0).unwrap(), NOW);
        assert_eq!(parse_time_at("2025-12-03T09:00:00 01:00", 0).unwrap(), NOW);
        assert_eq!(
            parse_time_at("2025-12-03T09:00:00.250 01:00", 0).unwrap(),
            NOW + 250
        );
    }

    #[test]
    fn nonsense_is_refused_with_the_forms_that_work() {
        for bad in [
            "",
            "yesterday",
            "2025-13-01",
            "2025-12-03T25:00:00Z",
            "h1",
            "1 fortnight",
        ] {
            let e = parse_time_at(bad, NOW).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn formats_utc_with_milliseconds_and_round_trips() {
        assert_eq!(format_time(NOW + 5), "2025-12-03T08:00:00.005Z");
        assert_eq!(format_secs(NOW / 1000), "2025-12-03T08:00:00.000Z");
        assert_eq!(parse_time_at(&format_time(NOW + 5), 0).unwrap(), NOW + 5);
        assert!(format_time(i64::MAX).starts_with("9999-"));
    }
}

//! Times as people and machines read them.

use store::Millis;

/// RFC 3339 in UTC, to the second: `2026-11-21T10:02:11Z`.
#[must_use]
pub fn rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| ms.to_string(),
        |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Reads an RFC 3339 time (`2026-11-22T02:00:30Z`).
pub fn parse_rfc3339(text: &str) -> Result<Millis, String> {
    text.parse::<jiff::Timestamp>()
        .map(jiff::Timestamp::as_millisecond)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))
}

/// Local wall-clock time, as the status table shows it: `2026-11-21 10:02:11`.
#[must_use]
pub fn local(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| ms.to_string(),
        |t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        },
    )
}

/// An elapsed time, short: `4m12s`, `31s`, `850ms`.
#[must_use]
pub fn elapsed(ms: Millis) -> String {
    let ms = u64::try_from(ms.max(0)).unwrap_or(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(1_795_255_331_000), "2026-11-21T10:02:11Z");
        assert_eq!(elapsed(252_000), "4m12s");
        assert_eq!(elapsed(31_000), "31s");
        assert_eq!(elapsed(3_723_000), "1h02m03s");
        assert_eq!(elapsed(850), "850ms");
    }
}

//! Crontab expressions, read exactly as crontab(5) reads them: five fields, Sunday as 0 or 7, and
//! the `@daily`-style shorthands. No seconds field, no year field.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Parses a 5-field crontab expression or an `@` shorthand.
pub fn parse(expression: &str) -> Result<Cron, String> {
    let trimmed = expression.trim();
    // crontab's `@midnight` is `@daily`; `@reboot` is not a time.
    let trimmed = match trimmed {
        "@midnight" => "@daily",
        "@reboot" => return Err("`@reboot` is not a time: schedules fire at times".to_owned()),
        t if t.starts_with('@')
            && !matches!(
                t,
                "@yearly" | "@annually" | "@monthly" | "@weekly" | "@daily" | "@hourly"
            ) =>
        {
            return Err(format!(
                "unknown shorthand `{t}`; expected `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly` or `@yearly`"
            ));
        }
        t => t,
    };
    if !trimmed.starts_with('@') {
        let fields = trimmed.split_whitespace().count();
        if fields != 5 {
            return Err(format!("found {fields} fields, expected 5"));
        }
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(trimmed)
        .map_err(|e| lowercase(&e.to_string()))
}

/// The firing times of `expression` in `timezone` after `after` and up to `until` (milliseconds
/// since the Unix epoch), at most `limit` of them, in order.
pub fn firings(
    expression: &str,
    timezone: &str,
    after: i64,
    until: i64,
    limit: usize,
) -> Result<Vec<i64>, String> {
    let cron = parse(expression)?;
    let tz = jiff::tz::TimeZone::get(timezone).map_err(|e| e.to_string())?;
    let start = jiff::Timestamp::from_millisecond(after)
        .map_err(|e| e.to_string())?
        .to_zoned(tz);
    let mut out = Vec::new();
    for next in cron.iter_after(start) {
        let at = next.timestamp().as_millisecond();
        if at > until || out.len() >= limit {
            break;
        }
        out.push(at);
    }
    Ok(out)
}

/// The latest firing time of `expression` in `timezone` that is after `after` and not after
/// `until`, with how many firings there were in that span (counted up to `cap`).
pub fn latest(
    expression: &str,
    timezone: &str,
    after: i64,
    until: i64,
    cap: usize,
) -> Result<Option<(i64, usize)>, String> {
    let cron = parse(expression)?;
    let tz = jiff::tz::TimeZone::get(timezone).map_err(|e| e.to_string())?;
    let end = jiff::Timestamp::from_millisecond(until)
        .map_err(|e| e.to_string())?
        .to_zoned(tz);
    let Ok(last) = cron.find_previous_occurrence(&end, true) else {
        return Ok(None);
    };
    let last = last.timestamp().as_millisecond();
    if last <= after {
        return Ok(None);
    }
    let count = firings(expression, timezone, after, until, cap)?.len();
    Ok(Some((last, count)))
}

/// The next firing time of `expression` in `timezone` after `after`.
pub fn next(expression: &str, timezone: &str, after: i64) -> Result<Option<i64>, String> {
    Ok(firings(expression, timezone, after, i64::MAX, 1)?
        .first()
        .copied())
}

fn lowercase(message: &str) -> String {
    let mut chars = message.chars();
    chars
        .next()
        .map_or_else(String::new, |c| c.to_lowercase().chain(chars).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crontab_semantics() {
        assert!(parse("*/5 * * * *").is_ok());
        assert!(parse("0 0 * * 0").is_ok());
        assert!(parse("@daily").is_ok());
        assert!(parse("@midnight").is_ok());
        assert!(parse("@reboot").unwrap_err().contains("not a time"));
        assert!(parse("0 0 * * * *").unwrap_err().contains("6 fields"));
        assert!(parse("61 * * * *").is_err());
    }

    #[test]
    fn firings_in_a_time_zone() {
        // 2026-01-01T00:00:00Z
        let start = 1_767_225_600_000;
        let day = 86_400_000;
        let times = firings("0 2 * * *", "UTC", start, start + 3 * day, 10).unwrap();
        assert_eq!(
            times,
            vec![
                start + 7_200_000,
                start + day + 7_200_000,
                start + 2 * day + 7_200_000
            ]
        );
        assert_eq!(
            latest("0 2 * * *", "UTC", start, start + 3 * day, 2).unwrap(),
            Some((start + 2 * day + 7_200_000, 2))
        );
        assert_eq!(
            latest(
                "0 2 * * *",
                "UTC",
                start + 7_200_000,
                start + 3_600_000 * 3,
                9
            )
            .unwrap(),
            None
        );
        // 02:00 in Paris is 01:00 UTC in winter.
        assert_eq!(
            next("0 2 * * *", "Europe/Paris", start).unwrap(),
            Some(start + 3_600_000)
        );
    }
}

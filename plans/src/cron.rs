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
}

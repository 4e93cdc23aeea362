//! Durations as users write them (`30s`, `10m`, `1h30m`, `500ms`, `2d`): one grammar for
//! the ScalingPolicy's fields and expressions (the controller), the same fields as the
//! agents read them, and the agent's flags. Owns only text <-> length; it never decides
//! what a duration means.

use std::time::Duration;

/// Why a duration did not parse, with the byte offset in the text where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    pub offset: usize,
    pub message: String,
}

impl std::fmt::Display for DurationError {
    /// `column N: message`, columns counted from 1 as editors do.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "column {}: {}", self.offset + 1, self.message)
    }
}

impl std::error::Error for DurationError {}

/// Milliseconds per unit; the longest unit names come first so `ms` wins over `m`.
const UNITS: &[(&str, i64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Reads a unit name at the start of `text`; returns (milliseconds per unit, its length).
pub fn unit_at(text: &str) -> Option<(i64, usize)> {
    let letters = text.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
    let word = &text[..letters];
    UNITS
        .iter()
        .find(|(name, _)| *name == word)
        .map(|(_, ms)| (*ms, letters))
}

/// Parses one or more `<number><unit>` groups written together (`1h30m`) into
/// milliseconds. A bare number is rejected: a duration without a unit is ambiguous
/// (seconds? minutes?).
pub fn parse_millis(text: &str) -> Result<i64, DurationError> {
    let (ms, used) = scan_millis(text)?;
    if used != text.len() {
        return Err(DurationError {
            offset: used,
            message: format!(
                "unexpected `{}` after the duration",
                &text[used..].chars().next().unwrap_or(' ')
            ),
        });
    }
    Ok(ms)
}

/// Scans a duration at the start of `text`: returns (milliseconds, bytes used). Used by
/// the controller's expression lexer, which then carries on after it.
pub fn scan_millis(text: &str) -> Result<(i64, usize), DurationError> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut total: f64 = 0.0;
    loop {
        let start = pos;
        while pos < bytes.len() && (bytes[pos].is_ascii_digit() || bytes[pos] == b'.') {
            pos += 1;
        }
        if pos == start {
            return Err(DurationError {
                offset: start,
                message: if start == 0 {
                    "expected a duration such as `30s`, `10m` or `1h`".into()
                } else {
                    "expected a number".into()
                },
            });
        }
        let number: f64 = text[start..pos].parse().map_err(|_| DurationError {
            offset: start,
            message: format!("`{}` is not a number", &text[start..pos]),
        })?;
        let Some((per_unit, unit_len)) = unit_at(&text[pos..]) else {
            let number = &text[start..pos];
            let letters = text[pos..]
                .bytes()
                .take_while(|b| b.is_ascii_alphabetic())
                .count();
            let spaced = text[pos..].trim_start();
            let spaced_word: String = spaced
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            return Err(DurationError {
                offset: pos,
                message: match (letters, spelled_out(&spaced_word)) {
                    (0, Some(unit)) if !spaced_word.is_empty() => format!(
                        "`{number} {spaced_word}`: write the unit right after the number, \
                         as in `{number}{unit}` (units: ms, s, m, h, d)"
                    ),
                    (0, _) => format!(
                        "`{number}` needs a unit: ms, s, m, h or d (for example `{number}s`)"
                    ),
                    (_, _) => {
                        let word = &text[pos..pos + letters];
                        match spelled_out(word) {
                            Some(unit) => format!(
                                "unknown unit `{word}`: write `{number}{unit}` (units: ms, s, m, h, d)"
                            ),
                            None => format!("unknown unit `{word}`: use ms, s, m, h or d"),
                        }
                    }
                },
            });
        };
        pos += unit_len;
        total += number * per_unit as f64;
        if total > i64::MAX as f64 / 2.0 {
            return Err(DurationError {
                offset: start,
                message: "duration is too long".into(),
            });
        }
        if pos >= bytes.len() || !bytes[pos].is_ascii_digit() {
            return Ok((total.round() as i64, pos));
        }
    }
}

/// The unit a spelled-out name means (`minutes` -> `m`), for a message that says what
/// to write instead.
fn spelled_out(word: &str) -> Option<&'static str> {
    Some(match word.to_ascii_lowercase().as_str() {
        "ms" | "msec" | "msecs" | "millis" | "millisecond" | "milliseconds" => "ms",
        "s" | "sec" | "secs" | "second" | "seconds" => "s",
        "m" | "min" | "mins" | "minute" | "minutes" => "m",
        "h" | "hr" | "hrs" | "hour" | "hours" => "h",
        "d" | "day" | "days" => "d",
        _ => return None,
    })
}

/// [`parse_millis`] as a [`Duration`]; the grammar has no sign, so it is never negative.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let ms = parse_millis(text)?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// Formats milliseconds the way users write them (`1h30m`, `45s`, `250ms`).
pub fn format_millis(mut ms: i64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    if ms < 0 {
        out.push('-');
        ms = -ms;
    }
    for (name, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= per {
            out.push_str(&format!("{}{name}", ms / per));
            ms %= per;
        }
    }
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units_parse_to_their_length() {
        for (text, ms) in [
            ("30s", 30_000),
            ("10m", 600_000),
            ("1h", 3_600_000),
            ("2d", 172_800_000),
            ("250ms", 250),
            ("1.5m", 90_000),
        ] {
            assert_eq!(parse_millis(text), Ok(ms), "{text}");
        }
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
    }

    #[test]
    fn compound_durations_add_up() {
        assert_eq!(parse_millis("1h30m"), Ok(5_400_000));
        assert_eq!(parse_millis("1m30s"), Ok(90_000));
    }

    #[test]
    fn a_bare_number_is_rejected_with_a_hint() {
        let err = parse_millis("30").unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(err.message.contains("needs a unit"), "{}", err.message);
        assert!(err.to_string().starts_with("column 3: "), "{err}");
    }

    #[test]
    fn an_unknown_or_spelled_out_unit_says_what_to_write() {
        let err = parse_millis("5w").unwrap_err();
        assert_eq!(err.offset, 1);
        assert!(err.message.contains("unknown unit `w`"), "{}", err.message);
        let err = parse_millis("5 minutes").unwrap_err();
        assert!(err.message.contains("as in `5m`"), "{}", err.message);
        let err = parse_millis("2hours").unwrap_err();
        assert!(err.message.contains("write `2h`"), "{}", err.message);
    }

    #[test]
    fn trailing_text_is_rejected_where_it_starts() {
        let err = parse_millis("5m ").unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(parse_millis("").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["1h30m", "45s", "250ms", "2d", "10m"] {
            assert_eq!(format_millis(parse_millis(text).unwrap()), text);
        }
        assert_eq!(format_millis(-1500), "-1s500ms");
    }
}

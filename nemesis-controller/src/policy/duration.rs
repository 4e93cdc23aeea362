//! Durations as users write them (`30s`, `10m`, `1h30m`, `500ms`, `2d`), in CRD fields and
//! in expressions alike: the grammar of `nemesis_common::duration` (which the agents
//! read the same fields with), as chrono lengths. Owns only the text -> length
//! conversion; it never decides what a duration means.

use chrono::TimeDelta;
pub use nemesis_common::duration::DurationError;
use nemesis_common::duration::{format_millis, parse_millis, scan_millis};

/// Parses one or more `<number><unit>` groups written together (`1h30m`). A bare number
/// is rejected: a duration without a unit is ambiguous (seconds? minutes?).
pub fn parse_duration(text: &str) -> Result<TimeDelta, DurationError> {
    parse_millis(text).map(TimeDelta::milliseconds)
}

/// Scans a duration at the start of `text`: returns (milliseconds, bytes used). Used by
/// the expression lexer, which then carries on after it.
pub(crate) fn scan_duration(text: &str) -> Result<(i64, usize), DurationError> {
    scan_millis(text)
}

/// Formats a duration the way users write it (`1h30m`, `45s`, `250ms`).
pub fn format_duration(d: TimeDelta) -> String {
    format_millis(d.num_milliseconds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_units_parse_to_their_length() {
        assert_eq!(parse_duration("30s").unwrap(), TimeDelta::seconds(30));
        assert_eq!(parse_duration("10m").unwrap(), TimeDelta::minutes(10));
        assert_eq!(parse_duration("1h").unwrap(), TimeDelta::hours(1));
        assert_eq!(parse_duration("2d").unwrap(), TimeDelta::days(2));
        assert_eq!(
            parse_duration("250ms").unwrap(),
            TimeDelta::milliseconds(250)
        );
        assert_eq!(parse_duration("1.5m").unwrap(), TimeDelta::seconds(90));
    }

    #[test]
    fn compound_durations_add_up() {
        assert_eq!(parse_duration("1h30m").unwrap(), TimeDelta::minutes(90));
        assert_eq!(parse_duration("1m30s").unwrap(), TimeDelta::seconds(90));
    }

    #[test]
    fn a_bare_number_is_rejected_with_a_hint() {
        let err = parse_duration("30").unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(err.message.contains("needs a unit"), "{}", err.message);
    }

    #[test]
    fn an_unknown_unit_is_named() {
        let err = parse_duration("5w").unwrap_err();
        assert_eq!(err.offset, 1);
        assert!(err.message.contains("unknown unit `w`"), "{}", err.message);
    }

    #[test]
    fn trailing_text_is_rejected_where_it_starts() {
        let err = parse_duration("5m ").unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["1h30m", "45s", "250ms", "2d", "10m"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}

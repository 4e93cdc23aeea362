//! `schedule(cron, tz, window)`: a cron pattern read in a named time zone, true from each
//! time the pattern fires until `window` later (one minute when no window is given, the
//! resolution of a five-field cron pattern). Owns calendar arithmetic only; it never
//! decides what a policy does with it.

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::Cron;
use std::str::FromStr;

/// The window when `schedule(...)` is called without one: a five-field pattern names a
/// minute, so it is true for that minute.
pub const DEFAULT_SCHEDULE_WINDOW: TimeDelta = TimeDelta::minutes(1);

/// Longest accepted window; a longer one would be "always", which needs no schedule.
pub const MAX_SCHEDULE_WINDOW: TimeDelta = TimeDelta::days(366);

#[derive(Debug, Clone)]
pub struct Schedule {
    pub pattern: String,
    cron: Cron,
    pub tz: Tz,
    pub window: TimeDelta,
}

/// Why a schedule's pattern or zone is wrong, as a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleError {
    Pattern(String),
    TimeZone(String),
}

/// Whether a schedule is active now, and until when that answer holds at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleState {
    pub active: bool,
    /// The next instant the answer may change (a window ends or the pattern fires).
    /// `None` when the pattern never fires again within the search horizon.
    pub until: Option<DateTime<Utc>>,
}

impl Schedule {
    pub fn new(pattern: &str, tz: Option<&str>, window: TimeDelta) -> Result<Self, ScheduleError> {
        let cron = Cron::from_str(pattern).map_err(|e| ScheduleError::Pattern(e.to_string()))?;
        let tz = match tz {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                ScheduleError::TimeZone(format!(
                    "unknown time zone `{name}`: use an IANA name such as `Europe/Paris` or `UTC`"
                ))
            })?,
        };
        Ok(Self {
            pattern: pattern.to_string(),
            cron,
            tz,
            window,
        })
    }

    /// The latest time at or before `now` the pattern fires (in the schedule's zone).
    pub fn last_at_or_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = now.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// Is `now` within `window` after a time the pattern fires (in the schedule's zone)?
    /// A pattern that cannot be evaluated (no occurrence within croner's search horizon)
    /// counts as inactive.
    pub fn state_at(&self, now: DateTime<Utc>) -> ScheduleState {
        let local = now.with_timezone(&self.tz);
        if let Ok(prev) = self.cron.find_previous_occurrence(&local, true) {
            let end = prev.with_timezone(&Utc) + self.window;
            if now < end {
                return ScheduleState {
                    active: true,
                    until: Some(end),
                };
            }
        }
        let next = self
            .cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc));
        ScheduleState {
            active: false,
            until: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn paris(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        chrono_tz::Europe::Paris
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_window_opens_when_the_pattern_fires_in_its_own_zone() {
        let s =
            Schedule::new("0 8 * * MON-FRI", Some("Europe/Paris"), TimeDelta::hours(8)).unwrap();
        // Monday 2024-03-04.
        assert!(!s.state_at(paris(2024, 3, 4, 7, 59)).active);
        let at8 = s.state_at(paris(2024, 3, 4, 8, 0));
        assert!(at8.active);
        assert_eq!(at8.until, Some(paris(2024, 3, 4, 16, 0)));
        assert!(s.state_at(paris(2024, 3, 4, 15, 59)).active);
        let after = s.state_at(paris(2024, 3, 4, 16, 0));
        assert!(!after.active);
        assert_eq!(after.until, Some(paris(2024, 3, 5, 8, 0)));
        // Saturday: the pattern does not fire.
        assert!(!s.state_at(paris(2024, 3, 9, 9, 0)).active);
    }

    #[test]
    fn without_a_window_it_is_true_for_the_minute_it_fires() {
        let s = Schedule::new("30 12 * * *", None, DEFAULT_SCHEDULE_WINDOW).unwrap();
        let noon = Utc.with_ymd_and_hms(2024, 1, 1, 12, 30, 0).unwrap();
        assert!(s.state_at(noon).active);
        assert!(s.state_at(noon + TimeDelta::seconds(59)).active);
        assert!(!s.state_at(noon + TimeDelta::seconds(60)).active);
        assert!(!s.state_at(noon - TimeDelta::seconds(1)).active);
    }

    #[test]
    fn daylight_saving_moves_the_utc_instant() {
        let s = Schedule::new("0 8 * * *", Some("Europe/Paris"), TimeDelta::hours(1)).unwrap();
        // Winter: 08:00 Paris is 07:00 UTC; summer: 06:00 UTC.
        assert!(
            s.state_at(Utc.with_ymd_and_hms(2024, 1, 15, 7, 30, 0).unwrap())
                .active
        );
        assert!(
            !s.state_at(Utc.with_ymd_and_hms(2024, 1, 15, 6, 30, 0).unwrap())
                .active
        );
        assert!(
            s.state_at(Utc.with_ymd_and_hms(2024, 7, 15, 6, 30, 0).unwrap())
                .active
        );
    }

    #[test]
    fn bad_patterns_and_zones_are_reported() {
        assert!(matches!(
            Schedule::new("not a cron", None, DEFAULT_SCHEDULE_WINDOW),
            Err(ScheduleError::Pattern(_))
        ));
        match Schedule::new("* * * * *", Some("Mars/Olympus"), DEFAULT_SCHEDULE_WINDOW) {
            Err(ScheduleError::TimeZone(m)) => assert!(m.contains("Mars/Olympus")),
            other => panic!("{other:?}"),
        }
    }
}

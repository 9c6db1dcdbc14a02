//! UTC calendar arithmetic for display and retention buckets: civil dates from
//! nanoseconds since the epoch, and ISO 8601 weeks. No time zones: volsnap speaks UTC.

/// A UTC date and time of day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The UTC civil time of `ns` nanoseconds since the epoch.
pub fn civil(ns: i64) -> Civil {
    let secs = ns.div_euclid(1_000_000_000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem % 3600 / 60) as u32,
        second: (rem % 60) as u32,
    }
}

/// The ISO 8601 week (year, week 1-53) containing `ns`: weeks start on Monday and
/// belong to the year of their Thursday.
pub fn iso_week(ns: i64) -> (i64, u32) {
    let days = ns.div_euclid(1_000_000_000).div_euclid(86_400);
    let weekday = (days + 3).rem_euclid(7); // 0 = Monday; 1970-01-01 was a Thursday
    let thursday = days - weekday + 3;
    let (year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(year, 1, 1)) / 7 + 1;
    (year, week as u32)
}

/// RFC 3339 with seconds, e.g. `2026-11-22T15:08:16Z`.
pub fn rfc3339(ns: i64) -> String {
    let c = civil(ns);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(y: i64, m: u32, d: u32) -> i64 {
        days_from_civil(y, m, d) * 86_400 * 1_000_000_000
    }

    #[test]
    fn civil_round_trips_and_formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_360_096_000_000_000), "2026-11-22T15:08:16Z");
        assert_eq!(rfc3339(-1_000_000_000), "1969-12-31T23:59:59Z");
        for d in [-100_000i64, -1, 0, 59, 60, 10_000, 20_000, 100_000] {
            let c = civil(d * 86_400 * 1_000_000_000);
            assert_eq!(days_from_civil(c.year, c.month, c.day), d);
        }
    }

    #[test]
    fn iso_weeks_follow_their_thursday() {
        assert_eq!(iso_week(ns(2021, 1, 3)), (2020, 53)); // a Sunday
        assert_eq!(iso_week(ns(2021, 1, 4)), (2021, 1)); // the Monday after
        assert_eq!(iso_week(ns(2024, 12, 30)), (2025, 1));
        assert_eq!(iso_week(ns(2026, 11, 22)), (2026, 47));
    }
}

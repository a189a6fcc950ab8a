//! Calendar dates (`YYYY-MM-DD`, UTC) for the terms of an application:
//! when its approval starts and ends. Days since 1970-01-01 inside, so that
//! comparing a date with a clock is arithmetic, and no date-time crate is
//! needed for what is only ever a day.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const MS_PER_DAY: i64 = 86_400_000;

/// A day of the proleptic Gregorian calendar, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// Days since 1970-01-01.
    days: i64,
}

/// Why a text is not a date.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a date of the form YYYY-MM-DD")]
pub struct DateError {
    /// The text as given.
    pub text: String,
}

impl Date {
    /// The date `year-month-day`, if it exists (years 1 to 9999).
    pub fn from_ymd(year: i64, month: u32, day: u32) -> Option<Date> {
        let valid = (1..=9999).contains(&year) && (1..=12).contains(&month) && day >= 1;
        (valid && day <= days_in_month(year, month)).then(|| Date { days: days_from_civil(year, month, day) })
    }

    /// Parses `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Result<Date, DateError> {
        let error = || DateError { text: text.to_string() };
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(error());
        }
        let number = |range: std::ops::Range<usize>| {
            let part = &text[range];
            part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse::<u32>().ok()).flatten()
        };
        let (Some(year), Some(month), Some(day)) = (number(0..4), number(5..7), number(8..10)) else {
            return Err(error());
        };
        Date::from_ymd(i64::from(year), month, day).ok_or_else(error)
    }

    /// The day that contains `ms` milliseconds since the Unix epoch.
    pub fn containing_ms(ms: i64) -> Date {
        Date { days: ms.div_euclid(MS_PER_DAY) }
    }

    /// Milliseconds since the Unix epoch at this day's first instant.
    pub fn start_ms(self) -> i64 {
        self.days * MS_PER_DAY
    }

    /// Milliseconds since the Unix epoch at the next day's first instant:
    /// a validity that ends on this day holds until then.
    pub fn end_ms(self) -> i64 {
        (self.days + 1) * MS_PER_DAY
    }

    /// (year, month, day).
    pub fn ymd(self) -> (i64, u32, u32) {
        civil_from_days(self.days)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Date, D::Error> {
        let text = String::deserialize(deserializer)?;
        Date::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a valid civil date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date of a day count (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_days_and_round_trips() {
        assert_eq!(Date::parse("1970-01-01").unwrap().start_ms(), 0);
        assert_eq!(Date::parse("2000-03-01").unwrap().days, 11_017);
        assert_eq!(Date::parse("2026-12-08").unwrap().start_ms(), 1_796_688_000_000);
        // 0001-01-01 to 9999-12-31.
        let (first, last) = (Date::from_ymd(1, 1, 1).unwrap().days, Date::from_ymd(9999, 12, 31).unwrap().days);
        assert_eq!((first, last), (-719_162, 2_932_896));
        for days in (first..=last).step_by(997).chain([last]) {
            let date = Date { days };
            assert_eq!(Date::parse(&date.to_string()).unwrap(), date, "{date}");
        }
        assert_eq!(Date::containing_ms(-1).to_string(), "1969-12-31");
        assert_eq!(Date::containing_ms(1_796_688_000_000 + 86_399_999).to_string(), "2026-12-08");
    }

    #[test]
    fn only_real_dates_parse() {
        for good in ["2024-02-29", "2000-02-29", "0001-01-01", "9999-12-31"] {
            assert!(Date::parse(good).is_ok(), "{good}");
        }
        for bad in ["2023-02-29", "1900-02-29", "2026-13-01", "2026-04-31", "2026-1-01", "2026/01/01", "", "+026-01-01"]
        {
            assert_eq!(Date::parse(bad), Err(DateError { text: bad.to_string() }), "{bad}");
        }
    }

    #[test]
    fn a_validity_ending_on_a_day_lasts_through_it() {
        let day = Date::parse("2027-06-30").unwrap();
        assert_eq!(day.end_ms() - day.start_ms(), MS_PER_DAY);
        assert!(Date::containing_ms(day.end_ms() - 1) == day && Date::containing_ms(day.end_ms()) > day);
    }
}

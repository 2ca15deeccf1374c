//! Cron schedules: normalising what users write (standard 5-field cron, an optional
//! 6-field form with seconds, `@daily`-style macros) into the `cron` crate's form, and
//! computing fire times in a DAG's IANA timezone.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A schedule that parsed, ready to compute fire times.
#[derive(Debug, Clone)]
pub struct Schedule {
    inner: cron::Schedule,
    tz: Tz,
}

const DOW_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Standard cron numbers days of week 0-7 (0 and 7 are Sunday); the `cron` crate numbers
/// them 1-7 from Sunday. Names mean the same to both, so numbers become names.
fn normalise_dow(field: &str) -> Result<String, String> {
    let map_token = |t: &str| -> Result<String, String> {
        if t == "*" || t == "?" || t.chars().all(|c| c.is_ascii_alphabetic()) {
            return Ok(t.to_string());
        }
        let n: usize = t
            .parse()
            .map_err(|_| format!("day-of-week '{t}' is not 0-7 or a day name"))?;
        DOW_NAMES
            .get(n)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("day-of-week {n} is out of range 0-7"))
    };
    let mut out = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        let mapped = match range.split_once('-') {
            Some((a, b)) => format!("{}-{}", map_token(a)?, map_token(b)?),
            None => map_token(range)?,
        };
        out.push(match step {
            Some(s) => format!("{mapped}/{s}"),
            None => mapped,
        });
    }
    Ok(out.join(","))
}

/// The `@` macros a schedule may be (in any case), and the 5-field form of each.
pub const MACROS: &[(&str, &str)] = &[
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

/// What a schedule looks like, for the API schema (ECMA-262, no flags): a macro in any
/// case, or 5 or 6 fields of digits, names and `* ? / , -` separated by spaces or tabs.
/// The fields' ranges are left to [`normalise`].
pub fn pattern() -> String {
    let any_case = |word: &str| -> String {
        word.chars()
            .map(|c| {
                if c.is_ascii_alphabetic() {
                    format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase())
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let macros: Vec<String> = MACROS.iter().map(|(m, _)| any_case(m)).collect();
    let field = r"[0-9A-Za-z*?/,-]+";
    format!(
        r"^[ \t\r\n]*({}|{field}([ \t]+{field}){{4,5}})[ \t\r\n]*$",
        macros.join("|")
    )
}

/// Turn a user's schedule into the `cron` crate's 6-field (seconds-first) form.
pub fn normalise(expr: &str) -> Result<String, String> {
    let expr = expr.trim();
    let macro_form = if expr.starts_with('@') {
        let Some((_, form)) = MACROS.iter().find(|(m, _)| m.eq_ignore_ascii_case(expr)) else {
            return Err(format!(
                "unknown schedule macro '{expr}': use @yearly, @monthly, @weekly, @daily or @hourly"
            ));
        };
        Some(*form)
    } else {
        None
    };
    let expr = macro_form.unwrap_or(expr);
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let (seconds, rest) = match fields.len() {
        5 => ("0", &fields[..]),
        6 => (fields[0], &fields[1..]),
        n => {
            return Err(format!(
                "schedule '{expr}' has {n} fields, expected 5 (minute hour day month weekday) \
                 or 6 (with seconds first)"
            ))
        }
    };
    for (field, name, min, max) in [
        (seconds, "second", 0, 59),
        (rest[0], "minute", 0, 59),
        (rest[1], "hour", 0, 23),
        (rest[2], "day of month", 1, 31),
        (rest[3], "month", 1, 12),
    ] {
        check_range(field, name, min, max).map_err(|e| format!("schedule '{expr}': {e}"))?;
    }
    let dow = normalise_dow(rest[4])?;
    Ok(format!(
        "{seconds} {} {} {} {} {dow}",
        rest[0], rest[1], rest[2], rest[3]
    ))
}

/// Check the numbers of one cron field (`*`, `?`, names, lists, ranges, steps) against
/// its range, with a message in the user's terms (the cron crate's says "must be less
/// than 59" of a 61, and shows its own 6-field form of the expression).
fn check_range(field: &str, name: &str, min: u32, max: u32) -> Result<(), String> {
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        if let Some(step) = step {
            if !matches!(step.parse::<u32>(), Ok(n) if n > 0) {
                return Err(format!(
                    "{name} step '{step}' is not a whole number above 0"
                ));
            }
        }
        let ends = match range.split_once('-') {
            Some((a, b)) => vec![a, b],
            None => vec![range],
        };
        for end in ends {
            if end == "*" || end == "?" || end.chars().all(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            match end.parse::<u32>() {
                Ok(n) if (min..=max).contains(&n) => {}
                Ok(n) => return Err(format!("{name} {n} is out of range {min}-{max}")),
                Err(_) => return Err(format!("{name} '{end}' is not a number {min}-{max}")),
            }
        }
    }
    Ok(())
}

/// Parse an IANA timezone name.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name)
        .map_err(|_| format!("unknown IANA timezone '{name}' (e.g. UTC, Europe/Paris)"))
}

impl Schedule {
    pub fn parse(expr: &str, timezone: &str) -> Result<Schedule, String> {
        let norm = normalise(expr)?;
        let inner = cron::Schedule::from_str(&norm)
            .map_err(|e| format!("schedule '{expr}' is not a valid cron expression: {e}"))?;
        Ok(Schedule {
            inner,
            tz: parse_timezone(timezone)?,
        })
    }

    /// The first fire time strictly after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = self
            .tz
            .from_utc_datetime(&DateTime::<Utc>::from_timestamp_millis(after_ms)?.naive_utc());
        self.inner
            .after(&after)
            .next()
            .map(|t| t.with_timezone(&Utc).timestamp_millis())
    }

    /// Up to `n` fire times strictly after `after_ms`.
    pub fn upcoming(&self, after_ms: i64, n: usize) -> Vec<i64> {
        let mut out = Vec::with_capacity(n);
        let mut t = after_ms;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

/// What decides which windows are due.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Fire every missed window (oldest first) instead of only recent ones.
    pub catchup: bool,
    /// Without catchup, windows whose end is older than this are skipped (the latest
    /// due window always fires). Covers elections and short outages.
    pub grace_ms: i64,
    /// With catchup, at most this many of the newest missed windows fire.
    pub max_catchup: usize,
}

/// The windows `[start, end)` due at `now`, oldest first, for a DAG whose last fired
/// window ended at `cursor` (None: never fired; the first window starts at the first
/// fire time at or after `anchor`). Windows ending after `end_date` never fire.
pub fn due_windows(
    s: &Schedule,
    cursor: Option<i64>,
    anchor: i64,
    end_date: Option<i64>,
    now: i64,
    policy: Policy,
) -> Vec<crate::state::model::Window> {
    use crate::state::model::Window;
    let Some(mut start) = cursor.or_else(|| s.next_after(anchor - 1)) else {
        return Vec::new();
    };
    let mut due = Vec::new();
    // Bound the walk: a per-second schedule paused for a year must not loop forever.
    let cap = policy.max_catchup.max(1) * 4 + 64;
    // Nothing ends after `now`, nor after the DAG's end date.
    let horizon = end_date.map_or(now, |e| e.min(now));
    // Far behind (a per-second schedule paused for a month)? Jump close to the horizon:
    // the windows jumped over are beyond what either policy fires.
    if let Some(first_end) = s.next_after(start) {
        let interval = (first_end - start).max(1);
        let lookback = interval.saturating_mul(cap as i64);
        if horizon.saturating_sub(start) > lookback.saturating_mul(2) {
            if let Some(j) = s.next_after(horizon - lookback) {
                start = j;
            }
        }
    }
    while let Some(end) = s.next_after(start) {
        if end > horizon {
            break;
        }
        due.push(Window {
            start_ms: start,
            end_ms: end,
        });
        if due.len() > cap {
            due.remove(0);
        }
        start = end;
    }
    if policy.catchup {
        let n = due.len().saturating_sub(policy.max_catchup);
        due.drain(..n);
    } else if let Some(last) = due.last().copied() {
        due.retain(|w| w.end_ms >= now - policy.grace_ms);
        if due.is_empty() {
            due.push(last);
        }
    }
    due
}

/// The earliest `now` at which [`due_windows`] (same schedule, cursor, anchor and end
/// date) returns a window: the end of the first window after the cursor. `None` if none
/// ever will (past the end date). Before it the scheduler need not look at the DAG again
/// until the DAG or its cursor changes.
pub fn next_due_ms(
    s: &Schedule,
    cursor: Option<i64>,
    anchor: i64,
    end_date: Option<i64>,
) -> Option<i64> {
    let start = cursor.or_else(|| s.next_after(anchor - 1))?;
    let end = s.next_after(start)?;
    end_date.is_none_or(|e| end <= e).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_out_of_its_field_s_range_is_named_in_the_user_s_terms() {
        for (expr, want) in [
            ("61 * * * *", "minute 61 is out of range 0-59"),
            ("0 24 * * *", "hour 24 is out of range 0-23"),
            ("0 0 32 * *", "day of month 32 is out of range 1-31"),
            ("0 0 0 * *", "day of month 0 is out of range 1-31"),
            ("0 0 * 13 *", "month 13 is out of range 1-12"),
            ("60 0 0 * * *", "second 60 is out of range 0-59"),
            ("1-70 * * * *", "minute 70 is out of range 0-59"),
            (
                "*/0 * * * *",
                "minute step '0' is not a whole number above 0",
            ),
        ] {
            let e = Schedule::parse(expr, "UTC").err().unwrap_or_default();
            assert!(e.contains(want) && e.contains(expr), "{expr}: {e}");
        }
        for ok in [
            "59 23 31 12 *",
            "*/15 0-23 1,15 JAN-DEC MON-FRI",
            "0 0 * * 7",
            "@daily",
        ] {
            assert!(Schedule::parse(ok, "UTC").is_ok(), "{ok}");
        }
    }

    #[test]
    fn five_fields_and_macros_normalise() {
        assert_eq!(normalise("0 2 * * *").unwrap(), "0 0 2 * * *");
        assert_eq!(normalise("@daily").unwrap(), "0 0 0 * * *");
        assert_eq!(normalise("*/2 * * * * *").unwrap(), "*/2 * * * * *");
        assert_eq!(normalise("0 9 * * 1-5").unwrap(), "0 0 9 * * MON-FRI");
        assert_eq!(normalise("0 9 * * 0,7").unwrap(), "0 0 9 * * SUN,SUN");
        let e = normalise("0 2 * *").unwrap_err();
        assert!(e.contains("has 4 fields, expected 5"), "{e}");
        assert!(normalise("0 9 * * 8").is_err());
        assert!(normalise("@sometimes").is_err());
    }

    #[test]
    fn the_schema_pattern_takes_what_normalise_takes() {
        let schema = serde_json::json!({"type": "string", "pattern": pattern()});
        let v = jsonschema::validator_for(&schema).expect("the pattern compiles");
        for ok in [
            "0 2 * * *",
            "@DAILY",
            "@Midnight",
            " */2 * * * * *\n",
            "0 9 * * MON-FRI",
            "0 0 1 JAN ?",
        ] {
            assert!(v.is_valid(&serde_json::json!(ok)), "{ok:?}");
            normalise(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "@sometimes",
            "0 2 * *",
            "0 2 * * * * *",
            "\u{feff}@daily",
            "@daily\u{a0}",
            "0 2 * * ;",
        ] {
            assert!(!v.is_valid(&serde_json::json!(bad)), "{bad:?}");
        }
        for (m, _) in MACROS {
            assert!(v.is_valid(&serde_json::json!(m.to_uppercase())), "{m}");
        }
    }

    #[test]
    fn fire_times_follow_the_timezone() {
        let s = Schedule::parse("0 2 * * *", "Europe/Paris").unwrap();
        // 2025-10-01T00:00Z is 02:00 in Paris (CEST, UTC+2): the next fire is a day later.
        let t0 = DateTime::parse_from_rfc3339("2025-10-01T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        let next = s.next_after(t0).unwrap();
        let expect = DateTime::parse_from_rfc3339("2025-10-02T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(next, expect);
        // Sunday: weekday 0 is Sunday in standard cron.
        let s = Schedule::parse("0 0 * * 0", "UTC").unwrap();
        let n = s.next_after(t0).unwrap();
        let dt = DateTime::<Utc>::from_timestamp_millis(n).unwrap();
        assert_eq!(dt.format("%a").to_string(), "Sun");
    }

    #[test]
    fn bad_timezone_is_named() {
        assert!(Schedule::parse("@daily", "Mars/Olympus")
            .unwrap_err()
            .contains("Mars/Olympus"));
    }

    fn policy(catchup: bool) -> Policy {
        Policy {
            catchup,
            grace_ms: 5_000,
            max_catchup: 3,
        }
    }

    #[test]
    fn windows_follow_the_cursor_without_gaps_or_repeats() {
        let s = Schedule::parse("*/2 * * * * *", "UTC").unwrap();
        // Never fired, anchored at 1000: first fire 2000, first window [2000, 4000).
        let w = due_windows(&s, None, 1000, None, 4500, policy(true));
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].start_ms, w[0].end_ms), (2000, 4000));
        // Cursor at 4000, now 9000: [4000,6000) and [6000,8000) are due.
        let w = due_windows(&s, Some(4000), 0, None, 9000, policy(false));
        assert_eq!(
            w.iter().map(|w| w.start_ms).collect::<Vec<_>>(),
            vec![4000, 6000]
        );
        // Nothing due before the next fire time.
        assert!(due_windows(&s, Some(8000), 0, None, 9999, policy(false)).is_empty());
    }

    #[test]
    fn catchup_policy_bounds_what_fires_after_an_outage() {
        let s = Schedule::parse("*/2 * * * * *", "UTC").unwrap();
        // Out for 100 s: without catchup, windows within the 5 s grace fire.
        let w = due_windows(&s, Some(0), 0, None, 100_000, policy(false));
        assert_eq!(
            w.iter().map(|w| w.end_ms).collect::<Vec<_>>(),
            vec![96_000, 98_000, 100_000]
        );
        // With catchup, the newest max_catchup (3) windows fire, oldest first.
        let w = due_windows(&s, Some(0), 0, None, 100_000, policy(true));
        assert_eq!(
            w.iter().map(|w| w.end_ms).collect::<Vec<_>>(),
            vec![96_000, 98_000, 100_000]
        );
        // A long-missed latest window still fires without catchup.
        let daily = Schedule::parse("@daily", "UTC").unwrap();
        let day = 86_400_000;
        let w = due_windows(
            &daily,
            Some(0),
            0,
            None,
            10 * day + 3_600_000,
            policy(false),
        );
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].end_ms, 10 * day);
        // end_date stops firing.
        assert!(due_windows(&s, Some(0), 0, Some(1000), 100_000, policy(true)).is_empty());
    }

    #[test]
    fn dst_days_have_the_right_length() {
        // Europe/Paris springs forward on 2025-03-30: that day is 23 hours long.
        let s = Schedule::parse("0 0 * * *", "Europe/Paris").unwrap();
        let start = DateTime::parse_from_rfc3339("2025-03-29T23:00:00Z")
            .unwrap()
            .timestamp_millis();
        let end = s.next_after(start).unwrap();
        assert_eq!(end - start, 23 * 3_600_000);
        // Leap day exists in 2024 for a monthly-on-29th schedule.
        let s = Schedule::parse("0 0 29 2 *", "UTC").unwrap();
        let t = DateTime::parse_from_rfc3339("2023-03-01T00:00:00Z")
            .unwrap()
            .timestamp_millis();
        let next = DateTime::<Utc>::from_timestamp_millis(s.next_after(t).unwrap()).unwrap();
        assert_eq!(next.format("%Y-%m-%d").to_string(), "2024-02-29");
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, .. ProptestConfig::default() })]

        /// Nothing is due before `next_due_ms`, and something is at it.
        #[test]
        fn next_due_is_when_the_first_window_comes_due(
            expr in prop::sample::select(vec!["*/7 * * * * *", "0 */5 * * * *", "15 2 * * *", "0 0 * * 0", "@hourly"]),
            tz in prop::sample::select(vec!["UTC", "Europe/Paris", "Asia/Kathmandu"]),
            anchor in 1_600_000_000_000i64..1_900_000_000_000,
            fired in any::<bool>(),
            before in 1i64..3_600_000,
            end_after in prop::option::of(0i64..10 * 86_400_000),
            catchup in any::<bool>(),
        ) {
            let s = Schedule::parse(expr, tz).unwrap();
            let cursor = fired.then(|| s.next_after(anchor).unwrap());
            let end_date = end_after.map(|e| anchor + e);
            let policy = Policy { catchup, grace_ms: 60_000, max_catchup: 3 };
            match next_due_ms(&s, cursor, anchor, end_date) {
                Some(t) => {
                    prop_assert!(due_windows(&s, cursor, anchor, end_date, t - before, policy).is_empty());
                    prop_assert!(!due_windows(&s, cursor, anchor, end_date, t, policy).is_empty());
                }
                None => {
                    let far = anchor + 20 * 86_400_000;
                    prop_assert!(due_windows(&s, cursor, anchor, end_date, far, policy).is_empty());
                }
            }
        }

        /// Whatever the schedule, timezone, cursor and outage: due windows are whole,
        /// consecutive intervals of the schedule, start at the cursor, end by `now`, never
        /// past `end_date`, and respect the catchup bound.
        #[test]
        fn due_windows_are_consecutive_fire_intervals(
            expr in prop::sample::select(vec!["*/7 * * * * *", "0 */5 * * * *", "15 2 * * *", "0 0 * * 0", "0 9 1 * *", "@hourly"]),
            tz in prop::sample::select(vec!["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"]),
            start in 1_600_000_000_000i64..1_900_000_000_000,
            outage in 0i64..40 * 86_400_000,
            catchup in any::<bool>(),
            max_catchup in 1usize..20,
            end_after in prop::option::of(0i64..40 * 86_400_000),
        ) {
            let s = Schedule::parse(expr, tz).unwrap();
            let cursor = s.next_after(start).unwrap();
            let now = cursor + outage;
            let end_date = end_after.map(|e| cursor + e);
            let policy = Policy { catchup, grace_ms: 60_000, max_catchup };
            let w = due_windows(&s, Some(cursor), 0, end_date, now, policy);
            for pair in w.windows(2) {
                prop_assert_eq!(pair[0].end_ms, pair[1].start_ms);
            }
            for win in &w {
                prop_assert_eq!(s.next_after(win.start_ms), Some(win.end_ms), "a window is one interval");
                prop_assert!(win.end_ms <= now);
                prop_assert!(end_date.is_none_or(|e| win.end_ms <= e));
                prop_assert!(win.start_ms >= cursor);
            }
            if catchup {
                prop_assert!(w.len() <= max_catchup);
            }
            // Something due and allowed always fires; the newest due window is never dropped.
            let first_end = s.next_after(cursor).unwrap();
            if first_end <= now && end_date.is_none_or(|e| first_end <= e) {
                prop_assert!(!w.is_empty());
                let last = w.last().unwrap();
                let after = s.next_after(last.end_ms).unwrap();
                prop_assert!(after > now || end_date.is_some_and(|e| after > e), "the latest due window fires");
            }
            if w.len() == 1 && !catchup && outage < 60_000 {
                prop_assert_eq!(w[0].start_ms, cursor, "within the grace nothing is skipped");
            }
        }
    }
}

//! RFC 3339 timestamps for Ollama bodies (`created_at`, `modified_at`,
//! `expires_at`), without a date-time dependency.
//!
//! Formatting always produces UTC with nine fractional digits, like Ollama's
//! Go `time.Time` JSON. Parsing accepts any RFC 3339 offset and fraction. The
//! civil-date arithmetic is Howard Hinnant's `days_from_civil` algorithm,
//! exact for the proleptic Gregorian calendar.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `2025-01-01T10:00:00.123456789Z` for `t` (times before 1970 clamp to
/// the epoch).
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX / 2);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// Unix seconds of an RFC 3339 timestamp (`2025-05-10T08:06:48-07:00`,
/// `...T10:00:00.5Z`; a space instead of `T` is accepted). `None` when
/// malformed.
pub fn parse_rfc3339_unix(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `SystemTime` for Unix seconds (negative clamps to the epoch).
pub fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_735_725_600, 123_456_789);
        assert_eq!(rfc3339_nanos(t), "2025-01-01T10:00:00.123456789Z");
        // Leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_nanos(t), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn parses_offsets_and_fractions() {
        assert_eq!(
            parse_rfc3339_unix("2025-01-01T10:00:00Z"),
            Some(1_735_725_600)
        );
        assert_eq!(
            parse_rfc3339_unix("2025-05-10T08:06:48-07:00"),
            parse_rfc3339_unix("2025-05-10T15:06:48Z")
        );
        assert_eq!(
            parse_rfc3339_unix("2025-01-01T10:00:00.123456789+01:00"),
            Some(1_735_725_600 - 3600)
        );
        assert_eq!(parse_rfc3339_unix("2025-01-01"), None);
        assert_eq!(parse_rfc3339_unix("2025-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_unix("2025-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339_unix("2025-01-01T00:00:00.Z"), None);
    }

    proptest! {
        #[test]
        fn format_then_parse_roundtrips(secs in 0i64..8_000_000_000, nanos in 0u32..1_000_000_000) {
            let t = UNIX_EPOCH + Duration::new(u64::try_from(secs).unwrap(), nanos);
            prop_assert_eq!(parse_rfc3339_unix(&rfc3339_nanos(t)), Some(secs));
        }
    }
}

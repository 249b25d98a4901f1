//! Calendar formatting for the tools (RFC 3339 for listings, the mbox `From `
//! line's asctime form, RFC 5322 dates), without a date crate.
//!
//! UTC only; days from the Unix epoch to a civil date by Howard Hinnant's
//! `civil_from_days` algorithm (proleptic Gregorian calendar).

/// (year, month 1-12, day 1-31) of the day `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

struct Parts {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    micros: u64,
    weekday: usize,
}

fn parts(unix_us: u64) -> Parts {
    let secs = unix_us / 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    Parts {
        year,
        month,
        day,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        micros: unix_us % 1_000_000,
        // 1970-01-01 was a Thursday.
        weekday: ((days + 4) % 7) as usize,
    }
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `2026-11-21T09:30:00.123456Z`
pub fn rfc3339_us(unix_us: u64) -> String {
    let mut out = Vec::with_capacity(RFC3339_US_LEN);
    push_rfc3339_us(&mut out, unix_us);
    String::from_utf8(out).expect("ASCII digits and separators")
}

/// Length of [`rfc3339_us`]'s text for years 0 to 9999.
pub const RFC3339_US_LEN: usize = 27;

/// Appends `rfc3339_us(unix_us)` to `out` without `format!`: the delivery
/// log writes one per message on the shard threads.
pub fn push_rfc3339_us(out: &mut Vec<u8>, unix_us: u64) {
    let p = parts(unix_us);
    if !(0..=9999).contains(&p.year) {
        // Beyond four digits: the general (slow) path keeps it right.
        out.extend_from_slice(
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                p.year, p.month, p.day, p.hour, p.minute, p.second, p.micros
            )
            .as_bytes(),
        );
        return;
    }
    push_digits(out, p.year as u64, 4);
    out.push(b'-');
    push_digits(out, u64::from(p.month), 2);
    out.push(b'-');
    push_digits(out, u64::from(p.day), 2);
    out.push(b'T');
    push_digits(out, p.hour, 2);
    out.push(b':');
    push_digits(out, p.minute, 2);
    out.push(b':');
    push_digits(out, p.second, 2);
    out.push(b'.');
    push_digits(out, p.micros, 6);
    out.push(b'Z');
}

/// Appends the last `width` decimal digits of `v`, zero-padded.
pub fn push_digits(out: &mut Vec<u8>, mut v: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// `Sat Nov 21 09:30:00 2026` (the mbox `From ` line).
pub fn asctime(unix_us: u64) -> String {
    let p = parts(unix_us);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        DAYS[p.weekday],
        MONTHS[p.month as usize - 1],
        p.day,
        p.hour,
        p.minute,
        p.second,
        p.year
    )
}

/// `Sat, 21 Nov 2026 09:30:00 +0000` (RFC 5322 section 3.3).
pub fn rfc5322(unix_us: u64) -> String {
    let p = parts(unix_us);
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[p.weekday],
        p.day,
        MONTHS[p.month as usize - 1],
        p.year,
        p.hour,
        p.minute,
        p.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        assert_eq!(rfc3339_us(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-21 09:30:00.5 UTC, a Saturday.
        let t = 1_795_253_400_500_000;
        assert_eq!(rfc3339_us(t), "2026-11-21T09:30:00.500000Z");
        assert_eq!(asctime(t), "Sat Nov 21 09:30:00 2026");
        assert_eq!(rfc5322(t), "Sat, 21 Nov 2026 09:30:00 +0000");
        // A leap day.
        assert_eq!(&rfc3339_us(1_709_164_800_000_000)[..10], "2024-02-29");
    }

    #[test]
    fn the_fast_path_agrees_with_format() {
        let slow = |us: u64| {
            let p = parts(us);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                p.year, p.month, p.day, p.hour, p.minute, p.second, p.micros
            )
        };
        let mut us = 0u64;
        // Steps that are not round, across leap years and year 9999's end.
        while us < 253_402_300_800_000_000 + 86_400_000_000 * 800 {
            assert_eq!(rfc3339_us(us), slow(us), "at {us}");
            us += 987_654_321_012_345;
        }
        assert_eq!(
            rfc3339_us(253_402_300_799_999_999),
            "9999-12-31T23:59:59.999999Z"
        );
        assert_eq!(
            rfc3339_us(253_402_300_800_000_000),
            "10000-01-01T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_us(0).len(), RFC3339_US_LEN);
        let mut v = Vec::new();
        push_digits(&mut v, 7, 3);
        push_digits(&mut v, 12_345, 2);
        assert_eq!(v, b"00745");
    }
}

//! Search values: what the index stores for one element of one resource, FHIR dates as
//! millisecond ranges with their precision, and string normalisation.

use unicode_normalization::UnicodeNormalization;

/// One indexed value of one search parameter for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexValue {
    Str(String),
    Token {
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
        /// The code is personal: an Identifier's or a ContactPoint's value (indexed blind).
        personal: bool,
    },
    Reference {
        target: Option<String>,
        identifier: Option<(Option<String>, String)>,
    },
    Uri(String),
    /// Inclusive millisecond range [lo, hi].
    Date {
        lo: i64,
        hi: i64,
    },
}

/// Lower-case, accents stripped, control characters removed: FHIR string matching is case-
/// and accent-insensitive.
pub fn normalize(s: &str) -> String {
    s.nfd()
        .filter(|c| !unicode_normalization::char::is_combining_mark(*c) && !c.is_control())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Control characters separate fields in index keys; they never match anything anyway.
pub fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// American Soundex of one word, for the `phonetic` parameter.
pub fn soundex(word: &str) -> Option<String> {
    let letters: Vec<char> = normalize(word)
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    let first = *letters.first()?;
    let code = |c: char| match c {
        'b' | 'f' | 'p' | 'v' => '1',
        'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => '2',
        'd' | 't' => '3',
        'l' => '4',
        'm' | 'n' => '5',
        'r' => '6',
        'h' | 'w' => 'h',
        _ => '0',
    };
    let mut out = String::from(first.to_ascii_uppercase());
    let mut last = code(first);
    for &c in &letters[1..] {
        let d = code(c);
        if d == 'h' {
            continue;
        }
        if d != '0' && d != last {
            out.push(d);
            if out.len() == 4 {
                break;
            }
        }
        last = d;
    }
    while out.len() < 4 {
        out.push('0');
    }
    Some(out)
}

const MS_PER_DAY: i64 = 86_400_000;

fn days_in_month(year: i32, month: u8) -> u8 {
    time::Month::try_from(month)
        .map(|m| m.length(year))
        .unwrap_or(31)
}

fn day_start_ms(year: i32, month: u8, day: u8) -> Option<i64> {
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    Some((date.to_julian_day() as i64 - 2_440_588) * MS_PER_DAY)
}

/// Parse a FHIR date, dateTime or instant (or a search value of those forms) into the
/// inclusive millisecond range its precision covers. Values without a zone are taken as UTC.
pub fn parse_date_range(s: &str) -> Option<(i64, i64)> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            part.parse().ok()
        } else {
            None
        }
    };
    let year = num(0..4)? as i32;
    if b.len() == 4 {
        let lo = day_start_ms(year, 1, 1)?;
        return Some((lo, day_start_ms(year + 1, 1, 1)? - 1));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = num(5..7)? as u8;
    if !(1..=12).contains(&month) {
        return None;
    }
    if b.len() == 7 {
        let lo = day_start_ms(year, month, 1)?;
        return Some((lo, lo + days_in_month(year, month) as i64 * MS_PER_DAY - 1));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = num(8..10)? as u8;
    let day_lo = day_start_ms(year, month, day)?;
    if b.len() == 10 {
        return Some((day_lo, day_lo + MS_PER_DAY - 1));
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hour = num(11..13)?;
    if b.get(13) != Some(&b':') {
        return None;
    }
    let minute = num(14..16)?;
    let mut pos = 16;
    let (mut second, mut frac_ms, mut precision_ms) = (0, 0, 60_000);
    if b.get(16) == Some(&b':') {
        second = num(17..19)?;
        pos = 19;
        precision_ms = 1000;
        if b.get(19) == Some(&b'.') {
            let digits = b[20..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return None;
            }
            let frac = &s[20..20 + digits];
            let padded: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
            frac_ms = padded.parse::<i64>().ok()?;
            precision_ms = if digits >= 3 {
                1
            } else {
                10i64.pow(3 - digits as u32)
            };
            pos = 20 + digits;
        }
    }
    if hour > 24 || minute > 59 || second > 60 {
        return None;
    }
    let offset_ms = match &s[pos..] {
        "" | "Z" => 0,
        tz if tz.len() == 6
            && (tz.starts_with('+') || tz.starts_with('-'))
            && tz.as_bytes()[3] == b':' =>
        {
            let h: i64 = tz[1..3].parse().ok()?;
            let m: i64 = tz[4..6].parse().ok()?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (h * 3_600_000 + m * 60_000)
        }
        _ => return None,
    };
    let lo = day_lo + hour * 3_600_000 + minute * 60_000 + second * 1000 + frac_ms - offset_ms;
    Some((lo, lo + precision_ms - 1))
}

// ---- byte encoding of IndexValue lists, stored per (resource, parameter) ----

fn put_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        Some(s) => {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn get_str(input: &mut &[u8]) -> Option<Option<String>> {
    let len = u32::from_be_bytes(input.get(..4)?.try_into().ok()?);
    *input = &input[4..];
    if len == u32::MAX {
        return Some(None);
    }
    let len = len as usize;
    let s = String::from_utf8(input.get(..len)?.to_vec()).ok()?;
    *input = &input[len..];
    Some(Some(s))
}

fn get_i64(input: &mut &[u8]) -> Option<i64> {
    let v = i64::from_be_bytes(input.get(..8)?.try_into().ok()?);
    *input = &input[8..];
    Some(v)
}

pub fn encode_values(values: &[IndexValue]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        match v {
            IndexValue::Str(s) => {
                out.push(b's');
                put_str(&mut out, Some(s));
            }
            IndexValue::Token {
                system,
                code,
                text,
                personal,
            } => {
                out.push(if *personal { b'p' } else { b't' });
                put_str(&mut out, system.as_deref());
                put_str(&mut out, code.as_deref());
                put_str(&mut out, text.as_deref());
            }
            IndexValue::Reference { target, identifier } => {
                out.push(b'r');
                put_str(&mut out, target.as_deref());
                put_str(
                    &mut out,
                    identifier.as_ref().and_then(|(s, _)| s.as_deref()),
                );
                put_str(&mut out, identifier.as_ref().map(|(_, v)| v.as_str()));
            }
            IndexValue::Uri(u) => {
                out.push(b'u');
                put_str(&mut out, Some(u));
            }
            IndexValue::Date { lo, hi } => {
                out.push(b'd');
                out.extend_from_slice(&lo.to_be_bytes());
                out.extend_from_slice(&hi.to_be_bytes());
            }
        }
    }
    out
}

pub fn decode_values(mut input: &[u8]) -> Option<Vec<IndexValue>> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = input.split_first() {
        input = rest;
        let v = match tag {
            b's' => IndexValue::Str(get_str(&mut input)??),
            b't' | b'p' => IndexValue::Token {
                system: get_str(&mut input)?,
                code: get_str(&mut input)?,
                text: get_str(&mut input)?,
                personal: tag == b'p',
            },
            b'r' => {
                let target = get_str(&mut input)?;
                let system = get_str(&mut input)?;
                let value = get_str(&mut input)?;
                IndexValue::Reference {
                    target,
                    identifier: value.map(|v| (system, v)),
                }
            }
            b'u' => IndexValue::Uri(get_str(&mut input)??),
            b'd' => IndexValue::Date {
                lo: get_i64(&mut input)?,
                hi: get_i64(&mut input)?,
            },
            _ => return None,
        };
        out.push(v);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn date_precision_gives_the_whole_range() {
        let (lo, hi) = parse_date_range("2020").unwrap();
        assert_eq!(lo, parse_date_range("2020-01-01T00:00:00Z").unwrap().0);
        assert_eq!(hi, parse_date_range("2020-12-31T23:59:59.999Z").unwrap().0);
        let (lo, hi) = parse_date_range("2024-02").unwrap();
        assert_eq!(hi - lo + 1, 29 * MS_PER_DAY);
        let (lo, hi) = parse_date_range("2020-01-01T10:00:00+02:00").unwrap();
        assert_eq!(lo, parse_date_range("2020-01-01T08:00:00Z").unwrap().0);
        assert_eq!(hi - lo, 999);
        let (lo, hi) = parse_date_range("2020-01-01T10:00:00.5Z").unwrap();
        assert_eq!(hi - lo, 99);
        assert_eq!(
            parse_date_range("2020-01-01T10:00").map(|(l, h)| h - l),
            Some(59_999)
        );
    }

    #[test]
    fn bad_dates_are_rejected() {
        for bad in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2020-01-01T",
            "2020-01-01X10:00",
            "abcd",
            "2020-01-01T10:00:00+0200",
        ] {
            assert_eq!(parse_date_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn normalisation_and_soundex() {
        assert_eq!(normalize("Ångström"), "angstrom");
        assert_eq!(soundex("Robert").as_deref(), Some("R163"));
        assert_eq!(soundex("Rupert").as_deref(), Some("R163"));
        assert_eq!(soundex("Ashcraft").as_deref(), Some("A261"));
        assert_eq!(soundex("Tymczak").as_deref(), Some("T522"));
    }

    proptest! {
        #[test]
        fn value_encoding_round_trips(s in ".*", code in proptest::option::of(".*"), lo in any::<i64>(), hi in any::<i64>()) {
            let values = vec![
                IndexValue::Str(s.clone()),
                IndexValue::Token { system: Some(s.clone()), code: code.clone(), text: None, personal: false },
                IndexValue::Token { system: None, code: code.clone(), text: Some(s.clone()), personal: true },
                IndexValue::Reference { target: code.clone(), identifier: Some((None, s.clone())) },
                IndexValue::Uri(s),
                IndexValue::Date { lo, hi },
            ];
            prop_assert_eq!(decode_values(&encode_values(&values)), Some(values));
        }

        #[test]
        fn any_parsed_date_is_a_proper_range(y in 1900i32..2100, m in 1u8..13, d in 1u8..29, h in 0i64..24) {
            let s = format!("{y:04}-{m:02}-{d:02}T{h:02}:30:00Z");
            let (lo, hi) = parse_date_range(&s).unwrap();
            prop_assert_eq!(hi - lo, 999);
            let (dlo, dhi) = parse_date_range(&s[..10]).unwrap();
            prop_assert!(dlo <= lo && hi <= dhi);
        }
    }
}

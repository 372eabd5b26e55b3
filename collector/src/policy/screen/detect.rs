//! PII and secret detectors. Each finds candidates with a regular
//! expression (one `RegexSet` pass tells which detectors can match at
//! all) and, where the format carries one, keeps only those whose
//! checksum holds: bank cards by the Luhn check (ISO/IEC 7812-1), mainland
//! China resident ID numbers by the ISO 7064 MOD 11-2 check digit of
//! GB 11643-1999 and a real birth date.

use std::ops::Range;
use std::sync::LazyLock;

use regex::{Regex, RegexSet};

/// What a detector finds; the config's `detect` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detector {
    Email,
    /// Mainland China mobile numbers (`1[3-9]` and 9 digits, `+86` or not)
    /// and international numbers written with a `+` country code.
    Phone,
    /// 13 to 19 digits (spaces or dashes between groups) passing Luhn.
    BankCard,
    /// 18 characters: 6 region, 8 birth date, 3 sequence, 1 check (0-9, X).
    CnResidentId,
    /// API-key-like tokens (OpenAI/DeepSeek `sk-`, AWS `AKIA`, GitHub
    /// `ghp_`/`github_pat_`, Slack `xox?-`, Google `AIza`) and PEM private
    /// key blocks, from their `BEGIN` line to their `END` line or, when
    /// there is none (yet), to the end of the text.
    Secret,
}

impl Detector {
    pub const ALL: [Detector; 5] = [
        Detector::Email,
        Detector::Phone,
        Detector::BankCard,
        Detector::CnResidentId,
        Detector::Secret,
    ];

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::BankCard => "bank_card",
            Detector::CnResidentId => "cn_resident_id",
            Detector::Secret => "secret",
        }
    }

    /// What `mask` writes in place of a match.
    pub fn mask(self) -> &'static str {
        match self {
            Detector::Email => "[EMAIL]",
            Detector::Phone => "[PHONE]",
            Detector::BankCard => "[BANK_CARD]",
            Detector::CnResidentId => "[CN_RESIDENT_ID]",
            Detector::Secret => "[SECRET]",
        }
    }

    pub fn from_name(name: &str) -> Option<Detector> {
        Detector::ALL.into_iter().find(|d| d.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The patterns, in [`Detector::ALL`] order. Digit runs are fenced by
/// `(?:^|[^0-9])` lookalikes in [`find`] (the regex crate has no
/// lookaround), so a match inside a longer number is not one.
const PATTERNS: [&str; 5] = [
    r"(?i)[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}",
    r"(?:\+?86[ -]?)?1[3-9][0-9](?:[ -]?[0-9]{4}){2}|\+[1-9][0-9]{0,2}[ -]?(?:[0-9][ -]?){6,13}[0-9]",
    r"[0-9](?:[ -]?[0-9]){12,18}",
    r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]",
    r"sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|ghp_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{40,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|\z)",
];

struct Compiled {
    set: RegexSet,
    each: Vec<Regex>,
}

static COMPILED: LazyLock<Option<Compiled>> = LazyLock::new(|| {
    Some(Compiled {
        set: RegexSet::new(PATTERNS).ok()?,
        each: PATTERNS
            .iter()
            .map(|p| Regex::new(p).ok())
            .collect::<Option<Vec<_>>>()?,
    })
});

/// One match: which detector, and where (byte range in the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub detector: Detector,
    pub at: Range<usize>,
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// The Luhn check over the digits of `s`.
pub fn luhn(s: &str) -> bool {
    let d = digits(s);
    if d.len() < 2 {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                (x * 2) % 9 + u32::from(x == 9) * 9
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The GB 11643-1999 check character of a resident ID's first 17 digits,
/// and a real calendar birth date.
pub fn cn_resident_id_valid(id: &str) -> bool {
    let b = id.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let sum: u32 = b[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(c, w)| u32::from(c - b'0') * w)
        .sum();
    let want = CHECK[(sum % 11) as usize];
    let birth = std::str::from_utf8(&b[6..14]).ok();
    let date_ok = birth.is_some_and(|s| chrono::NaiveDate::parse_from_str(s, "%Y%m%d").is_ok());
    date_ok && b[17].to_ascii_uppercase() == want
}

/// Whether the match at `r` stands alone: no digit (or, for an email,
/// no address character) right before or after it.
fn fenced(text: &str, r: &Range<usize>, detector: Detector) -> bool {
    let before = text[..r.start].chars().next_back();
    let after = text[r.end..].chars().next();
    let joins = |c: Option<char>| match detector {
        Detector::Email => {
            c.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-'))
        }
        Detector::Secret => false,
        _ => c.is_some_and(|c| c.is_ascii_digit()),
    };
    !joins(before) && !joins(after)
}

/// Every match of `wanted` in `text`, in order of position; overlapping
/// matches of different detectors are all reported.
pub fn find(text: &str, wanted: &[Detector]) -> Vec<Found> {
    let Some(c) = COMPILED.as_ref() else {
        return Vec::new();
    };
    let hits = c.set.matches(text);
    let mut out = Vec::new();
    for &d in wanted {
        if !hits.matched(d.index()) {
            continue;
        }
        for m in c.each[d.index()].find_iter(text) {
            let at = m.range();
            if !fenced(text, &at, d) {
                continue;
            }
            let ok = match d {
                Detector::BankCard => luhn(m.as_str()),
                Detector::CnResidentId => cn_resident_id_valid(m.as_str()),
                _ => true,
            };
            if ok {
                out.push(Found { detector: d, at });
            }
        }
    }
    out.sort_by_key(|f| (f.at.start, f.at.end));
    out
}

/// `text` with every match of `wanted` replaced by its mask; overlapping
/// matches are masked as one span, named by the first.
pub fn mask(text: &str, wanted: &[Detector]) -> String {
    let found = find(text, wanted);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in found {
        if f.at.start < at {
            at = at.max(f.at.end);
            continue;
        }
        out.push_str(&text[at..f.at.start]);
        out.push_str(f.detector.mask());
        at = f.at.end;
    }
    out.push_str(&text[at..]);
    out
}

#[cfg(test)]
mod tests;

//! DNS lists as the operator writes them (SPEC "Sender reputation"): HELOGUARD_DNSBL in
//! Postfix's postscreen_dnsbl_sites syntax, HELOGUARD_RHSBL, HELOGUARD_DNSBL_DISPLAY; the
//! names to query (RFC 5782), and the answers read into scores and hits. Pure: the resolver
//! thread sends the queries.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use super::reputation::{DnsblOutcome, ListHit, RhsblHit, RhsblOutcome};

/// One octet of a filter: `N`, or `[...]` holding values `N` and ranges `N..M` separated by
/// `;` (`[2;4..11]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OctetFilter {
    Value(u8),
    Set(Vec<OctetPart>),
}

/// One item inside `[...]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OctetPart {
    Value(u8),
    /// `N..M`, both ends included.
    Range(u8, u8),
}

impl OctetFilter {
    pub fn matches(&self, octet: u8) -> bool {
        match self {
            OctetFilter::Value(v) => *v == octet,
            OctetFilter::Set(parts) => parts.iter().any(|p| match *p {
                OctetPart::Value(v) => v == octet,
                OctetPart::Range(low, high) => (low..=high).contains(&octet),
            }),
        }
    }
}

/// A filter on a list's A answer, octet by octet (`127.0.0.[2..11]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerFilter(pub [OctetFilter; 4]);

impl AnswerFilter {
    pub fn matches(&self, answer: Ipv4Addr) -> bool {
        self.0
            .iter()
            .zip(answer.octets())
            .all(|(filter, octet)| filter.matches(octet))
    }
}

/// Whether an entry with `filter` (none = any answer) matches `answer`.
fn filter_matches(filter: Option<&AnswerFilter>, answer: Ipv4Addr) -> bool {
    filter.is_none_or(|f| f.matches(answer))
}

/// One HELOGUARD_DNSBL entry: `ZONE[=FILTER][*WEIGHT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsblEntry {
    /// Lower case, without the trailing dot.
    pub zone: String,
    pub filter: Option<AnswerFilter>,
    /// Negative for an allowlist.
    pub weight: i64,
}

/// One HELOGUARD_RHSBL entry: `ZONE[=FILTER]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RhsblEntry {
    /// Lower case, without the trailing dot.
    pub zone: String,
    pub filter: Option<AnswerFilter>,
}

/// Why a list value does not parse; names the entry at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListError {
    /// The zone is not a DNS name.
    BadZone { entry: String },
    /// The filter is not four octets of `N`, `[N..M]` or `[N;M;...]` (0 to 255, low end first).
    BadFilter { entry: String },
    /// The weight is not a whole number (negative allowed).
    BadWeight { entry: String },
    /// HELOGUARD_RHSBL takes no weight.
    WeightNotAllowed { entry: String },
    /// A HELOGUARD_DNSBL_DISPLAY entry is not `ZONE=NAME`.
    BadDisplay { entry: String },
}

impl fmt::Display for ListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadZone { entry } => write!(f, "entry {entry:?}: the zone is not a DNS name"),
            Self::BadFilter { entry } => write!(
                f,
                "entry {entry:?}: the filter is not four octets of N, [N..M] or [N;M;...]"
            ),
            Self::BadWeight { entry } => {
                write!(f, "entry {entry:?}: the weight is not a whole number")
            }
            Self::WeightNotAllowed { entry } => {
                write!(f, "entry {entry:?}: RHSBL entries take no weight")
            }
            Self::BadDisplay { entry } => write!(f, "entry {entry:?} is not ZONE=NAME"),
        }
    }
}

impl std::error::Error for ListError {}

/// Entries separated by commas, white space or both.
fn entries(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
}

/// A zone: labels of letters, digits, hyphens and underscores, 1-63 octets each, at most 253
/// octets in all; a trailing dot is dropped.
fn parse_zone(zone: &str, entry: &str) -> Result<String, ListError> {
    let zone = zone.strip_suffix('.').unwrap_or(zone);
    let good = !zone.is_empty()
        && zone.len() <= 253
        && zone.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if good {
        Ok(zone.to_ascii_lowercase())
    } else {
        Err(ListError::BadZone {
            entry: entry.to_string(),
        })
    }
}

fn parse_octet_number(text: &str) -> Option<u8> {
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_octet(text: &str) -> Option<OctetFilter> {
    let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
        return parse_octet_number(text).map(OctetFilter::Value);
    };
    let parts = inner
        .split(';')
        .map(|part| match part.split_once("..") {
            Some((low, high)) => {
                let (low, high) = (parse_octet_number(low)?, parse_octet_number(high)?);
                (low <= high).then_some(OctetPart::Range(low, high))
            }
            None => parse_octet_number(part).map(OctetPart::Value),
        })
        .collect::<Option<Vec<_>>>()?;
    Some(OctetFilter::Set(parts))
}

/// `d.d.d.d`, each octet `N`, `[N..M]`, `[N;M;...]` or a mix (`[2;4..11]`).
pub fn parse_filter(text: &str) -> Option<AnswerFilter> {
    // Octets split on the dots outside brackets (`..` lives inside them).
    let mut octets = Vec::with_capacity(4);
    let mut depth = 0u8;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            ']' if depth == 1 => depth = 0,
            '[' | ']' => return None,
            '.' if depth == 0 => {
                octets.push(parse_octet(&text[start..i])?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return None;
    }
    octets.push(parse_octet(&text[start..])?);
    let octets: [OctetFilter; 4] = octets.try_into().ok()?;
    Some(AnswerFilter(octets))
}

/// `ZONE[=FILTER][*WEIGHT]` split into its three parts (the weight after the last `*`).
fn split_entry(entry: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, weight) = match entry.rsplit_once('*') {
        Some((rest, weight)) => (rest, Some(weight)),
        None => (entry, None),
    };
    match rest.split_once('=') {
        Some((zone, filter)) => (zone, Some(filter), weight),
        None => (rest, None, weight),
    }
}

fn filter_of(filter: Option<&str>, entry: &str) -> Result<Option<AnswerFilter>, ListError> {
    filter
        .map(|f| {
            parse_filter(f).ok_or_else(|| ListError::BadFilter {
                entry: entry.to_string(),
            })
        })
        .transpose()
}

/// HELOGUARD_DNSBL, in configuration order.
pub fn parse_dnsbl(value: &str) -> Result<Vec<DnsblEntry>, ListError> {
    entries(value)
        .map(|entry| {
            let (zone, filter, weight) = split_entry(entry);
            let weight = match weight {
                None => 1,
                Some(w) => {
                    let digits = w.strip_prefix(['-', '+']).unwrap_or(w);
                    if digits.is_empty()
                        || digits.len() > 9
                        || !digits.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Err(ListError::BadWeight {
                            entry: entry.to_string(),
                        });
                    }
                    w.parse().map_err(|_| ListError::BadWeight {
                        entry: entry.to_string(),
                    })?
                }
            };
            Ok(DnsblEntry {
                zone: parse_zone(zone, entry)?,
                filter: filter_of(filter, entry)?,
                weight,
            })
        })
        .collect()
}

/// HELOGUARD_RHSBL, in configuration order.
pub fn parse_rhsbl(value: &str) -> Result<Vec<RhsblEntry>, ListError> {
    entries(value)
        .map(|entry| {
            let (zone, filter, weight) = split_entry(entry);
            if weight.is_some() {
                return Err(ListError::WeightNotAllowed {
                    entry: entry.to_string(),
                });
            }
            Ok(RhsblEntry {
                zone: parse_zone(zone, entry)?,
                filter: filter_of(filter, entry)?,
            })
        })
        .collect()
}

/// HELOGUARD_DNSBL_DISPLAY: the name shown for a zone, so an access key in a zone never shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisplayNames(HashMap<String, String>);

impl DisplayNames {
    /// `ZONE=NAME,...`.
    pub fn parse(value: &str) -> Result<Self, ListError> {
        let mut names = HashMap::new();
        for entry in entries(value) {
            let bad = || ListError::BadDisplay {
                entry: entry.to_string(),
            };
            let (zone, name) = entry.split_once('=').ok_or_else(bad)?;
            let zone = parse_zone(zone, entry).map_err(|_| bad())?;
            let name = parse_zone(name, entry).map_err(|_| bad())?;
            names.insert(zone, name);
        }
        Ok(Self(names))
    }

    /// The name `zone` is shown by (the zone itself when it has none).
    pub fn show<'a>(&'a self, zone: &'a str) -> &'a str {
        self.0.get(zone).map_or(zone, String::as_str)
    }

    /// `text` with every zone that has a display name replaced by it, for the startup line of
    /// the effective configuration (longest zones first, so a zone inside another does not
    /// break the longer one).
    pub fn hide_zones(&self, text: &str) -> String {
        let mut zones: Vec<(&String, &String)> = self.0.iter().collect();
        zones.sort_by_key(|(zone, _)| std::cmp::Reverse(zone.len()));
        let mut out = text.to_string();
        for (zone, name) in zones {
            out = replace_ignoring_case(&out, zone, name);
        }
        out
    }
}

fn replace_ignoring_case(text: &str, from: &str, to: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (at, _) in lower.match_indices(from) {
        if at < last {
            continue;
        }
        out.push_str(&text[last..at]);
        out.push_str(to);
        last = at + from.len();
    }
    out.push_str(&text[last..]);
    out
}

/// The configured lists, ready for the resolver thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lists {
    pub dnsbl: Vec<DnsblEntry>,
    pub rhsbl: Vec<RhsblEntry>,
    pub display: DisplayNames,
}

impl Lists {
    /// The distinct DNSBL zones, each queried once however many entries name it.
    pub fn dnsbl_zones(&self) -> Vec<&str> {
        distinct(self.dnsbl.iter().map(|e| e.zone.as_str()))
    }

    pub fn rhsbl_zones(&self) -> Vec<&str> {
        distinct(self.rhsbl.iter().map(|e| e.zone.as_str()))
    }

    /// The client's score from the answers of each zone (`answers(zone)`: the A records, empty
    /// when the zone does not list the client or did not answer).
    pub fn score<'a>(&self, answers: impl Fn(&str) -> &'a [Ipv4Addr]) -> DnsblOutcome {
        let mut outcome = DnsblOutcome::default();
        for entry in &self.dnsbl {
            let matched = answers(&entry.zone)
                .iter()
                .find(|a| filter_matches(entry.filter.as_ref(), **a));
            if let Some(answer) = matched {
                outcome.score = outcome.score.saturating_add(entry.weight);
                outcome.hits.push(ListHit {
                    zone: self.display.show(&entry.zone).to_string(),
                    answer: *answer,
                    weight: entry.weight,
                });
            }
        }
        outcome
    }

    /// The hits of the registered `domains` (`answers(domain, zone)` as for `score`).
    pub fn rhsbl_hits<'a>(
        &self,
        domains: &[String],
        answers: impl Fn(&str, &str) -> &'a [Ipv4Addr],
    ) -> RhsblOutcome {
        let mut outcome = RhsblOutcome::default();
        for domain in domains {
            for entry in &self.rhsbl {
                let matched = answers(domain, &entry.zone)
                    .iter()
                    .find(|a| filter_matches(entry.filter.as_ref(), **a));
                if let Some(answer) = matched {
                    outcome.hits.push(RhsblHit {
                        domain: domain.clone(),
                        zone: self.display.show(&entry.zone).to_string(),
                        answer: *answer,
                    });
                }
            }
        }
        outcome
    }
}

fn distinct<'a>(zones: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for zone in zones {
        if !out.contains(&zone) {
            out.push(zone);
        }
    }
    out
}

/// RFC 5782 2.1 and 2.4: the client address under `zone`, IPv4 by reversed octets, IPv6 by its
/// 32 reversed nibbles; an IPv4-mapped IPv6 address is its IPv4 client.
pub fn dnsbl_query_name(ip: IpAddr, zone: &str) -> String {
    match crate::net::canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            name.push_str(zone);
            name
        }
    }
}

/// RFC 5782 2.2: a domain under an RHSBL zone.
pub fn rhsbl_query_name(domain: &str, zone: &str) -> String {
    format!("{domain}.{zone}")
}

/// Shows an entry as the operator writes it; parsing it again gives the same entry.
impl fmt::Display for OctetFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OctetFilter::Value(v) => write!(f, "{v}"),
            OctetFilter::Set(parts) => {
                f.write_str("[")?;
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        f.write_str(";")?;
                    }
                    match part {
                        OctetPart::Value(v) => write!(f, "{v}")?,
                        OctetPart::Range(low, high) => write!(f, "{low}..{high}")?,
                    }
                }
                f.write_str("]")
            }
        }
    }
}

impl fmt::Display for AnswerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = &self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

impl fmt::Display for DnsblEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.zone)?;
        if let Some(filter) = &self.filter {
            write!(f, "={filter}")?;
        }
        if self.weight != 1 {
            write!(f, "*{}", self.weight)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().expect("literal")
    }

    #[test]
    fn the_spec_example_parses() {
        let entries = parse_dnsbl(
            "zen.spamhaus.org=127.0.0.[2..11]*3, bl.spamcop.net*2, \
             list.dnswl.org=127.0.[0..255].[1..3]*-2",
        )
        .expect("parses");
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].zone, "zen.spamhaus.org");
        assert_eq!(entries[0].weight, 3);
        assert_eq!(entries[1].filter, None);
        assert_eq!(entries[1].weight, 2);
        assert_eq!(entries[2].weight, -2);
        let filter = entries[0].filter.as_ref().expect("filter");
        assert!(filter.matches(ip4("127.0.0.2")));
        assert!(filter.matches(ip4("127.0.0.11")));
        assert!(!filter.matches(ip4("127.0.0.12")));
        assert!(!filter.matches(ip4("127.255.255.254")));
    }

    #[test]
    fn entries_split_on_commas_white_space_or_both() {
        let entries = parse_dnsbl("a.test\tb.test , c.test,,d.test\n").expect("parses");
        let zones: Vec<&str> = entries.iter().map(|e| e.zone.as_str()).collect();
        assert_eq!(zones, ["a.test", "b.test", "c.test", "d.test"]);
        assert_eq!(parse_dnsbl("  ").expect("empty"), vec![]);
    }

    #[test]
    fn mixed_octets_and_bad_filters() {
        let filter = parse_filter("127.0.0.[2;4..11]").expect("parses");
        assert!(filter.matches(ip4("127.0.0.2")));
        assert!(!filter.matches(ip4("127.0.0.3")));
        assert!(filter.matches(ip4("127.0.0.4")));
        for bad in [
            "127.0.0",
            "127.0.0.1.2",
            "127.0.0.256",
            "127.0.0.[5..2]",
            "127.0.0.[2",
            "127.0.0.[]",
            "127.0.0.[[2]]",
            "127.0.0.-1",
            "127.0.0.",
            "127.0.0.0002",
        ] {
            assert_eq!(parse_filter(bad), None, "{bad}");
        }
        let err = parse_dnsbl("ok.test, bad.test=127.0.0.x").expect_err("bad filter");
        assert_eq!(
            err,
            ListError::BadFilter {
                entry: "bad.test=127.0.0.x".into()
            }
        );
        assert!(matches!(
            parse_dnsbl("bad.test*x"),
            Err(ListError::BadWeight { .. })
        ));
        assert!(matches!(
            parse_dnsbl("bad..test"),
            Err(ListError::BadZone { .. })
        ));
        assert!(matches!(
            parse_rhsbl("dbl.test*2"),
            Err(ListError::WeightNotAllowed { .. })
        ));
    }

    #[test]
    fn query_names_follow_rfc_5782() {
        let v4: IpAddr = "192.0.2.99".parse().expect("literal");
        assert_eq!(dnsbl_query_name(v4, "bl.test"), "99.2.0.192.bl.test");
        let mapped: IpAddr = "::ffff:192.0.2.99".parse().expect("literal");
        assert_eq!(dnsbl_query_name(mapped, "bl.test"), "99.2.0.192.bl.test");
        // RFC 5782 2.4's own example.
        let v6: IpAddr = "2001:db8:1:2:3:4:567:89ab".parse().expect("literal");
        assert_eq!(
            dnsbl_query_name(v6, "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
        );
        assert_eq!(
            rhsbl_query_name("example.org", "dbl.test"),
            "example.org.dbl.test"
        );
    }

    #[test]
    fn each_entry_counts_once_and_zones_are_shown_by_their_display_names() {
        let lists = Lists {
            dnsbl: parse_dnsbl(
                "KEY.zen.dq.test=127.0.0.[2..11]*3 KEY.zen.dq.test=127.0.0.[2..3]*2 wl.test*-5",
            )
            .expect("parses"),
            rhsbl: vec![],
            display: DisplayNames::parse("key.zen.dq.test=zen.test").expect("parses"),
        };
        assert_eq!(lists.dnsbl_zones(), ["key.zen.dq.test", "wl.test"]);
        let listed = [ip4("127.0.0.2"), ip4("127.0.0.4"), ip4("127.255.255.254")];
        let outcome = lists.score(|zone| {
            if zone == "key.zen.dq.test" {
                &listed
            } else {
                &[]
            }
        });
        assert_eq!(outcome.score, 5);
        assert_eq!(outcome.hits.len(), 2);
        assert!(outcome.hits.iter().all(|h| h.zone == "zen.test"));
        assert_eq!(outcome.hits[0].answer, ip4("127.0.0.2"));
        assert_eq!(
            lists.display.hide_zones("KEY.zen.dq.test=127.0.0.2"),
            "zen.test=127.0.0.2"
        );
    }

    #[test]
    fn rhsbl_hits_name_the_domain_and_zone() {
        let lists = Lists {
            dnsbl: vec![],
            rhsbl: parse_rhsbl("dbl.test=127.0.1.[2..99] other.test").expect("parses"),
            display: DisplayNames::default(),
        };
        let hit = [ip4("127.0.1.2")];
        let error = [ip4("127.0.1.255")];
        let outcome = lists.rhsbl_hits(
            &["bad.test".to_string(), "good.test".to_string()],
            |domain, zone| match (domain, zone) {
                ("bad.test", "dbl.test") => &hit,
                ("good.test", "dbl.test") => &error,
                _ => &[],
            },
        );
        assert_eq!(
            outcome.hits,
            vec![RhsblHit {
                domain: "bad.test".into(),
                zone: "dbl.test".into(),
                answer: ip4("127.0.1.2")
            }]
        );
    }

    fn octet_part() -> impl Strategy<Value = OctetPart> {
        prop_oneof![
            any::<u8>().prop_map(OctetPart::Value),
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| OctetPart::Range(a.min(b), a.max(b))),
        ]
    }

    fn octet_filter() -> impl Strategy<Value = OctetFilter> {
        prop_oneof![
            any::<u8>().prop_map(OctetFilter::Value),
            prop::collection::vec(octet_part(), 1..5).prop_map(OctetFilter::Set),
        ]
    }

    fn answer_filter() -> impl Strategy<Value = AnswerFilter> {
        [
            octet_filter(),
            octet_filter(),
            octet_filter(),
            octet_filter(),
        ]
        .prop_map(AnswerFilter)
    }

    fn entry() -> impl Strategy<Value = DnsblEntry> {
        (
            "[a-z0-9][a-z0-9_-]{0,10}(\\.[a-z0-9][a-z0-9-]{0,10}){0,3}",
            prop::option::of(answer_filter()),
            -1000i64..1000,
        )
            .prop_map(|(zone, filter, weight)| DnsblEntry {
                zone,
                filter,
                weight,
            })
    }

    /// The model: an octet filter as the set of octets it names.
    fn model(filter: &OctetFilter) -> Vec<u8> {
        (0..=255u8)
            .filter(|o| match filter {
                OctetFilter::Value(v) => v == o,
                OctetFilter::Set(parts) => parts.iter().any(|p| match p {
                    OctetPart::Value(v) => v == o,
                    OctetPart::Range(a, b) => a <= o && o <= b,
                }),
            })
            .collect()
    }

    proptest! {
        #[test]
        fn display_then_parse_gives_the_entries_back(entries in prop::collection::vec(entry(), 0..5)) {
            let text = entries.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            prop_assert_eq!(parse_dnsbl(&text), Ok(entries));
        }

        #[test]
        fn matching_agrees_with_the_model(filter in answer_filter(), answer in any::<[u8; 4]>()) {
            let expected = filter.0.iter().zip(answer).all(|(f, o)| model(f).contains(&o));
            prop_assert_eq!(filter.matches(Ipv4Addr::from(answer)), expected);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,80}") {
            let _ = parse_dnsbl(&text);
            let _ = parse_rhsbl(&text);
            let _ = DisplayNames::parse(&text);
            let _ = parse_filter(&text);
        }

        #[test]
        fn filter_like_text_never_panics(text in "[0-9\\[\\];.]{0,40}") {
            if let Some(filter) = parse_filter(&text) {
                prop_assert_eq!(parse_filter(&filter.to_string()), Some(filter));
            }
        }
    }
}

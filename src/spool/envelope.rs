//! The fields heloguard prepends to an accepted message (SPEC "What an accepted message
//! carries"): Return-Path and X-Envelope-To (maildir mode only), then Received,
//! Authentication-Results and X-HELO-Check (every mode).
//!
//! The exact layout of Received: CRLF line ends, each continuation line starts with one tab
//! (shown as four spaces here):
//!
//! ```text
//! Received: from HELO (PTR [IP])
//!     (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))   only in TLS
//!     by HOSTNAME (heloguard) with PROTO id ID
//!     for <rcpt>; DATE                                                    one recipient
//! ```
//!
//! With zero or several recipients, RFC 5321 7.2 (no Bcc disclosure) leaves `for` out: the `by`
//! line ends `id ID;` and DATE follows alone on the next continuation line, as Postfix folds it:
//!
//! ```text
//!     by HOSTNAME (heloguard) with PROTO id ID;
//!     DATE
//! ```

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use crate::helo::trace::authentication_results_field;
use crate::helo::trace::sanitize_helo;
use crate::helo::trace::x_helo_check_field;
use crate::message::Envelope;
use crate::message::TraceInfo;

/// The whole `Received: ...\r\n` field (RFC 5321 4.4), folded as the module docs show.
pub(crate) fn received_field(trace: &TraceInfo, recipients: &[String]) -> String {
    format_received(&sanitize_helo(&trace.helo), trace, recipients)
}

/// `received_field` with the HELO argument already made safe for a header.
fn format_received(helo: &str, trace: &TraceInfo, recipients: &[String]) -> String {
    let mut field = String::with_capacity(256);
    let ptr = trace.verdict.ptr.as_deref().unwrap_or("unknown");
    let ip = address_literal(trace.client_ip);
    // `write!` into a String cannot fail; the results are ignored for that reason.
    let _ = write!(field, "Received: from {helo} ({ptr} [{ip}])\r\n");
    if let Some(tls) = &trace.tls {
        let _ = write!(
            field,
            "\t(using {} with cipher {} ({}/{} bits))\r\n",
            tls.version, tls.cipher, tls.bits, tls.bits
        );
    }
    let _ = write!(
        field,
        "\tby {} (heloguard) with {} id {}",
        trace.hostname,
        trace.protocol.name(),
        trace.queue_id
    );
    let date = rfc5322_date(trace.received_at);
    match recipients {
        [only] => {
            let _ = write!(field, "\r\n\tfor <{only}>; {date}\r\n");
        }
        _ => {
            let _ = write!(field, ";\r\n\t{date}\r\n");
        }
    }
    field
}

/// Received, Authentication-Results and X-HELO-Check: the whole prefix in relay modes.
pub(crate) fn trace_fields(trace: &TraceInfo, recipients: &[String]) -> Vec<u8> {
    let received = received_field(trace, recipients);
    let auth = authentication_results_field(
        &trace.hostname,
        &trace.helo,
        trace.client_ip,
        &trace.verdict,
    );
    let check = x_helo_check_field(
        &trace.hostname,
        &trace.helo,
        trace.client_ip,
        &trace.verdict,
    );
    let mut out = Vec::with_capacity(received.len() + auth.len() + check.len());
    out.extend_from_slice(received.as_bytes());
    out.extend_from_slice(auth.as_bytes());
    out.extend_from_slice(check.as_bytes());
    out
}

/// Return-Path, one X-Envelope-To per recipient, then `trace_fields`: the maildir prefix.
pub(crate) fn maildir_prefix(env: &Envelope) -> Vec<u8> {
    let mut out = envelope_fields(env).into_bytes();
    out.extend_from_slice(&trace_fields(&env.trace, &env.recipients));
    out
}

/// `Return-Path: <sender>` (RFC 5321 4.4; `<>` for the null sender) and the X-Envelope-To lines.
fn envelope_fields(env: &Envelope) -> String {
    let mut out = String::with_capacity(64 * (1 + env.recipients.len()));
    let _ = write!(out, "Return-Path: <{}>\r\n", env.reverse_path);
    for rcpt in &env.recipients {
        let _ = write!(out, "X-Envelope-To: <{rcpt}>\r\n");
    }
    out
}

/// The address inside Received's brackets: `a.b.c.d` or `IPv6:addr` (RFC 5321 4.1.3). An
/// IPv4-mapped address is shown as the IPv4 address it is (SPEC "Who the client is").
fn address_literal(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    }
}

const WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// RFC 5322 3.3 date-time in UTC, e.g. `Mon, 23 Nov 2026 13:45:01 +0000`. The day is always
/// two digits (`1*2DIGIT` allows it) so the field has one width.
pub(crate) fn rfc5322_date(time: SystemTime) -> String {
    let secs = unix_seconds(time);
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[(days + 4).rem_euclid(7) as usize];
    format!(
        "{weekday}, {day:02} {} {year:04} {:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Whole seconds since the Unix epoch, negative (rounded down) before it.
fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX / 2),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2);
            -secs - i64::from(d.subsec_nanos() > 0)
        }
    }
}

/// (year, month 1-12, day 1-31) of the proleptic Gregorian calendar for days since 1970-01-01:
/// H. Hinnant's `civil_from_days`, with eras of 400 years (146097 days) starting on March 1st
/// so that the leap day is the last day of its year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::net::Ipv6Addr;
    use std::time::Duration;

    use super::*;
    use crate::helo::Action;
    use crate::helo::CheckResult;
    use crate::helo::VerdictKind;
    use crate::helo::verdict::Decision;
    use crate::helo::verdict::HeloVerdict;
    use crate::helo::verdict::IprevResult;
    use crate::message::Protocol;
    use crate::message::TlsInfo;

    /// 2026-11-23 13:45:01 UTC, a Monday.
    const WHEN: u64 = 1_795_441_501;

    fn verdict(ptr: Option<&str>) -> HeloVerdict {
        HeloVerdict {
            dnsbl_score: None,
            spf: None,
            dnswl: Vec::new(),
            listed: Vec::new(),
            kind: VerdictKind::Pass,
            shown: [CheckResult::Pass; crate::helo::CHECKS],
            measured: [CheckResult::Pass; crate::helo::CHECKS],
            action: Action::Off,
            failed: Vec::new(),
            allowed_by: None,
            ptr: ptr.map(str::to_owned),
            iprev: IprevResult::Pass,
            decision: Decision::Accept,
        }
    }

    fn trace(ip: IpAddr, ptr: Option<&str>, tls: bool) -> TraceInfo {
        TraceInfo {
            hostname: "mx.example.net".to_owned(),
            helo: "mail.example.org".to_owned(),
            client_ip: ip,
            verdict: verdict(ptr),
            tls: tls.then(|| TlsInfo {
                version: "TLSv1.3".to_owned(),
                cipher: "TLS_AES_256_GCM_SHA384".to_owned(),
                bits: 256,
            }),
            protocol: if tls {
                Protocol::Esmtps
            } else {
                Protocol::Esmtp
            },
            queue_id: "4bQx7Z0001".to_owned(),
            received_at: UNIX_EPOCH + Duration::from_secs(WHEN),
        }
    }

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|r| (*r).to_owned()).collect()
    }

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    /// The fixtures' HELO is already header-safe, so `sanitize_helo` would leave it as is.
    fn received(t: &TraceInfo, recipients: &[String]) -> String {
        format_received(&t.helo, t, recipients)
    }

    #[test]
    fn received_field_sanitizes_the_helo() {
        let mut t = trace(V4, None, false);
        t.helo = "bad (helo); \"x\"".to_owned();
        assert!(
            received_field(&t, &[])
                .starts_with("Received: from bad??helo????x? (unknown [192.0.2.7])\r\n")
        );
    }

    #[test]
    fn received_ipv4_plain_one_recipient() {
        let t = trace(V4, Some("mail.example.org"), false);
        assert_eq!(
            received(&t, &rcpts(&["a@example.net"])),
            "Received: from mail.example.org (mail.example.org [192.0.2.7])\r\n\
             \tby mx.example.net (heloguard) with ESMTP id 4bQx7Z0001\r\n\
             \tfor <a@example.net>; Mon, 23 Nov 2026 13:45:01 +0000\r\n"
        );
    }

    #[test]
    fn received_ipv6_tls_several_recipients() {
        let ip = IpAddr::V6("2001:db8::25".parse::<Ipv6Addr>().expect("literal"));
        let t = trace(ip, None, true);
        assert_eq!(
            received(&t, &rcpts(&["a@example.net", "b@example.net"])),
            "Received: from mail.example.org (unknown [IPv6:2001:db8::25])\r\n\
             \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
             \tby mx.example.net (heloguard) with ESMTPS id 4bQx7Z0001;\r\n\
             \tMon, 23 Nov 2026 13:45:01 +0000\r\n"
        );
    }

    #[test]
    fn received_ipv6_tls_one_recipient_and_ipv4_several() {
        let ip = IpAddr::V6("2001:db8::25".parse::<Ipv6Addr>().expect("literal"));
        let t = trace(ip, Some("mail.example.org"), true);
        assert_eq!(
            received(&t, &rcpts(&["a@example.net"])),
            "Received: from mail.example.org (mail.example.org [IPv6:2001:db8::25])\r\n\
             \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
             \tby mx.example.net (heloguard) with ESMTPS id 4bQx7Z0001\r\n\
             \tfor <a@example.net>; Mon, 23 Nov 2026 13:45:01 +0000\r\n"
        );
        let t = trace(V4, None, false);
        assert_eq!(
            received(&t, &rcpts(&["a@example.net", "b@example.net", "c@x"])),
            "Received: from mail.example.org (unknown [192.0.2.7])\r\n\
             \tby mx.example.net (heloguard) with ESMTP id 4bQx7Z0001;\r\n\
             \tMon, 23 Nov 2026 13:45:01 +0000\r\n"
        );
    }

    #[test]
    fn envelope_fields_null_sender_and_recipients_in_order() {
        let env = Envelope {
            reverse_path: String::new(),
            recipients: rcpts(&["b@example.net", "a@example.net"]),
            trace: trace(V4, None, false),
            content: crate::message::MessageContent::default(),
        };
        assert_eq!(
            envelope_fields(&env),
            "Return-Path: <>\r\n\
             X-Envelope-To: <b@example.net>\r\n\
             X-Envelope-To: <a@example.net>\r\n"
        );
    }

    #[test]
    fn address_literals() {
        assert_eq!(address_literal(V4), "192.0.2.7");
        let v6: IpAddr = "2001:db8::1".parse().expect("literal");
        assert_eq!(address_literal(v6), "IPv6:2001:db8::1");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("literal");
        assert_eq!(address_literal(mapped), "192.0.2.7");
    }

    fn date_at(secs: i64) -> String {
        let time = if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        };
        rfc5322_date(time)
    }

    #[test]
    fn dates_from_known_instants() {
        let cases = [
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (WHEN as i64, "Mon, 23 Nov 2026 13:45:01 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (951_868_799, "Tue, 29 Feb 2000 23:59:59 +0000"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 +0000"),
            (1_709_164_800, "Thu, 29 Feb 2024 00:00:00 +0000"),
            (1_735_689_599, "Tue, 31 Dec 2024 23:59:59 +0000"),
            (-1, "Wed, 31 Dec 1969 23:59:59 +0000"),
            (-86_400 * 365, "Wed, 01 Jan 1969 00:00:00 +0000"),
        ];
        for (secs, want) in cases {
            assert_eq!(date_at(secs), want, "{secs}");
        }
    }

    #[test]
    fn sub_second_times_round_down() {
        let t = UNIX_EPOCH + Duration::from_millis(1_999);
        assert_eq!(rfc5322_date(t), "Thu, 01 Jan 1970 00:00:01 +0000");
        let t = UNIX_EPOCH - Duration::from_millis(1);
        assert_eq!(rfc5322_date(t), "Wed, 31 Dec 1969 23:59:59 +0000");
    }

    #[test]
    fn civil_from_days_round_trips_every_day_of_four_centuries() {
        // Days since the epoch computed forwards, one day at a time, from 1900-01-01.
        let mut days = -25_567i64;
        let (mut y, mut m, mut d) = (1900i64, 1u32, 1u32);
        while y < 2300 {
            assert_eq!(civil_from_days(days), (y, m, d));
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            d += 1;
            if d > month_len {
                d = 1;
                m += 1;
            }
            if m > 12 {
                m = 1;
                y += 1;
            }
            days += 1;
        }
    }
}

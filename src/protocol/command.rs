//! SMTP commands (RFC 5321 4.1), parsed from one line without copying.
//!
//! `Command<'a>` borrows from the line it came from. Verbs are case-insensitive (RFC 5321
//! 2.4). Paths follow RFC 5321 4.1.2: `<>` (MAIL only), an optional source route that is
//! tolerated and dropped (RFC 5321 3.3: "servers MUST accept"), a dot-string or quoted-string
//! local part, and a domain or address literal; `RCPT TO:<postmaster>` needs no domain. A space
//! after `FROM:` / `TO:` is tolerated, as most servers do. MAIL parameters (RFC 5321 4.1.2
//! `Mail-parameters`): SIZE=n (RFC 1870), BODY=7BIT|8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531);
//! RCPT takes none, since no RCPT extension is advertised.
//!
//! Failures are a `ParseError` that knows its reply: unknown verb 500 5.5.2, bad syntax
//! 501 5.5.4, an unknown parameter 555 5.5.4 (RFC 5321 4.1.1.11).

use std::fmt;

use crate::protocol::reply::Reply;

/// The verbs heloguard implements, with their properties as a table (Postfix's
/// `smtpd_cmd_table`), not as scattered ifs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    StartTls,
}

impl Verb {
    const TABLE: [(&'static [u8], Verb); 12] = [
        (b"HELO", Verb::Helo),
        (b"EHLO", Verb::Ehlo),
        (b"MAIL", Verb::Mail),
        (b"RCPT", Verb::Rcpt),
        (b"DATA", Verb::Data),
        (b"BDAT", Verb::Bdat),
        (b"RSET", Verb::Rset),
        (b"NOOP", Verb::Noop),
        (b"VRFY", Verb::Vrfy),
        (b"HELP", Verb::Help),
        (b"QUIT", Verb::Quit),
        (b"STARTTLS", Verb::StartTls),
    ];

    /// Splits a line into its verb and the argument text after the separating space.
    pub fn split(line: &[u8]) -> Result<(Verb, &[u8]), ParseError> {
        let (word, rest) = match memchr::memchr(b' ', line) {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &line[line.len()..]),
        };
        Self::TABLE
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map(|&(_, verb)| (verb, rest))
            .ok_or(ParseError::UnknownCommand)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Verb::Helo => "HELO",
            Verb::Ehlo => "EHLO",
            Verb::Mail => "MAIL",
            Verb::Rcpt => "RCPT",
            Verb::Data => "DATA",
            Verb::Bdat => "BDAT",
            Verb::Rset => "RSET",
            Verb::Noop => "NOOP",
            Verb::Vrfy => "VRFY",
            Verb::Help => "HELP",
            Verb::Quit => "QUIT",
            Verb::StartTls => "STARTTLS",
        }
    }

    /// Counted against HELOGUARD_MAX_JUNK: commands that move no mail (Postfix
    /// `smtpd_junk_command_limit`).
    pub const fn counts_as_junk(self) -> bool {
        matches!(self, Verb::Noop | Verb::Rset | Verb::Vrfy | Verb::Help)
    }

    /// May come before a successful EHLO/HELO (SPEC: NOOP, RSET, VRFY, HELP and QUIT work
    /// before EHLO; RFC 5321 4.1.4).
    pub const fn allowed_before_helo(self) -> bool {
        matches!(
            self,
            Verb::Helo
                | Verb::Ehlo
                | Verb::Noop
                | Verb::Rset
                | Verb::Vrfy
                | Verb::Help
                | Verb::Quit
        )
    }

    /// RFC 2920 3.1: "EHLO, DATA, VRFY, EXPN, TURN, QUIT, and NOOP" (and STARTTLS, RFC 3207)
    /// can only be the last command of a pipelined group; the client waits for their reply.
    pub const fn ends_pipeline_group(self) -> bool {
        matches!(
            self,
            Verb::Ehlo
                | Verb::Helo
                | Verb::Data
                | Verb::Vrfy
                | Verb::Quit
                | Verb::Noop
                | Verb::StartTls
        )
    }

    /// The syntax reminder of a 501 reply.
    pub const fn usage(self) -> &'static str {
        match self {
            Verb::Helo => "Syntax: HELO hostname",
            Verb::Ehlo => "Syntax: EHLO hostname",
            Verb::Mail => "Syntax: MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
            Verb::Rcpt => "Syntax: RCPT TO:<address>",
            Verb::Data => "Syntax: DATA",
            Verb::Bdat => "Syntax: BDAT size [LAST]",
            Verb::Rset => "Syntax: RSET",
            Verb::Noop => "Syntax: NOOP [text]",
            Verb::Vrfy => "Syntax: VRFY address",
            Verb::Help => "Syntax: HELP [topic]",
            Verb::Quit => "Syntax: QUIT",
            Verb::StartTls => "Syntax: STARTTLS",
        }
    }
}

/// One parsed command, borrowing from its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// The argument as sent, surrounding blanks removed; never empty. Bytes, because the
    /// HELO checks judge whatever was sent, UTF-8 or not.
    Helo(&'a [u8]),
    Ehlo(&'a [u8]),
    Mail {
        from: Path<'a>,
        params: MailParams,
    },
    Rcpt {
        to: Path<'a>,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    StartTls,
}

/// A reverse- or forward-path without its angle brackets and source route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path<'a> {
    /// `local@domain`; empty for the null path `<>`; `postmaster` alone for RCPT.
    pub mailbox: &'a str,
    /// The part after the last `@` (a domain or an address literal); None for `<>` and
    /// `<postmaster>`.
    pub domain: Option<&'a str>,
}

impl Path<'_> {
    pub fn is_null(&self) -> bool {
        self.mailbox.is_empty()
    }

    /// RFC 5321 4.5.1: `<postmaster>` without a domain, any case.
    pub fn is_bare_postmaster(&self) -> bool {
        self.domain.is_none() && self.mailbox.eq_ignore_ascii_case("postmaster")
    }

    /// The local part: the mailbox without `@domain` (a quoted local part keeps its quotes).
    pub fn local_part(&self) -> &str {
        match self.domain {
            Some(domain) => self
                .mailbox
                .get(..self.mailbox.len().saturating_sub(domain.len() + 1))
                .unwrap_or(self.mailbox),
            None => self.mailbox,
        }
    }

    /// A local part that asks the receiver to route the mail on: `%` (the percent hack,
    /// `user%elsewhere@ours`), `!` (a UUCP bang path, `elsewhere!user@ours`), or an `@` inside
    /// quotes (`"user@elsewhere"@ours`). Postfix's defaults reroute the first two; none has a
    /// use at an MX but relaying through it.
    pub fn is_routing_trick(&self) -> bool {
        let local = self.local_part();
        local.contains(['%', '!']) || (local.starts_with('"') && local.contains('@'))
    }
}

/// RFC 6152 BODY values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
}

/// The MAIL parameters heloguard understands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// RFC 1870 SIZE=n; a value too large for u64 is kept as u64::MAX (surely over the limit).
    pub size: Option<u64>,
    pub body: Option<Body>,
    /// RFC 6531: the transaction may carry UTF-8 addresses and headers.
    pub smtputf8: bool,
}

/// Why a line is not a command heloguard can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// 500 5.5.2.
    UnknownCommand,
    /// 501 5.5.4 with the verb's syntax reminder.
    Syntax(Verb),
    /// 555 5.5.4 (RFC 5321 4.1.1.11, RFC 1869 6).
    UnknownParameter(Verb),
}

impl ParseError {
    pub fn reply(self) -> Reply {
        match self {
            ParseError::UnknownCommand => Reply::new(500, "5.5.2", "Command unrecognized"),
            ParseError::Syntax(verb) => Reply::new(501, "5.5.4", verb.usage()),
            ParseError::UnknownParameter(verb) => Reply::new(
                555,
                "5.5.4",
                match verb {
                    Verb::Rcpt => "RCPT TO parameters not recognized",
                    _ => "MAIL FROM parameters not recognized",
                },
            ),
        }
    }

    /// The verb, when the line had a known one.
    pub fn verb(self) -> Option<Verb> {
        match self {
            ParseError::UnknownCommand => None,
            ParseError::Syntax(v) | ParseError::UnknownParameter(v) => Some(v),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reply = self.reply();
        write!(f, "{} {}", reply.code, reply.lines.join(" "))
    }
}

impl std::error::Error for ParseError {}

impl<'a> Command<'a> {
    /// Parses one command line (terminator already removed).
    pub fn parse(line: &'a [u8]) -> Result<Self, ParseError> {
        let (verb, args) = Verb::split(trim_end(line))?;
        Self::parse_args(verb, args)
    }

    /// Parses the arguments of `verb`: the text after the verb and its space.
    pub fn parse_args(verb: Verb, args: &'a [u8]) -> Result<Self, ParseError> {
        let syntax = ParseError::Syntax(verb);
        let no_args = |command: Command<'a>| {
            if args.is_empty() {
                Ok(command)
            } else {
                Err(syntax)
            }
        };
        match verb {
            Verb::Helo | Verb::Ehlo => {
                let arg = args.trim_ascii();
                if arg.is_empty() {
                    return Err(syntax);
                }
                Ok(if verb == Verb::Helo {
                    Command::Helo(arg)
                } else {
                    Command::Ehlo(arg)
                })
            }
            Verb::Mail => {
                let text = std::str::from_utf8(args).map_err(|_| syntax)?;
                let rest = strip_prefix_ignore_case(text, "FROM:").ok_or(syntax)?;
                let (from, rest) =
                    parse_path(rest.trim_start_matches(' '), PathKind::Reverse).ok_or(syntax)?;
                let params = parse_mail_params(rest)?;
                Ok(Command::Mail { from, params })
            }
            Verb::Rcpt => {
                let text = std::str::from_utf8(args).map_err(|_| syntax)?;
                let rest = strip_prefix_ignore_case(text, "TO:").ok_or(syntax)?;
                let (to, rest) =
                    parse_path(rest.trim_start_matches(' '), PathKind::Forward).ok_or(syntax)?;
                if rest.split(' ').any(|p| !p.is_empty()) {
                    return Err(ParseError::UnknownParameter(Verb::Rcpt));
                }
                Ok(Command::Rcpt { to })
            }
            Verb::Bdat => parse_bdat(args).ok_or(syntax),
            Verb::Vrfy if args.trim_ascii().is_empty() => Err(syntax),
            Verb::Vrfy => Ok(Command::Vrfy),
            Verb::Noop => Ok(Command::Noop),
            Verb::Help => Ok(Command::Help),
            Verb::Data => no_args(Command::Data),
            Verb::Rset => no_args(Command::Rset),
            Verb::Quit => no_args(Command::Quit),
            Verb::StartTls => no_args(Command::StartTls),
        }
    }

    pub fn verb(&self) -> Verb {
        match self {
            Command::Helo(_) => Verb::Helo,
            Command::Ehlo(_) => Verb::Ehlo,
            Command::Mail { .. } => Verb::Mail,
            Command::Rcpt { .. } => Verb::Rcpt,
            Command::Data => Verb::Data,
            Command::Bdat { .. } => Verb::Bdat,
            Command::Rset => Verb::Rset,
            Command::Noop => Verb::Noop,
            Command::Vrfy => Verb::Vrfy,
            Command::Help => Verb::Help,
            Command::Quit => Verb::Quit,
            Command::StartTls => Verb::StartTls,
        }
    }
}

/// Trailing blanks are tolerated everywhere (clients and hand-typed sessions send them).
fn trim_end(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1);
    &line[..end]
}

fn strip_prefix_ignore_case<'s>(text: &'s str, prefix: &str) -> Option<&'s str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PathKind {
    /// MAIL: `<>` allowed.
    Reverse,
    /// RCPT: `<postmaster>` allowed.
    Forward,
}

/// RFC 5321 4.1.2 `Path`, then what follows it. None when it is not a path.
fn parse_path(text: &str, kind: PathKind) -> Option<(Path<'_>, &str)> {
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'<') {
        return None;
    }
    let mut i = 1;
    if bytes.get(i) == Some(&b'>') {
        if kind != PathKind::Reverse {
            return None;
        }
        let path = Path {
            mailbox: "",
            domain: None,
        };
        return Some((path, after_path(&text[2..])?));
    }
    // A-d-l ":" : a source route, accepted and ignored (RFC 5321 3.3 and appendix C).
    if bytes.get(i) == Some(&b'@') {
        let colon = memchr::memchr(b':', bytes)?;
        if bytes[..colon].contains(&b'>') {
            return None;
        }
        i = colon + 1;
    }
    let start = i;
    i = local_part_end(bytes, i)?;
    let mut domain = None;
    if bytes.get(i) == Some(&b'@') {
        let domain_start = i + 1;
        i = domain_end(bytes, domain_start)?;
        domain = Some(&text[domain_start..i]);
    }
    if bytes.get(i) != Some(&b'>') {
        return None;
    }
    let path = Path {
        mailbox: &text[start..i],
        domain,
    };
    if domain.is_none() && !(kind == PathKind::Forward && path.is_bare_postmaster()) {
        return None;
    }
    Some((path, after_path(&text[i + 1..])?))
}

/// What follows `>`: nothing, or parameters after a space.
fn after_path(rest: &str) -> Option<&str> {
    match rest.as_bytes().first() {
        None => Some(rest),
        Some(b' ') => Some(&rest[1..]),
        Some(_) => None,
    }
}

/// RFC 5321 4.1.2 `Local-part = Dot-string / Quoted-string`; UTF-8 allowed (RFC 6531).
fn local_part_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    if bytes.get(i) == Some(&b'"') {
        i += 1;
        loop {
            match *bytes.get(i)? {
                b'"' => return Some(i + 1),
                b'\\' => {
                    let escaped = *bytes.get(i + 1)?;
                    if !(32..=126).contains(&escaped) {
                        return None;
                    }
                    i += 2;
                }
                b if b >= 0x80 || (32..=126).contains(&b) => i += 1,
                _ => return None,
            }
        }
    }
    let is_atext =
        |b: u8| b.is_ascii_alphanumeric() || b >= 0x80 || b"!#$%&'*+-/=?^_`{|}~".contains(&b);
    while let Some(&b) = bytes.get(i) {
        if is_atext(b) || (b == b'.' && i > start) {
            i += 1;
        } else {
            break;
        }
    }
    let local = &bytes[start..i];
    let well_formed =
        !local.is_empty() && !local.ends_with(b".") && !local.windows(2).any(|w| w == b"..");
    well_formed.then_some(i)
}

/// RFC 5321 4.1.2 `Domain / address-literal`; U-labels allowed (RFC 6531).
fn domain_end(bytes: &[u8], start: usize) -> Option<usize> {
    if bytes.get(start) == Some(&b'[') {
        let close = start + memchr::memchr(b']', &bytes[start..])?;
        let inner = &bytes[start + 1..close];
        let ok = !inner.is_empty()
            && inner
                .iter()
                .all(|&b| (33..=126).contains(&b) && b != b'[' && b != b'\\');
        return ok.then_some(close + 1);
    }
    let mut i = start;
    while let Some(&b) = bytes.get(i) {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' || b >= 0x80 {
            i += 1;
        } else {
            break;
        }
    }
    let domain = &bytes[start..i];
    let ok =
        !domain.is_empty() && !domain.starts_with(b".") && !domain.windows(2).any(|w| w == b"..");
    ok.then_some(i)
}

fn parse_mail_params(text: &str) -> Result<MailParams, ParseError> {
    let syntax = ParseError::Syntax(Verb::Mail);
    let mut params = MailParams::default();
    for param in text.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        if key.eq_ignore_ascii_case("SIZE") {
            let digits = value.filter(|v| is_number(v)).ok_or(syntax)?;
            if params.size.is_some() {
                return Err(syntax);
            }
            params.size = Some(digits.parse().unwrap_or(u64::MAX));
        } else if key.eq_ignore_ascii_case("BODY") {
            let body = match value {
                Some(v) if v.eq_ignore_ascii_case("7BIT") => Body::SevenBit,
                Some(v) if v.eq_ignore_ascii_case("8BITMIME") => Body::EightBitMime,
                _ => return Err(syntax),
            };
            if params.body.replace(body).is_some() {
                return Err(syntax);
            }
        } else if key.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() || params.smtputf8 {
                return Err(syntax);
            }
            params.smtputf8 = true;
        } else {
            return Err(ParseError::UnknownParameter(Verb::Mail));
        }
    }
    Ok(params)
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 3030 `bdat-cmd = "BDAT" SP chunk-size [ SP end-marker ] CR LF`.
fn parse_bdat(args: &[u8]) -> Option<Command<'static>> {
    let text = std::str::from_utf8(args).ok()?;
    let mut words = text.split(' ');
    let size = words.next().filter(|w| is_number(w))?.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    Some(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path<'a>(mailbox: &'a str, domain: Option<&'a str>) -> Path<'a> {
        Path { mailbox, domain }
    }

    #[test]
    fn verbs_and_simple_commands() {
        let cases: &[(&str, Result<Command<'_>, ParseError>)] = &[
            ("NOOP", Ok(Command::Noop)),
            ("noop whatever", Ok(Command::Noop)),
            ("QuIt", Ok(Command::Quit)),
            ("QUIT now", Err(ParseError::Syntax(Verb::Quit))),
            ("DATA", Ok(Command::Data)),
            ("DATA  ", Ok(Command::Data)),
            ("DATA x", Err(ParseError::Syntax(Verb::Data))),
            ("RSET", Ok(Command::Rset)),
            ("HELP", Ok(Command::Help)),
            ("VRFY root", Ok(Command::Vrfy)),
            ("VRFY", Err(ParseError::Syntax(Verb::Vrfy))),
            ("starttls", Ok(Command::StartTls)),
            ("EHLO mx.example", Ok(Command::Ehlo(b"mx.example"))),
            ("helo  [192.0.2.1] ", Ok(Command::Helo(b"[192.0.2.1]"))),
            ("EHLO", Err(ParseError::Syntax(Verb::Ehlo))),
            ("HELO ", Err(ParseError::Syntax(Verb::Helo))),
            (
                "BDAT 100",
                Ok(Command::Bdat {
                    size: 100,
                    last: false,
                }),
            ),
            (
                "bdat 0 last",
                Ok(Command::Bdat {
                    size: 0,
                    last: true,
                }),
            ),
            ("BDAT", Err(ParseError::Syntax(Verb::Bdat))),
            ("BDAT x", Err(ParseError::Syntax(Verb::Bdat))),
            ("BDAT 1 LAST x", Err(ParseError::Syntax(Verb::Bdat))),
            (
                "BDAT 99999999999999999999999",
                Err(ParseError::Syntax(Verb::Bdat)),
            ),
            ("EXPN x", Err(ParseError::UnknownCommand)),
            ("", Err(ParseError::UnknownCommand)),
            ("MAILFROM:<a@b>", Err(ParseError::UnknownCommand)),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
                Err(ParseError::UnknownCommand),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(&Command::parse(line.as_bytes()), want, "{line}");
        }
    }

    #[test]
    fn mail_and_rcpt() {
        let p = MailParams::default();
        let cases: &[(&str, Result<Command<'_>, ParseError>)] = &[
            (
                "MAIL FROM:<a@b.example>",
                Ok(Command::Mail {
                    from: path("a@b.example", Some("b.example")),
                    params: p,
                }),
            ),
            (
                "mail from:<>",
                Ok(Command::Mail {
                    from: path("", None),
                    params: p,
                }),
            ),
            (
                "MAIL FROM: <a@b>",
                Ok(Command::Mail {
                    from: path("a@b", Some("b")),
                    params: p,
                }),
            ),
            (
                "MAIL FROM:<@r1,@r2:a@b>",
                Ok(Command::Mail {
                    from: path("a@b", Some("b")),
                    params: p,
                }),
            ),
            (
                "MAIL FROM:<\"x y\"@b>",
                Ok(Command::Mail {
                    from: path("\"x y\"@b", Some("b")),
                    params: p,
                }),
            ),
            (
                "MAIL FROM:<a@[192.0.2.1]>",
                Ok(Command::Mail {
                    from: path("a@[192.0.2.1]", Some("[192.0.2.1]")),
                    params: p,
                }),
            ),
            (
                "MAIL FROM:<ü@bücher.example> SMTPUTF8",
                Ok(Command::Mail {
                    from: path("ü@bücher.example", Some("bücher.example")),
                    params: MailParams {
                        smtputf8: true,
                        ..p
                    },
                }),
            ),
            (
                "MAIL FROM:<a@b> SIZE=1000 BODY=8bitmime",
                Ok(Command::Mail {
                    from: path("a@b", Some("b")),
                    params: MailParams {
                        size: Some(1000),
                        body: Some(Body::EightBitMime),
                        smtputf8: false,
                    },
                }),
            ),
            (
                "MAIL FROM:<a@b> size=99999999999999999999",
                Ok(Command::Mail {
                    from: path("a@b", Some("b")),
                    params: MailParams {
                        size: Some(u64::MAX),
                        ..p
                    },
                }),
            ),
            (
                "MAIL FROM:<a@b> BODY=7BIT",
                Ok(Command::Mail {
                    from: path("a@b", Some("b")),
                    params: MailParams {
                        body: Some(Body::SevenBit),
                        ..p
                    },
                }),
            ),
            (
                "MAIL FROM:<a@b> SIZE=x",
                Err(ParseError::Syntax(Verb::Mail)),
            ),
            ("MAIL FROM:<a@b> SIZE", Err(ParseError::Syntax(Verb::Mail))),
            (
                "MAIL FROM:<a@b> BODY=BINARYMIME",
                Err(ParseError::Syntax(Verb::Mail)),
            ),
            (
                "MAIL FROM:<a@b> SMTPUTF8=yes",
                Err(ParseError::Syntax(Verb::Mail)),
            ),
            (
                "MAIL FROM:<a@b> SIZE=1 SIZE=2",
                Err(ParseError::Syntax(Verb::Mail)),
            ),
            (
                "MAIL FROM:<a@b> RET=HDRS",
                Err(ParseError::UnknownParameter(Verb::Mail)),
            ),
            ("MAIL FROM:a@b", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL FROM:<a@b", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL FROM:<a>", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL FROM:<a..b@c>", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL FROM:<a@b>x", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL TO:<a@b>", Err(ParseError::Syntax(Verb::Mail))),
            ("MAIL", Err(ParseError::Syntax(Verb::Mail))),
            (
                "RCPT TO:<x@y.example>",
                Ok(Command::Rcpt {
                    to: path("x@y.example", Some("y.example")),
                }),
            ),
            (
                "rcpt to:<PostMaster>",
                Ok(Command::Rcpt {
                    to: path("PostMaster", None),
                }),
            ),
            ("RCPT TO:<bob>", Err(ParseError::Syntax(Verb::Rcpt))),
            ("RCPT TO:<>", Err(ParseError::Syntax(Verb::Rcpt))),
            (
                "RCPT TO:<x@y> NOTIFY=NEVER",
                Err(ParseError::UnknownParameter(Verb::Rcpt)),
            ),
            ("RCPT FROM:<x@y>", Err(ParseError::Syntax(Verb::Rcpt))),
        ];
        for (line, want) in cases {
            assert_eq!(&Command::parse(line.as_bytes()), want, "{line}");
        }
    }

    #[test]
    fn replies_of_errors() {
        let code = |e: ParseError| {
            let r = e.reply();
            format!("{} {}", r.code, r.lines[0])
        };
        assert!(code(ParseError::UnknownCommand).starts_with("500 5.5.2"));
        assert!(code(ParseError::Syntax(Verb::Mail)).starts_with("501 5.5.4"));
        assert!(code(ParseError::UnknownParameter(Verb::Mail)).starts_with("555 5.5.4"));
    }

    #[test]
    fn routing_tricks_in_the_local_part() {
        let trick = |line: &str| match Command::parse(line.as_bytes()) {
            Ok(Command::Rcpt { to }) => (to.local_part().to_string(), to.is_routing_trick()),
            other => panic!("{line}: {other:?}"),
        };
        for (line, local, is_trick) in [
            ("RCPT TO:<user%evil.test@ours.test>", "user%evil.test", true),
            ("RCPT TO:<evil.test!user@ours.test>", "evil.test!user", true),
            (
                "RCPT TO:<\"user@evil.test\"@ours.test>",
                "\"user@evil.test\"",
                true,
            ),
            ("RCPT TO:<\"a b\"@ours.test>", "\"a b\"", false),
            ("RCPT TO:<user.name+tag@ours.test>", "user.name+tag", false),
            ("RCPT TO:<@relay.test:user@ours.test>", "user", false),
            ("RCPT TO:<Postmaster>", "Postmaster", false),
            (
                "RCPT TO:<postmaster%evil.test@ours.test>",
                "postmaster%evil.test",
                true,
            ),
        ] {
            assert_eq!(trick(line), (local.to_string(), is_trick), "{line}");
        }
    }

    #[test]
    fn verb_properties() {
        for verb in [Verb::Noop, Verb::Rset, Verb::Vrfy, Verb::Help] {
            assert!(verb.counts_as_junk() && verb.allowed_before_helo());
        }
        assert!(Verb::Quit.allowed_before_helo() && !Verb::Quit.counts_as_junk());
        assert!(!Verb::Mail.allowed_before_helo() && !Verb::StartTls.allowed_before_helo());
    }
}

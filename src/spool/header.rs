//! The header of a message as received, filtered on its way to the spool or the next hop.
//!
//! SPEC "What an accepted message carries": every `X-HELO-Check` and every
//! `Authentication-Results` field whose authserv-id is our hostname is removed, so that a client
//! cannot forge our verdict; the fields of other hosts stay (RFC 8601 5: a border MTA "MUST
//! delete or rename" fields that claim its authserv-id).
//!
//! The header's extent is read as Postfix's cleanup and RFC 5322 read it, so that what we check
//! is what the readers after us see:
//! - lines end at LF; a line that starts with a space or a tab continues the field above,
//!   a whitespace-only line too (RFC 5322 2.2.3, and Postfix and Python's email unfold it);
//! - a field starts with a name of printable ASCII but `:`, optional white space (RFC 5322
//!   4.5.8, obsolete syntax) and `:` (Postfix `is_header()`);
//! - the header ends at the first empty line, or before the first line that is neither a field
//!   nor a continuation. In that second case an empty line is written before that line, as
//!   Postfix's MIME processor does ("force output of one blank line"): every reader after us
//!   then ends the header at the same place, also the lenient ones that skip a stray line (a
//!   `From ` line, say) and read on. A message whose first line is not a field (it starts with
//!   white space, or is no `name:`) thus gets the empty line between our fields and it, and
//!   nothing it sends can continue or follow our fields as a header.
//!
//! A field is ours when a lenient reader could take its authserv-id for our hostname: comments
//! (nested) skipped, quotes and backslash escapes removed, RFC 2047 encoded words decoded (Q and
//! B, charset ignored), case ignored, trailing dots ignored, anything but printable ASCII ending
//! the name (a NUL ends a C string, a VT is white space to `isspace()`), and the obsolete domain
//! syntax (CFWS around the dots, RFC 5322 4.4) read both ways. A reader that ends lines at a
//! bare CR sees a field start after each one: a field is also ours when such a hidden field
//! is.
//!
//! Streaming: `HeaderFilter` takes the message (dot-unstuffed, CRLF line ends) in chunks of any
//! size and holds at most one field, up to `FIELD_HOLD_LIMIT` octets. A field past that bound
//! that is (or may be) ours is dropped; a foreign one is passed on as it comes. Once the header
//! is over, `feed` says where the body starts in the chunk and the body is never copied. It
//! counts the Received fields of the whole header, however long (loop detection, RFC 5321 6.3).

use memchr::memchr;

use crate::protocol::data::MAX_RECEIVED_FIELDS;

/// The fields whose copies claiming our authserv-id are removed.
const OWN_FIELDS: [&[u8]; 2] = [b"X-HELO-Check", b"Authentication-Results"];

/// The most octets of one field held while deciding about it (SPEC "Memory").
pub const FIELD_HOLD_LIMIT: usize = 64 * 1024;

/// How far into a field hidden after a bare CR its authserv-id is looked for.
const HIDDEN_FIELD_SCAN: usize = 1024;

/// Filters the header of one message fed in chunks; see the module docs.
///
/// A caller sends on, in order: for each chunk, what `feed` appended to `out`, then the chunk
/// from the index `feed` returned; at the end of the message, what `finish` appended.
#[derive(Debug)]
pub struct HeaderFilter {
    /// Our hostname, without trailing dots.
    host: Vec<u8>,
    /// Whether the header is over: the rest is body, passed on untouched.
    in_body: bool,
    /// What happens to the current field's octets.
    fate: Fate,
    /// The current field while `fate` is `Hold` (never more than `FIELD_HOLD_LIMIT` octets).
    held: Vec<u8>,
    /// How far the first line of the held field has been read.
    scan: NameScan,
    /// The next octet starts a line.
    at_line_start: bool,
    /// A passed-on field's last octet so far is a CR: the next one says whether it is bare.
    pending_cr: bool,
    /// Whether a header field has been seen (else the message began without a header).
    seen_field: bool,
    /// The message's first line was not a field: an empty line was written before it.
    began_without_header: bool,
    /// Received fields seen in the header.
    received: usize,
}

/// What happens to the octets of the current field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// No field yet: the first line opens one.
    Start,
    /// Kept in `held` until the field is complete, then passed on or dropped.
    Hold,
    /// Foreign and past the bound: passed on as it comes.
    Pass,
    /// Ours, or undecided past the bound: dropped up to the end of the field.
    Drop,
    /// A bare CR in a passed-on field: the rest of its line is dropped, its LF kept. A reader
    /// that ends lines at a bare CR could see a field of ours start there.
    Truncate,
}

/// The reading of a line's start, which decides whether it opens a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameScan {
    /// Nothing read yet.
    Start,
    /// A CR first: an empty line when LF follows.
    Cr,
    /// In the name, so many octets long.
    Name(usize),
    /// White space after a name of so many octets.
    Space(usize),
    /// The line is an empty line: the header ends after it.
    Empty,
    /// The line is not a field: the header ends before it.
    NotField,
    /// A field, with a name of so many octets.
    Field(usize),
}

impl HeaderFilter {
    /// A filter removing the fields that claim `hostname`.
    pub fn new(hostname: &str) -> Self {
        Self {
            host: without_trailing_dots(hostname.as_bytes()).to_vec(),
            in_body: false,
            fate: Fate::Start,
            held: Vec::new(),
            scan: NameScan::Start,
            at_line_start: true,
            pending_cr: false,
            seen_field: false,
            began_without_header: false,
            received: 0,
        }
    }

    /// Takes the next `chunk` of the message. Appends to `out` what is to be passed on of the
    /// header so far, and returns the index in `chunk` where the body starts: `chunk[i..]` goes
    /// on after `out`, untouched (`chunk.len()` while the header goes on).
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < chunk.len() && !self.in_body {
            if self.at_line_start {
                self.at_line_start = false;
                let folds = matches!(chunk[i], b' ' | b'\t') && self.fate != Fate::Start;
                if !folds {
                    self.end_field(out);
                    self.fate = Fate::Hold;
                    self.scan = NameScan::Start;
                }
            }
            let rest = &chunk[i..];
            let used = match self.fate {
                Fate::Start | Fate::Hold => self.hold(rest, out),
                Fate::Pass => self.pass(rest, out),
                Fate::Drop => line_len(rest),
                Fate::Truncate => self.truncate(rest, out),
            };
            i += used;
            if used > 0 && chunk[i - 1] == b'\n' && !self.in_body {
                self.at_line_start = true;
            }
        }
        i
    }

    /// The message is over: appends what is left to pass on (the last field of a message
    /// that is all header).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.in_body {
            return;
        }
        if self.fate == Fate::Hold && !self.scan.is_decided() {
            // A last line cut short before any `:` is no field.
            self.scan = NameScan::NotField;
            self.leave_header(out);
            return;
        }
        self.end_field(out);
        self.in_body = true;
    }

    /// Received fields in the header so far (all of them once the body has started).
    pub fn received(&self) -> usize {
        self.received
    }

    /// RFC 5321 6.3: more than `MAX_RECEIVED_FIELDS` Received fields; the message is refused
    /// (554 5.4.6, SPEC "SMTP dialogue").
    pub fn loop_detected(&self) -> bool {
        self.received > MAX_RECEIVED_FIELDS
    }

    /// Octets held now: at most `FIELD_HOLD_LIMIT`.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether the header is over (the rest of the message is passed on untouched).
    pub fn in_body(&self) -> bool {
        self.in_body
    }

    /// The message did not begin with a header field, and the filter wrote an empty line before
    /// it (so it is all body after our fields).
    pub fn began_without_header(&self) -> bool {
        self.began_without_header
    }

    /// Holds (part of) one line of the current field; returns the octets used.
    fn hold(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let line = &rest[..line_len(rest)];
        let mut used = 0;
        if !self.scan.is_decided() {
            while !self.scan.is_decided() && used < line.len() {
                if self.held.len() >= FIELD_HOLD_LIMIT {
                    // No `:` within the bound: no field that a reader takes for ours.
                    self.scan = NameScan::NotField;
                    break;
                }
                self.held.push(line[used]);
                self.scan = self.scan.step(line[used]);
                used += 1;
            }
            match self.scan {
                NameScan::Empty => {
                    out.append(&mut self.held);
                    self.in_body = true;
                    return used;
                }
                NameScan::NotField => {
                    self.leave_header(out);
                    return used;
                }
                NameScan::Field(len) => self.count_field(len),
                _ => return used,
            }
        }
        let tail = &line[used..];
        let room = FIELD_HOLD_LIMIT.saturating_sub(self.held.len());
        if tail.len() <= room {
            self.held.extend_from_slice(tail);
            return line.len();
        }
        self.held.extend_from_slice(&tail[..room]);
        self.overflow(out);
        used + room
    }

    /// Passes on (part of) one line of a foreign field past the bound; returns the octets used.
    fn pass(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        let line = &rest[..line_len(rest)];
        if std::mem::take(&mut self.pending_cr) && line[0] != b'\n' {
            self.fate = Fate::Truncate;
            return 0;
        }
        let mut from = 0;
        while let Some(at) = memchr(b'\r', &line[from..]) {
            let cr = from + at;
            match line.get(cr + 1) {
                Some(b'\n') => from = cr + 1,
                Some(_) => {
                    out.extend_from_slice(&line[..=cr]);
                    self.fate = Fate::Truncate;
                    return cr + 1;
                }
                None => {
                    self.pending_cr = true;
                    break;
                }
            }
        }
        out.extend_from_slice(line);
        line.len()
    }

    /// Drops the rest of a line after a bare CR, but not its LF: the field still ends there.
    fn truncate(&mut self, rest: &[u8], out: &mut Vec<u8>) -> usize {
        match memchr(b'\n', rest) {
            Some(lf) => {
                out.push(b'\n');
                self.fate = Fate::Drop;
                lf + 1
            }
            None => rest.len(),
        }
    }

    /// The held field is complete: passes it on unless it is ours.
    fn end_field(&mut self, out: &mut Vec<u8>) {
        if self.fate == Fate::Hold && !claims(&self.held, &self.host) {
            out.extend_from_slice(&self.held);
        }
        self.held.clear();
    }

    /// The held line is not a field: the header ends before it, with an empty line written
    /// in between (see the module docs); the line itself is the start of the body.
    fn leave_header(&mut self, out: &mut Vec<u8>) {
        if !self.seen_field {
            self.began_without_header = true;
        }
        out.extend_from_slice(b"\r\n");
        out.append(&mut self.held);
        self.in_body = true;
    }

    /// The held field reached the bound: passes on a foreign one from here, drops one that is
    /// or may be ours.
    fn overflow(&mut self, out: &mut Vec<u8>) {
        if may_claim(&self.held, &self.host) {
            self.fate = Fate::Drop;
            self.held.clear();
            return;
        }
        self.pending_cr = self.held.last() == Some(&b'\r');
        out.append(&mut self.held);
        self.fate = Fate::Pass;
    }

    fn count_field(&mut self, name_len: usize) {
        self.seen_field = true;
        if self.held[..name_len].eq_ignore_ascii_case(b"Received") {
            self.received += 1;
        }
    }
}

impl NameScan {
    /// Whether the line's kind is known.
    fn is_decided(self) -> bool {
        matches!(self, Self::Empty | Self::NotField | Self::Field(_))
    }

    /// Reads one more octet of a line's start (Postfix `is_header()`, plus the empty line).
    fn step(self, b: u8) -> Self {
        match (self, b) {
            (Self::Start, b'\r') => Self::Cr,
            (Self::Cr, b'\n') => Self::Empty,
            (Self::Start, b) if is_ftext(b) => Self::Name(1),
            (Self::Name(n), b) if is_ftext(b) => Self::Name(n + 1),
            (Self::Name(n) | Self::Space(n), b' ' | b'\t') => Self::Space(n),
            (Self::Name(n) | Self::Space(n), b':') => Self::Field(n),
            (Self::Empty | Self::NotField | Self::Field(_), _) => self,
            _ => Self::NotField,
        }
    }
}

/// Passes a whole message through a `HeaderFilter`: for callers that hold the message whole.
#[derive(Debug)]
pub struct Filtered<'a> {
    /// The header as it is passed on (the empty line written before a message that began
    /// without a header included); a copy, as the header is what changes.
    pub header: Vec<u8>,
    /// The rest of the message, untouched.
    pub body: &'a [u8],
    /// Received fields in the header.
    pub received: usize,
    /// More than `MAX_RECEIVED_FIELDS` Received fields.
    pub loop_detected: bool,
}

/// `content` through a `HeaderFilter` for `hostname`, in one piece.
pub fn filter_message<'a>(content: &'a [u8], hostname: &str) -> Filtered<'a> {
    let mut filter = HeaderFilter::new(hostname);
    let mut header = Vec::new();
    let body_from = filter.feed(content, &mut header);
    filter.finish(&mut header);
    Filtered {
        header,
        body: &content[body_from..],
        received: filter.received(),
        loop_detected: filter.loop_detected(),
    }
}

/// `content` as passed on: without the fields that claim `hostname`, with an empty line before
/// it when it did not begin with a header field.
pub fn strip_own_fields(content: &[u8], hostname: &str) -> Vec<u8> {
    let filtered = filter_message(content, hostname);
    let mut out = filtered.header;
    out.extend_from_slice(filtered.body);
    out
}

/// The length of the line that starts `rest`, LF included (all of `rest` when it has none).
fn line_len(rest: &[u8]) -> usize {
    memchr(b'\n', rest).map_or(rest.len(), |lf| lf + 1)
}

/// RFC 5322 3.6.8 ftext: printable ASCII but `:`.
fn is_ftext(b: u8) -> bool {
    (33..=126).contains(&b) && b != b':'
}

fn is_printable(b: u8) -> bool {
    (33..=126).contains(&b)
}

/// Whether `field` (complete, with its continuation lines) claims `host`, as the field a reader
/// sees or as one a reader that ends lines at a bare CR sees after one.
fn claims(field: &[u8], host: &[u8]) -> bool {
    claims_as_read(field, host)
        || bare_cr_ends(field).any(|start| {
            let hidden = &field[start..];
            match hidden.get(..HIDDEN_FIELD_SCAN) {
                // Scanning every hidden field to the end would cost the square of the field's
                // length; one whose authserv-id is still undecided this far is taken for ours.
                Some(window) => value_may_claim(window, host),
                None => claims_as_read(hidden, host),
            }
        })
}

/// Whether `partial`, the first `FIELD_HOLD_LIMIT` octets of a field, is or may yet be ours:
/// ours by name and with an authserv-id not yet decided (or ours), or with a bare CR, after
/// which a reader may see one of ours.
fn may_claim(partial: &[u8], host: &[u8]) -> bool {
    bare_cr_ends(partial).next().is_some() || value_may_claim(partial, host)
}

/// Whether `partial`, the start of a field, is ours by name with an authserv-id that is ours or
/// not yet decided.
fn value_may_claim(partial: &[u8], host: &[u8]) -> bool {
    let Some(value) = own_field_value(partial) else {
        return false;
    };
    id_readings(value)
        .iter()
        .any(|reading| !reading.complete || same_name(&reading.id, host))
}

/// The index after each bare CR (one followed by an octet other than LF) in `field`.
fn bare_cr_ends(field: &[u8]) -> impl Iterator<Item = usize> + '_ {
    memchr::memchr_iter(b'\r', field)
        .filter(|&cr| field.get(cr + 1).is_some_and(|&b| b != b'\n'))
        .map(|cr| cr + 1)
}

fn claims_as_read(field: &[u8], host: &[u8]) -> bool {
    let Some(value) = own_field_value(field) else {
        return false;
    };
    id_readings(value)
        .iter()
        .any(|reading| same_name(&reading.id, host))
}

/// The value (after the `:`) of `field` when it is one of `OWN_FIELDS`.
fn own_field_value(field: &[u8]) -> Option<&[u8]> {
    let name_len = field.iter().position(|&b| !is_ftext(b))?;
    let name = &field[..name_len];
    if !OWN_FIELDS.iter().any(|own| name.eq_ignore_ascii_case(own)) {
        return None;
    }
    let spaces = field[name_len..]
        .iter()
        .position(|&b| b != b' ' && b != b'\t')?;
    let colon = name_len + spaces;
    (field[colon] == b':').then(|| &field[colon + 1..])
}

/// Host names compare case-insensitively and without trailing dots (SPEC "HELO checks").
fn same_name(id: &[u8], host: &[u8]) -> bool {
    without_trailing_dots(id).eq_ignore_ascii_case(host)
}

fn without_trailing_dots(name: &[u8]) -> &[u8] {
    let len = name.iter().rposition(|&b| b != b'.').map_or(0, |i| i + 1);
    &name[..len]
}

/// One reading of the authserv-id at the start of a field value.
#[derive(Debug)]
struct IdReading {
    /// The id, unquoted, unescaped and decoded.
    id: Vec<u8>,
    /// Something after the id ended it; else the value ended first (and may go on).
    complete: bool,
}

/// Which white space an authserv-id reading reads across.
#[derive(Clone, Copy, Debug)]
struct Joins {
    /// Between two encoded words (RFC 2047 6.2: it is not part of the text).
    encoded_words: bool,
    /// Next to a dot, as in an obsolete domain (RFC 5322 4.4: CFWS around the dots).
    dots: bool,
}

/// The authserv-id (RFC 8601 2.2: `[CFWS] authserv-id`, a token or a quoted-string; our
/// X-HELO-Check's first word likewise), read up to the first white space or comment, and read
/// across the white space that encoded words or an obsolete domain may hold; readers differ.
fn id_readings(value: &[u8]) -> [IdReading; 4] {
    [(false, false), (true, false), (false, true), (true, true)].map(|(encoded_words, dots)| {
        read_id(
            value,
            Joins {
                encoded_words,
                dots,
            },
        )
    })
}

fn read_id(value: &[u8], joins: Joins) -> IdReading {
    let (raw, complete) = raw_id(value, joins);
    let id = match decode_encoded_words(&raw) {
        // What the words decode to is read again, as a reader that decodes first would.
        Some(decoded) => {
            let none = Joins {
                encoded_words: false,
                dots: false,
            };
            raw_id(&decoded, none).0
        }
        None => raw,
    };
    IdReading {
        id: name_part(&id).to_vec(),
        complete,
    }
}

/// `id` from its first printable octet to the next octet that is not printable or that a
/// reader careless of quotes takes for the end of the name (`;`, `(`, `"`): what a reader that
/// stops at a NUL, at what `isspace()` takes for white space, or at a `;` in a quoted string
/// compares.
fn name_part(id: &[u8]) -> &[u8] {
    let start = id.iter().position(|&b| is_printable(b)).unwrap_or(id.len());
    let len = id[start..]
        .iter()
        .position(|&b| !is_printable(b) || matches!(b, b';' | b'(' | b'"'))
        .unwrap_or(id.len() - start);
    &id[start..start + len]
}

/// The id's octets with quotes and escapes removed, and whether something after it ended it.
fn raw_id(value: &[u8], joins: Joins) -> (Vec<u8>, bool) {
    let mut raw = Vec::new();
    let mut i = skip_until_printable(value, 0);
    while i < value.len() {
        match value[i] {
            b'"' => i = unquote(value, i + 1, &mut raw),
            b'\\' => {
                raw.extend(value.get(i + 1));
                i += 2;
            }
            b';' => return (raw, true),
            b' ' | b'\t' | b'\r' | b'\n' | b'(' => {
                let next = skip_cfws(value, i);
                let Some(&after) = value.get(next) else {
                    return (raw, false);
                };
                // RFC 2047 6.2: white space between encoded words is not part of the text.
                let words =
                    joins.encoded_words && raw.ends_with(b"?=") && value[next..].starts_with(b"=?");
                let dots = joins.dots && (raw.ends_with(b".") || after == b'.');
                if !(words || dots) {
                    return (raw, true);
                }
                i = next;
            }
            b if is_printable(b) => {
                raw.push(b);
                i += 1;
            }
            // NUL, VT, DEL, 8-bit: a C string ends, `isspace()` is true, or no name goes on.
            _ => return (raw, true),
        }
    }
    (raw, false)
}

/// Appends the quoted-string's content from `start` (just after its opening quote) to `raw`,
/// escapes removed; returns the index after its closing quote. Octets that are not printable
/// (folding included) stay, and end the name when it is compared (`name_part`).
fn unquote(value: &[u8], start: usize, raw: &mut Vec<u8>) -> usize {
    let mut i = start;
    while i < value.len() {
        match value[i] {
            b'"' => return i + 1,
            b'\\' => {
                raw.extend(value.get(i + 1));
                i += 2;
                continue;
            }
            b => raw.push(b),
        }
        i += 1;
    }
    value.len()
}

/// The index of the first printable octet at or after `i` outside comments: before the name,
/// any other octet is taken for white space, as a lenient reader does.
fn skip_until_printable(value: &[u8], mut i: usize) -> usize {
    while i < value.len() {
        match value[i] {
            b'(' => i = skip_comment(value, i),
            b if is_printable(b) => return i,
            _ => i += 1,
        }
    }
    i
}

/// The index after the folding white space and comments at `i`.
fn skip_cfws(value: &[u8], mut i: usize) -> usize {
    while i < value.len() {
        match value[i] {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'(' => i = skip_comment(value, i),
            _ => return i,
        }
    }
    i
}

/// The index after the comment opening at `open` (RFC 5322 3.2.2: comments nest, and a
/// quoted-pair may hold a parenthesis); the end of `value` when it is not closed.
fn skip_comment(value: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    let mut i = open;
    while i < value.len() {
        match value[i] {
            b'\\' => i += 1,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    value.len()
}

/// `raw` with its RFC 2047 encoded words (`=?charset?Q|B?text?=`) decoded, charset ignored (only
/// ASCII can equal our name); `None` when it holds none.
fn decode_encoded_words(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut decoded_any = false;
    let mut i = 0;
    while i < raw.len() {
        if let Some((text, used)) = encoded_word(&raw[i..]) {
            out.extend(text);
            decoded_any = true;
            i += used;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    decoded_any.then_some(out)
}

/// The decoded text of the encoded word at the start of `s`, and its length.
fn encoded_word(s: &[u8]) -> Option<(Vec<u8>, usize)> {
    let inner = s.strip_prefix(b"=?")?;
    let charset_len = memchr(b'?', inner)?;
    let after_charset = &inner[charset_len + 1..];
    let (&encoding, after_encoding) = after_charset.split_first()?;
    let text_start = after_encoding.strip_prefix(b"?")?;
    // RFC 2047 forbids `?` in the text, but decoders that match up to the first `?=` (Python's
    // email.header, for one) take it.
    let text_len = memchr::memmem::find(text_start, b"?=")?;
    let text = &text_start[..text_len];
    let decoded = match encoding {
        b'Q' | b'q' => q_decode(text),
        b'B' | b'b' => b_decode(text),
        _ => return None,
    };
    Some((decoded, 2 + charset_len + 3 + text_len + 2))
}

/// RFC 2047 4.2: `_` is a space, `=XX` an octet in hex.
fn q_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = text.get(i + 1..i + 3).and_then(|h| {
            let high = char::from(h[0]).to_digit(16)?;
            let low = char::from(h[1]).to_digit(16)?;
            u8::try_from(high * 16 + low).ok()
        });
        match (text[i], hex) {
            (b'=', Some(octet)) => {
                out.push(octet);
                i += 3;
                continue;
            }
            (b'_', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    out
}

/// RFC 2047 4.1 (base64, RFC 4648 4); padding and stray octets are skipped, as lenient
/// decoders do.
fn b_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let mut bits = 0u32;
    let mut count = 0u32;
    for &b in text {
        let value = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "mx.example.net";

    fn strip(content: &str) -> String {
        String::from_utf8(strip_own_fields(content.as_bytes(), HOST)).expect("test input is UTF-8")
    }

    #[test]
    fn removes_own_fields_and_keeps_the_rest() {
        let msg = "Subject: hi\r\n\
                   X-HELO-Check: mx.example.net; pass helo=a ip=1.2.3.4\r\n\
                   Authentication-Results: mx.example.net; iprev=pass\r\n\
                   From: a@b\r\n\
                   \r\n\
                   body\r\n";
        assert_eq!(strip(msg), "Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n");
    }

    #[test]
    fn keeps_other_hosts_fields() {
        let msg = "Authentication-Results: other.example; iprev=pass\r\n\
                   X-HELO-Check: other.example; pass\r\n\
                   Authentication-Results: mx.example.net.evil; iprev=pass\r\n\
                   Authentication-Results: \"mx.example.net.evil\"; iprev=pass\r\n\
                   Authentication-Results: mx.example.net-x; iprev=pass\r\n\
                   \r\nbody\r\n";
        assert_eq!(strip(msg), msg);
    }

    #[test]
    fn field_names_and_authserv_id_compare_case_insensitively() {
        let msg = "authentication-results: MX.Example.NET; iprev=pass\r\n\
                   x-helo-check :mx.example.net.; fail\r\n\
                   To: c@d\r\n\r\n";
        assert_eq!(strip(msg), "To: c@d\r\n\r\n");
    }

    #[test]
    fn removes_folded_continuation_lines() {
        let msg = "Authentication-Results: mx.example.net;\r\n\
                   \tiprev=pass policy.iprev=1.2.3.4\r\n  (x.example)\r\n \r\n\
                   X-Kept: yes\r\n\
                   \tstill kept\r\n\
                   \r\nbody\r\n";
        assert_eq!(strip(msg), "X-Kept: yes\r\n\tstill kept\r\n\r\nbody\r\n");
    }

    #[test]
    fn authserv_id_may_be_folded_quoted_or_after_a_comment() {
        for field in [
            "Authentication-Results:\r\n mx.example.net; iprev=pass\r\n",
            "Authentication-Results: \"mx.example.net\"; iprev=pass\r\n",
            "Authentication-Results: (forged (nested)) mx.example.net 1; iprev=pass\r\n",
            "Authentication-Results: mx (c) . example.net; iprev=pass\r\n",
            "X-HELO-Check: mx.example.net;pass\r\n",
        ] {
            let msg = format!("{field}Subject: s\r\n\r\n");
            assert_eq!(strip(&msg), "Subject: s\r\n\r\n", "{field:?}");
        }
    }

    #[test]
    fn a_message_that_begins_without_a_field_gets_an_empty_line_before_it() {
        for msg in [
            "just a body line\r\nX-HELO-Check: mx.example.net; pass\r\n",
            " continuation first\r\nX-HELO-Check: mx.example.net; pass\r\n",
            "\tX-HELO-Check: mx.example.net; pass\r\n",
            "From a@b Mon Dec  7\r\nSubject: s\r\n",
            "no colon at all",
        ] {
            assert_eq!(strip(msg), format!("\r\n{msg}"));
            let mut filter = HeaderFilter::new(HOST);
            filter.feed(msg.as_bytes(), &mut Vec::new());
            assert!(filter.began_without_header(), "{msg:?}");
        }
    }

    #[test]
    fn an_empty_header_or_message_is_left_alone() {
        for msg in ["\r\nX-HELO-Check: mx.example.net; pass\r\n", ""] {
            assert_eq!(strip(msg), msg);
        }
    }

    #[test]
    fn a_line_that_is_no_field_ends_the_header_after_an_empty_line() {
        let msg = "Subject: s\r\nnot a field\r\nX-HELO-Check: mx.example.net; pass\r\n";
        assert_eq!(
            strip(msg),
            "Subject: s\r\n\r\nnot a field\r\nX-HELO-Check: mx.example.net; pass\r\n"
        );
    }

    #[test]
    fn a_body_line_that_looks_like_a_field_stays() {
        let msg = "Subject: s\r\n\r\nX-HELO-Check: mx.example.net; pass\r\n";
        assert_eq!(strip(msg), msg);
    }

    #[test]
    fn a_message_of_header_fields_only_without_final_line_end() {
        let msg = "Subject: s\r\nX-HELO-Check: mx.example.net; pass";
        assert_eq!(strip(msg), "Subject: s\r\n");
    }

    #[test]
    fn the_body_is_not_copied() {
        let msg = b"A: 1\r\nX-HELO-Check: mx.example.net; a\r\n\r\nbody\r\nX-HELO-Check: mx.example.net; b\r\n";
        let filtered = filter_message(msg, HOST);
        assert_eq!(filtered.header, b"A: 1\r\n\r\n");
        assert_eq!(
            filtered.body,
            b"body\r\nX-HELO-Check: mx.example.net; b\r\n"
        );
        assert!(std::ptr::eq(
            filtered.body.as_ptr(),
            msg[msg.len() - filtered.body.len()..].as_ptr()
        ));
    }

    #[test]
    fn received_fields_of_the_whole_header_are_counted() {
        let mut msg = Vec::new();
        for _ in 0..MAX_RECEIVED_FIELDS {
            msg.extend_from_slice(b"Received: from x by y; date\r\n");
            msg.extend_from_slice(&[b'X'; 1000]);
            msg.extend_from_slice(b": filler\r\n");
        }
        msg.extend_from_slice(b"received : from x\r\n\tby y; date\r\n\r\nReceived: body\r\n");
        let filtered = filter_message(&msg, HOST);
        assert_eq!(filtered.received, MAX_RECEIVED_FIELDS + 1);
        assert!(filtered.loop_detected);
        msg.insert(0, b' ');
        let fewer = filter_message(&msg, HOST);
        assert_eq!(
            fewer.received, 0,
            "a first line that is no field ends the header"
        );
    }

    #[test]
    fn a_long_foreign_field_is_passed_on_and_a_long_own_one_dropped() {
        let long = "x".repeat(FIELD_HOLD_LIMIT + 10);
        let foreign = format!("X-Long: {long}\r\n\t{long}\r\nSubject: s\r\n\r\nbody");
        assert_eq!(strip(&foreign), foreign);
        let foreign_id = format!("Authentication-Results: other.example; {long}\r\n\r\n");
        assert_eq!(strip(&foreign_id), foreign_id);
        let own =
            format!("Authentication-Results: mx.example.net; {long}\r\n\t{long}\r\nA: b\r\n\r\n");
        assert_eq!(strip(&own), "A: b\r\n\r\n");
        let undecided = format!("Authentication-Results: (c{long}) mx.example.net\r\nA: b\r\n\r\n");
        assert_eq!(strip(&undecided), "A: b\r\n\r\n");
        let long_name = format!("X{long}: v\r\nA: b\r\n\r\n");
        assert_eq!(strip(&long_name), format!("\r\n{long_name}"));
    }

    #[test]
    fn a_bare_cr_in_a_long_foreign_field_drops_the_rest_of_its_line() {
        let long = "x".repeat(FIELD_HOLD_LIMIT);
        let msg =
            format!("X-Long: {long}\rX-HELO-Check: mx.example.net; pass\r\n\tmore\r\nA: b\r\n\r\n");
        let out = strip(&msg);
        assert_eq!(out, format!("X-Long: {long}\r\nA: b\r\n\r\n"));
    }

    #[test]
    fn many_fields_hidden_after_bare_crs_cost_linear_time() {
        let mut field = b"X-Many: a".to_vec();
        while field.len() < FIELD_HOLD_LIMIT - 64 {
            field.extend_from_slice(b"\rX-HELO-Check:((");
        }
        field.extend_from_slice(b"\r\nA: b\r\n\r\n");
        // Each hidden field's comment runs to the end: undecided, so ours.
        assert_eq!(strip_own_fields(&field, HOST), b"A: b\r\n\r\n");
        let foreign = b"X-Few: a\rX-HELO-Check: other.example; pass\r\n\r\n";
        assert_eq!(strip_own_fields(foreign, HOST), foreign);
    }

    #[test]
    fn chunked_feeding_gives_the_whole_feeding_output() {
        let msg = b"Received: a\r\n b\r\nX-HELO-Check: mx.example.net; pass\r\n \r\n\
                    Authentication-Results: other; x=y\r\nFrom a b\r\nbody\r\n";
        let whole = strip_own_fields(msg, HOST);
        for size in 1..msg.len() {
            assert_eq!(feed_in_chunks(msg, size), whole, "chunks of {size}");
        }
    }

    /// Feeds `msg` in chunks of `size` octets; returns everything to pass on, in order.
    fn feed_in_chunks(msg: &[u8], size: usize) -> Vec<u8> {
        let mut filter = HeaderFilter::new(HOST);
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            let body_from = filter.feed(chunk, &mut out);
            out.extend_from_slice(&chunk[body_from..]);
        }
        filter.finish(&mut out);
        out
    }

    #[test]
    fn decodes_encoded_words() {
        assert_eq!(q_decode(b"a_b=2Ec=zz="), b"a b.c=zz=");
        assert_eq!(b_decode(b"bXguZXhhbXBsZS5uZXQ="), b"mx.example.net");
        assert_eq!(
            decode_encoded_words(b"=?a?q?mx.?==?b?B?ZXhhbXBsZS5uZXQ?=").as_deref(),
            Some(&b"mx.example.net"[..])
        );
        assert_eq!(decode_encoded_words(b"=?a?x?y?="), None);
        assert_eq!(
            decode_encoded_words(b"=?a?B?bXguZXhhbXBsZS5u?ZXQ?=").as_deref(),
            Some(&b"mx.example.net"[..])
        );
    }
}

#[cfg(test)]
mod forgery_tests {
    use super::*;
    use crate::fuzzing::check_stored_header;

    const HOST: &str = "mx.example.net";
    const OURS: [&[u8]; 3] = [
        b"Received: from a.example (a.example [192.0.2.1])\r\n\tby mx.example.net (heloguard) with ESMTP id X; date\r\n",
        b"Authentication-Results: mx.example.net; iprev=pass policy.iprev=192.0.2.1\r\n",
        b"X-HELO-Check: mx.example.net; pass helo=a.example ip=192.0.2.1\r\n",
    ];

    fn stored(client: &[u8]) -> Vec<u8> {
        let mut out = OURS.concat();
        let kept: &[u8] = &strip_own_fields(client, HOST);
        out.extend_from_slice(kept);
        out
    }

    fn assert_unforgeable(client: &[u8]) {
        if let Err(why) = check_stored_header(&stored(client), &OURS, HOST) {
            panic!("{:?}: {why}", String::from_utf8_lossy(client));
        }
    }

    const FORGED: &str = "X-HELO-Check: mx.example.net; pass\r\n\
                          Authentication-Results: mx.example.net; dkim=pass\r\n";

    #[test]
    fn a_first_line_starting_with_white_space_neither_folds_nor_hides() {
        for first in [" x\r\n", "\tx\r\n", " \r\n"] {
            assert_unforgeable(format!("{first}{FORGED}\r\nbody\r\n").as_bytes());
        }
    }

    #[test]
    fn a_whitespace_only_line_continues_the_header() {
        for line in [" \r\n", "\t\r\n", " \t \r\n", " \r\r\n"] {
            assert_unforgeable(format!("Subject: s\r\n{line}{FORGED}\r\nbody\r\n").as_bytes());
        }
    }

    #[test]
    fn a_bare_cr_does_not_end_the_header_nor_hide_a_field() {
        for msg in [
            format!("Subject: s\r\n\r{FORGED}\r\n"),
            format!("Subject: s\rX-HELO-Check: mx.example.net; pass\r\n{FORGED}\r\n"),
            format!("Subject: s\r\n\r\r\n{FORGED}\r\n"),
            "X-HELO-Check:\r mx.example.net; pass\r\n\r\n".to_string(),
        ] {
            assert_unforgeable(msg.as_bytes());
        }
    }

    #[test]
    fn a_from_line_does_not_hide_what_follows() {
        assert_unforgeable(
            format!("From a@b Mon Dec  7 02:00:00 2026\r\n{FORGED}\r\nb\r\n").as_bytes(),
        );
        assert_unforgeable(
            format!("Subject: s\r\nFrom a@b Mon Dec  7\r\n{FORGED}\r\nb\r\n").as_bytes(),
        );
    }

    #[test]
    fn a_quoted_authserv_id_with_escapes_is_ours() {
        assert_unforgeable(b"Authentication-Results: \"mx\\.example\\.net\"; dkim=pass\r\n\r\n");
        assert_unforgeable(b"Authentication-Results: mx\\.example\\.net\"; dkim=pass\r\n\r\n");
        assert_unforgeable(b"Authentication-Results: \"mx.example.net; x\" dkim=pass\r\n\r\n");
        assert_unforgeable(b"Authentication-Results: \"mx.example.net\rA: \"; dkim=pass\r\n\r\n");
        assert_unforgeable(b"X-HELO-Check: \"mx.exa\\mple.net\"; pass\r\n\r\n");
    }

    #[test]
    fn an_encoded_word_authserv_id_is_ours() {
        for id in [
            "=?us-ascii?q?mx.example.net?=",
            "=?utf-8?Q?mx=2Eexample=2Enet?=",
            "=?us-ascii?b?bXguZXhhbXBsZS5uZXQ=?=",
            "=?UTF-8*en?B?bXguZXhhbXBsZS5uZXQ?=",
            "=?a?q?mx.?= =?b?q?example.net?=",
            "=?a?q?mx.example.net?= =?b?q?junk=?",
        ] {
            assert_unforgeable(
                format!("Authentication-Results: {id}; dkim=pass\r\n\r\n").as_bytes(),
            );
            assert_unforgeable(format!("X-HELO-Check: {id}; pass\r\n\r\n").as_bytes());
        }
    }

    #[test]
    fn an_octet_outside_printable_ascii_ends_the_authserv_id() {
        for after in ["\0", "\x0b", "\x0c", "\x7f", "\u{a0}"] {
            assert_unforgeable(
                format!("Authentication-Results: mx.example.net{after}; dkim=pass\r\n\r\n")
                    .as_bytes(),
            );
            assert_unforgeable(
                format!("X-HELO-Check: mx.example.net{after}pass\r\n\r\n").as_bytes(),
            );
        }
    }

    #[test]
    fn comments_before_the_authserv_id_are_skipped() {
        for value in [
            "(c) mx.example.net; dkim=pass",
            "(a (nested \\) one)) mx.example.net; dkim=pass",
            "(c)mx.example.net;dkim=pass",
            "\x0b(c)\r\n (d) mx.example.net; dkim=pass",
        ] {
            assert_unforgeable(format!("Authentication-Results: {value}\r\n\r\n").as_bytes());
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use crate::fuzzing::header_input;

    /// Pieces of header text that come near the edges: our fields disguised, folding, lines
    /// that are no fields, bare CRs and LFs.
    const PIECES: &[&str] = &[
        "X-HELO-Check: mx.example.net; pass\r\n",
        "Authentication-Results: mx.example.net; dkim=pass\r\n",
        "authentication-results :(c (d)) \"MX\\.example.net.\" 1;\r\n",
        "X-HELO-Check: =?us-ascii?q?mx.example.net?=; pass\r\n",
        "Authentication-Results: =?x?B?bXguZXhhbXBsZS5uZXQ=?=\r\n",
        "X-HELO-Check: mx.example.net\0; pass\r\n",
        "Authentication-Results: other.example; x=y\r\n",
        "X-HELO-Check:",
        "Authentication-Results:",
        " mx.example.net",
        "mx.example.net",
        "; pass",
        "Subject: s\r\n",
        "Received: from x\r\n",
        "From a@b Mon\r\n",
        " folded\r\n",
        "\tfolded\r\n",
        " \r\n",
        "\t\r\n",
        "\r\n",
        "\r",
        "\n",
        ":\r\n",
        "(",
        ")",
        "\"",
        "body\r\n",
    ];

    fn message() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            4 => prop::sample::select(PIECES).prop_map(|p| p.as_bytes().to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..6),
            1 => prop::collection::vec(prop::sample::select(b" \t\r\n:;(\"\\=?.Xx".to_vec()), 0..6),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// After our fields, no reading of the stored header finds a field claiming our name
        /// or client text folded into ours, and any chunking gives the same output.
        #[test]
        fn no_reading_finds_a_forged_field(seed in any::<u8>(), msg in message()) {
            let mut data = vec![seed];
            data.extend_from_slice(&msg);
            header_input(&data);
        }

        #[test]
        fn arbitrary_bytes_keep_every_invariant(
            data in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            header_input(&data);
        }
    }
}

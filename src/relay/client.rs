//! The sans-I/O next-hop client: one SMTP or LMTP connection, driven by the event loop.
//!
//! Setup, one step at a time (each waits for its reply):
//! greeting 220 -> EHLO (LHLO for LMTP; HELO after 500/502, SMTP only) -> STARTTLS when
//! offered and `can_tls` -> [handshake by the loop] -> EHLO -> XCLIENT when offered -> EHLO.
//! Calls made before setup is done are queued and sent once it is. After setup, commands are
//! pipelined when the next hop advertises PIPELINING (RFC 2920), else sent one at a time.

use std::collections::VecDeque;
use std::fmt::Write as _;

use super::xclient::xclient_commands;
use super::{
    EightBit, MAX_REPLY_LINE, MAX_REPLY_LINES, NextHopProtocol, RelayClientParams, RelayError,
    RelayEvent, RelayOutput, XclientAttrs,
};
use crate::protocol::command::{Body, MailParams};
use crate::protocol::reply::Reply;

/// The greeting command in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hello {
    Ehlo,
    Lhlo,
    Helo,
}

impl Hello {
    const fn verb(self) -> &'static str {
        match self {
            Hello::Ehlo => "EHLO",
            Hello::Lhlo => "LHLO",
            Hello::Helo => "HELO",
        }
    }
}

/// How far the next-hop connection is set up: greeting, EHLO/LHLO, STARTTLS, XCLIENT, then
/// ready for transactions (or closed, or failed).
#[derive(Debug)]
enum Setup {
    /// Waiting for the 220 greeting (RFC 5321 3.1).
    Greeting,
    Hello(Hello),
    StartTls,
    /// 220 to STARTTLS seen; the loop is doing the handshake.
    AwaitTls,
    /// XCLIENT sent; the commands still to send if the attributes did not fit in one line.
    Xclient(VecDeque<String>),
    Ready,
    /// QUIT answered, or given up before setup was done.
    Closed,
    Failed(RelayError),
}

/// What the next hop's last EHLO/LHLO reply advertised (RFC 5321 4.1.1.1). Empty after HELO.
#[derive(Debug, Default)]
struct Extensions {
    pipelining: bool,
    size: bool,
    eight_bit_mime: bool,
    smtputf8: bool,
    starttls: bool,
    /// The attribute names listed after the XCLIENT keyword, upper case.
    xclient: Option<Vec<String>>,
}

impl Extensions {
    fn parse(reply: &Reply) -> Self {
        let mut ext = Extensions::default();
        // The first line is the domain and greeting text; each further line is
        // `ehlo-keyword *(SP ehlo-param)` (RFC 5321 4.1.1.1).
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = true,
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "XCLIENT" => {
                    ext.xclient = Some(words.map(|w| w.to_ascii_uppercase()).collect());
                }
                _ => {}
            }
        }
        ext
    }
}

/// A call not yet written to the wire.
#[derive(Debug)]
enum Op {
    Mail {
        reverse_path: String,
        params: MailParams,
    },
    Rcpt(String),
    Data,
    /// Dot-stuffed message bytes.
    Chunk(Vec<u8>),
    /// The end-of-data sequence, with a CRLF in front when the content lacked one.
    EndData(&'static [u8]),
    Rset,
    Quit,
}

/// A command written, its reply awaited (in order: RFC 2920 3.1, replies come in the order
/// of the commands).
#[derive(Debug)]
enum Await {
    Mail,
    Rcpt,
    Data,
    /// LMTP: one reply per accepted recipient (RFC 2033 4.2); SMTP: one.
    EndData {
        remaining: usize,
    },
    Rset,
    Quit,
    /// A command refused here without being sent (e.g. a UTF-8 address for a next hop
    /// without SMTPUTF8): its reply is given in turn, after those of the commands before it.
    Local(Reply),
}

impl Await {
    /// RFC 2920 3.1: DATA and QUIT end a pipelined group, and so does the end of the data
    /// (we wait for the message's verdict before the next transaction).
    const fn ends_group(&self) -> bool {
        matches!(self, Await::Data | Await::EndData { .. } | Await::Quit)
    }
}

/// The next-hop client. See the module documentation.
#[derive(Debug)]
pub(crate) struct RelayClient {
    params: RelayClientParams,
    setup: Setup,
    ext: Extensions,
    tls_done: bool,
    xclient_done: bool,
    used_xclient: bool,
    /// A multi-line reply being collected.
    partial: Option<Reply>,
    queue: VecDeque<Op>,
    inflight: VecDeque<Await>,
    /// Caller side: `data()` was called and `end_data()` not yet.
    in_data: bool,
    /// Wire side: 354 seen and the end of data not yet written.
    data_open: bool,
    /// DATA was refused while the caller was in DATA: its chunks are dropped and its
    /// `end_data()` is answered with this reply.
    data_refused: Option<Reply>,
    /// Dot-stuffing state across `data_chunk()` calls.
    at_line_start: bool,
    last_cr: bool,
    /// RCPT commands of the current transaction that got 2yz.
    accepted_rcpts: usize,
}

impl RelayClient {
    pub(crate) fn new(params: RelayClientParams) -> Self {
        Self {
            params,
            setup: Setup::Greeting,
            ext: Extensions::default(),
            tls_done: false,
            xclient_done: false,
            used_xclient: false,
            partial: None,
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            in_data: false,
            data_open: false,
            data_refused: None,
            at_line_start: true,
            last_cr: false,
            accepted_rcpts: 0,
        }
    }

    /// Bytes from the next hop (plaintext; after TLS the loop decrypts first). Returns how
    /// many were used: a partial reply line stays with the caller for the next call. Once the
    /// connection has failed or closed, everything is used and ignored.
    pub(crate) fn receive(&mut self, input: &[u8], out: &mut RelayOutput) -> usize {
        let mut used = 0;
        while used < input.len() {
            if self.is_dead() {
                return input.len();
            }
            if matches!(self.setup, Setup::AwaitTls) {
                // RFC 3207 6: the client MUST discard what the server said before TLS; bytes
                // pipelined after the 220 are either garbage or an injection attempt.
                self.fail(RelayError::DataAfterStartTls, false, out);
                return input.len();
            }
            let rest = &input[used..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                if rest.len() >= MAX_REPLY_LINE {
                    self.fail(RelayError::LineTooLong, false, out);
                    return input.len();
                }
                break;
            };
            if lf + 1 > MAX_REPLY_LINE {
                self.fail(RelayError::LineTooLong, false, out);
                return input.len();
            }
            let line = &rest[..lf];
            // A bare LF is taken as a line end too, as Postfix's smtp client does.
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            used += lf + 1;
            self.on_line(line, out);
        }
        used
    }

    pub(crate) fn tls_established(&mut self, out: &mut RelayOutput) {
        if !matches!(self.setup, Setup::AwaitTls) {
            return;
        }
        // RFC 3207 4.2: "the client MUST discard any knowledge obtained from the server, such
        // as the list of SMTP service extensions, which was not obtained from the TLS
        // negotiation itself. The client SHOULD send an EHLO command as the first command".
        self.tls_done = true;
        self.ext = Extensions::default();
        self.send_hello(out);
    }

    /// The TLS handshake failed: the connection is half in TLS and cannot go on in plaintext.
    pub(crate) fn tls_failed(&mut self, out: &mut RelayOutput) {
        if !self.is_dead() {
            self.fail(RelayError::TlsHandshake, false, out);
        }
    }

    /// `MAIL FROM:<reverse_path>`; `reverse_path` is the mailbox without angle brackets,
    /// empty for the null path. SIZE, BODY and SMTPUTF8 are replayed only to a next hop that
    /// advertised SIZE (RFC 1870), 8BITMIME (RFC 6152) and SMTPUTF8 (RFC 6531); a UTF-8
    /// address for a next hop without SMTPUTF8 is answered 553 5.6.7 here (RFC 6531 3.5),
    /// never sent.
    pub(crate) fn mail(&mut self, reverse_path: &str, params: &MailParams, out: &mut RelayOutput) {
        if !self.begin_call(true, out) {
            return;
        }
        if !is_single_line(reverse_path) {
            self.fail(RelayError::Misuse("line break in a path"), false, out);
            return;
        }
        self.push(
            Op::Mail {
                reverse_path: reverse_path.to_string(),
                params: *params,
            },
            out,
        );
    }

    /// `RCPT TO:<forward_path>`; `forward_path` without angle brackets.
    pub(crate) fn rcpt(&mut self, forward_path: &str, out: &mut RelayOutput) {
        if !self.begin_call(true, out) {
            return;
        }
        if !is_single_line(forward_path) {
            self.fail(RelayError::Misuse("line break in a path"), false, out);
            return;
        }
        self.push(Op::Rcpt(forward_path.to_string()), out);
    }

    /// DATA; its reply is 354 when the next hop is ready for the content.
    pub(crate) fn data(&mut self, out: &mut RelayOutput) {
        if !self.begin_call(true, out) {
            return;
        }
        self.in_data = true;
        self.at_line_start = true;
        self.last_cr = false;
        self.push(Op::Data, out);
    }

    /// Message bytes (dot-unstuffed, CRLF lines) after a 354; lines may be split across
    /// calls. Bytes given before the 354 arrives are held until it does.
    pub(crate) fn data_chunk(&mut self, bytes: Vec<u8>, out: &mut RelayOutput) {
        if self.is_dead() || self.data_refused.is_some() || bytes.is_empty() {
            return;
        }
        if !self.in_data {
            // Outside DATA these bytes would be read as commands by the next hop.
            self.fail(RelayError::Misuse("message data outside DATA"), false, out);
            return;
        }
        let stuffed = self.dot_stuff(bytes);
        self.push(Op::Chunk(stuffed), out);
    }

    /// RFC 5321 4.5.2: "Before sending a line of mail text, the SMTP client checks the first
    /// character of the line. If it is a period, one additional period is inserted at the
    /// beginning of the line." The line-start state survives across calls. Lines are found
    /// with memchr and copied as slices; content with no line starting with a period (nearly
    /// all of it) is passed on as it is, uncopied.
    fn dot_stuff(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        let leading = self.at_line_start && bytes.first() == Some(&b'.');
        self.at_line_start = bytes.last() == Some(&b'\n');
        self.last_cr = bytes.last() == Some(&b'\r');
        let mut stuff_at = memchr::memmem::find_iter(&bytes, b"\n.").map(|lf| lf + 1);
        let Some(first) = leading.then_some(0).or_else(|| stuff_at.next()) else {
            return bytes;
        };
        let mut stuffed = Vec::with_capacity(bytes.len() + 16);
        let mut from = 0;
        for at in std::iter::once(first).chain(stuff_at) {
            stuffed.extend_from_slice(&bytes[from..at]);
            stuffed.push(b'.');
            from = at;
        }
        stuffed.extend_from_slice(&bytes[from..]);
        stuffed
    }

    /// Ends the data with CRLF.CRLF (RFC 5321 4.1.1.4), adding the CRLF that ends the last
    /// line if the content did not end with one; or, when the message holds what this next
    /// hop did not say it takes (SPEC "Relay modes": UTF-8 in the header without SMTPUTF8,
    /// 8-bit octets without 8BITMIME), returns the refusal for the client and sends nothing:
    /// the caller then drops the connection, the only way out of DATA without the final dot.
    pub(crate) fn end_data(
        &mut self,
        eight_bit: EightBit,
        out: &mut RelayOutput,
    ) -> Result<(), Reply> {
        if let Some(reply) = self.data_refused.take() {
            out.events.push(RelayEvent::Reply(reply));
            return Ok(());
        }
        if let Some(reply) = self.dead_reply() {
            out.events.push(RelayEvent::Failed(reply));
            return Ok(());
        }
        if !self.in_data {
            self.fail(RelayError::Misuse("end of data outside DATA"), false, out);
            return Ok(());
        }
        if let Some(refusal) = self.refusal_of(eight_bit) {
            self.queue.clear();
            self.inflight.clear();
            self.in_data = false;
            self.data_open = false;
            self.setup = Setup::Failed(RelayError::Abandoned);
            return Err(refusal);
        }
        self.in_data = false;
        let end: &'static [u8] = if self.at_line_start {
            b".\r\n"
        } else if self.last_cr {
            b"\n.\r\n"
        } else {
            b"\r\n.\r\n"
        };
        self.push(Op::EndData(end), out);
        Ok(())
    }

    /// Why this next hop cannot take a message holding `eight_bit`, if it cannot.
    fn refusal_of(&self, eight_bit: EightBit) -> Option<Reply> {
        if eight_bit.header && !self.ext.smtputf8 {
            // RFC 6532 3.7 / RFC 6531 3.7.4: UTF-8 header fields need SMTPUTF8 all the way.
            return Some(Reply::new(
                554,
                "5.6.9",
                "Message refused: UTF-8 in the header, and the next hop does not offer SMTPUTF8",
            ));
        }
        if eight_bit.any() && !self.ext.eight_bit_mime {
            // RFC 6152 3: 8-bit content only to a server that offered 8BITMIME; nothing is
            // converted on the way.
            return Some(Reply::new(
                554,
                "5.6.3",
                "Message refused: 8-bit content, and the next hop does not offer 8BITMIME",
            ));
        }
        None
    }

    /// RSET between transactions; a 2yz reply is consumed silently, anything else fails the
    /// connection (its transaction state would be unknown).
    pub(crate) fn rset(&mut self, out: &mut RelayOutput) {
        if !self.begin_call(false, out) {
            return;
        }
        self.push(Op::Rset, out);
    }

    /// QUIT after whatever is outstanding. Before setup is done with nothing queued, there is
    /// no point in finishing it: the client just closes.
    pub(crate) fn quit(&mut self, out: &mut RelayOutput) {
        if !self.begin_call(false, out) {
            return;
        }
        if !matches!(self.setup, Setup::Ready) && self.queue.is_empty() {
            self.setup = Setup::Closed;
            return;
        }
        self.push(Op::Quit, out);
    }

    /// Setup (greeting, EHLO/HELO, STARTTLS, XCLIENT) is complete and the connection usable.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.setup, Setup::Ready)
    }

    /// No call awaits an answer and no DATA is open (setup may still be in progress).
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty() && !self.in_data && !self.data_open
    }

    /// This connection carried XCLIENT, so it speaks for one client and is never reused for
    /// another.
    #[cfg(test)]
    pub(crate) fn used_xclient(&self) -> bool {
        self.used_xclient
    }

    /// Why the connection failed, for logging.
    #[cfg(test)]
    pub(crate) fn error(&self) -> Option<&RelayError> {
        match &self.setup {
            Setup::Failed(e) => Some(e),
            _ => None,
        }
    }

    fn is_dead(&self) -> bool {
        matches!(self.setup, Setup::Failed(_) | Setup::Closed)
    }

    fn dead_reply(&self) -> Option<Reply> {
        match &self.setup {
            Setup::Failed(e) => Some(e.reply()),
            Setup::Closed => Some(RelayError::Closed.reply()),
            _ => None,
        }
    }

    /// Common checks of a command call; false when the call must not go on. `answered`: the
    /// call expects an event (MAIL, RCPT, DATA), which a dead connection still gives.
    fn begin_call(&mut self, answered: bool, out: &mut RelayOutput) -> bool {
        if let Some(reply) = self.dead_reply() {
            if answered {
                out.events.push(RelayEvent::Failed(reply));
            }
            return false;
        }
        if self.in_data {
            // Any command now would be read as message content (RFC 5321 4.1.1.4): the only
            // way out of an open DATA without the final dot is to drop the connection.
            self.fail(RelayError::Misuse("command while DATA is open"), false, out);
            return false;
        }
        // The caller moved on from a refused DATA without calling end_data().
        self.data_refused = None;
        true
    }

    fn push(&mut self, op: Op, out: &mut RelayOutput) {
        self.queue.push_back(op);
        self.flush(out);
    }

    /// Writes what may be written now.
    fn flush(&mut self, out: &mut RelayOutput) {
        if !matches!(self.setup, Setup::Ready) {
            return;
        }
        while let Some(op) = self.queue.front() {
            match op {
                Op::Chunk(_) | Op::EndData(_) => {
                    // RFC 5321 4.1.1.4: the content goes only after the 354.
                    if !self.data_open {
                        break;
                    }
                }
                _ => {
                    // RFC 2920 3.1: without PIPELINING, wait for each reply; with it, still
                    // wait after a command that ends a group.
                    if let Some(last) = self.inflight.back()
                        && (!self.ext.pipelining || last.ends_group())
                    {
                        break;
                    }
                }
            }
            let Some(op) = self.queue.pop_front() else {
                break;
            };
            self.send(op, out);
            self.settle_local(out);
        }
    }

    /// Gives the replies of locally refused commands that are next in line.
    fn settle_local(&mut self, out: &mut RelayOutput) {
        while matches!(self.inflight.front(), Some(Await::Local(_))) {
            if let Some(Await::Local(reply)) = self.inflight.pop_front() {
                out.events.push(RelayEvent::Reply(reply));
            }
        }
    }

    fn send(&mut self, op: Op, out: &mut RelayOutput) {
        let awaited = match op {
            Op::Mail {
                reverse_path,
                params,
            } => {
                if let Some(refusal) = self.utf8_address_refusal(&reverse_path) {
                    refusal
                } else {
                    let line = self.mail_line(&reverse_path, &params);
                    write_command(out, &line);
                    Await::Mail
                }
            }
            Op::Rcpt(path) => {
                if let Some(refusal) = self.utf8_address_refusal(&path) {
                    refusal
                } else {
                    write_command(out, &format!("RCPT TO:<{path}>"));
                    Await::Rcpt
                }
            }
            Op::Data => {
                write_command(out, "DATA");
                Await::Data
            }
            Op::Chunk(bytes) => {
                if out.bytes.is_empty() {
                    out.bytes = bytes;
                } else {
                    out.bytes.extend_from_slice(&bytes);
                }
                return;
            }
            Op::EndData(end) => {
                out.bytes.extend_from_slice(end);
                self.data_open = false;
                let remaining = match self.params.protocol {
                    NextHopProtocol::Smtp => 1,
                    // RFC 2033 4.2: "one reply for each successful RCPT command". Every RCPT
                    // reply came before the 354, so the count is complete. At least one, in
                    // case a next hop wrongly accepted DATA with no recipient.
                    NextHopProtocol::Lmtp => self.accepted_rcpts.max(1),
                };
                Await::EndData { remaining }
            }
            Op::Rset => {
                write_command(out, "RSET");
                Await::Rset
            }
            Op::Quit => {
                write_command(out, "QUIT");
                Await::Quit
            }
        };
        self.inflight.push_back(awaited);
    }

    /// RFC 6531 3.5: a UTF-8 address goes only to a server that offered SMTPUTF8; without it,
    /// 553 5.6.7 (RFC 6531 3.6.3) instead of sending it, or a downgraded copy of it.
    fn utf8_address_refusal(&self, path: &str) -> Option<Await> {
        (!path.is_ascii() && !self.ext.smtputf8).then(|| {
            Await::Local(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address, and the next hop does not offer SMTPUTF8",
            ))
        })
    }

    fn mail_line(&self, reverse_path: &str, params: &MailParams) -> String {
        let mut line = format!("MAIL FROM:<{reverse_path}>");
        // Writing to a String cannot fail.
        if let (true, Some(size)) = (self.ext.size, params.size) {
            let _ = write!(line, " SIZE={size}");
        }
        if let (true, Some(body)) = (self.ext.eight_bit_mime, params.body) {
            line.push_str(match body {
                Body::SevenBit => " BODY=7BIT",
                Body::EightBitMime => " BODY=8BITMIME",
            });
        }
        if self.ext.smtputf8 && params.smtputf8 {
            line.push_str(" SMTPUTF8");
        }
        line
    }

    fn send_hello(&mut self, out: &mut RelayOutput) {
        let hello = match self.params.protocol {
            NextHopProtocol::Smtp => Hello::Ehlo,
            // RFC 2033 4.1: LHLO replaces EHLO, and there is no HELO.
            NextHopProtocol::Lmtp => Hello::Lhlo,
        };
        self.write_hello(hello, out);
    }

    fn write_hello(&mut self, hello: Hello, out: &mut RelayOutput) {
        let line = format!("{} {}", hello.verb(), self.hello_name());
        write_command(out, &line);
        self.setup = Setup::Hello(hello);
    }

    /// HELOGUARD_HOSTNAME, until XCLIENT made the session the client's: from then on the
    /// client's HELO name (or its address literal), which XCLIENT_README's proxy sends and
    /// which the next hop logs and checks as the client's HELO.
    fn hello_name(&self) -> String {
        if !self.used_xclient {
            return self.params.hostname.clone();
        }
        let name = &self.params.xclient.greeting_name;
        let usable =
            !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic());
        if usable {
            name.clone()
        } else {
            XclientAttrs::address_literal(self.params.xclient.addr)
        }
    }

    fn on_line(&mut self, line: &[u8], out: &mut RelayOutput) {
        let Some((code, last, text)) = parse_reply_line(line) else {
            self.fail(RelayError::Malformed, false, out);
            return;
        };
        let reply = self.partial.get_or_insert_with(|| Reply {
            code,
            lines: Vec::new(),
        });
        // RFC 5321 4.2.1: every line of a multi-line reply carries the same code.
        if reply.code != code {
            self.fail(RelayError::Malformed, false, out);
            return;
        }
        reply.lines.push(text);
        if reply.lines.len() > MAX_REPLY_LINES {
            self.fail(RelayError::TooManyLines, false, out);
            return;
        }
        if last && let Some(reply) = self.partial.take() {
            self.on_reply(reply, out);
        }
    }

    fn on_reply(&mut self, reply: Reply, out: &mut RelayOutput) {
        match &mut self.setup {
            Setup::Greeting => {
                if reply.code == 220 {
                    self.send_hello(out);
                } else {
                    // RFC 5321 3.1: after a 554 greeting "the client SHOULD send QUIT".
                    self.fail(RelayError::Greeting(reply), true, out);
                }
            }
            Setup::Hello(hello) => {
                let hello = *hello;
                self.on_hello_reply(hello, reply, out);
            }
            Setup::StartTls => {
                if reply.code == 220 {
                    self.setup = Setup::AwaitTls;
                    out.events.push(RelayEvent::StartTls);
                } else {
                    self.fail(RelayError::StartTls(reply), true, out);
                }
            }
            Setup::AwaitTls => self.fail(RelayError::DataAfterStartTls, false, out),
            Setup::Xclient(rest) => {
                // XCLIENT_README: success is the 220 greeting of a fresh session (any 2yz is
                // taken as success, as Postfix's smtpd proxy client does).
                if reply.code / 100 != 2 {
                    self.fail(RelayError::Xclient(reply), true, out);
                } else if let Some(next) = rest.pop_front() {
                    write_command(out, &next);
                } else {
                    // XCLIENT_README: the server resets its state, so the client greets again
                    // and learns the extensions afresh.
                    self.ext = Extensions::default();
                    self.send_hello(out);
                }
            }
            Setup::Ready => self.on_transaction_reply(reply, out),
            Setup::Closed | Setup::Failed(_) => {}
        }
    }

    fn on_hello_reply(&mut self, hello: Hello, reply: Reply, out: &mut RelayOutput) {
        if reply.code == 250 {
            self.ext = match hello {
                // RFC 5321 4.1.1.1: HELO offers no extensions.
                Hello::Helo => Extensions::default(),
                Hello::Ehlo | Hello::Lhlo => Extensions::parse(&reply),
            };
            self.after_hello(out);
        } else if hello == Hello::Ehlo
            && matches!(reply.code, 500 | 502)
            && !self.tls_done
            && !self.xclient_done
        {
            // RFC 5321 3.2: "If the EHLO command is not acceptable to the SMTP server, 501,
            // 500, 502, or 550 failure replies MUST be returned ... the client SHOULD fall
            // back to HELO" when it did not understand EHLO (500/502); 501/550 refuse us.
            self.write_hello(Hello::Helo, out);
        } else {
            self.fail(RelayError::Hello(reply), true, out);
        }
    }

    fn after_hello(&mut self, out: &mut RelayOutput) {
        // STARTTLS before XCLIENT, so that the client's identity travels encrypted.
        if self.params.can_tls && !self.tls_done && self.ext.starttls {
            write_command(out, "STARTTLS");
            self.setup = Setup::StartTls;
            return;
        }
        if !self.xclient_done {
            self.xclient_done = true;
            let offered = self.ext.xclient.as_deref().unwrap_or_default();
            let mut commands = xclient_commands(&self.params.xclient, offered);
            if let Some(first) = commands.pop_front() {
                write_command(out, &first);
                self.used_xclient = true;
                self.setup = Setup::Xclient(commands);
                return;
            }
            out.events.push(RelayEvent::XclientUnavailable);
        }
        self.setup = Setup::Ready;
        self.flush(out);
    }

    fn on_transaction_reply(&mut self, reply: Reply, out: &mut RelayOutput) {
        let class = reply.code / 100;
        let Some(awaited) = self.inflight.front_mut() else {
            // Nothing asked for it (e.g. a 421 on idle timeout).
            self.fail(RelayError::Unexpected(reply), false, out);
            return;
        };
        if matches!(awaited, Await::Quit) {
            self.inflight.clear();
            self.setup = Setup::Closed;
            return;
        }
        if reply.code == 421 {
            // RFC 5321 3.8: the server closes the channel after 421; every outstanding call
            // gets our 451 from the loop.
            self.fail(RelayError::ServiceClosing(reply), false, out);
            return;
        }
        // Codes that answer the command at all: a 250 to DATA or a 354 to MAIL would make
        // the client believe something happened that did not.
        let fits = match awaited {
            Await::Data => reply.code == 354 || class == 4 || class == 5,
            _ => matches!(class, 2 | 4 | 5),
        };
        if !fits {
            self.fail(RelayError::Unexpected(reply), false, out);
            return;
        }
        match awaited {
            Await::Mail => {
                self.inflight.pop_front();
                self.accepted_rcpts = 0;
                out.events.push(RelayEvent::Reply(reply));
            }
            Await::Rcpt => {
                self.inflight.pop_front();
                if class == 2 {
                    self.accepted_rcpts += 1;
                }
                out.events.push(RelayEvent::Reply(reply));
            }
            Await::Data => {
                self.inflight.pop_front();
                if reply.code == 354 {
                    self.data_open = true;
                    out.events.push(RelayEvent::Reply(reply));
                } else {
                    self.data_refused(reply, out);
                }
            }
            Await::EndData { remaining } => {
                *remaining -= 1;
                if *remaining == 0 {
                    self.inflight.pop_front();
                    self.accepted_rcpts = 0;
                }
                out.events.push(RelayEvent::Reply(reply));
            }
            Await::Rset => {
                self.inflight.pop_front();
                if class != 2 {
                    self.fail(RelayError::Rset(reply), true, out);
                    return;
                }
                self.accepted_rcpts = 0;
            }
            Await::Quit | Await::Local(_) => {}
        }
        self.settle_local(out);
        self.flush(out);
    }

    /// DATA refused: the content queued behind it is dropped, and `end_data()` (now, if it
    /// was already called, or later) gets the same reply.
    fn data_refused(&mut self, reply: Reply, out: &mut RelayOutput) {
        out.events.push(RelayEvent::Reply(reply.clone()));
        let mut ended = false;
        while let Some(op) = self.queue.front() {
            match op {
                Op::Chunk(_) => {}
                Op::EndData(_) => ended = true,
                _ => break,
            }
            self.queue.pop_front();
            if ended {
                break;
            }
        }
        if ended {
            out.events.push(RelayEvent::Reply(reply));
        } else if self.in_data {
            self.in_data = false;
            self.data_refused = Some(reply);
        }
    }

    fn fail(&mut self, err: RelayError, quit: bool, out: &mut RelayOutput) {
        if quit {
            write_command(out, "QUIT");
        }
        out.events.push(RelayEvent::Failed(err.reply()));
        self.queue.clear();
        self.inflight.clear();
        self.partial = None;
        self.in_data = false;
        self.data_open = false;
        self.data_refused = None;
        self.setup = Setup::Failed(err);
    }
}

fn write_command(out: &mut RelayOutput, line: &str) {
    out.bytes.extend_from_slice(line.as_bytes());
    out.bytes.extend_from_slice(b"\r\n");
}

fn is_single_line(s: &str) -> bool {
    !s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// One reply line (RFC 5321 4.2): `Reply-code [ SP textstring ]` or `Reply-code "-" text`,
/// with Reply-code = %x32-35 %x30-35 %x30-39. Returns the code, whether this is the last
/// line, and the text with anything but printable ASCII replaced by `?` (it may be passed on
/// to our client, whose reply must stay one clean line).
fn parse_reply_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let [a, b, c, rest @ ..] = line else {
        return None;
    };
    if !(b'2'..=b'5').contains(a) || !(b'0'..=b'5').contains(b) || !c.is_ascii_digit() {
        return None;
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    let (last, text) = match rest {
        [] => (true, &[][..]),
        [b' ', text @ ..] => (true, text),
        [b'-', text @ ..] => (false, text),
        _ => return None,
    };
    let text = text
        .iter()
        .map(|&b| {
            if (0x20..=0x7e).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect();
    Some((code, last, text))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::protocol::MAX_COMMAND_LINE;
    use crate::relay::{XclientAttrs, XclientName};

    /// One step of a conversation with a scripted next hop.
    #[derive(Clone, Copy)]
    enum Act {
        /// The next hop sends these bytes; all must be used.
        Recv(&'static str),
        Mail(&'static str, MailParams),
        Rcpt(&'static str),
        Data,
        Chunk(&'static str),
        End,
        Rset,
        Quit,
        TlsOk,
        TlsFail,
    }
    use Act::*;

    /// (what happens, the exact bytes we send, the events as `R code text|text`,
    /// `F code text` or `TLS`).
    type Step = (Act, &'static str, &'static [&'static str]);

    fn params(protocol: NextHopProtocol, can_tls: bool) -> RelayClientParams {
        RelayClientParams {
            hostname: "mx.heloguard.test".into(),
            protocol,
            xclient: XclientAttrs {
                addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                port: None,
                name: XclientName::Name("mail.example.org".into()),
                helo: Some("mail.example.org".into()),
                proto: "ESMTP",
                greeting_name: "mail.example.org".into(),
            },
            can_tls,
        }
    }

    fn event(e: &RelayEvent) -> String {
        match e {
            RelayEvent::StartTls => "TLS".into(),
            RelayEvent::XclientUnavailable => "NO XCLIENT".into(),
            RelayEvent::Reply(r) => format!("R {} {}", r.code, r.lines.join("|")),
            RelayEvent::Failed(r) => format!("F {} {}", r.code, r.lines.join("|")),
        }
    }

    fn run_with(client: &mut RelayClient, name: &str, script: &[Step]) {
        for (i, &(act, sent, events)) in script.iter().enumerate() {
            let mut out = RelayOutput::default();
            match act {
                Recv(s) => {
                    let used = client.receive(s.as_bytes(), &mut out);
                    assert_eq!(used, s.len(), "{name} step {i}: bytes used");
                }
                Mail(path, p) => client.mail(path, &p, &mut out),
                Rcpt(path) => client.rcpt(path, &mut out),
                Data => client.data(&mut out),
                Chunk(s) => client.data_chunk(s.as_bytes().to_vec(), &mut out),
                End => assert_eq!(
                    client.end_data(EightBit::default(), &mut out),
                    Ok(()),
                    "{name} step {i}"
                ),
                Rset => client.rset(&mut out),
                Quit => client.quit(&mut out),
                TlsOk => client.tls_established(&mut out),
                TlsFail => client.tls_failed(&mut out),
            }
            assert_eq!(
                String::from_utf8_lossy(&out.bytes),
                sent,
                "{name} step {i}: bytes sent"
            );
            // Whether XCLIENT was missing is a test of its own (`xclient_unavailable_...`).
            let got: Vec<String> = out
                .events
                .iter()
                .filter(|e| **e != RelayEvent::XclientUnavailable)
                .map(event)
                .collect();
            assert_eq!(got, events, "{name} step {i}: events");
        }
    }

    fn run(name: &str, p: RelayClientParams, script: &[Step]) -> RelayClient {
        let mut client = RelayClient::new(p);
        run_with(&mut client, name, script);
        client
    }

    const NO_PARAMS: MailParams = MailParams {
        size: None,
        body: None,
        smtputf8: false,
    };
    const ALL_PARAMS: MailParams = MailParams {
        size: Some(1234),
        body: Some(Body::EightBitMime),
        smtputf8: true,
    };

    const GREET: &str = "220 next.test ESMTP\r\n";
    const EHLO: &str = "EHLO mx.heloguard.test\r\n";
    const CLIENT_EHLO: &str = "EHLO mail.example.org\r\n";
    const EHLO_OK: &str = "250-next.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n";

    #[test]
    fn setup_and_a_transaction() {
        let cases: &[(&str, bool, &[Step])] = &[
            (
                "ehlo happy path",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (Recv("250 2.1.0 Ok\r\n"), "", &["R 250 2.1.0 Ok"]),
                    (Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", &[]),
                    (Recv("250 2.1.5 Ok\r\n"), "", &["R 250 2.1.5 Ok"]),
                    (Data, "DATA\r\n", &[]),
                    (Recv("354 go\r\n"), "", &["R 354 go"]),
                    (
                        Chunk("Subject: x\r\n\r\nhi\r\n"),
                        "Subject: x\r\n\r\nhi\r\n",
                        &[],
                    ),
                    (End, ".\r\n", &[]),
                    (
                        Recv("250 2.0.0 queued as X\r\n"),
                        "",
                        &["R 250 2.0.0 queued as X"],
                    ),
                    (Rset, "RSET\r\n", &[]),
                    (Recv("250 2.0.0 Ok\r\n"), "", &[]),
                    (Quit, "QUIT\r\n", &[]),
                    (Recv("221 2.0.0 Bye\r\n"), "", &[]),
                ],
            ),
            (
                "helo fallback after 502",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("502 5.5.1 no\r\n"), "HELO mx.heloguard.test\r\n", &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    // HELO offers no extensions: no SIZE/BODY/SMTPUTF8.
                    (Mail("", ALL_PARAMS), "MAIL FROM:<>\r\n", &[]),
                ],
            ),
            (
                "helo fallback after 500",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("500 what?\r\n"), "HELO mx.heloguard.test\r\n", &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                ],
            ),
            (
                "helo refused too",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("500 what?\r\n"), "HELO mx.heloguard.test\r\n", &[]),
                    (
                        Recv("550 no\r\n"),
                        "QUIT\r\n",
                        &["F 451 4.4.1 Next hop unavailable: 550 no"],
                    ),
                ],
            ),
            (
                "ehlo 501 is a refusal, not a reason for HELO",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (
                        Recv("501 5.5.4 bad\r\n"),
                        "QUIT\r\n",
                        &["F 451 4.4.1 Next hop unavailable: 501 5.5.4 bad"],
                    ),
                ],
            ),
            (
                "mail params only when advertised",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (
                        Recv(
                            "250-next.test\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
                        ),
                        "",
                        &[],
                    ),
                    (
                        Mail("a@b.test", ALL_PARAMS),
                        "MAIL FROM:<a@b.test> SIZE=1234 BODY=8BITMIME SMTPUTF8\r\n",
                        &[],
                    ),
                ],
            ),
            (
                "mail params: only SIZE advertised",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250-next.test\r\n250 size\r\n"), "", &[]),
                    (
                        Mail("a@b.test", ALL_PARAMS),
                        "MAIL FROM:<a@b.test> SIZE=1234\r\n",
                        &[],
                    ),
                ],
            ),
            (
                "mail params: 8BITMIME carries BODY=7BIT too",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250-next.test\r\n250 8BITMIME\r\n"), "", &[]),
                    (
                        Mail(
                            "a@b.test",
                            MailParams {
                                size: Some(5),
                                body: Some(Body::SevenBit),
                                smtputf8: true,
                            },
                        ),
                        "MAIL FROM:<a@b.test> BODY=7BIT\r\n",
                        &[],
                    ),
                ],
            ),
            (
                "rcpt 550 passes through, multi-line",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (Recv("250 ok\r\n"), "", &["R 250 ok"]),
                    (Rcpt("x@d.test"), "RCPT TO:<x@d.test>\r\n", &[]),
                    (
                        Recv("550-5.1.1 no such\r\n550 5.1.1 user\r\n"),
                        "",
                        &["R 550 5.1.1 no such|5.1.1 user"],
                    ),
                ],
            ),
            (
                "commands queued before setup are sent after it",
                false,
                &[
                    (Mail("a@b.test", NO_PARAMS), "", &[]),
                    (Rcpt("c@d.test"), "", &[]),
                    (Recv(GREET), EHLO, &[]),
                    // Pipelining: MAIL and RCPT go together.
                    (
                        Recv(EHLO_OK),
                        "MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n",
                        &[],
                    ),
                    (Recv("250 a\r\n250 b\r\n"), "", &["R 250 a", "R 250 b"]),
                ],
            ),
            (
                "no pipelining: one command at a time",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (Rcpt("c@d.test"), "", &[]),
                    (Data, "", &[]),
                    (Recv("250 a\r\n"), "RCPT TO:<c@d.test>\r\n", &["R 250 a"]),
                    (Recv("250 b\r\n"), "DATA\r\n", &["R 250 b"]),
                    (Recv("354 c\r\n"), "", &["R 354 c"]),
                ],
            ),
            (
                "pipelining still waits after DATA",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv(EHLO_OK), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", &[]),
                    (Data, "DATA\r\n", &[]),
                    (Chunk("early\r\n"), "", &[]),
                    (End, "", &[]),
                    (Recv("250 a\r\n250 b\r\n"), "", &["R 250 a", "R 250 b"]),
                    (Recv("354 c\r\n"), "early\r\n.\r\n", &["R 354 c"]),
                    (Recv("250 d\r\n"), "", &["R 250 d"]),
                ],
            ),
            (
                "refused DATA drops the content; end_data gets the refusal",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv(EHLO_OK), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (Data, "DATA\r\n", &[]),
                    (Chunk("x\r\n"), "", &[]),
                    (Recv("250 a\r\n"), "", &["R 250 a"]),
                    (Recv("554 5.5.1 no rcpt\r\n"), "", &["R 554 5.5.1 no rcpt"]),
                    (Chunk("y\r\n"), "", &[]),
                    (End, "", &["R 554 5.5.1 no rcpt"]),
                    (Rset, "RSET\r\n", &[]),
                ],
            ),
            (
                "a 250 to DATA is never passed on",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Data, "DATA\r\n", &[]),
                    (
                        Recv("250 odd\r\n"),
                        "",
                        &["F 451 4.4.1 Next hop unavailable: 250 odd"],
                    ),
                    (
                        Mail("a@b.test", NO_PARAMS),
                        "",
                        &["F 451 4.4.1 Next hop unavailable: 250 odd"],
                    ),
                ],
            ),
            (
                "421 fails the connection",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                    (
                        Recv("421 4.4.2 timeout\r\n"),
                        "",
                        &["F 451 4.4.1 Next hop unavailable: 421 4.4.2 timeout"],
                    ),
                ],
            ),
            (
                "RSET refused fails the connection",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Rset, "RSET\r\n", &[]),
                    (
                        Recv("500 no\r\n"),
                        "QUIT\r\n",
                        &["F 451 4.4.1 Next hop unavailable: 500 no"],
                    ),
                ],
            ),
            (
                "a command during DATA aborts without the final dot",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Data, "DATA\r\n", &[]),
                    (Recv("354 go\r\n"), "", &["R 354 go"]),
                    (Chunk("part"), "part", &[]),
                    (
                        Rset,
                        "",
                        &[
                            "F 451 4.4.1 Next hop unavailable: internal error: command while DATA is open",
                        ],
                    ),
                    (
                        End,
                        "",
                        &[
                            "F 451 4.4.1 Next hop unavailable: internal error: command while DATA is open",
                        ],
                    ),
                ],
            ),
            (
                "greeting 554",
                false,
                &[(
                    Recv("554 5.7.1 go away\r\n"),
                    "QUIT\r\n",
                    &["F 451 4.4.1 Next hop unavailable: 554 5.7.1 go away"],
                )],
            ),
            (
                "multi-line greeting",
                false,
                &[(Recv("220-next.test\r\n220 welcome\r\n"), EHLO, &[])],
            ),
            (
                "garbage",
                false,
                &[(
                    Recv("HTTP/1.1 400 Bad Request\r\n"),
                    "",
                    &["F 451 4.4.1 Next hop unavailable: malformed reply"],
                )],
            ),
            (
                "bad code digits and separators",
                false,
                &[(
                    Recv("2200 x\r\n"),
                    "",
                    &["F 451 4.4.1 Next hop unavailable: malformed reply"],
                )],
            ),
            (
                "code 160 is no reply code",
                false,
                &[(
                    Recv("160 x\r\n"),
                    "",
                    &["F 451 4.4.1 Next hop unavailable: malformed reply"],
                )],
            ),
            (
                "continuation with another code",
                false,
                &[(
                    Recv("220-a\r\n250 b\r\n"),
                    "",
                    &["F 451 4.4.1 Next hop unavailable: malformed reply"],
                )],
            ),
            (
                "code-only line ends the reply",
                false,
                &[(Recv("220\r\n"), EHLO, &[])],
            ),
            (
                "unsolicited reply",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (
                        Recv("421 4.4.2 idle\r\n"),
                        "",
                        &["F 451 4.4.1 Next hop unavailable: 421 4.4.2 idle"],
                    ),
                ],
            ),
            (
                "control bytes in reply text are replaced",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", &[]),
                    (Recv("550 a\x1bb\rc\r\n"), "", &["R 550 a?b?c"]),
                ],
            ),
        ];
        for (name, can_tls, script) in cases {
            run(name, params(NextHopProtocol::Smtp, *can_tls), script);
        }
    }

    #[test]
    fn starttls() {
        let cases: &[(&str, bool, &[Step])] = &[
            (
                "offered and used, then EHLO again",
                true,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Mail("a@b.test", NO_PARAMS), "", &[]),
                    (
                        Recv("250-next.test\r\n250 STARTTLS\r\n"),
                        "STARTTLS\r\n",
                        &[],
                    ),
                    (Recv("220 2.0.0 go ahead\r\n"), "", &["TLS"]),
                    (TlsOk, EHLO, &[]),
                    // Post-TLS extensions decide; STARTTLS is not repeated.
                    (
                        Recv("250-next.test\r\n250-STARTTLS\r\n250 SIZE\r\n"),
                        "MAIL FROM:<a@b.test>\r\n",
                        &[],
                    ),
                ],
            ),
            (
                "offered but we can't",
                false,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250-next.test\r\n250 STARTTLS\r\n"), "", &[]),
                ],
            ),
            (
                "refused",
                true,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (
                        Recv("250-next.test\r\n250 STARTTLS\r\n"),
                        "STARTTLS\r\n",
                        &[],
                    ),
                    (
                        Recv("454 4.7.0 TLS not available\r\n"),
                        "QUIT\r\n",
                        &["F 451 4.4.1 Next hop unavailable: 454 4.7.0 TLS not available"],
                    ),
                ],
            ),
            (
                "handshake failed",
                true,
                &[
                    (Recv(GREET), EHLO, &[]),
                    (
                        Recv("250-next.test\r\n250 STARTTLS\r\n"),
                        "STARTTLS\r\n",
                        &[],
                    ),
                    (Recv("220 go\r\n"), "", &["TLS"]),
                    (
                        TlsFail,
                        "",
                        &["F 451 4.4.1 Next hop unavailable: TLS handshake failed"],
                    ),
                ],
            ),
        ];
        for (name, can_tls, script) in cases {
            run(name, params(NextHopProtocol::Smtp, *can_tls), script);
        }
    }

    #[test]
    fn bytes_after_the_starttls_220_are_refused() {
        let mut c = RelayClient::new(params(NextHopProtocol::Smtp, true));
        let mut out = RelayOutput::default();
        c.receive(GREET.as_bytes(), &mut out);
        c.receive(b"250-next.test\r\n250 STARTTLS\r\n", &mut out);
        let mut out = RelayOutput::default();
        let input = b"220 go\r\n250 injected\r\n";
        assert_eq!(c.receive(input, &mut out), input.len());
        let got: Vec<String> = out.events.iter().map(event).collect();
        assert_eq!(
            got,
            [
                "TLS",
                "F 451 4.4.1 Next hop unavailable: data before the TLS handshake"
            ]
        );
    }

    #[test]
    fn xclient() {
        let v6: IpAddr = "2001:db8::1"
            .parse()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        type Case = (
            &'static str,
            IpAddr,
            XclientName,
            Option<&'static str>,
            &'static str,
            &'static str,
        );
        let all = "250-next.test\r\n250 XCLIENT NAME ADDR PROTO HELO LOGIN\r\n";
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let name = || XclientName::Name("mail.example.org".into());
        let cases: Vec<Case> = vec![
            (
                "all four",
                v4,
                name(),
                Some("mail.example.org"),
                all,
                "XCLIENT ADDR=192.0.2.1 NAME=mail.example.org HELO=mail.example.org PROTO=ESMTP\r\n",
            ),
            (
                "ipv6 and no name",
                v6,
                XclientName::Unavailable,
                Some("h"),
                all,
                "XCLIENT ADDR=IPV6:2001:db8::1 NAME=[UNAVAILABLE] HELO=h PROTO=ESMTP\r\n",
            ),
            (
                "dns temperror, no helo",
                v4,
                XclientName::TempUnavailable,
                None,
                all,
                "XCLIENT ADDR=192.0.2.1 NAME=[TEMPUNAVAIL] HELO=[UNAVAILABLE] PROTO=ESMTP\r\n",
            ),
            (
                "xtext of + = and space",
                v4,
                name(),
                Some("a+b=c d\u{e9}"),
                all,
                "XCLIENT ADDR=192.0.2.1 NAME=mail.example.org HELO=a+2Bb+3Dc+20d+C3+A9 PROTO=ESMTP\r\n",
            ),
            (
                "only advertised attributes",
                v4,
                name(),
                Some("h"),
                "250-next.test\r\n250 xclient addr helo\r\n",
                "XCLIENT ADDR=192.0.2.1 HELO=h\r\n",
            ),
        ];
        for (case, addr, xname, helo, ehlo_reply, xclient_line) in cases {
            let mut p = params(NextHopProtocol::Smtp, false);
            p.xclient = XclientAttrs {
                addr,
                port: None,
                name: xname,
                helo: helo.map(str::to_string),
                proto: "ESMTP",
                greeting_name: "mail.example.org".into(),
            };
            let script: &[Step] = &[
                (Recv(GREET), EHLO, &[]),
                (Mail("a@b.test", NO_PARAMS), "", &[]),
                (Recv(ehlo_reply), xclient_line, &[]),
                // XCLIENT_README: the EHLO after XCLIENT carries the client's name.
                (Recv("220 next.test ESMTP\r\n"), CLIENT_EHLO, &[]),
                // XCLIENT offered again after the reset: not sent twice.
                (Recv(ehlo_reply), "MAIL FROM:<a@b.test>\r\n", &[]),
            ];
            let c = run(case, p, script);
            assert!(c.used_xclient() && c.is_ready(), "{case}");
        }
    }

    #[test]
    fn xclient_refused_and_unoffered() {
        run(
            "refused",
            params(NextHopProtocol::Smtp, false),
            &[
                (Recv(GREET), EHLO, &[]),
                (
                    Recv("250-next.test\r\n250 XCLIENT ADDR\r\n"),
                    "XCLIENT ADDR=192.0.2.1\r\n",
                    &[],
                ),
                (
                    Recv("550 5.7.0 not authorized\r\n"),
                    "QUIT\r\n",
                    &["F 451 4.4.1 Next hop unavailable: 550 5.7.0 not authorized"],
                ),
            ],
        );
        let c = run(
            "no attribute we know",
            params(NextHopProtocol::Smtp, false),
            &[
                (Recv(GREET), EHLO, &[]),
                (Recv("250-next.test\r\n250 XCLIENT LOGIN\r\n"), "", &[]),
            ],
        );
        assert!(!c.used_xclient() && c.is_ready());
    }

    #[test]
    fn xclient_after_starttls() {
        run(
            "tls then xclient",
            params(NextHopProtocol::Smtp, true),
            &[
                (Recv(GREET), EHLO, &[]),
                (
                    Recv("250-next.test\r\n250-XCLIENT ADDR\r\n250 STARTTLS\r\n"),
                    "STARTTLS\r\n",
                    &[],
                ),
                (Recv("220 go\r\n"), "", &["TLS"]),
                (TlsOk, EHLO, &[]),
                (
                    Recv("250-next.test\r\n250 XCLIENT ADDR\r\n"),
                    "XCLIENT ADDR=192.0.2.1\r\n",
                    &[],
                ),
                (Recv("220 hi\r\n"), CLIENT_EHLO, &[]),
                (Recv("250 next.test\r\n"), "", &[]),
            ],
        );
    }

    #[test]
    fn xclient_split_over_512_octets() {
        let long = "h".repeat(255);
        let mut p = params(NextHopProtocol::Smtp, false);
        p.xclient.name = XclientName::Name("n".repeat(255));
        p.xclient.helo = Some(long.clone());
        let cmds = xclient_commands(
            &p.xclient,
            &["ADDR".into(), "NAME".into(), "HELO".into(), "PROTO".into()],
        );
        // SPEC: HELO and PROTO first, NAME and ADDR last (after a new ADDR the next hop
        // would judge a further XCLIENT by the client's address).
        assert_eq!(
            cmds,
            [
                format!("XCLIENT HELO={long} PROTO=ESMTP"),
                format!("XCLIENT ADDR=192.0.2.1 NAME={}", "n".repeat(255)),
            ]
        );
        assert!(cmds.iter().all(|c| c.len() + 2 <= MAX_COMMAND_LINE));

        // A HELO Postfix would refuse (over 255 octets), or whose xtext would not fit, is
        // sent as unknown; the EHLO that follows names the client.
        let offered = ["HELO".to_string(), "PROTO".to_string()];
        for helo in ["h".repeat(256), "\u{e9}".repeat(120)] {
            p.xclient.helo = Some(helo);
            let cmds = xclient_commands(&p.xclient, &offered);
            assert_eq!(cmds, ["XCLIENT HELO=[UNAVAILABLE] PROTO=ESMTP"]);
        }
    }

    #[test]
    fn xclient_port_and_ipv6_and_every_value_in_xtext() {
        let mut p = params(NextHopProtocol::Smtp, false);
        p.xclient.addr = "2001:db8::7".parse().unwrap_or(p.xclient.addr);
        p.xclient.port = Some(40123);
        p.xclient.helo = Some("we ird=+".into());
        p.xclient.proto = "SMTP";
        let offered: Vec<String> = ["NAME", "ADDR", "PORT", "HELO", "PROTO", "LOGIN"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            xclient_commands(&p.xclient, &offered),
            [
                "XCLIENT ADDR=IPV6:2001:db8::7 PORT=40123 NAME=mail.example.org HELO=we+20ird+3D+2B PROTO=SMTP"
            ]
        );
    }

    #[test]
    fn the_ehlo_after_xclient_is_the_clients_or_its_address_literal() {
        let offered = "250-next.test\r\n250 XCLIENT ADDR HELO\r\n";
        for (greeting, addr, ehlo) in [
            ("mail.example.org", "192.0.2.1", "EHLO mail.example.org\r\n"),
            ("[192.0.2.1]", "192.0.2.1", "EHLO [192.0.2.1]\r\n"),
            // What the session would never hand over still gives a clean line.
            ("bad name\r\nRSET", "192.0.2.1", "EHLO [192.0.2.1]\r\n"),
            ("", "2001:db8::1", "EHLO [IPv6:2001:db8::1]\r\n"),
        ] {
            let mut p = params(NextHopProtocol::Smtp, false);
            p.xclient.greeting_name = greeting.into();
            p.xclient.addr = addr.parse().unwrap_or(p.xclient.addr);
            let mut c = RelayClient::new(p);
            let mut out = RelayOutput::default();
            c.receive(GREET.as_bytes(), &mut out);
            c.receive(offered.as_bytes(), &mut out);
            let mut out = RelayOutput::default();
            c.receive(b"220 next.test\r\n", &mut out);
            assert_eq!(String::from_utf8_lossy(&out.bytes), ehlo, "{greeting:?}");
        }
    }

    #[test]
    fn a_next_hop_without_xclient_is_reported_once_per_connection() {
        let events = |ehlo_reply: &str| {
            let mut c = RelayClient::new(params(NextHopProtocol::Smtp, false));
            let mut out = RelayOutput::default();
            c.receive(GREET.as_bytes(), &mut out);
            c.receive(ehlo_reply.as_bytes(), &mut out);
            if out.bytes.ends_with(b"\r\n") && out.bytes.windows(7).any(|w| w == b"XCLIENT") {
                c.receive(b"220 next.test\r\n250 next.test\r\n", &mut out);
            }
            assert!(c.is_ready(), "{ehlo_reply:?}");
            out.events.iter().map(event).collect::<Vec<_>>()
        };
        assert_eq!(events("250 next.test\r\n"), ["NO XCLIENT"]);
        assert_eq!(
            events("250-next.test\r\n250 XCLIENT LOGIN\r\n"),
            ["NO XCLIENT"]
        );
        assert!(events("250-next.test\r\n250 XCLIENT ADDR\r\n").is_empty());
    }

    #[test]
    fn utf8_addresses_are_refused_here_for_a_next_hop_without_smtputf8() {
        let utf8 = MailParams {
            smtputf8: true,
            ..NO_PARAMS
        };
        run(
            "no SMTPUTF8, pipelined",
            params(NextHopProtocol::Smtp, false),
            &[
                (Recv(GREET), EHLO, &[]),
                (Recv(EHLO_OK), "", &[]),
                (
                    Mail("\u{e9}@b.test", utf8),
                    "",
                    &["R 553 5.6.7 Non-ASCII address, and the next hop does not offer SMTPUTF8"],
                ),
                // An ASCII transaction goes on without the SMTPUTF8 parameter.
                (Mail("a@b.test", utf8), "MAIL FROM:<a@b.test>\r\n", &[]),
                (Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", &[]),
                // Answered in turn, after the RCPT before it.
                (Rcpt("\u{e9}@d.test"), "", &[]),
                (Rcpt("e@d.test"), "RCPT TO:<e@d.test>\r\n", &[]),
                (
                    Recv("250 m\r\n250 c\r\n250 e\r\n"),
                    "",
                    &[
                        "R 250 m",
                        "R 250 c",
                        "R 553 5.6.7 Non-ASCII address, and the next hop does not offer SMTPUTF8",
                        "R 250 e",
                    ],
                ),
            ],
        );
        run(
            "with SMTPUTF8",
            params(NextHopProtocol::Smtp, false),
            &[
                (Recv(GREET), EHLO, &[]),
                (
                    Recv("250-next.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"),
                    "",
                    &[],
                ),
                (
                    Mail("\u{e9}@b.test", utf8),
                    "MAIL FROM:<\u{e9}@b.test> SMTPUTF8\r\n",
                    &[],
                ),
            ],
        );
    }

    #[test]
    fn eight_bit_content_gets_no_final_dot_where_the_next_hop_cannot_take_it() {
        let header = EightBit {
            header: true,
            body: false,
        };
        let body = EightBit {
            header: false,
            body: true,
        };
        let cases = [
            ("250 next.test\r\n", header, Some(554u16), "5.6.9"),
            ("250 next.test\r\n", body, Some(554), "5.6.3"),
            (
                "250-next.test\r\n250 8BITMIME\r\n",
                header,
                Some(554),
                "5.6.9",
            ),
            ("250-next.test\r\n250 8BITMIME\r\n", body, None, ""),
            (
                "250-next.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
                header,
                None,
                "",
            ),
            ("250 next.test\r\n", EightBit::default(), None, ""),
        ];
        for (ehlo_reply, eight_bit, refused, enhanced) in cases {
            let mut c = run(
                ehlo_reply,
                params(NextHopProtocol::Smtp, false),
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv(ehlo_reply), "", &[]),
                    (Data, "DATA\r\n", &[]),
                    (Recv("354 go\r\n"), "", &["R 354 go"]),
                    (Chunk("x\r\n"), "x\r\n", &[]),
                ],
            );
            let mut out = RelayOutput::default();
            match (c.end_data(eight_bit, &mut out), refused) {
                (Err(reply), Some(code)) => {
                    assert_eq!(reply.code, code, "{ehlo_reply:?} {eight_bit:?}");
                    assert!(reply.lines[0].starts_with(enhanced), "{reply:?}");
                    // No dot, and nothing more ever: the loop drops the connection.
                    assert!(out.bytes.is_empty() && out.events.is_empty());
                    c.rset(&mut out);
                    assert!(out.bytes.is_empty());
                }
                (Ok(()), None) => assert_eq!(out.bytes, b".\r\n"),
                (got, want) => panic!("{ehlo_reply:?} {eight_bit:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn dot_stuffing_across_splits() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("leading dot", &[".x\r\n"], "..x\r\n.\r\n"),
            (
                "dot after a split at line start",
                &["a\r\n", ".b\r\n"],
                "a\r\n..b\r\n.\r\n",
            ),
            (
                "split between CR and LF",
                &["a\r", "\n.b\r\n"],
                "a\r\n..b\r\n.\r\n",
            ),
            (
                "dot mid-line untouched",
                &["a.b\r\n", "c.\r\n"],
                "a.b\r\nc.\r\n.\r\n",
            ),
            ("lone dot line", &["x\r\n.\r\n"], "x\r\n..\r\n.\r\n"),
            ("no final CRLF", &["abc"], "abc\r\n.\r\n"),
            ("ends on CR", &["abc\r"], "abc\r\n.\r\n"),
            ("empty", &[], ".\r\n"),
        ];
        for (name, chunks, wire) in cases {
            let mut c = run(
                name,
                params(NextHopProtocol::Smtp, false),
                &[
                    (Recv(GREET), EHLO, &[]),
                    (Recv("250 next.test\r\n"), "", &[]),
                    (Data, "DATA\r\n", &[]),
                    (Recv("354 go\r\n"), "", &["R 354 go"]),
                ],
            );
            let mut out = RelayOutput::default();
            for chunk in chunks.iter() {
                c.data_chunk(chunk.as_bytes().to_vec(), &mut out);
            }
            assert_eq!(c.end_data(EightBit::default(), &mut out), Ok(()));
            assert_eq!(String::from_utf8_lossy(&out.bytes), *wire, "{name}");
            assert!(!c.is_idle(), "{name}");
            c.receive(b"250 ok\r\n", &mut out);
            assert!(c.is_idle(), "{name}");
        }
    }

    #[test]
    fn lmtp_replies_per_recipient() {
        let lhlo = "LHLO mx.heloguard.test\r\n";
        run(
            "lmtp",
            params(NextHopProtocol::Lmtp, false),
            &[
                (Recv(GREET), lhlo, &[]),
                (Recv("250-next.test\r\n250 PIPELINING\r\n"), "", &[]),
                (Mail("a@b.test", NO_PARAMS), "MAIL FROM:<a@b.test>\r\n", &[]),
                (Rcpt("c@d.test"), "RCPT TO:<c@d.test>\r\n", &[]),
                (Rcpt("x@d.test"), "RCPT TO:<x@d.test>\r\n", &[]),
                (Rcpt("e@d.test"), "RCPT TO:<e@d.test>\r\n", &[]),
                (Data, "DATA\r\n", &[]),
                (
                    Recv("250 m\r\n250 c\r\n550 x\r\n250 e\r\n354 go\r\n"),
                    "",
                    &["R 250 m", "R 250 c", "R 550 x", "R 250 e", "R 354 go"],
                ),
                (Chunk("hi\r\n"), "hi\r\n", &[]),
                (End, ".\r\n", &[]),
                (Recv("250 c ok\r\n"), "", &["R 250 c ok"]),
                (Recv("452 e full\r\n"), "", &["R 452 e full"]),
                (
                    Recv("250 extra\r\n"),
                    "",
                    &["F 451 4.4.1 Next hop unavailable: 250 extra"],
                ),
            ],
        );
        run(
            "lmtp has no HELO fallback",
            params(NextHopProtocol::Lmtp, false),
            &[
                (Recv(GREET), lhlo, &[]),
                (
                    Recv("500 no\r\n"),
                    "QUIT\r\n",
                    &["F 451 4.4.1 Next hop unavailable: 500 no"],
                ),
            ],
        );
    }

    #[test]
    fn reply_limits() {
        // A partial line is left for the next call.
        let mut c = RelayClient::new(params(NextHopProtocol::Smtp, false));
        let mut out = RelayOutput::default();
        assert_eq!(c.receive(b"220-a\r\n220 b", &mut out), 7);
        assert!(out.bytes.is_empty() && out.events.is_empty());
        assert_eq!(c.receive(b"220 b\r\n", &mut out), 7);
        assert_eq!(out.bytes, EHLO.as_bytes());

        let failed_with = |input: Vec<u8>| {
            let mut c = RelayClient::new(params(NextHopProtocol::Smtp, false));
            let mut out = RelayOutput::default();
            assert_eq!(c.receive(&input, &mut out), input.len());
            out.events.iter().map(event).collect::<Vec<_>>()
        };
        // 2048 octets with CRLF is still fine.
        let mut ok = b"220 ".to_vec();
        ok.resize(2046, b'x');
        ok.extend_from_slice(b"\r\n");
        assert!(failed_with(ok).is_empty());
        let mut long = b"220 ".to_vec();
        long.resize(2047, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(
            failed_with(long),
            ["F 451 4.4.1 Next hop unavailable: reply line too long"]
        );
        // No line end within 2048 octets.
        assert_eq!(
            failed_with(vec![b'2'; MAX_REPLY_LINE]),
            ["F 451 4.4.1 Next hop unavailable: reply line too long"]
        );
        let many = "220-x\r\n".repeat(MAX_REPLY_LINES) + "220 x\r\n";
        assert_eq!(
            failed_with(many.into_bytes()),
            ["F 451 4.4.1 Next hop unavailable: reply has too many lines"]
        );
        let enough = "220-x\r\n".repeat(MAX_REPLY_LINES - 1) + "220 x\r\n";
        assert!(failed_with(enough.into_bytes()).is_empty());
    }

    #[test]
    fn quit_before_setup_just_closes() {
        let mut c = RelayClient::new(params(NextHopProtocol::Smtp, false));
        let mut out = RelayOutput::default();
        c.quit(&mut out);
        assert!(out.bytes.is_empty() && out.events.is_empty() && c.is_idle());
        c.receive(GREET.as_bytes(), &mut out);
        assert!(out.bytes.is_empty());
        c.mail("a@b.test", &NO_PARAMS, &mut out);
        assert_eq!(
            out.events.iter().map(event).collect::<Vec<_>>(),
            ["F 451 4.4.1 Next hop unavailable: connection closed"]
        );
    }

    #[test]
    fn failure_reports_the_error() {
        let mut c = RelayClient::new(params(NextHopProtocol::Smtp, false));
        let mut out = RelayOutput::default();
        c.receive(b"554 no\r\n", &mut out);
        assert!(matches!(c.error(), Some(RelayError::Greeting(r)) if r.code == 554));
        assert!(!c.is_ready());
    }
}

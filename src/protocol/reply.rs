//! SMTP replies: a code, an enhanced status code (RFC 2034, RFC 3463) and text, written with
//! the hyphen continuation of RFC 5321 4.2.1.

/// One reply, possibly multi-line. Every line but the last is written `code-text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of each line, without the code, with the enhanced status code in front
    /// where the reply carries one.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code, e.g. `Reply::new(550, "5.7.1", "No")`.
    pub fn new(code: u16, enhanced: &str, text: &str) -> Self {
        Self {
            code,
            lines: vec![format!("{enhanced} {text}")],
        }
    }

    /// A one-line reply without an enhanced status code (the banner, HELO).
    pub fn plain(code: u16, text: &str) -> Self {
        Self {
            code,
            lines: vec![text.to_string()],
        }
    }

    /// The reply with a generic enhanced status code (`c.0.0`) in front of every line that
    /// lacks one of its class. Replies made elsewhere (a next hop without ENHANCEDSTATUSCODES,
    /// or reached with HELO) then keep SPEC's rule that every reply but the banner and
    /// EHLO/HELO carries one. RFC 3463 defines codes for classes 2, 4 and 5 only; other
    /// replies are left as they are.
    pub fn with_enhanced_codes(mut self) -> Reply {
        let class = self.code / 100;
        if !matches!(class, 2 | 4 | 5) {
            return self;
        }
        let digit = b'0' + class as u8;
        for line in &mut self.lines {
            if enhanced_status(line.as_bytes()) != Some(digit) {
                *line = if line.is_empty() {
                    format!("{class}.0.0")
                } else {
                    format!("{class}.0.0 {line}")
                };
            }
        }
        self
    }

    /// Appends the wire form of `Reply::new(code, enhanced, text)` without making the
    /// `Reply`: the replies of every transaction (MAIL, RCPT, DATA) go out this way, with no
    /// allocation of their own.
    pub fn write_line(out: &mut Vec<u8>, code: u16, enhanced: &str, text: &str) {
        out.reserve(enhanced.len() + text.len() + 7);
        out.extend_from_slice(&code_digits(code));
        out.push(b' ');
        out.extend_from_slice(enhanced.as_bytes());
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Appends the wire form of `Reply::plain(code, text)` without making the `Reply` (the
    /// banner).
    pub fn write_plain_line(out: &mut Vec<u8>, code: u16, text: &str) {
        out.reserve(text.len() + 6);
        out.extend_from_slice(&code_digits(code));
        out.push(b' ');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// Appends the wire form, CRLF after every line, straight into `out` (every reply of a
    /// session goes through here, so no line is formatted into a buffer of its own first).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let digits = code_digits(self.code);
        let last = self.lines.len().saturating_sub(1);
        out.reserve(self.lines.iter().map(|line| line.len() + 6).sum::<usize>() + 6);
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(&digits);
            out.push(if i == last { b' ' } else { b'-' });
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.lines.is_empty() {
            out.extend_from_slice(&digits);
            out.extend_from_slice(b" \r\n");
        }
    }
}

/// A reply code's three digits; codes are three digits wherever they are made or parsed, and
/// the clamp keeps the arithmetic total.
fn code_digits(code: u16) -> [u8; 3] {
    let code = code.min(999);
    [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// The class digit of an enhanced status code (`c.s.d`, then a space or the end) at the start
/// of a reply line's text.
pub fn enhanced_status(text: &[u8]) -> Option<u8> {
    let word = text.split(|&b| b == b' ').next()?;
    let mut parts = word.split(|&b| b == b'.');
    let class = parts.next()?;
    let (subject, detail) = (parts.next()?, parts.next()?);
    let numeric =
        |p: &[u8], max: usize| !p.is_empty() && p.len() <= max && p.iter().all(u8::is_ascii_digit);
    (parts.next().is_none()
        && class.len() == 1
        && numeric(class, 1)
        && numeric(subject, 3)
        && numeric(detail, 3))
    .then_some(class[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_without_an_enhanced_code_of_their_class_get_the_generic_one() {
        let from_elsewhere = Reply {
            code: 550,
            lines: vec!["no such user".into(), "5.1.1 kept".into(), String::new()],
        };
        assert_eq!(
            from_elsewhere.with_enhanced_codes().lines,
            ["5.0.0 no such user", "5.1.1 kept", "5.0.0"]
        );
        let wrong_class = Reply::new(451, "2.0.0", "odd");
        assert_eq!(wrong_class.with_enhanced_codes().lines, ["4.0.0 2.0.0 odd"]);
        let intermediate = Reply::plain(354, "go ahead");
        assert_eq!(intermediate.clone().with_enhanced_codes(), intermediate);
    }

    #[test]
    fn multi_line_uses_hyphen_until_the_last_line() {
        let r = Reply {
            code: 250,
            lines: vec!["mx.example".into(), "PIPELINING".into(), "8BITMIME".into()],
        };
        let mut out = Vec::new();
        r.write_to(&mut out);
        assert_eq!(out, b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
        let mut out = Vec::new();
        Reply::new(550, "5.7.1", "Go away").write_to(&mut out);
        assert_eq!(out, b"550 5.7.1 Go away\r\n");
    }

    #[test]
    fn a_line_written_without_a_reply_is_the_reply_s_wire_form() {
        for (code, enhanced, text) in [(250, "2.1.0", "Ok"), (354, "2.0.0", ""), (999, "", "x")] {
            let mut made = b"before\r\n".to_vec();
            let mut direct = made.clone();
            Reply::new(code, enhanced, text).write_to(&mut made);
            Reply::write_line(&mut direct, code, enhanced, text);
            assert_eq!(direct, made, "{code} {enhanced} {text}");
        }
        let mut made = Vec::new();
        let mut direct = Vec::new();
        Reply::plain(220, "mx.example ESMTP heloguard").write_to(&mut made);
        Reply::write_plain_line(&mut direct, 220, "mx.example ESMTP heloguard");
        assert_eq!(direct, made);
        assert_eq!(direct, b"220 mx.example ESMTP heloguard\r\n");
    }
}

//! SMTP replies: a code, an enhanced status code (RFC 2034, RFC 3463) and text, written with
//! the hyphen continuation of RFC 5321 4.2.1.

use std::fmt::Write as _;

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

    /// Appends the wire form, CRLF after every line.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        let mut buf = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            // Writing to a String cannot fail.
            let _ = write!(buf, "{}{}{}\r\n", self.code, sep, line);
        }
        if self.lines.is_empty() {
            let _ = write!(buf, "{} \r\n", self.code);
        }
        out.extend_from_slice(buf.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

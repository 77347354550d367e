//! A minimal LMTP server (RFC 2033) for the relay tests: it records every command line, a
//! `PARTIAL` marker once 10 kB of message text arrived (streaming shows as that marker coming
//! before the final dot), `BODY <text>` at the dot, and answers once per recipient.
#![allow(dead_code)]

use std::io::{BufRead, Write};
use std::sync::Mutex;

/// Serves one connection. `reply_for` gives the post-data reply line (without CRLF) for a
/// recipient, from its `RCPT TO:<...>` line.
pub fn serve(
    mut reader: impl BufRead,
    mut out: impl Write,
    seen: &Mutex<Vec<String>>,
    reply_for: &dyn Fn(&str) -> String,
) {
    let _ = out.write_all(b"220 lmtp.test LMTP ready\r\n");
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let cmd = line.trim_end().to_string();
        line.clear();
        seen.lock().unwrap().push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("LHLO") {
            "250-lmtp.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n".into()
        } else if upper.starts_with("MAIL") || upper.starts_with("RSET") {
            rcpts.clear();
            "250 2.1.0 ok\r\n".into()
        } else if upper.starts_with("RCPT") {
            rcpts.push(cmd.clone());
            "250 2.1.5 ok\r\n".into()
        } else if upper == "DATA" {
            let _ = out.write_all(b"354 go ahead\r\n");
            let body = read_body(&mut reader, seen);
            seen.lock().unwrap().push(format!("BODY {body}"));
            rcpts
                .drain(..)
                .map(|r| format!("{}\r\n", reply_for(&r)))
                .collect()
        } else if upper == "QUIT" {
            let _ = out.write_all(b"221 bye\r\n");
            return;
        } else {
            "500 5.5.2 what\r\n".into()
        };
        let _ = out.write_all(reply.as_bytes());
    }
}

/// Reads the message text up to the final dot, as sent (still dot-stuffed).
fn read_body(reader: &mut impl BufRead, seen: &Mutex<Vec<String>>) -> String {
    let mut body = String::new();
    let mut reported_partial = false;
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap_or(0) == 0 || l == ".\r\n" {
            return body;
        }
        body.push_str(&l);
        if body.len() > 10_000 && !reported_partial {
            reported_partial = true;
            seen.lock()
                .unwrap()
                .push("PARTIAL body lines arrived".into());
        }
    }
}

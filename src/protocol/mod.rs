//! The sans-I/O SMTP wire layer: lines, commands, the DATA decoder and replies.
//!
//! Nothing here reads a socket, looks at a clock or allocates per line on the hot paths:
//! - `line`: finds command lines in a byte buffer without copying; overlong lines are
//!   skipped up to their LF and reported once (Postfix `SMTP_GET_FLAG_SKIP`).
//! - `command`: turns one line into a `Command<'a>` borrowing from it, or a `ParseError`
//!   that carries its reply (500 / 501 / 555).
//! - `data`: the streaming DATA / BDAT decoder (dot-unstuffing, CRLF.CRLF only, bare LF
//!   policy, 1000-octet text lines, SIZE, Received loop count).
//! - `reply`: reply formatting.
//! - `stage`: where in the dialogue a refusal happened (for metrics and log lines).

pub mod command;
pub mod data;
pub mod line;
pub mod reply;
pub mod stage;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets, CRLF included.
pub const MAX_TEXT_LINE: usize = 1000;

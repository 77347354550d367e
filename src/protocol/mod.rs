//! The sans-I/O SMTP wire layer: lines, commands, the DATA decoder and replies.

pub mod reply;

//! The SMTP stages a refusal is counted and logged at.

/// Where a message was refused, for `heloguard_messages_rejected_total{stage}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Helo,
    Mail,
    Rcpt,
    Data,
}

impl Stage {
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
        }
    }
}

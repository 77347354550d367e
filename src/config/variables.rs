//! The table of variables: the single source for the parser, `--help` and the startup line of
//! the effective configuration.

/// The `--help` text: subcommands, then every variable with its meaning and default.
pub fn help_text() -> String {
    let mut text = String::from(concat!(
        "heloguard: inbound SMTP server that judges the HELO/EHLO identity against DNS\n",
        "\n",
        "Usage:\n",
        "  heloguard [serve]                     serve SMTP (the default)\n",
        "  heloguard check --ip IP --helo NAME   run every HELO check once against the\n",
        "                                        configured resolver, print each result and why,\n",
        "                                        then the verdict;\n",
        "                                        exit 0 pass, 1 fail, 2 temperror or usage error\n",
        "  heloguard whatif --policy POLICY [--dnsbl-threshold N] FILE...\n",
        "                                        replay `helo verdict` log lines (FILE `-` is\n",
        "                                        stdin) under another policy and print what it\n",
        "                                        would change; exit 0, or 2 for a bad policy or\n",
        "                                        an unreadable file\n",
        "  heloguard --version                   print `heloguard VERSION`\n",
        "  heloguard --help                      print this text\n",
        "\n",
        "`heloguard check` validates the whole configuration first: it parses every variable\n",
        "below as the server does and exits 2 with one line naming the first bad one.\n",
        "\n",
        "Environment (an invalid value stops startup with a one-line error, exit code 2;\n",
        "for the limits 0 means unlimited; an empty value counts as unset):\n",
    ));
    for variable in VARIABLES {
        text.push_str(&format!(
            "\n  {}\n      {}\n      default: {}\n",
            variable.name,
            variable.meaning,
            variable.default.describe()
        ));
    }
    text
}

/// The variables set to something other than their default, in `--help` order, for the
/// startup line that states the effective configuration; a password in a URL is hidden, and
/// so is every list zone named in HELOGUARD_DNSBL_DISPLAY (shown by its display name).
/// `lookup` is the environment (None = unset; an empty value counts as unset).
pub fn non_default_settings(
    lookup: impl Fn(&str) -> Option<String>,
) -> Vec<(&'static str, String)> {
    // A zone with a display name may carry an access key: every value shows the name instead
    // (HELOGUARD_DNSBL_DISPLAY's own value included). A bad value stops startup before this
    // line is written; here it just hides nothing.
    let display = lookup(DNSBL_DISPLAY.name)
        .and_then(|v| crate::dns::lists::DisplayNames::parse(&v).ok())
        .unwrap_or_default();
    VARIABLES
        .iter()
        .filter_map(|variable| {
            let value = lookup(variable.name)?;
            let value = value.trim();
            let is_default = match variable.default {
                DefaultValue::Text(default) => value == default,
                DefaultValue::Unset | DefaultValue::Machine(_) => false,
            };
            (!value.is_empty() && !is_default)
                .then(|| (variable.name, hide_url_password(value).into_owned()))
        })
        .map(|(name, value)| (name, display.hide_zones(&value)))
        .collect()
}

/// `value` with the password of every `scheme://user:password@host` in it replaced by `***`
/// (a `redis://:password@host` URL, typically), so that logging a setting never leaks it.
pub fn hide_url_password(value: &str) -> std::borrow::Cow<'_, str> {
    let mut out = String::new();
    let mut rest = value;
    let mut changed = false;
    while let Some(scheme_end) = rest.find("://") {
        let authority_start = scheme_end + 3;
        let authority_len = rest[authority_start..]
            .find(|c: char| matches!(c, '/' | '?' | '#' | ',') || c.is_whitespace())
            .unwrap_or(rest.len() - authority_start);
        let authority = &rest[authority_start..authority_start + authority_len];
        out.push_str(&rest[..authority_start]);
        match authority.rfind('@').and_then(|at| {
            let colon = authority[..at].find(':')?;
            Some((colon, at))
        }) {
            Some((colon, at)) => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
                changed = true;
            }
            None => out.push_str(authority),
        }
        rest = &rest[authority_start + authority_len..];
    }
    if !changed {
        return std::borrow::Cow::Borrowed(value);
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// One environment variable: the single source for the parser and for `--help`.
pub(super) struct Variable {
    pub(super) name: &'static str,
    pub(super) meaning: &'static str,
    pub(super) default: DefaultValue,
}

pub(super) enum DefaultValue {
    /// This text is parsed like an operator's value when the variable is unset.
    Text(&'static str),
    /// Unset means "off" or "none".
    Unset,
    /// Taken from the machine at startup; the text says from where.
    Machine(&'static str),
}

impl DefaultValue {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            DefaultValue::Text("") => "empty",
            DefaultValue::Text(text) => text,
            DefaultValue::Unset => "unset",
            DefaultValue::Machine(source) => source,
        }
    }
}

pub(super) const LISTEN: Variable = Variable {
    name: "HELOGUARD_LISTEN",
    meaning: "comma-separated SMTP listen addresses, e.g. 0.0.0.0:25,[::]:25 (IPv6 listeners \
              are V6ONLY); empty = none, allowed only with HELOGUARD_PROXY_LISTEN",
    default: DefaultValue::Text("127.0.0.1:2525"),
};
pub(super) const PROXY_LISTEN: Variable = Variable {
    name: "HELOGUARD_PROXY_LISTEN",
    meaning: "listen addresses where every connection must open with a PROXY protocol v1 or \
              v2 header; an address in both lists is an error",
    default: DefaultValue::Unset,
};
pub(super) const PROXY_TRUSTED: Variable = Variable {
    name: "HELOGUARD_PROXY_TRUSTED",
    meaning: "CIDRs allowed to connect to the PROXY listeners; others are closed at once",
    default: DefaultValue::Text("127.0.0.0/8,::1/128"),
};
pub(super) const HOSTNAME: Variable = Variable {
    name: "HELOGUARD_HOSTNAME",
    meaning: "the server's own name (banner, Received, Authentication-Results authserv-id)",
    default: DefaultValue::Machine("the system host name"),
};
pub(super) const WORKERS: Variable = Variable {
    name: "HELOGUARD_WORKERS",
    meaning: "protocol worker threads (at least 1)",
    default: DefaultValue::Machine("the number of available cores"),
};
pub(super) const SPOOL_WRITERS: Variable = Variable {
    name: "HELOGUARD_SPOOL_WRITERS",
    meaning: "threads that write and fsync spool files (at least 1)",
    default: DefaultValue::Text("8"),
};
pub(super) const DNS: Variable = Variable {
    name: "HELOGUARD_DNS",
    meaning: "nameservers ip:port,... (port 53 when absent; IPv6 with a port as [addr]:port)",
    default: DefaultValue::Machine("the nameserver lines of /etc/resolv.conf"),
};
pub(super) const DNS_TIMEOUT_MS: Variable = Variable {
    name: "HELOGUARD_DNS_TIMEOUT_MS",
    meaning: "total time for one lookup in milliseconds, retries included (more than 0)",
    default: DefaultValue::Text("2000"),
};
pub(super) const DNS_BUDGET: Variable = Variable {
    name: "HELOGUARD_DNS_BUDGET",
    meaning: "DNS queries one session may cause in all (every check, every EHLO); past it, \
              checks still undecided are temperror (0 = unlimited)",
    default: DefaultValue::Text("100"),
};
pub(super) const DELIVER: Variable = Variable {
    name: "HELOGUARD_DELIVER",
    meaning: "hand-off: maildir (into HELOGUARD_SPOOL), smtp://HOST:PORT, lmtp://HOST:PORT or \
              lmtp:unix:/PATH (before-queue relay: 250 only after the next hop's 250)",
    default: DefaultValue::Text("maildir"),
};
pub(super) const SPOOL: Variable = Variable {
    name: "HELOGUARD_SPOOL",
    meaning: "Maildir for accepted messages",
    default: DefaultValue::Text("./spool"),
};
pub(super) const MIN_FREE_MB: Variable = Variable {
    name: "HELOGUARD_MIN_FREE_MB",
    meaning: "below this much free space on the spool's filesystem, MAIL gets 452 4.3.1",
    default: DefaultValue::Text("100"),
};
pub(super) const DOMAINS: Variable = Variable {
    name: "HELOGUARD_DOMAINS",
    meaning: "comma list of recipient domains accepted; empty = all (a warning in maildir \
              mode, an error in relay modes, which would otherwise be an open relay)",
    default: DefaultValue::Text(""),
};
pub(super) const MAX_MESSAGE_SIZE: Variable = Variable {
    name: "HELOGUARD_MAX_MESSAGE_SIZE",
    meaning: "largest message in bytes, advertised as SIZE",
    default: DefaultValue::Text("26214400"),
};
pub(super) const MAX_RECIPIENTS: Variable = Variable {
    name: "HELOGUARD_MAX_RECIPIENTS",
    meaning: "recipients per transaction (RFC 5321 4.5.3.1.8 asks at least 100)",
    default: DefaultValue::Text("100"),
};
pub(super) const MAX_CONNECTIONS: Variable = Variable {
    name: "HELOGUARD_MAX_CONNECTIONS",
    meaning: "total concurrent sessions",
    default: DefaultValue::Text("10000"),
};
pub(super) const MAX_CONNECTIONS_PER_IP: Variable = Variable {
    name: "HELOGUARD_MAX_CONNECTIONS_PER_IP",
    meaning: "concurrent sessions per client: one IPv4 address, or one IPv6 /64",
    default: DefaultValue::Text("50"),
};
pub(super) const TIMEOUT_SECS: Variable = Variable {
    name: "HELOGUARD_TIMEOUT_SECS",
    meaning: "idle seconds before 421 4.4.2 and close (RFC 5321 4.5.3.2)",
    default: DefaultValue::Text("300"),
};
pub(super) const MIN_DATA_RATE: Variable = Variable {
    name: "HELOGUARD_MIN_DATA_RATE",
    meaning: "bytes/s a DATA or BDAT transfer must keep up over the last 30 s once it has run \
              30 s, else 421 4.4.2",
    default: DefaultValue::Text("500"),
};
pub(super) const MAX_ERRORS: Variable = Variable {
    name: "HELOGUARD_MAX_ERRORS",
    meaning: "protocol errors (5xx replies to commands, and greylisting's 451s) before \
              421 4.7.0 and close",
    default: DefaultValue::Text("20"),
};
pub(super) const MAX_JUNK: Variable = Variable {
    name: "HELOGUARD_MAX_JUNK",
    meaning: "NOOP/RSET/VRFY/HELP commands, and EHLO/HELO beyond the first after connect and \
              after STARTTLS, allowed per session; the next gets 421 4.7.0; the count restarts \
              after each accepted message",
    default: DefaultValue::Text("100"),
};
pub(super) const GREET_DELAY_MS: Variable = Variable {
    name: "HELOGUARD_GREET_DELAY_MS",
    meaning: "milliseconds to wait before the banner; a client that talks first fails the \
              pregreet test (0 = off)",
    default: DefaultValue::Text("0"),
};
pub(super) const TLS_CERT: Variable = Variable {
    name: "HELOGUARD_TLS_CERT",
    meaning: "PEM certificate chain; STARTTLS is advertised only when this and \
              HELOGUARD_TLS_KEY are both set",
    default: DefaultValue::Unset,
};
pub(super) const TLS_KEY: Variable = Variable {
    name: "HELOGUARD_TLS_KEY",
    meaning: "PEM private key for HELOGUARD_TLS_CERT",
    default: DefaultValue::Unset,
};
pub(super) const HELO_POLICY: Variable = Variable {
    name: "HELOGUARD_HELO_POLICY",
    meaning: "per-check actions off|log|tag|greylist|defer|reject, e.g. \
              default=tag,localhost=reject,literal_match=reject",
    default: DefaultValue::Text("default=tag,syntax=reject"),
};
pub(super) const HELO_ALLOW: Variable = Variable {
    name: "HELOGUARD_HELO_ALLOW",
    meaning: "clients that skip every HELO check: IPs or CIDRs, and ptr:DOMAIN (a \
              forward-confirmed PTR name equal to DOMAIN or below it)",
    default: DefaultValue::Text(""),
};
pub(super) const REJECT_AT: Variable = Variable {
    name: "HELOGUARD_REJECT_AT",
    meaning: "where HELO refusals are answered: rcpt (like Postfix smtpd_delay_reject) or helo",
    default: DefaultValue::Text("rcpt"),
};
pub(super) const BARE_NEWLINE: Variable = Variable {
    name: "HELOGUARD_BARE_NEWLINE",
    meaning: "a bare LF in DATA/BDAT: normalize (ends a line, as CRLF) or reject (550 5.5.2 \
              after the message's real end)",
    default: DefaultValue::Text("normalize"),
};
pub(super) const METRICS: Variable = Variable {
    name: "HELOGUARD_METRICS",
    meaning: "address of the Prometheus HTTP endpoint (GET /metrics); unset = off",
    default: DefaultValue::Unset,
};
pub(super) const SHUTDOWN_GRACE_SECS: Variable = Variable {
    name: "HELOGUARD_SHUTDOWN_GRACE_SECS",
    meaning: "seconds open transactions get to finish on SIGTERM",
    default: DefaultValue::Text("30"),
};
pub(super) const DNSBL: Variable = Variable {
    name: "HELOGUARD_DNSBL",
    meaning: "client-IP lists in postscreen_dnsbl_sites syntax, ZONE[=FILTER][*WEIGHT],... \
              (FILTER octet by octet: N, [N..M], [N;M;...]; WEIGHT default 1, negative for \
              allowlists), separated by commas, white space or both",
    default: DefaultValue::Text(""),
};
pub(super) const DNSBL_THRESHOLD: Variable = Variable {
    name: "HELOGUARD_DNSBL_THRESHOLD",
    meaning: "combined HELOGUARD_DNSBL score at which the dnsbl check fails (a whole number)",
    default: DefaultValue::Text("1"),
};
pub(super) const DNSWL_THRESHOLD: Variable = Variable {
    name: "HELOGUARD_DNSWL_THRESHOLD",
    meaning: "a combined score at or below this negative number allows the client as \
              HELOGUARD_HELO_ALLOW does (0 = off; at most 0)",
    default: DefaultValue::Text("0"),
};
pub(super) const RHSBL: Variable = Variable {
    name: "HELOGUARD_RHSBL",
    meaning: "domain lists for the registered domains of the HELO and PTR names, \
              ZONE[=FILTER],...",
    default: DefaultValue::Text(""),
};
pub(super) const DNSBL_DISPLAY: Variable = Variable {
    name: "HELOGUARD_DNSBL_DISPLAY",
    meaning: "ZONE=NAME,...: the name shown for a list zone in headers, replies, logs and \
              metrics, so a zone that carries an access key never shows it",
    default: DefaultValue::Text(""),
};
pub(super) const SPF_TIMEOUT_MS: Variable = Variable {
    name: "HELOGUARD_SPF_TIMEOUT_MS",
    meaning: "total time for one SPF evaluation in milliseconds (RFC 7208 4.6.4 asks at \
              least 20 s; more than 0)",
    default: DefaultValue::Text("20000"),
};
pub(super) const RELAY_IDLE_SECS: Variable = Variable {
    name: "HELOGUARD_RELAY_IDLE_SECS",
    meaning: "relay modes: a next-hop connection with no transaction for this long is closed",
    default: DefaultValue::Text("10"),
};
pub(super) const GREYLIST_DELAY: Variable = Variable {
    name: "HELOGUARD_GREYLIST_DELAY",
    meaning: "greylisting: a triplet's retry earlier than this after its first sight is \
              deferred again (a duration: a number with s, m, h or d; bare = seconds)",
    default: DefaultValue::Text("5m"),
};
pub(super) const GREYLIST_RETRY: Variable = Variable {
    name: "HELOGUARD_GREYLIST_RETRY",
    meaning: "greylisting: a retry later than this after the first sight starts over",
    default: DefaultValue::Text("48h"),
};
pub(super) const GREYLIST_PASS: Variable = Variable {
    name: "HELOGUARD_GREYLIST_PASS",
    meaning: "greylisting: a passed triplet passes at once for this long after its last use",
    default: DefaultValue::Text("35d"),
};
pub(super) const HELO_CHURN: Variable = Variable {
    name: "HELOGUARD_HELO_CHURN",
    meaning: "distinct HELO names one client (an IPv4 address, an IPv6 /64) may present \
              within a sliding hour before helo_churn fails (0 = the check gives none)",
    default: DefaultValue::Text("5"),
};
pub(super) const STATE: Variable = Variable {
    name: "HELOGUARD_STATE",
    meaning: "state store (greylisting, HELO history): unset = embedded, saved to \
              HELOGUARD_STATE_FILE; redis://[:PASSWORD@]HOST:PORT[/DB] = shared by every \
              instance using it",
    default: DefaultValue::Unset,
};
pub(super) const STATE_FILE: Variable = Variable {
    name: "HELOGUARD_STATE_FILE",
    meaning: "where the embedded state store is saved (every 60 s and at shutdown)",
    default: DefaultValue::Text("./heloguard.state"),
};
pub(super) const STATE_TIMEOUT_MS: Variable = Variable {
    name: "HELOGUARD_STATE_TIMEOUT_MS",
    meaning: "longest wait for the state store in milliseconds; past it the store counts as \
              unavailable and fails open (more than 0)",
    default: DefaultValue::Text("200"),
};
pub(super) const STATE_MAX_ENTRIES: Variable = Variable {
    name: "HELOGUARD_STATE_MAX_ENTRIES",
    meaning: "embedded state store: entries kept at most; past it those nearest expiry go \
              first (at least 1)",
    default: DefaultValue::Text("1000000"),
};
/// Read by env_logger, not by this module; listed so that `--help` names it.
pub(super) const RUST_LOG: Variable = Variable {
    name: "RUST_LOG",
    meaning: "log filter (env_logger syntax)",
    default: DefaultValue::Text("info"),
};

/// Every variable, in the order of SPEC's table and of `--help`.
pub(super) const VARIABLES: &[&Variable] = &[
    &LISTEN,
    &PROXY_LISTEN,
    &PROXY_TRUSTED,
    &HOSTNAME,
    &WORKERS,
    &SPOOL_WRITERS,
    &DNS,
    &DNS_TIMEOUT_MS,
    &DNS_BUDGET,
    &DELIVER,
    &SPOOL,
    &MIN_FREE_MB,
    &DOMAINS,
    &MAX_MESSAGE_SIZE,
    &MAX_RECIPIENTS,
    &MAX_CONNECTIONS,
    &MAX_CONNECTIONS_PER_IP,
    &TIMEOUT_SECS,
    &MIN_DATA_RATE,
    &MAX_ERRORS,
    &MAX_JUNK,
    &GREET_DELAY_MS,
    &TLS_CERT,
    &TLS_KEY,
    &HELO_POLICY,
    &HELO_ALLOW,
    &REJECT_AT,
    &BARE_NEWLINE,
    &METRICS,
    &SHUTDOWN_GRACE_SECS,
    &DNSBL,
    &DNSBL_THRESHOLD,
    &DNSWL_THRESHOLD,
    &RHSBL,
    &DNSBL_DISPLAY,
    &SPF_TIMEOUT_MS,
    &RELAY_IDLE_SECS,
    &GREYLIST_DELAY,
    &GREYLIST_RETRY,
    &GREYLIST_PASS,
    &HELO_CHURN,
    &STATE,
    &STATE_FILE,
    &STATE_TIMEOUT_MS,
    &STATE_MAX_ENTRIES,
    &RUST_LOG,
];

/// Largest worker or writer pool accepted; more is a typo, not a plan.
pub(super) const MAX_THREADS: u64 = 1024;

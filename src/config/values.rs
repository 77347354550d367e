//! Parsing and validating each variable's value; every error names its variable.

use super::*;

// ---- numbers ----

/// A whole number: ASCII digits only (no sign, no blanks inside).
pub(super) fn parse_whole(variable: &'static str, raw: &str) -> Result<u64, ConfigError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::bad_value(
            variable,
            raw,
            "is not a whole number",
        ));
    }
    raw.parse::<u64>()
        .map_err(|_| ConfigError::bad_value(variable, raw, "is too large"))
}

/// A whole number variable that has a default text.
pub(super) fn whole(env: &Env<'_>, variable: &Variable) -> Result<u64, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    parse_whole(variable.name, &raw)
}

/// A time in units of `1 / per_second` s, read by `read`, at most a year: far past any
/// sensible timeout, and far from where adding it to the clock would overflow.
pub(super) fn within_a_year(
    env: &Env<'_>,
    variable: &Variable,
    read: fn(&Env<'_>, &Variable) -> Result<u64, ConfigError>,
    per_second: u64,
) -> Result<u64, ConfigError> {
    const YEAR_SECS: u64 = 365 * 24 * 3600;
    let n = read(env, variable)?;
    if n > YEAR_SECS * per_second {
        let raw = env.value(variable).unwrap_or_default();
        return Err(ConfigError::bad_value(
            variable.name,
            &raw,
            "is more than a year",
        ));
    }
    Ok(n)
}

pub(super) fn count(env: &Env<'_>, variable: &Variable) -> Result<usize, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    let n = parse_whole(variable.name, &raw)?;
    usize::try_from(n).map_err(|_| ConfigError::bad_value(variable.name, &raw, "is too large"))
}

pub(super) fn small_count(env: &Env<'_>, variable: &Variable) -> Result<u32, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    let n = parse_whole(variable.name, &raw)?;
    u32::try_from(n).map_err(|_| ConfigError::bad_value(variable.name, &raw, "is too large"))
}

pub(super) fn positive(env: &Env<'_>, variable: &Variable) -> Result<u64, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    match parse_whole(variable.name, &raw)? {
        0 => Err(ConfigError::bad_value(
            variable.name,
            &raw,
            "must be more than 0",
        )),
        n => Ok(n),
    }
}

pub(super) fn thread_count(
    env: &Env<'_>,
    variable: &Variable,
    default: usize,
) -> Result<usize, ConfigError> {
    let Some(raw) = env.set_value(variable) else {
        return Ok(default.max(1));
    };
    match parse_whole(variable.name, &raw)? {
        0 => Err(ConfigError::bad_value(
            variable.name,
            &raw,
            "must be at least 1",
        )),
        n if n > MAX_THREADS => Err(ConfigError::bad_value(
            variable.name,
            &raw,
            format!("is more than {MAX_THREADS} threads"),
        )),
        // Bounded by MAX_THREADS just above, so it fits any usize.
        n => Ok(n as usize),
    }
}

// ---- lists and addresses ----

/// Splits a comma list into trimmed items; an empty item (`a,,b`) is an error.
pub(super) fn list_items<'a>(
    variable: &'static str,
    raw: &'a str,
) -> Result<Vec<&'a str>, ConfigError> {
    let items: Vec<&str> = raw.split(',').map(str::trim).collect();
    if items.iter().any(|item| item.is_empty()) {
        return Err(ConfigError::bad_value(
            variable,
            raw,
            "has an empty list item",
        ));
    }
    Ok(items)
}

pub(super) fn socket_addr(variable: &'static str, item: &str) -> Result<SocketAddr, ConfigError> {
    item.parse::<SocketAddr>().map_err(|_| {
        ConfigError::bad_value(
            variable,
            item,
            "is not an address:port (IPv6 as [addr]:port)",
        )
    })
}

pub(super) fn socket_addr_list(
    variable: &'static str,
    raw: &str,
) -> Result<Vec<SocketAddr>, ConfigError> {
    list_items(variable, raw)?
        .into_iter()
        .map(|item| socket_addr(variable, item))
        .collect()
}

/// The three kinds of listen address, checked against each other.
pub(super) struct Listeners {
    pub(super) smtp: Vec<SocketAddr>,
    pub(super) proxy: Vec<SocketAddr>,
    pub(super) metrics: Option<SocketAddr>,
}

/// HELOGUARD_LISTEN, HELOGUARD_PROXY_LISTEN and HELOGUARD_METRICS.
pub(super) fn listeners(env: &Env<'_>) -> Result<Listeners, ConfigError> {
    let proxy_listen = match env.set_value(&PROXY_LISTEN) {
        Some(raw) => socket_addr_list(PROXY_LISTEN.name, &raw)?,
        None => Vec::new(),
    };
    let listen = match env.set_value(&LISTEN) {
        Some(raw) => socket_addr_list(LISTEN.name, &raw)?,
        // Set but empty: the operator asked for no plain listener.
        None if env.is_present(&LISTEN) => Vec::new(),
        None => socket_addr_list(LISTEN.name, LISTEN.default.describe())?,
    };
    if listen.is_empty() && proxy_listen.is_empty() {
        return Err(ConfigError::other(
            LISTEN.name,
            "is empty and HELOGUARD_PROXY_LISTEN is unset: nothing would listen",
        ));
    }
    refuse_overlaps(LISTEN.name, &listen, &[])?;
    refuse_overlaps(PROXY_LISTEN.name, &proxy_listen, &listen)?;
    let metrics = match env.set_value(&METRICS) {
        Some(raw) => Some(socket_addr(METRICS.name, &raw)?),
        None => None,
    };
    if let Some(addr) = metrics {
        let smtp: Vec<SocketAddr> = listen.iter().chain(&proxy_listen).copied().collect();
        refuse_overlaps(METRICS.name, &[addr], &smtp)?;
    }
    Ok(Listeners {
        smtp: listen,
        proxy: proxy_listen,
        metrics,
    })
}

/// Refuses an address of `new` that overlaps another of `new` or one of `earlier`.
pub(super) fn refuse_overlaps(
    variable: &'static str,
    new: &[SocketAddr],
    earlier: &[SocketAddr],
) -> Result<(), ConfigError> {
    for (i, addr) in new.iter().enumerate() {
        let clash = earlier.iter().chain(&new[..i]).find(|o| overlap(addr, o));
        if let Some(other) = clash {
            return Err(ConfigError::bad_value(
                variable,
                &addr.to_string(),
                format!("overlaps the listen address {other} given before"),
            ));
        }
    }
    Ok(())
}

/// Two listen addresses that could not both be bound: the same port and family, and the
/// same address or a wildcard. Port 0 asks the kernel for a fresh port, so it never clashes.
/// IPv6 listeners are V6ONLY, so the families never overlap.
pub(super) fn overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

pub(super) fn cidr_list(env: &Env<'_>, variable: &Variable) -> Result<Vec<Cidr>, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    list_items(variable.name, &raw)?
        .into_iter()
        .map(|item| {
            item.parse::<Cidr>().map_err(|e| {
                ConfigError::bad_value(variable.name, item, format!("is not a CIDR: {e}"))
            })
        })
        .collect()
}

// ---- names ----

/// Letter/digit/hyphen labels of 1-63 octets, no hyphen at either end, at most 253 octets,
/// last label not all digits (that would be an IP address). `None` when valid, else why not.
pub(super) fn domain_name_problem(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        return Some("is longer than 253 octets");
    }
    if !name.is_ascii() {
        return Some("is not ASCII (write internationalized names as xn-- A-labels)");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("has a label that is empty or longer than 63 octets");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Some("has a character other than a letter, digit, hyphen or dot");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("has a label that starts or ends with a hyphen");
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Some("is an IP address or ends in a numeric label, not a domain name");
    }
    None
}

pub(super) fn hostname(
    env: &Env<'_>,
    machine: &dyn Machine,
    warnings: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let (raw, from_machine) = match env.set_value(&HOSTNAME) {
        Some(raw) => (raw, false),
        None => match machine.host_name() {
            Some(name) => (name, true),
            None => {
                return Err(ConfigError::other(
                    HOSTNAME.name,
                    "is unset and the system host name could not be read; set it",
                ));
            }
        },
    };
    let name = raw.strip_suffix('.').unwrap_or(&raw).to_string();
    if let Some(problem) = domain_name_problem(&name) {
        let reason = if from_machine {
            format!("is unset and the system host name {problem}; set it")
        } else {
            problem.to_string()
        };
        return Err(ConfigError::bad_value(HOSTNAME.name, &raw, reason));
    }
    if !name.contains('.') {
        warnings.push(format!(
            "{} {name:?} is not fully qualified; set a name with a dot for the banner and \
             Received fields",
            HOSTNAME.name
        ));
    }
    Ok(name)
}

pub(super) fn domains(
    env: &Env<'_>,
    deliver: &DeliverTarget,
    warnings: &mut Vec<String>,
) -> Result<Vec<String>, ConfigError> {
    let mut domains: Vec<String> = Vec::new();
    if let Some(raw) = env.set_value(&DOMAINS) {
        for item in list_items(DOMAINS.name, &raw)? {
            let name = item.strip_suffix('.').unwrap_or(item).to_ascii_lowercase();
            if let Some(problem) = domain_name_problem(&name) {
                return Err(ConfigError::bad_value(DOMAINS.name, item, problem));
            }
            if !domains.contains(&name) {
                domains.push(name);
            }
        }
    }
    if domains.is_empty() {
        if *deliver != DeliverTarget::Maildir {
            return Err(ConfigError::other(
                DOMAINS.name,
                "is empty, which in a relay mode would make an open relay; list the domains",
            ));
        }
        warnings.push(format!(
            "{} is empty: mail for every domain is accepted",
            DOMAINS.name
        ));
    }
    Ok(domains)
}

// ---- DNS ----

pub(super) fn dns_servers(
    env: &Env<'_>,
    machine: &dyn Machine,
) -> Result<Vec<SocketAddr>, ConfigError> {
    if let Some(raw) = env.set_value(&DNS) {
        return list_items(DNS.name, &raw)?
            .into_iter()
            .map(nameserver)
            .collect();
    }
    let text = machine.resolv_conf().map_err(|e| {
        ConfigError::other(
            DNS.name,
            format!("is unset and /etc/resolv.conf cannot be read ({e}); set it"),
        )
    })?;
    let servers = resolv_conf_nameservers(&text);
    if servers.is_empty() {
        return Err(ConfigError::other(
            DNS.name,
            "is unset and /etc/resolv.conf has no usable nameserver line; set it",
        ));
    }
    Ok(servers)
}

/// `ip:port`, `[v6]:port`, or a bare address (port 53).
pub(super) fn nameserver(item: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = item.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = item
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(item);
    match bare.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, 53)),
        Err(_) => Err(ConfigError::bad_value(
            DNS.name,
            item,
            "is not a nameserver ip:port (IPv6 as [addr]:port)",
        )),
    }
}

/// The `nameserver ADDR` lines of a resolv.conf, port 53, zone ids (`%eth0`) dropped; lines
/// that do not parse are skipped as the libc resolver skips them.
pub(super) fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "nameserver" {
                return None;
            }
            let addr = words.next()?;
            let addr = addr.split('%').next().unwrap_or(addr);
            addr.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

// ---- delivery and files ----

pub(super) fn deliver(env: &Env<'_>) -> Result<DeliverTarget, ConfigError> {
    let raw = env.value(&DELIVER).unwrap_or_default();
    parse_deliver(&raw).map_err(|reason| ConfigError::bad_value(DELIVER.name, &raw, reason))
}

pub(super) fn parse_deliver(raw: &str) -> Result<DeliverTarget, &'static str> {
    if raw.eq_ignore_ascii_case("maildir") {
        return Ok(DeliverTarget::Maildir);
    }
    if let Some(path) = raw.strip_prefix("lmtp:unix:") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err("needs an absolute socket path: lmtp:unix:/PATH");
        }
        return Ok(DeliverTarget::LmtpUnix {
            path: PathBuf::from(path),
        });
    }
    if let Some(rest) = raw.strip_prefix("smtp://") {
        let (host, port) = host_port(rest)?;
        return Ok(DeliverTarget::Smtp { host, port });
    }
    if let Some(rest) = raw.strip_prefix("lmtp://") {
        let (host, port) = host_port(rest)?;
        return Ok(DeliverTarget::Lmtp { host, port });
    }
    Err("is not maildir, smtp://HOST:PORT, lmtp://HOST:PORT or lmtp:unix:/PATH")
}

/// `HOST:PORT` with HOST a name, an IPv4 address or a bracketed IPv6 address; the host comes
/// back without brackets, ready for `(host, port)` socket address resolution.
pub(super) fn host_port(text: &str) -> Result<(String, u16), &'static str> {
    const NEEDS: &str = "needs HOST:PORT with a port from 1 to 65535 (IPv6 as [addr]:PORT)";
    let (host, port) = text.rsplit_once(':').ok_or(NEEDS)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(NEEDS),
    };
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok((v6.to_string(), port)),
            Err(_) => Err(NEEDS),
        };
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok((host.to_string(), port));
    }
    match domain_name_problem(host.strip_suffix('.').unwrap_or(host)) {
        None => Ok((host.to_string(), port)),
        Some(_) => Err("has a HOST that is neither a host name nor an IP address"),
    }
}

pub(super) fn spool(env: &Env<'_>) -> Result<PathBuf, ConfigError> {
    // Never empty: an empty value counts as unset and takes the default.
    Ok(PathBuf::from(env.value(&SPOOL).unwrap_or_default()))
}

/// Both or neither; each must be a readable file. Parsing the PEM is the TLS module's job.
pub(super) fn tls_files(env: &Env<'_>) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
    match (env.set_value(&TLS_CERT), env.set_value(&TLS_KEY)) {
        (None, None) => Ok((None, None)),
        (Some(_), None) => Err(ConfigError::other(
            TLS_KEY.name,
            "is unset but HELOGUARD_TLS_CERT is set; set both or neither",
        )),
        (None, Some(_)) => Err(ConfigError::other(
            TLS_CERT.name,
            "is unset but HELOGUARD_TLS_KEY is set; set both or neither",
        )),
        (Some(cert), Some(key)) => Ok((
            Some(readable_file(&TLS_CERT, &cert)?),
            Some(readable_file(&TLS_KEY, &key)?),
        )),
    }
}

pub(super) fn readable_file(variable: &Variable, path: &str) -> Result<PathBuf, ConfigError> {
    let file = File::open(path)
        .map_err(|e| ConfigError::bad_value(variable.name, path, format!("cannot be read: {e}")))?;
    match file.metadata() {
        Ok(meta) if meta.is_file() => Ok(PathBuf::from(path)),
        _ => Err(ConfigError::bad_value(
            variable.name,
            path,
            "is not a regular file",
        )),
    }
}

// ---- policy and modes ----

pub(super) fn helo_policy(env: &Env<'_>) -> Result<HeloPolicy, ConfigError> {
    // Unset takes `HeloPolicy::default()`, which is the table's default text parsed (a test
    // holds the two together).
    match env.set_value(&HELO_POLICY) {
        None => Ok(HeloPolicy::default()),
        Some(raw) => HeloPolicy::parse(&raw)
            .map_err(|e| ConfigError::bad_value(HELO_POLICY.name, &raw, e.to_string())),
    }
}

pub(super) fn helo_allow(env: &Env<'_>) -> Result<Vec<AllowEntry>, ConfigError> {
    match env.set_value(&HELO_ALLOW) {
        None => Ok(Vec::new()),
        Some(raw) => parse_allow_list(&raw)
            .map_err(|e| ConfigError::bad_value(HELO_ALLOW.name, &raw, e.to_string())),
    }
}

pub(super) fn reject_at(env: &Env<'_>) -> Result<RejectAt, ConfigError> {
    let raw = env.value(&REJECT_AT).unwrap_or_default();
    match raw.to_ascii_lowercase().as_str() {
        "rcpt" => Ok(RejectAt::Rcpt),
        "helo" => Ok(RejectAt::Helo),
        _ => Err(ConfigError::bad_value(
            REJECT_AT.name,
            &raw,
            "is not rcpt or helo",
        )),
    }
}

pub(super) fn bare_newline(env: &Env<'_>) -> Result<BareLineFeed, ConfigError> {
    let raw = env.value(&BARE_NEWLINE).unwrap_or_default();
    match raw.to_ascii_lowercase().as_str() {
        "normalize" => Ok(BareLineFeed::Normalize),
        "reject" => Ok(BareLineFeed::Reject),
        _ => Err(ConfigError::bad_value(
            BARE_NEWLINE.name,
            &raw,
            "is not normalize or reject",
        )),
    }
}

// ---- state store and greylisting ----

/// A duration: a whole number with `s`, `m`, `h` or `d`, a bare number being seconds; at
/// most a year.
pub(super) fn parse_duration(variable: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    const YEAR_SECS: u64 = 365 * 24 * 3600;
    let (digits, unit) = match raw.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&raw[..i], c.to_ascii_lowercase()),
        _ => (raw, 's'),
    };
    let per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => {
            return Err(ConfigError::bad_value(
                variable,
                raw,
                "is not a duration (a number with s, m, h or d)",
            ));
        }
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::bad_value(
            variable,
            raw,
            "is not a duration (a number with s, m, h or d)",
        ));
    }
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(per)) {
        Some(secs) if secs <= YEAR_SECS => Ok(Duration::from_secs(secs)),
        _ => Err(ConfigError::bad_value(variable, raw, "is more than a year")),
    }
}

fn duration(env: &Env<'_>, variable: &Variable) -> Result<Duration, ConfigError> {
    parse_duration(variable.name, &env.value(variable).unwrap_or_default())
}

/// HELOGUARD_GREYLIST_DELAY, _RETRY and _PASS; a retry window shorter than the delay would
/// never let a triplet pass.
pub(super) fn greylist_times(env: &Env<'_>) -> Result<GreylistTimes, ConfigError> {
    let times = GreylistTimes {
        delay: duration(env, &GREYLIST_DELAY)?,
        retry: duration(env, &GREYLIST_RETRY)?,
        pass: duration(env, &GREYLIST_PASS)?,
    };
    if times.retry < times.delay {
        return Err(ConfigError::bad_value(
            GREYLIST_RETRY.name,
            &env.value(&GREYLIST_RETRY).unwrap_or_default(),
            "is shorter than HELOGUARD_GREYLIST_DELAY: no retry could pass",
        ));
    }
    Ok(times)
}

/// HELOGUARD_STATE: unset = embedded; `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
pub(super) fn parse_state_store(raw: &str) -> Result<StateStore, &'static str> {
    let rest = raw
        .strip_prefix("redis://")
        .ok_or("is not redis://HOST:PORT[/DB]")?;
    let (authority, db) = match rest.split_once('/') {
        Some((authority, "")) => (authority, "0"),
        Some((authority, db)) => (authority, db),
        None => (rest, "0"),
    };
    if db.parse::<u32>().is_err() {
        return Err("has a database that is not a number");
    }
    let host_port = match authority.rsplit_once('@') {
        Some((_, host_port)) => host_port,
        None => authority,
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') || host.starts_with('[') => (host, port),
        _ => (host_port, "6379"),
    };
    if host.is_empty() || host.contains(['?', '#', ' ']) {
        return Err("has no host");
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err("has a port that is not a number from 1 to 65535");
    }
    Ok(StateStore::Redis {
        url: raw.to_string(),
        shown: format!("{host}:{port}/{db}"),
    })
}

pub(super) fn state_settings(env: &Env<'_>) -> Result<StateSettings, ConfigError> {
    let store = match env.set_value(&STATE) {
        None => StateStore::Embedded,
        Some(raw) => parse_state_store(&raw)
            .map_err(|reason| ConfigError::bad_value(STATE.name, &raw, reason))?,
    };
    let max_entries = count(env, &STATE_MAX_ENTRIES)?;
    if max_entries == 0 {
        return Err(ConfigError::bad_value(
            STATE_MAX_ENTRIES.name,
            "0",
            "must be more than 0",
        ));
    }
    Ok(StateSettings {
        store,
        file: PathBuf::from(env.value(&STATE_FILE).unwrap_or_default()),
        timeout: Duration::from_millis(within_a_year(env, &STATE_TIMEOUT_MS, positive, 1000)?),
        max_entries,
        greylist: greylist_times(env)?,
        helo_churn: small_count(env, &HELO_CHURN)?,
    })
}

// ---- sender reputation ----

/// A whole number that may be negative.
pub(super) fn signed(env: &Env<'_>, variable: &Variable) -> Result<i64, ConfigError> {
    let raw = env.value(variable).unwrap_or_default();
    let digits = raw.strip_prefix('-').unwrap_or(&raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::bad_value(
            variable.name,
            &raw,
            "is not a whole number",
        ));
    }
    raw.parse::<i64>()
        .map_err(|_| ConfigError::bad_value(variable.name, &raw, "is too large"))
}

/// HELOGUARD_DNSBL, HELOGUARD_RHSBL and HELOGUARD_DNSBL_DISPLAY.
pub(super) fn lists(env: &Env<'_>) -> Result<Lists, ConfigError> {
    let read = |variable: &Variable| env.set_value(variable).unwrap_or_default();
    let bad = |variable: &Variable, raw: &str, e: ListError| {
        ConfigError::bad_value(variable.name, raw, e.to_string())
    };
    let (dnsbl, rhsbl, display) = (read(&DNSBL), read(&RHSBL), read(&DNSBL_DISPLAY));
    // The error names the entry, and an entry may hold an access key: the display names of a
    // good HELOGUARD_DNSBL_DISPLAY hide it in the message too.
    let names = DisplayNames::parse(&display).map_err(|e| bad(&DNSBL_DISPLAY, &display, e))?;
    let hide = |raw: &str| names.hide_zones(raw);
    Ok(Lists {
        dnsbl: parse_dnsbl(&dnsbl)
            .map_err(|e| ConfigError::bad_value(DNSBL.name, &hide(&dnsbl), hide(&e.to_string())))?,
        rhsbl: parse_rhsbl(&rhsbl)
            .map_err(|e| ConfigError::bad_value(RHSBL.name, &hide(&rhsbl), hide(&e.to_string())))?,
        display: names,
    })
}

/// HELOGUARD_DNSWL_THRESHOLD: 0 (off) or negative.
pub(super) fn dnswl_threshold(env: &Env<'_>) -> Result<i64, ConfigError> {
    let n = signed(env, &DNSWL_THRESHOLD)?;
    if n > 0 {
        let raw = env.value(&DNSWL_THRESHOLD).unwrap_or_default();
        return Err(ConfigError::bad_value(
            DNSWL_THRESHOLD.name,
            &raw,
            "must be 0 (off) or negative",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod state_tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
                .or_else(|| match name {
                    "HELOGUARD_DNS" => Some("127.0.0.1:53".into()),
                    "HELOGUARD_HOSTNAME" => Some("mx.example.org".into()),
                    _ => None,
                })
        })
        .map(|(config, _)| config)
    }

    #[test]
    fn durations_take_a_unit_or_are_seconds() {
        let secs = |raw| parse_duration("X", raw).map(|d| d.as_secs());
        assert_eq!(secs("5m"), Ok(300));
        assert_eq!(secs("48h"), Ok(172_800));
        assert_eq!(secs("35d"), Ok(3_024_000));
        assert_eq!(secs("2s"), Ok(2));
        assert_eq!(secs("90"), Ok(90));
        for bad in ["", "m", "5 m", "5w", "-5s", "1.5h", "400d"] {
            assert!(secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_defaults_and_a_bad_greylist_time_name_the_variable() {
        let c = config(&[]).expect("defaults");
        assert_eq!(c.state.greylist, GreylistTimes::default());
        assert_eq!(c.state.store, StateStore::Embedded);
        assert_eq!(c.state.file, PathBuf::from("./heloguard.state"));
        assert_eq!(c.state.timeout, Duration::from_millis(200));
        assert_eq!(c.state.max_entries, 1_000_000);
        assert_eq!(c.helo_policy.sender.helo_churn, 5);
        assert!(SessionSettings::from(&c).sender_checks.helo_churn);
        let e = config(&[("HELOGUARD_GREYLIST_DELAY", "5 minutes")]).expect_err("bad");
        assert_eq!(e.variable, "HELOGUARD_GREYLIST_DELAY");
        let e = config(&[("HELOGUARD_GREYLIST_RETRY", "1m")]).expect_err("shorter");
        assert_eq!(e.variable, "HELOGUARD_GREYLIST_RETRY");
        let off = config(&[("HELOGUARD_HELO_CHURN", "0")]).expect("off");
        assert_eq!(off.helo_policy.sender.helo_churn, 0);
        assert!(!SessionSettings::from(&off).sender_checks.helo_churn);
    }

    #[test]
    fn redis_urls() {
        let shown = |raw| match parse_state_store(raw) {
            Ok(StateStore::Redis { shown, url }) => {
                assert_eq!(url, raw);
                Ok(shown)
            }
            Ok(StateStore::Embedded) => Err("embedded"),
            Err(e) => Err(e),
        };
        assert_eq!(
            shown("redis://127.0.0.1:6379"),
            Ok("127.0.0.1:6379/0".into())
        );
        assert_eq!(
            shown("redis://:s3cret@redis.internal:6380/2"),
            Ok("redis.internal:6380/2".into())
        );
        assert_eq!(shown("redis://[::1]:6379/1"), Ok("[::1]:6379/1".into()));
        assert_eq!(shown("redis://host"), Ok("host:6379/0".into()));
        for bad in [
            "http://host:1",
            "redis://",
            "redis://host:0",
            "redis://host:1/x",
        ] {
            assert!(shown(bad).is_err(), "{bad}");
        }
        let e = config(&[("HELOGUARD_STATE", "redis://:pw@host:99999")]).expect_err("port");
        assert_eq!(e.variable, "HELOGUARD_STATE");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[test]
    fn the_store_is_needed_only_when_a_check_asks_it() {
        assert!(config(&[]).expect("c").needs_state_store(), "helo_churn");
        let none = config(&[("HELOGUARD_HELO_CHURN", "0")]).expect("c");
        assert!(!none.needs_state_store());
        let off = config(&[("HELOGUARD_HELO_POLICY", "default=tag,helo_churn=off")]).expect("c");
        assert!(!off.needs_state_store());
        let grey = config(&[
            ("HELOGUARD_HELO_CHURN", "0"),
            ("HELOGUARD_HELO_POLICY", "dynamic=greylist"),
        ])
        .expect("c");
        assert!(grey.needs_state_store());
    }
}

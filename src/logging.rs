//! The log format and filter (SPEC "Logs").
//!
//! Under systemd, a unit's stderr is the journal when JOURNAL_STREAM names it (its `dev:inode`
//! equals stderr's, sd_journal_stream_fd(3)); the journal stamps each line itself and reads a
//! leading `<N>` as the line's priority (sd-daemon(3)), so lines then carry that prefix and no
//! timestamp. A process whose stderr was redirected elsewhere (a shell under the unit, a
//! pipe) inherits JOURNAL_STREAM but no longer writes to the journal, hence the comparison.
//! Otherwise env_logger's usual format, with milliseconds.
//!
//! RUST_LOG is env_logger's filter. A value that names neither a level nor one of our modules
//! (`verbose`, a typo) is read by env_logger as a filter for a module of that name and hides
//! every line of ours without a word; such a value is reported and `info` is used instead.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use log::Level;

/// The filter used when RUST_LOG is unset, empty or unusable.
const DEFAULT_FILTER: &str = "info";

/// Sets up the global logger from RUST_LOG and JOURNAL_STREAM. Returns the warnings to log
/// once the logger is up (a RUST_LOG that was not used).
pub fn init() -> Vec<String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, warnings) = effective_filter(rust_log.as_deref());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&filter);
    let journal = std::env::var("JOURNAL_STREAM")
        .ok()
        .is_some_and(|value| stream_is_stderr(&value));
    if journal {
        builder
            .format(|buf, record| writeln!(buf, "<{}>{}", priority(record.level()), record.args()));
    } else {
        builder.format_timestamp_millis();
    }
    builder.init();
    warnings
}

/// The filter to use for `rust_log`, and the warnings that go with it.
pub fn effective_filter(rust_log: Option<&str>) -> (String, Vec<String>) {
    let Some(value) = rust_log.map(str::trim).filter(|v| !v.is_empty()) else {
        return (DEFAULT_FILTER.to_string(), Vec::new());
    };
    if filter_is_meaningful(value) {
        return (value.to_string(), Vec::new());
    }
    let warning = format!(
        "RUST_LOG={value:?} names no log level (error, warn, info, debug, trace, off) and no \
         heloguard module, so it would hide every line: logging at {DEFAULT_FILTER} instead"
    );
    (DEFAULT_FILTER.to_string(), vec![warning])
}

/// Whether some directive of an env_logger filter names a level, or one of our modules.
/// The part after `/` is a message regex and does not count.
fn filter_is_meaningful(filter: &str) -> bool {
    let directives = filter.split('/').next().unwrap_or_default();
    directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .any(|directive| match directive.split_once('=') {
            Some((_, level)) => is_level(level.trim()),
            None => is_level(directive) || is_our_module(directive),
        })
}

fn is_level(word: &str) -> bool {
    ["off", "error", "warn", "info", "debug", "trace"]
        .iter()
        .any(|level| word.eq_ignore_ascii_case(level))
}

fn is_our_module(path: &str) -> bool {
    path == "heloguard" || path.starts_with("heloguard::")
}

/// sd-daemon(3) priorities: `<3>` error, `<4>` warning, `<6>` info, `<7>` debug.
pub const fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether JOURNAL_STREAM's `DEV:INODE` is the file that fd 2 refers to now.
fn stream_is_stderr(journal_stream: &str) -> bool {
    let Some((dev, ino)) = parse_journal_stream(journal_stream) else {
        return false;
    };
    // A duplicate of fd 2, so that the File closes the duplicate and never stderr itself.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|meta| meta.dev() == dev && meta.ino() == ino)
}

/// `DEV:INODE`, both decimal, as systemd.exec(5) writes it.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
        assert_eq!(priority(Level::Trace), 7);
    }

    #[test]
    fn filters_that_hide_everything_fall_back_to_info() {
        for (given, used, warned) in [
            (None, "info", false),
            (Some(""), "info", false),
            (Some("debug"), "debug", false),
            (Some("WARN"), "WARN", false),
            (Some("heloguard=debug"), "heloguard=debug", false),
            (Some("heloguard::dns"), "heloguard::dns", false),
            (Some("rustls=trace,info"), "rustls=trace,info", false),
            (Some("info/helo verdict"), "info/helo verdict", false),
            (Some("verbose"), "info", true),
            (Some("rustls"), "info", true),
            (Some("heloguard=loud"), "info", true),
            (Some("/helo"), "info", true),
        ] {
            let (filter, warnings) = effective_filter(given);
            assert_eq!(filter, used, "{given:?}");
            assert_eq!(!warnings.is_empty(), warned, "{given:?}");
        }
        let (_, warnings) = effective_filter(Some("verbose"));
        assert!(warnings[0].contains("RUST_LOG=\"verbose\""), "{warnings:?}");
    }

    #[test]
    fn journal_stream_must_name_stderr_itself() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert!(!stream_is_stderr("garbage"));
        // Whatever fd 2 is in the test runner, its own dev:inode names it and a neighbour's
        // does not.
        if let Ok(meta) = std::fs::metadata("/proc/self/fd/2") {
            let own = format!("{}:{}", meta.dev(), meta.ino());
            assert!(stream_is_stderr(&own), "{own}");
            let other = format!("{}:{}", meta.dev(), meta.ino().wrapping_add(1));
            assert!(!stream_is_stderr(&other));
        }
    }
}

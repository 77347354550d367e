//! The `heloguard` binary: `serve` (the default), `check`, `whatif`, `--help`,
//! `--version`. Exit codes: 0 success,
//! 1 runtime failure (or a `check` that fails), 2 configuration or usage error.

use std::process::ExitCode;
use std::sync::Arc;

use log::{error, info, warn};

use heloguard::config::{self, Config};
use heloguard::metrics::Metrics;
use heloguard::server::event_loop::{Server, ServerOptions};
use heloguard::server::listener::{self, ListenerKind};
use heloguard::server::sd_notify;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--help" | "-h" | "help") => {
            print!("{}", config::help_text());
            ExitCode::SUCCESS
        }
        None | Some("serve") => serve(),
        Some("--version" | "-V") => {
            println!("heloguard {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("check") => check(&args[1..]),
        Some("whatif") => ExitCode::from(heloguard::whatif::run(&args[1..])),
        Some(other) => {
            eprintln!("heloguard: unknown subcommand `{other}`; see `heloguard --help`");
            ExitCode::from(2)
        }
    }
}

fn load_config() -> Result<Config, ExitCode> {
    match Config::from_env() {
        Ok((config, warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            Ok(config)
        }
        Err(e) => {
            eprintln!("heloguard: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn check(args: &[String]) -> ExitCode {
    let config = match load_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let code = heloguard::check_cli::run(args, &config);
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

fn serve() -> ExitCode {
    for warning in heloguard::logging::init() {
        warn!("{warning}");
    }
    let config = match load_config() {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    info!("{}", configuration_line());
    let mut passed = listener::PassedListeners::from_env();
    let bound = match listener::bind_all(&config.listen, &config.proxy_listen, &mut passed) {
        Ok(b) => b,
        Err(e) => {
            // Once: the logger writes to stderr, which is also where eprintln would go.
            error!("{e}");
            return ExitCode::from(1);
        }
    };
    // A spool write past RLIMIT_FSIZE must fail with EFBIG (451 4.3.0 to that client), not
    // kill the process with SIGXFSZ's default action.
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let metrics = Arc::new(Metrics::new());
    if let Some(addr) = config.metrics {
        // The metrics thread serves with blocking accepts.
        let started = passed
            .take_or_bind(addr)
            .and_then(|l| l.set_nonblocking(false).map(|()| l))
            .and_then(|l| heloguard::metrics::serve(l, metrics.clone()));
        match started {
            Ok(_) => info!("metrics on http://{addr}/metrics"),
            Err(e) => {
                eprintln!("heloguard: HELOGUARD_METRICS: cannot listen on {addr}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    for addr in passed.unclaimed() {
        warn!(
            "a listening socket for {addr} was passed in but no variable names that address; closed"
        );
    }
    drop(passed);
    let server = match Server::new(
        config.clone(),
        bound,
        metrics,
        ServerOptions {
            handle_signals: true,
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("heloguard: {e}");
            return ExitCode::from(2);
        }
    };
    for (addr, kind) in server.local_addrs() {
        let kind = match kind {
            ListenerKind::Plain => "plain",
            ListenerKind::Proxy => "proxy",
        };
        info!("listening on {addr} ({kind})");
    }
    info!(
        "heloguard {} serving as {} with {} workers, {} spool writers",
        env!("CARGO_PKG_VERSION"),
        config.hostname,
        config.workers,
        config.spool_writers
    );
    sd_notify::notify_ready();
    // STOPPING=1 goes out from the loop when the shutdown begins, not here when it has ended.
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("event loop failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// SPEC "Logs": one startup line with every variable that differs from its default.
fn configuration_line() -> String {
    let settings = config::non_default_settings(|name| std::env::var(name).ok());
    if settings.is_empty() {
        return "configuration: every variable at its default".to_string();
    }
    let mut line = String::from("configuration:");
    for (name, value) in settings {
        let plain = value
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if plain {
            line.push_str(&format!(" {name}={value}"));
        } else {
            line.push_str(&format!(" {name}={value:?}"));
        }
    }
    line
}

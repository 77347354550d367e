//! Readiness notifications to systemd (`sd_notify(3)`), for `Type=notify` units.
//!
//! Protocol: one datagram of newline-separated `KEY=VALUE` assignments, sent to the Unix
//! datagram socket named by `NOTIFY_SOCKET`: an absolute path, or `@name` for a Linux abstract
//! address. Without `NOTIFY_SOCKET` (not started by systemd, or `Type=simple`) every call does
//! nothing. A failed notification is logged and otherwise ignored: the server works the same
//! without a service manager listening, and systemd's start timeout reports a missed READY=1.
//!
//! When to call: [`notify_ready`] once the listeners are bound and the workers run (and again
//! after a reload finishes), [`notify_reloading`] when SIGHUP processing starts,
//! [`notify_stopping`] when SIGTERM processing starts.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Tells systemd that startup (or a reload) is complete: `READY=1`.
pub fn notify_ready() {
    notify("READY=1");
}

/// Tells systemd that the shutdown began: `STOPPING=1`.
pub fn notify_stopping() {
    notify("STOPPING=1");
}

/// Tells systemd that a configuration reload began; follow with [`notify_ready`] when done.
pub fn notify_reloading() {
    notify(&reloading_message(monotonic_usec()));
}

/// RELOADING=1 with the CLOCK_MONOTONIC time in µs: `Type=notify-reload` (systemd 253+)
/// requires MONOTONIC_USEC beside it to match this reload to the SIGHUP it sent
/// (sd_notify(3), systemd.service(5)); older versions ignore the extra field.
fn reloading_message(monotonic_usec: Option<u64>) -> String {
    match monotonic_usec {
        Some(usec) => format!("RELOADING=1\nMONOTONIC_USEC={usec}"),
        None => "RELOADING=1".to_string(),
    }
}

/// Sends one notification datagram `msg` to `socket_name` (a path, or `@name` for abstract).
pub fn send_to(socket_name: &str, msg: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let sent = if let Some(name) = socket_name.strip_prefix('@') {
        let addr = abstract_addr(name)?;
        socket.send_to_addr(msg.as_bytes(), &addr)?
    } else if socket_name.starts_with('/') {
        socket.send_to(msg.as_bytes(), socket_name)?
    } else {
        // sd_notify(3) accepts only these two forms; a relative path would depend on our cwd.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an @abstract name",
        ));
    };
    if sent != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram truncated",
        ));
    }
    Ok(())
}

fn notify(msg: &str) {
    let Some(socket_name) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Some(socket_name) = socket_name.to_str() else {
        log::warn!("sd_notify: NOTIFY_SOCKET is not valid UTF-8; not notifying");
        return;
    };
    if let Err(e) = send_to(socket_name, msg) {
        log::warn!("sd_notify: sending {msg:?} to {socket_name}: {e}");
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract socket addresses exist only on Linux",
    ))
}

fn monotonic_usec() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass, which lives on this frame.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1_000_000 + nanos / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;
    use std::time::Duration;

    fn scratch_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::env::temp_dir().join(format!(
            "heloguard-sdn-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set timeout");
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let path = scratch_path("path");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let name = path.to_str().expect("utf-8 temp path");
        send_to(name, "READY=1").expect("send");
        assert_eq!(receive(&listener), "READY=1");
        let _ = std::fs::remove_file(&path);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("heloguard-sdn-test-{}", std::process::id());
        let addr = abstract_addr(&name).expect("abstract address");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send_to(&format!("@{name}"), "STOPPING=1").expect("send");
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn refuses_a_relative_path() {
        let err = send_to("notify.sock", "READY=1").expect_err("relative path");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reports_a_missing_socket() {
        let path = scratch_path("missing");
        let name = path.to_str().expect("utf-8 temp path");
        assert!(send_to(name, "READY=1").is_err());
    }

    #[test]
    fn a_reload_carries_the_monotonic_time() {
        assert_eq!(
            reloading_message(Some(1_234_567)),
            "RELOADING=1\nMONOTONIC_USEC=1234567"
        );
        assert_eq!(reloading_message(None), "RELOADING=1");
    }

    #[test]
    fn monotonic_clock_reads() {
        assert!(monotonic_usec().is_some_and(|usec| usec > 0));
    }
}

//! Binding the SMTP listeners: HELOGUARD_LISTEN (plain) and HELOGUARD_PROXY_LISTEN.
//!
//! IPv6 listeners are V6ONLY so that `0.0.0.0:25,[::]:25` binds both families without the
//! second failing with EADDRINUSE; std has no knob for that, socket2 does.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Which kind of listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Plain,
    /// Every connection must open with a PROXY protocol v1 or v2 header.
    Proxy,
}

/// Failure to bind one configured address.
#[derive(Debug)]
pub struct BindError {
    pub variable: &'static str,
    pub addr: SocketAddr,
    pub source: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cannot listen on {}: {}",
            self.variable, self.addr, self.source
        )?;
        if self.source.kind() == io::ErrorKind::AddrInUse {
            // The usual cause on port 25: the distribution's MTA is still running.
            write!(
                f,
                " (another process holds {}: another MTA such as Postfix or Exim may be \
                 listening there; stop it or choose another HELOGUARD_LISTEN address)",
                self.addr
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for BindError {}

/// A bound, listening, non-blocking socket.
pub struct BoundListener {
    pub listener: std::net::TcpListener,
    pub kind: ListenerKind,
}

/// Binds one address the way a mail server wants it: SO_REUSEADDR (restart while old
/// connections sit in TIME_WAIT), V6ONLY for IPv6, a deep backlog for connection bursts.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The first descriptor a service manager passes (sd_listen_fds(3): SD_LISTEN_FDS_START).
const FIRST_PASSED_FD: RawFd = 3;

/// Listening sockets handed over by the service manager (systemd socket activation,
/// sd_listen_fds(3)) or by any parent that follows the same convention, such as the tests.
///
/// A passed socket is used for the configured address it is bound to, so HELOGUARD_LISTEN,
/// HELOGUARD_PROXY_LISTEN and HELOGUARD_METRICS still say what each socket is for; an
/// address with no passed socket is bound as usual. Taking sockets that already listen
/// lets a parent know the port before the server starts, and lets systemd hold port 25
/// across restarts.
#[derive(Default)]
pub struct PassedListeners {
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl PassedListeners {
    /// The sockets named by LISTEN_PID and LISTEN_FDS, when LISTEN_PID is this process
    /// (otherwise they were meant for a parent, and are left alone).
    pub fn from_env() -> Self {
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            == Some(std::process::id());
        let count = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.trim().parse::<RawFd>().ok())
            .unwrap_or(0);
        if !for_us || count <= 0 {
            return Self::default();
        }
        let sockets = (FIRST_PASSED_FD..FIRST_PASSED_FD.saturating_add(count))
            .filter_map(adopt_passed_fd)
            .collect();
        Self { sockets }
    }

    /// The passed socket bound to `addr`, if there is one.
    pub fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self.sockets.iter().position(|(a, _)| *a == addr)?;
        Some(self.sockets.swap_remove(at).1)
    }

    /// The passed socket bound to `addr`, or a new one bound as `bind` does.
    pub fn take_or_bind(&mut self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        match self.take(addr) {
            Some(listener) => Ok(listener),
            None => bind(addr),
        }
    }

    /// Addresses of passed sockets that no configured address claimed.
    pub fn unclaimed(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(a, _)| *a).collect()
    }
}

/// Takes ownership of one passed descriptor when it is an open TCP socket: marked
/// close-on-exec and non-blocking, as mio requires.
fn adopt_passed_fd(fd: RawFd) -> Option<(SocketAddr, std::net::TcpListener)> {
    // SAFETY: fcntl(F_GETFD) on any integer only reads descriptor flags; EBADF means the
    // descriptor is not open and nothing is taken.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: the descriptor is open and was passed to this process to own (sd_listen_fds);
    // nothing else in the process refers to it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    // SAFETY: setting FD_CLOEXEC on a descriptor this process now owns.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
    let addr = listener.local_addr().ok()?;
    listener.set_nonblocking(true).ok()?;
    Some((addr, listener))
}

/// Binds every plain and PROXY address of the configuration, using passed sockets first.
pub fn bind_all(
    plain: &[SocketAddr],
    proxy: &[SocketAddr],
    passed: &mut PassedListeners,
) -> Result<Vec<BoundListener>, BindError> {
    let plain = plain
        .iter()
        .map(|a| ("HELOGUARD_LISTEN", a, ListenerKind::Plain));
    let proxy = proxy
        .iter()
        .map(|a| ("HELOGUARD_PROXY_LISTEN", a, ListenerKind::Proxy));
    plain
        .chain(proxy)
        .map(|(variable, addr, kind)| {
            passed
                .take_or_bind(*addr)
                .map(|listener| BoundListener { listener, kind })
                .map_err(|source| BindError {
                    variable,
                    addr: *addr,
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_ipv6_wildcards_bind_side_by_side() {
        let v4 = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        // With V6ONLY the IPv6 socket does not claim the IPv4 port too.
        match bind(format!("[::1]:{port}").parse().unwrap()) {
            Ok(v6) => assert_eq!(v6.local_addr().unwrap().port(), port),
            // A machine without IPv6 loopback cannot run this half.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {}
            Err(e) => panic!("unexpected bind error: {e}"),
        }
    }

    #[test]
    fn a_passed_socket_serves_its_own_address_and_others_are_bound() {
        let held = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let held_addr = held.local_addr().unwrap();
        let mut passed = PassedListeners {
            sockets: vec![(held_addr, held)],
        };
        let other: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound = bind_all(&[held_addr], &[other], &mut passed).unwrap();
        assert_eq!(bound[0].listener.local_addr().unwrap(), held_addr);
        assert_eq!(bound[0].kind, ListenerKind::Plain);
        assert_eq!(bound[1].kind, ListenerKind::Proxy);
        assert_ne!(bound[1].listener.local_addr().unwrap().port(), 0);
        assert!(passed.unclaimed().is_empty());
    }

    #[test]
    fn descriptors_for_another_process_are_left_alone() {
        // LISTEN_PID is not this process in the test runner's environment.
        assert!(PassedListeners::from_env().unclaimed().is_empty());
    }
}

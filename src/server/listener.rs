//! Binding the SMTP listeners: HELOGUARD_LISTEN (plain) and HELOGUARD_PROXY_LISTEN.
//!
//! IPv6 listeners are V6ONLY so that `0.0.0.0:25,[::]:25` binds both families without the
//! second failing with EADDRINUSE; std has no knob for that, socket2 does.

use std::fmt;
use std::io;
use std::net::SocketAddr;

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

/// Binds every plain and PROXY address of the configuration.
pub fn bind_all(
    plain: &[SocketAddr],
    proxy: &[SocketAddr],
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
            bind(*addr)
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
}

//! An in-process DNS responder for tests, on 127.0.0.1 (UDP and TCP, same port).
//!
//! Plain std threads and hickory-proto's wire types: no runtime in the test, and every odd
//! behaviour a HELO check must survive (SERVFAIL, REFUSED, silence, truncation) is one builder
//! call away.
//!
//! ```ignore
//! let dns = TestDns::start(
//!     TestZone::new()
//!         .a("mail.example.test", "192.0.2.10")
//!         .ptr("192.0.2.10", "mail.example.test")
//!         .blackhole("slow.example.test"),
//! );
//! // point the resolver (or HELOGUARD_DNS) at dns.addr()
//! ```
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX, PTR, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// How often the server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Anything a test writes as an IP address: `"192.0.2.1"`, an `IpAddr`, an `Ipv4Addr`, ...
pub trait IntoIp {
    fn into_ip(self) -> IpAddr;
}

impl IntoIp for &str {
    fn into_ip(self) -> IpAddr {
        self.parse()
            .unwrap_or_else(|_| panic!("test zone: {self:?} is not an IP address"))
    }
}

impl IntoIp for IpAddr {
    fn into_ip(self) -> IpAddr {
        self
    }
}

impl IntoIp for Ipv4Addr {
    fn into_ip(self) -> IpAddr {
        IpAddr::V4(self)
    }
}

impl IntoIp for Ipv6Addr {
    fn into_ip(self) -> IpAddr {
        IpAddr::V6(self)
    }
}

/// Lower case with the trailing dot, the key of every map below.
fn key(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with('.') {
        lower
    } else {
        format!("{lower}.")
    }
}

/// The in-addr.arpa / ip6.arpa name of an address, as a zone key.
pub fn reverse_name(ip: IpAddr) -> String {
    key(&Name::from(ip).to_ascii())
}

/// The name of `ip` under the DNS list `zone` (RFC 5782), as a zone key.
pub fn list_name(ip: IpAddr, zone: &str) -> String {
    let reversed = match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .rev()
            .map(|byte| format!("{:x}.{:x}", byte & 0x0f, byte >> 4))
            .collect::<Vec<_>>()
            .join("."),
    };
    key(&format!("{reversed}.{zone}"))
}

/// What the test server knows. A name that appears nowhere gets NXDOMAIN; a name that has
/// some record (or was declared with `nodata`) but not the one asked for gets NOERROR with an
/// empty answer (NODATA).
#[derive(Clone, Debug, Default)]
pub struct TestZone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    names: HashSet<String>,
    servfail: HashSet<String>,
    servfail_type: HashSet<(String, RecordType)>,
    refused: HashSet<String>,
    blackhole: HashSet<String>,
    blackhole_zones: HashSet<String>,
    delayed: HashMap<String, Duration>,
    truncate_udp: HashSet<String>,
    ttl: u32,
}

impl TestZone {
    pub fn new() -> Self {
        Self {
            ttl: 60,
            ..Self::default()
        }
    }

    fn add(mut self, name: &str, rdata: RData) -> Self {
        let name = key(name);
        self.names.insert(name.clone());
        self.records
            .entry((name, rdata.record_type()))
            .or_default()
            .push(rdata);
        self
    }

    /// An A record (panics on an IPv6 address).
    pub fn a(self, name: &str, ip: impl IntoIp) -> Self {
        match ip.into_ip() {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => panic!("test zone: A record with IPv6 address {v6}"),
        }
    }

    /// An AAAA record (panics on an IPv4 address).
    pub fn aaaa(self, name: &str, ip: impl IntoIp) -> Self {
        match ip.into_ip() {
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
            IpAddr::V4(v4) => panic!("test zone: AAAA record with IPv4 address {v4}"),
        }
    }

    /// An A or AAAA record, whichever the address is.
    pub fn addr(self, name: &str, ip: impl IntoIp) -> Self {
        match ip.into_ip() {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }

    /// A PTR record for `ip` (the in-addr.arpa / ip6.arpa name is built here).
    pub fn ptr(self, ip: impl IntoIp, name: &str) -> Self {
        let target = Name::from_ascii(key(name))
            .unwrap_or_else(|e| panic!("test zone: bad PTR target {name:?}: {e}"));
        self.add(&reverse_name(ip.into_ip()), RData::PTR(PTR(target)))
    }

    /// A TXT record of these character-strings, in order (SPF joins them without spaces).
    pub fn txt(self, name: &str, strings: &[&str]) -> Self {
        let strings = strings.iter().map(|s| s.to_string()).collect();
        self.add(name, RData::TXT(TXT::new(strings)))
    }

    /// An MX record; `exchange` "." is the null MX (RFC 7505).
    pub fn mx(self, name: &str, preference: u16, exchange: &str) -> Self {
        let exchange = Name::from_ascii(key(exchange))
            .unwrap_or_else(|e| panic!("test zone: bad MX exchange {exchange:?}: {e}"));
        self.add(name, RData::MX(MX::new(preference, exchange)))
    }

    /// The name exists but has no records: every type gets NODATA.
    pub fn nodata(mut self, name: &str) -> Self {
        self.names.insert(key(name));
        self
    }

    /// Every query for the name gets SERVFAIL.
    pub fn servfail(mut self, name: &str) -> Self {
        self.servfail.insert(key(name));
        self
    }

    /// Queries of one type for the name get SERVFAIL; the other types are answered.
    pub fn servfail_type(mut self, name: &str, qtype: RecordType) -> Self {
        self.servfail_type.insert((key(name), qtype));
        self
    }

    /// Every query for the name gets REFUSED.
    pub fn refused(mut self, name: &str) -> Self {
        self.refused.insert(key(name));
        self
    }

    /// Queries for the name are never answered (the client times out).
    pub fn blackhole(mut self, name: &str) -> Self {
        self.blackhole.insert(key(name));
        self
    }

    /// The PTR query for `ip` is never answered.
    pub fn blackhole_ptr(self, ip: impl IntoIp) -> Self {
        let name = reverse_name(ip.into_ip());
        self.blackhole(&name)
    }

    /// The PTR query for `ip` gets SERVFAIL.
    pub fn servfail_ptr(self, ip: impl IntoIp) -> Self {
        let name = reverse_name(ip.into_ip());
        self.servfail(&name)
    }

    /// Over UDP the name's answers come back empty with the TC bit set, so a client has to
    /// retry over TCP to get them.
    pub fn truncate_udp(mut self, name: &str) -> Self {
        self.truncate_udp.insert(key(name));
        self
    }

    /// `ip` listed under the DNS list `zone` with the A answer `answer` (RFC 5782: IPv4 by
    /// reversed octets, IPv6 by reversed nibbles). Several answers: call it again.
    pub fn listed(self, zone: &str, ip: impl IntoIp, answer: &str) -> Self {
        let name = list_name(ip.into_ip(), zone);
        self.a(&name, answer)
    }

    /// The query for `ip` under the list `zone` is never answered.
    pub fn blackhole_listed(self, zone: &str, ip: impl IntoIp) -> Self {
        let name = list_name(ip.into_ip(), zone);
        self.blackhole(&name)
    }

    /// Every name under `zone` (the zone itself included) is never answered: a list that is
    /// down.
    pub fn blackhole_zone(mut self, zone: &str) -> Self {
        self.blackhole_zones.insert(key(zone));
        self
    }

    /// Answers for the name leave `delay` after the query came (over UDP; other queries are
    /// answered meanwhile): a slow but working server.
    pub fn delay(mut self, name: &str, delay: Duration) -> Self {
        self.delayed.insert(key(name), delay);
        self
    }

    /// TTL of every record and of negative answers (default 60 s); 0 keeps resolver caches
    /// out of a test.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// The reply to `request`, or None to stay silent.
    fn answer(&self, request: &Message, over_udp: bool) -> Option<Message> {
        let query = request.queries.first()?.clone();
        let name = key(&query.name.to_ascii());
        if self.blackhole.contains(&name)
            || self
                .blackhole_zones
                .iter()
                .any(|z| name == *z || name.ends_with(&format!(".{z}")))
        {
            return None;
        }
        let mut resp = Message::response(request.metadata.id, request.metadata.op_code);
        resp.metadata.recursion_desired = request.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.authoritative = true;
        resp.add_query(query.clone());
        if self.servfail.contains(&name)
            || self
                .servfail_type
                .contains(&(name.clone(), query.query_type))
        {
            resp.metadata.response_code = ResponseCode::ServFail;
        } else if self.refused.contains(&name) {
            resp.metadata.response_code = ResponseCode::Refused;
        } else if over_udp && self.truncate_udp.contains(&name) {
            resp.metadata.truncation = true;
        } else if !self.names.contains(&name) {
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authority(self.soa());
        } else if let Some(rdatas) = self.records.get(&(name, query.query_type)) {
            for rdata in rdatas {
                resp.add_answer(Record::from_rdata(
                    query.name.clone(),
                    self.ttl,
                    rdata.clone(),
                ));
            }
        } else {
            resp.add_authority(self.soa());
        }
        Some(resp)
    }

    /// The SOA an authoritative server puts in a negative answer (RFC 2308), so resolvers
    /// keep NXDOMAIN and NODATA for the zone's TTL as they keep records.
    fn soa(&self) -> Record {
        let host = Name::from_ascii("ns.test.").expect("constant name");
        let mailbox = Name::from_ascii("hostmaster.test.").expect("constant name");
        let soa = SOA::new(host, mailbox, 1, 3600, 600, 86400, self.ttl);
        Record::from_rdata(Name::root(), self.ttl, RData::SOA(soa))
    }
}

/// One query as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenQuery {
    /// Lower case, with the trailing dot.
    pub name: String,
    pub qtype: RecordType,
    pub tcp: bool,
}

struct Shared {
    zone: TestZone,
    stop: AtomicBool,
    seen: Mutex<Vec<SeenQuery>>,
}

impl Shared {
    /// How long the answer to this query waits, if it is to wait.
    fn delay_of(&self, bytes: &[u8]) -> Option<Duration> {
        if self.zone.delayed.is_empty() {
            return None;
        }
        let request = Message::from_vec(bytes).ok()?;
        let name = key(&request.queries.first()?.name.to_ascii());
        self.zone.delayed.get(&name).copied()
    }

    fn handle(&self, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(bytes).ok()?;
        if let Some(q) = request.queries.first()
            && let Ok(mut seen) = self.seen.lock()
        {
            seen.push(SeenQuery {
                name: key(&q.name.to_ascii()),
                qtype: q.query_type,
                tcp,
            });
        }
        self.zone.answer(&request, !tcp)?.to_vec().ok()
    }
}

/// A running test DNS server; stops (and joins its threads) on drop.
pub struct TestDns {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl TestDns {
    /// Binds UDP and TCP on the same 127.0.0.1 port and starts answering from `zone`.
    pub fn start(zone: TestZone) -> TestDns {
        // UDP and TCP on one port: pick the UDP port, then take the same TCP port; retry in the
        // rare case another process holds that TCP port.
        let (udp, tcp) = (0..50)
            .find_map(|_| {
                let udp = UdpSocket::bind("127.0.0.1:0").ok()?;
                let tcp = TcpListener::bind(udp.local_addr().ok()?).ok()?;
                Some((udp, tcp))
            })
            .expect("test DNS: no free port for UDP and TCP");
        let addr = udp.local_addr().expect("test DNS: local address");
        udp.set_read_timeout(Some(POLL))
            .expect("test DNS: UDP read timeout");
        tcp.set_nonblocking(true)
            .expect("test DNS: nonblocking listener");
        let shared = Arc::new(Shared {
            zone,
            stop: AtomicBool::new(false),
            seen: Mutex::new(Vec::new()),
        });
        let udp_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("test-dns-udp".into())
                .spawn(move || serve_udp(udp, &shared))
                .expect("test DNS: spawn")
        };
        let tcp_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("test-dns-tcp".into())
                .spawn(move || serve_tcp(tcp, &shared))
                .expect("test DNS: spawn")
        };
        TestDns {
            addr,
            shared,
            threads: vec![udp_thread, tcp_thread],
        }
    }

    /// The address to give the resolver (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ip:port`, as HELOGUARD_DNS wants it.
    pub fn env_value(&self) -> String {
        self.addr.to_string()
    }

    /// Every query received so far, in arrival order.
    pub fn queries(&self) -> Vec<SeenQuery> {
        self.shared
            .seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// How many queries for `name` (any case, dot optional) and type arrived.
    pub fn count(&self, name: &str, qtype: RecordType) -> usize {
        let name = key(name);
        self.queries()
            .iter()
            .filter(|q| q.name == name && q.qtype == qtype)
            .count()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_udp(sock: UdpSocket, shared: &Shared) {
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Some(reply) = shared.handle(&buf[..n], false) else {
            continue;
        };
        match shared.delay_of(&buf[..n]) {
            Some(delay) => {
                if let Ok(sock) = sock.try_clone() {
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        let _ = sock.send_to(&reply, peer);
                    });
                }
            }
            None => {
                let _ = sock.send_to(&reply, peer);
            }
        }
    }
}

fn serve_tcp(listener: TcpListener, shared: &Arc<Shared>) {
    let mut conns = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                conns.push(std::thread::spawn(move || serve_tcp_conn(stream, &shared)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

/// Length-prefixed messages (RFC 1035 4.2.2), several per connection.
fn serve_tcp_conn(mut stream: TcpStream, shared: &Shared) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while pending.len() >= 2 {
            let len = usize::from(u16::from_be_bytes([pending[0], pending[1]]));
            if pending.len() < 2 + len {
                break;
            }
            let msg: Vec<u8> = pending.drain(..2 + len).skip(2).collect();
            if let Some(reply) = shared.handle(&msg, true) {
                let Ok(len) = u16::try_from(reply.len()) else {
                    continue;
                };
                let mut framed = len.to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        }
    }
}

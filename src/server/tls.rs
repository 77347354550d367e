//! TLS for STARTTLS: loading the certificate and key, reloading them on SIGHUP, and a sans-I/O
//! wrapper over `rustls::ServerConnection` that the event loop drives with byte slices.
//!
//! Contract:
//! - [`load_server_config`] reads a PEM full chain (leaf first) and a PEM private key (PKCS#8,
//!   PKCS#1 RSA or SEC1 EC; RSA, ECDSA P-256/P-384 or Ed25519), checks that the key belongs to
//!   the leaf, and builds a TLS 1.2 + 1.3 server configuration on the `ring` provider with the
//!   server's cipher order, no ALPN and no client certificates.
//! - Resumption, as Postfix offers it: TLS 1.3 and TLS 1.2 session tickets sealed by a rotating
//!   ticketer (rustls' `ring::Ticketer`: a new key every 6 hours, the previous one still
//!   accepted), and TLS 1.2 session ids in a bounded in-memory cache ([`SESSION_CACHE_SIZE`]
//!   entries) for clients that do not take tickets. A resumed handshake skips the ECDHE
//!   key share for TLS 1.2 and the certificate signature for both versions.
//! - [`TlsAcceptor`] holds the current configuration. [`TlsAcceptor::reload`] swaps it only when
//!   the new files load completely, so a bad reload (SIGHUP) keeps serving the old pair. A
//!   session that already started TLS keeps the configuration it began with. The ticketer
//!   and the session cache belong to the acceptor, not to one configuration, so a reload does
//!   not make every returning client pay a full handshake again.
//! - [`TlsSession`] owns no socket, in the style of rustls-test's `transfer()`: the caller hands
//!   in ciphertext it read, takes out plaintext, hands in plaintext replies and writes out
//!   ciphertext. The same type serves the server side of STARTTLS and, as
//!   `TlsSession<ClientConnection>`, the relay link's STARTTLS toward the next hop.
//!
//! Limits: rustls refuses to decrypt more once 16 KiB of plaintext wait unread; this wrapper then
//! moves that plaintext aside and carries on, so the plaintext held between two calls is at most
//! the ciphertext handed to one [`TlsSession::receive_ciphertext`] call plus 16 KiB. The event loop
//! bounds its reads, so this bounds memory. rustls holds at most [`SEND_BUFFER_LIMIT`] of
//! outgoing records; plaintext beyond that waits in the session, is never dropped, and is
//! counted by [`TlsSession::unsent`] so that the caller stops producing while it grows.
//!
//! Failure: every error is a [`TlsError`]. A protocol error from the peer leaves the alert to
//! send in the session: the caller should call [`TlsSession::take_ciphertext`] once, write the
//! bytes, and close (the "last gasp" write of rustls' `tlsserver-mio` example).

use std::fmt;
use std::io;
use std::io::{Read, Write};
use std::ops::Deref;
use std::ops::DerefMut;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ProducesTickets, ServerConnection, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, ConnectionCommon, InconsistentKeys,
    ProtocolVersion, ServerConfig,
};

use crate::session::TlsInfo;

/// Outgoing TLS bytes rustls may buffer inside one session before the caller drains them.
pub const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// TLS 1.2 session ids the server remembers for resumption. An entry is the session's secret
/// and parameters (a few hundred bytes), so the cache stays under a few MiB; past the bound
/// rustls evicts an older entry and that client does a full handshake.
pub const SESSION_CACHE_SIZE: usize = 8192;

/// What lets a returning client resume: the ticket key and the session-id cache. Shared by
/// every configuration built from it.
#[derive(Clone)]
pub struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<dyn StoresServerSessions>,
}

impl Resumption {
    /// A fresh ticket key (random, rotating) and an empty session cache.
    pub fn new() -> Result<Self, TlsError> {
        Ok(Self {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?,
            cache: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
        })
    }
}

impl fmt::Debug for Resumption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resumption")
            .field("tickets", &self.ticketer.enabled())
            .field("cache_entries", &SESSION_CACHE_SIZE)
            .finish()
    }
}

/// Loads a PEM certificate chain and private key into a TLS 1.2/1.3 server configuration,
/// with resumption state of its own.
pub fn load_server_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(cert_path, key_path, &Resumption::new()?)
}

/// Loads the pair into a configuration that resumes sessions through `resumption`.
pub fn build_server_config(
    cert_path: &Path,
    key_path: &Path,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certificates(cert_path)?;
    let key = read_private_key(key_path)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = certified_key(&provider, certs, key, cert_path, key_path)?;

    // builder_with_provider, not builder(): the process-wide default provider panics when
    // feature unification enables both ring and aws-lc-rs somewhere in the dependency graph.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    // The provider lists the strongest suites first; a client's preference does not override
    // that (as Postfix's tls_preempt_cipherlist).
    config.ignore_client_order = true;
    // SMTP negotiates no ALPN protocol; a client offering some still gets a session.
    config.alpn_protocols = Vec::new();
    config.ticketer = Arc::clone(&resumption.ticketer);
    config.session_storage = Arc::clone(&resumption.cache);
    // One TLS 1.3 ticket per handshake, not rustls' two: a sending MTA opens one connection
    // at a time per destination and a TLS 1.3 ticket is used once, so the second would cost
    // an encryption and a record for nothing. A client that resumes gets a fresh one.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// Why TLS could not be set up or went wrong; the file-related variants name the file.
#[derive(Debug)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    Unreadable { path: PathBuf, source: io::Error },
    /// The file is not valid PEM.
    BadPem { path: PathBuf, reason: String },
    /// The certificate file holds no `CERTIFICATE` section.
    NoCertificate { path: PathBuf },
    /// The key file holds no private key section.
    NoKey { path: PathBuf },
    /// The private key is malformed or of a type rustls cannot sign with.
    UnsupportedKey { path: PathBuf, reason: String },
    /// The leaf certificate could not be parsed.
    BadCertificate { path: PathBuf, reason: String },
    /// The private key is not the one the leaf certificate certifies.
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the configuration.
    Config(rustls::Error),
    /// The peer broke the TLS protocol (or sent something that is not TLS).
    Protocol(rustls::Error),
    /// Moving bytes through rustls failed.
    Io(io::Error),
}

impl TlsError {
    /// The file a loading error is about, if any (the key for a mismatch).
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Unreadable { path, .. }
            | TlsError::BadPem { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoKey { path }
            | TlsError::UnsupportedKey { path, .. }
            | TlsError::BadCertificate { path, .. } => Some(path),
            TlsError::KeyMismatch { key, .. } => Some(key),
            TlsError::Config(_) | TlsError::Protocol(_) | TlsError::Io(_) => None,
        }
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            Self::BadPem { path, reason } => {
                write!(f, "{}: not valid PEM: {reason}", path.display())
            }
            Self::NoCertificate { path } => {
                write!(f, "{}: no certificate in PEM", path.display())
            }
            Self::NoKey { path } => write!(f, "{}: no private key in PEM", path.display()),
            Self::UnsupportedKey { path, reason } => {
                write!(f, "{}: unusable private key: {reason}", path.display())
            }
            Self::BadCertificate { path, reason } => {
                write!(f, "{}: bad certificate: {reason}", path.display())
            }
            Self::KeyMismatch { cert, key } => write!(
                f,
                "{}: private key does not match the certificate in {}",
                key.display(),
                cert.display()
            ),
            Self::Config(e) => write!(f, "TLS configuration refused: {e}"),
            Self::Protocol(e) => write!(f, "TLS protocol error: {e}"),
            Self::Io(e) => write!(f, "TLS I/O error: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreadable { source, .. } => Some(source),
            Self::Config(e) | Self::Protocol(e) => Some(e),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// The current server configuration, replaceable at run time (SIGHUP).
#[derive(Debug)]
pub struct TlsAcceptor {
    /// The full-chain PEM file, re-read on every reload.
    cert_path: PathBuf,
    /// The private-key PEM file, re-read on every reload.
    key_path: PathBuf,
    /// The configuration new sessions start with. Readers clone the `Arc` and let go of the lock
    /// at once, so a reload never waits on a handshake.
    current: RwLock<Arc<ServerConfig>>,
    /// The ticket key and session cache, carried from one configuration to the next.
    resumption: Resumption,
}

impl TlsAcceptor {
    /// Loads the pair once; startup fails if it does not load.
    pub fn new(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let resumption = Resumption::new()?;
        let config = build_server_config(cert_path, key_path, &resumption)?;
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(config),
            resumption,
        })
    }

    /// Re-reads both files; on any error the previous configuration stays in use. Sessions
    /// issued before the reload still resume: resumption proves the secret of a handshake the
    /// client already accepted, so it does not depend on the certificate served now, and a
    /// renewed certificate does not turn every returning client into a full handshake.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build_server_config(&self.cert_path, &self.key_path, &self.resumption)?;
        // A poisoned lock still holds a whole Arc (the only write is one assignment), so the
        // value is safe to replace.
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        *current = config;
        Ok(())
    }

    /// The configuration a session starting now would use.
    pub fn config(&self) -> Arc<ServerConfig> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&current)
    }

    /// Starts the server side of a handshake (after `220 2.0.0 Ready to start TLS`).
    ///
    /// The caller must first discard every plaintext byte that arrived after the STARTTLS line
    /// (RFC 3207 4.2; the CVE-2011-0411 command injection): only bytes read after the 220 go
    /// into [`TlsSession::receive_ciphertext`].
    ///
    /// Boxed, because the connection keeps it beside much smaller plaintext state.
    pub fn accept(&self) -> Result<Box<TlsSession>, TlsError> {
        TlsSession::new(self.config()).map(Box::new)
    }

    /// The certificate file this acceptor reloads from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The key file this acceptor reloads from.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

/// One TLS connection with no socket inside; the caller moves the bytes. The server side of
/// STARTTLS is `TlsSession` (`ServerConnection`); the relay link's side toward the next hop is
/// `TlsSession<ClientConnection>`. Both take and give bytes the same way:
///
/// - ciphertext in: [`Self::receive_ciphertext`], then [`Self::take_plaintext`];
/// - plaintext out: [`Self::send_plaintext`] hands rustls what it takes and keeps the rest in
///   this session's own buffer (never dropped; [`Self::unsent`] says how much waits, so the
///   caller can stop producing);
/// - ciphertext out: [`Self::write_tls_to`] writes records to a socket until it would block,
///   and refills rustls from the kept plaintext each time records have gone out;
///   [`Self::take_ciphertext`] does the same into a `Vec`, which takes everything.
pub struct TlsSession<C = ServerConnection> {
    /// The rustls state machine.
    conn: C,
    /// Plaintext taken out of rustls early because its 16 KiB receive buffer was full.
    plaintext: Vec<u8>,
    /// Plaintext for the peer that rustls did not take yet (its outgoing buffer was at
    /// SEND_BUFFER_LIMIT); it goes, in order, as records are written out.
    unsent: Vec<u8>,
    /// The peer sent close_notify: no more plaintext will come.
    peer_closed: bool,
}

impl TlsSession<ServerConnection> {
    /// Starts a server connection with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        ServerConnection::new(config)
            .map(Self::wrap)
            .map_err(TlsError::Config)
    }

    /// The negotiated version and cipher, once the handshake is done.
    pub fn info(&self) -> Option<TlsInfo> {
        if self.conn.is_handshaking() {
            return None;
        }
        let version = match self.conn.protocol_version()? {
            ProtocolVersion::TLSv1_3 => "TLSv1.3",
            ProtocolVersion::TLSv1_2 => "TLSv1.2",
            _ => return None,
        };
        let suite = self.conn.negotiated_cipher_suite()?.suite();
        let (cipher, bits) = cipher_name(suite);
        Some(TlsInfo {
            version: version.to_string(),
            cipher,
            bits,
        })
    }
}

impl TlsSession<ClientConnection> {
    /// Starts a client connection to `name` with `config` (the relay link's STARTTLS).
    pub fn connect(config: Arc<ClientConfig>, name: ServerName<'static>) -> Result<Self, TlsError> {
        ClientConnection::new(config, name)
            .map(Self::wrap)
            .map_err(TlsError::Config)
    }
}

impl<C, D> TlsSession<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    fn wrap(mut conn: C) -> Self {
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        Self {
            conn,
            plaintext: Vec::new(),
            unsent: Vec::new(),
            peer_closed: false,
        }
    }

    /// Feeds ciphertext read from the socket; all of `data` is consumed or an error returned.
    ///
    /// On [`TlsError::Protocol`] the alert for the peer is already queued: call
    /// [`Self::take_ciphertext`] once, write it, then close.
    pub fn receive_ciphertext(&mut self, data: &[u8]) -> Result<(), TlsError> {
        let mut rest = data;
        // Never call read_tls with an empty slice: rustls takes a zero-length read as EOF.
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                // Only after close_notify: whatever follows it is ignored, as RFC 8446 6.1 allows.
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    // rustls stops reading while 16 KiB of plaintext wait unread; moving it
                    // aside lets the rest of `data` through. Any other error stays an error.
                    let before = self.plaintext.len();
                    let drained =
                        read_plaintext(&mut self.conn, &mut self.plaintext, &mut self.peer_closed);
                    drained?;
                    if self.plaintext.len() > before {
                        continue;
                    }
                    return Err(TlsError::Io(e));
                }
            }
            // Process after every read: the deframer holds at most one record's worth.
            self.conn
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
        }
        Ok(())
    }

    /// Appends all plaintext decrypted so far to `into`.
    pub fn take_plaintext(&mut self, into: &mut Vec<u8>) -> Result<(), TlsError> {
        into.append(&mut self.plaintext);
        read_plaintext(&mut self.conn, into, &mut self.peer_closed)
    }

    /// Encrypts `data` for the peer as far as rustls' outgoing buffer allows, and keeps the
    /// rest, in order, for [`Self::write_tls_to`] / [`Self::take_ciphertext`] to hand over
    /// once records have gone out. Returns how many bytes now wait in that buffer.
    pub fn send_plaintext(&mut self, data: &[u8]) -> Result<usize, TlsError> {
        if self.unsent.is_empty() {
            let taken = write_plaintext(&mut self.conn, data)?;
            self.unsent.extend_from_slice(&data[taken..]);
        } else {
            // Older bytes wait: these go behind them.
            self.unsent.extend_from_slice(data);
            self.refill()?;
        }
        Ok(self.unsent.len())
    }

    /// Plaintext handed to [`Self::send_plaintext`] that rustls has not taken yet.
    pub fn unsent(&self) -> usize {
        self.unsent.len()
    }

    /// Writes TLS records to `sink` until it would block or nothing is left, handing rustls
    /// the kept plaintext as its buffer empties. `WouldBlock` is not an error: the rest waits
    /// for the next writable event.
    pub fn write_tls_to(&mut self, sink: &mut dyn io::Write) -> io::Result<()> {
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(sink) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if self.unsent.is_empty() {
                return Ok(());
            }
            let before = self.unsent.len();
            self.refill().map_err(io::Error::other)?;
            if self.unsent.len() == before {
                // Before the handshake ends rustls holds plaintext back; the handshake's own
                // records will make room.
                return Ok(());
            }
        }
    }

    /// Appends every TLS record waiting to be sent to `into`, with the kept plaintext
    /// encrypted too (a `Vec` takes all of it).
    pub fn take_ciphertext(&mut self, into: &mut Vec<u8>) {
        // Writing into a Vec cannot block; an error here can only come from rustls refusing
        // plaintext, and then what it refused stays kept for a later call.
        let _ = self.write_tls_to(into);
    }

    /// Queues a close_notify alert (a clean TLS close before the socket closes).
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// The handshake has not finished yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext waits to be written, or plaintext to be encrypted.
    pub fn wants_write(&self) -> bool {
        !self.unsent.is_empty() || self.conn.wants_write()
    }

    /// The peer sent close_notify; seen by [`Self::take_plaintext`].
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Moves kept plaintext into rustls as far as its outgoing buffer allows.
    fn refill(&mut self) -> Result<(), TlsError> {
        let taken = write_plaintext(&mut self.conn, &self.unsent)?;
        self.unsent.drain(..taken);
        Ok(())
    }
}

impl<C, D> fmt::Debug for TlsSession<C>
where
    C: Deref<Target = ConnectionCommon<D>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("plaintext", &self.plaintext.len())
            .field("unsent", &self.unsent.len())
            .field("peer_closed", &self.peer_closed)
            .finish()
    }
}

/// Hands rustls as much of `data` as its outgoing buffer takes; returns how much that was.
fn write_plaintext<D>(conn: &mut ConnectionCommon<D>, data: &[u8]) -> Result<usize, TlsError> {
    let mut taken = 0;
    while taken < data.len() {
        match conn.writer().write(&data[taken..]) {
            // At SEND_BUFFER_LIMIT: the rest waits until records have been written out.
            Ok(0) => break,
            Ok(n) => taken += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TlsError::Io(e)),
        }
    }
    Ok(taken)
}

/// Drains rustls' plaintext reader into `into` until it would block.
fn read_plaintext<D>(
    conn: &mut ConnectionCommon<D>,
    into: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> Result<(), TlsError> {
    // read_to_end grows `into` without zeroing the spare room on every call, and keeps what
    // it read when it stops with an error.
    match conn.reader().read_to_end(into) {
        // Ok means close_notify arrived and everything before it was read.
        Ok(_) => {
            *peer_closed = true;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(TlsError::Io(e)),
    }
}

/// IANA name (as Postfix logs it) and symmetric key bits of a suite.
fn cipher_name(suite: CipherSuite) -> (String, u16) {
    let (name, bits) = match suite {
        CipherSuite::TLS13_AES_256_GCM_SHA384 => ("TLS_AES_256_GCM_SHA384", 256),
        CipherSuite::TLS13_AES_128_GCM_SHA256 => ("TLS_AES_128_GCM_SHA256", 128),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => ("TLS_CHACHA20_POLY1305_SHA256", 256),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => {
            ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", 256)
        }
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => {
            ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", 128)
        }
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            ("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256", 256)
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            ("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", 256)
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            ("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", 128)
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            ("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", 256)
        }
        // Not offered by the ring provider; name it the way rustls does rather than guess.
        other => {
            let name = format!("{other:?}");
            let bits = if name.contains("128") { 128 } else { 256 };
            return (name, bits);
        }
    };
    (name.to_string(), bits)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    // from_pem_slice takes the first PKCS#8, PKCS#1 or SEC1 section and skips everything else.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        other => TlsError::BadPem {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// Pairs chain and key, refusing a key that is not the leaf's.
fn certified_key(
    provider: &CryptoProvider,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::UnsupportedKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // The ring keys all expose their public key, so this only happens with a key type the
        // provider cannot describe; the handshake will still prove possession.
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            })
        }
        Err(e) => Err(TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::relay_link::opportunistic_tls_config;

    /// A socket that takes at most `per_write` bytes per call and then would block, until
    /// the test lets it take more.
    struct SlowSink {
        got: Vec<u8>,
        room: usize,
        per_write: usize,
    }

    impl io::Write for SlowSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.per_write).min(self.room);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn server_config() -> Arc<ServerConfig> {
        let (cert_path, key_path) = pair_on_disk("hop");
        load_server_config(&cert_path, &key_path).expect("server config")
    }

    /// A fresh self-signed pair written under the temp directory; `tag` keeps tests apart.
    fn pair_on_disk(tag: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("heloguard-tls-unit-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["hop.test".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (cert_path, key_path) = (dir.join("hop.crt"), dir.join("hop.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    #[test]
    fn configurations_resume_by_ticket_and_session_id_and_a_reload_keeps_both() {
        let (cert, key) = pair_on_disk("reload");
        let acceptor = TlsAcceptor::new(&cert, &key).expect("acceptor");
        let before = acceptor.config();
        assert!(before.ticketer.enabled(), "no TLS 1.3/1.2 tickets");
        assert_eq!(before.send_tls13_tickets, 1);
        assert!(
            before.session_storage.can_cache(),
            "no TLS 1.2 session-id cache"
        );
        acceptor.reload().expect("reload");
        let after = acceptor.config();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "the reload built no new configuration"
        );
        assert!(Arc::ptr_eq(&before.ticketer, &after.ticketer));
        assert!(Arc::ptr_eq(&before.session_storage, &after.session_storage));
    }

    fn handshake(client: &mut TlsSession<ClientConnection>, server: &mut TlsSession) {
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.take_ciphertext(&mut wire);
            server.receive_ciphertext(&wire).expect("server receives");
            let mut wire = Vec::new();
            server.take_ciphertext(&mut wire);
            client.receive_ciphertext(&wire).expect("client receives");
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("no handshake");
    }

    #[test]
    fn plaintext_beyond_the_send_limit_is_kept_and_sent_as_the_socket_drains() {
        let name = ServerName::try_from("hop.test").expect("name");
        let config = opportunistic_tls_config().expect("client config");
        let mut client = TlsSession::connect(config, name).expect("client");
        let mut server = TlsSession::new(server_config()).expect("server");
        handshake(&mut client, &mut server);

        let message: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let waiting = client.send_plaintext(&message).expect("send");
        assert!(
            waiting >= message.len() - SEND_BUFFER_LIMIT,
            "rustls took more than its limit: {waiting} wait"
        );
        assert_eq!(client.unsent(), waiting);
        // More goes behind what waits, never ahead of it.
        client.send_plaintext(b"END").expect("send");

        let mut sink = SlowSink {
            got: Vec::new(),
            room: 0,
            per_write: 7000,
        };
        let mut received = Vec::new();
        let mut rounds = 0;
        while client.wants_write() {
            rounds += 1;
            assert!(rounds < 1000, "stuck with {} unsent", client.unsent());
            sink.room = 20_000;
            client.write_tls_to(&mut sink).expect("write");
            server
                .receive_ciphertext(&std::mem::take(&mut sink.got))
                .expect("server receives");
            server.take_plaintext(&mut received).expect("plaintext");
        }
        assert!(
            rounds > 10,
            "the sink took it all too fast to show anything"
        );
        assert_eq!(received.len(), message.len() + 3);
        assert!(received[..message.len()] == message[..]);
        assert_eq!(&received[message.len()..], b"END");
    }
}

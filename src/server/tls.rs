//! TLS for STARTTLS: loading the certificate and key, reloading them on SIGHUP, and a sans-I/O
//! wrapper over `rustls::ServerConnection` that the event loop drives with byte slices.
//!
//! Contract:
//! - [`load_server_config`] reads a PEM full chain (leaf first) and a PEM private key (PKCS#8,
//!   PKCS#1 RSA or SEC1 EC; RSA, ECDSA P-256/P-384 or Ed25519), checks that the key belongs to
//!   the leaf, and builds a TLS 1.2 + 1.3 server configuration on the `ring` provider with the
//!   server's cipher order, no ALPN and no client certificates.
//! - [`TlsAcceptor`] holds the current configuration. [`TlsAcceptor::reload`] swaps it only when
//!   the new files load completely, so a bad reload (SIGHUP) keeps serving the old pair. A
//!   session that already started TLS keeps the configuration it began with.
//! - [`TlsSession`] owns no socket, in the style of rustls-test's `transfer()`: the caller hands
//!   in ciphertext it read, takes out plaintext, hands in plaintext replies and takes out
//!   ciphertext to write.
//!
//! Limits: rustls refuses to decrypt more once 16 KiB of plaintext wait unread; this wrapper then
//! moves that plaintext aside and carries on, so the plaintext held between two calls is at most
//! the ciphertext handed to one [`TlsSession::receive_ciphertext`] call plus 16 KiB. The event loop
//! bounds its reads, so this bounds memory. Outgoing TLS records are bounded by
//! [`SEND_BUFFER_LIMIT`] per [`TlsSession::send_plaintext`] call before the caller drains them.
//!
//! Failure: every error is a [`TlsError`]. A protocol error from the peer leaves the alert to
//! send in the session: the caller should call [`TlsSession::take_ciphertext`] once, write the
//! bytes, and close (the "last gasp" write of rustls' `tlsserver-mio` example).

use std::fmt;
use std::io;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ServerConnection;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CipherSuite, InconsistentKeys, ProtocolVersion, ServerConfig};

use crate::session::TlsInfo;

/// Outgoing TLS bytes rustls may buffer inside one session before the caller drains them.
pub const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// Loads a PEM certificate chain and private key into a TLS 1.2/1.3 server configuration.
pub fn load_server_config(
    cert_path: &Path,
    key_path: &Path,
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
    /// More plaintext was sent than the outgoing buffer holds; drain ciphertext first.
    SendBufferFull,
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
            TlsError::Config(_)
            | TlsError::Protocol(_)
            | TlsError::Io(_)
            | TlsError::SendBufferFull => None,
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
            Self::SendBufferFull => f.write_str("TLS send buffer full"),
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
}

impl TlsAcceptor {
    /// Loads the pair once; startup fails if it does not load.
    pub fn new(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let config = load_server_config(cert_path, key_path)?;
        Ok(Self {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(config),
        })
    }

    /// Re-reads both files; on any error the previous configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load_server_config(&self.cert_path, &self.key_path)?;
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
    pub fn accept(&self) -> Result<TlsSession, TlsError> {
        TlsSession::new(self.config())
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

/// One server-side TLS connection with no socket inside; the caller moves the bytes.
pub struct TlsSession {
    /// The rustls state machine.
    conn: ServerConnection,
    /// Plaintext taken out of rustls early because its 16 KiB receive buffer was full.
    plaintext: Vec<u8>,
    /// Ciphertext taken out of rustls early because its send buffer was full.
    ciphertext: Vec<u8>,
    /// The peer sent close_notify: no more plaintext will come.
    peer_closed: bool,
}

impl TlsSession {
    /// Starts a server connection with `config`.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let mut conn = ServerConnection::new(config).map_err(TlsError::Config)?;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        Ok(Self {
            conn,
            plaintext: Vec::new(),
            ciphertext: Vec::new(),
            peer_closed: false,
        })
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
                    let mut out = std::mem::take(&mut self.plaintext);
                    let drained = read_plaintext(&mut self.conn, &mut out, &mut self.peer_closed);
                    self.plaintext = out;
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

    /// Encrypts `data` for the peer; take the records with [`Self::take_ciphertext`].
    pub fn send_plaintext(&mut self, data: &[u8]) -> Result<(), TlsError> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.conn.writer().write(rest).map_err(TlsError::Io)?;
            if n == 0 {
                // The outgoing buffer is at its limit. After the handshake, moving the records
                // out makes room; before it, plaintext cannot be encrypted yet.
                if !self.conn.wants_write() {
                    return Err(TlsError::SendBufferFull);
                }
                let mut out = std::mem::take(&mut self.ciphertext);
                self.take_ciphertext(&mut out);
                self.ciphertext = out;
                continue;
            }
            rest = &rest[n..];
        }
        Ok(())
    }

    /// Appends every TLS record waiting to be sent to `into`.
    pub fn take_ciphertext(&mut self, into: &mut Vec<u8>) {
        into.append(&mut self.ciphertext);
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail; a zero-length write means nothing is left.
            match self.conn.write_tls(into) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Queues a close_notify alert (a clean TLS close before the socket closes).
    pub fn send_close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// The handshake has not finished yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext waits to be taken.
    pub fn wants_write(&self) -> bool {
        !self.ciphertext.is_empty() || self.conn.wants_write()
    }

    /// The peer sent close_notify; seen by [`Self::take_plaintext`].
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
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

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("plaintext", &self.plaintext.len())
            .field("ciphertext", &self.ciphertext.len())
            .field("peer_closed", &self.peer_closed)
            .finish()
    }
}

/// Drains rustls' plaintext reader into `into` until it would block.
fn read_plaintext(
    conn: &mut ServerConnection,
    into: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> Result<(), TlsError> {
    const CHUNK: usize = 4096;
    loop {
        let start = into.len();
        into.resize(start + CHUNK, 0);
        let read = conn.reader().read(&mut into[start..]);
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                into.truncate(start);
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(());
                }
                return Err(TlsError::Io(e));
            }
        };
        into.truncate(start + n);
        // Ok(0) from the reader means close_notify arrived and everything before it was read.
        if n == 0 {
            *peer_closed = true;
            return Ok(());
        }
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

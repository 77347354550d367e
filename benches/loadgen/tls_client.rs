//! The load generator's side of STARTTLS: a rustls client as a sending MTA uses it
//! (opportunistic: the certificate is not verified, the handshake signature is), optionally
//! keeping tickets and TLS 1.2 session ids to resume later sessions, and the byte pumping
//! between a socket's bytes and a `ClientConnection` for the event-driven sessions.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

/// The name the client sends in SNI (and keys its resumption store by).
pub const SERVER_NAME: &str = "mx.bench.test";

/// A client configuration: TLS 1.3 and 1.2 (or 1.2 only), resumption on or off.
pub fn client_config(resume: bool, tls12_only: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(Arc::clone(&provider)));
    let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap_or_else(|e| panic!("client versions: {e}"))
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = if resume {
        // One store for every connection: a session that ends leaves a ticket for the next.
        Resumption::in_memory_sessions(1024)
    } else {
        Resumption::disabled()
    };
    Arc::new(config)
}

/// A client connection to [`SERVER_NAME`].
pub fn connect(config: &Arc<ClientConfig>) -> Result<ClientConnection, String> {
    let name = ServerName::try_from(SERVER_NAME).map_err(|_| "tls:name".to_string())?;
    let mut conn = ClientConnection::new(Arc::clone(config), name)
        .map_err(|_| "tls:client-setup".to_string())?;
    // A whole message goes into rustls at once; the event loop drains it as the socket takes it.
    conn.set_buffer_limit(None);
    Ok(conn)
}

/// Feeds ciphertext from the socket and appends the plaintext it carried to `plain`.
pub fn receive(
    conn: &mut ClientConnection,
    mut bytes: &[u8],
    plain: &mut Vec<u8>,
) -> Result<(), String> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes)
            .map_err(|e| format!("tls-read:{:?}", e.kind()))?;
        conn.process_new_packets()
            .map_err(|_| "tls:protocol".to_string())?;
        match conn.reader().read_to_end(plain) {
            // close_notify: the server closes after its last reply (Postfix does after 221),
            // which is already in `plain`; the socket's EOF follows.
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("tls-plaintext:{:?}", e.kind())),
        }
    }
    Ok(())
}

/// Encrypts `data` for the server.
pub fn send(conn: &mut ClientConnection, data: &[u8]) -> Result<(), String> {
    conn.writer()
        .write_all(data)
        .map_err(|e| format!("tls-write:{:?}", e.kind()))
}

/// Moves every record rustls wants to send onto `out`.
pub fn seal(conn: &mut ClientConnection, out: &mut Vec<u8>) {
    while conn.wants_write() {
        // Writing into a Vec does not fail.
        if conn.write_tls(out).is_err() {
            return;
        }
    }
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

//! TLS without sockets: a rustls client and a `TlsSession` exchange bytes through `Vec`s, in the
//! style of rustls-test's `transfer()`.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection};

use common::certs;
use heloguard::server::tls::{TlsAcceptor, TlsError, TlsSession, load_server_config};

/// Moves everything the client wants to send into the server.
fn client_to_server(
    client: &mut ClientConnection,
    server: &mut TlsSession,
) -> Result<(), TlsError> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client
            .write_tls(&mut wire)
            .expect("client write_tls into a Vec");
    }
    server.receive_ciphertext(&wire)
}

/// Moves everything the server wants to send into the client.
fn server_to_client(server: &mut TlsSession, client: &mut ClientConnection) {
    let mut wire = Vec::new();
    server.take_ciphertext(&mut wire);
    let mut rest = &wire[..];
    while !rest.is_empty() {
        client.read_tls(&mut rest).expect("client read_tls");
        client
            .process_new_packets()
            .expect("client accepts the server's records");
    }
}

fn handshake(client: &mut ClientConnection, server: &mut TlsSession) {
    for _ in 0..10 {
        client_to_server(client, server).expect("server accepts the client's records");
        server_to_client(server, client);
        if !client.is_handshaking() && !server.is_handshaking() {
            // Flush the client's Finished (TLS 1.2) or anything it still has queued.
            client_to_server(client, server).expect("server accepts the client's records");
            return;
        }
    }
    panic!("handshake did not finish in 10 round trips");
}

fn connect(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<ClientConfig>,
) -> (ClientConnection, TlsSession) {
    let mut server = TlsSession::new(server_config).expect("server session");
    let mut client = certs::client_connection(client_config);
    handshake(&mut client, &mut server);
    (client, server)
}

fn client_reads(client: &mut ClientConnection) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match client.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("client read: {e}"),
        }
    }
    got
}

/// Handshakes with the pair in `dir/name.*` and checks plaintext both ways.
fn round_trip(
    cert: &Path,
    key: &Path,
    cert_der: &[u8],
    client_config: Option<Arc<ClientConfig>>,
) -> heloguard::session::TlsInfo {
    let server_config = load_server_config(cert, key).expect("server config");
    let client_config = client_config.unwrap_or_else(|| certs::client_config(cert_der));
    let (mut client, mut server) = connect(server_config, client_config);

    client
        .writer()
        .write_all(b"EHLO client.example\r\n")
        .expect("client write");
    client_to_server(&mut client, &mut server).expect("server receives");
    let mut plain = Vec::new();
    server.take_plaintext(&mut plain).expect("server plaintext");
    assert_eq!(plain, b"EHLO client.example\r\n");

    server
        .send_plaintext(b"250 mail.example.test\r\n")
        .expect("server send");
    server_to_client(&mut server, &mut client);
    assert_eq!(client_reads(&mut client), b"250 mail.example.test\r\n");

    server.info().expect("info after the handshake")
}

#[test]
fn ecdsa_p256_tls13_both_directions() {
    let dir = certs::scratch_dir("tls13");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let info = round_trip(&cert, &key, &der, None);
    assert_eq!(info.version, "TLSv1.3");
    assert_eq!(info.cipher, "TLS_AES_256_GCM_SHA384");
    assert_eq!(info.bits, 256);
}

#[test]
fn tls12_only_client() {
    let dir = certs::scratch_dir("tls12");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let client = certs::client_config_with_versions(&der, &[&rustls::version::TLS12]);
    let info = round_trip(&cert, &key, &der, Some(client));
    assert_eq!(info.version, "TLSv1.2");
    assert_eq!(info.cipher, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384");
    assert_eq!(info.bits, 256);
}

#[test]
fn tls13_only_client() {
    let dir = certs::scratch_dir("tls13only");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let client = certs::client_config_with_versions(&der, &[&rustls::version::TLS13]);
    let info = round_trip(&cert, &key, &der, Some(client));
    assert_eq!(info.version, "TLSv1.3");
}

#[test]
fn server_cipher_order_wins() {
    let dir = certs::scratch_dir("order");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    // A client that lists AES-128 first, then ChaCha20, then AES-256.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.reverse();
    let client = certs::client_config_with_provider(&der, &[&rustls::version::TLS13], provider);
    let info = round_trip(&cert, &key, &der, Some(client));
    assert_eq!(info.cipher, "TLS_AES_256_GCM_SHA384");
}

#[test]
fn aes128_only_client_gets_128_bits() {
    let dir = certs::scratch_dir("aes128");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let client = certs::client_config_with_provider(&der, &[&rustls::version::TLS13], provider);
    let info = round_trip(&cert, &key, &der, Some(client));
    assert_eq!(
        (info.cipher.as_str(), info.bits),
        ("TLS_AES_128_GCM_SHA256", 128)
    );
}

#[test]
fn ecdsa_p384_and_ed25519_keys() {
    let dir = certs::scratch_dir("keys");
    for (name, alg) in [
        ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let key = certs::generate_key(alg);
        let (cert_pem, der) = certs::self_signed(&key, 7);
        let (cert, key_path) = certs::write_pair(&dir, name, &cert_pem, &key.serialize_pem());
        let info = round_trip(&cert, &key_path, &der, None);
        assert_eq!(info.version, "TLSv1.3", "{name}");
    }
}

#[test]
fn sec1_ec_key() {
    let dir = certs::scratch_dir("sec1");
    let key = certs::generate_key(&rcgen::PKCS_ECDSA_P256_SHA256);
    let sec1 = match certs::openssl_traditional(&key.serialize_pem()) {
        Ok(pem) => pem,
        Err(why) => {
            common::skip_without("openssl", &format!("the SEC1 key test: {why}"));
            return;
        }
    };
    assert!(sec1.contains("BEGIN EC PRIVATE KEY"));
    let (cert_pem, der) = certs::self_signed(&key, 8);
    let (cert, key_path) = certs::write_pair(&dir, "sec1", &cert_pem, &sec1);
    round_trip(&cert, &key_path, &der, None);
}

#[test]
fn rsa_keys_pkcs8_and_pkcs1() {
    let pkcs8 = match certs::openssl_rsa_pkcs8() {
        Ok(pem) => pem,
        Err(why) => {
            common::skip_without("openssl", &format!("the RSA key test: {why}"));
            return;
        }
    };
    let pkcs1 = match certs::openssl_traditional(&pkcs8) {
        Ok(pem) => pem,
        Err(why) => {
            common::skip_without("openssl", &format!("the RSA key test: {why}"));
            return;
        }
    };
    assert!(pkcs1.contains("BEGIN RSA PRIVATE KEY"));
    let key = rcgen::KeyPair::from_pem(&pkcs8).expect("rcgen loads the RSA key");
    let (cert_pem, der) = certs::self_signed(&key, 9);
    let dir = certs::scratch_dir("rsa");
    for (name, key_pem) in [("pkcs8", &pkcs8), ("pkcs1", &pkcs1)] {
        let (cert, key_path) = certs::write_pair(&dir, name, &cert_pem, key_pem);
        let tls12 = certs::client_config_with_versions(&der, &[&rustls::version::TLS12]);
        let info = round_trip(&cert, &key_path, &der, Some(tls12));
        assert_eq!(
            info.cipher, "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "{name}"
        );
        let info = round_trip(&cert, &key_path, &der, None);
        assert_eq!(info.version, "TLSv1.3", "{name}");
    }
}

#[test]
fn garbage_instead_of_client_hello_queues_an_alert() {
    let dir = certs::scratch_dir("garbage");
    let (cert, key, _) = certs::write_self_signed(&dir, "p256", 1);
    let acceptor = TlsAcceptor::new(&cert, &key).expect("acceptor");
    let mut server = acceptor.accept().expect("session");
    let err = server
        .receive_ciphertext(b"EHLO attacker.example\r\nMAIL FROM:<a@b>\r\n")
        .expect_err("plaintext SMTP is not TLS");
    assert!(matches!(err, TlsError::Protocol(_)), "{err}");
    assert!(server.wants_write());
    let mut alert = Vec::new();
    server.take_ciphertext(&mut alert);
    // An alert record: content type 21.
    assert_eq!(alert.first(), Some(&0x15), "{alert:?}");
    // The error sticks: nothing after it is processed.
    assert!(server.receive_ciphertext(b"\x16\x03\x01").is_err());
}

#[test]
fn key_of_another_certificate_is_refused_naming_the_key() {
    let dir = certs::scratch_dir("mismatch");
    let (cert, _, _) = certs::write_self_signed(&dir, "one", 1);
    let (_, other_key, _) = certs::write_self_signed(&dir, "two", 2);
    let err = load_server_config(&cert, &other_key).expect_err("mismatch");
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&other_key.display().to_string()), "{text}");
    assert!(text.contains("does not match"), "{text}");
}

#[test]
fn file_errors_name_the_file_and_the_reason() {
    let dir = certs::scratch_dir("files");
    let (cert, key, _) = certs::write_self_signed(&dir, "ok", 1);
    let missing = dir.join("missing.pem");

    let err = load_server_config(&missing, &key).expect_err("missing cert");
    assert!(matches!(err, TlsError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // The key file holds no CERTIFICATE section.
    let err = load_server_config(&key, &key).expect_err("no certificate");
    assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("no certificate in PEM"), "{err}");

    // The certificate file holds no key.
    let err = load_server_config(&cert, &cert).expect_err("no key");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
    assert!(err.to_string().contains("ok.crt"), "{err}");
}

#[test]
fn reload_switches_new_sessions_and_a_failed_reload_keeps_the_old() {
    let dir = certs::scratch_dir("reload");
    let (cert, key, der1) = certs::write_self_signed(&dir, "live", 1);
    let acceptor = TlsAcceptor::new(&cert, &key).expect("acceptor");

    let (client, _) = connect(acceptor.config(), certs::client_config(&der1));
    assert_eq!(peer_serial(&client), certs::serial_octets(1));

    // A session created before the reload keeps its configuration.
    let mut early = acceptor.accept().expect("session");

    let (_, _, der2) = certs::write_self_signed(&dir, "live", 2);
    acceptor.reload().expect("reload");
    let mut server = acceptor.accept().expect("session");
    let mut client = certs::client_connection(certs::client_config(&der2));
    handshake(&mut client, &mut server);
    assert_eq!(peer_serial(&client), certs::serial_octets(2));

    let mut client = certs::client_connection(certs::client_config(&der1));
    handshake(&mut client, &mut early);
    assert_eq!(peer_serial(&client), certs::serial_octets(1));

    // A key file that no longer parses: the reload fails and serial 2 stays.
    std::fs::write(&key, "not a key\n").expect("spoil the key");
    let err = acceptor.reload().expect_err("spoiled key");
    assert!(matches!(err, TlsError::NoKey { .. }), "{err}");
    let (client, _) = connect(acceptor.config(), certs::client_config(&der2));
    assert_eq!(peer_serial(&client), certs::serial_octets(2));
}

#[test]
fn large_plaintext_from_the_client_in_one_slice() {
    let dir = certs::scratch_dir("bulk-in");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let config = load_server_config(&cert, &key).expect("config");
    let (mut client, mut server) = connect(config, certs::client_config(&der));

    // Far more than rustls' 16 KiB receive buffer, handed over in one call (the client's own
    // send limit lifted so it can queue it all).
    client.set_buffer_limit(None);
    let message: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    client.writer().write_all(&message).expect("client write");
    client_to_server(&mut client, &mut server).expect("server receives");
    let mut plain = Vec::new();
    server.take_plaintext(&mut plain).expect("plaintext");
    assert_eq!(plain.len(), message.len());
    assert!(plain == message);
}

#[test]
fn large_plaintext_from_the_server() {
    let dir = certs::scratch_dir("bulk-out");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let config = load_server_config(&cert, &key).expect("config");
    let (mut client, mut server) = connect(config, certs::client_config(&der));

    let reply: Vec<u8> = (0..300_000u32).map(|i| b'0' + (i % 10) as u8).collect();
    server
        .send_plaintext(&reply)
        .expect("server send beyond the buffer limit");
    let mut wire = Vec::new();
    server.take_ciphertext(&mut wire);
    assert!(!server.wants_write());
    let mut got = Vec::new();
    let mut rest = &wire[..];
    while !rest.is_empty() {
        client.read_tls(&mut rest).expect("client read_tls");
        client.process_new_packets().expect("client process");
        got.extend(client_reads(&mut client));
    }
    assert!(got == reply);
}

#[test]
fn close_notify_is_reported() {
    let dir = certs::scratch_dir("close");
    let (cert, key, der) = certs::write_self_signed(&dir, "p256", 1);
    let config = load_server_config(&cert, &key).expect("config");
    let (mut client, mut server) = connect(config, certs::client_config(&der));

    client
        .writer()
        .write_all(b"QUIT\r\n")
        .expect("client write");
    client.send_close_notify();
    client_to_server(&mut client, &mut server).expect("server receives");
    let mut plain = Vec::new();
    server.take_plaintext(&mut plain).expect("plaintext");
    assert_eq!(plain, b"QUIT\r\n");
    assert!(server.peer_closed());
}

#[test]
fn no_info_before_the_handshake() {
    let dir = certs::scratch_dir("info");
    let (cert, key, _) = certs::write_self_signed(&dir, "p256", 1);
    let acceptor = TlsAcceptor::new(&cert, &key).expect("acceptor");
    let server = acceptor.accept().expect("session");
    assert!(server.is_handshaking());
    assert!(server.info().is_none());
}

fn peer_serial(client: &ClientConnection) -> Vec<u8> {
    let chain = client.peer_certificates().expect("server certificate");
    certs::serial_of(chain[0].as_ref()).expect("serial in the certificate")
}

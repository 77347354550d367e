//! Test certificates: self-signed pairs written to PEM files, and rustls clients trusting them.
//!
//! Every integration test binary that declares `mod common;` compiles this file, and most use
//! only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{CertificateParams, KeyPair, SerialNumber, SignatureAlgorithm};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion};

/// The DNS name every test certificate carries (with `localhost` and `127.0.0.1`).
pub const SERVER_NAME: &str = "mail.example.test";

/// Writes a self-signed ECDSA P-256 certificate and its PKCS#8 key to `dir/name.{crt,key}`.
///
/// Returns the certificate path, the key path and the certificate's DER.
pub fn write_self_signed(dir: &Path, name: &str, serial: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate P-256 key");
    let (cert_pem, der) = self_signed(&key, serial);
    let (cert, key_path) = write_pair(dir, name, &cert_pem, &key.serialize_pem());
    (cert, key_path, der)
}

/// A self-signed certificate for `key` with `serial`: (PEM, DER).
pub fn self_signed(key: &KeyPair, serial: u64) -> (String, Vec<u8>) {
    let names = vec![
        SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    let mut params = CertificateParams::new(names).expect("certificate names");
    params.serial_number = Some(SerialNumber::from(serial));
    let cert = params.self_signed(key).expect("self-sign");
    (cert.pem(), cert.der().to_vec())
}

/// A fresh key pair of `alg` (ECDSA or Ed25519; RSA needs [`openssl_rsa_pkcs8`]).
pub fn generate_key(alg: &'static SignatureAlgorithm) -> KeyPair {
    KeyPair::generate_for(alg).expect("generate key")
}

/// Writes `cert_pem` and `key_pem` to `dir/name.crt` and `dir/name.key`.
pub fn write_pair(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, cert_pem).expect("write certificate");
    std::fs::write(&key, key_pem).expect("write key");
    (cert, key)
}

/// A new empty directory under the system temp directory, unique per process and call.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("heloguard-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A 2048-bit RSA key in PKCS#8 PEM from `openssl genrsa`; Err says why it is unavailable.
///
/// rcgen cannot generate RSA keys with the ring backend, but it can sign with a loaded one.
pub fn openssl_rsa_pkcs8() -> Result<String, String> {
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        None,
    )
}

/// Re-encodes a PKCS#8 PEM key in its traditional form: PKCS#1 for RSA, SEC1 for EC.
pub fn openssl_traditional(pkcs8_pem: &str) -> Result<String, String> {
    openssl(&["pkey", "-traditional"], Some(pkcs8_pem))
}

fn openssl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    use std::process::Stdio;

    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("openssl not runnable: {e}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().ok_or("openssl stdin")?;
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("openssl stdin: {e}"))?;
    }
    drop(child.stdin.take());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("openssl output: {e}"))
}

/// A TLS 1.2 + 1.3 client (ring provider) trusting only `cert_der`.
pub fn client_config(cert_der: &[u8]) -> Arc<ClientConfig> {
    client_config_with_versions(
        cert_der,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

/// A client limited to `versions`, trusting only `cert_der`.
pub fn client_config_with_versions(
    cert_der: &[u8],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    client_config_with_provider(cert_der, versions, rustls::crypto::ring::default_provider())
}

/// A client with its own provider (e.g. a reordered cipher-suite list), trusting `cert_der`.
pub fn client_config_with_provider(
    cert_der: &[u8],
    versions: &[&'static SupportedProtocolVersion],
    provider: rustls::crypto::CryptoProvider,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert_der.to_vec()))
        .expect("trust anchor");
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("client versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A client connection to [`SERVER_NAME`] with `config`.
pub fn client_connection(config: Arc<ClientConfig>) -> ClientConnection {
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    ClientConnection::new(config, name).expect("client connection")
}

/// The serial number's content octets from a certificate's DER, read by hand (no parser
/// dependency): Certificate ::= SEQUENCE { tbs SEQUENCE { [0] version OPTIONAL, serial INTEGER
/// ...
pub fn serial_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (tag, cert, _) = der_item(cert_der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (first_tag, first, after) = der_item(tbs)?;
    // Skip the explicit [0] version when present (v3 certificates carry it).
    let (tag, mut value) = if first_tag == 0xa0 {
        let (tag, value, _) = der_item(after)?;
        (tag, value)
    } else {
        (first_tag, first)
    };
    if tag != 0x02 {
        return None;
    }
    // Drop the sign-padding zero DER puts before a high first octet (and any zeros an encoder
    // left in front), so the result compares with serial_octets().
    while let [0, tail @ ..] = value {
        if tail.is_empty() {
            break;
        }
        value = tail;
    }
    Some(value.to_vec())
}

/// The big-endian octets of `serial` without leading zeros, to compare with [`serial_of`].
pub fn serial_octets(serial: u64) -> Vec<u8> {
    let bytes = serial.to_be_bytes();
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    bytes[first..].to_vec()
}

/// One DER TLV: (tag, contents, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (len_bytes, tail) = rest.split_at(count);
        rest = tail;
        len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (value, tail) = rest.split_at(len);
    Some((tag, value, tail))
}

//! TLS: the same protocol over rustls, with a certificate generated in the test.

use std::path::{Path, PathBuf};

use bucketly::config::TlsFiles;
use bucketly::Client;
use serde_json::json;

use crate::common::{cli, config_in, Daemon, TestServer, ADMIN, ADMIN_PASSWORD};

/// Writes a self-signed certificate for `localhost` and 127.0.0.1 and its key into `dir`.
fn certificate(dir: &Path, stem: &str) -> TlsFiles {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let issued = rcgen::generate_simple_self_signed(names).expect("certificate");
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, issued.cert.pem()).expect("write cert");
    std::fs::write(&key, issued.signing_key.serialize_pem()).expect("write key");
    TlsFiles { cert, key }
}

async fn tls_server(dir: &Path) -> (TestServer, PathBuf) {
    let files = certificate(dir, "server");
    let ca = files.cert.clone();
    let mut config = config_in(dir);
    config.tls = Some(files);
    (TestServer::start_with(config).await, ca)
}

// A client that trusts the server's certificate logs in and uses every kind of command
// over TLS, pipelined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, ca) = tls_server(dir.path()).await;
    for host in ["localhost", "127.0.0.1"] {
        let client = Client::connect_tls(host, server.addr.port(), Some(&ca))
            .await
            .expect("TLS connect");
        client.login(ADMIN, ADMIN_PASSWORD).await.expect("login");
        let bucket = format!("b.{}", host.replace('.', "-"));
        client
            .create(&bucket, "counter", None)
            .await
            .expect("create");
        let mut pending = Vec::new();
        for _ in 0..200 {
            pending.push(
                client
                    .start_send(&bucket, &["a", "b", "a"])
                    .await
                    .expect("queue"),
            );
        }
        for p in pending {
            assert_eq!(Client::finish_send(p).await.expect("send").accepted, 3);
        }
        assert_eq!(
            client.view(&bucket, None).await.expect("view"),
            json!({"a": 400, "b": 200})
        );
    }
    server.stop().await;
}

// Mismatched peers fail promptly with an error instead of hanging: plain client to a TLS
// port, TLS client to a plain port, and a certificate from an untrusted CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatches_fail_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _ca) = tls_server(dir.path()).await;
    let plain = Client::connect(server.addr).await;
    assert!(plain.is_err(), "plain client on a TLS port must fail");

    let other = certificate(dir.path(), "other");
    let untrusted = Client::connect_tls("localhost", server.addr.port(), Some(&other.cert)).await;
    let err = untrusted.err().expect("untrusted certificate");
    assert!(err.to_string().contains("TLS"), "{err}");

    let plain_dir = tempfile::tempdir().expect("tempdir");
    let plain_server = TestServer::start_with(config_in(plain_dir.path())).await;
    let wrong = Client::connect_tls("localhost", plain_server.addr.port(), Some(&other.cert)).await;
    assert!(wrong.is_err(), "TLS client on a plain port must fail");
    plain_server.stop().await;
    server.stop().await;
}

// The binaries: bucketlyd --tls-cert/--tls-key, and the CLI with --ca.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = certificate(dir.path(), "server");
    let (cert, key) = (
        files.cert.to_string_lossy().into_owned(),
        files.key.to_string_lossy().into_owned(),
    );
    let daemon = Daemon::start(dir.path(), &["--tls-cert", &cert, "--tls-key", &key]).await;
    let port = daemon.addr.port().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(cli())
            .args(["--host", "localhost", "--port", &port, "--ca", &cert])
            .args(["--user", ADMIN, "--password", ADMIN_PASSWORD])
            .args(args)
            .output()
            .expect("run bucketly")
    };
    for args in [
        &["create", "t", "--handler", "counter"][..],
        &["send", "t", "x", "y", "x"],
    ] {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = run(&["view", "t"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(view, json!({"x": 2, "y": 1}));
    daemon.terminate().await;

    // A key that does not match the certificate stops the start with one clear line.
    let other = certificate(dir.path(), "other");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bucketlyd"))
        .arg(dir.path().join("x.redb"))
        .args(["--port", "0", "--tls-cert", &cert, "--tls-key"])
        .arg(&other.key)
        .output()
        .expect("run bucketlyd");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS:"), "{stderr}");
    assert!(
        !dir.path().join("x.redb").exists(),
        "a refused start created the database"
    );
}

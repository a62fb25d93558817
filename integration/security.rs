//! TLS serving and bearer tokens: a peer serving `grpc+https` and requiring
//! a token; a sidecar that names the peer's CA and token reads from it,
//! one without the token is refused, and plain-text clients get nowhere.

use strata::addr::PeerAddr;
use strata::blobservice::BlobService;
use strata::kinds::grpc::{GrpcBlobService, PeerOptions, Protocol};

use crate::harness::{Daemon, cli, cli_ok, read_blob, test_data};

struct Secrets {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    token: std::path::PathBuf,
    cert_pem: Vec<u8>,
}

fn secrets() -> Secrets {
    let dir = tempfile::tempdir().unwrap();
    let issued = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = issued.cert.pem().into_bytes();
    let (cert, key, token) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("token"),
    );
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
    std::fs::write(&token, "s3cret-token\n").unwrap();
    Secrets {
        _dir: dir,
        cert,
        key,
        token,
        cert_pem,
    }
}

fn client(addr: &str, s: &Secrets, token: Option<&str>) -> GrpcBlobService {
    GrpcBlobService::with_options(
        addr.parse::<PeerAddr>().unwrap(),
        Protocol::Snix,
        PeerOptions {
            token: token.map(str::to_owned),
            ca_pem: Some(s.cert_pem.clone()),
            ..Default::default()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_peers_with_tokens() {
    let s = secrets();
    let config = format!(
        "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n\n\
         [blobservices.root]\ntype = \"memory\"\nmax_size = \"64MiB\"\n",
        s.cert.display(),
        s.key.display(),
        s.token.display()
    );
    let peer = tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap();
    let https = format!("grpc+https://{}", peer.tcp);

    // With the CA and the token: Put and read back over TLS.
    let data = test_data(3 << 20, 5);
    let authorized = client(&https, &s, Some("s3cret-token"));
    let mut w = authorized
        .open_write()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", peer.log_text()));
    w.write(data.clone().into())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", peer.log_text()));
    let digest = w
        .close()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", peer.log_text()))
        .digest;
    assert_eq!(
        authorized.stat(&digest).await.unwrap().unwrap().size,
        3 << 20
    );

    // Without the token, or with a wrong one: UNAUTHENTICATED.
    for token in [None, Some("wrong")] {
        let refused = client(&https, &s, token).stat(&digest).await.unwrap_err();
        assert!(
            refused.to_string().contains("bearer token"),
            "{token:?}: {refused}"
        );
    }
    // Plain text to a TLS listener: no answer.
    assert!(read_blob(&peer.tcp_addr(), &digest).await.is_err());

    // The CLI takes the token and the CA too.
    let (token, cert) = (s.token.display().to_string(), s.cert.display().to_string());
    let hex = digest.to_hex();
    let auth = ["--addr", &https, "--token-file", &token, "--ca-file", &cert];
    let stat = cli_ok(&[&["stat"][..], &auth, &[&hex]].concat());
    assert!(stat.contains(&(3u64 << 20).to_string()), "{stat}");
    let out = s._dir.path().join("got");
    let out_arg = out.display().to_string();
    cli_ok(&[&["get"][..], &auth, &[&hex, "-o", &out_arg]].concat());
    assert!(std::fs::read(&out).unwrap() == data);
    let refused = cli(&["stat", "--addr", &https, "--ca-file", &cert, &hex]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("bearer token"),
        "{refused:?}"
    );

    // A sidecar naming the peer's CA and token serves the blob.
    let sidecar_config = |token: bool| {
        let mut c = format!(
            "[blobservices.root]\ntype = \"grpc\"\nurl = \"{https}\"\nca_file = \"{}\"\n",
            s.cert.display()
        );
        if token {
            c.push_str(&format!("token_file = \"{}\"\n", s.token.display()));
        }
        c
    };
    let config = sidecar_config(true);
    let sidecar = tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap();
    assert!(read_blob(&sidecar.tcp_addr(), &digest).await.unwrap() == data);

    // One without the token is refused by the peer.
    let config = sidecar_config(false);
    let tokenless = tokio::task::spawn_blocking(move || Daemon::start(Some(&config)))
        .await
        .unwrap();
    let failure = read_blob(&tokenless.tcp_addr(), &digest)
        .await
        .expect_err("read without a token");
    assert_eq!(failure.received, 0);
}

//! Tests of the registry client against a scripted HTTP/1.1 server on loopback (no network):
//! auth flows, mirrors, redirects, digest checks, platform selection, push.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::config::RegistryConfig;

#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }
    pub fn query(&self, name: &str) -> Vec<String> {
        let url = Url::parse(&format!("http://x{}", self.target)).unwrap();
        url.query_pairs().filter(|(k, _)| k == name).map(|(_, v)| v.into_owned()).collect()
    }
}

pub(crate) struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

pub(crate) fn resp(status: u16) -> Resp {
    Resp { status, headers: vec![], body: vec![] }
}

impl Resp {
    pub fn header(mut self, n: &str, v: &str) -> Resp {
        self.headers.push((n.into(), v.into()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Resp {
        self.body = b.into();
        self
    }
}

/// A PUT of a manifest: (tag, content type, body).
type Put = (String, String, Vec<u8>);

type Handler = Arc<dyn Fn(&Req, &str) -> Resp + Send + Sync>;

/// A scripted server: `handler(request, "127.0.0.1:port")`; every request is logged.
pub(crate) struct Mock {
    pub host: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Mock {
    pub async fn start(handler: impl Fn(&Req, &str) -> Resp + Send + Sync + 'static) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let (h, l, hostc) = (handler.clone(), log.clone(), host.clone());
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { return };
                let (h, l, host) = (h.clone(), l.clone(), hostc.clone());
                tokio::spawn(async move {
                    let (rd, mut wr) = sock.into_split();
                    let mut rd = BufReader::new(rd);
                    // Several requests per connection (keep-alive), one at a time.
                    while let Some(req) = read_request(&mut rd).await {
                        l.lock().unwrap().push(req.clone());
                        let r = h(&req, &host);
                        let mut head = format!("HTTP/1.1 {} X\r\ncontent-length: {}\r\n", r.status, r.body.len());
                        for (n, v) in &r.headers {
                            head.push_str(&format!("{n}: {v}\r\n"));
                        }
                        head.push_str("\r\n");
                        if wr.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        if req.method != "HEAD" && wr.write_all(&r.body).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Mock { host, log }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

async fn read_request(rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Req> {
    let mut line = String::new();
    if rd.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        rd.read_line(&mut l).await.ok()?;
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = get("content-length") {
        body.resize(len.parse().ok()?, 0);
        rd.read_exact(&mut body).await.ok()?;
    } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let mut size = String::new();
            rd.read_line(&mut size).await.ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            rd.read_exact(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some(Req { method, target, headers, body })
}

fn client(registries: &[(&str, RegistryConfig)]) -> Client {
    let mut config = Config::default();
    for (host, rc) in registries {
        config.registries.insert(host.to_string(), rc.clone());
    }
    Client::new(&config).unwrap()
}

fn creds(user: &str, pass: &str) -> RegistryConfig {
    RegistryConfig { username: Some(user.into()), password: Some(pass.into()), ..Default::default() }
}

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn manifest_json(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    let layers: Vec<_> = layers
        .iter()
        .map(|l| serde_json::json!({"mediaType": manifest::OCI_LAYER_GZIP, "digest": Digest::of(l), "size": l.len()}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": {"mediaType": manifest::OCI_CONFIG, "digest": Digest::of(config), "size": config.len()},
        "layers": layers,
    }))
    .unwrap()
}

fn index_json(entries: &[(&[u8], &str)]) -> Vec<u8> {
    let manifests: Vec<_> = entries
        .iter()
        .map(|(m, p)| {
            let p: Platform = p.parse().unwrap();
            serde_json::json!({"mediaType": manifest::OCI_MANIFEST, "digest": Digest::of(m), "size": m.len(), "platform": p})
        })
        .collect();
    serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": manifests}),
    )
    .unwrap()
}

/// A registry of blobs and manifests (by digest and by tag) behind optional auth.
#[derive(Clone, Default)]
pub(crate) struct Content {
    manifests: BTreeMap<String, (Vec<u8>, String)>,
    blobs: BTreeMap<String, Vec<u8>>,
}

impl Content {
    pub fn manifest(mut self, tag: Option<&str>, bytes: &[u8], media_type: &str) -> Content {
        let d = Digest::of(bytes).to_string();
        self.manifests.insert(d, (bytes.to_vec(), media_type.into()));
        if let Some(t) = tag {
            self.manifests.insert(t.into(), (bytes.to_vec(), media_type.into()));
        }
        self
    }
    pub fn blob(mut self, bytes: &[u8]) -> Content {
        self.blobs.insert(Digest::of(bytes).to_string(), bytes.to_vec());
        self
    }

    /// Serves `/v2/<repo>/manifests/<ref>` and `/v2/<repo>/blobs/<digest>` for any repo.
    pub fn serve(&self, req: &Req) -> Resp {
        let path = req.path();
        if let Some((_, r)) = path.split_once("/manifests/") {
            return match self.manifests.get(r) {
                Some((b, mt)) => resp(200)
                    .header("content-type", mt)
                    .header("docker-content-digest", Digest::of(b).as_str())
                    .body(b.clone()),
                None => resp(404).body(r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
            };
        }
        if let Some((_, d)) = path.split_once("/blobs/") {
            return match self.blobs.get(d) {
                Some(b) => resp(200).body(b.clone()),
                None => resp(404).body(r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#),
            };
        }
        resp(404)
    }
}

fn reference(host: &str, rest: &str) -> Reference {
    format!("{host}/{rest}").parse().unwrap()
}

#[test]
fn loopback_detection() {
    for h in ["localhost", "localhost:5000", "127.0.0.1", "127.1.2.3:80", "[::1]", "[::1]:5000", "LOCALHOST:1"] {
        assert!(is_loopback(h), "{h}");
    }
    for h in ["example.com", "10.0.0.1:5000", "[2001:db8::1]:5000", "localhost.example.com", "128.0.0.1"] {
        assert!(!is_loopback(h), "{h}");
    }
}

#[test]
fn endpoints() {
    let mut hub = RegistryConfig {
        mirrors: vec!["mirror.local/dockerhub/".into(), "http://plain.example:8080".into(), "127.0.0.1:5001".into()],
        ..Default::default()
    };
    hub.username = Some("u".into());
    let c = client(&[
        ("docker.io", hub),
        ("plain.example:8080", creds("m", "p")),
        ("secure.example", RegistryConfig { skip_tls_verify: true, ..Default::default() }),
    ]);
    let r: Reference = "busybox".parse().unwrap();
    let eps = c.read_endpoints(&r);
    let urls: Vec<String> = eps.iter().map(|e| e.url(r.repository(), "manifests/latest")).collect();
    assert_eq!(
        urls,
        [
            "https://mirror.local/v2/dockerhub/library/busybox/manifests/latest",
            "http://plain.example:8080/v2/library/busybox/manifests/latest",
            "http://127.0.0.1:5001/v2/library/busybox/manifests/latest",
            "https://registry-1.docker.io/v2/library/busybox/manifests/latest",
        ]
    );
    assert_eq!(eps.iter().map(|e| e.mirror).collect::<Vec<_>>(), [true, true, true, false]);
    // Mirrors use their own host's credentials; the registry its own.
    assert_eq!(eps[1].credentials, Some(("m".into(), "p".into())));
    assert_eq!(eps[0].credentials, None);
    assert_eq!(eps[3].credentials, Some(("u".into(), "".into())));

    let r: Reference = "secure.example/a".parse().unwrap();
    let eps = c.read_endpoints(&r);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].base, "https://secure.example");
    assert!(eps[0].skip_tls_verify);
    assert_eq!(c.upstream("[::1]:5000").base, "http://[::1]:5000");
    assert_eq!(c.upstream("localhost").base, "http://localhost");
    let insecure = client(&[("reg.lan:5000", RegistryConfig { insecure: true, ..Default::default() })]);
    assert_eq!(insecure.upstream("reg.lan:5000").base, "http://reg.lan:5000");
}

/// Bearer flow with credentials, an index, platform selection, token reuse.
#[tokio::test]
async fn bearer_auth_and_index() {
    let config = br#"{"architecture":"amd64"}"#;
    let amd = manifest_json(config, &[b"layer-amd64"]);
    let arm = manifest_json(b"{}", &[b"layer-arm64"]);
    let idx = index_json(&[(&arm, "linux/arm64/v8"), (&amd, "linux/amd64")]);
    let content = Content::default()
        .manifest(Some("1.0"), &idx, manifest::OCI_INDEX)
        .manifest(None, &amd, manifest::OCI_MANIFEST)
        .manifest(None, &arm, manifest::OCI_MANIFEST)
        .blob(b"layer-amd64");
    let mock = Mock::start(move |req, host| {
        if req.path() == "/token" {
            if req.header("authorization") != Some(&basic("alice", "s3cret")) {
                return resp(401);
            }
            let scopes = req.query("scope").join(" ");
            return resp(200).body(format!(r#"{{"token":"tok:{scopes}","expires_in":300}}"#));
        }
        let want = format!("Bearer tok:{}", "repository:app/web:pull");
        if req.header("authorization") != Some(&want) {
            return resp(401).header(
                "www-authenticate",
                &format!(
                    r#"Bearer realm="http://{host}/token",service="mock registry",scope="repository:app/web:pull""#
                ),
            );
        }
        content.serve(req)
    })
    .await;
    let c = client(&[(&mock.host, creds("alice", "s3cret"))]);
    let r = reference(&mock.host, "app/web:1.0");
    let res = c.resolve(&r, &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!(res.digest, Digest::of(&amd));
    assert_eq!(res.bytes, amd);
    assert_eq!(res.media_type, manifest::OCI_MANIFEST);
    assert_eq!(res.index, Some(Digest::of(&idx)));
    assert_eq!(res.manifest.config.digest, Digest::of(config));

    let arm_res = c.resolve(&r, &"linux/arm64/v8".parse().unwrap()).await.unwrap();
    assert_eq!(arm_res.digest, Digest::of(&arm));

    let err = c.resolve(&r, &"linux/s390x".parse().unwrap()).await.unwrap_err().to_string();
    assert!(
        err.contains("no manifest for platform linux/s390x") && err.contains("linux/arm64/v8, linux/amd64"),
        "{err}"
    );

    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    let seen = Mutex::new(0);
    c.fetch_blob(&r, &Digest::of(b"layer-amd64"), Some(11), &store, |n| *seen.lock().unwrap() = n).await.unwrap();
    assert_eq!(store.read(&Digest::of(b"layer-amd64")).unwrap(), b"layer-amd64");
    assert_eq!(*seen.lock().unwrap(), 11);

    let reqs = mock.requests();
    let token_reqs: Vec<&Req> = reqs.iter().filter(|r| r.path() == "/token").collect();
    // One token for the whole session: cached per (host, repository, actions).
    assert_eq!(token_reqs.len(), 1, "{reqs:#?}");
    assert_eq!(token_reqs[0].query("service"), ["mock registry"]);
    assert_eq!(token_reqs[0].query("scope"), ["repository:app/web:pull"]);
    // The manifest request asked for every supported type.
    let accept = reqs.iter().find(|r| r.path().contains("/manifests/")).unwrap().header("accept").unwrap().to_string();
    for t in manifest::ACCEPTED {
        assert!(accept.contains(t), "{accept}");
    }
}

/// A challenge with neither service nor scope: we ask for our own scope; anonymous tokens
/// (no credentials configured) send no Authorization to the token service.
#[tokio::test]
async fn bearer_without_service_or_scope() {
    let m = manifest_json(b"{}", &[]);
    let content = Content::default().manifest(Some("latest"), &m, manifest::DOCKER_MANIFEST);
    let mock = Mock::start(move |req, host| {
        if req.path() == "/auth" {
            assert!(req.header("authorization").is_none());
            assert!(req.query("service").is_empty());
            return resp(200).body(format!(r#"{{"access_token":"anon-{}"}}"#, req.query("scope").join(",")));
        }
        if req.header("authorization") != Some("Bearer anon-repository:library/x:pull") {
            return resp(401).header("WWW-Authenticate", &format!(r#"bearer realm="http://{host}/auth""#));
        }
        content.serve(req)
    })
    .await;
    let c = client(&[]);
    let r = reference(&mock.host, "library/x");
    let res = c.resolve(&r, &Platform::host()).await.unwrap();
    assert_eq!(res.media_type, manifest::DOCKER_MANIFEST);
    assert_eq!(res.index, None);
}

#[tokio::test]
async fn basic_auth_and_unauthorized_errors() {
    let m = manifest_json(b"{}", &[]);
    let content = Content::default().manifest(Some("v1"), &m, manifest::OCI_MANIFEST);
    let mock = Mock::start(move |req, _| {
        if req.header("authorization") != Some(&basic("bob", "pw")) {
            return resp(401)
                .header("www-authenticate", r#"Basic realm="Registry Realm""#)
                .body(r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#);
        }
        content.serve(req)
    })
    .await;
    let r = reference(&mock.host, "x/y:v1");

    let ok = client(&[(&mock.host, creds("bob", "pw"))]);
    assert_eq!(ok.resolve(&r, &Platform::host()).await.unwrap().digest, Digest::of(&m));

    let anon = client(&[]);
    let err = anon.resolve(&r, &Platform::host()).await.unwrap_err().to_string();
    assert!(
        err.contains("unauthorized") && err.contains(&mock.host) && err.contains("no credentials are configured"),
        "{err}"
    );

    let wrong = client(&[(&mock.host, creds("bob", "nope"))]);
    let err = wrong.resolve(&r, &Platform::host()).await.unwrap_err().to_string();
    assert!(
        err.contains("unauthorized") && err.contains("user \"bob\"") && err.contains("authentication required"),
        "{err}"
    );
}

#[tokio::test]
async fn token_service_refusing_credentials() {
    let mock = Mock::start(|req, host| {
        if req.path() == "/token" {
            return resp(401).body(r#"{"details":"incorrect username or password"}"#);
        }
        resp(401).header("www-authenticate", &format!(r#"Bearer realm="http://{host}/token",service="s""#))
    })
    .await;
    let c = client(&[(&mock.host, creds("eve", "x"))]);
    let err = c.resolve(&reference(&mock.host, "a:b"), &Platform::host()).await.unwrap_err().to_string();
    assert!(err.contains("unauthorized") && err.contains("token service") && err.contains("\"eve\""), "{err}");
    assert!(err.contains(&format!("pulling manifest of {}/a:b", mock.host)), "{err}");
}

#[tokio::test]
async fn manifest_errors() {
    let good = manifest_json(b"{}", &[]);
    let schema1 = br#"{"schemaVersion":1,"name":"x","tag":"old","fsLayers":[]}"#.to_vec();
    let good_digest = Digest::of(&good);
    let g = good.clone();
    let s1 = schema1.clone();
    let mock = Mock::start(move |req, _| match req.path() {
        "/v2/x/manifests/old" => resp(200).header("content-type", manifest::DOCKER_SCHEMA1_SIGNED).body(s1.clone()),
        // No content type at all: the body is sniffed.
        "/v2/x/manifests/plain" => resp(200).body(g.clone()),
        // A lying registry (or a mangling proxy).
        p if p == format!("/v2/x/manifests/{}", Digest::of(&g)) => {
            resp(200).header("content-type", manifest::OCI_MANIFEST).body(b"{}".to_vec())
        }
        "/v2/x/manifests/liar" => resp(200)
            .header("content-type", manifest::OCI_MANIFEST)
            .header("docker-content-digest", Digest::of(b"other").as_str())
            .body(g.clone()),
        "/v2/x/manifests/html" => resp(200).header("content-type", "text/html").body("<html>"),
        "/v2/x/manifests/broken" => resp(500).body(r#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#),
        _ => resp(404).body(r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
    })
    .await;
    let c = client(&[]);
    let p = Platform::host();
    let err = |rest: &str| {
        let r = reference(&mock.host, rest);
        let c = &c;
        let p = &p;
        async move { c.resolve(&r, p).await.unwrap_err().to_string() }
    };

    let e = err("x:missing").await;
    assert!(e.contains("manifest unknown") && e.contains(&format!("{}/x:missing", mock.host)), "{e}");
    assert!(err("x:old").await.contains("schema1 manifests are not supported"));
    let e = err(&format!("x@{good_digest}")).await;
    assert!(e.contains(&format!("expected {good_digest}")), "{e}");
    let e = err("x:liar").await;
    assert!(e.contains("digest"), "{e}");
    let e = err("x:html").await;
    assert!(e.contains("not a manifest"), "{e}");
    let e = err("x:broken").await;
    assert!(e.contains("500") && e.contains("disk on fire"), "{e}");

    let res = c.resolve(&reference(&mock.host, "x:plain"), &p).await.unwrap();
    assert_eq!((res.digest, res.media_type.as_str()), (good_digest, manifest::OCI_MANIFEST));

    // Nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap().to_string();
    drop(listener);
    let e = c.resolve(&reference(&dead, "x"), &p).await.unwrap_err().to_string();
    assert!(e.contains(&format!("pulling manifest of {dead}/x:latest")) && e.to_lowercase().contains("refused"), "{e}");
}

/// Mirrors in order, falling back on any error; a mirror's path prefix goes before the
/// repository.
#[tokio::test]
async fn mirrors_fall_back() {
    let cfg = br#"{"a":1}"#;
    let m = manifest_json(cfg, &[b"L"]);
    let content = Content::default().manifest(Some("latest"), &m, manifest::OCI_MANIFEST).blob(b"L");
    let broken = Mock::start(|_, _| resp(503).body("down for maintenance")).await;
    let c2 = content.clone();
    // Has the manifest, under its prefix, but not the blob.
    let partial =
        Mock::start(
            move |req, _| {
                if req.path().starts_with("/v2/hub/library/app/manifests/") {
                    c2.serve(req)
                } else {
                    resp(404)
                }
            },
        )
        .await;
    let upstream = Mock::start(move |req, _| content.serve(req)).await;
    let rc =
        RegistryConfig { mirrors: vec![broken.host.clone(), format!("{}/hub", partial.host)], ..Default::default() };
    let c = client(&[(&upstream.host, rc)]);
    // The partial mirror has library/app's manifest (at hub/library/app), not app's blob.
    let r = reference(&upstream.host, "app");
    let res = c.resolve(&reference(&upstream.host, "library/app"), &Platform::host()).await.unwrap();
    assert_eq!(res.digest, Digest::of(&m));
    assert_eq!(broken.requests().len(), 1);
    assert_eq!(partial.requests().len(), 1);
    assert!(upstream.requests().is_empty(), "the mirror answered");

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    c.fetch_blob(&r, &Digest::of(b"L"), Some(1), &store, |_| {}).await.unwrap();
    assert!(store.has(&Digest::of(b"L")));
    assert_eq!(partial.requests().last().unwrap().path(), format!("/v2/hub/app/blobs/{}", Digest::of(b"L")));
    assert_eq!(upstream.requests().len(), 1);

    // Already there: no request at all.
    c.fetch_blob(&r, &Digest::of(b"L"), Some(1), &store, |_| {}).await.unwrap();
    assert_eq!(upstream.requests().len(), 1);

    // Pushes never go to mirrors.
    let _ = c.push_manifest(&r, &m, manifest::OCI_MANIFEST).await;
    assert_eq!(broken.requests().len(), 2, "only the earlier resolve and fetch");
    assert_eq!(upstream.requests().last().unwrap().method, "PUT");
}

/// A blob redirect to another host must not carry our Authorization header, and the blob is
/// verified wherever it came from.
#[tokio::test]
async fn blob_redirect_drops_authorization() {
    let blob = vec![42u8; 100_000];
    let b2 = blob.clone();
    let cdn = Mock::start(move |req, _| match req.path() {
        "/good" => resp(200).body(b2.clone()),
        _ => resp(200).body(b"tampered".to_vec()),
    })
    .await;
    let cdn_host = cdn.host.clone();
    let reg = Mock::start(move |req, _| {
        if req.header("authorization") != Some(&basic("u", "p")) {
            return resp(401).header("www-authenticate", "Basic realm=r");
        }
        if req.path().ends_with(Digest::of(&vec![42u8; 100_000]).as_str()) {
            resp(307).header("location", &format!("http://{cdn_host}/good?sig=1"))
        } else {
            resp(307).header("location", &format!("http://{cdn_host}/bad"))
        }
    })
    .await;
    let c = client(&[(&reg.host, creds("u", "p"))]);
    let r = reference(&reg.host, "a/b");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let d = Digest::of(&blob);
    c.fetch_blob(&r, &d, Some(blob.len() as u64), &store, |_| {}).await.unwrap();
    assert!(store.has(&d));
    let cdn_reqs = cdn.requests();
    assert_eq!(cdn_reqs.len(), 1);
    assert_eq!(cdn_reqs[0].target, "/good?sig=1");
    assert!(cdn_reqs[0].header("authorization").is_none(), "{:?}", cdn_reqs[0].headers);

    let bad = Digest::of(b"something");
    let e = c.fetch_blob(&r, &bad, None, &store, |_| {}).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("pulling blob sha256:{} of {r}", bad.short()))
            && e.contains(bad.as_str())
            && e.contains(Digest::of(b"tampered").as_str()),
        "{e}"
    );
    assert!(!store.has(&bad));
    // A size that does not match is refused before anything is stored.
    let e = c.fetch_blob(&r, &bad, Some(3), &store, |_| {}).await.unwrap_err().to_string();
    assert!(e.contains("announced 8 bytes"), "{e}");
    assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none());
}

#[tokio::test]
async fn push() {
    let uploads: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    let manifests: Arc<Mutex<Vec<Put>>> = Arc::default();
    let existing = Digest::of(b"already there").to_string();
    let (u, m) = (uploads.clone(), manifests.clone());
    let mock = Mock::start(move |req, host| {
        // Push needs a pull,push token.
        if req.path() == "/token" {
            let scopes = req.query("scope");
            return resp(200).body(format!(r#"{{"token":"{}"}}"#, scopes.last().unwrap()));
        }
        let want = "Bearer repository:team/app:pull,push";
        if req.header("authorization") != Some(want) {
            return resp(401).header(
                "www-authenticate",
                &format!(r#"Bearer realm="http://{host}/token",service="s",scope="repository:team/app:pull""#),
            );
        }
        let p = req.path();
        match req.method.as_str() {
            "HEAD" if p.ends_with(existing.as_str()) => resp(200),
            "HEAD" => resp(404),
            "POST" if p == "/v2/team/app/blobs/uploads/" => {
                resp(202).header("location", "/v2/team/app/blobs/uploads/abc?_state=xyz")
            }
            "PUT" if p == "/v2/team/app/blobs/uploads/abc" => {
                assert_eq!(req.query("_state"), ["xyz"]);
                let d = req.query("digest").pop().unwrap();
                u.lock().unwrap().insert(d.clone(), req.body.clone());
                resp(201).header("docker-content-digest", &d)
            }
            "PUT" if p.starts_with("/v2/team/app/manifests/") => {
                let tag = p.rsplit('/').next().unwrap().to_string();
                m.lock().unwrap().push((tag, req.header("content-type").unwrap().to_string(), req.body.clone()));
                resp(201).header("docker-content-digest", Digest::of(&req.body).as_str())
            }
            _ => resp(400),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let big = vec![7u8; 1 << 20];
    let d_big = store.put_bytes(&big).unwrap();
    let d_old = store.put_bytes(b"already there").unwrap();
    let c = client(&[]);
    let r = reference(&mock.host, "team/app:v2");
    c.push_blob(&r, &d_big, &store).await.unwrap();
    c.push_blob(&r, &d_old, &store).await.unwrap();
    assert_eq!(uploads.lock().unwrap().keys().cloned().collect::<Vec<_>>(), [d_big.to_string()]);
    assert_eq!(uploads.lock().unwrap()[d_big.as_str()], big);

    let man = manifest_json(b"{}", &[&big]);
    assert_eq!(c.push_manifest(&r, &man, manifest::OCI_MANIFEST).await.unwrap(), Digest::of(&man));
    let by_digest = r.with_digest(Digest::of(&man));
    c.push_manifest(&by_digest, &man, manifest::OCI_MANIFEST).await.unwrap();
    let got = manifests.lock().unwrap().clone();
    assert_eq!(got[0], ("v2".to_string(), manifest::OCI_MANIFEST.to_string(), man.clone()));
    assert_eq!(got[1].0, Digest::of(&man).to_string());
    // A digest reference that does not match the bytes is refused before sending.
    assert!(c.push_manifest(&r.with_digest(Digest::of(b"x")), &man, manifest::OCI_MANIFEST).await.is_err());
    assert_eq!(manifests.lock().unwrap().len(), 2);

    // Absolute Location too (a registry behind a proxy).
    let abs = Mock::start(|req, host| match req.method.as_str() {
        "HEAD" => resp(404),
        "POST" => resp(202).header("location", &format!("http://{host}/upload/1")),
        "PUT" if req.path() == "/upload/1" => resp(201),
        _ => resp(400),
    })
    .await;
    c.push_blob(&reference(&abs.host, "a"), &d_old, &store).await.unwrap();
    let put = abs.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.query("digest"), [d_old.to_string()]);
    assert_eq!(put.body, b"already there");
}

//! Deploy from source, the git transport: SSH keys (`berth keys`), pushes over Berth's SSH
//! server and over smart HTTP with the real `git` and `ssh` clients, the refusals (other
//! branches, unknown keys, wrong users, bad tokens), the host key across restarts, and the
//! pre-receive hook (`berth git-hook pre-receive`) against a stub builds API: checkout from
//! the push's quarantine, submodules, the tar it sends, and the push failing with the build.
//!
//! Then pushes end to end on the real builder, served through the proxy: a Python app over
//! SSH (`git push berth main`), a compiled multi-stage build over HTTP to the API address, a
//! static site over HTTP through the proxy on the control host; the layer cache across
//! pushes; a Dockerfile error rejecting the push; two pushes at once; `berth rm` removing the
//! repository.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use berth_tests::server::{request, Server};
use berth_tests::{git, stderr, stdout, Berth, PYTHON_APP};
use serde_json::json;

/// Fails with how to install `tool` if it is missing.
fn need(tool: &str) {
    let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{tool} is not installed: apt-get install git openssh-client (scripts/install-test-deps)");
}

fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir).args(args).output().expect("running git");
    assert!(out.status.success(), "git {args:?} in {}: {}", dir.display(), stderr(&out));
    stdout(&out).trim().to_string()
}

/// A working repository made by a test.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    /// A repository on branch `main` with `files` committed.
    pub fn new(files: &[(&str, &str)]) -> Repo {
        need("git");
        let dir = tempfile::Builder::new().prefix("btgit").tempdir_in("/tmp").unwrap();
        git_ok(dir.path(), &["init", "-q", "-b", "main"]);
        let r = Repo { dir };
        r.commit(files, "first");
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `files` and commits them; returns the commit.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, text) in files {
            let p = self.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        git_ok(self.path(), &["add", "-A"]);
        git_ok(self.path(), &["commit", "-q", "--allow-empty", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        git_ok(self.path(), &["rev-parse", "HEAD"])
    }
}

/// An SSH key made with ssh-keygen.
pub struct Keypair {
    _dir: tempfile::TempDir,
    pub private: PathBuf,
    pub public: String,
}

impl Keypair {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Keypair {
        need("ssh-keygen");
        let dir = tempfile::Builder::new().prefix("btkey").tempdir_in("/tmp").unwrap();
        let private = dir.path().join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test@berth", "-f"])
            .arg(&private)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen: {}", stderr(&out));
        let public = std::fs::read_to_string(private.with_extension("pub")).unwrap();
        Keypair { _dir: dir, private, public }
    }

    /// `ssh-keygen -lf`'s fingerprint, `SHA256:...`.
    pub fn fingerprint(&self) -> String {
        let out = Command::new("ssh-keygen").arg("-lf").arg(self.private.with_extension("pub")).output().unwrap();
        stdout(&out).split_whitespace().nth(1).unwrap().to_string()
    }

    /// GIT_SSH_COMMAND for this key and `port`.
    pub fn ssh_command(&self, port: u16) -> String {
        format!(
            "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR -p {port}",
            self.private.display()
        )
    }

    /// Registers the key on `s` as `name`.
    pub fn add(&self, s: &Server, b: &Berth, name: &str) {
        let file = self.private.with_extension("pub");
        s.cli_ok(b, &["keys", "add", name, file.to_str().unwrap()]);
    }
}

/// `git push` of `refspec` to `ssh://USER@127.0.0.1:PORT/SERVICE`; the output is git's.
pub fn push_ssh(repo: &Repo, s: &Server, key: &Keypair, user: &str, service: &str, refspec: &str) -> Output {
    need("ssh");
    git(repo.path())
        .env("GIT_SSH_COMMAND", key.ssh_command(s.ssh))
        .args(["push", "--porcelain", &format!("ssh://{user}@127.0.0.1:{}/{service}", s.ssh), refspec])
        .output()
        .expect("running git push")
}

/// `git push` of `refspec` to `http://git:TOKEN@127.0.0.1:API/git/SERVICE.git`.
pub fn push_http(repo: &Repo, s: &Server, token: &str, service: &str, refspec: &str) -> Output {
    git(repo.path())
        .args(["push", "--porcelain", &format!("http://git:{token}@127.0.0.1:{}/git/{service}.git", s.api), refspec])
        .output()
        .expect("running git push")
}

fn text(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// The commit `refs/heads/<branch>` of the server's repository of `service` points at.
fn server_ref(s: &Server, service: &str, branch: &str) -> Option<String> {
    let repo = s.data_dir.join(format!("git/{service}.git"));
    let out = git(Path::new("/"))
        .arg("--git-dir")
        .arg(repo)
        .args(["rev-parse", "--verify", "-q"])
        .arg(format!("refs/heads/{branch}"))
        .output()
        .unwrap();
    out.status.success().then(|| stdout(&out).trim().to_string())
}

#[test]
fn keys_are_added_listed_and_removed() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    let file = key.private.with_extension("pub");
    let out = s.cli_ok(&b, &["keys", "add", "alice", file.to_str().unwrap()]);
    assert!(out.contains(&key.fingerprint()), "{out}: as ssh-keygen prints it");
    let ls = s.cli_ok(&b, &["keys", "ls"]);
    assert!(ls.contains("alice") && ls.contains(&key.fingerprint()), "{ls}");
    let v = s.call("GET", "/api/v1/keys", None).json();
    assert_eq!(v["keys"][0]["public_key"], key.public.trim());

    // The same name, or the same key under another name: 409.
    let again = s.call("POST", "/api/v1/keys", Some(json!({"name": "alice", "public_key": Keypair::new().public})));
    assert_eq!(again.status, 409, "{}", again.text());
    let dup = s.cli(&b, &["keys", "add", "bob", file.to_str().unwrap()]);
    assert!(!dup.status.success() && stderr(&dup).contains("already registered"), "{}", text(&dup));
    for bad in ["ssh-ed25519", "ssh-ed25519 AAAA!", "ssh-foo AAAA", "-----BEGIN OPENSSH PRIVATE KEY-----"] {
        let r = s.call("POST", "/api/v1/keys", Some(json!({"name": "carol", "public_key": bad})));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    // From stdin.
    let other = Keypair::new();
    let mut child = b
        .cmd()
        .env("BERTH_API", format!("http://127.0.0.1:{}", s.api))
        .env("BERTH_TOKEN", s.token())
        .args(["keys", "add", "dave", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(other.public.as_bytes()).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // Deploy tokens may not manage keys.
    let t = s.call("POST", "/api/v1/services", Some(json!({"name": "web"})));
    assert_eq!(t.status, 201);
    let t = s.call("POST", "/api/v1/tokens", Some(json!({"name": "ci", "scope": "deploy", "service": "web"}))).json();
    let h = format!("Bearer {}", t["token"].as_str().unwrap());
    let r = request(s.api, "GET", "127.0.0.1", "/api/v1/keys", &[("Authorization", &h)], b"").unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    s.cli_ok(&b, &["keys", "rm", "alice"]);
    assert!(!s.cli_ok(&b, &["keys", "ls"]).contains("alice"));
    assert_eq!(s.call("DELETE", "/api/v1/keys/alice", None).status, 404);
}

#[test]
fn ssh_pushes_are_refused_for_other_branches_unknown_keys_and_wrong_users() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    key.add(&s, &b, "alice");
    let repo = Repo::new(&[("README", "hello\n")]);

    // Another branch: refused, naming the deploy branch; nothing is stored.
    let out = push_ssh(&repo, &s, &key, "git", "web", "HEAD:refs/heads/feature");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("berth: only pushes to 'main' deploy web; you pushed 'feature'"), "{}", text(&out));
    assert_eq!(server_ref(&s, "web", "feature"), None);

    // An unknown key never gets in.
    let stranger = Keypair::new();
    let out = push_ssh(&repo, &s, &stranger, "git", "web", "HEAD:main");
    assert!(!out.status.success() && text(&out).contains("Permission denied (publickey)"), "{}", text(&out));

    // A known key as another user: told to use git.
    let out = push_ssh(&repo, &s, &key, "root", "web", "HEAD:main");
    assert!(!out.status.success() && text(&out).contains("log in as user \"git\""), "{}", text(&out));

    // Not a git command, a bad repository name, a shell.
    let ssh = |args: &[&str]| {
        let mut c = Command::new("sh");
        c.args(["-c", &format!("{} git@127.0.0.1 \"$@\"", key.ssh_command(s.ssh)), "ssh"]).args(args);
        c.stdin(std::process::Stdio::null()).output().unwrap()
    };
    let out = ssh(&["ls", "-la"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("only serves git pushes and fetches"), "{}", text(&out));
    let out = ssh(&["git-receive-pack '../../etc'"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("repository"), "{}", text(&out));
    let out = ssh(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("no shell here"), "{}", text(&out));

    // The deploy branch is a setting of the service.
    assert_eq!(s.call("POST", "/api/v1/services", Some(json!({"name": "web"}))).status, 201);
    let out = s.cli_ok(&b, &["git", "web", "--deploy-branch", "release"]);
    assert!(out.contains("release") && out.contains(&format!("ssh://git@berth.test.local:{}/web", s.ssh)), "{out}");
    let bad = s.call("PUT", "/api/v1/services/web/git", Some(json!({"deploy_branch": "a..b"})));
    assert_eq!(bad.status, 400, "{}", bad.text());
    let out = push_ssh(&repo, &s, &key, "git", "web.git", "HEAD:main");
    assert!(text(&out).contains("only pushes to 'release' deploy web; you pushed 'main'"), "{}", text(&out));

    // The deploy branch: the hook builds; a build that cannot succeed (here: a context with no
    // Dockerfile) refuses the push and leaves the ref as it was.
    let out = push_ssh(&repo, &s, &key, "git", "/web", "HEAD:release");
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("remote: berth: building web from release"), "{t}");
    assert!(t.contains("pre-receive hook declined"), "{t}");
    assert_eq!(server_ref(&s, "web", "release"), None, "a refused push stores no ref");
    // The hook's token died with the push.
    assert!(!s.log_text().contains("berth_push_"), "no push token in the log");

    // Fetching over SSH works (an empty repository: nothing to list).
    let out = git(repo.path())
        .env("GIT_SSH_COMMAND", key.ssh_command(s.ssh))
        .args(["ls-remote", &format!("ssh://git@127.0.0.1:{}/web", s.ssh)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = git(repo.path())
        .env("GIT_SSH_COMMAND", key.ssh_command(s.ssh))
        .args(["ls-remote", &format!("ssh://git@127.0.0.1:{}/nothing", s.ssh)])
        .output()
        .unwrap();
    assert!(!out.status.success() && text(&out).contains("no repository \"nothing\""), "{}", text(&out));
}

#[test]
fn the_host_key_is_made_once_and_survives_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    need("ssh-keyscan");
    let b = Berth::new();
    let mut s = Server::start(&b, &[]);
    let scan = |port: u16| {
        let out =
            Command::new("ssh-keyscan").args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]).output().unwrap();
        let line = stdout(&out);
        assert!(line.contains("ssh-ed25519"), "ssh-keyscan: {}", text(&out));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    let first = scan(s.ssh);
    let file = b.data_dir().join("ssh_host_ed25519_key");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let public = std::fs::read_to_string(b.data_dir().join("ssh_host_ed25519_key.pub")).unwrap();
    assert!(public.contains(&first), "{public}");
    s.stop();
    s.restart(&b);
    assert_eq!(scan(s.ssh), first, "same host key after a restart");

    // --ssh-addr off: no SSH server, and the API says so.
    s.stop();
    let off = Server::start(&b, &["--ssh-addr", "off"]);
    assert_eq!(off.call("POST", "/api/v1/services", Some(json!({"name": "web"}))).status, 201);
    let v = off.call("GET", "/api/v1/services/web/git", None).json();
    assert_eq!(v["ssh_url"], serde_json::Value::Null, "{v}");
    assert_eq!(v["deploy_branch"], "main");
}

#[test]
fn http_pushes_need_a_token_of_the_service() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let repo = Repo::new(&[("README", "hello\n")]);

    // No credentials: 401 with a Basic challenge, so git asks for them.
    let path = "/git/web.git/info/refs?service=git-receive-pack";
    let r = request(s.api, "GET", "127.0.0.1", path, &[], b"").unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Basic realm=\"berth\""));
    let out = push_http(&repo, &s, "berth_wrong", "web", "HEAD:main");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Authentication failed") || text(&out).contains("401"), "{}", text(&out));
    // The admin token: the smart protocol's advertisement.
    let basic = format!("Basic {}", b64(&format!("git:{}", s.token())));
    let r = request(s.api, "GET", "127.0.0.1", path, &[("Authorization", &basic)], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-git-receive-pack-advertisement"));
    assert!(r.header("cache-control").unwrap_or("").contains("no-cache"));
    assert!(r.body.starts_with(b"001f# service=git-receive-pack\n0000"), "{}", r.text());
    // The dumb protocol is not served; nor is another service's repository with a deploy token.
    let r = request(s.api, "GET", "127.0.0.1", "/git/web.git/info/refs", &[("Authorization", &basic)], b"").unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(s.call("POST", "/api/v1/services", Some(json!({"name": "api"}))).status, 201);
    let t = s.call("POST", "/api/v1/tokens", Some(json!({"name": "ci", "scope": "deploy", "service": "api"}))).json();
    let deploy = t["token"].as_str().unwrap().to_string();
    let other = format!("Basic {}", b64(&format!("x:{deploy}")));
    let r = request(s.api, "GET", "127.0.0.1", path, &[("Authorization", &other)], b"").unwrap();
    assert_eq!(r.status, 403, "{}", r.text());

    // Through the proxy on the control host too, and the same refusals as over SSH.
    let r = request(s.http, "GET", "berth.test.local", path, &[], b"").unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let out = push_http(&repo, &s, &s.token(), "web", "HEAD:refs/heads/feature");
    assert!(text(&out).contains("only pushes to 'main' deploy web; you pushed 'feature'"), "{}", text(&out));
    // The deploy branch with a deploy token of that service: the hook runs and the build
    // refuses the push (no Dockerfile); the ref is not updated.
    let out = push_http(&repo, &s, &deploy, "api", "HEAD:main");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("remote: berth: building api from main"), "{}", text(&out));
    assert_eq!(server_ref(&s, "api", "main"), None);
    // A clone of a repository that does not exist: 404.
    let out = git(repo.path())
        .args(["ls-remote", &format!("http://git:{}@127.0.0.1:{}/git/nothing.git", s.token(), s.api)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in s.as_bytes().chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A one-request stub of the builds API: records the request, answers `answer` (NDJSON).
struct Stub {
    port: u16,
    got: std::thread::JoinHandle<(String, Vec<u8>)>,
}

impl Stub {
    fn start(answer: String) -> Stub {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let lower = head.to_ascii_lowercase();
            let mut body = Vec::new();
            if let Some(n) = lower.split("content-length:").nth(1) {
                let n: usize = n.lines().next().unwrap().trim().parse().unwrap();
                body.resize(n, 0);
                r.read_exact(&mut body).unwrap();
            } else {
                loop {
                    let mut size = String::new();
                    r.read_line(&mut size).unwrap();
                    let n = usize::from_str_radix(size.trim(), 16).unwrap();
                    let mut chunk = vec![0; n + 2];
                    r.read_exact(&mut chunk).unwrap();
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            (&c).write_all(resp.as_bytes()).unwrap();
            (head, body)
        });
        Stub { port, got }
    }
}

/// A bare repository whose pre-receive hook is `berth git-hook pre-receive` pointed at a stub,
/// as the server sets it up; pushed to over the local transport.
fn hooked_repo(dir: &Path, name: &str, api: u16) -> PathBuf {
    let bare = dir.join(format!("{name}.git"));
    git_ok(dir, &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()]);
    let hook = bare.join("hooks/pre-receive");
    let script = format!(
        "#!/bin/sh\nBERTH_HOOK_API=http://127.0.0.1:{api} BERTH_HOOK_TOKEN=berth_push_test BERTH_HOOK_SERVICE={name} \
         BERTH_HOOK_BRANCH=main BERTH_HOOK_WORK={} exec '{}' git-hook pre-receive\n",
        dir.join("work").display(),
        berth_tests::berth_bin().display()
    );
    std::fs::write(&hook, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    bare
}

#[test]
fn the_hook_sends_the_pushed_tree_with_submodules_and_follows_the_build() {
    need("git");
    let dir = tempfile::Builder::new().prefix("bthook").tempdir_in("/tmp").unwrap();
    // A library repository beside the service's, used as a submodule by a relative URL.
    let lib = Repo::new(&[("lib.txt", "library v1\n")]);
    let lib_bare = dir.path().join("lib.git");
    git_ok(dir.path(), &["init", "-q", "--bare", "-b", "main", lib_bare.to_str().unwrap()]);
    git_ok(lib.path(), &["push", "-q", lib_bare.to_str().unwrap(), "HEAD:main"]);

    let ok = "{\"type\":\"log\",\"line\":\"step 1/2 : FROM busybox\"}\n{\"type\":\"log\",\"line\":\"done\"}\n\
              {\"type\":\"result\",\"ok\":true,\"build\":7,\"deploy\":12,\"revision\":3,\"url\":\"http://web.test.local/\"}\n";
    let stub = Stub::start(ok.into());
    let bare = hooked_repo(dir.path(), "web", stub.port);
    let app = Repo::new(&[("Dockerfile", "FROM busybox\n"), ("src/app.sh", "echo hi\n")]);
    git_ok(app.path(), &["remote", "add", "origin", bare.to_str().unwrap()]);
    git_ok(app.path(), &["-c", "protocol.file.allow=always", "submodule", "add", "-q", "../lib.git", "vendor/lib"]);
    let commit = app.commit(&[], "with a submodule");
    let out = git(app.path()).args(["push", "origin", "HEAD:main"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("remote: step 1/2 : FROM busybox"), "{t}");
    assert!(t.contains("remote: berth: deployed web revision 3"), "{t}");
    assert!(t.contains("remote: berth: http://web.test.local/"), "{t}");
    assert_eq!(git_ok(&bare, &["rev-parse", "refs/heads/main"]), commit, "the ref is updated");

    let (head, body) = stub.got.join().unwrap();
    assert!(
        head.starts_with(&format!("POST /api/v1/services/web/builds?source=git&commit={commit}&branch=main ")),
        "{head}"
    );
    assert!(
        head.contains("authorization: Bearer berth_push_test")
            || head.contains("Authorization: Bearer berth_push_test"),
        "{head}"
    );
    assert!(head.to_ascii_lowercase().contains("content-type: application/x-tar"), "{head}");
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(&body[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "vendor/lib/lib.txt" {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            assert_eq!(s, "library v1\n", "the submodule at its recorded commit");
        }
        names.push(name);
    }
    for want in ["Dockerfile", "src/app.sh", ".gitmodules", "vendor/lib/lib.txt"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    assert!(!names.iter().any(|n| n.split('/').any(|p| p == ".git")), "no .git in {names:?}");
    assert_eq!(std::fs::read_dir(dir.path().join("work")).unwrap().count(), 0, "the checkout is removed");

    // A failed build refuses the push: the ref stays where it was.
    let fail = "{\"type\":\"log\",\"line\":\"Step 2\"}\n{\"type\":\"result\",\"ok\":false,\"build\":8,\"error\":\"Dockerfile:2: unknown instruction FOO\"}\n";
    let stub = Stub::start(fail.into());
    let bare2 = hooked_repo(dir.path(), "api", stub.port);
    let out = git(app.path()).args(["push", bare2.to_str().unwrap(), "HEAD:main"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("remote: berth: build 8: Dockerfile:2: unknown instruction FOO"), "{t}");
    assert!(t.contains("pre-receive hook declined"), "{t}");
    let _ = stub.got.join().unwrap();
    let refs = git(&bare2).args(["rev-parse", "--verify", "-q", "refs/heads/main"]).output().unwrap();
    assert!(!refs.status.success(), "no ref after a failed build");
}

// Build and serve: pushes run the real builder and deploy through the proxy.

fn image(name: &str) -> String {
    berth_tests::world().image("anon", name)
}

/// The lines git shows as `remote: ...`, without the prefix and git's padding.
fn remote_lines(o: &Output) -> Vec<String> {
    stderr(o).lines().filter_map(|l| l.strip_prefix("remote: ")).map(|l| l.trim_end().to_string()).collect()
}

/// Asserts that the push succeeded; returns its `remote:` lines.
fn pushed(o: &Output, s: &Server) -> Vec<String> {
    assert!(o.status.success(), "the push failed:\n{}\nserver log:\n{}", text(o), s.log_text());
    remote_lines(o)
}

/// Adds the remote `berth` as `berth git NAME` shows it (over SSH, to 127.0.0.1).
fn add_berth_remote(repo: &Repo, s: &Server, service: &str) {
    git_ok(repo.path(), &["remote", "add", "berth", &format!("ssh://git@127.0.0.1:{}/{service}", s.ssh)]);
}

/// `git push berth main`, as a user types it.
fn push_berth_main(repo: &Repo, s: &Server, key: &Keypair) -> Output {
    need("ssh");
    git(repo.path()).env("GIT_SSH_COMMAND", key.ssh_command(s.ssh)).args(["push", "berth", "main"]).output().unwrap()
}

/// `git ls-remote berth refs/heads/main`: the commit the server's main is at, if any.
fn remote_main(repo: &Repo, s: &Server, key: &Keypair) -> Option<String> {
    let out = git(repo.path())
        .env("GIT_SSH_COMMAND", key.ssh_command(s.ssh))
        .args(["ls-remote", "berth", "refs/heads/main"])
        .output()
        .unwrap();
    assert!(out.status.success(), "git ls-remote: {}", text(&out));
    stdout(&out).split_whitespace().next().map(str::to_string)
}

/// The commands shown for steps followed by ` ---> cached`, and those that were not.
fn cached_and_built(lines: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut cached, mut built) = (Vec::new(), Vec::new());
    for w in lines.windows(2).filter(|w| w[0].starts_with('[')) {
        if w[1].contains("---> cached") {
            cached.push(w[0].clone());
        } else if w[1].contains("---> done") {
            built.push(w[0].clone());
        }
    }
    (cached, built)
}

#[test]
fn a_python_app_pushed_over_ssh_is_built_served_and_removed_with_its_repository() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    key.add(&s, &b, "alice");
    let dockerfile =
        format!("FROM {}\nWORKDIR /app\nCOPY app.py version.txt ./\nCMD [\"python3\", \"app.py\"]\n", image("python"));
    let repo = Repo::new(&[
        ("Dockerfile", &dockerfile),
        ("app.py", PYTHON_APP),
        ("version.txt", "v1\n"),
        ("berth.toml", "[service]\nport = 8000\nenv = { MODE = \"toml\" }\n"),
    ]);
    add_berth_remote(&repo, &s, "py");
    let lines = pushed(&push_berth_main(&repo, &s, &key), &s);
    let all = lines.join("\n");
    let short = &repo.head()[..12];
    assert!(lines.contains(&format!("berth: building py from main ({short})")), "{all}");
    assert!(lines.iter().any(|l| l.starts_with('[') && l.ends_with("] COPY app.py version.txt ./")), "{all}");
    assert!(lines.iter().any(|l| l.starts_with("built ") && l.contains("steps")), "{all}");
    assert_eq!(
        lines[lines.len() - 2..],
        ["berth: deployed py revision 1".to_string(), format!("berth: http://py.test.local:{}/", s.http)],
        "the push ends with the URL:\n{all}"
    );
    assert_eq!(s.get("py", "/").text(), "python says toml v1");
    assert_eq!(server_ref(&s, "py", "main").as_deref(), Some(repo.head().as_str()));

    // A second revision by push; then `berth rm` removes the repository with the service.
    repo.commit(&[("version.txt", "v2\n")], "v2");
    let lines = pushed(&push_berth_main(&repo, &s, &key), &s);
    assert!(lines.contains(&"berth: deployed py revision 2".to_string()), "{}", lines.join("\n"));
    assert_eq!(s.get("py", "/").text(), "python says toml v2");
    let bare = s.data_dir.join("git/py.git");
    assert!(bare.is_dir(), "{}", bare.display());
    s.cli_ok(&b, &["rm", "py"]);
    assert!(!bare.exists(), "berth rm leaves {}", bare.display());
    let out =
        git(repo.path()).env("GIT_SSH_COMMAND", key.ssh_command(s.ssh)).args(["ls-remote", "berth"]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("no repository \"py\""), "{}", text(&out));
    // A push makes the service and its repository anew.
    let lines = pushed(&push_berth_main(&repo, &s, &key), &s);
    assert!(lines.contains(&"berth: deployed py revision 1".to_string()), "{}", lines.join("\n"));
    assert_eq!(s.get("py", "/").text(), "python says toml v2");
}

#[test]
fn a_compiled_multi_stage_build_and_a_static_site_pushed_over_http_are_served() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);

    // To the API address, the admin token as the password: tcc in a Debian stage, the binary
    // run as a CGI in a busybox stage.
    let cgi = Repo::new(&[
        (
            "Dockerfile",
            &format!(
                "FROM {} AS Build\nCOPY hello.c /src/\nRUN mkdir /out && tcc -o /out/hello /src/hello.c\n\
                 FROM {}\nCOPY --from=build /out/hello /www/cgi-bin/hello\n\
                 COPY --from=build /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/\n\
                 COPY --from=build /lib64/ld-linux-x86-64.so.2 /lib64/\n\
                 EXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                image("python"),
                image("busybox")
            ),
        ),
        (
            "hello.c",
            "#include <stdio.h>\nint main(void){printf(\"Content-Type: text/plain\\r\\n\\r\\ncompiled by tcc\\n\");return 0;}\n",
        ),
    ]);
    let lines = pushed(&push_http(&cgi, &s, &s.token(), "cgi", "HEAD:main"), &s);
    let all = lines.join("\n");
    assert!(lines.iter().any(|l| l.contains("RUN mkdir /out && tcc -o /out/hello /src/hello.c")), "{all}");
    assert_eq!(lines.last().unwrap(), &format!("berth: http://cgi.test.local:{}/", s.http), "{all}");
    let r = s.get("cgi", "/cgi-bin/hello");
    assert_eq!((r.status, r.text().trim()), (200, "compiled by tcc"), "{}", r.text());
    assert_eq!(server_ref(&s, "cgi", "main").as_deref(), Some(cgi.head().as_str()));

    // Through the proxy on the control host, a deploy token of the service as the password:
    // a static site whose .dockerignore keeps a file out and lets an exception back in.
    assert_eq!(s.call("POST", "/api/v1/services", Some(json!({"name": "site"}))).status, 201);
    let t = s.call("POST", "/api/v1/tokens", Some(json!({"name": "ci", "scope": "deploy", "service": "site"}))).json();
    let deploy = t["token"].as_str().unwrap().to_string();
    let site = Repo::new(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\nCOPY . /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
                image("busybox")
            ),
        ),
        (".dockerignore", "*.secret\n!public.secret\nDockerfile\n"),
        ("index.html", "<h1>static</h1>\n"),
        ("private.secret", "no\n"),
        ("public.secret", "yes\n"),
    ]);
    let control = format!("berth.test.local:{}", s.http);
    let out = git(site.path())
        .args(["-c", &format!("http.curloptResolve={control}:127.0.0.1")])
        .args(["push", &format!("http://git:{deploy}@{control}/git/site.git"), "HEAD:main"])
        .output()
        .unwrap();
    let lines = pushed(&out, &s);
    let all = lines.join("\n");
    assert!(lines.iter().any(|l| l.ends_with("] COPY . /www/")), "{all}");
    assert_eq!(lines.last().unwrap(), &format!("berth: http://site.test.local:{}/", s.http), "{all}");
    assert_eq!(s.get("site", "/index.html").text(), "<h1>static</h1>\n");
    assert_eq!(s.get("site", "/public.secret").text(), "yes\n");
    assert_eq!(s.get("site", "/private.secret").status, 404);
    assert_eq!(s.get("site", "/Dockerfile").status, 404);
    assert_eq!(server_ref(&s, "site", "main").as_deref(), Some(site.head().as_str()));
    // The build is recorded as from git, with its commit.
    let v: serde_json::Value = serde_json::from_str(&s.cli_ok(&b, &["builds", "site", "--json"])).unwrap();
    assert_eq!(v[0]["source"], "git", "{v:#}");
    assert_eq!(v[0]["commit"], site.head(), "{v:#}");
}

#[test]
fn an_unchanged_push_reuses_every_layer_and_a_change_rebuilds_from_its_copy() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    key.add(&s, &b, "alice");
    let dockerfile = format!(
        "FROM {}\nRUN echo one > /one\nCOPY a.txt /a.txt\nRUN cat /a.txt > /from-a\nCOPY b.txt /b.txt\nRUN cat /b.txt > /from-b\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
        image("busybox")
    );
    let repo = Repo::new(&[("Dockerfile", &dockerfile), ("a.txt", "a1\n"), ("b.txt", "b1\n")]);
    add_berth_remote(&repo, &s, "cache");
    let first = pushed(&push_berth_main(&repo, &s, &key), &s);
    let (cached, built) = cached_and_built(&first);
    assert_eq!((cached.len(), built.len()), (0, 5), "a cold build runs every RUN and COPY:\n{}", first.join("\n"));

    // An empty commit: the same tree, every layer reused.
    repo.commit(&[], "nothing changed");
    let second = pushed(&push_berth_main(&repo, &s, &key), &s);
    let (cached, built) = cached_and_built(&second);
    assert_eq!((cached.len(), built.len()), (5, 0), "every RUN and COPY reused:\n{}", second.join("\n"));
    assert!(second.iter().any(|l| l.contains("(6 steps, 5 cached)")), "{}", second.join("\n"));
    assert!(second.contains(&"berth: deployed cache revision 2".to_string()), "{}", second.join("\n"));

    // b.txt changes: the steps before its COPY are reused, that COPY and what follows are not.
    repo.commit(&[("b.txt", "b2\n")], "b2");
    let third = pushed(&push_berth_main(&repo, &s, &key), &s);
    let (cached, built) = cached_and_built(&third);
    let all = third.join("\n");
    assert_eq!(cached.len(), 3, "{all}");
    assert!(cached.iter().all(|l| !l.contains("b.txt")), "{all}");
    assert_eq!(built.len(), 2, "{all}");
    assert!(built[0].ends_with("] COPY b.txt /b.txt") && built[1].ends_with("] RUN cat /b.txt > /from-b"), "{all}");
    assert_eq!(s.get("cache", "/from-b").text(), "b2\n");
    assert_eq!(s.get("cache", "/from-a").text(), "a1\n");
}

#[test]
fn a_dockerfile_error_names_its_line_rejects_the_push_and_the_old_revision_keeps_serving() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    key.add(&s, &b, "alice");
    let good = format!(
        "FROM {}\nCOPY index.html /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
        image("busybox")
    );
    let repo = Repo::new(&[("Dockerfile", &good), ("index.html", "old\n")]);
    add_berth_remote(&repo, &s, "web");
    pushed(&push_berth_main(&repo, &s, &key), &s);
    let old = repo.head();
    assert_eq!(remote_main(&repo, &s, &key).as_deref(), Some(old.as_str()));

    // A syntax error: refused before anything runs, with its line.
    repo.commit(
        &[("Dockerfile", &format!("FROM {}\n# a comment\nCOPY onlyone\n", image("busybox"))), ("index.html", "new\n")],
        "bad",
    );
    let out = push_berth_main(&repo, &s, &key);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("line 3") && t.contains("COPY"), "{t}");
    assert!(t.contains("remote: berth: the push is refused; the running revision of web keeps serving"), "{t}");
    assert!(t.contains("pre-receive hook declined"), "{t}");
    assert_eq!(remote_main(&repo, &s, &key).as_deref(), Some(old.as_str()), "the ref stays at the old commit");

    // A failing RUN: its line, its exit code and the tail of its output.
    let failing =
        format!("FROM {}\nCOPY index.html /www/\nRUN echo about to fail && \\\n    exit 3\n", image("busybox"));
    repo.commit(&[("Dockerfile", &failing)], "failing");
    let out = push_berth_main(&repo, &s, &key);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("Dockerfile line 3") && t.contains("exited with code 3") && t.contains("about to fail"), "{t}");
    assert_eq!(remote_main(&repo, &s, &key).as_deref(), Some(old.as_str()), "the ref stays at the old commit");

    assert_eq!(s.get("web", "/index.html").text(), "old\n");
    assert_eq!(s.service("web")["revision"], 1);

    // Fixed: the next push goes through and deploys.
    repo.commit(&[("Dockerfile", &good)], "fixed");
    pushed(&push_berth_main(&repo, &s, &key), &s);
    assert_eq!(remote_main(&repo, &s, &key), Some(repo.head()));
    assert_eq!(s.get("web", "/index.html").text(), "new\n");
}

#[test]
fn two_pushes_to_two_services_at_once_both_deploy() {
    let b = Berth::new();
    let s = Server::start(&b, &[]);
    let key = Keypair::new();
    key.add(&s, &b, "alice");
    let repos: Vec<Repo> = (0..2)
        .map(|i| {
            Repo::new(&[(
                "Dockerfile",
                &format!(
                    "FROM {}\nRUN sleep 1 && echo built {i} > /www-{i}\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/\"]\n",
                    image("busybox")
                ),
            )])
        })
        .collect();
    let t0 = std::time::Instant::now();
    let outs: Vec<Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = repos
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (s, key) = (&s, &key);
                scope.spawn(move || push_ssh(r, s, key, "git", &format!("twin{i}"), "HEAD:main"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("two pushes at once: {:?}", t0.elapsed());
    for (i, out) in outs.iter().enumerate() {
        let lines = pushed(out, &s);
        assert_eq!(lines.last().unwrap(), &format!("berth: http://twin{i}.test.local:{}/", s.http), "{}", text(out));
        assert_eq!(s.get(&format!("twin{i}"), &format!("/www-{i}")).text(), format!("built {i}\n"));
        assert_eq!(server_ref(&s, &format!("twin{i}"), "main"), Some(repos[i].head()));
    }
}

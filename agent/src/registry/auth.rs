//! Registry authentication pieces: parsing `WWW-Authenticate` challenges (RFC 7235), reading
//! token responses, and the cache of `Authorization` values per (registry, repository,
//! actions).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One challenge of a `WWW-Authenticate` header: `Bearer realm="…",service="…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased (`basic`, `bearer`): schemes are case-insensitive.
    pub scheme: String,
    /// Parameter names lowercased, values unquoted and unescaped, in order.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses every challenge in a `WWW-Authenticate` value. Several challenges may share one
/// header (`Basic realm="a", Bearer realm="b"`); quoted values may hold commas and escaped
/// quotes. Garbage is skipped rather than failing the whole header: a usable challenge next
/// to an odd one is still usable.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let n = b.len();
    let skip_ws = |mut i: usize| {
        while i < n && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        i
    };
    let mut out: Vec<Challenge> = Vec::new();
    let mut i = 0;
    while i < n {
        if b[i] == b',' || b[i] == b' ' || b[i] == b'\t' {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && is_tchar(b[i]) {
            i += 1;
        }
        if i == start {
            // A stray character (an unmatched quote, '=', …).
            i += 1;
            continue;
        }
        let token = &header[start..i];
        let j = skip_ws(i);
        let is_param = j < n && b[j] == b'=' && !out.is_empty();
        if !is_param {
            out.push(Challenge { scheme: token.to_ascii_lowercase(), params: Vec::new() });
            i = j;
            continue;
        }
        if j + 1 < n && b[j + 1] == b'=' || j + 1 == n {
            // token68 (`Basic dXNlcjpwYXNz==`): keep it whole under an empty name.
            let mut k = j;
            while k < n && b[k] == b'=' {
                k += 1;
            }
            out.last_mut().expect("checked").params.push((String::new(), header[start..k].to_string()));
            i = k;
            continue;
        }
        i = skip_ws(j + 1);
        let value = if i < n && b[i] == b'"' {
            i += 1;
            let mut v = Vec::new();
            while i < n {
                match b[i] {
                    b'\\' if i + 1 < n => {
                        v.push(b[i + 1]);
                        i += 2;
                    }
                    b'"' => {
                        i += 1;
                        break;
                    }
                    c => {
                        v.push(c);
                        i += 1;
                    }
                }
            }
            String::from_utf8_lossy(&v).into_owned()
        } else {
            let vs = i;
            while i < n && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                i += 1;
            }
            header[vs..i].to_string()
        };
        out.last_mut().expect("checked").params.push((token.to_ascii_lowercase(), value));
    }
    out
}

/// What a token endpoint answered: the token and how long to use it.
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    pub token: String,
    pub expires_in: Duration,
}

/// Tokens live 60 s unless the server says otherwise (the distribution token spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Parses a token endpoint's JSON: `token` or (OAuth2 style) `access_token`, and `expires_in`.
pub fn parse_token(body: &[u8]) -> Result<Token, String> {
    #[derive(serde::Deserialize)]
    struct Response {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
    }
    let r: Response = serde_json::from_slice(body).map_err(|e| format!("the token response is not valid JSON: {e}"))?;
    let token = [r.token, r.access_token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or("the token response has neither \"token\" nor \"access_token\"")?;
    // Some servers send a float, or a string.
    let secs = match r.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let expires_in = match secs {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s.min(365.0 * 86400.0)),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok(Token { token, expires_in })
}

/// `repository:<repo>:<actions>`.
pub fn scope(repository: &str, actions: &str) -> String {
    format!("repository:{repository}:{actions}")
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The host we talk to (`registry-1.docker.io`, a mirror's host).
    pub host: String,
    pub repository: String,
    /// `pull` or `pull,push`.
    pub actions: String,
}

/// `Authorization` header values by key, with their expiry. Tokens are scoped to a repository
/// and actions, so the key carries both.
#[derive(Debug, Default)]
pub struct Cache {
    entries: Mutex<HashMap<Key, (String, Option<Instant>)>>,
}

impl Cache {
    pub fn get(&self, key: &Key) -> Option<String> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((value, None)) => Some(value.clone()),
            Some((value, Some(expiry))) if Instant::now() < *expiry => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Caches `value`; a `lifetime` is shortened a little so that a token is never sent just
    /// as it expires.
    pub fn insert(&self, key: Key, value: String, lifetime: Option<Duration>) {
        let expiry = lifetime.map(|l| {
            let margin = (l / 10).min(Duration::from_secs(10));
            Instant::now() + l.saturating_sub(margin)
        });
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (value, expiry));
    }

    pub fn remove(&self, key: &Key) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(params: &[(&str, &str)]) -> Vec<(String, String)> {
        params.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn challenges() {
        let cases: Vec<(&str, Vec<Challenge>)> = vec![
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: p(&[
                        ("realm", "https://auth.docker.io/token"),
                        ("service", "registry.docker.io"),
                        ("scope", "repository:library/busybox:pull"),
                    ]),
                }],
            ),
            // Commas inside quotes, spaces around '=', odd case, escaped quotes.
            (
                r#"BEARER Realm = "http://127.0.0.1:5001/token" , scope="repository:a/b:pull,push", error="insufficient_scope", note="say \"hi\", ok""#,
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: p(&[
                        ("realm", "http://127.0.0.1:5001/token"),
                        ("scope", "repository:a/b:pull,push"),
                        ("error", "insufficient_scope"),
                        ("note", "say \"hi\", ok"),
                    ]),
                }],
            ),
            (
                r#"Basic realm="Registry Realm""#,
                vec![Challenge { scheme: "basic".into(), params: p(&[("realm", "Registry Realm")]) }],
            ),
            // No parameters at all, and unquoted values.
            ("Basic", vec![Challenge { scheme: "basic".into(), params: vec![] }]),
            (
                "Bearer realm=http://x/token,service=reg",
                vec![Challenge {
                    scheme: "bearer".into(),
                    params: p(&[("realm", "http://x/token"), ("service", "reg")]),
                }],
            ),
            // Two challenges in one header.
            (
                r#"Basic realm="a, b", Bearer realm="https://t/token",service="s""#,
                vec![
                    Challenge { scheme: "basic".into(), params: p(&[("realm", "a, b")]) },
                    Challenge { scheme: "bearer".into(), params: p(&[("realm", "https://t/token"), ("service", "s")]) },
                ],
            ),
            // token68.
            (
                "Negotiate abc==, Basic realm=x",
                vec![
                    Challenge { scheme: "negotiate".into(), params: p(&[("", "abc==")]) },
                    Challenge { scheme: "basic".into(), params: p(&[("realm", "x")]) },
                ],
            ),
            // Unterminated quote: take what is there.
            (
                r#"Bearer realm="http://x/tok"#,
                vec![Challenge { scheme: "bearer".into(), params: p(&[("realm", "http://x/tok")]) }],
            ),
            ("", vec![]),
            ("  ,, ", vec![]),
        ];
        for (header, want) in cases {
            assert_eq!(parse_challenges(header), want, "{header}");
        }
        let c = &parse_challenges(r#"Bearer REALM="r""#)[0];
        assert_eq!(c.param("realm"), Some("r"));
        assert_eq!(c.param("Realm"), Some("r"));
        assert_eq!(c.param("service"), None);
    }

    #[test]
    fn tokens() {
        assert_eq!(
            parse_token(br#"{"token":"t","expires_in":300}"#).unwrap(),
            Token { token: "t".into(), expires_in: Duration::from_secs(300) }
        );
        assert_eq!(
            parse_token(br#"{"access_token":"a"}"#).unwrap(),
            Token { token: "a".into(), expires_in: DEFAULT_TOKEN_LIFETIME }
        );
        assert_eq!(parse_token(br#"{"token":"","access_token":"a","expires_in":"5"}"#).unwrap().token, "a");
        assert_eq!(
            parse_token(br#"{"token":"t","expires_in":2.5,"issued_at":"2024-01-01T00:00:00Z"}"#).unwrap().expires_in,
            Duration::from_millis(2500)
        );
        assert!(parse_token(br#"{"nothing":1}"#).unwrap_err().contains("neither"));
        assert!(parse_token(b"<html>").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn cache_expires() {
        let c = Cache::default();
        let k = Key { host: "h".into(), repository: "r".into(), actions: "pull".into() };
        c.insert(k.clone(), "Bearer t".into(), Some(Duration::from_secs(60)));
        assert_eq!(c.get(&k).as_deref(), Some("Bearer t"));
        let other = Key { actions: "pull,push".into(), ..k.clone() };
        assert_eq!(c.get(&other), None);
        c.insert(k.clone(), "Bearer old".into(), Some(Duration::ZERO));
        assert_eq!(c.get(&k), None);
        c.insert(k.clone(), "Basic x".into(), None);
        assert_eq!(c.get(&k).as_deref(), Some("Basic x"));
        c.remove(&k);
        assert_eq!(c.get(&k), None);
    }
}

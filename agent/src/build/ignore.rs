//! `.dockerignore` patterns with the semantics of moby/patternmatcher (`MatchesOrParentMatches`)
//! and its `ignorefile.ReadAll` reader, as BuildKit applies them to the build context.
//!
//! Paths are always `/`-separated and relative to the context root; Windows separators are not
//! handled.

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignore {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// The cleaned pattern, without the `!`.
    text: String,
    exclusion: bool,
    matcher: Matcher,
}

/// patternmatcher's match types: the fast paths are part of the semantics (for instance
/// `**foo` is a plain suffix test and matches `barfoo`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    Exact,
    /// `dir/**`: a string prefix (the pattern without `**`).
    Prefix(String),
    /// `**/name`: a string suffix, or the suffix without its leading `/`.
    Suffix(String),
    Glob(Vec<Tok>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: one char other than `/`.
    One,
    /// `*`: any run of chars other than `/`.
    Star,
    /// `**` followed by more pattern: nothing, or anything ending with `/`.
    AnyDirs,
    /// A trailing `**` after other wildcards: anything.
    Rest,
    /// `[...]`: one char (including `/`, as the regexp BuildKit builds) in or out of ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Ignore {
    /// Parses `.dockerignore` text: lines starting with `#` are comments, blank lines are
    /// skipped, whitespace around patterns is trimmed, patterns are cleaned like Go's
    /// `filepath.Clean` and a leading `/` is removed; `!` marks an exception.
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for line in text.lines() {
            // Only a `#` in the first column starts a comment.
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (exclusion, rest) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            if rest.is_empty() {
                return Err("illegal exclusion pattern: \"!\"".into());
            }
            let mut cleaned = clean(rest);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            validate(&cleaned).map_err(|e| format!("invalid .dockerignore pattern {line:?}: {e}"))?;
            patterns.push(Pattern { matcher: compile(&cleaned), text: cleaned, exclusion });
        }
        Ok(Ignore { patterns })
    }

    /// Whether `rel_path` (like `a/b/c.txt`, relative to the context root) is excluded from the
    /// context. Patterns apply in order and the last one that matches wins; a pattern matching
    /// any parent directory of the path matches the path.
    pub fn matches(&self, rel_path: &str) -> bool {
        let mut path = clean(rel_path);
        if path.starts_with('/') {
            path.remove(0);
        }
        if path == "." || path.is_empty() {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            // An inclusion cannot change an excluded path, an exception an included one.
            if p.exclusion != matched {
                continue;
            }
            let hit = p.matches(&path) || (1..=parents.len()).any(|n| p.matches(&parents[..n].join("/")));
            if hit {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether an excluded directory may still contain included paths: some `!` exception
    /// could match below it, so a walker must descend into it (and ask [`Ignore::matches`] for
    /// every entry) instead of skipping it. Conservative: true when unsure.
    pub fn may_include_under(&self, rel_dir: &str) -> bool {
        let dir = clean(rel_dir);
        let dir = dir.trim_start_matches('/');
        let dir_parts: Vec<&str> = if dir == "." || dir.is_empty() { Vec::new() } else { dir.split('/').collect() };
        self.patterns.iter().filter(|p| p.exclusion).any(|p| could_match_under(&p.text, &dir_parts))
    }
}

/// Whether some path below `dir` could match `pattern`, comparing path components.
fn could_match_under(pattern: &str, dir: &[&str]) -> bool {
    for (i, part) in pattern.split('/').enumerate() {
        if part.contains("**") {
            return true;
        }
        let Some(d) = dir.get(i) else {
            // The pattern goes on below the directory.
            return true;
        };
        let toks = match compile(part) {
            Matcher::Glob(t) => t,
            _ => part.chars().map(Tok::Lit).collect(),
        };
        if !glob(&toks, &d.chars().collect::<Vec<_>>()) {
            return false;
        }
    }
    // The pattern names the directory or a parent of it: parent matching re-includes it.
    true
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.matcher {
            Matcher::Exact => path == self.text,
            Matcher::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix.as_str()) || suffix.strip_prefix('/').is_some_and(|s| path == s)
            }
            Matcher::Glob(toks) => glob(toks, &path.chars().collect::<Vec<_>>()),
        }
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
pub(crate) fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// The syntax check patternmatcher gets from Go's `filepath.Match`: escapes must escape
/// something and character classes must be well formed and closed.
fn validate(pattern: &str) -> Result<(), String> {
    let bad = || Err("syntax error in pattern".to_string());
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => {
                if i + 1 >= chars.len() {
                    return bad();
                }
                i += 2;
            }
            '[' => match parse_class(&chars, i + 1) {
                Some((_, next)) => i = next,
                None => return bad(),
            },
            _ => i += 1,
        }
    }
    Ok(())
}

/// Parses a class body starting after `[`; returns the class and the index after `]`.
fn parse_class(chars: &[char], mut i: usize) -> Option<(Tok, usize)> {
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let esc = |i: &mut usize| -> Option<char> {
        let c = *chars.get(*i)?;
        if c == '-' || c == ']' {
            return None;
        }
        if c == '\\' {
            *i += 1;
        }
        let c = *chars.get(*i)?;
        *i += 1;
        Some(c)
    };
    let mut ranges = Vec::new();
    loop {
        if chars.get(i) == Some(&']') && !ranges.is_empty() {
            return Some((Tok::Class { negated, ranges }, i + 1));
        }
        let lo = esc(&mut i)?;
        let mut hi = lo;
        if chars.get(i) == Some(&'-') {
            i += 1;
            hi = esc(&mut i)?;
            if hi < lo {
                return None;
            }
        }
        ranges.push((lo, hi));
    }
}

/// patternmatcher's `compile`: works out the match type while translating the wildcards.
fn compile(pattern: &str) -> Matcher {
    #[derive(PartialEq)]
    enum Type {
        Exact,
        Prefix,
        Suffix,
        Glob,
    }
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut ty = Type::Exact;
    let mut i = 0;
    let mut first = true;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    if ty == Type::Exact {
                        ty = Type::Prefix;
                    } else {
                        toks.push(Tok::Rest);
                        ty = Type::Glob;
                    }
                } else {
                    toks.push(Tok::AnyDirs);
                    ty = Type::Glob;
                }
                if first {
                    ty = Type::Suffix;
                }
            }
            '*' => {
                toks.push(Tok::Star);
                ty = Type::Glob;
            }
            '?' => {
                toks.push(Tok::One);
                ty = Type::Glob;
            }
            '\\' => match chars.get(i) {
                Some(&c) => {
                    toks.push(Tok::Lit(c));
                    i += 1;
                    ty = Type::Glob;
                }
                None => toks.push(Tok::Lit('\\')),
            },
            '[' => match parse_class(&chars, i) {
                Some((class, next)) => {
                    toks.push(class);
                    i = next;
                    ty = Type::Glob;
                }
                None => {
                    toks.push(Tok::Lit('['));
                    ty = Type::Glob;
                }
            },
            ']' => {
                toks.push(Tok::Lit(']'));
                ty = Type::Glob;
            }
            c => toks.push(Tok::Lit(c)),
        }
        first = false;
    }
    match ty {
        Type::Exact => Matcher::Exact,
        Type::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_string()),
        Type::Suffix => Matcher::Suffix(pattern[2..].to_string()),
        Type::Glob => Matcher::Glob(toks),
    }
}

/// Anchored match of the whole path.
fn glob(toks: &[Tok], s: &[char]) -> bool {
    let mut failed = std::collections::HashSet::new();
    glob_at(toks, 0, s, 0, &mut failed)
}

fn glob_at(
    toks: &[Tok],
    t: usize,
    s: &[char],
    i: usize,
    failed: &mut std::collections::HashSet<(usize, usize)>,
) -> bool {
    if t == toks.len() {
        return i == s.len();
    }
    if failed.contains(&(t, i)) {
        return false;
    }
    let ok = match &toks[t] {
        Tok::Lit(c) => s.get(i) == Some(c) && glob_at(toks, t + 1, s, i + 1, failed),
        Tok::One => s.get(i).is_some_and(|&c| c != '/') && glob_at(toks, t + 1, s, i + 1, failed),
        Tok::Class { negated, ranges } => {
            s.get(i).is_some_and(|&c| ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated)
                && glob_at(toks, t + 1, s, i + 1, failed)
        }
        Tok::Star => {
            let mut j = i;
            loop {
                if glob_at(toks, t + 1, s, j, failed) {
                    break true;
                }
                if j == s.len() || s[j] == '/' {
                    break false;
                }
                j += 1;
            }
        }
        Tok::AnyDirs => {
            glob_at(toks, t + 1, s, i, failed)
                || (i..s.len()).any(|j| s[j] == '/' && glob_at(toks, t + 1, s, j + 1, failed))
        }
        Tok::Rest => true,
    };
    if !ok {
        failed.insert((t, i));
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(text: &str) -> Ignore {
        Ignore::parse(text).unwrap()
    }

    #[test]
    fn table() {
        // (patterns, path, excluded)
        let cases: &[(&str, &str, bool)] = &[
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("docs", "docs", true),
            ("docs", "docs/a/b.txt", true),
            ("docs/", "docs/a", true),
            ("/build", "build/out.o", true),
            ("./build/../dist", "dist/x", true),
            ("**/*.go", "a/b/c.go", true),
            ("**/*.go", "c.go", true),
            ("**/*.go", "c.gox", false),
            ("**/node_modules", "node_modules/x", true),
            ("**/node_modules", "web/node_modules/left-pad/index.js", true),
            ("a/**/b", "a/b", true),
            ("a/**/b", "a/x/y/b", true),
            ("a/**/b", "a/x/yb", false),
            ("a/**", "a/x/y", true),
            ("a/**", "a", false),
            ("**", "anything/at/all", true),
            ("**foo", "barfoo", true),
            ("file?.txt", "file1.txt", true),
            ("file?.txt", "file/.txt", false),
            ("[abc].txt", "b.txt", true),
            ("[abc].txt", "d.txt", false),
            ("[^abc].txt", "d.txt", true),
            ("[a-c]x", "bx", true),
            ("*/temp*", "src/temporary", true),
            ("*/temp*", "src/x/temporary", false),
            ("temp?", "temp/x", false),
            ("a.b", "axb", false),
            ("\\*.txt", "*.txt", true),
            ("\\*.txt", "a.txt", false),
            (" spaced.txt  ", "spaced.txt", true),
            (" #notcomment", "#notcomment", true),
            ("#comment\nkept", "#comment", false),
            ("*.log\n!important.log", "important.log", false),
            ("*.log\n!important.log", "debug.log", true),
            ("*.log\n!important.log\nimportant.log", "important.log", true),
            ("docs\n!docs/keep.md", "docs/keep.md", false),
            ("docs\n!docs/keep.md", "docs/other.md", true),
            ("docs\n!docs/keep", "docs/keep/deep/file", false),
            ("!x\nx", "x", true),
            ("*\n!src\nsrc/*.tmp", "src/a.tmp", true),
            ("*\n!src\nsrc/*.tmp", "src/a.rs", false),
            ("*", ".", false),
        ];
        for (patterns, path, want) in cases {
            assert_eq!(ig(patterns).matches(path), *want, "{patterns:?} on {path:?}");
        }
    }

    #[test]
    fn bad_patterns() {
        for p in ["[", "a[b", "[]a]", "[z-a]", "x\\", "[a-]"] {
            let e = Ignore::parse(&format!("ok\n{p}\n")).unwrap_err();
            assert!(e.contains(p), "{p}: {e}");
        }
        assert_eq!(Ignore::parse("!").unwrap_err(), "illegal exclusion pattern: \"!\"");
        assert!(Ignore::parse("! ").is_err());
        assert!(Ignore::parse("\u{feff}# c\n\n  \n").unwrap().patterns.is_empty());
    }

    #[test]
    fn may_include_under() {
        let i = ig("docs\n!docs/keep.md\nvendor\n!**/LICENSE\n");
        assert!(i.may_include_under("docs"));
        assert!(i.may_include_under("vendor/x"));
        let i = ig("docs\nbuild\n!docs/keep.md\n!docs/*/README\n");
        assert!(i.may_include_under("docs"));
        assert!(i.may_include_under("docs/sub"));
        assert!(!i.may_include_under("build"));
        assert!(!i.may_include_under("docs2"));
        assert!(!ig("build\n").may_include_under("build"));
        // An exception naming a parent re-includes everything below it.
        assert!(ig("a/b\n!a\n").may_include_under("a/b"));
    }

    #[test]
    fn clean_like_go() {
        for (input, want) in
            [("", "."), ("a//b/./c/", "a/b/c"), ("a/../..", ".."), ("/../x", "/x"), ("./", "."), ("/", "/")]
        {
            assert_eq!(clean(input), want, "{input}");
        }
    }
}

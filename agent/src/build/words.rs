//! Shell-style word processing for Dockerfile arguments: quote removal, escapes and `$VAR`
//! expansion with the semantics of BuildKit's `shell.Lex` (frontend/dockerfile/shell/lex.go).
//!
//! This is not a shell: there is no command substitution, no globbing and no arithmetic. It is
//! the small language BuildKit applies to the arguments of ENV, LABEL, ARG, WORKDIR, USER, COPY,
//! FROM, EXPOSE, VOLUME and friends before using them.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// Variables visible to an expansion. Unset variables expand to the empty string.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// Adapts a closure into an [`Env`]: `EnvFn(|name| ...)`.
pub struct EnvFn<F>(pub F);

impl<F: Fn(&str) -> Option<String>> Env for EnvFn<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }
}

/// An environment with no variables at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _name: &str) -> Option<String> {
        None
    }
}

/// Quote removal and expansion of one word; whitespace is kept as it is.
///
/// Used for ENV and LABEL values, WORKDIR, USER, COPY sources and destination, the FROM image,
/// ARG defaults, STOPSIGNAL and similar single-valued arguments.
pub fn process_word(word: &str, env: &dyn Env, escape: char) -> Result<String, String> {
    Lexer::new(escape).process(word, env).map(|(word, _)| word)
}

/// Quote removal and expansion, then splitting into fields on unquoted whitespace (including
/// whitespace that came out of an expansion), as BuildKit's `ProcessWords`. Empty fields are
/// dropped, even quoted ones (`""`), exactly as BuildKit does.
pub fn process_words(word: &str, env: &dyn Env, escape: char) -> Result<Vec<String>, String> {
    Lexer::new(escape).process(word, env).map(|(_, words)| words)
}

/// Splits an instruction's arguments into words on whitespace, keeping quotes and escapes in
/// the words (they are removed later by [`process_word`]). This is BuildKit's parser-level
/// `parseWords`, used for ENV, LABEL and ARG.
pub fn split_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut buf = String::new();
    let mut pos = 0;
    while pos <= chars.len() {
        if pos == chars.len() {
            if phase != Phase::Spaces && (blank_ok || !buf.is_empty()) {
                words.push(std::mem::take(&mut buf));
            }
            break;
        }
        let mut ch = chars[pos];
        if phase == Phase::Spaces {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !buf.is_empty() {
                    words.push(std::mem::take(&mut buf));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    // An escape at the very end is dropped.
                    pos += 1;
                    continue;
                }
                // Outside quotes the escape and the escaped char are both kept, even a quote.
                buf.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            buf.push(ch);
            pos += 1;
            continue;
        }
        // Inside quotes.
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            buf.push(ch);
            pos += 1;
            ch = chars[pos];
        }
        buf.push(ch);
        pos += 1;
    }
    words
}

/// The lexer's switches. `raw_quotes` and `raw_escapes` keep quotes and escape characters in
/// the output, `skip_unset` leaves references to unset variables as written; the parser uses
/// these to find heredoc markers without changing the text.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lexer {
    pub escape: char,
    pub raw_quotes: bool,
    pub raw_escapes: bool,
    pub skip_unset: bool,
}

impl Lexer {
    pub(crate) fn new(escape: char) -> Lexer {
        Lexer { escape, raw_quotes: false, raw_escapes: false, skip_unset: false }
    }

    /// Returns the processed word and its fields.
    pub(crate) fn process(self, word: &str, env: &dyn Env) -> Result<(String, Vec<String>), String> {
        let mut scan = Scan { chars: word.chars().collect(), pos: 0, env, lex: self };
        scan.stop_on(None, self.raw_escapes).map_err(|e| format!("failed to process {word:?}: {e}"))
    }
}

struct Scan<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a dyn Env,
    lex: Lexer,
}

/// Field splitting state, mirroring BuildKit's `wordsStruct`.
#[derive(Default)]
struct Fields {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Fields {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        s.chars().for_each(|c| self.add_char(c));
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(self.buf);
        }
        self.words
    }
}

impl Scan<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn get_env(&self, name: &str) -> Option<String> {
        self.env.get(name)
    }

    /// Processes until `stop` (consumed) or the end of input.
    fn stop_on(&mut self, stop: Option<char>, raw: bool) -> Result<(String, Vec<String>), String> {
        let mut result = String::new();
        let mut fields = Fields::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, fields.finish()));
            }
            match ch {
                '$' => {
                    let tmp = self.dollar()?;
                    result.push_str(&tmp);
                    fields.add_string(&tmp);
                }
                '<' => {
                    let tmp = self.possible_heredoc();
                    result.push_str(&tmp);
                    fields.add_raw_string(&tmp);
                }
                '\'' => {
                    let tmp = self.single_quote()?;
                    result.push_str(&tmp);
                    fields.add_raw_string(&tmp);
                }
                '"' => {
                    let tmp = self.double_quote(raw)?;
                    result.push_str(&tmp);
                    fields.add_raw_string(&tmp);
                }
                _ => {
                    self.next();
                    if ch == self.lex.escape {
                        if raw {
                            fields.add_raw_char(ch);
                            result.push(ch);
                        }
                        // The escape char escapes the next one; at the end of input it is dropped.
                        match self.next() {
                            None => break,
                            Some(c) => {
                                fields.add_raw_char(c);
                                result.push(c);
                            }
                        }
                    } else {
                        fields.add_char(ch);
                        result.push(ch);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!("unexpected end of statement while looking for matching {stop}"));
        }
        Ok((result, fields.finish()))
    }

    fn single_quote(&mut self) -> Result<String, String> {
        // Everything up to the next single quote is literal; a single quote cannot be escaped.
        let mut out = String::new();
        let open = self.next().unwrap_or('\'');
        if self.lex.raw_quotes {
            out.push(open);
        }
        loop {
            match self.next() {
                None => return Err("unexpected end of statement while looking for matching single-quote".into()),
                Some('\'') => {
                    if self.lex.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quote(&mut self, raw: bool) -> Result<String, String> {
        // Inside double quotes `$` expands and the escape char only escapes `"`, `$` and itself;
        // before any other char it stays literal.
        let mut out = String::new();
        let open = self.next().unwrap_or('"');
        if self.lex.raw_quotes {
            out.push(open);
        }
        loop {
            match self.peek() {
                None => return Err("unexpected end of statement while looking for matching double-quote".into()),
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if raw {
                            out.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape => {
                                ch = c;
                                self.next();
                            }
                            // BuildKit writes the escape a second time here in raw mode; kept
                            // so heredoc detection and patterns see the same text it does.
                            Some(_) => {}
                        }
                    }
                    out.push(ch);
                }
            }
        }
    }

    fn possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".into();
        }
        self.next();
        let mut out = String::from("<<");
        while let Some(c @ ('\t' | '\r' | ' ')) = self.peek() {
            out.push(c);
            self.next();
        }
        out
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_ascii_digit() {
                // Positional parameters: all the digits.
                while let Some(d) = self.peek().filter(|c| c.is_ascii_digit()) {
                    name.push(d);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !ch.is_alphanumeric() && ch != '_' {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(mut ch) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        let mut modifier = ch.to_string();
        let mut null_is_unset = false;
        match ch {
            '}' => {
                return Ok(match self.get_env(&name) {
                    Some(v) => v,
                    None if self.lex.skip_unset => format!("${{{name}}}"),
                    None => String::new(),
                })
            }
            '/' => return self.replace(&name),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                if ch == ':' {
                    null_is_unset = true;
                    match self.next() {
                        Some(c) => {
                            ch = c;
                            modifier.push(c);
                        }
                        None => return Err("syntax error: missing '}'".into()),
                    }
                }
            }
            other => return Err(format!("unsupported modifier ({other}) in substitution")),
        }
        let pattern_mode = ch == '#' || ch == '%';
        if null_is_unset && pattern_mode {
            return Err(format!("unsupported modifier ({modifier}) in substitution"));
        }
        let word = match self.stop_on(Some('}'), pattern_mode) {
            Ok((word, _)) => word,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.get_env(&name);
        if self.lex.skip_unset && value.is_none() {
            return Ok(format!("${{{name}{modifier}{word}}}"));
        }
        let unset = value.is_none() || (null_is_unset && value.as_deref() == Some(""));
        match ch {
            '-' => Ok(if unset { word } else { value.unwrap_or_default() }),
            '+' => Ok(if unset { String::new() } else { word }),
            '?' => match value {
                None => Err(format!("{name}: {}", if word.is_empty() { "is not allowed to be unset" } else { &word })),
                Some(v) if null_is_unset && v.is_empty() => {
                    Err(format!("{name}: {}", if word.is_empty() { "is not allowed to be empty" } else { &word }))
                }
                Some(v) => Ok(v),
            },
            '#' | '%' => {
                // `#`/`%` remove the shortest match, `##`/`%%` the longest.
                let mut pat = word.as_str();
                let greedy = pat.starts_with(ch);
                if greedy {
                    pat = &pat[ch.len_utf8()..];
                }
                let value = value.unwrap_or_default();
                let tokens = compile_pattern(pat)?;
                if ch == '#' {
                    Ok(trim_prefix(&tokens, &value, greedy))
                } else {
                    let rev_tokens: Vec<Tok> = tokens.into_iter().rev().collect();
                    let rev_value: String = value.chars().rev().collect();
                    Ok(trim_prefix(&rev_tokens, &rev_value, greedy).chars().rev().collect())
                }
            }
            _ => Err(format!("unsupported modifier ({modifier}) in substitution")),
        }
    }

    /// `${name/pattern/replacement}` and `${name//pattern/replacement}`.
    fn replace(&mut self, name: &str) -> Result<String, String> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let pattern = match self.stop_on(Some('/'), true) {
            Ok((p, _)) => p,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '/' in ${}".into()),
            Err(e) => return Err(e),
        };
        let replacement = match self.stop_on(Some('}'), true) {
            Ok((r, _)) => r,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let Some(value) = self.get_env(name) else {
            if self.lex.skip_unset {
                return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
            }
            return Ok(String::new());
        };
        let tokens = compile_pattern(&pattern)?;
        let chars: Vec<char> = value.chars().collect();
        let mut out = String::new();
        let mut pos = 0;
        let mut last_match_end: Option<usize> = None;
        while pos <= chars.len() {
            match match_at(&tokens, &chars, pos, true) {
                // An empty match right after the previous match is skipped, as Go's regexp does.
                Some(end) if !(end == pos && last_match_end == Some(pos)) => {
                    out.push_str(&replacement);
                    last_match_end = Some(end);
                    if !all {
                        out.extend(&chars[end..]);
                        return Ok(out);
                    }
                    if end == pos {
                        if pos < chars.len() {
                            out.push(chars[pos]);
                        }
                        pos += 1;
                    } else {
                        pos = end;
                    }
                }
                _ => {
                    if pos < chars.len() {
                        out.push(chars[pos]);
                    }
                    pos += 1;
                }
            }
        }
        Ok(out)
    }
}

/// One element of a `${var#pattern}` style pattern.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok {
    Star,
    Any,
    Lit(char),
}

/// Compiles a shell pattern (`*`, `?`, `\` escaping `*`, `?` and `\`) as BuildKit's
/// `convertShellPatternToRegex`; bracket expressions are not supported there either.
fn compile_pattern(pattern: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::Any),
            '\\' => {
                // `\}` and `\/` are escapes of the `${}` syntax, not of the pattern.
                if matches!(chars.get(i), Some('}' | '/')) {
                    continue;
                }
                match chars.get(i) {
                    Some(&e @ ('*' | '?' | '\\')) => {
                        toks.push(Tok::Lit(e));
                        i += 1;
                    }
                    other => {
                        let shown = other.map(|c| c.to_string()).unwrap_or_default();
                        return Err(format!("invalid pattern ({pattern}) in substitution: invalid escape '\\{shown}'"));
                    }
                }
            }
            other => toks.push(Tok::Lit(other)),
        }
    }
    Ok(toks)
}

/// The end of the first match of `toks` starting at `start`, in the priority order of a
/// backtracking regex (greedy stars try the longest first, lazy ones the shortest).
fn match_at(toks: &[Tok], s: &[char], start: usize, greedy: bool) -> Option<usize> {
    let Some((first, rest)) = toks.split_first() else {
        return Some(start);
    };
    match first {
        Tok::Lit(c) => (s.get(start) == Some(c)).then(|| match_at(rest, s, start + 1, greedy)).flatten(),
        Tok::Any => (start < s.len()).then(|| match_at(rest, s, start + 1, greedy)).flatten(),
        Tok::Star => {
            if greedy {
                (start..=s.len()).rev().find_map(|i| match_at(rest, s, i, greedy))
            } else {
                (start..=s.len()).find_map(|i| match_at(rest, s, i, greedy))
            }
        }
    }
}

fn trim_prefix(toks: &[Tok], value: &str, greedy: bool) -> String {
    let chars: Vec<char> = value.chars().collect();
    match match_at(toks, &chars, 0, greedy) {
        Some(end) => chars[end..].iter().collect(),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> HashMap<String, String> {
        [("A", "a"), ("EMPTY", ""), ("SP", "x  y"), ("PATHY", "/usr/local/bin/tool.tar.gz"), ("ABC", "abcabc")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn w(s: &str) -> String {
        process_word(s, &env(), '\\').unwrap()
    }

    fn err(s: &str) -> String {
        process_word(s, &env(), '\\').unwrap_err()
    }

    #[test]
    fn expansion_forms() {
        let cases = [
            ("$A", "a"),
            ("${A}", "a"),
            ("x${A}y", "xay"),
            ("$UNSET", ""),
            ("${UNSET}", ""),
            ("${A:-d}", "a"),
            ("${EMPTY:-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${UNSET-d}", "d"),
            ("${UNSET:-d}", "d"),
            ("${A:+alt}", "alt"),
            ("${EMPTY:+alt}", ""),
            ("${EMPTY+alt}", "alt"),
            ("${UNSET+alt}", ""),
            ("${A:?boom}", "a"),
            ("${UNSET:-$A}", "a"),
            ("${UNSET:-\"q r\"}", "q r"),
            ("$", "$"),
            ("$ x", "$ x"),
            ("a$", "a$"),
            ("$1", ""),
            ("$@", ""),
            ("${PATHY#*/}", "usr/local/bin/tool.tar.gz"),
            ("${PATHY##*/}", "tool.tar.gz"),
            ("${PATHY%.*}", "/usr/local/bin/tool.tar"),
            ("${PATHY%%.*}", "/usr/local/bin/tool"),
            ("${PATHY#nomatch}", "/usr/local/bin/tool.tar.gz"),
            ("${ABC/b/X}", "aXcabc"),
            ("${ABC//b/X}", "aXcaXc"),
            ("${ABC//b/}", "acac"),
            ("${ABC//?c/-}", "a-a-"),
            ("${UNSET/a/b}", ""),
        ];
        for (input, want) in cases {
            assert_eq!(process_word(input, &env(), '\\'), Ok(want.to_string()), "{input}");
        }
    }

    #[test]
    fn replace_missing_slash_is_an_error() {
        // `${ABC//b}` consumes up to the end looking for the second slash.
        assert!(err("${ABC/b}").contains("missing '/'"));
    }

    #[test]
    fn error_forms() {
        assert!(err("${UNSET?}").ends_with("UNSET: is not allowed to be unset"));
        assert!(err("${UNSET?custom message}").ends_with("UNSET: custom message"));
        assert!(err("${EMPTY:?}").ends_with("EMPTY: is not allowed to be empty"));
        assert_eq!(w("${EMPTY?}"), "");
        assert!(err("${A").contains("missing '}'"));
        assert!(err("${}").contains("bad substitution"));
        assert!(err("${:x}").contains("bad substitution"));
        assert!(err("${A:#x}").contains("unsupported modifier (:#)"));
        assert!(err("${A*x}").contains("unsupported modifier (*)"));
        assert!(err("'abc").contains("single-quote"));
        assert!(err("\"abc").contains("double-quote"));
        assert!(err("${A#\\x}").contains("invalid escape"));
        assert!(err("it's").contains("single-quote"));
    }

    #[test]
    fn quotes_and_escapes() {
        let cases = [
            ("'$A'", "$A"),
            ("\"$A\"", "a"),
            ("\"a b\"", "a b"),
            ("'a\\b'", "a\\b"),
            ("a\\ b", "a b"),
            ("\\$A", "$A"),
            ("\"\\$A\"", "$A"),
            ("\"\\\"\"", "\""),
            ("\"\\\\\"", "\\"),
            ("\"\\n\"", "\\n"),
            ("\\n", "n"),
            ("abc\\", "abc"),
            ("'it'\\''s'", "it's"),
            ("<<EOF", "<<EOF"),
        ];
        for (input, want) in cases {
            assert_eq!(process_word(input, &env(), '\\'), Ok(want.to_string()), "{input}");
        }
    }

    #[test]
    fn backtick_escape() {
        assert_eq!(process_word("C:\\path\\x", &env(), '`').unwrap(), "C:\\path\\x");
        assert_eq!(process_word("a` b", &env(), '`').unwrap(), "a b");
        assert_eq!(process_word("`$A", &env(), '`').unwrap(), "$A");
        assert_eq!(process_word("\"`\"\"", &env(), '`').unwrap(), "\"");
    }

    #[test]
    fn words_split_after_expansion() {
        let e = env();
        let ws = |s: &str| process_words(s, &e, '\\').unwrap();
        assert_eq!(ws("80 443/tcp"), vec!["80", "443/tcp"]);
        assert_eq!(ws("$SP z"), vec!["x", "y", "z"]);
        assert_eq!(ws("\"$SP\" z"), vec!["x  y", "z"]);
        assert_eq!(ws("a\\ b c"), vec!["a b", "c"]);
        assert_eq!(ws("  lead   trail  "), vec!["lead", "trail"]);
        assert_eq!(ws("\"\" x ''"), vec!["x"]);
        assert_eq!(ws("<< EOF"), vec!["<< EOF"]);
        assert_eq!(ws("pre${SP}post"), vec!["prex", "ypost"]);
    }

    #[test]
    fn lexer_raw_modes_for_heredoc_detection() {
        let lex = Lexer { escape: '\\', raw_quotes: true, raw_escapes: true, skip_unset: true };
        let (_, words) = lex.process("RUN cat <<\"EOF\" $X ${Y:-z} a\\ b", &NoEnv).unwrap();
        assert_eq!(words, vec!["RUN", "cat", "<<\"EOF\"", "$X", "${Y:-z}", "a\\ b"]);
    }

    #[test]
    fn split_words_keeps_quotes() {
        assert_eq!(split_words("A=\"a b\" B='c d' C=e\\ f", '\\'), vec!["A=\"a b\"", "B='c d'", "C=e\\ f"]);
        assert_eq!(split_words("  x   y ", '\\'), vec!["x", "y"]);
        assert_eq!(split_words("a=\"\" b", '\\'), vec!["a=\"\"", "b"]);
        assert_eq!(split_words("a\\", '\\'), vec!["a"]);
        assert_eq!(split_words("p=`\"x", '`'), vec!["p=`\"x"]);
    }

    #[test]
    fn closure_and_btree_envs() {
        let f = EnvFn(|n: &str| (n == "X").then(|| "1".to_string()));
        assert_eq!(process_word("$X$Y", &f, '\\').unwrap(), "1");
        let mut b = BTreeMap::new();
        b.insert("X".to_string(), "2".to_string());
        assert_eq!(process_word("${X}", &b, '\\').unwrap(), "2");
    }
}

//! Dockerfile parser: text to stages of typed, validated but unexpanded instructions, with
//! BuildKit's rules (frontend/dockerfile/parser and frontend/dockerfile/instructions).
//!
//! Parsing happens in two passes, as in BuildKit. The first pass is lexical: parser directives,
//! comments, line continuations and heredoc bodies turn the text into logical lines. The second
//! pass splits each line into keyword, flags and arguments and builds an [`Instruction`].
//! Nothing is expanded here: values are kept raw (quotes included) so that the executor can
//! expand them with [`super::words`] against the build-time environment of each step.

use std::fmt;
use std::time::Duration;

use super::words::{split_words, Lexer, NoEnv};

/// A parse failure at a 1-based line: the first line of the offending instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub escape: char,
    /// The `# syntax=` directive as written (BuildKit uses the part before the first space).
    pub syntax: Option<String>,
    /// ARGs before the first FROM; only these are visible in FROM lines.
    pub meta_args: Vec<ArgDecl>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// The stage called `name`, compared case-insensitively as BuildKit does.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    /// The `AS` name as written; compare case-insensitively.
    pub name: Option<String>,
    /// The image, raw and unexpanded (meta ARGs apply).
    pub base: String,
    /// `--platform=` raw and unexpanded.
    pub platform: Option<String>,
    pub line: usize,
    pub instructions: Vec<Instruction>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// First line of the instruction (1-based).
    pub line: usize,
    /// Last line, heredoc bodies included.
    pub end_line: usize,
    /// The instruction as written, continuation lines joined into one line (heredoc bodies not
    /// included), for messages and cache keys.
    pub text: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Run(Run),
    Cmd(Command),
    Entrypoint(Command),
    /// Always the JSON form.
    Shell(Vec<String>),
    /// Raw key and value (quotes kept); expand both with `process_word`.
    Label(Vec<(String, String)>),
    /// Raw key and value (quotes kept); the legacy `ENV k v w` form gives one pair whose value
    /// is the rest of the line (`"v w"`).
    Env(Vec<(String, String)>),
    /// Raw words, in written order; expand each with `process_words`.
    Expose(Vec<String>),
    /// JSON entries (already decoded) or whitespace-split raw words.
    Volume(Vec<String>),
    User(String),
    Workdir(String),
    StopSignal(String),
    Maintainer(String),
    Arg(Vec<ArgDecl>),
    Copy(Copy),
    Add(Copy),
    /// The parsed trigger. ONBUILD of FROM, ONBUILD or MAINTAINER is an error.
    Onbuild(Box<Instruction>),
    Healthcheck(Healthcheck),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    pub name: String,
    /// Raw default (quotes kept), `None` for a bare `ARG name`.
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The rest of the line, raw, continuations joined as BuildKit does; run with the SHELL.
    Shell(String),
    /// The decoded JSON array; run as is, no shell, no expansion.
    Exec(Vec<String>),
}

/// A RUN instruction.
///
/// # Heredocs
///
/// Heredocs only come with the shell form. BuildKit (dockerfile2llb `dispatchRun`) runs them
/// this way, and the executor must do the same; [`Run::script`] computes which case applies:
///
/// 1. When the whole command is one heredoc marker (`RUN <<EOF`, `RUN <<-EOF`, `RUN <<"EOF"`,
///    `RUN 3<<EOF`), the script is the first heredoc's [`Heredoc::data`] (leading tabs removed
///    for `<<-`). If the target is not Windows and the script starts with `#!`, BuildKit writes
///    it, mode 0755, as `/dev/pipes/<name>` in a read-only mount and runs
///    `SHELL + ["/dev/pipes/<name>"]`, so the kernel honours the shebang. Otherwise it runs
///    `SHELL + [script]`. `expand` is ignored in both cases: the shell expands at run time.
/// 2. Otherwise (a command plus one or more heredocs, `RUN cat <<A <<B > f`), the command line
///    is rebuilt as `command + for each heredoc: "\n" + content + name` (raw content, not
///    chomped: the shell itself handles `<<-` and quoting) and run as `SHELL + [that]`, so the
///    shell feeds the heredocs to the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub command: Command,
    pub mounts: Vec<RunMount>,
    /// `--network=` (`default`, `none` or `host`), `None` when not given.
    pub network: Option<String>,
    /// `--security=` (`sandbox` or `insecure`), `None` when not given.
    pub security: Option<String>,
    pub heredocs: Vec<Heredoc>,
}

/// What the shell must be given for a RUN, see [`Run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script<'a> {
    /// No heredocs: the exec vector, or the shell-form command to pass to the SHELL.
    Plain(&'a Command),
    /// One heredoc as the whole command, without a shebang: run `SHELL + [data]`.
    Inline(String),
    /// One heredoc as the whole command, with a shebang (`#!`): write `data` as
    /// `/dev/pipes/<name>` (mode 0755, read-only mount) and run `SHELL + [that path]`.
    /// On Windows targets BuildKit uses [`Script::Inline`] instead.
    Shebang { name: &'a str, data: String },
    /// A command with heredocs, rebuilt for the shell: run `SHELL + [text]`.
    Reconstituted(String),
}

impl Run {
    /// Which of BuildKit's heredoc cases applies to this RUN (for a non-Windows target).
    pub fn script(&self) -> Script<'_> {
        let Command::Shell(cmd) = &self.command else {
            return Script::Plain(&self.command);
        };
        let Some(first) = self.heredocs.first() else {
            return Script::Plain(&self.command);
        };
        if matches!(parse_heredoc_word(cmd), Ok(Some(_))) {
            let data = first.data();
            if data.starts_with("#!") {
                return Script::Shebang { name: &first.name, data };
            }
            return Script::Inline(data);
        }
        let mut text = cmd.clone();
        for h in &self.heredocs {
            text.push('\n');
            text.push_str(&h.content);
            text.push_str(&h.name);
        }
        Script::Reconstituted(text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

/// One `RUN --mount=` value. Values are raw: BuildKit expands them with the step's ARGs and
/// ENVs before use, so numeric checks are skipped here for values containing `$`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    pub kind: MountKind,
    pub target: Option<String>,
    pub source: Option<String>,
    /// A stage name or image; BuildKit refuses variables here.
    pub from: Option<String>,
    pub id: Option<String>,
    /// Resolved as BuildKit does: explicit `ro`/`rw`, else true for bind, secret and ssh.
    pub readonly: bool,
    pub sharing: Option<String>,
    /// Octal, as written.
    pub mode: Option<String>,
    pub uid: Option<String>,
    pub gid: Option<String>,
    pub required: bool,
    /// tmpfs size as written (`64m`, `1GiB`, bytes).
    pub size: Option<String>,
    /// Secret mounts: expose the secret as this environment variable.
    pub env: Option<String>,
}

/// COPY and ADD. Flags that do not apply to the instruction are rejected by the parser, so
/// for COPY `keep_git_dir`, `checksum` and `unpack` are always unset and for ADD `from` and
/// `parents` are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// Raw source words, heredoc markers excluded (those are in `heredocs`).
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    pub keep_git_dir: bool,
    pub checksum: Option<String>,
    /// ADD `--unpack`, `None` when not given.
    pub unpack: Option<bool>,
    /// Inline files named by heredoc markers among the sources, in source order. BuildKit
    /// copies path sources first, then each heredoc as a file called `name` (mode 0644 unless
    /// `--chmod`) holding [`Heredoc::data`], expanded with `process_word`-style expansion
    /// (BuildKit's `ProcessWord` on the whole body) when `expand` is true.
    pub heredocs: Vec<Heredoc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word, quotes removed.
    pub name: String,
    /// The body lines as written, each with its line ending (so normally ending with `\n`),
    /// without the terminator line; leading tabs are not yet removed.
    pub content: String,
    /// False when any part of the delimiter was quoted (`<<"EOF"`, `<<'EOF'`).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from every body line, see [`Heredoc::data`].
    pub chomp: bool,
}

impl Heredoc {
    /// The body with leading tabs removed from each line when `chomp` is set.
    pub fn data(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        self.content.split_inclusive('\n').map(|l| l.trim_start_matches('\t')).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    None,
    /// Zero durations and zero retries are reported as `None` (Docker's "use the default").
    Check {
        test: Vec<String>,
        interval: Option<Duration>,
        timeout: Option<Duration>,
        start_period: Option<Duration>,
        start_interval: Option<Duration>,
        retries: Option<u32>,
    },
}

/// Parses a Dockerfile.
pub fn parse(src: &str) -> Result<Dockerfile, ParseError> {
    let lexed = lex(src)?;
    let mut dockerfile =
        Dockerfile { escape: lexed.escape, syntax: lexed.syntax, meta_args: Vec::new(), stages: Vec::new() };
    for node in &lexed.nodes {
        let at = |message: String| ParseError { line: node.start, message };
        match parse_node(node, &node.line, lexed.escape).map_err(at)? {
            Parsed::From { base, name, platform } => {
                if let Some(n) = &name {
                    if dockerfile.stage(n).is_some() {
                        return Err(at(format!("duplicate stage name {:?}", n.to_lowercase())));
                    }
                }
                let index = dockerfile.stages.len();
                dockerfile.stages.push(Stage {
                    index,
                    name,
                    base,
                    platform,
                    line: node.start,
                    instructions: Vec::new(),
                });
            }
            Parsed::Instr(instruction) => match dockerfile.stages.last_mut() {
                Some(stage) => stage.instructions.push(instruction),
                None => match instruction.kind {
                    Kind::Arg(args) => dockerfile.meta_args.extend(args),
                    _ => return Err(at("no build stage in current context".into())),
                },
            },
        }
    }
    if dockerfile.stages.is_empty() {
        return Err(ParseError {
            line: lexed.nodes.last().map_or(1, |n| n.start),
            message: "dockerfile contains no stages to build".into(),
        });
    }
    Ok(dockerfile)
}

// ---------------------------------------------------------------------------------------------
// Pass 1: lines, directives, continuations, heredocs.

struct Lexed {
    escape: char,
    syntax: Option<String>,
    nodes: Vec<Node>,
}

/// One logical line.
struct Node {
    start: usize,
    end: usize,
    line: String,
    heredocs: Vec<Heredoc>,
}

/// Parser directives (`# syntax=`, `# escape=`, `# check=`), recognised only while every line
/// so far has been a directive, as BuildKit's `DirectiveParser`.
struct Directives {
    done: bool,
    seen: Vec<String>,
    escape: char,
    syntax: Option<String>,
}

impl Directives {
    /// Returns whether `line` (newline trimmed) was a directive.
    fn check(&mut self, line: &str) -> Result<bool, String> {
        if self.done {
            return Ok(false);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(false);
        };
        let rest = rest.trim_start();
        let key_len = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        let (key, after) = rest.split_at(key_len);
        let value = after.trim_start().strip_prefix('=').map(str::trim);
        let (Some(value), false) = (value, key.is_empty()) else {
            self.done = true;
            return Ok(false);
        };
        if value.is_empty() {
            self.done = true;
            return Ok(false);
        }
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(false);
        }
        if self.seen.contains(&key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        self.seen.push(key.clone());
        match key.as_str() {
            "escape" => match value {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                other => return Err(format!("invalid escape token '{other}' does not match ` or \\")),
            },
            "syntax" => self.syntax = Some(value.to_string()),
            _ => {} // `# check=` configures BuildKit's linter; accepted and ignored.
        }
        Ok(true)
    }
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

fn trim_newline(line: &str) -> &str {
    line.trim_end_matches(['\r', '\n'])
}

/// BuildKit's line-continuation rule: the escape char is the last char before optional spaces
/// and tabs, and is not itself preceded by the escape char (so `\\` at the end of a line is an
/// escaped backslash, not a continuation). Returns the line without the escape and trailing
/// blanks, and whether the logical line ends here.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    if let Some(before) = trimmed.strip_suffix(escape) {
        if before.is_empty() || !before.ends_with(escape) {
            return (before, false);
        }
    }
    (line, true)
}

fn lex(src: &str) -> Result<Lexed, ParseError> {
    let src = src.strip_prefix('\u{feff}').unwrap_or(src);
    let mut lines = src.split_inclusive('\n');
    let mut directives = Directives { done: false, seen: Vec::new(), escape: '\\', syntax: None };
    let mut nodes = Vec::new();
    let mut current = 0usize;
    let err = |line: usize, message: String| ParseError { line, message };

    while let Some(raw) = lines.next() {
        let token = trim_newline(raw).trim_start();
        directives.check(token).map_err(|m| err(current + 1, m))?;
        current += 1;
        let start = current;
        let token = if is_comment(token) { "" } else { token };
        let (first, mut end_of_line) = trim_continuation(token, directives.escape);
        if end_of_line && first.is_empty() {
            continue;
        }
        let mut line = first.to_string();
        while !end_of_line {
            let Some(raw) = lines.next() else { break };
            let token = trim_newline(raw);
            directives.check(token).map_err(|m| err(current + 1, m))?;
            current += 1;
            // Comment lines and blank lines inside a continuation are dropped; neither ends it.
            if is_comment(raw) || token.trim_start().is_empty() {
                continue;
            }
            let (part, eol) = trim_continuation(token, directives.escape);
            line.push_str(part);
            end_of_line = eol;
        }
        if line.trim().is_empty() {
            return Err(err(start, "unexpected end of file after line continuation".into()));
        }

        let mut heredocs = Vec::new();
        if can_contain_heredoc(&line, directives.escape) && line.contains("<<") {
            for mut doc in heredocs_from_line(&line).map_err(|m| err(start, m))? {
                let mut terminated = false;
                for raw in lines.by_ref() {
                    current += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    return Err(err(start, format!("unterminated heredoc {:?}", doc.name)));
                }
                heredocs.push(doc);
            }
        }
        nodes.push(Node { start, end: current, line, heredocs });
    }
    if nodes.is_empty() {
        return Err(err(current.max(1), "file with no instructions".into()));
    }
    Ok(Lexed { escape: directives.escape, syntax: directives.syntax, nodes })
}

/// RUN, COPY and ADD (also as ONBUILD triggers) in shell form may carry heredocs.
fn can_contain_heredoc(line: &str, escape: char) -> bool {
    let mut split = split_command(line, escape);
    if split.keyword.eq_ignore_ascii_case("onbuild") {
        split = split_command(&split.args, escape);
    }
    let k = split.keyword.to_ascii_lowercase();
    matches!(k.as_str(), "run" | "copy" | "add") && !matches!(parse_json(&split.args), Ok(Some(_)))
}

/// Every heredoc marker among the line's words, in order. BuildKit always lexes this with `\`
/// as the escape, whatever the escape directive says.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let lex = Lexer { escape: '\\', raw_quotes: true, raw_escapes: true, skip_unset: true };
    let words = lex.process(line, &NoEnv).map(|(_, w)| w).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc_word(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Recognises a heredoc marker word, BuildKit's `^(\d*)<<(-?)\s*([^<]*)$` plus a check that the
/// delimiter is one word. The delimiter counts as quoted when removing quotes changes it.
fn parse_heredoc_word(word: &str) -> Result<Option<Heredoc>, String> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let Some(rest) = word[digits..].strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches(['\t', '\n', '\x0c', '\r', ' ']);
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let mut lex = Lexer { escape: '\\', raw_quotes: false, raw_escapes: false, skip_unset: true };
    let (_, words) = lex.process(rest, &NoEnv)?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let (_, raw_words) = lex.process(rest, &NoEnv)?;
    if raw_words.len() != 1 {
        return Err(format!("internal lexing of heredoc produced inconsistent results: {rest}"));
    }
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    Ok(Some(Heredoc {
        expand: quotes(&words[0]) == quotes(&raw_words[0]),
        name: words[0].clone(),
        content: String::new(),
        chomp,
    }))
}

// ---------------------------------------------------------------------------------------------
// Pass 2: instructions.

struct Split {
    keyword: String,
    flags: Vec<String>,
    args: String,
}

fn is_blank(c: char) -> bool {
    matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ')
}

/// Keyword, `--flags` and the remaining arguments, as BuildKit's `splitCommand`.
fn split_command(line: &str, escape: char) -> Split {
    let line = line.trim();
    let (keyword, rest) = match line.find(is_blank) {
        Some(i) => (&line[..i], line[i..].trim_start_matches(is_blank)),
        None => (line, ""),
    };
    let (args, flags) = extract_flags(rest, escape);
    Split { keyword: keyword.to_string(), flags, args: args.trim().to_string() }
}

/// Leading words that start with `--` are flags (quotes removed, escapes applied); a bare `--`
/// ends them.
fn extract_flags(line: &str, escape: char) -> (String, Vec<String>) {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut flags = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && chars[i].1.is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            return (String::new(), flags);
        }
        let word_start = chars[i].0;
        if !(chars[i].1 == '-' && chars.get(i + 1).map(|c| c.1) == Some('-')) {
            return (line[word_start..].to_string(), flags);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut blank_ok = false;
        while i < chars.len() {
            let ch = chars[i].1;
            match quote {
                None if ch.is_whitespace() => break,
                None if ch == '\'' || ch == '"' => {
                    quote = Some(ch);
                    blank_ok = true;
                }
                Some(q) if ch == q => quote = None,
                _ if ch == escape => {
                    if i + 1 == chars.len() {
                        quote = None;
                    } else {
                        i += 1;
                        word.push(chars[i].1);
                    }
                }
                _ => word.push(ch),
            }
            i += 1;
        }
        if word == "--" {
            let rest = chars.get(i).map_or("", |c| &line[c.0..]);
            return (rest.to_string(), flags);
        }
        if blank_ok || !word.is_empty() {
            flags.push(word);
        }
    }
}

/// A JSON array of strings is the exec form; a JSON array with anything else is an error;
/// everything else (including invalid JSON) is not JSON.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, String> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    let Ok(serde_json::Value::Array(items)) = serde_json::from_str::<serde_json::Value>(rest) else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => Err("when using JSON array syntax, arrays must be comprised of strings only".into()),
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

fn whitespace_words(rest: &str) -> Vec<String> {
    rest.split(is_blank).filter(|w| !w.is_empty()).map(str::to_string).collect()
}

#[derive(Clone, Copy, PartialEq)]
enum FlagType {
    Bool,
    Str,
    Strs,
}

/// Parsed flag values: bools as "true"/"false", strings once, string lists in order.
struct Flags(Vec<(&'static str, Vec<String>)>);

impl Flags {
    fn str(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(n, _)| *n == name).and_then(|(_, v)| v.last().cloned())
    }
    fn bool(&self, name: &str) -> bool {
        self.str(name).as_deref() == Some("true")
    }
    fn strs(&self, name: &str) -> Vec<String> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone()).unwrap_or_default()
    }
}

/// BuildKit's `BFlags.Parse` against the flags an instruction accepts.
fn parse_flags(given: &[String], spec: &[(&'static str, FlagType)]) -> Result<Flags, String> {
    let mut out: Vec<(&'static str, Vec<String>)> = Vec::new();
    for arg in given {
        if arg == "--" {
            break;
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(format!("arg should start with -- : {arg}"));
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let flag = format!("--{name}");
        let Some(&(key, ty)) = spec.iter().find(|(n, _)| *n == name) else {
            return Err(format!("unknown flag: {flag}"));
        };
        let seen = out.iter().position(|(n, _)| *n == key);
        if seen.is_some() && ty != FlagType::Strs {
            return Err(format!("duplicate flag specified: {flag}"));
        }
        let value = match ty {
            FlagType::Bool => match value.map(str::to_ascii_lowercase).as_deref() {
                Some("") => return Err(format!("missing a value on flag: {flag}")),
                None | Some("true") => "true".to_string(),
                Some("false") => "false".to_string(),
                Some(_) => {
                    return Err(format!("expecting boolean value for flag {flag}, not: {}", value.unwrap_or_default()))
                }
            },
            FlagType::Str | FlagType::Strs => match value {
                Some(v) => v.to_string(),
                None => return Err(format!("missing a value on flag: {flag}")),
            },
        };
        match seen {
            Some(i) => out[i].1.push(value),
            None => out.push((key, vec![value])),
        }
    }
    Ok(Flags(out))
}

enum Parsed {
    From { base: String, name: Option<String>, platform: Option<String> },
    Instr(Instruction),
}

fn at_least_one(keyword: &str) -> String {
    format!("{keyword} requires at least one argument")
}

fn exactly_one(keyword: &str) -> String {
    format!("{keyword} requires exactly one argument")
}

fn parse_node(node: &Node, line: &str, escape: char) -> Result<Parsed, String> {
    let split = split_command(line, escape);
    let keyword = split.keyword.to_ascii_uppercase();
    let args = split.args.as_str();
    let flags = |spec: &[(&'static str, FlagType)]| parse_flags(&split.flags, spec);
    use FlagType::*;

    let kind = match keyword.as_str() {
        "FROM" => {
            let f = flags(&[("platform", Str)])?;
            let words = whitespace_words(args);
            let name = match words.as_slice() {
                [_] => None,
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    let lower = name.to_lowercase();
                    let mut chars = lower.chars();
                    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
                    if !valid {
                        return Err(format!(
                            "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                        ));
                    }
                    Some(name.clone())
                }
                _ => return Err("FROM requires either one or three arguments".into()),
            };
            return Ok(Parsed::From { base: words[0].clone(), name, platform: f.str("platform") });
        }
        "RUN" => {
            let f = flags(&[("mount", Strs), ("network", Str), ("security", Str)])?;
            let mounts = f.strs("mount").iter().map(|m| parse_mount(m)).collect::<Result<Vec<_>, _>>()?;
            let network = f.str("network");
            if let Some(n) = &network {
                if !matches!(n.as_str(), "default" | "none" | "host") {
                    return Err(format!("invalid network mode {n:?}"));
                }
            }
            let security = f.str("security");
            if let Some(s) = &security {
                if !matches!(s.as_str(), "sandbox" | "insecure") {
                    return Err(format!("security {s:?} is not valid"));
                }
            }
            let command = match parse_command(args)? {
                Some(Command::Exec(v)) if v.is_empty() => None,
                c => c,
            };
            let command = command.ok_or_else(|| at_least_one("RUN"))?;
            let heredocs = match command {
                Command::Shell(_) => node.heredocs.clone(),
                Command::Exec(_) => Vec::new(),
            };
            Kind::Run(Run { command, mounts, network, security, heredocs })
        }
        "CMD" | "ENTRYPOINT" => {
            flags(&[])?;
            let command = parse_command(args)?.ok_or_else(|| at_least_one(&keyword))?;
            if keyword == "CMD" {
                Kind::Cmd(command)
            } else {
                Kind::Entrypoint(command)
            }
        }
        "SHELL" => {
            flags(&[])?;
            match parse_command(args)? {
                Some(Command::Exec(v)) if v.is_empty() => return Err(at_least_one("SHELL")),
                Some(Command::Exec(v)) => Kind::Shell(v),
                None => return Err(at_least_one("SHELL")),
                Some(Command::Shell(_)) => return Err("SHELL requires the arguments to be in JSON form".into()),
            }
        }
        "ENV" | "LABEL" => {
            flags(&[])?;
            let pairs = name_values(args, &keyword, escape)?;
            if pairs.is_empty() {
                return Err(at_least_one(&keyword));
            }
            if pairs.iter().any(|(k, _)| k.is_empty()) {
                return Err(format!("{keyword} names can not be blank"));
            }
            if keyword == "ENV" {
                Kind::Env(pairs)
            } else {
                Kind::Label(pairs)
            }
        }
        "EXPOSE" => {
            flags(&[])?;
            let ports = whitespace_words(args);
            if ports.is_empty() {
                return Err(at_least_one("EXPOSE"));
            }
            Kind::Expose(ports)
        }
        "VOLUME" => {
            flags(&[])?;
            let volumes = match parse_json(args)? {
                Some(v) => v,
                None => whitespace_words(args),
            };
            if volumes.is_empty() {
                return Err(at_least_one("VOLUME"));
            }
            let volumes = volumes
                .into_iter()
                .map(|v| {
                    let v = v.trim().to_string();
                    if v.is_empty() {
                        Err("VOLUME specified can not be an empty string".to_string())
                    } else {
                        Ok(v)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Kind::Volume(volumes)
        }
        "USER" | "WORKDIR" | "STOPSIGNAL" | "MAINTAINER" => {
            flags(&[])?;
            if args.is_empty() {
                return Err(exactly_one(&keyword));
            }
            let value = args.to_string();
            match keyword.as_str() {
                "USER" => Kind::User(value),
                "WORKDIR" => Kind::Workdir(value),
                "STOPSIGNAL" => Kind::StopSignal(value),
                _ => Kind::Maintainer(value),
            }
        }
        "ARG" => {
            flags(&[])?;
            let words = split_words(args, escape);
            if words.is_empty() {
                return Err(at_least_one("ARG"));
            }
            let decls = words
                .into_iter()
                .map(|w| match w.split_once('=') {
                    Some(("", _)) => Err("ARG names can not be blank".to_string()),
                    Some((k, v)) => Ok(ArgDecl { name: k.to_string(), default: Some(v.to_string()) }),
                    None => Ok(ArgDecl { name: w, default: None }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Kind::Arg(decls)
        }
        "COPY" | "ADD" => {
            let f = if keyword == "COPY" {
                flags(&[
                    ("chown", Str),
                    ("from", Str),
                    ("chmod", Str),
                    ("link", Bool),
                    ("exclude", Strs),
                    ("parents", Bool),
                ])?
            } else {
                flags(&[
                    ("chown", Str),
                    ("chmod", Str),
                    ("link", Bool),
                    ("keep-git-dir", Bool),
                    ("checksum", Str),
                    ("unpack", Bool),
                    ("exclude", Strs),
                ])?
            };
            let words = match parse_json(args)? {
                Some(v) => v,
                None => whitespace_words(args),
            };
            let Some((dest, srcs)) = words.split_last().filter(|(_, s)| !s.is_empty()) else {
                return Err(format!(
                    "{keyword} requires at least two arguments, but only one was provided. Destination could not be determined"
                ));
            };
            if parse_heredoc_word(dest).ok().flatten().is_some() {
                return Err(format!("{keyword} cannot accept a heredoc as a destination"));
            }
            let mut sources = Vec::new();
            let mut heredocs = Vec::new();
            for src in srcs {
                match parse_heredoc_word(src).ok().flatten() {
                    Some(mut doc) => {
                        if let Some(found) = node.heredocs.iter().find(|h| h.name == doc.name) {
                            doc.content = found.content.clone();
                        }
                        heredocs.push(doc);
                    }
                    None => sources.push(src.clone()),
                }
            }
            let copy = Copy {
                sources,
                dest: dest.clone(),
                from: f.str("from"),
                chown: f.str("chown"),
                chmod: f.str("chmod"),
                link: f.bool("link"),
                parents: f.bool("parents"),
                exclude: f.strs("exclude"),
                keep_git_dir: f.bool("keep-git-dir"),
                checksum: f.str("checksum"),
                unpack: f.str("unpack").map(|v| v == "true"),
                heredocs,
            };
            if keyword == "COPY" {
                Kind::Copy(copy)
            } else {
                Kind::Add(copy)
            }
        }
        "ONBUILD" => {
            flags(&[])?;
            if args.is_empty() {
                return Err(at_least_one("ONBUILD"));
            }
            let trigger = split_command(args, escape).keyword.to_ascii_uppercase();
            match trigger.as_str() {
                "ONBUILD" => return Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()),
                "MAINTAINER" | "FROM" => return Err(format!("{trigger} isn't allowed as an ONBUILD trigger")),
                _ => {}
            }
            match parse_node(node, args, escape)? {
                Parsed::Instr(inner) => Kind::Onbuild(Box::new(inner)),
                Parsed::From { .. } => unreachable!("FROM triggers are rejected above"),
            }
        }
        "HEALTHCHECK" => parse_healthcheck(args, &split.flags)?,
        "" => return Err("empty instruction".into()),
        _ => return Err(format!("unknown instruction: {}", split.keyword)),
    };
    Ok(Parsed::Instr(Instruction { line: node.start, end_line: node.end, text: line.to_string(), kind }))
}

/// Exec form for a JSON array of strings, else the raw rest of the line; `None` when empty.
fn parse_command(args: &str) -> Result<Option<Command>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    Ok(Some(match parse_json(args)? {
        Some(v) => Command::Exec(v),
        None => Command::Shell(args.to_string()),
    }))
}

/// ENV and LABEL: `name=value ...`, or the legacy `name value with spaces` when the first word
/// has no `=` (BuildKit's `parseNameVal`).
fn name_values(rest: &str, keyword: &str, escape: char) -> Result<Vec<(String, String)>, String> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let Some(i) = rest.find(is_blank) else {
            return Err(format!("{keyword} must have two arguments"));
        };
        let value = rest[i..].trim_start_matches(is_blank);
        return Ok(vec![(rest[..i].to_string(), value.to_string())]);
    }
    words
        .iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!("Syntax error - can't find = in {w:?}. Must be of the form: name=value")),
        })
        .collect()
}

fn parse_healthcheck(args: &str, given: &[String]) -> Result<Kind, String> {
    if args.is_empty() {
        return Err(at_least_one("HEALTHCHECK"));
    }
    let (typ, rest) = match args.find(char::is_whitespace) {
        Some(i) => (&args[..i], args[i..].trim_start()),
        None => (args, ""),
    };
    let typ = typ.to_ascii_uppercase();
    if typ == "NONE" {
        // BuildKit ignores flags here; any flag is reported as unknown instead.
        parse_flags(given, &[])?;
        if !rest.is_empty() {
            return Err("HEALTHCHECK NONE takes no arguments".into());
        }
        return Ok(Kind::Healthcheck(Healthcheck::None));
    }
    use FlagType::Str;
    let f = parse_flags(
        given,
        &[("interval", Str), ("timeout", Str), ("start-period", Str), ("start-interval", Str), ("retries", Str)],
    )?;
    if typ != "CMD" {
        return Err(format!("Unknown type \"{typ}\" in HEALTHCHECK (try CMD)"));
    }
    let test = match parse_command(rest)? {
        None => return Err("Missing command after HEALTHCHECK CMD".into()),
        Some(Command::Exec(v)) if v.is_empty() => return Err("Missing command after HEALTHCHECK CMD".into()),
        Some(Command::Exec(v)) => std::iter::once("CMD".to_string()).chain(v).collect(),
        Some(Command::Shell(s)) => vec!["CMD-SHELL".to_string(), s],
    };
    let interval = |name: &str| -> Result<Option<Duration>, String> {
        let Some(v) = f.str(name) else {
            return Ok(None);
        };
        if v.is_empty() {
            return Ok(None);
        }
        match parse_go_duration(&v)? {
            0 => Ok(None),
            d if d < 1_000_000 => Err(format!("Interval \"{name}\" cannot be less than 1ms")),
            d => Ok(Some(Duration::from_nanos(d as u64))),
        }
    };
    let retries = match f.str("retries").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => {
            let n: i64 = v
                .parse()
                .ok()
                .filter(|n| i32::try_from(*n).is_ok())
                .ok_or_else(|| format!("strconv.ParseInt: parsing {v:?}: invalid syntax"))?;
            if n < 0 {
                return Err(format!("--retries cannot be negative ({n})"));
            }
            (n > 0).then_some(n as u32)
        }
    };
    Ok(Kind::Healthcheck(Healthcheck::Check {
        test,
        interval: interval("interval")?,
        timeout: interval("timeout")?,
        start_period: interval("start-period")?,
        start_interval: interval("start-interval")?,
        retries,
    }))
}

/// Go's `time.ParseDuration`, in nanoseconds (negative for `-` durations).
fn parse_go_duration(s: &str) -> Result<i128, String> {
    let invalid = || format!("time: invalid duration {s:?}");
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let int_len = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.len() - a.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(invalid());
        }
        let unit_len = after.len() - after.trim_start_matches(|c: char| c != '.' && !c.is_ascii_digit()).len();
        let (unit, after) = after.split_at(unit_len);
        let scale: i128 = match unit {
            "" => return Err(format!("time: missing unit in duration {s:?}")),
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => return Err(format!("time: unknown unit {other:?} in duration {s:?}")),
        };
        let int: i128 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| invalid())? };
        let mut value = int.checked_mul(scale).ok_or_else(invalid)?;
        let mut frac_scale = scale;
        for d in frac_part.chars().take(30) {
            frac_scale /= 10;
            value += (d as i128 - '0' as i128) * frac_scale;
        }
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > i64::MAX as i128 {
            return Err(invalid());
        }
        rest = after;
    }
    Ok(if neg { -total } else { total })
}

/// Parses one `--mount=` value: comma-separated fields, CSV quoting, as BuildKit `parseMount`.
fn parse_mount(value: &str) -> Result<RunMount, String> {
    let fields = csv_fields(value).map_err(|e| format!("failed to parse csv mounts: {e}"))?;
    let mut m = RunMount {
        kind: MountKind::Bind,
        target: None,
        source: None,
        from: None,
        id: None,
        readonly: false,
        sharing: None,
        mode: None,
        uid: None,
        gid: None,
        required: false,
        size: None,
        env: None,
    };
    let mut ro_auto = true;
    let kind_name = |k: MountKind| match k {
        MountKind::Bind => "bind",
        MountKind::Cache => "cache",
        MountKind::Tmpfs => "tmpfs",
        MountKind::Secret => "secret",
        MountKind::Ssh => "ssh",
    };
    // Values with variables are expanded by the executor; they are checked only then.
    let literal = |v: &str| !v.contains('$');
    let parse_bool = |key: &str, v: &str| -> Result<bool, String> {
        match v {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
            _ => Err(format!("invalid value for {key}: {v}")),
        }
    };
    for field in fields {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.to_ascii_lowercase(), Some(v.to_string())),
            None => (field.to_ascii_lowercase(), None),
        };
        let Some(value) = value else {
            match key.as_str() {
                "readonly" | "ro" => {
                    m.readonly = true;
                    ro_auto = false;
                }
                "readwrite" | "rw" => {
                    m.readonly = false;
                    ro_auto = false;
                }
                "required" if matches!(m.kind, MountKind::Secret | MountKind::Ssh) => m.required = true,
                "required" => return Err(format!("unexpected key '{key}' for mount type '{}'", kind_name(m.kind))),
                _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
            }
            continue;
        };
        match key.as_str() {
            "type" => {
                m.kind = match value.to_ascii_lowercase().as_str() {
                    "bind" => MountKind::Bind,
                    "cache" => MountKind::Cache,
                    "tmpfs" => MountKind::Tmpfs,
                    "secret" => MountKind::Secret,
                    "ssh" => MountKind::Ssh,
                    _ => return Err(format!("unsupported mount type {value:?}")),
                }
            }
            "from" => {
                if let Some(i) = value.find('$') {
                    if i != value.len() - 1 {
                        return Err("'from' doesn't support variable expansion, define alias stage instead".into());
                    }
                }
                m.from = Some(value);
            }
            "source" | "src" => m.source = Some(value),
            "target" | "dst" | "destination" => m.target = Some(value),
            "readonly" | "ro" | "readwrite" | "rw" => {
                if literal(&value) {
                    let b = parse_bool(&key, &value)?;
                    let writable = matches!(key.as_str(), "readwrite" | "rw");
                    m.readonly = if writable { !b } else { b };
                }
                ro_auto = false;
            }
            "required" => {
                if !matches!(m.kind, MountKind::Secret | MountKind::Ssh) {
                    return Err(format!("unexpected key '{key}' for mount type '{}'", kind_name(m.kind)));
                }
                if literal(&value) {
                    m.required = parse_bool(&key, &value)?;
                }
            }
            "size" => {
                if m.kind != MountKind::Tmpfs {
                    return Err(format!("unexpected key '{key}' for mount type '{}'", kind_name(m.kind)));
                }
                if literal(&value) && !is_ram_size(&value) {
                    return Err(format!("invalid value for {key}: {value}"));
                }
                m.size = Some(value);
            }
            "id" => m.id = Some(value),
            "sharing" => {
                if literal(&value) && !matches!(value.to_ascii_lowercase().as_str(), "shared" | "private" | "locked") {
                    return Err(format!("unsupported sharing value {value:?}"));
                }
                m.sharing = Some(value.to_ascii_lowercase());
            }
            "mode" => {
                if literal(&value) && u32::from_str_radix(&value, 8).is_err() {
                    return Err(format!("invalid value {value} for mode"));
                }
                m.mode = Some(value);
            }
            "uid" | "gid" => {
                if literal(&value) && value.parse::<u32>().is_err() {
                    return Err(format!("invalid value {value} for {key}"));
                }
                if key == "uid" {
                    m.uid = Some(value);
                } else {
                    m.gid = Some(value);
                }
            }
            "env" => m.env = Some(value),
            _ => return Err(format!("unexpected key '{key}' in '{field}'")),
        }
    }
    let kind = kind_name(m.kind);
    if !matches!(m.kind, MountKind::Secret | MountKind::Ssh | MountKind::Cache) {
        for (set, what) in [(&m.mode, "mode"), (&m.uid, "uid"), (&m.gid, "gid")] {
            if set.is_some() {
                return Err(format!("{what} not allowed for {kind:?} type mounts"));
            }
        }
    }
    if ro_auto {
        m.readonly = !matches!(m.kind, MountKind::Cache | MountKind::Tmpfs);
    }
    if m.kind == MountKind::Secret {
        if m.from.is_some() {
            return Err("secret mount should not have a from".into());
        }
        if m.sharing.is_some() {
            return Err("secret mount should not define sharing".into());
        }
        if m.source.is_none() && m.target.is_none() && m.id.is_none() {
            return Err("invalid secret mount. one of source, target required".into());
        }
        if m.source.is_some() && m.id.is_some() {
            return Err("both source and id can't be set".into());
        }
    }
    if m.sharing.is_some() && m.kind != MountKind::Cache {
        return Err(format!("invalid cache sharing set for {kind} mount"));
    }
    Ok(m)
}

/// docker/go-units `RAMInBytes` syntax: `^(\d+(\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$`.
fn is_ram_size(v: &str) -> bool {
    let num_len = v.len() - v.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.').len();
    let (num, rest) = v.split_at(num_len);
    let num_ok = !num.is_empty() && num.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let mut rest = rest.strip_prefix(' ').unwrap_or(rest);
    for set in ["kKmMgGtTpP", "iI", "bB"] {
        if let Some(c) = rest.chars().next().filter(|c| set.contains(*c)) {
            rest = &rest[c.len_utf8()..];
        }
    }
    num_ok && rest.is_empty()
}

/// One CSV record (strict quotes), as tonistiigi/go-csvvalue `Fields`.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let line = line.strip_suffix("\r\n").or_else(|| line.strip_suffix('\n')).unwrap_or(line);
    if line.is_empty() {
        return Err("EOF".into());
    }
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        if !rest.starts_with('"') {
            let (field, next) = match rest.find(',') {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            if field.contains('"') {
                return Err("bare \" in non-quoted field".into());
            }
            out.push(field.to_string());
            match next {
                Some(n) => rest = n,
                None => return Ok(out),
            }
            continue;
        }
        rest = &rest[1..];
        let mut field = String::new();
        loop {
            let Some(i) = rest.find('"') else {
                return Err("extraneous or missing \" in quoted-field".into());
            };
            field.push_str(&rest[..i]);
            rest = &rest[i + 1..];
            if let Some(r) = rest.strip_prefix('"') {
                field.push('"');
                rest = r;
            } else if let Some(r) = rest.strip_prefix(',') {
                out.push(field);
                rest = r;
                break;
            } else if rest.is_empty() {
                out.push(field);
                return Ok(out);
            } else {
                return Err("extraneous or missing \" in quoted-field".into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instrs(src: &str) -> Vec<Instruction> {
        let df = parse(src).unwrap_or_else(|e| panic!("{e}"));
        df.stages.into_iter().flat_map(|s| s.instructions).collect()
    }

    fn kind(src: &str) -> Kind {
        let all = instrs(&format!("FROM scratch\n{src}"));
        assert_eq!(all.len(), 1, "{all:?}");
        all.into_iter().next().unwrap().kind
    }

    fn error(src: &str) -> ParseError {
        parse(src).expect_err("expected a parse error")
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn escaped_backslash_at_line_end_is_not_a_continuation() {
        let all = instrs("FROM scratch\nRUN echo foo\\\\\nRUN echo bar\n");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].kind, Kind::Run(run_shell("echo foo\\\\")));
        assert_eq!(all[1].line, 3);
    }

    fn run_shell(s: &str) -> Run {
        Run { command: Command::Shell(s.into()), mounts: vec![], network: None, security: None, heredocs: vec![] }
    }

    #[test]
    fn continuations_comments_and_empty_lines() {
        let src = "FROM scratch\nRUN apt-get update \\\n  # a comment\n\n   && apt-get install -y \\\n     curl\nUSER nobody\n";
        let all = instrs(src);
        assert_eq!(all[0].kind, Kind::Run(run_shell("apt-get update    && apt-get install -y      curl")));
        assert_eq!((all[0].line, all[0].end_line), (2, 6));
        assert_eq!(all[0].text, "RUN apt-get update    && apt-get install -y      curl");
        assert_eq!(all[1].line, 7);
        // Trailing blanks after the escape still continue the line.
        assert_eq!(kind("RUN a \\  \t\n b"), Kind::Run(run_shell("a  b")));
        // A dangling continuation at the end of the file with content is accepted (BuildKit).
        assert_eq!(kind("RUN a \\"), Kind::Run(run_shell("a")));
    }

    #[test]
    fn escape_directive_backtick_with_windows_paths() {
        let src = "# escape=`\nFROM mcr.microsoft.com/windows/servercore\nCOPY testfile.txt c:\\\nRUN dir c:\\ `\n  && echo done\nWORKDIR C:\\Users\\app\n";
        let df = parse(src).unwrap();
        assert_eq!(df.escape, '`');
        let i = &df.stages[0].instructions;
        match &i[0].kind {
            Kind::Copy(c) => {
                assert_eq!(c.sources, strs(&["testfile.txt"]));
                assert_eq!(c.dest, "c:\\");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(i[1].kind, Kind::Run(run_shell("dir c:\\   && echo done")));
        assert_eq!(i[2].kind, Kind::Workdir("C:\\Users\\app".into()));
        // Without the directive the trailing backslash of `c:\` is a continuation.
        let df = parse("FROM x\nCOPY a c:\\\nUSER u\n").unwrap();
        assert_eq!(df.stages[0].instructions.len(), 1);
    }

    #[test]
    fn directives_only_at_the_top() {
        let df = parse("# syntax=docker/dockerfile:1.7\n# check=skip=all\n#escape=\\\nFROM a\n").unwrap();
        assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1.7"));
        assert_eq!(df.escape, '\\');
        // After a comment, a blank line or an instruction they are plain comments.
        assert_eq!(parse("# hello\n# escape=`\nFROM a\n").unwrap().escape, '\\');
        assert_eq!(parse("\n# escape=`\nFROM a\n").unwrap().escape, '\\');
        assert_eq!(parse("FROM a\n# escape=`\n").unwrap().escape, '\\');
        let e = error("# escape=x\nFROM a\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("invalid escape token 'x'"), "{e}");
        let e = error("# escape=`\n# escape=`\nFROM a\n");
        assert_eq!((e.line, e.message.as_str()), (2, "only one escape parser directive can be used"));
        assert_eq!(parse("\u{feff}# escape=`\nFROM a\n").unwrap().escape, '`');
    }

    #[test]
    fn meta_args_and_stage_names() {
        let src = "ARG BASE=alpine:3.19\nARG V\nFROM ${BASE} AS Builder\nRUN make\nfrom --platform=$BUILDPLATFORM busybox as final\nCOPY --from=builder /out /out\n";
        let df = parse(src).unwrap();
        assert_eq!(
            df.meta_args,
            vec![
                ArgDecl { name: "BASE".into(), default: Some("alpine:3.19".into()) },
                ArgDecl { name: "V".into(), default: None },
            ]
        );
        assert_eq!(df.stages[0].base, "${BASE}");
        assert_eq!(df.stages[0].name.as_deref(), Some("Builder"));
        assert_eq!(df.stages[0].line, 3);
        assert_eq!(df.stages[1].platform.as_deref(), Some("$BUILDPLATFORM"));
        assert_eq!(df.stages[1].index, 1);
        assert_eq!(df.stage("BUILDER").map(|s| s.index), Some(0));
        assert_eq!(df.stage("Final").map(|s| s.index), Some(1));
        match &df.stages[1].instructions[0].kind {
            Kind::Copy(c) => assert_eq!(c.from.as_deref(), Some("builder")),
            other => panic!("{other:?}"),
        }
        let e = error("FROM a AS x\nFROM b AS X\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("duplicate stage name"), "{e}");
        assert!(error("FROM a AS 1x\n").message.contains("invalid name for build stage"));
        assert!(error("FROM a AS b$c\n").message.contains("invalid name for build stage"));
    }

    #[test]
    fn heredocs_run() {
        let src = "FROM a\nRUN <<EOF\necho hi\necho $HOME\nEOF\nRUN <<-\"EOT\" bash\n\tquoted $X\n\tEOT\nRUN cat <<A <<'B' > /f\na1\nA\nb1\nB\nUSER u\n";
        let all = instrs(src);
        match &all[0].kind {
            Kind::Run(r) => {
                assert_eq!(
                    r.heredocs,
                    vec![Heredoc {
                        name: "EOF".into(),
                        content: "echo hi\necho $HOME\n".into(),
                        expand: true,
                        chomp: false
                    }]
                );
                assert_eq!(r.script(), Script::Inline("echo hi\necho $HOME\n".into()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((all[0].line, all[0].end_line), (2, 5));
        match &all[1].kind {
            Kind::Run(r) => {
                assert_eq!(r.command, Command::Shell("<<-\"EOT\" bash".into()));
                assert_eq!(r.heredocs[0].name, "EOT");
                assert!(!r.heredocs[0].expand);
                assert!(r.heredocs[0].chomp);
                assert_eq!(r.heredocs[0].content, "\tquoted $X\n");
                assert_eq!(r.heredocs[0].data(), "quoted $X\n");
                assert_eq!(r.script(), Script::Reconstituted("<<-\"EOT\" bash\n\tquoted $X\nEOT".into()));
            }
            other => panic!("{other:?}"),
        }
        match &all[2].kind {
            Kind::Run(r) => {
                let names: Vec<_> = r.heredocs.iter().map(|h| (h.name.as_str(), h.expand)).collect();
                assert_eq!(names, vec![("A", true), ("B", false)]);
                assert_eq!(r.heredocs[1].content, "b1\n");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(all[3].kind, Kind::User("u".into()));
        assert_eq!(all[3].line, 14);
    }

    #[test]
    fn heredoc_shebang_and_json_form() {
        match kind("RUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF") {
            Kind::Run(r) => assert_eq!(
                r.script(),
                Script::Shebang { name: "EOF", data: "#!/usr/bin/env python3\nprint(1)\n".into() }
            ),
            other => panic!("{other:?}"),
        }
        // JSON form never takes heredocs: the next line is an instruction.
        let all = instrs("FROM a\nRUN [\"cat\", \"<<EOF\"]\nUSER EOF\n");
        assert_eq!(all.len(), 2);
        let e = error("FROM a\nRUN <<EOF\nnever ends\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unterminated heredoc"));
    }

    #[test]
    fn heredocs_copy() {
        let src = "FROM a\nCOPY <<EOF /x\nhello $NAME\nEOF\nCOPY --chmod=755 <<-'A' b.txt <<B /dir/\n\t\tfirst\n\tA\nsecond\nB\n";
        let all = instrs(src);
        match &all[0].kind {
            Kind::Copy(c) => {
                assert!(c.sources.is_empty());
                assert_eq!(c.dest, "/x");
                assert_eq!(
                    c.heredocs,
                    vec![Heredoc { name: "EOF".into(), content: "hello $NAME\n".into(), expand: true, chomp: false }]
                );
            }
            other => panic!("{other:?}"),
        }
        match &all[1].kind {
            Kind::Copy(c) => {
                assert_eq!(c.sources, strs(&["b.txt"]));
                assert_eq!(c.chmod.as_deref(), Some("755"));
                assert_eq!(c.heredocs.len(), 2);
                assert_eq!(c.heredocs[0].data(), "first\n");
                assert!(!c.heredocs[0].expand && c.heredocs[0].chomp);
                assert_eq!(c.heredocs[1].content, "second\n");
            }
            other => panic!("{other:?}"),
        }
        assert!(error("FROM a\nCOPY /foo <<EOF\nEOF\n")
            .message
            .contains("COPY cannot accept a heredoc as a destination"));
    }

    #[test]
    fn copy_and_add_flags() {
        match kind(
            "COPY --chown=1000:1000 --chmod=755 --link --from=builder --exclude=*.md --exclude=x --parents a b /dst/",
        ) {
            Kind::Copy(c) => {
                assert_eq!(c.sources, strs(&["a", "b"]));
                assert_eq!(c.dest, "/dst/");
                assert_eq!(c.chown.as_deref(), Some("1000:1000"));
                assert_eq!(c.chmod.as_deref(), Some("755"));
                assert!(c.link && c.parents);
                assert_eq!(c.from.as_deref(), Some("builder"));
                assert_eq!(c.exclude, strs(&["*.md", "x"]));
            }
            other => panic!("{other:?}"),
        }
        match kind("ADD --keep-git-dir --checksum=sha256:abc --unpack=false --link=false https://x/y.tgz /y") {
            Kind::Add(c) => {
                assert!(c.keep_git_dir && !c.link);
                assert_eq!(c.checksum.as_deref(), Some("sha256:abc"));
                assert_eq!(c.unpack, Some(false));
            }
            other => panic!("{other:?}"),
        }
        match kind("COPY [\"a b\", \"/c d/\"]") {
            Kind::Copy(c) => assert_eq!((c.sources, c.dest), (strs(&["a b"]), "/c d/".to_string())),
            other => panic!("{other:?}"),
        }
        match kind("COPY --chown=\"a b\" -- --weird /x") {
            Kind::Copy(c) => {
                assert_eq!(c.chown.as_deref(), Some("a b"));
                assert_eq!(c.sources, strs(&["--weird"]));
            }
            other => panic!("{other:?}"),
        }
        for (src, msg) in [
            ("COPY --from=a --from=b x y", "duplicate flag specified: --from"),
            ("COPY --chown x y", "missing a value on flag: --chown"),
            ("COPY --link= x y", "missing a value on flag: --link"),
            ("COPY --link=maybe x y", "expecting boolean value for flag --link, not: maybe"),
            ("COPY --checksum=x a b", "unknown flag: --checksum"),
            ("ADD --from=x a b", "unknown flag: --from"),
            ("COPY onlyone", "COPY requires at least two arguments"),
            ("ADD", "ADD requires at least two arguments"),
        ] {
            let e = error(&format!("FROM a\n\n{src}\n"));
            assert_eq!(e.line, 3, "{src}");
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn env_and_label() {
        assert_eq!(
            kind("ENV A=\"a b\" B='c d' C=e\\ f"),
            Kind::Env(pairs(&[("A", "\"a b\""), ("B", "'c d'"), ("C", "e\\ f")]))
        );
        assert_eq!(kind("ENV X hello world"), Kind::Env(pairs(&[("X", "hello world")])));
        assert_eq!(kind("env X  \"quoted  value\""), Kind::Env(pairs(&[("X", "\"quoted  value\"")])));
        assert_eq!(kind("ENV E="), Kind::Env(pairs(&[("E", "")])));
        assert_eq!(
            kind("LABEL org.opencontainers.image.title=\"My App\" version=1.0 \"quoted key\"=v"),
            Kind::Label(pairs(&[
                ("org.opencontainers.image.title", "\"My App\""),
                ("version", "1.0"),
                ("\"quoted key\"", "v"),
            ]))
        );
        assert_eq!(kind("LABEL legacy value here"), Kind::Label(pairs(&[("legacy", "value here")])));
        for (src, msg) in [
            ("ENV", "ENV requires at least one argument"),
            ("ENV ONLY", "ENV must have two arguments"),
            ("ENV A=1 B", "Syntax error - can't find = in \"B\""),
            ("ENV =x", "ENV names can not be blank"),
            ("LABEL", "LABEL requires at least one argument"),
            ("ENV --x A=1", "unknown flag: --x"),
        ] {
            let e = error(&format!("FROM a\n{src}\n"));
            assert_eq!(e.line, 2, "{src}");
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn json_and_shell_forms() {
        assert_eq!(
            kind("CMD [\"nginx\", \"-g\", \"daemon off;\"]"),
            Kind::Cmd(Command::Exec(strs(&["nginx", "-g", "daemon off;"])))
        );
        assert_eq!(kind("CMD nginx -g 'daemon off;'"), Kind::Cmd(Command::Shell("nginx -g 'daemon off;'".into())));
        // Invalid JSON (single quotes, trailing text) is the shell form, as Docker.
        assert_eq!(kind("CMD ['a']"), Kind::Cmd(Command::Shell("['a']".into())));
        assert_eq!(kind("ENTRYPOINT [\"a\"] b"), Kind::Entrypoint(Command::Shell("[\"a\"] b".into())));
        assert_eq!(kind("ENTRYPOINT []"), Kind::Entrypoint(Command::Exec(vec![])));
        assert_eq!(
            kind("RUN [ \"echo\" , \"\\u0041\" ]"),
            Kind::Run(Run { command: Command::Exec(strs(&["echo", "A"])), ..run_shell("") })
        );
        assert_eq!(kind("SHELL [\"powershell\", \"-command\"]"), Kind::Shell(strs(&["powershell", "-command"])));
        assert_eq!(kind("VOLUME [\"/a\", \"/b\"]"), Kind::Volume(strs(&["/a", "/b"])));
        assert_eq!(kind("VOLUME /a /b"), Kind::Volume(strs(&["/a", "/b"])));
        assert_eq!(kind("EXPOSE 80 443/tcp $PORT"), Kind::Expose(strs(&["80", "443/tcp", "$PORT"])));
        for (src, msg) in [
            ("CMD [1, 2]", "arrays must be comprised of strings only"),
            ("SHELL /bin/bash -c", "SHELL requires the arguments to be in JSON form"),
            ("SHELL []", "SHELL requires at least one argument"),
            ("CMD", "CMD requires at least one argument"),
            ("RUN", "RUN requires at least one argument"),
            ("RUN []", "RUN requires at least one argument"),
            ("VOLUME [\"\"]", "VOLUME specified can not be an empty string"),
            ("EXPOSE", "EXPOSE requires at least one argument"),
            ("CMD --x a", "unknown flag: --x"),
        ] {
            let e = error(&format!("FROM a\n{src}\n"));
            assert_eq!(e.line, 2, "{src}");
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn single_value_instructions() {
        assert_eq!(kind("USER 1000:1000"), Kind::User("1000:1000".into()));
        assert_eq!(kind("WORKDIR /app dir"), Kind::Workdir("/app dir".into()));
        assert_eq!(kind("STOPSIGNAL SIGTERM"), Kind::StopSignal("SIGTERM".into()));
        assert_eq!(kind("MAINTAINER me <me@x>"), Kind::Maintainer("me <me@x>".into()));
        assert_eq!(
            kind("ARG A B=\"x y\" C="),
            Kind::Arg(vec![
                ArgDecl { name: "A".into(), default: None },
                ArgDecl { name: "B".into(), default: Some("\"x y\"".into()) },
                ArgDecl { name: "C".into(), default: Some("".into()) },
            ])
        );
        for (src, msg) in [
            ("USER", "USER requires exactly one argument"),
            ("WORKDIR", "WORKDIR requires exactly one argument"),
            ("STOPSIGNAL --x=1 SIGKILL", "unknown flag: --x"),
            ("ARG", "ARG requires at least one argument"),
            ("ARG =x", "ARG names can not be blank"),
        ] {
            let e = error(&format!("FROM a\n{src}\n"));
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn healthcheck() {
        assert_eq!(kind("HEALTHCHECK NONE"), Kind::Healthcheck(Healthcheck::None));
        assert_eq!(
            kind("HEALTHCHECK --interval=30s --timeout=1m30s --start-period=1.5s --start-interval=500ms --retries=3 CMD curl -f http://localhost/ || exit 1"),
            Kind::Healthcheck(Healthcheck::Check {
                test: strs(&["CMD-SHELL", "curl -f http://localhost/ || exit 1"]),
                interval: Some(Duration::from_secs(30)),
                timeout: Some(Duration::from_secs(90)),
                start_period: Some(Duration::from_millis(1500)),
                start_interval: Some(Duration::from_millis(500)),
                retries: Some(3),
            })
        );
        assert_eq!(
            kind("healthcheck --interval=0s cmd [\"/bin/check\", \"-q\"]"),
            Kind::Healthcheck(Healthcheck::Check {
                test: strs(&["CMD", "/bin/check", "-q"]),
                interval: None,
                timeout: None,
                start_period: None,
                start_interval: None,
                retries: None,
            })
        );
        for (src, msg) in [
            ("HEALTHCHECK", "HEALTHCHECK requires at least one argument"),
            ("HEALTHCHECK NONE x", "HEALTHCHECK NONE takes no arguments"),
            ("HEALTHCHECK --interval=1s NONE", "unknown flag: --interval"),
            ("HEALTHCHECK CMD", "Missing command after HEALTHCHECK CMD"),
            ("HEALTHCHECK RUN x", "Unknown type \"RUN\" in HEALTHCHECK (try CMD)"),
            ("HEALTHCHECK --interval=10 CMD x", "missing unit in duration"),
            ("HEALTHCHECK --interval=1x CMD x", "unknown unit"),
            ("HEALTHCHECK --timeout=10us CMD x", "Interval \"timeout\" cannot be less than 1ms"),
            ("HEALTHCHECK --retries=-1 CMD x", "--retries cannot be negative (-1)"),
            ("HEALTHCHECK --retries=x CMD x", "invalid syntax"),
            ("HEALTHCHECK --foo=1 CMD x", "unknown flag: --foo"),
        ] {
            let e = error(&format!("FROM a\n{src}\n"));
            assert_eq!(e.line, 2);
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn onbuild() {
        match kind("ONBUILD RUN --mount=type=cache,target=/c make") {
            Kind::Onbuild(inner) => {
                assert_eq!(inner.text, "RUN --mount=type=cache,target=/c make");
                match inner.kind {
                    Kind::Run(r) => assert_eq!(r.mounts[0].kind, MountKind::Cache),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        match kind("ONBUILD COPY <<EOF /x\nbody\nEOF") {
            Kind::Onbuild(inner) => match inner.kind {
                Kind::Copy(c) => assert_eq!(c.heredocs[0].content, "body\n"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        for (src, msg) in [
            ("ONBUILD", "ONBUILD requires at least one argument"),
            ("ONBUILD ONBUILD RUN x", "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed"),
            ("ONBUILD from x", "FROM isn't allowed as an ONBUILD trigger"),
            ("ONBUILD MAINTAINER x", "MAINTAINER isn't allowed as an ONBUILD trigger"),
            ("ONBUILD FOO x", "unknown instruction: FOO"),
        ] {
            let e = error(&format!("FROM a\n{src}\n"));
            assert_eq!(e.line, 2);
            assert!(e.message.contains(msg), "{src}: {e}");
        }
    }

    #[test]
    fn run_mounts() {
        let r = match kind("RUN --mount=type=cache,target=/root/.cache,id=pip,sharing=LOCKED,mode=0755,uid=1000,gid=1000 \\\n    --mount=type=bind,source=.,target=/src,from=builder,rw \\\n    --mount=type=tmpfs,target=/tmp,size=64m \\\n    --mount=type=secret,id=token,env=TOKEN,required \\\n    --mount=type=ssh,required=true \\\n    --mount=target=/b \\\n    --network=none --security=insecure make") {
            Kind::Run(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.command, Command::Shell("make".into()));
        assert_eq!((r.network.as_deref(), r.security.as_deref()), (Some("none"), Some("insecure")));
        let m = &r.mounts;
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].kind, MountKind::Cache);
        assert_eq!(m[0].target.as_deref(), Some("/root/.cache"));
        assert_eq!(m[0].id.as_deref(), Some("pip"));
        assert_eq!(m[0].sharing.as_deref(), Some("locked"));
        assert_eq!(
            (m[0].mode.as_deref(), m[0].uid.as_deref(), m[0].gid.as_deref()),
            (Some("0755"), Some("1000"), Some("1000"))
        );
        assert!(!m[0].readonly);
        assert_eq!(
            (m[1].kind, m[1].source.as_deref(), m[1].from.as_deref()),
            (MountKind::Bind, Some("."), Some("builder"))
        );
        assert!(!m[1].readonly);
        assert_eq!((m[2].kind, m[2].size.as_deref()), (MountKind::Tmpfs, Some("64m")));
        assert_eq!((m[3].kind, m[3].env.as_deref(), m[3].required), (MountKind::Secret, Some("TOKEN"), true));
        assert!(m[3].readonly);
        assert_eq!((m[4].kind, m[4].required), (MountKind::Ssh, true));
        assert_eq!((m[5].kind, m[5].readonly), (MountKind::Bind, true));
        // Flag extraction removes plain quotes first (as BuildKit), so CSV quoting needs
        // escaped quotes.
        match kind(r#"RUN --mount=type=bind,\"target=/a,b\" x"#) {
            Kind::Run(r) => assert_eq!(r.mounts[0].target.as_deref(), Some("/a,b")),
            other => panic!("{other:?}"),
        }
        assert!(error("FROM a\nRUN --mount=type=bind,\"target=/a,b\" x")
            .message
            .contains("invalid field 'b' must be a key=value pair"));
        for (flag, msg) in [
            ("--mount=type=nfs,target=/x", "unsupported mount type \"nfs\""),
            ("--mount=type=cache,target=/x,colour=red", "unexpected key 'colour' in 'colour=red'"),
            ("--mount=type=cache,bogus", "invalid field 'bogus' must be a key=value pair"),
            ("--mount=required,type=secret,id=x", "unexpected key 'required' for mount type 'bind'"),
            ("--mount=type=bind,target=/x,size=1m", "unexpected key 'size' for mount type 'bind'"),
            ("--mount=type=tmpfs,target=/x,size=lots", "invalid value for size: lots"),
            ("--mount=type=cache,target=/x,sharing=yes", "unsupported sharing value \"yes\""),
            ("--mount=type=cache,target=/x,mode=9", "invalid value 9 for mode"),
            ("--mount=type=cache,target=/x,uid=me", "invalid value me for uid"),
            ("--mount=type=bind,target=/x,uid=1", "uid not allowed for \"bind\" type mounts"),
            ("--mount=type=bind,target=/x,ro=maybe", "invalid value for ro: maybe"),
            ("--mount=type=secret", "invalid secret mount. one of source, target required"),
            ("--mount=type=secret,id=a,source=b", "both source and id can't be set"),
            ("--mount=type=secret,id=a,from=b", "secret mount should not have a from"),
            ("--mount=type=bind,target=/x,sharing=shared", "invalid cache sharing set for bind mount"),
            ("--mount=type=bind,from=$STAGE,target=/x", "doesn't support variable expansion"),
            ("--mount=", "failed to parse csv mounts"),
            (r#"--mount=type=bind,tar\"get=/x"#, "failed to parse csv mounts"),
            ("--network=bridge", "invalid network mode \"bridge\""),
            ("--security=root", "security \"root\" is not valid"),
            ("--device=/dev/x", "unknown flag: --device"),
        ] {
            let e = error(&format!("FROM a\nRUN {flag} true\n"));
            assert_eq!(e.line, 2);
            assert!(e.message.contains(msg), "{flag}: {e}");
        }
        // Variables are left for the executor.
        match kind("RUN --mount=type=cache,target=/x,uid=$UID x") {
            Kind::Run(r) => assert_eq!(r.mounts[0].uid.as_deref(), Some("$UID")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn structural_errors() {
        for (src, line, msg) in [
            ("", 1, "file with no instructions"),
            ("# only a comment\n\n", 2, "file with no instructions"),
            ("FROM\n", 1, "FROM requires either one or three arguments"),
            ("FROM a b\n", 1, "FROM requires either one or three arguments"),
            ("FROM --flavour=x a\n", 1, "unknown flag: --flavour"),
            ("RUN x\nFROM a\n", 1, "no build stage in current context"),
            ("ARG A\n", 1, "dockerfile contains no stages to build"),
            ("FROM a\nFROB x\n", 2, "unknown instruction: FROB"),
            ("FROM a\n\\\n", 2, "unexpected end of file after line continuation"),
        ] {
            let e = error(src);
            assert_eq!(e.line, line, "{src:?}: {e}");
            assert!(e.message.contains(msg), "{src:?}: {e}");
        }
        // A dangling continuation after content, even followed by blank and comment lines,
        // is accepted as BuildKit does.
        let all = instrs("FROM a\nRUN x\nUSER u \\\n\n# c\n");
        assert_eq!(all[1].kind, Kind::User("u".into()));
        assert_eq!(ParseError { line: 4, message: "boom".into() }.to_string(), "line 4: boom");
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let all = instrs("from a\nrun echo\nCoPy a b\nWorkDir /x\n");
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].kind, Kind::Workdir("/x".into()));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1h2m3.5s"), Ok(3_723_500_000_000));
        assert_eq!(parse_go_duration(".5ms"), Ok(500_000));
        assert_eq!(parse_go_duration("0"), Ok(0));
        assert_eq!(parse_go_duration("-2s"), Ok(-2_000_000_000));
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("s").is_err());
    }
}

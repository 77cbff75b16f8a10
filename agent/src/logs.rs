//! Container log files: the writer the shim feeds from the container's stdout/stderr pipes, and
//! the reader behind `berth container logs` (and later the API's log streams).
//!
//! Format: one record per line, as CRI runtimes write it:
//! `<RFC 3339 UTC timestamp, nanoseconds> <stdout|stderr> <F|P> <raw bytes>\n`.
//! `F` ends a line (the reader adds the `\n` back); `P` is a part of a longer line, or the last
//! bytes of a stream that did not end in a newline. Bytes are written as they came: non-UTF-8
//! survives, and a line of any length comes back whole because the reader joins `P` records.
//! Rotation is by size: `container.log` becomes `container.log.1`, and so on up to `max_files`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A record longer than this is split into `P` parts so that one runaway line cannot make the
/// shim hold unbounded memory.
const MAX_RECORD: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line (or, for a stream that ended without a newline, its tail) read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub timestamp: String,
    pub stream: Stream,
    /// The bytes as the container wrote them, with the trailing `\n` when there was one.
    pub bytes: Vec<u8>,
}

/// Appends records to a container's log, rotating by size.
pub struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
    pending: [Vec<u8>; 2],
}

impl Writer {
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> io::Result<Writer> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Writer {
            path: path.to_path_buf(),
            file,
            size,
            max_size: max_size.max(4096),
            max_files,
            pending: [Vec::new(), Vec::new()],
        })
    }

    /// Feeds bytes read from a stream; complete lines are written at once.
    pub fn feed(&mut self, stream: Stream, mut data: &[u8]) -> io::Result<()> {
        let idx = stream as usize;
        while let Some(nl) = data.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.pending[idx]);
            line.extend_from_slice(&data[..nl]);
            self.record(stream, b'F', &line)?;
            data = &data[nl + 1..];
        }
        self.pending[idx].extend_from_slice(data);
        while self.pending[idx].len() >= MAX_RECORD {
            let rest = self.pending[idx].split_off(MAX_RECORD);
            let part = std::mem::replace(&mut self.pending[idx], rest);
            self.record(stream, b'P', &part)?;
        }
        Ok(())
    }

    /// Writes what is left of a stream that ended without a final newline.
    pub fn finish(&mut self, stream: Stream) -> io::Result<()> {
        let idx = stream as usize;
        if !self.pending[idx].is_empty() {
            let part = std::mem::take(&mut self.pending[idx]);
            self.record(stream, b'P', &part)?;
        }
        Ok(())
    }

    /// Writes a line of Berth's own about the container (start failures, OOM kills) to stderr's
    /// stream, so that `logs` shows it in order with the app's output.
    pub fn note(&mut self, text: &str) -> io::Result<()> {
        self.record(Stream::Stderr, b'F', format!("[berth] {text}").as_bytes())
    }

    fn record(&mut self, stream: Stream, tag: u8, bytes: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(bytes.len() + 48);
        buf.extend_from_slice(now_rfc3339().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(stream.as_str().as_bytes());
        buf.push(b' ');
        buf.push(tag);
        buf.push(b' ');
        buf.extend_from_slice(bytes);
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        if self.size >= self.max_size {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..self.max_files).rev() {
            let from = rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, rotated(&self.path, n + 1))?;
            }
        }
        fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z");
    now.format(&f).unwrap_or_default()
}

/// Reads a log back: the rotated files oldest first, then the live one.
pub fn read_all(path: &Path, max_files: u32) -> io::Result<Vec<Line>> {
    let mut lines = Vec::new();
    let mut parser = Parser::default();
    for n in (1..=max_files.max(16)).rev() {
        let p = rotated(path, n);
        if let Ok(f) = File::open(&p) {
            parser.parse(BufReader::new(f), &mut |l| lines.push(l))?;
        }
    }
    if let Ok(f) = File::open(path) {
        parser.parse(BufReader::new(f), &mut |l| lines.push(l))?;
    }
    lines.extend(parser.flush());
    Ok(lines)
}

/// Joins `P` records into whole lines across reads (and files).
#[derive(Default)]
pub struct Parser {
    partial: [Option<(String, Vec<u8>)>; 2],
}

impl Parser {
    /// Parses complete records from `r`, calling `out` for each finished line. A record cut off
    /// at the end of `r` (a writer mid-write) is left unread: the caller passes how far it got.
    pub fn parse(&mut self, mut r: impl BufRead, out: &mut dyn FnMut(Line)) -> io::Result<u64> {
        let mut consumed = 0u64;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf)?;
            if n == 0 || buf.last() != Some(&b'\n') {
                return Ok(consumed);
            }
            consumed += n as u64;
            buf.pop();
            if let Some(line) = self.record(&buf) {
                out(line);
            }
        }
    }

    fn record(&mut self, rec: &[u8]) -> Option<Line> {
        let mut it = rec.splitn(4, |&b| b == b' ');
        let ts = std::str::from_utf8(it.next()?).ok()?.to_string();
        let stream = match it.next()? {
            b"stdout" => Stream::Stdout,
            b"stderr" => Stream::Stderr,
            _ => return None,
        };
        let tag = it.next()?;
        let body = it.next().unwrap_or(b"");
        let slot = &mut self.partial[stream as usize];
        let (ts0, mut bytes) = slot.take().unwrap_or((ts, Vec::new()));
        bytes.extend_from_slice(body);
        if tag == b"F" {
            bytes.push(b'\n');
            Some(Line { timestamp: ts0, stream, bytes })
        } else {
            *slot = Some((ts0, bytes));
            None
        }
    }

    /// Lines still pending at the end: streams that ended without a newline.
    pub fn flush(&mut self) -> Vec<Line> {
        let mut out = Vec::new();
        for (i, slot) in self.partial.iter_mut().enumerate() {
            if let Some((timestamp, bytes)) = slot.take() {
                let stream = if i == 0 { Stream::Stdout } else { Stream::Stderr };
                out.push(Line { timestamp, stream, bytes });
            }
        }
        out
    }
}

/// Follows a live log from `offset`, handling rotation: returns new lines and the new offset.
/// `inode` tracks the file so a rotation (new inode) restarts at 0 of the new file after the
/// rest of the old one was read through its rotated name.
pub struct Follower {
    path: PathBuf,
    offset: u64,
    inode: Option<u64>,
    parser: Parser,
}

impl Follower {
    /// Starts at the end of the current log (after `read_all` showed what was there).
    pub fn at_end(path: &Path) -> Follower {
        use std::os::unix::fs::MetadataExt;
        let (offset, inode) = match fs::metadata(path) {
            Ok(m) => (m.len(), Some(m.ino())),
            Err(_) => (0, None),
        };
        Follower { path: path.to_path_buf(), offset, inode, parser: Parser::default() }
    }

    /// Starts at the beginning of the live log (a container that was just created).
    pub fn from_start(path: &Path) -> Follower {
        Follower { path: path.to_path_buf(), offset: 0, inode: None, parser: Parser::default() }
    }

    pub fn poll(&mut self, out: &mut dyn FnMut(Line)) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = fs::metadata(&self.path) else { return Ok(()) };
        if self.inode.is_some() && self.inode != Some(meta.ino()) {
            // Rotated: finish the old file (now `.1`), then start the new one from 0.
            if let Ok(mut f) = File::open(rotated(&self.path, 1)) {
                if f.metadata()?.ino() == self.inode.unwrap_or(0) {
                    f.seek(SeekFrom::Start(self.offset))?;
                    self.parser.parse(BufReader::new(f), out)?;
                }
            }
            self.offset = 0;
        }
        self.inode = Some(meta.ino());
        if meta.len() > self.offset {
            let mut f = File::open(&self.path)?;
            f.seek(SeekFrom::Start(self.offset))?;
            self.offset += self.parser.parse(BufReader::new(&mut f), out)?;
        }
        Ok(())
    }

    pub fn flush(&mut self, out: &mut dyn FnMut(Line)) {
        for l in self.parser.flush() {
            out(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_and_binary_come_back_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut w = Writer::open(&path, 10 << 20, 3).unwrap();
        let long: Vec<u8> = (0..600_000).map(|i| b'a' + (i % 26) as u8).collect();
        w.feed(Stream::Stdout, &long[..1000]).unwrap();
        w.feed(Stream::Stderr, b"err line\n").unwrap();
        w.feed(Stream::Stdout, &long[1000..]).unwrap();
        w.feed(Stream::Stdout, b"\n\xff\xfe raw\nno newline").unwrap();
        w.finish(Stream::Stdout).unwrap();
        w.finish(Stream::Stderr).unwrap();
        let lines = read_all(&path, 3).unwrap();
        let out: Vec<u8> = lines.iter().filter(|l| l.stream == Stream::Stdout).flat_map(|l| l.bytes.clone()).collect();
        let mut want = long.clone();
        want.extend_from_slice(b"\n\xff\xfe raw\nno newline");
        assert_eq!(out, want);
        let err: Vec<_> = lines.iter().filter(|l| l.stream == Stream::Stderr).collect();
        assert_eq!(err.len(), 1);
        assert_eq!(err[0].bytes, b"err line\n");
    }

    #[test]
    fn rotation_keeps_max_files_and_reads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut w = Writer::open(&path, 4096, 2).unwrap();
        for i in 0..400 {
            w.feed(Stream::Stdout, format!("line {i:04}\n").as_bytes()).unwrap();
        }
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
        let lines = read_all(&path, 2).unwrap();
        let nums: Vec<u32> =
            lines.iter().map(|l| std::str::from_utf8(&l.bytes[5..9]).unwrap().parse().unwrap()).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "in order without gaps");
        assert_eq!(*nums.last().unwrap(), 399);
    }

    #[test]
    fn follower_sees_appends_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let mut w = Writer::open(&path, 4096, 2).unwrap();
        w.feed(Stream::Stdout, b"before\n").unwrap();
        let mut f = Follower::at_end(&path);
        let mut got = Vec::new();
        for i in 0..200 {
            w.feed(Stream::Stdout, format!("l{i}\n").as_bytes()).unwrap();
            if i % 50 == 0 {
                f.poll(&mut |l| got.push(l.bytes)).unwrap();
            }
        }
        f.poll(&mut |l| got.push(l.bytes)).unwrap();
        assert_eq!(got.first().unwrap(), b"l0\n");
        assert_eq!(got.last().unwrap(), b"l199\n");
    }
}

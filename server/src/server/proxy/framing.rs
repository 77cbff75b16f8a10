//! Watches the bytes of an HTTP/1.1 connection as hyper reads them and notes, for each request
//! head in order, whether it carried both `Content-Length` and `Transfer-Encoding`.
//!
//! Why: hyper resolves that conflict itself (Transfer-Encoding wins, Content-Length is
//! dropped), as RFC 9112 §6.1 allows, so a handler cannot see it; Berth refuses such requests,
//! the other choice the RFC gives, because a peer that disagrees about framing is how request
//! smuggling starts. To find the next head the scanner follows the body framing (length or
//! chunks); after an upgrade request, or anything it cannot follow, it stops noting.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest head line the scanner follows; hyper refuses larger heads anyway.
const MAX_LINE: usize = 128 * 1024;

/// What the scanner noted about one request head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Note {
    /// It carried both Content-Length and Transfer-Encoding.
    pub cl_and_te: bool,
    /// It was longer than the limit given to [`Scanner::new`].
    pub too_large: bool,
}

/// One note per request head seen, oldest first.
pub type Flags = Arc<Mutex<VecDeque<Note>>>;

#[derive(Debug)]
enum State {
    Head {
        line: Vec<u8>,
        first: bool,
        cl: Option<u64>,
        te: Option<bool>,
        upgrade: bool,
        size: usize,
    },
    Body(u64),
    ChunkSize(Vec<u8>),
    /// Chunk data plus its CRLF.
    ChunkData(u64),
    Trailer(Vec<u8>),
    Off,
}

fn new_head() -> State {
    State::Head { line: Vec::new(), first: true, cl: None, te: None, upgrade: false, size: 0 }
}

pub struct Scanner {
    state: State,
    flags: Flags,
    max_head: usize,
}

impl Scanner {
    pub fn new(flags: Flags, max_head: usize) -> Scanner {
        Scanner { state: new_head(), flags, max_head }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = new_head();
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Head { line, size, .. } => {
                    let nl = data.iter().position(|&b| b == b'\n');
                    let take = nl.map_or(data.len(), |n| n + 1);
                    *size += take;
                    if *size > self.max_head {
                        // Noted once; the handler refuses it (431) and the connection closes.
                        self.flags
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_back(Note { cl_and_te: false, too_large: true });
                        self.state = State::Off;
                        return;
                    }
                    let Some(nl) = nl else {
                        line.extend_from_slice(data);
                        return;
                    };
                    line.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let l = std::mem::take(line);
                    let l = l.strip_suffix(b"\r").unwrap_or(&l).to_vec();
                    self.line(&l);
                }
                State::ChunkSize(line) | State::Trailer(line) => {
                    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                        line.extend_from_slice(data);
                        if line.len() > MAX_LINE {
                            self.state = State::Off;
                        }
                        return;
                    };
                    line.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let l = std::mem::take(line);
                    let l = l.strip_suffix(b"\r").unwrap_or(&l).to_vec();
                    self.line(&l);
                }
            }
        }
    }

    fn line(&mut self, l: &[u8]) {
        match &mut self.state {
            State::Head { first, cl, te, upgrade, .. } => {
                if *first {
                    if l.is_empty() {
                        return; // CRLFs between requests are allowed
                    }
                    *first = false;
                    if l.starts_with(b"CONNECT ") {
                        *upgrade = true;
                    }
                    return;
                }
                if !l.is_empty() {
                    let Some(colon) = l.iter().position(|&b| b == b':') else { return };
                    let name = String::from_utf8_lossy(&l[..colon]).trim().to_ascii_lowercase();
                    let value = String::from_utf8_lossy(&l[colon + 1..]).trim().to_ascii_lowercase();
                    match name.as_str() {
                        "content-length" => *cl = value.parse().ok().or(Some(0)),
                        "transfer-encoding" => {
                            *te = Some(value.rsplit(',').next().map(str::trim) == Some("chunked"));
                        }
                        "upgrade" => *upgrade = true,
                        _ => {}
                    }
                    return;
                }
                let both = cl.is_some() && te.is_some();
                self.flags
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(Note { cl_and_te: both, too_large: false });
                self.state = match (both, *upgrade, *te, *cl) {
                    // Refused and closed, or no longer HTTP: nothing more to note.
                    (true, _, _, _) | (_, true, _, _) => State::Off,
                    (_, _, Some(true), _) => State::ChunkSize(Vec::new()),
                    (_, _, Some(false), _) => State::Off,
                    (_, _, None, Some(n)) if n > 0 => State::Body(n),
                    _ => new_head(),
                };
            }
            State::ChunkSize(_) => {
                let hex = String::from_utf8_lossy(l);
                let size = hex.split(';').next().unwrap_or("").trim();
                self.state = match u64::from_str_radix(size, 16) {
                    Ok(0) => State::Trailer(Vec::new()),
                    Ok(n) => State::ChunkData(n + 2),
                    Err(_) => State::Off,
                };
            }
            State::Trailer(_) if l.is_empty() => self.state = new_head(),
            _ => {}
        }
    }
}

/// A connection whose reads go through a [`Scanner`].
pub struct Watched<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> Watched<T> {
    pub fn new(inner: T, flags: Flags, max_head: usize) -> Watched<T> {
        Watched { inner, scanner: Scanner::new(flags, max_head) }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.scanner.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_of(chunks: &[&[u8]]) -> Vec<bool> {
        let flags = Flags::default();
        let mut s = Scanner::new(flags.clone(), 1 << 20);
        for c in chunks {
            s.feed(c);
        }
        let v = flags.lock().unwrap().iter().map(|n| n.cl_and_te).collect();
        v
    }

    #[test]
    fn a_head_over_the_limit_is_noted_even_when_fed_in_pieces() {
        let flags = Flags::default();
        let mut s = Scanner::new(flags.clone(), 100);
        s.feed(b"GET / HTTP/1.1\r\nX-Big: ");
        s.feed(&[b'a'; 90]);
        s.feed(b"\r\n\r\n");
        let notes: Vec<Note> = flags.lock().unwrap().iter().copied().collect();
        assert_eq!(notes, [Note { cl_and_te: false, too_large: true }]);
    }

    #[test]
    fn one_flag_per_head_through_bodies_of_every_framing() {
        let cases: &[(&[&[u8]], &[bool])] = &[
            (&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], &[false]),
            (&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"], &[true]),
            (&[b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n"], &[true]),
            // A body that looks like a head is skipped by its length...
            (
                &[
                    b"POST / HTTP/1.1\r\nContent-Length: 44\r\n\r\n",
                    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTE: x\r\n\r\n",
                    b"GET /2 HTTP/1.1\r\n\r\n",
                ],
                &[false, false],
            ),
            // ...or by its chunks, split anywhere.
            (
                &[
                    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n13\r\nContent-Length: 1\r\n",
                    b"\r\n0\r",
                    b"\n\r\nGET / HTTP/1.1\r\n\r\n",
                ],
                &[false, false],
            ),
            (
                &[
                    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                ],
                &[false],
            ),
            (&[b"\r\nGET / HTTP/1.1\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n"], &[false, false]),
        ];
        for (chunks, want) in cases {
            assert_eq!(
                flags_of(chunks),
                *want,
                "{:?}",
                chunks.iter().map(|c| String::from_utf8_lossy(c)).collect::<Vec<_>>()
            );
        }
    }
}

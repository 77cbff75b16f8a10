//! The client's side of a terminal in a container (`berth container exec -t`, `berth exec -t`):
//! raw mode for the local terminal, its size, and the copy loop between it and the container's.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};

/// The local terminal in raw mode (no echo, no line editing, no signals from keys: every byte
/// goes to the container's terminal, which does all that); restored when dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal (None otherwise).
    pub fn enter() -> io::Result<Option<RawMode>> {
        let stdin = io::stdin();
        if !rustix::termios::isatty(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The local terminal's size (rows, columns): stdin's, else stdout's; None if neither is one.
pub fn size() -> Option<(u16, u16)> {
    let ws =
        rustix::termios::tcgetwinsize(io::stdin()).or_else(|_| rustix::termios::tcgetwinsize(io::stdout())).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// What the copy loop talks to: the container's terminal, local or across the API.
pub trait Remote {
    /// The descriptor to poll for output.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Reads what output is there (once: the descriptor was readable) and writes it to stdout
    /// or stderr; false once there is no more.
    fn pump_output(&mut self) -> io::Result<bool>;
    fn write_input(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Our stdin reached its end.
    fn close_input(&mut self) -> io::Result<()>;
    fn resize(&mut self, rows: u16, cols: u16) -> io::Result<()>;
    fn signal(&mut self, sig: nix::sys::signal::Signal) -> io::Result<()>;
}

/// Copies stdin (with `interactive`) to `remote` and its output to stdout until the output ends,
/// passing on window size changes (the first size went with the request) and the signals this
/// process receives.
pub fn pump(remote: &mut dyn Remote, interactive: bool) -> io::Result<()> {
    berth_agent::engine::watch_window_changes();
    berth_agent::engine::forward_signals();
    let stdin = io::stdin();
    let mut stdin_open = interactive;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if berth_agent::engine::take_window_change() {
            if let Some((rows, cols)) = size() {
                remote.resize(rows, cols)?;
            }
        }
        if let Some(sig) = berth_agent::engine::take_forwarded_signal() {
            remote.signal(sig)?;
        }
        let (out_ready, in_ready) = {
            let mut fds = vec![PollFd::new(remote.fd(), PollFlags::POLLIN)];
            if stdin_open {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if out_ready && !remote.pump_output()? {
            break;
        }
        if in_ready {
            match stdin.lock().read(&mut buf) {
                Ok(0) => {
                    stdin_open = false;
                    remote.close_input()?;
                }
                Ok(n) => remote.write_input(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

//! A command run on a terminal of the test's own (a pty of a given size), for `-t` tests: what
//! it writes is collected by a reader thread; the test types keys and waits for text.

use std::io::{Read, Write};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Terminal {
    pub child: Child,
    master: std::fs::File,
    rx: mpsc::Receiver<Vec<u8>>,
    /// Everything the command wrote so far.
    pub seen: String,
}

impl Terminal {
    /// Spawns `cmd` with its stdin, stdout and stderr on a new pty of `rows` x `cols`.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Terminal {
        let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let slave = std::fs::File::from(pty.slave);
        let child = cmd
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .spawn()
            .expect("spawning the command on the terminal");
        let master = std::fs::File::from(pty.master);
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Terminal { child, master, rx, seen: String::new() }
    }

    /// Waits (up to 20 s) until the command has written `want`.
    pub fn wait_for(&mut self, want: &str) {
        let end = Instant::now() + Duration::from_secs(20);
        while !self.seen.contains(want) {
            match self.rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no {want:?} from the terminal; saw {:?}", self.seen),
            }
        }
    }

    /// Types `keys` on the terminal.
    pub fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("typing on the terminal");
    }
}

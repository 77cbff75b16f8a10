//! Service to service: containers reach another service at `http://<service>.internal`
//! through Berth's proxy, so holding and scale from zero apply. Two pieces on the bridge's
//! gateway address, which every container can reach (and nothing outside this machine):
//! - a DNS responder on port 53 that answers `<service>.internal` with the gateway address
//!   (NXDOMAIN for names of no service) and relays every other query to the host's own
//!   resolvers; the server's containers get it as their only nameserver;
//! - the proxy, also listening on port 80 there (see `server::serve`).
//!
//! Invariant: `.internal` names route only for requests from the containers' subnet; from
//! anywhere else they are unknown hosts. Direct container-to-container traffic stays dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::platform::Platform;

/// The suffix of service-to-service names.
pub const SUFFIX: &str = ".internal";

/// A parsed DNS question: the name (lowercase, no trailing dot), its type, and where the
/// question section ends in the packet.
#[derive(Debug, PartialEq, Eq)]
struct Question {
    name: String,
    qtype: u16,
    end: usize,
}

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;

fn question(packet: &[u8]) -> Option<Question> {
    if packet.len() < 12 {
        return None;
    }
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    if qdcount != 1 || packet[2] & 0x80 != 0 {
        return None; // not exactly one question, or a response
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *packet.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // a compression pointer has no place in a question
        }
        let label = packet.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]);
    let _class = packet.get(i + 2..i + 4)?;
    Some(Question { name: labels.join("."), qtype, end: i + 4 })
}

/// The answer to `query` (whose question is `q`): `addr` for A (and ANY), no records for other
/// types, NXDOMAIN when `addr` is None.
fn answer(query: &[u8], q: &Question, addr: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = query[..q.end].to_vec();
    // QR=1, opcode copied, AA=1, RD copied; RA=1; RCODE 0 or 3.
    out[2] = 0x80 | (query[2] & 0x79) | 0x04;
    out[3] = 0x80 | if addr.is_none() { 3 } else { 0 };
    let with_record = addr.is_some() && (q.qtype == TYPE_A || q.qtype == TYPE_ANY);
    out[6..8].copy_from_slice(&(with_record as u16).to_be_bytes()); // ANCOUNT
    out[8..12].copy_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    if let (true, Some(ip)) = (with_record, addr) {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes()); // IN
        out.extend_from_slice(&5u32.to_be_bytes()); // TTL: services come and go
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// The host's resolvers, to relay other names to: the `[network] dns` list if set, else the
/// nameservers in /etc/resolv.conf (loopback ones included: this runs on the host).
pub fn upstreams(configured: &[Ipv4Addr]) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.iter().map(|ip| SocketAddr::new((*ip).into(), 53)).collect();
    }
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ns| ns.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Answers DNS queries on `socket` until the process ends.
pub async fn serve_dns(socket: UdpSocket, platform: Arc<Platform>, gateway: Ipv4Addr, upstreams: Vec<SocketAddr>) {
    let socket = Arc::new(socket);
    let upstreams = Arc::new(upstreams);
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "dns: receiving failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let Some(q) = question(&query) else { continue };
        if let Some(service) = q.name.strip_suffix(SUFFIX).or((q.name == "internal").then_some("")) {
            let known = !service.contains('.') && platform.get(service).is_some();
            let reply = answer(&query, &q, known.then_some(gateway));
            let _ = socket.send_to(&reply, from).await;
            continue;
        }
        let (socket, upstreams) = (socket.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(reply) = relay(&query, &upstreams).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

/// Asks each upstream in turn (2 s each) and returns the first reply with the query's id.
async fn relay(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let local: SocketAddr = if up.is_ipv4() { "0.0.0.0:0".parse().ok()? } else { "[::]:0".parse().ok()? };
        let Ok(sock) = UdpSocket::bind(local).await else { continue };
        if sock.send_to(query, up).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, from))) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await {
            if from == *up && n >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn questions_and_answers() {
        let qp = query("Web.Internal", TYPE_A);
        let q = question(&qp).unwrap();
        assert_eq!((q.name.as_str(), q.qtype, q.end), ("web.internal", TYPE_A, qp.len()));
        let a = answer(&qp, &q, Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!(&a[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1, "one answer");
        assert_eq!(&a[a.len() - 4..], &[10, 88, 0, 1]);
        let nx = answer(&qp, &q, None);
        assert_eq!((nx[3] & 0x0f, u16::from_be_bytes([nx[6], nx[7]])), (3, 0), "NXDOMAIN, no answer");
        let q6 = query("web.internal", 28);
        let a6 = answer(&q6, &question(&q6).unwrap(), Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!((a6[3] & 0x0f, u16::from_be_bytes([a6[6], a6[7]])), (0, 0), "AAAA: the name exists, no record");
        assert!(question(&qp[..10]).is_none());
        let mut resp = qp.clone();
        resp[2] |= 0x80;
        assert!(question(&resp).is_none(), "responses are not questions");
        let mut truncated = qp.clone();
        truncated.truncate(qp.len() - 3);
        assert!(question(&truncated).is_none());
    }
}

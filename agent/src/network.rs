//! Berth's container network: one Linux bridge, an address allocator shared by every berth
//! process on the data directory, and one network namespace per container joined to the bridge
//! by a veth pair, with outbound NAT.
//!
//! Kernel work is done with `ip -batch` (two execs per container, about 6 ms here) and
//! `iptables -w`. It runs in the per-container shim, never in the threaded server: creating a
//! namespace with a library that forks is unsafe there (../shared/WORLD.md).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::NetworkConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("subnet {0:?} is not a private IPv4 CIDR (RFC 1918: inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16, like 10.88.0.0/16) with a prefix of /8 to /30")]
    Subnet(String),
    #[error("bridge name {0:?} is not a valid interface name (1 to 15 characters of a-z, 0-9, '-', '_', '.')")]
    Bridge(String),
    #[error("network interface {0:?} exists and is not a bridge; set [network] bridge to another name")]
    NotBridge(String),
    #[error(
        "bridge {bridge} does not have the address {want} of the configured subnet (it has: {has}); \
             another installation may use it with another subnet: give this one its own bridge"
    )]
    BridgeAddress { bridge: String, want: String, has: String },
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what} failed: {stderr}")]
    Command { what: String, stderr: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A parsed subnet: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet, Error> {
        let bad = || Error::Subnet(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        // Only RFC 1918 private ranges: anything else is routed somewhere (a typo of a public
        // range would be masqueraded and hijack traffic to it).
        let [a, b, ..] = network.octets();
        let private =
            a == 10 || (a == 172 && (16..32).contains(&b) && prefix >= 12) || (a == 192 && b == 168 && prefix >= 16);
        if !private {
            return Err(bad());
        }
        Ok(Subnet { network, prefix })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Host addresses containers may get: after the gateway, before the broadcast address.
    fn hosts(&self) -> std::ops::Range<u32> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        base + 2..base + size - 1
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Validates the network section of the configuration (done before anything is started).
pub fn validate(cfg: &NetworkConfig) -> Result<Subnet, Error> {
    let b = &cfg.bridge;
    if b.is_empty()
        || b.len() > 15
        || b == "."
        || b == ".."
        || b == "lo"
        || !b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c))
    {
        return Err(Error::Bridge(b.clone()));
    }
    Subnet::parse(&cfg.subnet)
}

/// Checks, without changing anything, that an existing interface named like the bridge is a
/// bridge carrying the subnet's gateway address (a server checks at start, so a wrong config is
/// an error then rather than at the first container start). A bridge that does not exist yet
/// is fine: the first container creates it.
pub fn check_existing(cfg: &NetworkConfig) -> Result<(), Error> {
    let subnet = validate(cfg)?;
    let dev = Path::new("/sys/class/net").join(&cfg.bridge);
    if !dev.exists() {
        return Ok(());
    }
    if !dev.join("bridge").exists() {
        return Err(Error::NotBridge(cfg.bridge.clone()));
    }
    let net = Network { cfg: cfg.clone(), subnet, dir: PathBuf::new() };
    net.check_bridge_address()
}

/// What a container's network is made of, recorded in its state so cleanup can find it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub bridge: String,
    /// Name under /run/netns.
    pub netns: String,
    pub host_veth: String,
}

impl Attachment {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

pub struct Network {
    cfg: NetworkConfig,
    subnet: Subnet,
    dir: PathBuf,
}

impl Network {
    /// `dir` is `<data-dir>/network`: the allocator's files and the lock live there.
    pub fn new(cfg: &NetworkConfig, dir: &Path) -> Result<Network, Error> {
        let subnet = validate(cfg)?;
        fs::create_dir_all(dir.join("ips")).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(Network { cfg: cfg.clone(), subnet, dir: dir.to_path_buf() })
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Creates the bridge, its address, forwarding and NAT if they are missing. Idempotent and
    /// serialised by a lock file, so concurrent shims don't race to create the same bridge.
    pub fn ensure_bridge(&self) -> Result<(), Error> {
        let bridge = &self.cfg.bridge;
        if Path::new("/sys/class/net").join(bridge).exists() && self.nat_ok() {
            return pin_mac(bridge);
        }
        let dev = Path::new("/sys/class/net").join(bridge);
        if dev.exists() && !dev.join("bridge").exists() {
            return Err(Error::NotBridge(bridge.clone()));
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))
            .map_err(io_err("opening the network lock"))?;
        rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::Io { what: "locking the network".into(), source: e.into() })?;
        if !Path::new("/sys/class/net").join(bridge).exists() {
            let gw = format!("{}/{}", self.subnet.gateway(), self.subnet.prefix);
            ip_batch(
                None,
                &format!(
                    "link add {bridge} address {} type bridge\naddr add {gw} dev {bridge}\nlink set {bridge} up\n",
                    random_mac()
                ),
                &format!("creating bridge {bridge}"),
            )?;
        }
        pin_mac(bridge)?;
        self.check_bridge_address()?;
        fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(io_err("enabling IPv4 forwarding"))?;
        let sub = self.subnet.to_string();
        // Last in the list, so inserted first: a container may not reach another one by routing
        // through the host (bridge ports are isolated at layer 2 already).
        let rules: [&[&str]; 4] = [
            &["-t", "nat", "POSTROUTING", "-s", &sub, "!", "-o", bridge, "-j", "MASQUERADE"],
            &["-t", "filter", "FORWARD", "-i", bridge, "-j", "ACCEPT"],
            &[
                "-t",
                "filter",
                "FORWARD",
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
            &["-t", "filter", "FORWARD", "-i", bridge, "-o", bridge, "-j", "DROP"],
        ];
        for rule in rules {
            let (table, chain, spec) = (&rule[..2], rule[2], &rule[3..]);
            let exists = Command::new("iptables")
                .arg("-w")
                .args(table)
                .arg("-C")
                .arg(chain)
                .args(spec)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !exists {
                let mut cmd = Command::new("iptables");
                cmd.arg("-w").args(table).arg("-I").arg(chain).args(spec);
                run(cmd, &format!("adding iptables rule {}", rule.join(" ")))?;
            }
        }
        self.mark_ready();
        Ok(())
    }

    /// The bridge must carry the gateway address of our subnet, or containers are unreachable.
    fn check_bridge_address(&self) -> Result<(), Error> {
        let out = Command::new("ip")
            .args(["-o", "-4", "addr", "show", "dev", &self.cfg.bridge])
            .output()
            .map_err(io_err("reading the bridge's addresses"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let want = format!("{}/{}", self.subnet.gateway(), self.subnet.prefix);
        let all: Vec<&str> =
            text.lines().filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1)).collect();
        if all.contains(&want.as_str()) {
            return Ok(());
        }
        Err(Error::BridgeAddress {
            bridge: self.cfg.bridge.clone(),
            want,
            has: if all.is_empty() { "none".into() } else { all.join(", ") },
        })
    }

    fn nat_ok(&self) -> bool {
        fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map(|s| s.trim() == "1").unwrap_or(false)
            && self.dir.join("nat-ready").exists()
            && fs::read_to_string(self.dir.join("nat-ready")).ok() == Some(self.marker())
    }

    /// Records that NAT rules were checked once on this boot of the bridge, so later containers
    /// skip the iptables execs. Cleared when the bridge is recreated.
    fn mark_ready(&self) {
        let _ = fs::write(self.dir.join("nat-ready"), self.marker());
    }

    fn marker(&self) -> String {
        format!("{} {}", self.cfg.bridge, self.subnet)
    }

    /// Takes a free address for container `id`. Each address is a file created with O_EXCL, so
    /// two processes can never hand out the same one.
    pub fn allocate(&self, id: &str) -> Result<Ipv4Addr, Error> {
        let range = self.subnet.hosts();
        let len = range.end - range.start;
        // Start after the most recent allocation: addresses are not reused at once, which keeps
        // stale ARP and conntrack entries of a just-removed container from hitting a new one.
        let hint = fs::read_to_string(self.dir.join("last"))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|ip| range.contains(ip))
            .map(|ip| ip - range.start + 1)
            .unwrap_or(0);
        for i in 0..len {
            let ip = Ipv4Addr::from(range.start + (hint + i) % len);
            let path = self.dir.join("ips").join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(id.as_bytes()).map_err(io_err("recording an address"))?;
                    let _ = fs::write(self.dir.join("last"), ip.to_string());
                    return Ok(ip);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::Io { what: format!("allocating {ip}"), source: e }),
            }
        }
        Err(Error::Exhausted(self.subnet.to_string()))
    }

    /// Gives an address back, if `id` still holds it.
    pub fn release(&self, ip: Ipv4Addr, id: &str) {
        let path = self.dir.join("ips").join(ip.to_string());
        if fs::read_to_string(&path).map(|owner| owner == id).unwrap_or(false) {
            let _ = fs::remove_file(path);
        }
    }

    /// Creates the namespace and veth pair for container `id` with address `ip`.
    pub fn attach(&self, id: &str, ip: Ipv4Addr) -> Result<Attachment, Error> {
        let short = &id[..12.min(id.len())];
        let att = Attachment {
            ip,
            prefix: self.subnet.prefix,
            gateway: self.subnet.gateway(),
            bridge: self.cfg.bridge.clone(),
            netns: format!("berth-{short}"),
            host_veth: format!("vb{short}"),
        };
        let (ns, veth, br) = (&att.netns, &att.host_veth, &att.bridge);
        // `isolated on`: bridge ports marked isolated cannot talk to each other, only to the
        // bridge itself (the host). Containers reach each other through Berth's proxy only.
        if let Err(e) = ip_batch(
            None,
            &format!(
                "netns add {ns}\nlink add {veth} type veth peer name eth0 netns {ns}\n\
                 link set {veth} master {br}\nlink set dev {veth} type bridge_slave isolated on\nlink set {veth} up\n"
            ),
            &format!("creating the network namespace of container {short}"),
        ) {
            // Whatever of the batch did run (the namespace, the veth) is undone.
            detach(&att);
            return Err(e);
        }
        let inside = format!(
            "addr add {ip}/{} dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via {}\n",
            att.prefix, att.gateway
        );
        if let Err(e) = ip_batch(Some(ns), &inside, &format!("configuring eth0 of container {short}")) {
            detach(&att);
            return Err(e);
        }
        Ok(att)
    }
}

/// Removes a container's namespace and veth. Missing pieces are fine: cleanup runs on every exit
/// path, including after a half-done attach or a crash.
///
/// The namespace goes as `ip netns del` does it, without the exec: detach its bind mount and
/// remove the file. The kernel then destroys the namespace, and with it both ends of the veth
/// pair, but asynchronously (in a workqueue), so the host end is deleted explicitly: once this
/// returns, nothing of the container's network is left.
pub fn detach(att: &Attachment) {
    let path = att.netns_path();
    let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_file(&path);
    if Path::new("/sys/class/net").join(&att.host_veth).exists() {
        if let Err(e) = delete_link(&att.host_veth) {
            if e.raw_os_error() != Some(libc::ENODEV) {
                tracing::warn!("deleting {}: {e}", att.host_veth);
            }
        }
    }
}

/// Deletes a network interface by name with one rtnetlink request (RTM_DELLINK with
/// IFLA_IFNAME), waiting for the kernel's acknowledgement. An exec of `ip link del` costs
/// ~5 ms more, on the path of every `berth run --rm`.
pub fn delete_link(name: &str) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const NLMSG_HDR: usize = 16;
    const IFINFO: usize = 16;
    let name_bytes = name.as_bytes();
    let attr_len = 4 + name_bytes.len() + 1;
    let total = NLMSG_HDR + IFINFO + ((attr_len + 3) & !3);
    let mut msg = vec![0u8; total];
    msg[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&libc::RTM_DELLINK.to_ne_bytes());
    msg[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, index 0 (look up by name), the rest zero.
    let a = NLMSG_HDR + IFINFO;
    msg[a..a + 2].copy_from_slice(&(attr_len as u16).to_ne_bytes());
    msg[a + 2..a + 4].copy_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
    msg[a + 4..a + 4 + name_bytes.len()].copy_from_slice(name_bytes);
    // SAFETY: plain socket(2); the fd is owned by the OwnedFd right away.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: msg is a valid buffer of msg.len() bytes; a null address sends to the kernel.
    let sent = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: buf is a valid writable buffer of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    drop(sock);
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The reply is an NLMSG_ERROR whose error field (after the header) is 0 or -errno.
    if (n as usize) >= NLMSG_HDR + 4 && u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        if err != 0 {
            return Err(io::Error::from_raw_os_error(-err));
        }
    }
    Ok(())
}

/// A random locally administered unicast MAC address.
fn random_mac() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("the kernel's random numbers");
    b[0] = (b[0] & 0xfe) | 0x02;
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

/// Gives the bridge a MAC address of its own if it has none (an older berth made it, or
/// someone else did). A bridge without one takes the lowest MAC of its ports and changes it
/// as containers come and go; containers keep the old one in their ARP cache (TCP traffic
/// keeps confirming it), and their packets to the host are dropped until it expires: seen
/// as responses that never arrive when a new instance starts.
fn pin_mac(bridge: &str) -> Result<(), Error> {
    let dev = Path::new("/sys/class/net").join(bridge);
    // 3 = NET_ADDR_SET: set by the user, never recalculated from the ports.
    if fs::read_to_string(dev.join("addr_assign_type")).is_ok_and(|t| t.trim() == "3") {
        return Ok(());
    }
    let mac = fs::read_to_string(dev.join("address")).map_err(io_err("reading the bridge's MAC address"))?;
    ip_batch(None, &format!("link set {bridge} address {}\n", mac.trim()), &format!("pinning bridge {bridge}'s MAC"))
}

fn ip_batch(netns: Option<&str>, script: &str, what: &str) -> Result<(), Error> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io_err(format!("{what}: running ip")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .map_err(io_err(format!("{what}: writing to ip")))?;
    let out = child.wait_with_output().map_err(io_err(format!("{what}: waiting for ip")))?;
    if !out.status.success() {
        return Err(Error::Command { what: what.into(), stderr: String::from_utf8_lossy(&out.stderr).trim().into() });
    }
    Ok(())
}

fn run(mut cmd: Command, what: &str) -> Result<(), Error> {
    let out = cmd.stdout(Stdio::null()).output().map_err(io_err(what.to_string()))?;
    if !out.status.success() {
        return Err(Error::Command { what: what.into(), stderr: String::from_utf8_lossy(&out.stderr).trim().into() });
    }
    Ok(())
}

/// The nameservers for containers: configured ones, else the host's minus loopback resolvers
/// (a container cannot reach the host's 127.0.0.53).
pub fn resolv_conf(cfg: &NetworkConfig) -> String {
    let mut out = String::new();
    if !cfg.dns.is_empty() {
        for ns in &cfg.dns {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        return out;
    }
    let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    for line in host.lines() {
        let t = line.trim();
        if let Some(ns) = t.strip_prefix("nameserver") {
            let ns = ns.trim();
            if ns.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(true) {
                continue;
            }
            out.push_str(&format!("nameserver {ns}\n"));
        } else if t.starts_with("search") || t.starts_with("options") {
            out.push_str(t);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parsing() {
        let s = Subnet::parse("10.88.3.7/16").unwrap();
        assert_eq!(s.to_string(), "10.88.0.0/16");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert!(s.contains(Ipv4Addr::new(10, 88, 255, 254)));
        assert!(!s.contains(Ipv4Addr::new(10, 89, 0, 1)));
        for bad in [
            "10.88.0.0",
            "10.88.0.0/31",
            "10.88.0.0/4",
            "x/16",
            "10.88.0.0/abc",
            "8.8.8.0/24",
            "100.64.0.0/24",
            "172.32.0.0/16",
            "172.16.0.0/8",
            "192.0.2.0/24",
            "169.254.0.0/24",
            "127.0.0.0/24",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
        for good in ["10.0.0.0/8", "172.16.0.0/12", "172.31.5.0/24", "192.168.7.0/24"] {
            assert!(Subnet::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn allocator_never_hands_out_twice() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = NetworkConfig { bridge: "bt0".into(), subnet: "10.200.0.0/29".into(), dns: vec![] };
        let net = Network::new(&cfg, dir.path()).unwrap();
        // /29: .0 network, .1 gateway, .7 broadcast: .2 to .6 are free.
        let ips: Vec<_> = (0..5).map(|i| net.allocate(&format!("c{i}")).unwrap()).collect();
        let mut sorted = ips.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert!(matches!(net.allocate("c5"), Err(Error::Exhausted(_))));
        net.release(ips[2], "not-the-owner");
        assert!(net.allocate("c6").is_err());
        net.release(ips[2], "c2");
        assert_eq!(net.allocate("c7").unwrap(), ips[2]);
    }
}

#[cfg(test)]
mod netlink_tests {
    use super::*;

    #[test]
    fn delete_link_removes_an_interface_and_reports_a_missing_one() {
        let name = format!("bnl{}", std::process::id() % 100_000);
        let made = Command::new("ip")
            .args(["link", "add", &name, "type", "veth", "peer", "name", &format!("{name}p")])
            .status();
        assert!(made.map(|s| s.success()).unwrap_or(false), "creating a veth (run as root)");
        assert!(Path::new("/sys/class/net").join(&name).exists());
        delete_link(&name).unwrap();
        assert!(!Path::new("/sys/class/net").join(&name).exists());
        assert_eq!(delete_link(&name).unwrap_err().raw_os_error(), Some(libc::ENODEV));
    }
}

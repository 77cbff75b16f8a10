#!/usr/bin/env python3
"""Side-by-side benchmarks of Berth's serving path (issue 3), each from one run, medians.

    bench/serve.py cold        request to a service at zero -> first byte, vs `runc run -d`
                               of the same image -> first byte (target <= 0.5x)
    bench/serve.py resume      request to a frozen instance -> first byte (target <= 5 ms median)
    bench/serve.py throughput  wrk through Berth, nginx and caddy to the same keep-alive backend
                               in a Berth container (target >= 1.0x nginx at <= nginx p99)
    bench/serve.py memory      PSS of the server and all its helpers with 1000 services
                               deployed and all at zero (target < 50 MB)
    bench/serve.py all

Needs root, a release build (BERTH=path overrides target/release/berth), the test world's
packages, runc, umoci, wrk, nginx, caddy (scripts/install-test-deps installs them). Traffic
goes to loopback and to containers in the namespaces this script's Berth creates, nothing
else. Env: RUNS (default 15), SERVICES (default 1000), DURATION (wrk seconds, default 10).
"""
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BERTH = os.environ.get("BERTH", os.path.join(ROOT, "target/release/berth"))
RUNS = int(os.environ.get("RUNS", "15"))
DOMAIN = "bench.local"


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def first_byte(port, host, path="/", addr="127.0.0.1"):
    """Seconds from connect to the first byte of the response; and the status line."""
    t0 = time.perf_counter()
    s = socket.create_connection((addr, port), timeout=60)
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode())
    b = s.recv(1)
    t = time.perf_counter() - t0
    rest = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    s.close()
    return t, (b + rest).split(b"\r\n", 1)[0].decode(errors="replace")


class World:
    def __init__(self, work):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/world/world.py"), "serve", "--images", "busybox,python,nginx"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.info = json.loads(self.proc.stdout.readline())

    def image(self, name):
        return "%s/%s" % (self.info["registries"]["anon"]["host"], self.info["images"][name])

    def layout(self, name):
        return self.info["layouts"][name]

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=20)


class Server:
    def __init__(self, work, bridge="bbench1", subnet="10.252.0.0/24", extra=()):
        self.data = os.path.join(work, "data")
        os.makedirs(self.data, exist_ok=True)
        with open(os.path.join(self.data, "config.toml"), "w") as f:
            f.write('[network]\nbridge = "%s"\nsubnet = "%s"\n' % (bridge, subnet))
        self.bridge, self.subnet = bridge, subnet
        self.api, self.http = free_port(), free_port()
        self.logf = open(os.path.join(work, "server.log"), "ab")
        env = dict(os.environ, BERTH_LOG=os.environ.get("BERTH_LOG", "warn"))
        self.proc = subprocess.Popen(
            [BERTH, "--data-dir", self.data, "server", "--api-addr", "127.0.0.1:%d" % self.api,
             "--http-addr", "127.0.0.1:%d" % self.http, "--domain", DOMAIN] + list(extra),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logf, env=env)
        for _ in range(300):
            try:
                self.call("GET", "/api/v1/health", auth=False)
                break
            except OSError:
                time.sleep(0.05)
        self.token = open(os.path.join(self.data, "admin-token")).read().strip()

    def call(self, method, path, body=None, auth=True):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.api, path), method=method,
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                data = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError("%s %s: %s %s" % (method, path, e.code, e.read().decode(errors="replace")))
        return json.loads(data) if data else None

    def deploy(self, name, image, scaling=None, **settings):
        if scaling:
            try:
                self.call("POST", "/api/v1/services", dict(name=name))
            except RuntimeError:
                pass
            self.call("PATCH", "/api/v1/services/%s/scaling" % name, scaling)
        return self.call("POST", "/api/v1/services/%s/deploys?wait=true" % name, dict(image=image, **settings))

    def service(self, name):
        return self.call("GET", "/api/v1/services/" + name)

    def containers(self, name):
        out = subprocess.run([BERTH, "--data-dir", self.data, "container", "ls", "--all", "--json"],
                             capture_output=True, check=True).stdout
        return [c for c in json.loads(out) if c["spec"]["labels"].get("berth.service") == name]

    def wait(self, name, pred, what, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            s = self.service(name)
            if pred(s):
                return s
            time.sleep(0.01)
        raise RuntimeError("timed out waiting for %s: %s" % (what, s))

    def wait_zero(self, name):
        """Zero as the issue defines it: no instance, and no container of the service at all."""
        self.wait(name, lambda s: not s["instances"], "zero instances")
        end = time.time() + 30
        # A prepared container (created, its process not started) may stay: that is zero too.
        while [c for c in self.containers(name) if c["state"]["status"] != "created"]:
            if time.time() > end:
                raise RuntimeError("containers of %s remain" % name)
            time.sleep(0.02)

    def pss_kb(self):
        """PSS of the server and every process below it (shims are in their own sessions, so
        they are found by their command line too)."""
        pids = {self.proc.pid}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                cmd = open("/proc/%s/cmdline" % p, "rb").read().split(b"\0")
                stat = open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) in pids or (BERTH.encode() in cmd[0] and self.data.encode() in cmd):
                pids.add(int(p))
        total = 0
        for p in pids:
            try:
                for line in open("/proc/%d/smaps_rollup" % p):
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total, len(pids)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        out = subprocess.run([BERTH, "--data-dir", self.data, "container", "ls", "--all", "--json"],
                             capture_output=True).stdout
        for c in json.loads(out or b"[]"):
            subprocess.run([BERTH, "--data-dir", self.data, "container", "rm", "--force", c["id"]],
                           capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for rule in (["-t", "nat", "-D", "POSTROUTING", "-s", self.subnet, "!", "-o", self.bridge, "-j", "MASQUERADE"],
                     ["-t", "filter", "-D", "FORWARD", "-i", self.bridge, "-j", "ACCEPT"],
                     ["-t", "filter", "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "DROP"],
                     ["-t", "filter", "-D", "FORWARD", "-o", self.bridge, "-m", "conntrack", "--ctstate",
                      "RELATED,ESTABLISHED", "-j", "ACCEPT"]):
            subprocess.run(["iptables", "-w"] + rule, capture_output=True)


def ms(x):
    return "%.1f ms" % (x * 1000)


def bench_cold(work, world):
    for image in ("nginx", "python"):
        cold_one(os.path.join(work, image), world, image)


def cold_one(work, world, image):
    os.makedirs(work)
    # Two servers on the same image: the default (a container prepared for the service once it
    # is at zero) and --prepared 0 (everything made on the request).
    srv0 = Server(os.path.join(work, "plain"), extra=["--prepared", "0"])
    try:
        srv0.deploy("cold", world.image(image), scaling=dict(freeze_after="50ms", stop_after="50ms"))
        plain = []
        for i in range(RUNS):
            srv0.wait_zero("cold")
            t, status = first_byte(srv0.http, "cold." + DOMAIN)
            assert " 200 " in status + " ", status
            plain.append(t)
    finally:
        srv0.stop()
    srv = Server(work)
    try:
        srv.deploy("cold", world.image(image), scaling=dict(freeze_after="50ms", stop_after="50ms"))
        berth = []
        for i in range(RUNS):
            srv.wait_zero("cold")
            srv.wait("cold", lambda s: s["prepared"], "a prepared container")
            t, status = first_byte(srv.http, "cold." + DOMAIN)
            assert " 200 " in status + " ", status
            berth.append(t)
        # runc: the same image as an OCI bundle (umoci), host network, app on a free port.
        bundle = os.path.join(work, "bundle")
        subprocess.run(["umoci", "unpack", "--image", world.layout(image) + ":latest", bundle],
                       check=True, capture_output=True)
        cfg_path = os.path.join(bundle, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
        cfg["process"]["terminal"] = False
        # Docker's default capability set, as Berth gives (umoci's default lacks CHOWN, which
        # nginx needs for its temp directories).
        caps = ["CAP_" + c for c in ("CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP "
                                     "SETPCAP NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE").split()]
        cfg["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
        port = free_port()
        cfg["process"]["env"] += ["PORT=%d" % port, "BIND=127.0.0.1"]
        json.dump(cfg, open(cfg_path, "w"))
        conf = os.path.join(bundle, "rootfs/etc/nginx/nginx.conf")
        if image == "nginx":
            text = open(conf).read().replace("listen 8080;", "listen 127.0.0.1:%d;" % port)
            open(conf, "w").write(text)
        runc = []
        root = os.path.join(work, "runc")
        for i in range(RUNS):
            cid = "bench%d" % i
            t0 = time.perf_counter()
            subprocess.run(["runc", "--root", root, "run", "-d", "--bundle", bundle, cid], check=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while True:
                try:
                    _, status = first_byte(port, "x")
                    break
                except OSError:
                    if time.perf_counter() - t0 > 30:
                        raise RuntimeError("runc's %s container did not answer within 30s" % image)
                    time.sleep(0.0005)
            runc.append(time.perf_counter() - t0)
            subprocess.run(["runc", "--root", root, "delete", "-f", cid], capture_output=True)
        b, r, p = statistics.median(berth), statistics.median(runc), statistics.median(plain)
        print("cold start -> first byte, %s image, median of %d: berth %s (prepared container), runc run -d %s, "
              "ratio berth/runc = %.2fx (target <= 0.5x); berth --prepared 0: %s = %.2fx"
              % (image, RUNS, ms(b), ms(r), b / r, ms(p), p / r))
    finally:
        srv.stop()


def bench_resume(work, world):
    srv = Server(work)
    try:
        srv.deploy("warm", world.image("python"), scaling=dict(freeze_after="100ms", stop_after="1h"))
        frozen, warm = [], []
        for i in range(RUNS * 2):
            first_byte(srv.http, "warm." + DOMAIN)
            warm.append(first_byte(srv.http, "warm." + DOMAIN)[0])
            srv.wait("warm", lambda s: [x["state"] for x in s["instances"]] == ["frozen"], "frozen")
            t, status = first_byte(srv.http, "warm." + DOMAIN)
            assert " 200 " in status + " ", status
            frozen.append(t)
        f, w = statistics.median(frozen), statistics.median(warm)
        print("resume from frozen -> first byte, median of %d: %s (target <= 5 ms); warm request %s; "
              "the thaw's own share %s" % (len(frozen), ms(f), ms(w), ms(f - w)))
    finally:
        srv.stop()


def wrk(url, host, seconds):
    out = subprocess.run(["wrk", "-t2", "-c32", "-d%ds" % seconds, "--latency", "-H", "Host: " + host, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float([l for l in out.splitlines() if l.startswith("Requests/sec:")][0].split()[1])
    p99 = [l for l in out.splitlines() if l.strip().startswith("99%")][0].split()[1]
    unit = 1e-3 if p99.endswith("ms") else 1e-6 if p99.endswith("us") else 1.0
    non2xx = [l for l in out.splitlines() if "Non-2xx" in l]
    return rps, float(p99.rstrip("msu")) * unit, non2xx


def bench_throughput(work, world):
    seconds = int(os.environ.get("DURATION", "10"))
    srv = Server(work)
    procs = []
    try:
        srv.deploy("tp", world.image("nginx"), scaling=dict(min=1, max=1, concurrency=1000, freeze_after="1h",
                                                            stop_after="1h"))
        addr = srv.service("tp")["instances"][0]["address"]
        nport, cport = free_port(), free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write("""daemon off; worker_processes 1; pid %s/nginx.pid; error_log stderr error;
events { worker_connections 4096; }
http { access_log off;
  upstream app { server %s; keepalive 64; }
  server { listen 127.0.0.1:%d;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_set_header Host $host; } } }
""" % (work, addr, nport))
        procs.append(subprocess.Popen(["nginx", "-c", conf, "-e", "stderr"], stderr=subprocess.DEVNULL))
        caddyfile = os.path.join(work, "Caddyfile")
        with open(caddyfile, "w") as f:
            f.write("{\n  admin off\n  auto_https off\n}\nhttp://:%d {\n  bind 127.0.0.1\n  reverse_proxy %s\n}\n"
                    % (cport, addr))
        procs.append(subprocess.Popen(["caddy", "run", "--config", caddyfile, "--adapter", "caddyfile"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(os.environ, HOME=work, XDG_DATA_HOME=work, XDG_CONFIG_HOME=work)))
        time.sleep(1.5)
        host = "tp." + DOMAIN
        results = {}
        for name, port in (("nginx", nport), ("caddy", cport), ("berth", srv.http)):
            wrk("http://127.0.0.1:%d/" % port, host, 2)  # warm the pools
            results[name] = wrk("http://127.0.0.1:%d/" % port, host, seconds)
        for name, (rps, p99, bad) in results.items():
            print("throughput via %-5s: %8.0f req/s, p99 %s %s" % (name, rps, ms(p99), " ".join(bad)))
        (b, bp, _), (n, np_, _) = results["berth"], results["nginx"]
        print("throughput ratio berth/nginx = %.2fx (target >= 1.0x), p99 berth/nginx = %.2fx (target <= 1.0x); "
              "backend: nginx (one worker, keep-alive, 200 'nginx ok') in a Berth container" % (b / n, bp / np_))
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        srv.stop()


def bench_memory(work, world):
    n = int(os.environ.get("SERVICES", "1000"))
    srv = Server(work)
    try:
        image = world.image("python")
        base_kb, _ = srv.pss_kb()
        errors = []
        lock = threading.Lock()
        todo = list(range(n))

        def worker():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                try:
                    srv.deploy("s%d" % i, image, scaling=dict(freeze_after="50ms", stop_after="50ms"))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(str(e))
        t0 = time.time()
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log("deployed %d services in %.0fs (%d errors)" % (n, time.time() - t0, len(errors)))
        if errors:
            log("first error:", errors[0])
        end = time.time() + 300
        while True:
            live = [s for s in srv.call("GET", "/api/v1/services")["services"] if s["instances"]]
            if not live:
                break
            if time.time() > end:
                raise RuntimeError("%d services still have instances" % len(live))
            time.sleep(0.5)
        time.sleep(2)
        kb, procs = srv.pss_kb()
        print("memory with %d services at zero: PSS %.1f MB in %d process(es) (at start, no services: %.1f MB); "
              "target < 50 MB" % (n, kb / 1024, procs, base_kb / 1024))
    finally:
        srv.stop()


def main():
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    benches = {"cold": bench_cold, "resume": bench_resume, "throughput": bench_throughput, "memory": bench_memory}
    if what not in benches and what != "all":
        sys.exit(__doc__)
    if not os.path.exists(BERTH):
        sys.exit("bench: %s is missing: cargo build --release -p berth (or set BERTH)" % BERTH)
    work = tempfile.mkdtemp(prefix="bench-serve.", dir="/tmp")
    world = World(work)
    try:
        for name, fn in benches.items():
            if what in (name, "all"):
                d = os.path.join(work, name)
                os.makedirs(d)
                fn(d, world)
    finally:
        world.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

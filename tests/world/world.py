#!/usr/bin/env python3
"""The Berth test world: OCI images built from Debian packages, and three
local container registries (anonymous, htpasswd, token auth) serving them.

Python 3 standard library only; runs under Debian's /usr/bin/python3 once
tests/world/install-deps.sh has installed the Debian packages it shells out
to (busybox-static, docker-registry, debootstrap, apache2-utils, zstd,
openssl).

Commands (see README.md next to this file):

  world.py build [--cache DIR] [--images a,b]   build the images if missing
  world.py layout NAME [--cache DIR]            print the OCI layout path
  world.py oci-tar NAME OUT.tar                 tarball of the OCI layout
  world.py docker-archive NAME OUT.tar          `docker save`-style archive
  world.py serve [--cache DIR] [--images a,b]   start registries, push, print
                                                one JSON line, run until stdin
                                                EOF or SIGTERM/SIGINT
  world.py clean [--cache DIR]                  delete stale cache entries

Everything except the JSON line of `serve` and the path of `layout` goes to
stderr.
"""

import argparse
import base64
import concurrent.futures
import fcntl
import glob
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid

# ---------------------------------------------------------------------------
# Recipe versions. Bump one to rebuild that image (the cache is keyed by it).
# ---------------------------------------------------------------------------
RECIPES = {
    "busybox": "1",
    "busybox-zstd": "1",
    "python": "5",
    "nginx": "3",
}
IMAGE_NAMES = list(RECIPES)

DEFAULT_CACHE = "/var/cache/berth-test-world"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# mtime of every entry in generated layers / archives (2024-01-01T00:00:00Z)
FIXED_MTIME = 1704067200
CREATED = "2024-01-01T00:00:00Z"

MT_OCI_LAYOUT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

BASIC_USER, BASIC_PASS = "berth", "s3cret"
TOKEN_USER, TOKEN_PASS = "berth", "tokenpass"
TOKEN_SERVICE = "berth-test-registry"
TOKEN_ISSUER = "berth-test-issuer"
TOKEN_TTL = 300


def log(*args):
    print("[world]", *args, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# Deterministic tar writing
# ---------------------------------------------------------------------------
class LayerTar:
    """Collects entries in memory-light form and writes them sorted."""

    def __init__(self):
        self.entries = {}  # name -> (TarInfo, data bytes | file path | None)

    def _info(self, name, typ, mode, uid=0, gid=0, mtime=FIXED_MTIME):
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = mtime
        return ti

    def dir(self, name, mode=0o755, uid=0, gid=0):
        self.entries[name] = (self._info(name, tarfile.DIRTYPE, mode, uid, gid), None)

    def file(self, name, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        self.entries[name] = (ti, data)

    def host_file(self, name, path, mode=0o755, uid=0, gid=0):
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = os.path.getsize(path)
        self.entries[name] = (ti, path)

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.entries[name] = (ti, None)

    def whiteout(self, name):
        d, b = os.path.split(name)
        self.file(os.path.join(d, ".wh." + b), b"", mode=0o644)

    def write(self, out_path):
        with open(out_path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.entries):
                ti, data = self.entries[name]
                if data is None:
                    tf.addfile(ti)
                elif isinstance(data, bytes):
                    tf.addfile(ti, io.BytesIO(data))
                else:
                    with open(data, "rb") as src:
                        tf.addfile(ti, src)


def tar_rootfs(root, out_path, created_after, skip_contents=("dev", "proc", "sys")):
    """Pack a directory tree: modes, owners, symlinks, hardlinks preserved;
    sorted entries; device nodes, sockets, fifos skipped. Files that dpkg
    unpacked keep their package mtimes (deterministic, and Python's .pyc
    files, which record their source's mtime, stay valid); anything touched
    at or after `created_after` (made during the build) gets FIXED_MTIME."""
    seen_inodes = {}
    with open(out_path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def walk(rel):
            full = os.path.join(root, rel) if rel else root
            for name in sorted(os.listdir(full)):
                r = os.path.join(rel, name) if rel else name
                p = os.path.join(root, r)
                st = os.lstat(p)
                ti = tarfile.TarInfo(r)
                ti.mode = stat.S_IMODE(st.st_mode)
                ti.uid, ti.gid = st.st_uid, st.st_gid
                ti.uname = ti.gname = ""
                ti.mtime = int(st.st_mtime) if st.st_mtime < created_after else FIXED_MTIME
                if stat.S_ISDIR(st.st_mode):
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                    if r in skip_contents or os.path.ismount(p):
                        continue
                    walk(r)
                elif stat.S_ISLNK(st.st_mode):
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = os.readlink(p)
                    tf.addfile(ti)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in seen_inodes:
                        ti.type = tarfile.LNKTYPE
                        ti.linkname = seen_inodes[key]
                        tf.addfile(ti)
                        continue
                    if st.st_nlink > 1:
                        seen_inodes[key] = r
                    ti.type = tarfile.REGTYPE
                    ti.size = st.st_size
                    with open(p, "rb") as src:
                        tf.addfile(ti, src)
                # devices, fifos, sockets: skipped

        walk("")


def deterministic_tar_of_dir(src_dir, out_path):
    """Tar of a small tree (an OCI layout): sorted paths, fixed metadata."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(src_dir):
        rel = os.path.relpath(dirpath, src_dir)
        if rel != ".":
            paths.append(rel)
        paths.extend(fn if rel == "." else os.path.join(rel, fn) for fn in filenames)
    with open(out_path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for rel in sorted(paths):
            p = os.path.join(src_dir, rel)
            ti = tarfile.TarInfo(rel)
            ti.mtime = FIXED_MTIME
            ti.uname = ti.gname = ""
            if os.path.isdir(p):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, os.path.getsize(p)
                with open(p, "rb") as src:
                    tf.addfile(ti, src)


# ---------------------------------------------------------------------------
# OCI layout writing
# ---------------------------------------------------------------------------
class LayoutWriter:
    def __init__(self, path):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        self.layers = []  # descriptors
        self.diff_ids = []
        self.history = []

    def put_bytes(self, data):
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, d), "wb") as f:
            f.write(data)
        return d, len(data)

    def put_file(self, path):
        d = sha256_file(path)
        dst = os.path.join(self.blobs, d)
        shutil.move(path, dst)
        return d, os.path.getsize(dst)

    def add_layer(self, tar_path, compression, created_by):
        diff_id = sha256_file(tar_path)
        comp_path = tar_path + "." + compression
        if compression == "gzip":
            with open(tar_path, "rb") as src, open(comp_path, "wb") as raw:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            mt = MT_LAYER_GZIP
        elif compression == "zstd":
            subprocess.run(["zstd", "-q", "-f", "-T1", "-3", tar_path, "-o", comp_path], check=True)
            mt = MT_LAYER_ZSTD
        else:
            raise ValueError(compression)
        digest, size = self.put_file(comp_path)
        self.layers.append({"mediaType": mt, "digest": "sha256:" + digest, "size": size})
        self.diff_ids.append("sha256:" + diff_id)
        self.history.append({"created": CREATED, "created_by": created_by})

    def finish(self, config, ref="latest"):
        cfg = {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "author": "berth test world",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
            "history": self.history,
        }
        cdigest, csize = self.put_bytes(canonical_json(cfg))
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:" + cdigest, "size": csize},
            "layers": self.layers,
        }
        mdigest, msize = self.put_bytes(canonical_json(manifest))
        index = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_LAYOUT_INDEX,
            "manifests": [{
                "mediaType": MT_OCI_MANIFEST,
                "digest": "sha256:" + mdigest,
                "size": msize,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }],
        }
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(canonical_json(index))


def read_layout(path):
    """Returns (manifest_bytes, manifest_digest, manifest, config_bytes)."""
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    desc = index["manifests"][0]
    mdig = desc["digest"]
    with open(blob_path(path, mdig), "rb") as f:
        mbytes = f.read()
    manifest = json.loads(mbytes)
    with open(blob_path(path, manifest["config"]["digest"]), "rb") as f:
        cbytes = f.read()
    return mbytes, mdig, manifest, cbytes


def blob_path(layout, digest):
    algo, hexd = digest.split(":", 1)
    return os.path.join(layout, "blobs", algo, hexd)


# ---------------------------------------------------------------------------
# Image recipes
# ---------------------------------------------------------------------------
def mounts_under(path):
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1]
            mp = mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def safe_rmtree(path):
    """rmtree that never follows into a mount (debootstrap bind-mounts the
    host's /dev, /proc, /sys into its target and a killed debootstrap leaves
    them mounted)."""
    if not os.path.lexists(path):
        return
    for mp in mounts_under(path):
        subprocess.run(["umount", "-l", mp], check=False, stderr=subprocess.DEVNULL)
    left = mounts_under(path)
    if left:
        log("NOT removing %s: still mounted: %s" % (path, ", ".join(left)))
        return
    shutil.rmtree(path, ignore_errors=True)


def find_busybox():
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(p):
            with open(p, "rb") as f:
                head = f.read(8192)
            if b"/ld-linux" in head or b"/ld-musl" in head:  # has PT_INTERP: not static
                continue
            return os.path.realpath(p)
    raise SystemExit("busybox-static not installed (run tests/world/install-deps.sh)")


PASSWD = """root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """root:x:0:
app:x:1000:
nogroup:x:65534:
"""

INDEX_HTML = "hello from berth test world\n"
CGI_ENV = """#!/bin/sh
echo "Content-Type: text/plain"
echo ""
echo "hello from cgi"
echo "uid=$(id -u) gid=$(id -g)"
echo "GREETING=$GREETING"
"""


def busybox_layers(workdir):
    """Writes the two uncompressed layer tars; returns their paths."""
    bb = find_busybox()
    applets = sorted(set(subprocess.run([bb, "--list"], capture_output=True, text=True,
                                        check=True).stdout.split()) - {"busybox"})
    l1 = LayerTar()
    for d in ("bin", "dev", "etc", "home", "proc", "sys", "usr", "usr/bin", "usr/sbin",
              "sbin", "var", "var/log", "var/run", "run"):
        l1.dir(d)
    l1.dir("root", 0o700)
    l1.dir("tmp", 0o1777)
    l1.dir("home/app", 0o755, 1000, 1000)
    l1.host_file("bin/busybox", bb, 0o755)
    for a in applets:
        l1.symlink("bin/" + a, "busybox")
    l1.file("etc/passwd", PASSWD)
    l1.file("etc/group", GROUP)
    l1.file("etc/hostname", "berth-test\n")
    l1.file("etc/removed-by-layer2", "this file is deleted by a whiteout in layer 2\n")
    l1.file("home/app/.profile", "export PS1='$ '\n", 0o644, 1000, 1000)
    p1 = os.path.join(workdir, "layer1.tar")
    l1.write(p1)

    l2 = LayerTar()
    l2.dir("www")
    l2.file("www/index.html", INDEX_HTML)
    l2.file("www/second.txt", "second file from layer 2\n")
    l2.dir("www/cgi-bin")
    l2.file("www/cgi-bin/env", CGI_ENV, 0o755)
    l2.dir("etc")
    l2.whiteout("etc/removed-by-layer2")
    p2 = os.path.join(workdir, "layer2.tar")
    l2.write(p2)
    return [p1, p2], len(applets)


BUSYBOX_CONFIG = {
    "Cmd": ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"],
    "Env": [PATH_ENV, "GREETING=hello"],
    "ExposedPorts": {"8080/tcp": {}},
    "WorkingDir": "/",
    "Labels": {"org.berth.test": "busybox"},
    "StopSignal": "SIGTERM",
}


def build_busybox(out, workdir, compression):
    (p1, p2), n = busybox_layers(workdir)
    w = LayoutWriter(out)
    w.add_layer(p1, compression, "busybox-static /bin/busybox + %d applet symlinks, passwd, group" % n)
    w.add_layer(p2, compression, "/www/index.html, /www/cgi-bin/env, whiteout /etc/removed-by-layer2")
    w.finish(BUSYBOX_CONFIG)


APP_PY = r'''#!/usr/bin/env python3
# Berth test-world app: see tests/world/README.md for its endpoints.
import base64, hashlib, os, signal, socket, struct, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, body, ctype="text/plain; charset=utf-8"):
        b = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b)

    def _body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        p = self.path.split("?", 1)[0]
        if p == "/":
            return self._send(200, "python ok")
        if p == "/health":
            return self._send(200, "ok")
        if p.startswith("/env/"):
            v = os.environ.get(p[len("/env/"):])
            return self._send(200, v) if v is not None else self._send(404, "unset")
        if p == "/hostname":
            return self._send(200, socket.gethostname())
        if p == "/id":
            return self._send(200, "uid=%d gid=%d" % (os.getuid(), os.getgid()))
        if p == "/cwd":
            return self._send(200, os.getcwd())
        if p == "/headers":
            return self._send(200, "".join("%s: %s\n" % (k.lower(), v) for k, v in self.headers.items()))
        if p.startswith("/file/"):
            try:
                with open("/" + p[len("/file/"):], "rb") as f:
                    return self._send(200, f.read())
            except OSError as e:
                return self._send(404, str(e))
        if p.startswith("/fetch/"):
            # /fetch/HOST/PATH: GET http://HOST/PATH from inside the container.
            import urllib.error
            import urllib.request
            try:
                with urllib.request.urlopen("http://" + p[len("/fetch/"):], timeout=30) as r:
                    return self._send(200, r.read())
            except urllib.error.HTTPError as e:
                return self._send(502, "upstream answered %d: %s" % (e.code, e.read().decode(errors="replace")))
            except OSError as e:
                return self._send(502, "fetch failed: %s" % e)
        if p.startswith("/exit/"):
            self._send(200, "exiting")
            self.wfile.flush()
            os._exit(int(p[len("/exit/"):]))
        if p.startswith("/sleep/"):
            time.sleep(int(p[len("/sleep/"):]) / 1000.0)
            return self._send(200, "slept")
        if p.startswith("/stream/"):
            # N chunks, 200 ms apart: a proxy must pass each on as it comes.
            n = int(p[len("/stream/"):])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                data = ("chunk %d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
            return
        if p.startswith("/connect/"):
            # /connect/HOST/PORT: can this container open a TCP connection there?
            host, port = p[len("/connect/"):].split("/", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                return self._send(200, "connected")
            except OSError as e:
                return self._send(502, "refused: %s" % e)
        if p == "/ws":
            return self._websocket()
        self._send(404, "not found")

    def do_POST(self):
        p = self.path.split("?", 1)[0]
        if p == "/echo":
            body = self._body()
            return self._send(200, body, "application/octet-stream")
        self._send(404, "not found")

    def do_PUT(self):
        p = self.path.split("?", 1)[0]
        if p.startswith("/file/"):
            data = self._body()
            try:
                with open("/" + p[len("/file/"):], "wb") as f:
                    f.write(data)
            except OSError as e:
                return self._send(500, str(e))
            return self._send(200, "written")
        self._send(404, "not found")

    def _websocket(self):
        # RFC 6455 echo: text and binary frames come back as sent; close ends it.
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or "websocket" not in (self.headers.get("Upgrade") or "").lower():
            return self._send(400, "not a websocket request")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r = self.rfile
        while True:
            h = r.read(2)
            if len(h) < 2:
                break
            op, ln = h[0] & 0x0F, h[1] & 0x7F
            if ln == 126:
                ln = struct.unpack(">H", r.read(2))[0]
            elif ln == 127:
                ln = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if h[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(ln)))
            if op == 8:
                self.wfile.write(b"\x88\x00")
                self.wfile.flush()
                break
            if len(data) < 126:
                head = bytes([0x80 | op, len(data)])
            elif len(data) < 65536:
                head = bytes([0x80 | op, 126]) + struct.pack(">H", len(data))
            else:
                head = bytes([0x80 | op, 127]) + struct.pack(">Q", len(data))
            self.wfile.write(head + data)
            self.wfile.flush()
        self.close_connection = True

    def log_message(self, fmt, *args):
        sys.stderr.write("app: " + (fmt % args) + "\n")


def main():
    port = int(os.environ.get("PORT") or 8000)
    srv = ThreadingHTTPServer((os.environ.get("BIND", "0.0.0.0"), port), H)
    srv.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    print("python app listening on port %d" % port, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
'''

PYTHON_CONFIG = {
    "Cmd": ["python3", "/srv/app.py"],
    "Env": [PATH_ENV, "PYTHONUNBUFFERED=1", "LANG=C.UTF-8"],
    "ExposedPorts": {"8000/tcp": {}},
    "WorkingDir": "/srv",
    "Labels": {"org.berth.test": "python"},
    "StopSignal": "SIGTERM",
}


def apt_mirror():
    if os.environ.get("BERTH_WORLD_MIRROR"):
        return os.environ["BERTH_WORLD_MIRROR"]
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*"))
    for fn in files:
        try:
            with open(fn) as f:
                text = f.read()
        except OSError:
            continue
        if fn.endswith(".sources"):
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
                    for uri in fields.get("uris", "").split():
                        if "security" not in uri:
                            return uri.rstrip("/")
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    i = 1
                    if parts[i].startswith("["):
                        while not parts[i].endswith("]"):
                            i += 1
                        i += 1
                    if i + 1 < len(parts) and parts[i + 1] == SUITE and "security" not in parts[i]:
                        return parts[i].rstrip("/")
    return DEFAULT_MIRROR


def build_python(out, workdir):
    if os.geteuid() != 0:
        raise SystemExit("building the python image needs root (debootstrap)")
    root = os.path.join(workdir, "rootfs")
    mirror = apt_mirror()
    log("debootstrap %s from %s (takes a couple of minutes)" % (SUITE, mirror))
    t0 = time.time()
    dlog = os.path.join(workdir, "debootstrap.out")
    with open(dlog, "wb") as dout:
        p = subprocess.Popen(["debootstrap", "--variant=minbase", "--include=python3-minimal,python3,tcc,libc6-dev",
                              SUITE, root, mirror], stdin=subprocess.DEVNULL, stdout=dout, stderr=dout)
    try:
        rc = p.wait()
    except BaseException:
        # let debootstrap run its exit traps (it unmounts what it mounted)
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        raise
    if rc != 0:
        with open(dlog, errors="replace") as f:
            sys.stderr.write(f.read()[-4000:])
        raise SystemExit("debootstrap failed (rc=%d)" % rc)
    log("debootstrap done in %.0fs" % (time.time() - t0))
    # debootstrap unmounts these itself; make sure: never tar a live /proc
    for mp in mounts_under(root):
        subprocess.run(["umount", "-l", mp], check=False)
    if mounts_under(root):
        raise SystemExit("still mounted under %s: %s" % (root, mounts_under(root)))
    # shrink
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                    "var/log/*.log", "var/log/apt/*", "var/cache/debconf/*-old",
                    "var/lib/dpkg/*-old"):
        for p in glob.glob(os.path.join(root, pattern)):
            if os.path.isdir(p) and not os.path.islink(p):
                if os.path.basename(p) not in ("partial", "auxfiles"):
                    shutil.rmtree(p)
            else:
                os.unlink(p)
    # host-specific files copied by debootstrap
    for fn, content in (("etc/resolv.conf", ""), ("etc/hostname", "berth-test\n")):
        p = os.path.join(root, fn)
        if os.path.lexists(p):
            os.unlink(p)
        with open(p, "w") as f:
            f.write(content)
    os.makedirs(os.path.join(root, "srv"), exist_ok=True)
    base_tar = os.path.join(workdir, "base.tar")
    log("packing rootfs")
    tar_rootfs(root, base_tar, t0 - 1)
    safe_rmtree(root)

    l2 = LayerTar()
    l2.dir("srv")
    l2.file("srv/app.py", APP_PY, 0o755)
    app_tar = os.path.join(workdir, "app.tar")
    l2.write(app_tar)

    w = LayoutWriter(out)
    log("compressing base layer")
    w.add_layer(base_tar, "gzip", "debootstrap --variant=minbase --include=python3-minimal,python3,tcc,libc6-dev %s" % SUITE)
    w.add_layer(app_tar, "gzip", "/srv/app.py")
    w.finish(PYTHON_CONFIG)


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
error_log stderr warn;
pid /tmp/nginx.pid;
events { worker_connections 1000; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server {
        listen 8080;
        location / { default_type text/plain; return 200 "nginx ok\\n"; }
    }
    # HTTP/2 without TLS (h2c, prior knowledge) only: for upstreams that speak h2c.
    server {
        listen 8081 http2;
        location / { default_type text/plain; return 200 "nginx $server_protocol host=$host\\n"; }
    }
}
"""

NGINX_CONFIG = {
    "Cmd": ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf", "-e", "stderr"],
    "Env": [PATH_ENV],
    "ExposedPorts": {"8080/tcp": {}},
    "WorkingDir": "/",
    "Labels": {"org.berth.test": "nginx"},
    "StopSignal": "SIGTERM",
}


def build_nginx(out, workdir):
    """A fast keep-alive HTTP backend for the proxy benchmarks: Debian's nginx-light binary and
    the shared libraries ldd names, over the busybox base layer."""
    nginx = "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        raise SystemExit("[world] image nginx needs Debian's nginx-light package (scripts/install-test-deps installs it)")
    (p1, _), _ = busybox_layers(workdir)
    l2 = LayerTar()
    for d in ("usr/sbin", "etc/nginx", "lib", "lib64", "lib/x86_64-linux-gnu", "var/log/nginx"):
        l2.dir(d)
    l2.host_file("usr/sbin/nginx", nginx, 0o755)
    out_ldd = subprocess.run(["ldd", nginx], capture_output=True, text=True, check=True).stdout
    for line in out_ldd.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if not path.startswith("/"):
            continue  # linux-vdso
        l2.host_file(path.lstrip("/"), os.path.realpath(path), 0o755)
    l2.file("etc/nginx/nginx.conf", NGINX_CONF)
    l2_path = os.path.join(workdir, "nginx.tar")
    l2.write(l2_path)
    w = LayoutWriter(out)
    w.add_layer(p1, "gzip", "busybox base")
    w.add_layer(l2_path, "gzip", "nginx-light binary and its libraries")
    w.finish(NGINX_CONFIG)


BUILDERS = {
    "nginx": build_nginx,
    "busybox": lambda out, wd: build_busybox(out, wd, "gzip"),
    "busybox-zstd": lambda out, wd: build_busybox(out, wd, "zstd"),
    "python": build_python,
}


def cache_dir(args):
    return os.path.abspath(args.cache or os.environ.get("BERTH_WORLD_CACHE") or DEFAULT_CACHE)


def layout_path(cache, name):
    return os.path.join(cache, "%s-v%s" % (name, RECIPES[name]))


def ensure_image(cache, name):
    final = layout_path(cache, name)
    if os.path.exists(os.path.join(final, "index.json")):
        return final
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, ".%s.lock" % name), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, "index.json")):
            return final
        for stale in glob.glob(os.path.join(cache, ".build-%s-*" % name)):
            safe_rmtree(stale)  # left by a killed build (we hold the lock)
        log("building image %s (recipe v%s) into %s" % (name, RECIPES[name], final))
        t0 = time.time()
        work = tempfile.mkdtemp(prefix=".build-%s-" % name, dir=cache)
        try:
            out = os.path.join(work, "layout")
            wd = os.path.join(work, "work")
            os.makedirs(wd)
            BUILDERS[name](out, wd)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(out, final)
        finally:
            safe_rmtree(work)
        log("built %s in %.1fs" % (name, time.time() - t0))
    return final


def selected_images(args):
    sel = getattr(args, "images", None) or os.environ.get("BERTH_WORLD_IMAGES") or ",".join(IMAGE_NAMES)
    names = [n.strip() for n in sel.split(",") if n.strip()]
    for n in names:
        if n not in RECIPES:
            raise SystemExit("unknown image %r (known: %s)" % (n, ", ".join(IMAGE_NAMES)))
    return names


# ---------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------
def write_oci_tar(layout, out):
    deterministic_tar_of_dir(layout, out)


def write_docker_archive(layout, out, tag):
    _, _, manifest, cbytes = read_layout(layout)
    cfg = json.loads(cbytes)
    config_name = hashlib.sha256(cbytes).hexdigest() + ".json"
    tmp = tempfile.mkdtemp(prefix="berth-docker-archive-")
    try:
        layer_names = []
        files = [(config_name, None, cbytes)]
        for desc, diff_id in zip(manifest["layers"], cfg["rootfs"]["diff_ids"]):
            src = blob_path(layout, desc["digest"])
            dst = os.path.join(tmp, diff_id.split(":", 1)[1] + ".tar")
            decompress_to(src, desc["mediaType"], dst)
            got = "sha256:" + sha256_file(dst)
            if got != diff_id:
                raise SystemExit("diff_id mismatch for %s" % desc["digest"])
            name = diff_id.split(":", 1)[1] + "/layer.tar"
            layer_names.append(name)
            files.append((name, dst, None))
        man = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
        files.append(("manifest.json", None, canonical_json(man)))
        repo, _, t = tag.rpartition(":")
        last = layer_names[-1].split("/")[0]
        files.append(("repositories", None, canonical_json({repo: {t: last}})))
        with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            dirs = set()
            for name, path, data in sorted(files, key=lambda x: x[0]):
                d = os.path.dirname(name)
                if d and d not in dirs:
                    dirs.add(d)
                    ti = tarfile.TarInfo(d)
                    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                    tf.addfile(ti)
                ti = tarfile.TarInfo(name)
                ti.mode, ti.mtime = 0o644, FIXED_MTIME
                if data is not None:
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
                else:
                    ti.size = os.path.getsize(path)
                    with open(path, "rb") as src:
                        tf.addfile(ti, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decompress_to(src, media_type, dst):
    if media_type.endswith("+gzip"):
        with gzip.open(src, "rb") as i, open(dst, "wb") as o:
            shutil.copyfileobj(i, o, 1 << 20)
    elif media_type.endswith("+zstd"):
        subprocess.run(["zstd", "-q", "-d", "-f", src, "-o", dst], check=True)
    else:
        shutil.copyfile(src, dst)


# ---------------------------------------------------------------------------
# Token service (Docker registry token auth, RS256 JWT with x5c header)
# ---------------------------------------------------------------------------
def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def libtrust_key_id(der_spki):
    h = hashlib.sha256(der_spki).digest()[:30]
    s = base64.b32encode(h).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, 48, 4))


class TokenSigner:
    def __init__(self, d):
        self.key = os.path.join(d, "token.key")
        self.cert = os.path.join(d, "token.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                        "-out", self.cert, "-days", "3650", "-subj", "/CN=berth-test-token-issuer",
                        "-sha256"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        der_cert = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"],
                                  check=True, capture_output=True).stdout
        der_spki = subprocess.run(["openssl", "pkey", "-in", self.key, "-pubout", "-outform", "DER"],
                                  check=True, capture_output=True).stdout
        self.header = {"alg": "RS256", "typ": "JWT", "kid": libtrust_key_id(der_spki),
                       "x5c": [base64.b64encode(der_cert).decode()]}

    def sign(self, claims):
        signing_input = (b64url(canonical_json(self.header)) + "." + b64url(canonical_json(claims))).encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key, "-binary"],
                             input=signing_input, check=True, capture_output=True).stdout
        return signing_input.decode() + "." + b64url(sig)


def parse_scopes(values):
    access = []
    for v in values:
        for s in v.split():
            parts = s.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            acts = [a for a in actions.split(",") if a]
            access.append({"type": typ, "name": name, "actions": acts})
    return access


def make_token_handler(signer, stats):
    class TokenHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _json(self, code, obj, extra=()):
            b = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(b)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(b)

        def _issue(self, user, password, service, scopes):
            if (user, password) != (TOKEN_USER, TOKEN_PASS):
                stats["denied"] += 1
                return self._json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                                  [("WWW-Authenticate", 'Basic realm="berth-test-token"')])
            now = int(time.time())
            claims = {
                "iss": TOKEN_ISSUER,
                "sub": user,
                "aud": service or TOKEN_SERVICE,
                "exp": now + TOKEN_TTL,
                "nbf": now - 10,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": parse_scopes(scopes),
            }
            tok = signer.sign(claims)
            stats["issued"] += 1
            self._json(200, {"token": tok, "access_token": tok, "expires_in": TOKEN_TTL,
                             "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))})

        def do_GET(self):
            u = urllib.parse.urlsplit(self.path)
            if u.path != "/token":
                return self._json(404, {"error": "not found"})
            q = urllib.parse.parse_qs(u.query)
            user = password = None
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("basic "):
                try:
                    user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
                except Exception:
                    pass
            self._issue(user, password, (q.get("service") or [None])[0], q.get("scope", []))

        def do_POST(self):
            # OAuth2 password grant (what containerd tries for some setups)
            u = urllib.parse.urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(n).decode())
            if u.path != "/token" or (form.get("grant_type") or [""])[0] != "password":
                return self._json(400, {"error": "unsupported_grant_type"})
            self._issue((form.get("username") or [None])[0], (form.get("password") or [None])[0],
                        (form.get("service") or [None])[0], form.get("scope", []))

    return TokenHandler


# ---------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------
def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _child_setup(world_pid):
    # Runs in the child between fork and exec: die with the world even if it
    # is SIGKILLed (PR_SET_PDEATHSIG = 1), and don't outlive a world that
    # died before the prctl took effect.
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != world_pid:
        os._exit(1)


def http_get(host, path, headers=None, method="GET", timeout=5):
    c = http.client.HTTPConnection(host, timeout=timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        c.close()


class Registry:
    def __init__(self, kind, tmp, auth_yaml):
        self.kind = kind
        self.dir = os.path.join(tmp, kind)
        self.storage = os.path.join(self.dir, "storage")
        os.makedirs(self.storage)
        self.auth_yaml = auth_yaml
        self.proc = None
        self.host = None
        self.log = os.path.join(self.dir, "registry.log")

    def start(self, attempts=10):
        world_pid = os.getpid()
        for attempt in range(attempts):
            port = free_port()
            cfg = os.path.join(self.dir, "config.yml")
            with open(cfg, "w") as f:
                f.write(REGISTRY_CONFIG % {"storage": self.storage, "port": port, "auth": self.auth_yaml,
                                           "secret": uuid.uuid4().hex})
            logf = open(self.log, "ab")
            self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, start_new_session=True,
                                         preexec_fn=lambda: _child_setup(world_pid))
            logf.close()
            self.host = "127.0.0.1:%d" % port
            want = 200 if self.kind == "anon" else 401
            deadline = time.time() + 10
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    st, hdrs, _ = http_get(self.host, "/v2/", timeout=1)
                    if hdrs.get("docker-distribution-api-version") == "registry/2.0" and st == want:
                        return
                    if st != want:
                        raise SystemExit("registry %s answered GET /v2/ with %d, expected %d"
                                         % (self.kind, st, want))
                except (ConnectionError, OSError, http.client.HTTPException):
                    pass
                time.sleep(0.02)
            self.stop()
            log("registry %s failed to start on port %d (attempt %d), retrying" % (self.kind, port, attempt + 1))
        with open(self.log, errors="replace") as f:
            sys.stderr.write(f.read()[-3000:])
        raise SystemExit("registry %s did not start" % self.kind)

    def stop(self):
        p = self.proc
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 3)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %(storage)s
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:%(port)d
  secret: %(secret)s
  headers:
    X-Content-Type-Options: [nosniff]
%(auth)s
"""


# ---------------------------------------------------------------------------
# Push (own client so zstd layers stay zstd)
# ---------------------------------------------------------------------------
class RegistryClient:
    def __init__(self, host, username=None, password=None):
        self.host = host
        self.username, self.password = username, password
        self.challenge = None
        self.tokens = {}

    def _auth_header(self, scope):
        if self.challenge is None:
            st, hdrs, _ = http_get(self.host, "/v2/")
            self.challenge = hdrs.get("www-authenticate", "") if st == 401 else ""
        ch = self.challenge
        if not ch:
            return {}
        basic = "Basic " + base64.b64encode(("%s:%s" % (self.username, self.password)).encode()).decode()
        if ch.lower().startswith("basic"):
            return {"Authorization": basic}
        if ch.lower().startswith("bearer"):
            if scope not in self.tokens:
                params = parse_challenge(ch[len("bearer"):])
                realm = urllib.parse.urlsplit(params["realm"])
                q = urllib.parse.urlencode({"service": params.get("service", ""), "scope": scope})
                st, _, body = http_get(realm.netloc, realm.path + "?" + q, {"Authorization": basic})
                if st != 200:
                    raise RuntimeError("token service answered %d: %s" % (st, body[:200]))
                self.tokens[scope] = json.loads(body)["token"]
            return {"Authorization": "Bearer " + self.tokens[scope]}
        raise RuntimeError("unknown auth challenge %r" % ch)

    def request(self, method, path, repo, body=None, headers=None, length=None):
        h = dict(headers or {})
        h.update(self._auth_header("repository:%s:pull,push" % repo))
        if length is not None:
            h["Content-Length"] = str(length)
        c = http.client.HTTPConnection(self.host, timeout=120)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
        finally:
            c.close()

    def push_blob(self, repo, layout, digest, size):
        st, hdrs, body = self.request("POST", "/v2/%s/blobs/uploads/" % repo, repo, body=b"")
        if st != 202:
            raise RuntimeError("POST upload %s: %d %s" % (repo, st, body[:300]))
        loc = urllib.parse.urlsplit(hdrs["location"])
        path = loc.path + "?" + (loc.query + "&" if loc.query else "") + \
            urllib.parse.urlencode({"digest": digest})
        with open(blob_path(layout, digest), "rb") as f:
            st, _, body = self.request("PUT", path, repo, body=f, length=size,
                                       headers={"Content-Type": "application/octet-stream"})
        if st != 201:
            raise RuntimeError("PUT blob %s %s: %d %s" % (repo, digest, st, body[:300]))

    def push_image(self, repo, layout, tag="latest"):
        mbytes, mdig, manifest, _ = read_layout(layout)
        for d in [manifest["config"]] + manifest["layers"]:
            self.push_blob(repo, layout, d["digest"], d["size"])
        st, hdrs, body = self.request("PUT", "/v2/%s/manifests/%s" % (repo, tag), repo, body=mbytes,
                                      headers={"Content-Type": manifest["mediaType"]})
        if st != 201:
            raise RuntimeError("PUT manifest %s: %d %s" % (repo, st, body[:300]))
        st, hdrs, body = self.request("GET", "/v2/%s/manifests/%s" % (repo, tag), repo,
                                      headers={"Accept": manifest["mediaType"]})
        if st != 200 or body != mbytes or hdrs.get("docker-content-digest") != mdig:
            raise RuntimeError("verify manifest %s@%s: %d %s" % (repo, tag, st, hdrs.get("docker-content-digest")))
        return mdig


def parse_challenge(s):
    out = {}
    for part in s.strip().split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return out


# ---------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------
class Stop(Exception):
    pass


def remove_stale_world_dirs():
    """Temp dirs of worlds that were SIGKILLed (their registries died with
    them through PR_SET_PDEATHSIG, but nobody removed the directory)."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "berth-world-*")):
        try:
            with open(os.path.join(d, "world.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # no pid file yet (being created) or unreadable
        shutil.rmtree(d, ignore_errors=True)


def cmd_serve(args):
    parent = os.getppid()
    stop_evt = threading.Event()
    stopping = [False]

    def on_signal(signum, frame):
        stop_evt.set()
        if not stopping[0]:
            raise Stop()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    t_start = time.time()
    cache = cache_dir(args)
    names = selected_images(args)
    remove_stale_world_dirs()
    tmp = tempfile.mkdtemp(prefix="berth-world-")
    with open(os.path.join(tmp, "world.pid"), "w") as f:
        f.write(str(os.getpid()))
    registries = []
    token_srv = None
    try:
        layouts = {n: ensure_image(cache, n) for n in names}
        signer = TokenSigner(tmp)
        stats = {"issued": 0, "denied": 0}
        token_srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_token_handler(signer, stats))
        token_srv.daemon_threads = True
        threading.Thread(target=token_srv.serve_forever, daemon=True).start()
        token_url = "http://127.0.0.1:%d/token" % token_srv.server_address[1]

        htpasswd = os.path.join(tmp, "htpasswd")
        with open(htpasswd, "wb") as f:
            f.write(subprocess.run(["htpasswd", "-Bbn", BASIC_USER, BASIC_PASS], check=True,
                                   capture_output=True).stdout)
        auths = {
            "anon": "",
            "basic": "auth:\n  htpasswd:\n    realm: basic-realm\n    path: %s\n" % htpasswd,
            "token": ("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n"
                      "    rootcertbundle: %s\n    autoredirect: false\n")
            % (token_url, TOKEN_SERVICE, TOKEN_ISSUER, signer.cert),
        }
        regs = {}
        for kind in ("anon", "basic", "token"):
            r = Registry(kind, tmp, auths[kind])
            registries.append(r)
            r.start()  # from the main thread: PDEATHSIG follows the creating thread
            regs[kind] = r
        log("registries up in %.2fs: %s" % (time.time() - t_start,
                                             ", ".join("%s=%s" % (k, r.host) for k, r in regs.items())))

        clients = {
            "anon": RegistryClient(regs["anon"].host),
            "basic": RegistryClient(regs["basic"].host, BASIC_USER, BASIC_PASS),
            "token": RegistryClient(regs["token"].host, TOKEN_USER, TOKEN_PASS),
        }
        t_push = time.time()
        digests = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(clients) * len(names)) as ex:
            futs = {ex.submit(clients[k].push_image, "test/" + n, layouts[n]): (k, n)
                    for k in clients for n in names}
            for fut, (k, n) in futs.items():
                digests[n] = fut.result()
        log("pushed %d images to 3 registries in %.2fs" % (len(names), time.time() - t_push))

        info = {
            "registries": {
                "anon": {"host": regs["anon"].host, "url": "http://" + regs["anon"].host,
                         "log": regs["anon"].log},
                "basic": {"host": regs["basic"].host, "url": "http://" + regs["basic"].host,
                          "username": BASIC_USER, "password": BASIC_PASS, "realm": "basic-realm",
                          "log": regs["basic"].log},
                "token": {"host": regs["token"].host, "url": "http://" + regs["token"].host,
                          "username": TOKEN_USER, "password": TOKEN_PASS, "token_service": token_url,
                          "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER, "log": regs["token"].log},
            },
            "images": {n: "test/%s:latest" % n for n in names},
            "digests": digests,
            "layouts": layouts,
            "dir": tmp,
            "pid": os.getpid(),
        }
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        log("ready in %.2fs" % (time.time() - t_start))

        if not args.ignore_stdin:
            def watch_stdin():
                try:
                    while True:
                        b = os.read(0, 65536)
                        if not b:
                            break
                except OSError:
                    pass
                log("stdin closed, shutting down")
                stop_evt.set()
            threading.Thread(target=watch_stdin, daemon=True).start()

        while not stop_evt.wait(0.5):
            if os.getppid() != parent:
                log("parent process died, shutting down")
                break
            for r in registries:
                if r.proc.poll() is not None:
                    log("registry %s exited unexpectedly (rc=%s), see %s" % (r.kind, r.proc.returncode, r.log))
                    stop_evt.set()
    except Stop:
        log("signal received, shutting down")
    finally:
        stopping[0] = True
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        for r in registries:
            r.stop()
        if token_srv is not None:
            token_srv.shutdown()
            token_srv.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
        log("stopped")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def cmd_build(args):
    cache = cache_dir(args)
    for n in selected_images(args):
        p = ensure_image(cache, n)
        log("%s: %s" % (n, p))


def cmd_layout(args):
    if args.name not in RECIPES:
        raise SystemExit("unknown image %r" % args.name)
    print(ensure_image(cache_dir(args), args.name), flush=True)


def cmd_oci_tar(args):
    write_oci_tar(ensure_image(cache_dir(args), args.name), args.out)


def cmd_docker_archive(args):
    write_docker_archive(ensure_image(cache_dir(args), args.name), args.out,
                         args.tag or "test/%s:latest" % args.name)


def cmd_clean(args):
    cache = cache_dir(args)
    keep = {os.path.basename(layout_path(cache, n)) for n in RECIPES}
    if not os.path.isdir(cache):
        return
    for e in sorted(os.listdir(cache)):
        p = os.path.join(cache, e)
        if e not in keep and os.path.isdir(p):
            log("removing %s" % p)
            shutil.rmtree(p, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Berth end-to-end test world")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, images=False):
        p.add_argument("--cache", help="image cache dir (env BERTH_WORLD_CACHE, default %s)" % DEFAULT_CACHE)
        if images:
            p.add_argument("--images", help="comma-separated subset (env BERTH_WORLD_IMAGES; default all: %s)"
                           % ",".join(IMAGE_NAMES))
        return p

    common(sub.add_parser("build", help="build images if missing"), True).set_defaults(fn=cmd_build)
    p = common(sub.add_parser("layout", help="print the path of a built OCI layout"))
    p.add_argument("name")
    p.set_defaults(fn=cmd_layout)
    p = common(sub.add_parser("oci-tar", help="write a tarball of an OCI layout"))
    p.add_argument("name")
    p.add_argument("out")
    p.set_defaults(fn=cmd_oci_tar)
    p = common(sub.add_parser("docker-archive", help="write a docker-archive (docker save format)"))
    p.add_argument("name")
    p.add_argument("out")
    p.add_argument("--tag", help="RepoTags entry (default test/NAME:latest)")
    p.set_defaults(fn=cmd_docker_archive)
    p = common(sub.add_parser("serve", help="run registries; print one JSON line; run until stdin EOF"), True)
    p.add_argument("--ignore-stdin", action="store_true", help="run until SIGTERM/SIGINT only")
    p.set_defaults(fn=cmd_serve)
    common(sub.add_parser("clean", help="remove stale cache entries")).set_defaults(fn=cmd_clean)
    args = ap.parse_args(argv)

    def on_signal(signum, frame):
        raise Stop()

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        args.fn(args)
    except (Stop, KeyboardInterrupt):
        log("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

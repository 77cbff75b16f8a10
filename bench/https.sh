#!/usr/bin/env bash
# HTTPS through Berth's TLS listener (--https-addr) vs nginx terminating TLS for the SAME backend:
# requests/s and p99 latency, medians of ROUNDS alternating rounds, from one run. Target:
# berth/nginx >= 1.0x requests/s (at <= nginx's p99).
#   backend: the test world's nginx image ("nginx ok", keep-alive) deployed as Berth service
#            `bench` held at exactly one instance (--min 1 --max 1); nginx's proxy_pass goes to
#            that instance's address (GET /api/v1/services/bench -> instances[0].address), so
#            both proxies forward to the same process over plain HTTP/1.1 keep-alive.
#   certs:   a throwaway CA and an ECDSA P-256 leaf for bench.test.local; nginx gets the leaf,
#            Berth gets the same files through `berth certs add`. The host is the service's
#            own (`bench` under --domain test.local), so no `berth domains add` is needed (a name
#            under the platform domain is refused there anyway).
#   nginx:   1.x with `worker_processes auto` (one worker per core, as Berth uses every core),
#            TLSv1.3+1.2, a session cache, upstream keepalive 64, the same X-Forwarded-* headers
#            Berth sets. An `if` on $ssl_server_name answers 421 to a wrong SNI, so a client that
#            sent the wrong name shows up as non-2xx.
#   load:    wrk (HTTP/1.1: it offers no ALPN, so both sides serve HTTP/1.1 over TLS) with
#            THREADS threads and CONNS connections. wrk sends SNI from the URL's host and has no
#            option to change it (an IP in the URL means no SNI at all; -H Host does not change
#            it), and the URL's host must resolve. So wrk runs in a mount namespace of its own in
#            which /etc/hosts is a copy with `127.0.0.1 bench.test.local` added; nothing on the
#            machine changes. Modes:
#              keepalive: every connection stays open (TLS record throughput, no handshakes);
#              close:     `Connection: close`, a full handshake per request (wrk resumes no
#                         sessions), MODES="keepalive" skips it;
#              plain:     opt-in (MODES="keepalive close plain"): the same as keepalive over plain
#                         HTTP (Berth's --http-addr, a plain listener of the same nginx), to tell
#                         the TLS layer's share of a gap from the proxy's.
#   rounds:  a 2 s warm-up of each side, then ROUNDS rounds of DURATION s per side and mode, the
#            side that goes first alternating. Printed: medians, the ratio of the medians and the
#            median of the per-round (paired) ratios, and each side's CPU time per 1000 requests
#            (berth: the server process; nginx: master and workers).
# Seen here (2 cores shared with other work, so trust the paired ratios and CPU per request more
# than the absolute numbers), with the proxy threads (--proxy-threads, one per CPU), two runs:
# keep-alive 0.89-1.08x nginx's requests/s (paired 0.89-0.91x) at 0.94-0.99x its p99, CPU per
# request 1.14-1.18x; new connection per request 1.26x; plain HTTP 0.91-1.19x (paired
# 0.89-0.97x). Before the proxy threads: keep-alive 0.71x, plain 0.81x, CPU per request ~1.55x
# with or without TLS.
# Everything goes to loopback or into the namespace this script's Berth makes for its
# container. Needs root, wrk, nginx, openssl, curl, unshare and a release berth with TLS
# (cargo build --release -p berth; BERTH=path overrides). Env: ROUNDS (5), DURATION (10),
# THREADS (2), CONNS (64), MODES ("keepalive close"), BERTH_LOG (warn), KEEP=1 keeps the work dir.
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH=${BERTH:-$PWD/target/release/berth}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
MODES=${MODES:-keepalive close}
NAME=bench
DOMAIN=test.local
HOST=$NAME.$DOMAIN
BRIDGE=bhttps0
SUBNET=10.250.0.0/24
[ -x "$BERTH" ] || { echo "bench: $BERTH is missing: cargo build --release -p berth (or set BERTH)" >&2; exit 1; }
for t in wrk nginx openssl curl unshare; do
  command -v "$t" >/dev/null || { echo "bench: $t is missing (scripts/install-test-deps installs it)" >&2; exit 1; }
done
log() { echo "[bench]" "$@" >&2; }

work=$(mktemp -d /tmp/bench-https.XXXXXX)
berthpid= nginxpid=
b() { "$BERTH" --data-dir "$work/data" "$@"; }
cleanup() {
  set +e
  if [ -n "$nginxpid" ]; then kill -TERM "$nginxpid" 2>/dev/null; wait "$nginxpid" 2>/dev/null; fi
  if [ -n "$berthpid" ]; then
    kill -0 "$berthpid" 2>/dev/null && timeout 60 "$BERTH" --data-dir "$work/data" rm "$NAME" >/dev/null 2>&1
    kill -TERM "$berthpid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$berthpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$berthpid" 2>/dev/null
    wait "$berthpid" 2>/dev/null
  fi
  "$BERTH" --data-dir "$work/data" container ls --all --json 2>/dev/null | python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]' 2>/dev/null | xargs -r "$BERTH" --data-dir "$work/data" container rm --force >/dev/null 2>&1
  ip link del "$BRIDGE" 2>/dev/null
  for t in filter nat; do
    iptables -w -t "$t" -S 2>/dev/null | grep -- "$BRIDGE" | sed 's/^-A/-D/' | xargs -r -L1 iptables -w -t "$t" 2>/dev/null
  done
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  exec 3>&-
  sleep 1
  if [ -n "${KEEP:-}" ]; then echo "[bench] kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api=$(free_port) http=$(free_port) https=$(free_port) nport=$(free_port) nplain=$(free_port)

# The test world's registry with the nginx backend image.
exec 3> >(python3 tests/world/world.py serve --images nginx > "$work/world.json")
for _ in $(seq 200); do [ -s "$work/world.json" ] && break; sleep 0.5; done
[ -s "$work/world.json" ] || { echo "bench: the test world did not start" >&2; exit 1; }
ref=$(python3 -c 'import json,sys; w=json.load(open(sys.argv[1])); print(w["registries"]["anon"]["host"]+"/"+w["images"]["nginx"])' "$work/world.json")

# A throwaway CA and an ECDSA P-256 leaf for $HOST.
mkdir -p "$work/tls"
(
  cd "$work/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 \
    -subj "/CN=berth bench CA" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr -subj "/CN=$HOST"
  printf 'subjectAltName=DNS:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$HOST" > leaf.ext
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out leaf.pem -extfile leaf.ext
  openssl verify -CAfile ca.pem leaf.pem
) >"$work/tls/openssl.log" 2>&1 || { cat "$work/tls/openssl.log" >&2; exit 1; }

# Berth: its own data dir, bridge and ports; no ACME, no SSH.
mkdir -p "$work/data"
printf '[network]\nbridge = "%s"\nsubnet = "%s"\n' "$BRIDGE" "$SUBNET" > "$work/data/config.toml"
BERTH_LOG=${BERTH_LOG:-warn} "$BERTH" --data-dir "$work/data" server --domain "$DOMAIN" \
  --api-addr "127.0.0.1:$api" --http-addr "127.0.0.1:$http" --https-addr "127.0.0.1:$https" \
  --acme-directory off --ssh-addr off </dev/null >/dev/null 2>"$work/server.log" &
berthpid=$!
for _ in $(seq 300); do
  curl -fsS "http://127.0.0.1:$api/api/v1/health" >/dev/null 2>&1 && break
  kill -0 "$berthpid" 2>/dev/null || { echo "bench: berth server exited:" >&2; tail -20 "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
token=$(cat "$work/data/admin-token")
log "berth: api 127.0.0.1:$api, https 127.0.0.1:$https; deploying $ref"
b deploy "$NAME" --image "$ref" --wait >"$work/deploy.log" 2>&1 || { cat "$work/deploy.log" >&2; exit 1; }
b scale "$NAME" --min 1 --max 1 --concurrency 1000 --queue 10000 --freeze-after 1h --stop-after 1h >/dev/null
b certs add "$HOST" --cert "$work/tls/leaf.pem" --key "$work/tls/leaf.key" >/dev/null
addr=
for _ in $(seq 300); do
  addr=$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$api/api/v1/services/$NAME" | python3 -c '
import json, sys
s = json.load(sys.stdin)
i = s["instances"]
if len(i) == 1 and i[0]["state"] == "ready":
    print(i[0]["address"])') || true
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { echo "bench: $NAME did not settle at one ready instance" >&2; exit 1; }
log "backend: the one instance of $NAME at $addr"

# nginx, TLS in front of the same instance.
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
# `http2 on;` is nginx >= 1.25.1; older ones take it on the listen line. wrk does not offer h2
# (no ALPN), so this only keeps the config what an operator would write.
nver=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if printf '1.25.1\n%s\n' "$nver" | sort -V -C; then listen="listen 127.0.0.1:$nport ssl; http2 on;"; else listen="listen 127.0.0.1:$nport ssl http2;"; fi
cat > "$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid nginx.pid;
error_log logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path tmp/body; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;
  uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
  upstream app { server $addr; keepalive 64; }
  server {
    $listen
    ssl_certificate $work/tls/leaf.pem;
    ssl_certificate_key $work/tls/leaf.key;
    ssl_protocols TLSv1.3 TLSv1.2;
    ssl_session_cache shared:SSL:10m;
    location / {
      if (\$ssl_server_name != "$HOST") { return 421; }
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto https;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
  server {
    listen 127.0.0.1:$nplain;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto http;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }
}
EOF
nginx -p "$work/nginx/" -c nginx.conf -e logs/error.log </dev/null >/dev/null 2>&1 &
nginxpid=$!

# Both answer "nginx ok" for $HOST with a certificate that chains to the throwaway CA.
for who in berth nginx; do
  port=$https; [ "$who" = nginx ] && port=$nport
  ok=
  for _ in $(seq 100); do
    if out=$(curl -fsS --http1.1 --max-time 5 --cacert "$work/tls/ca.pem" --resolve "$HOST:$port:127.0.0.1" "https://$HOST:$port/" 2>&1) &&
      [ "$out" = "nginx ok" ]; then ok=1; break; fi
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "bench: $who over HTTPS for $HOST: $out" >&2; tail -5 "$work/server.log" "$work/nginx/logs/error.log" >&2; exit 1; }
  v=$(curl -sS -o /dev/null -w '%{http_version}' --cacert "$work/tls/ca.pem" --resolve "$HOST:$port:127.0.0.1" "https://$HOST:$port/" || true)
  log "$who: HTTPS ok (HTTP/1.1; curl's default negotiates HTTP/$v)"
done

# wrk, with $HOST resolving to 127.0.0.1 in its own mount namespace (see the header).
{ cat /etc/hosts; echo "127.0.0.1 $HOST"; } > "$work/hosts"
wrk_() {
  unshare -m -- sh -c 'mount --bind "$1" /etc/hosts && shift && exec wrk "$@"' sh "$work/hosts" \
    "-t$THREADS" "-c$CONNS" --latency "$@"
}
# CPU ticks (utime+stime) of a side's processes: berth's server, nginx's master and workers.
ticks() {
  local pids=$berthpid
  [ "$1" = nginx ] && pids="$nginxpid $(pgrep -P "$nginxpid")"
  for p in $pids; do awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null; done | awk '{s += $1} END {print s + 0}'
}
run_one() { # SIDE MODE SECONDS OUTFILE
  local url="https://$HOST:$https/" args=()
  [ "$1" = nginx ] && url="https://$HOST:$nport/"
  [ "$2" = plain ] && { url="http://$HOST:$http/"; [ "$1" = nginx ] && url="http://$HOST:$nplain/"; }
  [ "$2" = close ] && args=(-H "Connection: close")
  local t0; t0=$(ticks "$1")
  wrk_ "-d$3s" "${args[@]}" "$url" > "$4" 2>&1 || { cat "$4" >&2; exit 1; }
  echo "cpu_ticks $(( $(ticks "$1") - t0 ))" >> "$4"
}
mkdir -p "$work/out"
for m in $MODES; do
  for who in berth nginx; do run_one "$who" "$m" 2 "$work/out/warm-$m-$who"; done
done
for r in $(seq "$ROUNDS"); do
  order="berth nginx"; [ $((r % 2)) -eq 0 ] && order="nginx berth"
  for m in $MODES; do
    for who in $order; do
      run_one "$who" "$m" "$DURATION" "$work/out/$m-$who-$r"
      log "round $r/$ROUNDS $m $who: $(grep -h 'Requests/sec' "$work/out/$m-$who-$r" | tr -s ' ')"
    done
  done
done
grep -i -E 'error|crit|alert|emerg' "$work/nginx/logs/error.log" | tail -3 >&2 || true
grep -i -E 'error|warn' "$work/server.log" | tail -5 >&2 || true

python3 - "$work/out" "$ROUNDS" "$(getconf CLK_TCK)" "$DURATION" "$THREADS" "$CONNS" $MODES <<'PY'
import os, re, statistics, sys
out, rounds, hz, dur, threads, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
modes = sys.argv[7:]
UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}

def parse(path):
    text = open(path).read()
    rps = float(re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M).group(1))
    n, u = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b", text, re.M).groups()
    reqs = int(re.search(r"^\s+(\d+) requests in", text, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    cpu = int(re.search(r"^cpu_ticks (-?\d+)", text, re.M).group(1)) / hz
    return dict(rps=rps, p99=float(n) * UNIT[u], reqs=reqs, bad=int(bad.group(1)) if bad else 0,
                err=sum(map(int, err.groups())) if err else 0, cpu=cpu)

med = statistics.median
label = {"keepalive": "keep-alive", "close": "new conn/request", "plain": "keep-alive"}
print(f"HTTPS via Berth's TLS listener vs nginx (worker_processes auto) to the same backend instance; "
      f"wrk -t{threads} -c{conns}, {rounds} alternating rounds of {dur} s, medians")
for m in modes:
    r = {w: [parse(os.path.join(out, f"{m}-{w}-{i}")) for i in range(1, rounds + 1)] for w in ("berth", "nginx")}
    b, n = r["berth"], r["nginx"]
    brps, nrps = med(x["rps"] for x in b), med(x["rps"] for x in n)
    bp, np_ = med(x["p99"] for x in b), med(x["p99"] for x in n)
    pr = med(x["rps"] / y["rps"] for x, y in zip(b, n))
    pp = med(x["p99"] / y["p99"] for x, y in zip(b, n))
    bc = 1000 * 1000 * sum(x["cpu"] for x in b) / sum(x["reqs"] for x in b)
    nc = 1000 * 1000 * sum(x["cpu"] for x in n) / sum(x["reqs"] for x in n)
    lab = label.get(m, m)
    proto = "http" if m == "plain" else "https"
    print(f"{proto} {lab} rps: berth {brps:.0f} nginx {nrps:.0f} ratio {brps / nrps:.2f}x "
          f"(paired {pr:.2f}x; target >= 1.0x)")
    print(f"{proto} {lab} p99: berth {bp * 1000:.2f} ms nginx {np_ * 1000:.2f} ms ratio {bp / np_:.2f}x "
          f"(paired {pp:.2f}x; target <= 1.0x)")
    print(f"{proto} {lab} cpu per 1k requests: berth {bc:.0f} ms nginx {nc:.0f} ms ratio {bc / nc:.2f}x")
    print(f"{proto} {lab} rounds rps: berth {' '.join('%.0f' % x['rps'] for x in b)}; "
          f"nginx {' '.join('%.0f' % x['rps'] for x in n)}")
    for w in ("berth", "nginx"):
        bad, err = sum(x["bad"] for x in r[w]), sum(x["err"] for x in r[w])
        if bad or err:
            print(f"{proto} {lab} WARNING {w}: {bad} non-2xx responses, {err} socket errors")
PY

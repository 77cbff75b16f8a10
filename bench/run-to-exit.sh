#!/usr/bin/env bash
# Median run-to-exit time of `berth run` vs `runc run` on the same busybox image, from one run.
# Target: berth/runc <= 1.0x. Needs root, runc, umoci, hyperfine, and a built berth
# (cargo build --release; BERTH=path overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH=${BERTH:-$PWD/target/release/berth}
RUNS=${RUNS:-30}
work=$(mktemp -d /tmp/bench-run.XXXXXX)
cleanup() {
  "$BERTH" --data-dir "$work/data" container ls --all --json 2>/dev/null | python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]' | xargs -r "$BERTH" --data-dir "$work/data" container rm --force >/dev/null 2>&1 || true
  ip link del bbench0 2>/dev/null || true
  for t in filter nat; do
    iptables -w -t "$t" -S 2>/dev/null | grep -- 'bbench0' | sed 's/^-A/-D/' | xargs -r -L1 iptables -w -t "$t" 2>/dev/null || true
  done
  umount -l "$work"/data/containers/*/rootfs 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

layout=$(python3 tests/world/world.py layout busybox)
python3 tests/world/world.py oci-tar busybox "$work/busybox.tar" >/dev/null

# runc: an OCI bundle unpacked once by umoci, its command set to `echo hi`.
umoci unpack --image "$layout:latest" "$work/bundle" >/dev/null
python3 - "$work/bundle/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p))
c["process"]["args"] = ["echo", "hi"]; c["process"]["terminal"] = False
json.dump(c, open(p, "w"))
PY

# berth: the same image loaded into a fresh data dir with its own bridge.
mkdir -p "$work/data"
printf '[network]\nbridge = "bbench0"\nsubnet = "10.251.0.0/24"\n' > "$work/data/config.toml"
"$BERTH" --data-dir "$work/data" image load --input "$work/busybox.tar" >/dev/null
img=$("$BERTH" --data-dir "$work/data" image ls --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][7:19])')
"$BERTH" --data-dir "$work/data" run --rm "$img" -- echo warm >/dev/null

hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$work/h.json" \
  -n runc "runc --root $work/runc run --bundle $work/bundle bench" \
  -n berth "$BERTH --data-dir $work/data run --rm $img -- echo hi" >&2
python3 - "$work/h.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
runc, berth = r["runc"]["median"], r["berth"]["median"]
print(f"run-to-exit median: runc {runc*1000:.1f} ms, berth {berth*1000:.1f} ms, ratio berth/runc = {berth/runc:.2f}x (target <= 1.0x)")
PY

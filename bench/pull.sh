#!/usr/bin/env bash
# Median pull+unpack time of `berth image pull` vs `skopeo copy` + `umoci unpack` of the Debian
# python test image from a local registry, from one run. Target: berth/peer <= 1.0x.
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH=${BERTH:-$PWD/target/release/berth}
RUNS=${RUNS:-5}
work=$(mktemp -d /tmp/bench-pull.XXXXXX)
exec 3> >(python3 tests/world/world.py serve > "$work/world.json")
worldpid=$!
cleanup() { exec 3>&-; sleep 1; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -s "$work/world.json" ] && break; sleep 0.5; done
host=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registries"]["anon"]["host"])' "$work/world.json")
ref="$host/test/python:latest"

hyperfine --warmup 1 --runs "$RUNS" --export-json "$work/h.json" \
  --prepare "rm -rf $work/peer $work/data; mkdir -p $work/peer" \
  -n skopeo+umoci "skopeo copy --quiet --src-tls-verify=false docker://$ref oci:$work/peer/layout:latest && umoci unpack --image $work/peer/layout:latest $work/peer/bundle" \
  -n berth "$BERTH --data-dir $work/data image pull -q $ref" >&2
python3 - "$work/h.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
peer, berth = r["skopeo+umoci"]["median"], r["berth"]["median"]
print(f"pull+unpack median: skopeo+umoci {peer*1000:.0f} ms, berth {berth*1000:.0f} ms, ratio berth/peer = {berth/peer:.2f}x (target <= 1.0x)")
PY

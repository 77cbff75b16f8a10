#!/usr/bin/env bash
# Median build time of `berth build` vs `buildah bud --isolation chroot` for the same
# Dockerfiles (busybox base from the test world's registry, already in both stores), cold and as
# an unchanged rebuild. Targets: berth/buildah <= 1.0x cold, <= 0.3x unchanged.
#   cold:      buildah `bud --no-cache` (its default, one layer for the new steps: its fastest
#              cold build) vs `berth build --no-cache`;
#   unchanged: buildah `bud --layers` (the mode in which it caches) vs `berth build`, both after
#              a first build of the same context.
# Needs root, buildah, hyperfine and a built berth (cargo build --release; BERTH=path overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
BERTH=${BERTH:-$PWD/target/release/berth}
RUNS=${RUNS:-10}
work=$(mktemp -d /tmp/bench-build.XXXXXX)
exec 3> >(python3 tests/world/world.py serve --images busybox > "$work/world.json")
# buildah on overlay: faster for it than vfs here (cold 3.3 s vs 4.0 s, unchanged 0.6 s vs 1.1 s on
# the steps case), so the stricter peer.
buildah_() { buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver overlay "$@"; }
cleanup() {
  exec 3>&-
  buildah_ rm --all >/dev/null 2>&1 || true
  buildah_ rmi --all --force >/dev/null 2>&1 || true
  "$BERTH" --data-dir "$work/data" container ls --all --json 2>/dev/null | python3 -c 'import json,sys; [print(c["id"]) for c in json.load(sys.stdin)]' | xargs -r "$BERTH" --data-dir "$work/data" container rm --force >/dev/null 2>&1 || true
  ip link del bbuild0 2>/dev/null || true
  for t in filter nat; do
    iptables -w -t "$t" -S 2>/dev/null | grep -- 'bbuild0' | sed 's/^-A/-D/' | xargs -r -L1 iptables -w -t "$t" 2>/dev/null || true
  done
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 100); do [ -s "$work/world.json" ] && break; sleep 0.5; done
host=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["registries"]["anon"]["host"])' "$work/world.json")
base="$host/test/busybox:latest"

# The Dockerfiles: a typical app (context files, a RUN, metadata), a multi-stage build, and a
# longer one with many small steps.
mkdir -p "$work/app/src" "$work/multi" "$work/steps"
for i in $(seq 50); do head -c 4096 /dev/urandom | base64 > "$work/app/src/file$i.txt"; done
cat > "$work/app/Dockerfile" <<EOF
FROM $base
ENV APP=/srv/app PORT=8080
WORKDIR /srv/app
COPY src/ ./src/
RUN cat src/*.txt | wc -c > size.txt && mkdir -p /var/cache/app
USER app
EXPOSE 8080
CMD ["httpd", "-f", "-p", "8080", "-h", "/srv/app"]
EOF
cat > "$work/multi/Dockerfile" <<EOF
FROM $base AS build
RUN mkdir -p /out && for i in 1 2 3 4 5 6 7 8; do echo "artifact \$i" > /out/a\$i; done
FROM $base
COPY --from=build /out /opt/out
RUN ls /opt/out > /opt/listing
CMD ["cat", "/opt/listing"]
EOF
{
  echo "FROM $base"
  for i in $(seq 10); do
    echo "ENV STEP$i=$i"
    echo "RUN echo $i > /step$i"
  done
} > "$work/steps/Dockerfile"
cases=(app multi steps)

# The base image in both stores first.
mkdir -p "$work/data" "$work/buildah"
printf '[network]\nbridge = "bbuild0"\nsubnet = "10.253.0.0/24"\n' > "$work/data/config.toml"
"$BERTH" --data-dir "$work/data" image pull -q "$base" >/dev/null
buildah_ pull -q --tls-verify=false "$base" >/dev/null

bah="buildah --root $work/buildah/root --runroot $work/buildah/run --storage-driver overlay bud -q --isolation chroot --format docker"
bth="$BERTH --data-dir $work/data build -q"
args=()
for c in "${cases[@]}"; do
  args+=(-n "cold buildah $c" "$bah --no-cache -t bench/$c $work/$c")
  args+=(-n "cold berth $c" "$bth --no-cache -t bench/$c $work/$c")
  args+=(-n "unchanged buildah $c" "$bah --layers -t bench/$c $work/$c")
  args+=(-n "unchanged berth $c" "$bth -t bench/$c $work/$c")
done
# --warmup 1: the first run of each command fills the cache the unchanged ones reuse.
hyperfine -N --warmup 1 --runs "$RUNS" --export-json "$work/h.json" --output "$work/commands.log" "${args[@]}" >&2 ||
  { echo "a build failed; the end of its output:" >&2; tail -20 "$work/commands.log" >&2; exit 1; }
python3 - "$work/h.json" "${cases[@]}" <<'PY'
import json, statistics, sys
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
targets = {"cold": 1.0, "unchanged": 0.3}
for mode in ("cold", "unchanged"):
    ratios = []
    for c in sys.argv[2:]:
        peer, berth = r[f"{mode} buildah {c}"], r[f"{mode} berth {c}"]
        ratios.append(berth / peer)
        print(f"{mode:9} {c:6} median: buildah {peer*1000:7.0f} ms, berth {berth*1000:7.0f} ms, berth/buildah = {berth/peer:.2f}x")
    g = statistics.geometric_mean(ratios)
    print(f"{mode:9} all    geometric mean of ratios = {g:.2f}x (target <= {targets[mode]}x)")
PY

#!/bin/sh
# Installs the Debian packages the Berth test world (tests/world/world.py)
# needs. Idempotent: installs only what is missing, and runs `apt-get update`
# only when something is missing. Must run as root on Debian 12 (bookworm).
#
#   BERTH_WORLD_MINIMAL=1  skip the inspection tools (skopeo, umoci, runc, jq)
set -eu

# What world.py itself runs:
#   python3                 world.py (stdlib only)
#   busybox-static          /bin/busybox for the busybox images
#   zstd                    the busybox-zstd image's layers
#   debootstrap             the python image's Debian minbase rootfs
#   debian-archive-keyring  debootstrap's signature check
#   docker-registry         CNCF distribution 2.8 (`docker-registry serve`)
#   apache2-utils           htpasswd -Bbn for the basic-auth registry
#   openssl                 key, certificate and RS256 signing for tokens
PKGS="python3 busybox-static zstd debootstrap debian-archive-keyring docker-registry apache2-utils openssl nginx-light"

# Tools used to check the world by hand (see README.md) and by some tests.
if [ "${BERTH_WORLD_MINIMAL:-0}" != "1" ]; then
    PKGS="$PKGS skopeo umoci runc jq"
fi

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    echo "install-deps: all present:$(printf ' %s' $PKGS)" >&2
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "install-deps: missing:$missing (run as root)" >&2
    exit 1
fi

echo "install-deps: installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# nginx-light (the nginx image's binary) must not start a system service on :80.
policy_added=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
fi
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi

#!/bin/sh
# Build the XDP program: clang -O2 -g -target bpf (BTF), with the build id the loader checks
# (sha256 of the generated layout header, then the source:
# multihost.dataplane.xdpobject.build_id).
# Without clang (e.g. not root, so `make setup` could not install it) this only warns: the
# xdp backend is then unavailable and dataplane = "auto" uses nft.
set -eu
dir=src/multihost/dataplane/bpf
src="$dir/multihost_xdp.c"
hdr="$dir/multihost_layout.h"
obj="$dir/multihost_xdp.o"
if ! command -v clang >/dev/null 2>&1; then
    echo "note: clang not found; not building $obj (the xdp data plane will be unavailable)" >&2
    exit 0
fi
id=$(cat "$hdr" "$src" | sha256sum | cut -c1-64)
multiarch=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
tmp="$obj.tmp.$$"
trap 'rm -f "$tmp"' EXIT
clang -O2 -g -target bpf -Wall -Werror -I"/usr/include/$multiarch" \
    -DMH_BUILD_ID="\"$id\"" -c "$src" -o "$tmp"
mv "$tmp" "$obj"
echo "built $obj (build id ${id%????????????????????????????????????????????????})"

#!/usr/bin/env bash
# Cut an offline install kit of vLLM (a folder .gpukit/p0 .. pN: the parts of one vllm.tar.xz
# plus dependency wheels and install.sh in the last part) into parts of at most PART_MIB MiB,
# for a GPU host that can only be reached by transfers of limited size. Parts land in
# .gpukit2/x00, x01, ... (the archive) and .gpukit2/w (its last piece and the wheels); copy
# them in that order into one folder on the host, then the kit's last part, whose install.sh
# assembles everything:
#   mkdir -p /tmp/kit && cp .gpukit2/xNN/* /tmp/kit/     (each xNN, then w)
#   cp .gpukit/pN/* /tmp/kit/ && bash /tmp/kit/install.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PART_MIB=${PART_MIB:-36}
last=$(ls -d .gpukit/p* 2>/dev/null | sort -V | tail -n 1)
[ -n "$last" ] || { echo "no kit in .gpukit/" >&2; exit 1; }
grep -qx '/.gpukit2/' .git/info/exclude || echo '/.gpukit2/' >> .git/info/exclude
rm -rf .gpukit2 && mkdir -p .gpukit2/w
tmp=$(mktemp -d)
cat .gpukit/p*/vllm.tar.xz.part* | split -b "${PART_MIB}M" -d -a 2 - "$tmp/vllm.tar.xz.part"
parts=("$tmp"/vllm.tar.xz.part*)
final=${parts[-1]}
for f in "${parts[@]}"; do
  [ "$f" = "$final" ] && { mv "$f" .gpukit2/w/; continue; }
  i=${f##*part}; mkdir -p ".gpukit2/x$i" && mv "$f" ".gpukit2/x$i/"
done
# wheels of every part but the last (the last part is sent as it is, with install.sh)
for p in .gpukit/p*; do [ "$p" = "$last" ] || cp "$p"/*.whl .gpukit2/w/ 2>/dev/null || true; done
rmdir "$tmp"
du -sh .gpukit2/*

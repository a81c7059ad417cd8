#!/usr/bin/env bash
# Cut an offline install kit of vLLM (a folder .gpukit/p0 .. pN: the parts of one vllm.tar.xz
# plus dependency wheels and install.sh in the last part) into parts of at most PART_MIB MiB,
# for a GPU host that can only be reached by transfers of limited size. Parts land in
# .gpukit2/x00, x01, ... (the archive) and .gpukit2/w, w1, ... (its last piece and the wheels,
# each folder at most PART_MIB MiB); copy them in that order into one folder on the host, then
# the kit's last part, whose install.sh assembles everything:
#   mkdir -p /tmp/kit && cp .gpukit2/xNN/* /tmp/kit/     (each xNN, then w, w1, ...)
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
# the wheels beside the archive's last piece spill into w1, w2, ... past PART_MIB (largest
# first, each into the first folder with room), so that no folder outgrows a transfer
python3 - "$PART_MIB" <<'PY'
import os, shutil, sys
cap = int(sys.argv[1]) << 20
files = sorted((os.path.join(".gpukit2/w", f) for f in os.listdir(".gpukit2/w")),
               key=os.path.getsize, reverse=True)
bins = []  # [folder, bytes]
for f in files:
    size = os.path.getsize(f)
    room = next((b for b in bins if b[1] + size <= cap), None)
    if room is None:
        room = [".gpukit2/w" if not bins else f".gpukit2/w{len(bins)}", 0]
        os.makedirs(room[0], exist_ok=True)
        bins.append(room)
    if os.path.dirname(f) != room[0]:
        shutil.move(f, room[0])
    room[1] += size
PY
du -sh .gpukit2/*

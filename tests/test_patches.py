"""The hooks in patches/: each fails here if upstream vLLM changes under it."""
import pickle
import subprocess
import sys

import pytest

import vllm
import vllm_kvcomp
from vllm_kvcomp.patches import UPSTREAM_FINGERPRINTS, VLLM_VERSION, source_fingerprint


def test_pinned_vllm_version():
    assert vllm.__version__.split("+")[0] == VLLM_VERSION


@pytest.mark.parametrize("target", list(UPSTREAM_FINGERPRINTS))
def test_upstream_source_unchanged(target):
    assert source_fingerprint(target) == UPSTREAM_FINGERPRINTS[target], (
        f"upstream {target} changed since vLLM {VLLM_VERSION}: re-check the patch "
        "that relies on it (patches/ or vllm_kvcomp/spec.py), then update its fingerprint"
    )


def test_register_is_idempotent_and_wraps_once():
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.platforms import current_platform

    vllm_kvcomp.register()
    init, selector = Attention.__init__, type(current_platform).get_attn_backend_cls
    vllm_kvcomp.register()
    vllm_kvcomp._REGISTERED = False  # as in a process that calls the plugin twice
    vllm_kvcomp.register()
    assert Attention.__init__ is init
    assert type(current_platform).get_attn_backend_cls == selector


def test_cpu_platform_honours_kvcomp_only():
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_kvcomp.register()
    assert current_platform.is_cpu()

    class Selector:
        use_mla = False

    path = current_platform.get_attn_backend_cls(AttentionBackendEnum["KVCOMP"], Selector())
    assert path == "vllm_kvcomp.backend.KvcompBackend"
    Selector.use_mla = True
    with pytest.raises(ValueError, match="MLA"):
        current_platform.get_attn_backend_cls(AttentionBackendEnum["KVCOMP"], Selector())


def test_member_unpickles_in_a_fresh_process():
    """Engine and worker processes unpickle the config before loading
    plugins; the member must bring the plugin with it."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_kvcomp.register()
    blob = pickle.dumps(AttentionBackendEnum["KVCOMP"])
    code = ("import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); "
            "print(m.name, m.get_path())")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                         timeout=300)
    assert out.stdout.decode().split()[-2:] == ["KVCOMP", "vllm_kvcomp.backend.KvcompBackend"], \
        out.stderr.decode()[-2000:]


def test_attention_config_accepts_kvcomp_before_plugins_load():
    """``LLM(attention_config={"backend": "KVCOMP"})`` is parsed before vLLM
    loads plugins: the installed vllm_kvcomp_early.pth must cover it."""
    code = ("from vllm.config.attention import AttentionConfig; "
            "print(AttentionConfig(backend='KVCOMP').backend.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-1:] == ["KVCOMP"], out.stderr[-2000:]

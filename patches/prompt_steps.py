"""Prompt steps run eagerly where eviction's decode steps are captured in CUDA graphs.

vLLM's GPU model runner replays a FULL CUDA graph for any batch of one-token
steps (``GPUModelRunner._is_uniform_decode``), a prompt's last chunk of one
token included: a prefix-cache hit of all but the prompt's last token, or a
chunk cut one token before the prompt's end. Under ``KVCOMP_EVICTION_GRAPHS``
(``kernels/eviction_gpu.graph_eviction``) such a step must not be replayed:
it is where SnapKV selects and where H2O / A2SF take the whole prompt as
candidates of their first eviction, work whose shape the prompt decides.
``GPUModelRunner._determine_batch_execution_and_padding`` is wrapped so that
a batch holding a request still inside its prompt is not called a uniform
decode batch: it runs with attention eager (piecewise graphs or none), as
every batch with a longer chunk does. Nothing changes for any other backend
or setting, and the wrapper is installed only where the variable is set.
"""

from __future__ import annotations

import functools

_APPLIED = False


def holds_prompt_step(num_computed_tokens, num_prompt_tokens, num_reqs: int) -> bool:
    """Whether one of the batch's first ``num_reqs`` requests has computed
    fewer tokens than its prompt holds, so the step holds prompt queries."""
    return bool((num_computed_tokens[:num_reqs] < num_prompt_tokens[:num_reqs]).any())


def eager_prompt_steps(vllm_config) -> bool:
    """Whether this engine's prompt steps must run eagerly: KVCOMP selected
    with its eviction's decode steps captured (``graph_eviction``), on a GPU."""
    from vllm.platforms import current_platform

    from vllm_kvcomp.config import config_from_vllm_config
    from vllm_kvcomp.kernels.eviction_gpu import graph_eviction
    from vllm_kvcomp.validation import kvcomp_selected

    return (not current_platform.is_cpu() and kvcomp_selected(vllm_config)
            and graph_eviction(config_from_vllm_config(vllm_config)))


def _wrap(runner_cls) -> None:
    orig = runner_cls._determine_batch_execution_and_padding

    @functools.wraps(orig)
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        eager = self.__dict__.get("_kvcomp_eager_prompt_steps")
        if eager is None:
            eager = self._kvcomp_eager_prompt_steps = eager_prompt_steps(self.vllm_config)
        # capture and dummy runs say what they want (force_uniform_decode)
        if eager and kwargs.get("force_uniform_decode") is None:
            num_reqs = kwargs["num_reqs"] if "num_reqs" in kwargs else args[1]
            ib = self.input_batch
            if holds_prompt_step(ib.num_computed_tokens_cpu, ib.num_prompt_tokens, num_reqs):
                kwargs["force_uniform_decode"] = False
        return orig(self, *args, **kwargs)

    _determine_batch_execution_and_padding.__kvcomp_wrapped__ = True
    runner_cls._determine_batch_execution_and_padding = _determine_batch_execution_and_padding


def apply() -> None:
    """Installs the wrapper where ``KVCOMP_EVICTION_GRAPHS=1``."""
    global _APPLIED
    import os

    from vllm_kvcomp.launch_env import EVICTION_GRAPHS_ENV

    if _APPLIED or os.environ.get(EVICTION_GRAPHS_ENV) != "1":
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not getattr(GPUModelRunner._determine_batch_execution_and_padding,
                   "__kvcomp_wrapped__", False):
        _wrap(GPUModelRunner)
    _APPLIED = True

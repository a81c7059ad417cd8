"""Prompt steps run eagerly where eviction's decode steps are captured in CUDA graphs.

vLLM's GPU model runners replay a FULL CUDA graph for any batch of one-token
steps, a prompt's last chunk of one token included: a prefix-cache hit of
all but the prompt's last token, or a chunk cut one token before the
prompt's end. Where eviction's decode steps are captured
(``kernels/eviction_gpu.graph_eviction``) such a step must not be replayed:
it is where SnapKV selects and where H2O / A2SF take the whole prompt as
candidates of their first eviction, work whose shape the prompt decides.
So a batch holding a request still inside its prompt is not called a
uniform decode batch, and runs with attention eager (piecewise graphs or
none), as every batch with a longer chunk does:

* Model Runner V1: ``GPUModelRunner._determine_batch_execution_and_padding``
  is wrapped to pass ``force_uniform_decode=False`` for such a batch;
* Model Runner V2 (vLLM 0.26's default for most decoder models):
  ``GPUModelRunner.execute_model`` is wrapped to keep its runner and
  scheduler output at hand, and the ``get_uniform_token_count`` it calls
  (after the step's request states are updated) answers None for such a
  batch.

Nothing changes for any other backend or setting: the wrappers are
installed when the plugin loads, and each runner asks once whether its
engine is such an engine.
"""

from __future__ import annotations

import contextvars
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
            and graph_eviction(config_from_vllm_config(vllm_config), vllm_config))


def _eager(runner) -> bool:
    eager = runner.__dict__.get("_kvcomp_eager_prompt_steps")
    if eager is None:
        eager = runner._kvcomp_eager_prompt_steps = eager_prompt_steps(runner.vllm_config)
    return eager


def _wrap(runner_cls) -> None:
    orig = runner_cls._determine_batch_execution_and_padding

    @functools.wraps(orig)
    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        # capture and dummy runs say what they want (force_uniform_decode)
        if _eager(self) and kwargs.get("force_uniform_decode") is None:
            num_reqs = kwargs["num_reqs"] if "num_reqs" in kwargs else args[1]
            ib = self.input_batch
            if holds_prompt_step(ib.num_computed_tokens_cpu, ib.num_prompt_tokens, num_reqs):
                kwargs["force_uniform_decode"] = False
        return orig(self, *args, **kwargs)

    _determine_batch_execution_and_padding.__kvcomp_wrapped__ = True
    runner_cls._determine_batch_execution_and_padding = _determine_batch_execution_and_padding


# (runner, scheduler output) of the Model Runner V2 step being executed
_V2_STEP: contextvars.ContextVar = contextvars.ContextVar("kvcomp_v2_step", default=None)


def v2_holds_prompt_step(runner, scheduler_output) -> bool:
    """``holds_prompt_step`` for a Model Runner V2 step: its scheduled
    requests' computed tokens against their prompts, from the request
    states the step has updated (requests the runner does not hold, as in
    dummy runs, count as decoding)."""
    states = runner.req_states
    rows = [states.req_id_to_index[r] for r in scheduler_output.num_scheduled_tokens
            if r in states.req_id_to_index]
    return holds_prompt_step(states.num_computed_tokens_np[rows],
                             states.prompt_len.np[rows], len(rows))


def _wrap_v2(module) -> None:
    orig_execute = module.GPUModelRunner.execute_model
    orig_uniform = module.get_uniform_token_count

    @functools.wraps(orig_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        token = _V2_STEP.set((self, scheduler_output) if _eager(self) else None)
        try:
            return orig_execute(self, scheduler_output, *args, **kwargs)
        finally:
            _V2_STEP.reset(token)

    @functools.wraps(orig_uniform)
    def get_uniform_token_count(*args, **kwargs):
        got = orig_uniform(*args, **kwargs)
        step = _V2_STEP.get()
        if got is not None and step is not None and v2_holds_prompt_step(*step):
            return None
        return got

    execute_model.__kvcomp_wrapped__ = get_uniform_token_count.__kvcomp_wrapped__ = True
    module.GPUModelRunner.execute_model = execute_model
    module.get_uniform_token_count = get_uniform_token_count


def apply() -> None:
    """Installs the wrappers, once. Each runner asks when it first steps
    whether its engine's eviction steps are captured (``_eager``), so the
    answer is the engine's own at its start-up, whatever the environment
    held when the plugin loaded."""
    global _APPLIED
    if _APPLIED:
        return
    try:
        from vllm.v1.worker import gpu_model_runner
    except ImportError:  # a build without the GPU model runner has nothing to wrap
        _APPLIED = True
        return

    if not getattr(gpu_model_runner.GPUModelRunner._determine_batch_execution_and_padding,
                   "__kvcomp_wrapped__", False):
        _wrap(gpu_model_runner.GPUModelRunner)
    try:
        from vllm.v1.worker.gpu import model_runner as v2
    except ImportError:  # a build without Model Runner V2
        v2 = None
    if v2 is not None and not getattr(v2.GPUModelRunner.execute_model, "__kvcomp_wrapped__",
                                      False):
        _wrap_v2(v2)
    _APPLIED = True

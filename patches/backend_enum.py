"""Adds the ``KVCOMP`` member to ``AttentionBackendEnum``.

vLLM 0.26 has no ``AttentionBackendEnum.register`` (``register_backend`` only
re-points existing members), yet ``--attention-backend kvcomp`` and
``Attention.__init__`` (``AttentionBackendEnum[backend.get_name()]``) need a
real member. The member pickles through ``vllm_kvcomp.resolve_backend_member``
so that spawned engine/worker processes, which unpickle the config before they
load plugins, re-create it first.
"""

from __future__ import annotations

from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

BACKEND_PATH = "vllm_kvcomp.backend.KvcompBackend"
MEMBER = "KVCOMP"
# Upstream members enumerated when this patch was written: a new or renamed
# member (e.g. an upstream KVCOMP) fails tests/test_patches.py.
EXPECTED_UPSTREAM_HAS_CUSTOM = True


def _reduce(proto):  # noqa: ARG001
    import vllm_kvcomp

    return (vllm_kvcomp.resolve_backend_member, (MEMBER,))


def apply() -> AttentionBackendEnum:
    E = AttentionBackendEnum
    member = E._member_map_.get(MEMBER)
    if member is None:
        member = object.__new__(E)
        member._name_ = MEMBER
        member._value_ = BACKEND_PATH
        member._sort_order_ = len(E._member_names_)
        member.__reduce_ex__ = _reduce
        type.__setattr__(E, MEMBER, member)
        E._member_map_[MEMBER] = member
        E._member_names_.append(MEMBER)
        E._value2member_map_[BACKEND_PATH] = member
    register_backend(member, BACKEND_PATH)
    return member

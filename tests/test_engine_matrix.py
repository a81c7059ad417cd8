"""The engine matrix's rows say what they compare: every pair that must serve the same tokens
names two rows that exist, and the eviction rows it serves captured beside their eager
twins (``EAGER_BY_DEFAULT``) are those whose decode steps the backend runs eagerly by
default, so a setting that joins ``eviction_gpu.captured_by_default`` leaves that list and
gets a captured row of its own compared with an eager one."""
import sys
from pathlib import Path

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.eviction_gpu import graph_eviction, selects_on_host

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import engine_matrix  # noqa: E402

ROWS = {name: kvcomp for name, _, _, kvcomp in engine_matrix.SETTINGS}


def _config(kvcomp: dict) -> KvcompConfig:
    settings = {k: v for k, v in kvcomp.items() if not k.startswith("_")}
    if isinstance(settings.get("head_map"), dict):  # the matrix writes it to a file
        settings["head_map"] = "map.json"
    return KvcompConfig(**settings)


def test_same_token_pairs_name_rows_that_exist():
    for row, twin in engine_matrix.SAME_TOKENS.items():
        assert row in ROWS and twin in ROWS, (row, twin)
        assert ROWS[row].get("_late_one_token") == ROWS[twin].get("_late_one_token")


def test_eager_by_default_rows_are_the_eager_eviction_settings():
    eager_by_default = set()
    for name, kvcomp in ROWS.items():
        cfg = _config(kvcomp)
        if selects_on_host(cfg) and "_env" not in kvcomp and \
                not graph_eviction(cfg, None, environ={}):
            eager_by_default.add(name)
    assert eager_by_default == set(engine_matrix.EAGER_BY_DEFAULT)
    for name in engine_matrix.EAGER_BY_DEFAULT:
        captured = ROWS[name + "_graphs"]
        assert graph_eviction(_config(captured), None, environ=captured["_env"])
        assert engine_matrix.SAME_TOKENS[name + "_graphs"] == name
    # the default-captured H2O row is compared with an eager one
    assert graph_eviction(_config(ROWS["k4v4_h2o"]), None, environ={})
    eager = ROWS[engine_matrix.SAME_TOKENS["k4v4_h2o"]]
    assert not graph_eviction(_config(eager), None, environ=eager["_env"])

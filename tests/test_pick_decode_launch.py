"""The serving decode launch picked from sweep results (benchmarks/pick_decode_launch.py):
a launch replaces the default only where it is faster at every shape."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "pick_decode_launch", Path(__file__).parents[1] / "benchmarks" / "pick_decode_launch.py")
pdl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pdl)


def _row(batch, us, heuristic=True, config="k4v4", **kw):
    launch = dict(pdl.DEFAULT)
    launch.update(kw)
    return dict(config=config, batch=batch, context=1024, us=us,
                heuristic_splits=heuristic, **launch)


def test_faster_at_every_shape_wins():
    rows = [_row(1, 100.0), _row(2, 200.0),
            _row(1, 90.0, warp_tiles=4, num_warps=4), _row(2, 180.0, warp_tiles=4, num_warps=4),
            _row(1, 80.0, num_stages=3), _row(2, 199.0, num_stages=3)]  # 2nd shape: < 2 % gain
    launch, _ = pdl.pick(rows, "k4v4")
    assert launch == {"block_n": 128, "num_warps": 4, "num_stages": 2, "warp_tiles": 4}


def test_slower_at_one_shape_keeps_the_default():
    rows = [_row(1, 100.0), _row(2, 200.0),
            _row(1, 50.0, num_warps=4), _row(2, 210.0, num_warps=4)]
    assert pdl.pick(rows, "k4v4")[0] is None


def test_forced_splits_elem_bits_and_other_configs_do_not_count():
    rows = [_row(1, 100.0), _row(2, 200.0),
            _row(1, 10.0, heuristic=False), _row(2, 10.0, heuristic=False),
            _row(1, 10.0, elem_bits=8), _row(2, 10.0, elem_bits=8),
            _row(1, 10.0, config="k2v2", num_warps=4), _row(2, 10.0, config="k2v2", num_warps=4)]
    assert pdl.pick(rows, "k4v4")[0] is None


def test_untimed_default_is_reported():
    launch, lines = pdl.pick([_row(1, 90.0, num_warps=4)], "k4v4")
    assert launch is None and "not timed" in lines[0]


def test_rows_of_older_sweeps_without_warp_tiles_ran_the_shared_tile():
    old = {k: v for k, v in pdl.DEFAULT.items() if k != "warp_tiles"}
    assert dict(pdl.launch_of(dict(old, us=1.0)))["warp_tiles"] == 1


def test_default_is_the_kernels():
    from vllm_kvcomp.kernels.decode_launch import DEFAULT_LAUNCH

    assert pdl.DEFAULT == DEFAULT_LAUNCH

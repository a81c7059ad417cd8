"""The checkout's ``kernels/`` folder is the package ``vllm_kvcomp.kernels``;
run from the checkout's root it must not hide Hugging Face's ``kernels``
package (imported by transformers when installed)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _import_kernels_from_root(extra_path=None):
    # The checkout's root comes first on sys.path, as ``python -m`` puts it.
    code = (
        "import sys; sys.path.insert(0, %r)\n" % str(ROOT)
        + ("sys.path.append(%r)\n" % str(extra_path) if extra_path else "")
        + "import kernels, vllm_kvcomp.kernels as ours\n"
        "print(getattr(kernels, '__version__', 'none'))\n"
        "print(ours.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_hub_package_wins_the_top_level_name(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '9.9.9'\n")
    version, ours = _import_kernels_from_root(tmp_path)
    assert version == "9.9.9"
    assert ours == "vllm_kvcomp.kernels"


def test_without_hub_package_the_name_carries_no_version():
    version, ours = _import_kernels_from_root()
    assert version == "none"
    assert ours == "vllm_kvcomp.kernels"

"""Only here to place ``vllm_kvcomp_early.pth`` at the top of site-packages
(pyproject metadata cannot); see ``vllm_kvcomp/_early.py`` for why."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "vllm_kvcomp_early.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


setup(cmdclass={"build_py": build_py_with_pth})

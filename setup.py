"""Builds hivemind_backend and its extension hivemind_backend._C by driving CMake (Ninja).

Install with `pip install --no-build-isolation .` or `pip install --no-build-isolation -e .`:
the extension must compile against the torch that is already installed (see docs/building.md).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = (ROOT / "VERSION").read_text().strip()


class CMakeExtension(Extension):
    """An extension whose sources and flags live in CMakeLists.txt, not here."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # torch loads every `torch.backends` entry point on import, ours included: an earlier
        # install whose tree is gone would make `import torch` fail here, and block the reinstall
        # that repairs it.
        os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
        try:
            import torch.utils
        except ImportError as error:
            raise RuntimeError(
                "hivemind_backend builds against the installed torch: install torch==2.13.0 first "
                "(`make setup`) and build with `pip install --no-build-isolation`"
            ) from error

        build_dir = ROOT / "build" / "py"
        build_type = os.environ.get("HIVEMIND_BUILD_TYPE", "RelWithDebInfo")
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        subprocess.check_call(
            [
                "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                f"-DCMAKE_BUILD_TYPE={build_type}",
                "-DHIVEMIND_BUILD_TORCH=ON",
                "-DHIVEMIND_BUILD_TESTS=OFF",
                "-DHIVEMIND_SANITIZE=OFF",
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            ]
        )
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])

        # CMake names the module like setuptools does (_C + EXT_SUFFIX); copy it where setuptools
        # expects it: build/lib.* for a wheel, the source tree for an editable install.
        target = Path(self.get_ext_fullpath(ext.name))
        built = build_dir / "hivemind_backend" / target.name
        if not built.is_file():
            raise RuntimeError(f"CMake did not produce {built}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


setup(
    name="hivemind_backend",
    version=VERSION,
    description="Decentralized deep learning as a PyTorch c10d backend (C++ over ZeroMQ)",
    packages=find_packages(include=["hivemind_backend", "hivemind_backend.*"]),
    py_modules=["hivemind_backend_autoload"],
    ext_modules=[CMakeExtension("hivemind_backend._C")],
    cmdclass={"build_ext": CMakeBuild},
    # Keep setuptools' own build/lib.*, build/bdist.* out of the CMake tree build/.
    options={"build": {"build_base": "build/setuptools"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.5"],
    zip_safe=False,
    entry_points={
        "console_scripts": ["hivemind-dht = hivemind_backend.cli.run_dht:main"],
        # `import torch` (>= 2.5) loads this, so backend="hivemind" needs no import.
        "torch.backends": ["hivemind = hivemind_backend_autoload:register"],
    },
)

"""The package and its extension load next to torch, with Debian's protobuf, libzmq and libsodium."""

import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hivemind_backend
from hivemind_backend import _C

ROOT = Path(__file__).resolve().parents[2]


def pkg_config_version(module: str) -> str:
    """Version of a library as the build found it (Debian's package, through pkg-config)."""
    return subprocess.run(
        ["pkg-config", "--modversion", module], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_extension_is_part_of_the_package():
    assert Path(_C.__file__).parent == Path(hivemind_backend.__file__).parent


def test_version_comes_from_version_file():
    expected = (ROOT / "VERSION").read_text().strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", expected)
    assert hivemind_backend.__version__ == expected
    assert _C.version() == expected
    assert importlib.metadata.version("hivemind_backend") == expected


def test_native_libraries_are_debians():
    assert _C.protobuf_version() == pkg_config_version("protobuf")
    assert _C.zmq_version() == pkg_config_version("libzmq")
    assert _C.sodium_version() == pkg_config_version("libsodium")


def test_not_compiled_against_torchs_bundled_protobuf_headers():
    # torch 2.13 (pinned by `make setup`) ships protobuf 3.13 headers that would shadow Debian's.
    header = Path(torch.__file__).parent / "include/google/protobuf/stubs/common.h"
    assert header.is_file(), f"expected torch's bundled protobuf headers at {header}"
    number = int(re.search(r"#define GOOGLE_PROTOBUF_VERSION (\d+)", header.read_text())[1])
    torch_protobuf = f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
    assert _C.protobuf_version() != torch_protobuf


# Runs in a fresh interpreter: which of torch or hivemind_backend is imported first matters to the
# dynamic loader, and a process group is global state.
CHECK_SCRIPT = """
import {first}
import {second}
import torch
import torch.distributed as dist
import hivemind_backend
from hivemind_backend import _C

a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
assert torch.equal(a @ a.T, torch.tensor([[5.0, 14.0], [14.0, 50.0]]))
assert dist.is_available()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = torch.ones(4)
dist.all_reduce(t)
assert torch.equal(t, torch.ones(4))
dist.destroy_process_group()
print(hivemind_backend.__version__, _C.protobuf_version(), _C.zmq_version())
"""


@pytest.mark.parametrize(
    "first,second", [("torch", "hivemind_backend"), ("hivemind_backend", "torch")]
)
def test_torch_works_next_to_the_extension(first, second, tmp_path):
    script = textwrap.dedent(CHECK_SCRIPT.format(first=first, second=second))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        hivemind_backend.__version__,
        _C.protobuf_version(),
        _C.zmq_version(),
    ]

"""Speculative decoding runs wherever the models are: every tensor the decoding code creates names its device
(a tensor made on the CPU and compared with the target's logits on a GPU crashes every CUDA replica in its warm-up).
Checked statically with ``ast`` over ``fastdraft_ray/specdec/``; the CUDA run itself is ``-m gpu``
(tests/specdec/test_cuda.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SPECDEC = Path(__file__).resolve().parents[2] / "fastdraft_ray" / "specdec"
FACTORIES = {"tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm", "zeros", "ones", "empty"}
FACTORIES |= {"full", "linspace", "eye"}


def deviceless_tensors(path: Path) -> list[str]:
    """``file:line torch.<factory>`` for each tensor factory call in ``path`` without a ``device=`` argument."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
            and node.func.attr in FACTORIES
            and not any(k.arg == "device" for k in node.keywords)
        ):
            found.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    return found


def test_every_tensor_the_decoding_code_makes_names_its_device():
    assert [hit for path in sorted(SPECDEC.rglob("*.py")) for hit in deviceless_tensors(path)] == []


def test_a_deviceless_tensor_is_caught(tmp_path):
    module = tmp_path / "decode.py"
    module.write_text(
        "import torch\n"
        "def step(logits, drafted, g, gen):\n"
        "    ok = torch.tensor(drafted, device=logits.device)\n"
        "    bad = torch.tensor(drafted, dtype=torch.long)\n"
        "    u = torch.rand(g, generator=gen)\n"
        "    return torch.zeros_like(logits)\n"
    )
    assert deviceless_tensors(module) == ["decode.py:4 torch.tensor", "decode.py:5 torch.rand"]

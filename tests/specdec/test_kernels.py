"""The small-batch linear kernel: equal to torch's linear up to rounding, batch-invariant bit for bit, used only
where it should be (<= 8 fp32 rows outside autograd), and lossless in speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from fastdraft_ray.config import DecodeConfig
from fastdraft_ray.specdec import kernels as K
from fastdraft_ray.specdec import precision as P
from fastdraft_ray.specdec.decode import autoregressive_generate, speculative_generate
from fastdraft_ray.specdec.engine import SpecDecoder
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not K.cpu_supports_kernel(), reason="needs an x86-64 CPU with AVX2 and FMA")


@pytest.fixture(scope="module")
def op():
    kernel = K.small_batch_linear_op()
    assert kernel is not None, "the kernel must build on a CPU that supports it"
    return kernel


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config("llama", **overrides)).eval()


@pytest.mark.parametrize("in_features", [8, 67, 576])
@pytest.mark.parametrize("out_features", [1, 5, 300])
def test_matches_torch_linear(op, in_features, out_features):
    g = torch.Generator().manual_seed(in_features * out_features)
    w = torch.randn(out_features, in_features, generator=g)
    for rows in (1, 2, 3, 4, 7, 8, 9, 13):
        x = torch.randn(rows, in_features, generator=g)
        torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_non_contiguous_inputs(op):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 3, generator=g).t(), torch.randn(64, 40, generator=g).t()
    torch.testing.assert_close(op(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_batch_invariant_bit_for_bit(op):
    """A row's outputs do not depend on the other rows, the row count or the thread split."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 576, generator=g)
    x = torch.randn(12, 576, generator=g)
    alone = torch.cat([op(x[i : i + 1], w) for i in range(12)])
    for rows in range(2, 13):
        assert torch.equal(op(x[:rows], w), alone[:rows]), rows
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(op(x[:4], w), alone[:4])
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_are_refused(op):
    with pytest.raises(RuntimeError, match="expected x of shape"):
        op(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))


def test_switch_keeps_parameters_and_routes_by_rows(op):
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert K.use_small_batch_kernel(model) == n_linear
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert all(isinstance(m, nn.Linear) for m in model.modules() if isinstance(m, K.SmallBatchLinear))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(1, 9, layer.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))  # 9 rows: torch's GEMM
        assert torch.equal(layer(x[:, :4]), op(x[0, :4], layer.weight).view(1, 4, -1))  # 4 rows: the kernel
    # training: autograd goes through torch's linear, gradients as nn.Linear's
    x.requires_grad_(True)
    layer(x[:, :2]).sum().backward()
    torch.testing.assert_close(x.grad[0, 0], layer.weight.sum(0))

    K.use_torch_linear(model)
    assert not K.uses_small_batch_kernel(model)


def test_prepare_for_inference_uses_it_on_request_and_int8_still_quantises():
    model = _llama()
    assert not K.uses_small_batch_kernel(P.prepare_for_inference(model, "fp32"))
    assert K.uses_small_batch_kernel(P.prepare_for_inference(model, "fp32", linear_kernel="auto"))
    q = P.prepare_for_inference(model, "int8", linear_kernel="auto")
    assert P.is_quantized(q) and not any(type(m) in (nn.Linear, K.SmallBatchLinear) for m in q.modules())
    with pytest.raises(P.PrecisionError, match="linear_kernel 'fast' is not one of auto, torch"):
        P.prepare_for_inference(model, "fp32", linear_kernel="fast")


def test_speculative_greedy_equals_target_greedy_on_the_kernel(one_torch_thread):
    target = P.prepare_for_inference(_llama(0), linear_kernel="auto")
    draft = P.prepare_for_inference(_llama(1, num_hidden_layers=1), linear_kernel="auto")
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = autoregressive_generate(target, ids, max_new_tokens=40).tokens
    for gamma in (1, 3, 7):
        assert speculative_generate(target, draft, ids, gamma=gamma, max_new_tokens=40).tokens == ref


def test_engine_default_is_auto_and_torch_turns_it_off():
    assert DecodeConfig().linear_kernel == "auto"
    on = SpecDecoder(P.prepare_for_inference(_llama(0), linear_kernel="auto"), None, DecodeConfig())
    draft = _llama(1)
    assert K.uses_small_batch_kernel(on.with_draft(draft).draft)
    off = SpecDecoder(_llama(0), None, DecodeConfig(linear_kernel="torch"))
    assert not K.uses_small_batch_kernel(off.with_draft(_llama(1)).draft)

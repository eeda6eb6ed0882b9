"""Helpers of the GPU checks (``pytest -m gpu``, ``scripts/gpu_check.sh``): random-initialised models of real sizes
(nothing larger than the repository travels to the GPU machine), and one ``GPU-CHECK`` line per check with its
figure, appended to ``$GPU_CHECK_OUT`` when set (the script's report)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Real shapes (their config.json), random weights
LLAMA_32_1B = dict(
    vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500_000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
LLAMA_31_8B = dict(
    LLAMA_32_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False
)
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM (the MFU denominator)


def report(name: str, ok: bool, figure: str) -> None:
    """One line per check: ``GPU-CHECK <name>: pass|fail <figure>`` (stdout, and ``$GPU_CHECK_OUT``)."""
    line = f"GPU-CHECK {name}: {'pass' if ok else 'fail'} {figure}"
    print(line, flush=True)
    if os.environ.get("GPU_CHECK_OUT"):
        with open(os.environ["GPU_CHECK_OUT"], "a") as fh:
            fh.write(json.dumps({"check": name, "ok": ok, "figure": figure}) + "\n")


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` entries (``<pad>``, ``<s>``, ``</s>``, then ``w3`` ... ): prompts of
    those words tokenize one id per word, at any vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    )


def random_model(shape: dict, dtype: torch.dtype = torch.float32, device: str = "cuda", seed: int = 0):
    """A Llama of ``shape`` with random weights, built on ``device`` (fast on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
    return model.eval()


def save_target(out: Path, shape: dict, dtype: torch.dtype = torch.bfloat16, weights: bool = True) -> Path:
    """A target folder of ``shape``: config, the word tokenizer and (``weights``) random weights."""
    from transformers import LlamaConfig

    word_tokenizer(shape["vocab_size"]).save_pretrained(out)
    if weights:
        random_model(shape, dtype).save_pretrained(out)
    else:
        LlamaConfig(**shape).save_pretrained(out)
    return out

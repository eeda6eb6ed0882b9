"""``CachedRunner``: one model with its ``transformers.DynamicCache``, fed new tokens and cropped on rejection.

The one forward call every decoding path (speculative, target-only) and every latency measurement uses.
"""

from __future__ import annotations

import inspect
import time

import torch
from transformers import DynamicCache, PreTrainedModel


class CachedRunner:
    """One model with its KV cache: a forward call that appends to the cache and returns the last k logits.

    ``rollback=True`` (speculative decoding) checks after the first forward that the cache can be cropped and
    makes sliding-window layers keep their states until the next ``crop``.
    """

    def __init__(self, model: PreTrainedModel, rollback: bool = True):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self.cache = DynamicCache(config=model.config)
        self.device = next(model.parameters()).device
        self.checked = not rollback
        self.forwards = 0
        self.seconds = 0.0

    def __call__(self, ids: list[int] | torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Feed ``ids`` (1-D) after the cached positions; return the logits of the last ``keep`` positions."""
        t0 = time.perf_counter()
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        if self.keep_logits:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids, **kwargs).logits[0, -keep:]
        if not self.checked:  # layers only know whether they can roll back once they hold something
            self.checked = True
            if not self.cache.is_croppable:
                raise ValueError(
                    f"{type(self.model).__name__} keeps a cache that cannot be rolled back (recurrent/linear "
                    "attention layers): speculative decoding needs to crop rejected positions"
                )
            self.cache.activate_past_recording()  # sliding-window layers keep states until the next crop
        self.forwards += 1
        self.seconds += time.perf_counter() - t0
        return logits

    def crop(self, n: int) -> None:
        """Drop the last ``n`` >= 0 cached positions (``crop(0)`` also trims sliding-window layers).
        transformers 5.x: ``DynamicCache.crop`` takes a NEGATIVE count."""
        self.cache.crop(-n)

"""The latency model: what a draft shape costs on the device it will run on, measured, not assumed.

A ``DeviceProfile`` holds the target's decode step and verify-cost curve v(k) (``stats.measure_verify_cost``)
and, per architecture, the draft's decode step (``stats.measure_step_latency`` of a randomly initialised draft
of that shape: latency does not depend on the weights), all at one (device, precision, threads, context). It is
saved as ``profile.json``; a search can price drafts with a profile measured elsewhere (``search.device_profile``:
profile a laptop, search on a cluster). ``speedup_model`` turns a profile entry into ``stats.SpeedupModel``:
S = tau(alpha_tok, gamma) / (gamma c + v(gamma + 1)) at the best gamma.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fastdraft_ray.search.space import Architecture
from fastdraft_ray.specdec.precision import prepare_for_inference
from fastdraft_ray.specdec.stats import SpeedupModel, measure_step_latency, measure_verify_cost

MAX_K = 9  # verify curve points: gamma up to 8


@dataclass
class DeviceProfile:
    """Measured latencies of the target and of draft shapes on one device at one thread count."""

    target: str
    device: str
    precision: str
    threads: int
    context: int
    target_step_s: float
    verify_cost: list[float]
    drafts: dict[str, float] = field(default_factory=dict)  # Architecture.name -> draft decode step seconds
    machine: str = ""
    linear_kernel: str = "torch"  # decode.linear_kernel the latencies were measured with (older profiles: torch)

    @property
    def key(self) -> str:
        return f"{self.device}-{self.precision}-{self.linear_kernel}-t{self.threads}-ctx{self.context}"

    def save(self, path: Path) -> Path:
        """Write as JSON (beside, then renamed: a crash leaves no half file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path} is not a device profile written by the search ({exc})") from None

    def speedup_model(self, arch: Architecture, max_gamma: int = 8) -> SpeedupModel:
        """c = this shape's draft step / the target step, with the target's verify curve."""
        if arch.name not in self.drafts:
            raise KeyError(f"{arch.name} has no measured latency in the {self.key} profile")
        return SpeedupModel(self.drafts[arch.name] / self.target_step_s, tuple(self.verify_cost), max_gamma)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _context_ids(vocab_size: int, context: int) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, min(vocab_size, 32000), (1, context), generator=generator)


def measure_target(
    target,
    name: str,
    precision: str,
    threads: int,
    context: int = 128,
    repeats: int = 7,
    linear_kernel: str = "torch",
) -> DeviceProfile:
    """A profile holding the target's decode step and verify curve v(1..MAX_K) on its device, with the target
    prepared (in place) as decoding prepares it: ``precision`` and ``linear_kernel``."""
    target = prepare_for_inference(target, precision, inplace=True, linear_kernel=linear_kernel)
    device = next(target.parameters()).device
    with torch_threads(threads):
        verify, step_s = measure_verify_cost(
            target, _context_ids(target.config.vocab_size, context).to(device), MAX_K, repeats
        )
    machine = (
        f"{platform.processor() or platform.machine()}; {os.cpu_count()} logical cores; torch {torch.__version__}"
    )
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}; {machine}"
    return DeviceProfile(
        name,
        device.type,
        precision,
        threads,
        context,
        step_s,
        list(verify),
        machine=machine,
        linear_kernel=linear_kernel,
    )


def profile_target(
    model, device: str, precision: str, threads: int, context: int, repeats: int, linear_kernel: str
) -> DeviceProfile:
    """Load the target (``ModelConfig``) on ``device`` and measure it (``measure_target``): the search runs this as
    a Ray task holding that device, so a 7-8B target is never loaded in the job's driver."""
    from fastdraft_ray.models.target import load_target

    torch.set_num_threads(max(1, threads))
    target, _ = load_target(model.target, model.dtype, device=device, trust_remote_code=model.trust_remote_code)
    return measure_target(target, model.target, precision, threads, context, repeats, linear_kernel)


def measure_drafts(archs: list[Architecture], target_config, profile: DeviceProfile, repeats: int = 7) -> dict:
    """``{name: decode-step seconds}`` of each architecture (``measure_draft``, kept in ``profile.drafts``) on the
    profile's device: in this process for a CPU profile, in one Ray task holding a GPU for a cuda one."""
    todo = list({a.name: a for a in archs if a.name not in profile.drafts}.values())
    if todo and profile.device == "cuda":
        import ray

        task = ray.remote(num_gpus=1)(_measure_all)
        profile.drafts.update(ray.get(task.remote(todo, target_config, profile, repeats)))
    for arch in todo:
        measure_draft(arch, target_config, profile, repeats)  # CPU: here (cuda: already in profile.drafts)
    return {a.name: profile.drafts[a.name] for a in archs}


def _measure_all(archs: list[Architecture], target_config, profile: DeviceProfile, repeats: int) -> dict:
    return {a.name: measure_draft(a, target_config, profile, repeats) for a in archs}


def measure_draft(arch: Architecture, target_config, profile: DeviceProfile, repeats: int = 7) -> float:
    """Decode-step seconds of a random-weight draft of ``arch`` at the profile's threads and context (stored in
    ``profile.drafts``; a shape already there is not measured again)."""
    if arch.name in profile.drafts:
        return profile.drafts[arch.name]
    from fastdraft_ray.models.draft import build_draft, derive_draft_config
    from fastdraft_ray.models.trimmed_head import trimmed_head

    shape = arch.draft_config()
    if arch.init == "layers":  # the target's widths; the weights do not change the latency
        shape = replace(shape, init="random", init_layers=[])
    draft = build_draft(derive_draft_config(target_config, shape))
    head = trimmed_head(draft)
    if head is not None:
        head.set_kept_ids(torch.arange(arch.head_vocab))
    draft = prepare_for_inference(
        draft.to(profile.device), profile.precision, inplace=True, linear_kernel=profile.linear_kernel
    )
    with torch_threads(profile.threads):
        seconds = measure_step_latency(
            draft, _context_ids(target_config.vocab_size, profile.context).to(profile.device), 1, repeats
        )
    profile.drafts[arch.name] = seconds
    return seconds

"""Engine benchmark: plain forward vs MONAI save_attn + full-matrix rollout vs ``explain`` (raw, rollout, grad_rollout).

Variants (batch 1, eval mode):
- ``forward``: the model's forward under ``torch.no_grad`` as built (MONAI default: no flash attention).
- ``forward_flash``: the same with ``use_flash_attention=True`` (``F.scaled_dot_product_attention``),
  the fastest plain forward; ``explain`` must switch it off because it never forms the attention matrix.
- ``save_attn``: MONAI save_attn + full-matrix rollout (the usual way, e.g. MONAI's tutorials): ``save_attn=True``
  (MONAI keeps every block's detached ``(B, heads, N, N)`` in ``att_mat``), numpy mean over heads, then rollout
  with full ``N x N`` matrix products (``R <- rownorm(0.5 A + 0.5 I) @ R`` over the blocks, then the CLS row).
- ``raw`` / ``rollout`` / ``grad_rollout``: ``AttentionMapLib.explain(model, x, method)``.
- references (timed only): ``backward_to_input``: forward with autograd + backward of the predicted
  class's logit to the input, nothing else; ``backward_to_attention``: the same, but the backward
  stops at the attention matrices (``torch.autograd.grad(score, attentions)``), the least any
  gradient-based attention method must do.

Times come from one process per configuration with the variants interleaved (round robin, after one
warm-up forward); on CPU the compared time is the process's CPU time (one thread), which the other jobs
of a shared machine do not inflate as they do the wall time (reported beside it). Memory comes from one
fresh process per variant and configuration (see ``measure``).
"""
from __future__ import annotations

import argparse
import gc
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np

from benchmarks import measure

VARIANTS = ("forward", "forward_flash", "save_attn", "raw", "rollout", "grad_rollout")
# Timed only, to see where grad_rollout's time goes: a forward with autograd plus a backward from the
# predicted class's logit either to the input (what the engine does) or only down to the attention matrices.
REFERENCES = ("backward_to_input", "backward_to_attention")
CLOCKS = {"cpu": "CPU seconds of the process", "cuda": "wall seconds, CUDA synchronised"}
VIT_B = {"hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12}
CONFIGS: List[Dict[str, Any]] = [
    {"name": "ViT-B 96³ / p16", "img_size": 96, "patch_size": 16, **VIT_B},
    {"name": "ViT-B 128³ / p16", "img_size": 128, "patch_size": 16, **VIT_B},
    {"name": "ViT-B 96³ / p8", "img_size": 96, "patch_size": 8, **VIT_B},
    {"name": "demo model", "demo": True},
]
QUICK_CONFIGS: List[Dict[str, Any]] = [
    {
        "name": "tiny 32³ / p8",
        "img_size": 32,
        "patch_size": 8,
        "hidden_size": 64,
        "mlp_dim": 128,
        "num_layers": 2,
        "num_heads": 4,
    },
    {"name": "demo model", "demo": True},
]


def build(config: Dict[str, Any], device: str):
    """(model, x (1, C, *img_size)) for a configuration; the demo model comes from its model card."""
    import torch

    torch.manual_seed(0)
    if config.get("demo"):
        from AttentionMapLib.models import load_model

        loaded = load_model(config.get("model", "demo"), device=device)
        model, img_size = loaded.network, tuple(loaded.img_size)
        channels = int(loaded.card["network"]["args"].get("in_channels", 1))
    else:
        from monai.networks.nets import ViT

        img_size = (int(config["img_size"]),) * 3
        channels = 1
        model = ViT(in_channels=channels, img_size=img_size, patch_size=int(config["patch_size"]),
                    hidden_size=config["hidden_size"], mlp_dim=config["mlp_dim"], num_layers=config["num_layers"],
                    num_heads=config["num_heads"], classification=True, num_classes=2, post_activation=None)
    model = model.to(device).eval()
    x = torch.rand((1, channels) + img_size, device=device)
    return model, x


def describe(model, x) -> Dict[str, Any]:
    from AttentionMapLib.core.engine import model_spec

    spec = model_spec(model, input_size=tuple(x.shape[2:]))
    return {"tokens": spec.num_patches + int(spec.has_cls), "patches": spec.num_patches, "layers": spec.num_layers,
            "heads": spec.num_heads, "parameters": int(sum(p.numel() for p in model.parameters()))}


@contextmanager
def block_flags(model, **flags) -> Iterator[None]:
    """Set SABlock attributes (``save_attn``, ``use_flash_attention``) for one call, as if the model had
    been built with them (MONAI reads both only in ``forward``); restore and drop ``att_mat`` after."""
    from AttentionMapLib.core.capture import attention_blocks

    blocks = attention_blocks(model)
    saved = [{name: getattr(b, name) for name in flags} for b in blocks]
    for block in blocks:
        for name, value in flags.items():
            setattr(block, name, value)
    try:
        yield
    finally:
        for block, values in zip(blocks, saved):
            for name, value in values.items():
                setattr(block, name, value)


def save_attn_rollout(model, x) -> np.ndarray:
    """MONAI save_attn + full-matrix rollout: forward with ``save_attn``, numpy head mean of every block's
    ``att_mat``, full matrix rollout, CLS row without CLS. Returns ``(B, N - 1)``."""
    import torch

    from AttentionMapLib.core.capture import attention_blocks

    with torch.no_grad():
        model(x)
    fused = [block.att_mat.cpu().numpy().mean(axis=1) for block in attention_blocks(model)]
    tokens = fused[0].shape[-1]
    identity = np.eye(tokens, dtype=fused[0].dtype)
    result = np.broadcast_to(identity, fused[0].shape).copy()
    for attention in fused:
        augmented = 0.5 * attention + 0.5 * identity
        augmented /= augmented.sum(axis=-1, keepdims=True)
        result = augmented @ result
    return result[:, 0, 1:]


def make_call(model, x, variant: str) -> Callable[[], Any]:
    from AttentionMapLib import explain

    if variant == "forward":
        return lambda: _no_grad(model, x)
    if variant == "forward_flash":
        def flash():
            with block_flags(model, use_flash_attention=True):
                return _no_grad(model, x)
        return flash
    if variant in REFERENCES:
        return lambda: _backward(model, x, to_attention=variant == "backward_to_attention")
    if variant == "save_attn":
        def save_attn():
            with block_flags(model, save_attn=True, use_flash_attention=False):
                return save_attn_rollout(model, x)
        return save_attn
    return lambda: explain(model, x, method=variant)


def _backward(model, x, to_attention: bool):
    import torch

    from AttentionMapLib.core.capture import hooked_attention
    from AttentionMapLib.core.engine import primary_output

    attentions: List[Any] = []
    with hooked_attention(model, lambda _i, a: attentions.append(a)), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        logits = primary_output(model(leaf))
        score = logits[torch.arange(len(logits)), logits.argmax(dim=1)].sum()
        return torch.autograd.grad(score, attentions if to_attention else [leaf])


def _no_grad(model, x):
    import torch

    with torch.no_grad():
        return model(x)


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def time_worker(config: Dict[str, Any], variants: List[str], repeats: int, device: str) -> Dict[str, Any]:
    """All variants of one configuration in one process, interleaved; plus a correctness check of the
    the save_attn full-matrix rollout against ``explain(..., "rollout")`` on the same input."""
    from AttentionMapLib import explain

    model, x = build(config, device)
    sync = _sync(device)
    calls = {v: make_call(model, x, v) for v in variants}
    measure.timed(calls["forward"], sync)  # warm-up: thread pools, allocator, lazy initialisation
    times: Dict[str, List[float]] = {v: [] for v in variants}  # CPU seconds on CPU, wall seconds on CUDA
    wall: Dict[str, List[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for variant in variants:
            seconds, cpu = measure.timed(calls[variant], sync)
            times[variant].append(cpu if device == "cpu" else seconds)
            wall[variant].append(seconds)
    ours = explain(model, x, method="rollout", normalize="none").grid.reshape(1, -1)
    with block_flags(model, save_attn=True, use_flash_attention=False):
        theirs = save_attn_rollout(model, x)
    return {
        "times": times,
        "wall": wall,
        "clock": CLOCKS[device],
        "rollout_max_abs_diff": float(np.abs(ours - theirs).max()),
        "rollout_max": float(theirs.max()),
        **describe(model, x),
    }


def memory_worker(config: Dict[str, Any], variant: str, device: str,
                  make: Callable[[Any, Any, str], Callable[[], Any]] = make_call) -> Dict[str, Any]:
    """Peak memory above the baseline (model and input built) of one cold call of one variant
    (``make(model, x, variant)`` gives the call)."""
    import torch

    model, x = build(config, device)
    call = make(model, x, variant)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / measure.MIB
        seconds = measure.timed(call, torch.cuda.synchronize)[0]
        peak = torch.cuda.max_memory_allocated() / measure.MIB
        return {"extra_mib": peak - baseline, "cold_seconds": seconds, "method": "torch.cuda.max_memory_allocated"}
    baseline = measure.rss_mib()
    exact = measure.reset_peak_rss()
    seconds = measure.timed(call)[0]
    peak = measure.peak_rss_mib()
    return {"extra_mib": peak - baseline, "cold_seconds": seconds,
            "method": "VmHWM reset" if exact else "VmHWM (not resettable: includes model build)"}


def run_section(configs: List[Dict[str, Any]], repeats: int, threads: int, device: str,
                log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Every configuration: one timing process, then one memory process per variant. One row per
    configuration: ``{"config", "tokens", ..., "variants": {v: {"seconds", "extra_mib"}}, ...}``."""
    script = Path(__file__).resolve()
    rows = []
    for config in configs:
        if config.get("demo") and not card_available(config.get("model", "demo")):
            log(f"skip {config['name']}: no model card {config.get('model', 'demo')!r} in this checkout")
            continue
        log(f"{config['name']} on {device}: timing {len(VARIANTS) + len(REFERENCES)} variants x {repeats} ...")
        timing = measure.run_worker(script, {"kind": "time", "config": config, "variants": list(VARIANTS + REFERENCES),
                                             "repeats": repeats, "device": device}, threads)
        row = {
            "config": config["name"],
            **{k: v for k, v in timing.items() if k not in ("times", "wall")},
            "variants": {},
        }
        for variant in VARIANTS:
            log(f"  memory of {variant} ...")
            memory = measure.run_worker(
                script, {"kind": "memory", "config": config, "variant": variant, "device": device}, threads
            )
            row["memory_method"] = memory["method"]
            row["variants"][variant] = {
                "seconds": measure.median(timing["times"][variant]),
                "all_seconds": timing["times"][variant],
                "wall_seconds": measure.median(timing["wall"][variant]),
                "extra_mib": memory["extra_mib"],
                "cold_seconds": memory["cold_seconds"],
            }
        for reference in REFERENCES:
            row["variants"][reference] = {
                "seconds": measure.median(timing["times"][reference]),
                "all_seconds": timing["times"][reference],
                "wall_seconds": measure.median(timing["wall"][reference]),
            }
        rows.append(row)
    return rows


def card_available(source: str) -> bool:
    from AttentionMapLib.models import DEMO_CARD

    return Path(source).is_file() or (source == "demo" and DEMO_CARD.is_file())


def _worker_main(request: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    if request["kind"] == "time":
        return time_worker(request["config"], request["variants"], int(request["repeats"]), request["device"])
    return memory_worker(request["config"], request["variant"], request["device"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help="internal: run one measurement (JSON request) and print JSON")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker_main(json.loads(args.worker))))
    else:
        parser.error("run benchmarks/run_benchmarks.py; this script is its worker")

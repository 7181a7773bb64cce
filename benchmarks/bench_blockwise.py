"""Block-wise attention benchmark: the full-matrix path against the block-wise path (flash attention on).

    nice -n 5 .venv/bin/python -m benchmarks.bench_blockwise             # all rows; rewrites its BENCHMARKS.md part
    .venv/bin/python -m benchmarks.bench_blockwise --rows memory         # only the 13,824-token memory row (long)
    .venv/bin/python -m benchmarks.bench_blockwise --quick --out /tmp/b  # tiny configurations, to try the script

Variants (batch 1, eval mode, float32): ``forward`` (MONAI default, no flash attention), ``forward_flash``,
``rollout_full`` / ``grad_full`` (``explain(..., attention_path="full")``: flash off, N x N per layer),
``rollout_blockwise`` / ``grad_blockwise`` (``attention_path="blockwise"``: flash on, per-layer block
input, attention recomputed in row slabs). Time: one process per configuration, variants interleaved
(round robin after a warm-up forward); CPU time of one thread on CPU, ``torch.cuda.Event`` time on CUDA.
Memory: one fresh process per variant (see ``measure``), peak above the model and input.
The memory row (13,824 tokens) runs only the flash forward and block-wise rollout, once each.
Results are kept in ``docs/benchmarks_blockwise.json`` (rows run later replace rows of the same name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from benchmarks import bench_engine, measure

SECTION = "blockwise"
VARIANTS = ("forward", "forward_flash", "rollout_full", "rollout_blockwise", "grad_blockwise", "grad_full")
LABELS = {"forward": "plain forward", "forward_flash": "flash forward", "rollout_full": "rollout, full-matrix path",
          "rollout_blockwise": "rollout, block-wise path", "grad_blockwise": "grad_rollout, block-wise path",
          "grad_full": "grad_rollout, full-matrix path"}
VIT_B = bench_engine.VIT_B
ROWS: Dict[str, List[Dict[str, Any]]] = {
    "time": [
        {"name": "ViT-B 96³ / p16", "img_size": 96, "patch_size": 16, **VIT_B, "repeats": 3},
        {"name": "ViT-B 96³ / p8", "img_size": 96, "patch_size": 8, **VIT_B, "repeats": 3},
        # the full grad_rollout would keep 12 x 12 x 4097² floats for autograd (9.7 GB): left out on this shared machine
        {"name": "ViT-B 128³ / p8", "img_size": 128, "patch_size": 8, **VIT_B, "repeats": 1, "skip": ["grad_full"]},
    ],
    "memory": [{"name": "ViT-B 192³ / p8", "img_size": 192, "patch_size": 8, **VIT_B, "memory_only": True,
                "variants": ["forward_flash", "rollout_blockwise"]}],
}
QUICK_ROWS: Dict[str, List[Dict[str, Any]]] = {
    "time": [
        {
            "name": "tiny 40³ / p8",
            "img_size": 40,
            "patch_size": 8,
            "hidden_size": 64,
            "mlp_dim": 128,
            "num_layers": 2,
            "num_heads": 4,
            "repeats": 2,
        }
    ],
    "memory": [
        {
            "name": "tiny 64³ / p8",
            "img_size": 64,
            "patch_size": 8,
            "hidden_size": 64,
            "mlp_dim": 128,
            "num_layers": 2,
            "num_heads": 4,
            "memory_only": True,
            "variants": ["forward_flash", "rollout_blockwise"],
        }
    ],
}
MEMORY_TARGET_TOKENS = 4096
MEMORY_TARGET_FRACTION = 1.0 / 3.0
CUDA_TIME_TARGET = 1.3
MIB = measure.MIB


def make_call(model, x, variant: str) -> Callable[[], Any]:
    from AttentionMapLib import explain

    if variant in ("forward", "forward_flash"):
        return bench_engine.make_call(model, x, variant)
    method, path = variant.split("_")
    method = "rollout" if method == "rollout" else "grad_rollout"
    return lambda: explain(model, x, method=method, normalize="none", attention_path=path)


def _timer(device: str):
    """(start, stop) -> seconds: CPU time of the process on CPU, ``torch.cuda.Event`` time on CUDA."""
    import torch

    if device == "cuda":
        def cuda_timed(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            value = fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1000.0, value
        return cuda_timed

    def cpu_timed(fn):
        cpu = time.process_time()
        value = fn()
        return time.process_time() - cpu, value
    return cpu_timed


def time_worker(config: Dict[str, Any], variants: List[str], repeats: int, device: str) -> Dict[str, Any]:
    """All variants interleaved in one process; the last rollout/grad_rollout grids of both paths compared."""
    model, x = bench_engine.build(config, device)
    timed = _timer(device)
    calls = {v: make_call(model, x, v) for v in variants}
    timed(calls["forward"])  # warm-up
    times: Dict[str, List[float]] = {v: [] for v in variants}
    grids: Dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for variant in variants:
            seconds, value = timed(calls[variant])
            times[variant].append(seconds)
            if variant.startswith(("rollout", "grad")):
                grids[variant] = value.grid
    checks = {}
    for method in ("rollout", "grad"):
        if f"{method}_full" in grids and f"{method}_blockwise" in grids:
            full = grids[f"{method}_full"]
            checks[method] = {"max_abs_diff": float(np.abs(grids[f"{method}_blockwise"] - full).max()),
                              "max_abs": float(np.abs(full).max())}
    return {"times": times, "checks": checks, **bench_engine.describe(model, x)}


def run_rows(
    rows: List[Dict[str, Any]], threads: int, device: str, log: Callable[[str], None] = print
) -> List[Dict[str, Any]]:
    script = Path(__file__).resolve()
    results = []
    for config in rows:
        variants = [v for v in config.get("variants", VARIANTS) if v not in config.get("skip", [])]
        row: Dict[str, Any] = {"config": config["name"], "device": device, "variants": {},
                               "memory_only": bool(config.get("memory_only")), "skipped": config.get("skip", [])}
        if not config.get("memory_only"):
            log(f"{config['name']} on {device}: timing {len(variants)} variants x {config['repeats']} ...")
            timing = measure.run_worker(script, {"kind": "time", "config": config, "variants": variants,
                                                 "repeats": config["repeats"], "device": device}, threads)
            row.update({k: v for k, v in timing.items() if k != "times"})
            for variant in variants:
                row["variants"][variant] = {"seconds": measure.median(timing["times"][variant]),
                                            "all_seconds": timing["times"][variant]}
        for variant in variants:
            log(f"  memory of {variant} ...")
            started = time.perf_counter()
            memory = measure.run_worker(
                script,
                {"kind": "memory", "config": config, "variant": variant, "device": device},
                threads,
                timeout=4 * 3600.0,
            )
            row["memory_method"] = memory["method"]
            row["variants"].setdefault(variant, {}).update(
                {"extra_mib": memory["extra_mib"], "cold_seconds": memory["cold_seconds"],
                 "process_wall_seconds": time.perf_counter() - started})
        if config.get("memory_only"):
            row.update(tokens=(config["img_size"] // config["patch_size"]) ** 3 + 1, layers=config["num_layers"],
                       heads=config["num_heads"])
        row["memory_available_gib"] = _meminfo_gib("MemAvailable")
        results.append(row)
    return results


def _meminfo_gib(key: str) -> Optional[float]:
    """``MemAvailable`` / ``MemTotal`` of ``/proc/meminfo`` in GiB (None where unreadable)."""
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) / 1024.0 ** 2 for line in info if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def full_path_need(tokens: int, heads: int, layers: int) -> Dict[str, float]:
    """Bytes (GiB) the full path's rollout forms, from the shapes: MONAI's non-flash SABlock holds the
    scaled scores and their softmax ``(1, heads, N, N)`` at once (``einsum(...) * scale``, then
    ``softmax``), and the capture keeps one fused ``(1, N, N)`` float32 matrix per finished block."""
    gib = 1024.0 ** 3
    slab = heads * tokens * tokens * 4 / gib
    fused = tokens * tokens * 4 / gib
    return {"per_block_transient_gib": 2 * slab, "fused_per_block_gib": fused,
            "last_block_gib": 2 * slab + (layers - 1) * fused, "fused_total_gib": layers * fused}


# ----------------------------------------------------------------------------------------------- report
def _fmt_time(row: Dict[str, Any], name: str) -> List[str]:
    v = row["variants"]
    m = v.get(name)
    if m is None or "seconds" not in m:
        return [
            LABELS[name],
            "not run",
            "-",
            "-",
            _mem(v, name),
            _beyond(v, name, "forward"),
            _beyond(v, name, "forward_flash"),
        ]
    return [LABELS[name], f"{m['seconds']:.2f}", f"{m['seconds'] / v['forward']['seconds']:.2f}",
            f"{m['seconds'] / v['forward_flash']['seconds']:.2f}", _mem(v, name), _beyond(v, name, "forward"),
            _beyond(v, name, "forward_flash")]


def _mem(v: Dict[str, Any], name: str) -> str:
    return f"{v[name]['extra_mib']:,.0f}" if name in v and "extra_mib" in v[name] else "-"


def _beyond(v: Dict[str, Any], name: str, base: str) -> str:
    if name in ("forward", "forward_flash") or name not in v or "extra_mib" not in v[name] or base not in v:
        return "-"
    return f"{v[name]['extra_mib'] - v[base]['extra_mib']:,.0f}"


def report(results: Dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        "## Block-wise attention: rollout and grad_rollout with flash attention on (issue 12)", "",
        f"Generated by `{command}` (commit {results['commit']}, rows run {', '.join(results['started'])}); machine: "
        f"{m['cpu']}, {m['cores']} cores shared with other jobs, torch {m['torch']}, MONAI {m['monai']}, "
        f"{results['threads']} torch/BLAS thread(s), float32, batch 1, random ViT-B weights. Do not edit by hand.", "",
        "- **full-matrix path** (`attention_path='full'`): flash attention off for the pass, one head-fused N x N "
        "matrix per block (the path of the tables above).",
        "- **block-wise path** (`attention_path='blockwise'`, what `auto` picks for flash-attention models or "
        "beyond a memory budget): flash attention on, each block's input kept (N x 768 floats), Q, K (V) recomputed "
        "at readout and the attention formed in row slabs of at most 64 MiB (`AttentionMapLib/core/blockwise.py`).",
        "- **time**: CPU seconds of the process (one thread), median of the repeats, all variants interleaved in one "
        "process. **memory**: peak resident memory above the model and input of one cold call in a fresh process "
        "(`VmHWM`, see above); *beyond* = minus the plain or the flash forward's peak.", "",
    ]
    for row in [r for r in results["rows"] if not r["memory_only"]]:
        lines += [f"#### {row['config']}: {row['tokens']} tokens, {row['layers']} layers x {row['heads']} heads", "",
                  "| variant | time (s) | x plain forward | x flash forward | peak above baseline (MiB) "
                  "| beyond plain forward (MiB) | beyond flash forward (MiB) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(_fmt_time(row, name)) + " |" for name in VARIANTS]
        repeats = "; ".join(f"{n} " + ", ".join(f"{t:.2f}" for t in row["variants"][n]["all_seconds"])
                            for n in VARIANTS if "all_seconds" in row["variants"].get(n, {}))
        lines += ["", f"All repeats (CPU s): {repeats}."]
        checks = row.get("checks", {})
        lines += ["Same maps: " + "; ".join(f"{k}: block-wise vs full-matrix max |difference| {c['max_abs_diff']:.1e} "
                                           f"(largest value {c['max_abs']:.1e})" for k, c in checks.items()) + "."]
        need = full_path_need(row["tokens"], row["heads"], row["layers"])
        measured = _beyond(row["variants"], "rollout_full", "forward_flash")
        lines += [f"Full-matrix rollout beyond the flash forward, from the shapes (`full_path_need`: scaled scores and "
                  f"softmax of the last block, 2·heads·N²·4 bytes, plus L−1 fused N² float32 matrices): "
                  f"{need['last_block_gib'] * 1024:,.0f} MiB; measured: {measured} MiB."]
        if row.get("skipped"):
            lines += [f"Not run: {', '.join(LABELS[s] for s in row['skipped'])} (its autograd keeps every block's "
                      "heads x N x N attention: about 9.7 GB at 4097 tokens, too much for this shared machine)."]
        lines += [""]
    lines += memory_lines(results) + [""] + target_lines(results)
    return "\n".join(lines)


def memory_lines(results: Dict[str, Any]) -> List[str]:
    rows = [r for r in results["rows"] if r["memory_only"]]
    if not rows:
        return ["Memory row: not run yet (`--rows memory`)."]
    lines = []
    for row in rows:
        v = row["variants"]
        need = full_path_need(row["tokens"], row["heads"], row["layers"])
        flash, ours = v["forward_flash"], v["rollout_blockwise"]
        total = results.get("mem_total_gib")
        lines += [
            f"#### Memory row: {row['config']}, {row['tokens']} tokens ({row['layers']} layers x {row['heads']} heads)",
            "",
            "| variant | peak above baseline (MiB) | beyond flash forward (MiB) | cold call, wall (s) |",
            "|---|---:|---:|---:|",
            f"| {LABELS['forward_flash']} | {flash['extra_mib']:,.0f} | - | {flash['cold_seconds']:.0f} |",
            f"| {LABELS['rollout_blockwise']} | {ours['extra_mib']:,.0f} | "
            f"{ours['extra_mib'] - flash['extra_mib']:,.0f} | "
            f"{ours['cold_seconds']:.0f} |",
            "",
            f"The block-wise rollout completed; the full-matrix path was **not run** at this size (it would push this "
            f"shared {total:.0f} GiB machine into the kernel's out-of-memory killer). Where it runs out, from the "
            f"shapes (`full_path_need` in this script, checked against the measured full-matrix rows above): every "
            f"block's non-flash forward holds the scaled scores and their softmax, "
            f"2 x {need['per_block_transient_gib'] / 2:.1f} GiB = {need['per_block_transient_gib']:.1f} GiB at once, "
            f"and the capture keeps {need['fused_per_block_gib']:.2f} "
            f"GiB per finished block, {need['last_block_gib']:.1f} GiB in the last block. With "
            f"{row['memory_available_gib']:.1f} GiB available when the row ran (of {total:.0f} GiB), "
            + _runs_out(need, row)
            + ".",
        ]
    return lines


def _runs_out(need: Dict[str, float], row: Dict[str, Any]) -> str:
    available = row["memory_available_gib"]
    for block in range(row["layers"]):
        if need["per_block_transient_gib"] + block * need["fused_per_block_gib"] > available:
            needed = need["per_block_transient_gib"] + block * need["fused_per_block_gib"]
            return f"it runs out in block {block}'s attention (needs {needed:.1f} GiB)"
    return "it would fit"


def target_lines(results: Dict[str, Any]) -> List[str]:
    lines = ["### Targets (issue 12)", ""]
    rows = {r["tokens"]: r for r in results["rows"] if not r["memory_only"]}
    big = next((r for t, r in rows.items() if t - 1 == MEMORY_TARGET_TOKENS or t == MEMORY_TARGET_TOKENS), None)
    if big:
        v = big["variants"]
        matrices = big["layers"] * big["tokens"] ** 2 * 4 / MIB
        extra = v["rollout_blockwise"]["extra_mib"] - v["forward_flash"]["extra_mib"]
        verdict = "met" if extra <= MEMORY_TARGET_FRACTION * matrices else "**missed**"
        lines.append(
            f"- memory at {big['tokens']} tokens: block-wise rollout needs {extra:,.0f} MiB beyond the flash "
            f"forward; L·N²·4 bytes = {matrices:,.0f} MiB, a third is {matrices / 3:,.0f} MiB: {verdict} "
            f"(full-matrix rollout: {v['rollout_full']['extra_mib'] - v['forward_flash']['extra_mib']:,.0f} MiB "
            "beyond the flash forward)."
        )
    memory = [r for r in results["rows"] if r["memory_only"]]
    if memory:
        row = memory[0]
        need = full_path_need(row["tokens"], row["heads"], row["layers"])
        lines.append(f"- {row['tokens']} tokens: explained by the block-wise path, peak "
                     f"{row['variants']['rollout_blockwise']['extra_mib'] / 1024:.1f} GiB above the model and input; "
                     f"full-matrix path: {_runs_out(need, row)} (computed, see the memory row).")
    for tokens, row in sorted(rows.items()):
        v = row["variants"]
        flash = v["forward_flash"]["seconds"]
        ours, full = v["rollout_blockwise"]["seconds"], v["rollout_full"]["seconds"]
        verdict = "met" if ours <= full else "**missed**"
        lines.append(
            f"- CPU time at {tokens} tokens: block-wise rollout {ours / flash:.2f}x the flash forward, "
            f"full-matrix rollout {full / flash:.2f}x (block-wise no slower: {verdict}; "
            f"{ours / v['forward']['seconds']:.2f}x vs {full / v['forward']['seconds']:.2f}x the plain forward)."
        )
    lines.append("- CUDA (block-wise rollout ≤ 1.3x the flash forward at 1729 and 4096 tokens): "
                 + ("see the CUDA rows." if results.get("cuda_rows") else
                    "not measured: no GPU on the machine that produced this section (the script times CUDA with "
                    "`torch.cuda.Event` and measures `max_memory_allocated` when one is present)."))
    return lines


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=measure.REPO, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def run(args) -> Dict[str, Any]:
    """Run the chosen rows and merge them into the saved results (rows of the same name replaced)."""
    import torch

    rows_by_kind = QUICK_ROWS if args.quick else ROWS
    path = args.out / ("benchmarks_blockwise_quick.json" if args.quick else "benchmarks_blockwise.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fresh = []
    for kind in (["time", "memory"] if args.rows == "all" else [args.rows]):
        fresh += run_rows(rows_by_kind[kind], args.threads, device)
    saved = (
        json.loads(path.read_text()) if path.exists() else {"rows": [], "started": []}
    )  # read late: rows may run in parallel
    names = {r["config"] for r in fresh}
    rows = [r for r in saved["rows"] if r["config"] not in names] + fresh
    order = [c["name"] for kind in ("time", "memory") for c in rows_by_kind[kind]]
    rows.sort(key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
    results = {
        "machine": measure.machine_description(),
        "commit": _git_commit(),
        "threads": args.threads,
        "rows": rows,
        "started": (saved.get("started", []) + [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())])[-3:],
        "mem_total_gib": _meminfo_gib("MemTotal"),
        "cuda_rows": device == "cuda",
    }
    path.write_text(json.dumps(results, indent=1))
    return results


def _worker_main(request: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if request["kind"] == "time":
        return time_worker(request["config"], request["variants"], int(request["repeats"]), request["device"])
    return bench_engine.memory_worker(request["config"], request["variant"], request["device"], make=make_call)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=measure.REPO / "docs", help="folder holding BENCHMARKS.md")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch/BLAS threads (1 = steady numbers on a shared machine)"
    )
    parser.add_argument("--rows", choices=("all", "time", "memory"), default="all",
                        help="which rows to run (the others are taken from the saved JSON)")
    parser.add_argument("--quick", action="store_true", help="tiny configurations instead of ViT-B, to try the script")
    parser.add_argument("--from-json", action="store_true", help="only rewrite the section from the saved JSON")
    parser.add_argument("--worker", help="internal: run one measurement (JSON request) and print JSON")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker_main(json.loads(args.worker))))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        path = args.out / ("benchmarks_blockwise_quick.json" if args.quick else "benchmarks_blockwise.json")
        results = json.loads(path.read_text())
    else:
        results = run(args)
    command = "python -m benchmarks.bench_blockwise" + (" --quick" if args.quick else "")
    measure.replace_section(args.out / "BENCHMARKS.md", SECTION, report(results, command))
    print(f"wrote the {SECTION} section of {args.out / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Switchyard's host MoE layer against Hugging Face's MoE blocks in PyTorch (issue #14).

For each shape and token count: builds the Hugging Face block with seeded random float32
weights, writes the weights and the tokens once as raw little-endian float32 files plus a JSON
description, times the block's forward and forward + backward (loss = sum(y * g) for a fixed
random g; backward to the input and every weight) for each experts implementation
(`config._experts_implementation`: eager, batched_mm, grouped_mm) on `--threads` threads, then
runs Switchyard's driver (benchmarks/compare/switchyard_compare.cpp) on the same files, compares
the outputs and the gradients, and writes docs/benchmarks/compare-DATE.{json,md}.

Run it through scripts/bench-compare (which owns the virtual environment and builds the driver);
benchmarks/compare/README.md says what it measures, how long it takes and the disk it needs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import transformers

REPO = Path(__file__).resolve().parents[2]

# The issue's shapes. `hf` names the block; d_ff is the per-expert FFN width.
SHAPES = {
    "mixtral-8x7b": dict(family="mixtral", d=4096, d_ff=14336, E=8, k=2, norm_topk_prob=True),
    "qwen3-30b-a3b": dict(family="qwen3_moe", d=2048, d_ff=768, E=128, k=8, norm_topk_prob=True),
    "deepseek-v2-lite": dict(family="deepseek_v2", d=2048, d_ff=1408, E=64, k=6,
                             routed_scaling_factor=1.0),
    "olmoe-1b-7b": dict(family="olmoe", d=2048, d_ff=1024, E=64, k=8, norm_topk_prob=False),
    "switch-base-128": dict(family="switch_transformers", d=768, d_ff=3072, E=128, k=1,
                            norm_topk_prob=False),
    # The issue's table: T = 1024, d = 1024, d_ff = 512, E = 64, k = 8 (a Qwen3-MoE block).
    "issue-14-reference": dict(family="qwen3_moe", d=1024, d_ff=512, E=64, k=8,
                               norm_topk_prob=True, tokens=[1024]),
}
QUICK_SHAPE = {"quick-qwen3": dict(family="qwen3_moe", d=256, d_ff=128, E=16, k=4,
                                   norm_topk_prob=True)}
TOKENS = [1, 16, 256, 4096]
QUICK_TOKENS = [1, 16, 64]
IMPLS = ["eager", "batched_mm", "grouped_mm"]
HF_BLOCK = {
    "mixtral": "MixtralSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "deepseek_v2": "DeepseekV2Moe (routed experts only: the shared experts are not run)",
    "olmoe": "OlmoeSparseMoeBlock",
    "switch_transformers": "SwitchTransformersSparseMLP (eager only: its experts are a "
                           "ModuleDict outside the experts-implementation machinery)",
}
REL_TOL = 1e-4  # float32 agreement: max|Δ| / max|reference| per tensor


def log(*a):
    print(*a, flush=True)


# ---- the Hugging Face blocks -------------------------------------------------------------

def gated(spec):
    return spec["family"] != "switch_transformers"


def make_block(spec, max_tokens):
    """The HF block of the family (float32, train mode without dropout/jitter) and its config."""
    fam, d, F, E, k = spec["family"], spec["d"], spec["d_ff"], spec["E"], spec["k"]
    if fam == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=d, intermediate_size=F, num_local_experts=E,
                            num_experts_per_tok=k, router_jitter_noise=0.0, hidden_act="silu")
        block = MixtralSparseMoeBlock(cfg)
    elif fam == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock
        cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=F, num_experts=E,
                             num_experts_per_tok=k, norm_topk_prob=spec["norm_topk_prob"],
                             hidden_act="silu")
        block = Qwen3MoeSparseMoeBlock(cfg)
    elif fam == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock
        cfg = OlmoeConfig(hidden_size=d, intermediate_size=F, num_experts=E, num_experts_per_tok=k,
                          norm_topk_prob=spec["norm_topk_prob"], hidden_act="silu")
        block = OlmoeSparseMoeBlock(cfg)
    elif fam == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe
        cfg = DeepseekV2Config(hidden_size=d, moe_intermediate_size=F, n_routed_experts=E,
                               num_experts_per_tok=k, n_shared_experts=1, topk_method="greedy",
                               n_group=1, topk_group=1,
                               routed_scaling_factor=spec["routed_scaling_factor"],
                               hidden_act="silu")
        block = DeepseekV2Moe(cfg)
        # Routed experts only (the issue's "DeepSeek-V2-Lite routed"): the shared expert is
        # dropped and the block runs through routed_forward below.
        del block.shared_experts
    elif fam == "switch_transformers":
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersConfig, SwitchTransformersSparseMLP)
        cfg = SwitchTransformersConfig(d_model=d, d_ff=F, num_experts=E, expert_capacity=max_tokens,
                                       router_bias=False, dense_act_fn="relu", dropout_rate=0.0,
                                       router_jitter_noise=0.0, router_dtype="float32")
        block = SwitchTransformersSparseMLP(cfg)
    else:
        raise ValueError(fam)
    block.float().train()
    return block, cfg


def block_forward(spec, block, x3):
    if spec["family"] == "deepseek_v2":  # DeepseekV2Moe.forward without the shared experts
        shape = x3.shape
        _, w, idx = block.gate(x3)
        return block.experts(x3.view(-1, shape[-1]), idx, w).view(*shape)
    return block(x3)


def router_weight(spec, block):
    if spec["family"] == "switch_transformers":
        return block.router.classifier.weight
    return block.gate.weight


def expert_params(spec, block):
    """(w1 [E, P, d], w2 [E, d, F]) as Switchyard lays them out (HF gate_up_proj is [gate | up])."""
    if spec["family"] == "switch_transformers":
        ex = [block.experts[f"expert_{e}"] for e in range(spec["E"])]
        return [m.wi.weight for m in ex], [m.wo.weight for m in ex]
    return block.experts.gate_up_proj, block.experts.down_proj


def stacked(t):
    if isinstance(t, list):
        return torch.stack([p.detach() for p in t])
    return t.detach()


def stacked_grad(t):
    if isinstance(t, list):
        # Switch's per-expert Linear modules: an expert no token chose has no gradient (0).
        return torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in t])
    return t.grad


def routing_ids(spec, block, x2):
    with torch.inference_mode():
        if spec["family"] == "switch_transformers":
            logits = block.router.classifier(x2)
            return logits.argmax(-1, keepdim=True)
        _, _, idx = block.gate(x2)
        return idx


def fill_weights(spec, block, gen):
    d, F = spec["d"], spec["d_ff"]
    with torch.no_grad():
        rw = router_weight(spec, block)
        rw.copy_(torch.randn(rw.shape, generator=gen) / math.sqrt(d))
        w1, w2 = expert_params(spec, block)
        for p in (w1 if isinstance(w1, list) else [w1]):
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(d))
        for p in (w2 if isinstance(w2, list) else [w2]):
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(F))


def write_f32(path, t):
    np.ascontiguousarray(t.detach().numpy(), dtype="<f4").tofile(path)


# ---- timing ------------------------------------------------------------------------------

def time_runs(fn, warmup, reps, budget_ms):
    """Times of up to `reps` runs after `warmup` untimed ones, stopping (after at least one)
    once `budget_ms` is spent. A warm-up run longer than the budget is the only sample: at
    that length the first run's one-time costs (page faults of fresh buffers) are noise."""
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = (time.perf_counter() - t0) * 1e3
        if first > budget_ms:
            return [first]
    out, start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
        if (time.perf_counter() - start) * 1e3 > budget_ms:
            break
    return out


def expert_gflop(spec, T):
    """Forward FLOPs of the expert GEMMs: 2 · T · k · (P + d_ff) · d."""
    P = 2 * spec["d_ff"] if gated(spec) else spec["d_ff"]
    return 2.0 * T * spec["k"] * (P + spec["d_ff"]) * spec["d"] * 1e-9


def batched_mm_bytes(spec, T):
    """What batched_mm materialises: every (token, slot) pair's copy of its expert's weights,
    forward, and as much again for their gradients in backward."""
    P = 2 * spec["d_ff"] if gated(spec) else spec["d_ff"]
    return T * spec["k"] * (P + spec["d_ff"]) * spec["d"] * 4


def scale_to_host(spec, max_weight_bytes):
    """Halves d_ff until one copy of the expert weights fits `max_weight_bytes` (each side holds
    the weights and their gradients; the two sides run one after the other)."""
    spec = dict(spec)
    P = lambda f: (2 * f if gated(spec) else f)  # noqa: E731
    bytes_ = lambda f: spec["E"] * (P(f) + f) * spec["d"] * 4  # noqa: E731
    F0 = spec["d_ff"]
    while bytes_(spec["d_ff"]) > max_weight_bytes and spec["d_ff"] % 2 == 0:
        spec["d_ff"] //= 2
    if spec["d_ff"] != F0:
        spec["scaled"] = {"d_ff": [F0, spec["d_ff"]],
                          "why": f"expert weights {bytes_(F0) / 2**30:.1f} GiB per copy; each side "
                                 f"holds weights + gradients, on a 24 GiB host (--max-weight-gib "
                                 f"{max_weight_bytes / 2**30:g})"}
    return spec


# ---- comparison --------------------------------------------------------------------------

def max_diff(ref, got, chunk=1 << 24):
    """(max|Δ|, max|Δ| / max|ref|) in chunks (no full-size temporaries)."""
    ref, got = ref.reshape(-1), got.reshape(-1)
    mad, mref = 0.0, 0.0
    for i in range(0, ref.size, chunk):
        r = ref[i:i + chunk].astype(np.float64)
        g = got[i:i + chunk].astype(np.float64)
        mad = max(mad, float(np.max(np.abs(r - g))) if r.size else 0.0)
        mref = max(mref, float(np.max(np.abs(r))) if r.size else 0.0)
    return mad, (mad / mref if mref > 0 else mad)


# ---- one shape ---------------------------------------------------------------------------

def run_shape(name, spec, tokens, args, driver, data_root, entries):
    fam = spec["family"]
    impls = ["eager"] if fam == "switch_transformers" else [i for i in IMPLS if i in args.impls]
    d, E, k = spec["d"], spec["E"], spec["k"]
    Tmax = max(tokens)
    ddir = data_root / name
    ddir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    block, cfg = make_block(spec, Tmax)
    fill_weights(spec, block, gen)
    X = torch.randn(Tmax, d, generator=gen)
    G = torch.randn(Tmax, d, generator=gen)
    files = {n: str(ddir / f"{n}.f32") for n in ("x", "g", "router_w", "w1", "w2")}
    write_f32(files["x"], X)
    write_f32(files["g"], G)
    write_f32(files["router_w"], router_weight(spec, block))
    w1, w2 = expert_params(spec, block)
    write_f32(files["w1"], stacked(w1))
    write_f32(files["w2"], stacked(w2))
    log(f"  {name}: block built, weights written in {time.perf_counter() - t0:.1f} s")

    for T in tokens:
        x3 = X[:T].reshape(1, T, d).contiguous()
        g3 = G[:T].reshape(1, T, d).contiguous()
        base = dict(shape=name, family=fam, hf_block=HF_BLOCK[fam], d=d, d_ff=spec["d_ff"], E=E, k=k,
                    T=T, threads=args.threads, scaled=spec.get("scaled"))
        fwd = dict(base, **{"pass": "forward"})
        fb = dict(base, **{"pass": "forward_backward"})
        skipped = {}
        ref = None
        hf_cross = {}
        for impl in impls:
            if impl == "batched_mm" and batched_mm_bytes(spec, T) * 2 > args.max_batched_mm_bytes:
                why = (f"batched_mm copies each pair's expert weights: "
                       f"{batched_mm_bytes(spec, T) * 2 / 2**30:.1f} GiB with backward "
                       f"(limit --max-batched-mm-gib {args.max_batched_mm_bytes / 2**30:g})")
                skipped[f"hf_{impl}"] = why
                continue
            cfg._experts_implementation = impl

            def f_fwd():
                with torch.inference_mode():
                    return block_forward(spec, block, x3)

            state = {}

            def f_fb():
                for p in block.parameters():
                    p.grad = None
                xr = x3.detach().requires_grad_(True)
                y = block_forward(spec, block, xr)
                (y * g3).sum().backward()
                state["y"], state["dx"] = y, xr.grad

            try:
                tf = time_runs(f_fwd, args.warmup, args.reps, args.budget_ms)
                tb = time_runs(f_fb, args.warmup, args.reps, args.budget_ms) if not args.forward_only else None
            except Exception as e:  # an implementation this torch cannot run on the CPU
                skipped[f"hf_{impl}"] = f"{type(e).__name__}: {e}"[:300]
                continue
            fwd[f"hf_{impl}_ms"] = statistics.median(tf)
            fwd[f"hf_{impl}_min_ms"] = min(tf)
            fwd[f"hf_{impl}_reps_ms"] = tf
            if tb is not None:
                fb[f"hf_{impl}_ms"] = statistics.median(tb)
                fb[f"hf_{impl}_min_ms"] = min(tb)
                fb[f"hf_{impl}_reps_ms"] = tb
            else:
                f_fb()
            outs = {
                "y": state["y"].detach().reshape(T, d).numpy().copy(),
                "dx": state["dx"].reshape(T, d).numpy().copy(),
                "grad_router_w": router_weight(spec, block).grad.numpy().copy(),
                "grad_w1": stacked_grad(w1).numpy().copy(),
                "grad_w2": stacked_grad(w2).numpy().copy(),
            }
            for p in block.parameters():
                p.grad = None
            if ref is None:
                ref = (impl, outs)
            else:
                hf_cross[impl] = max(max_diff(ref[1][n], o)[1] for n, o in outs.items())
            del outs
            gc.collect()
            log(f"    T={T:5d} hf {impl:10s} fwd {fwd[f'hf_{impl}_ms']:10.2f} ms"
                + (f"  fwd+bwd {fb[f'hf_{impl}_ms']:10.2f} ms" if tb is not None else ""))
        hf_ids = routing_ids(spec, block, X[:T]).numpy()

        # Switchyard on the same files.
        case = dict(family=fam, T=T, token_rows=Tmax, d=d, d_ff=spec["d_ff"], E=E, k=k,
                    activation="swiglu" if gated(spec) else "relu",
                    norm_topk_prob=spec.get("norm_topk_prob", False),
                    routed_scaling_factor=spec.get("routed_scaling_factor", 1.0),
                    threads=args.threads, backward=not args.forward_only, files=files,
                    timing=dict(warmup=args.warmup, reps=args.reps, budget_ms=args.budget_ms))
        odir = ddir / f"out-T{T}"
        case_path = ddir / f"case-T{T}.json"
        case_path.write_text(json.dumps(case, indent=2))
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run([str(driver), str(case_path), str(odir)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"switchyard_compare failed on {name} T={T}:\n{proc.stderr}")
        res = json.loads((odir / "result.json").read_text())
        fwd["switchyard_ms"] = res["forward_ms"]
        fwd["switchyard_min_ms"] = min(res["forward_reps_ms"])
        fwd["switchyard_reps_ms"] = res["forward_reps_ms"]
        if not args.forward_only:
            fb["switchyard_ms"] = res["forward_backward_ms"]
            fb["switchyard_min_ms"] = min(res["forward_backward_reps_ms"])
            fb["switchyard_reps_ms"] = res["forward_backward_reps_ms"]

        # Outputs: Switchyard against the first HF implementation run (eager).
        sy_ids = np.fromfile(odir / "expert_ids.i32", dtype="<i4").reshape(T, k)
        mismatch = int(np.sum(np.any(np.sort(sy_ids, 1) != np.sort(hf_ids, 1), axis=1)))
        diffs = {}
        for n, o in ref[1].items():
            got = np.memmap(odir / f"{n}.f32", dtype="<f4", mode="r")
            a, r = max_diff(o, got)
            diffs[n] = {"max_abs": a, "max_rel": r}
            del got
        fdiff = diffs["y"]
        bdiff = {n: v for n, v in diffs.items()}
        for entry, dd in ((fwd, {"y": fdiff}), (fb, bdiff)):
            entry["reference"] = f"hf_{ref[0]}"
            entry["diffs"] = dd
            entry["max_abs_diff"] = max(v["max_abs"] for v in dd.values())
            entry["max_rel_diff"] = max(v["max_rel"] for v in dd.values())
            entry["routing_mismatch_tokens"] = mismatch
            entry["agree"] = bool(entry["max_rel_diff"] <= REL_TOL and mismatch == 0)
            entry["hf_impls_max_rel_diff"] = hf_cross
            entry["skipped"] = dict(skipped)
            if "switchyard_ms" not in entry:
                continue
            hf_times = {i: entry[f"hf_{i}_ms"] for i in IMPLS if f"hf_{i}_ms" in entry}
            for i, t in hf_times.items():
                entry[f"ratio_vs_hf_{i}"] = entry["switchyard_ms"] / t   # < 1: Switchyard faster
                entry[f"speedup_vs_hf_{i}"] = t / entry["switchyard_ms"]
            if hf_times:
                best = min(hf_times, key=hf_times.get)
                entry["fastest_hf"] = best
                entry["speedup_vs_fastest_hf"] = hf_times[best] / entry["switchyard_ms"]
        entries.append(fwd)
        if not args.forward_only:
            entries.append(fb)
        log(f"    T={T:5d} switchyard    fwd {fwd['switchyard_ms']:10.2f} ms"
            + (f"  fwd+bwd {fb['switchyard_ms']:10.2f} ms" if not args.forward_only else "")
            + f"   max rel diff fwd {fwd['max_rel_diff']:.2e} bwd {fb['max_rel_diff']:.2e}"
            + (f"  ROUTING DIFFERS on {mismatch} tokens" if mismatch else "")
            + ("" if fb["agree"] else "  DISAGREE"))
        shutil.rmtree(odir, ignore_errors=True)
        del ref
        gc.collect()
    del block
    gc.collect()
    if not args.keep_data:
        shutil.rmtree(ddir, ignore_errors=True)


# ---- context and output ------------------------------------------------------------------

def targets(e):
    """Issue #14's host targets for one entry (reported, never asserted): forward ≥ 1.5× faster
    than the fastest HF implementation, forward + backward ≥ 2×, batch 1 forward ≥ 5× faster
    than eager."""
    out = []
    if "switchyard_ms" not in e or "speedup_vs_fastest_hf" not in e:
        return out
    goal = 1.5 if e["pass"] == "forward" else 2.0
    out.append({"name": f"{goal:g}x vs fastest HF ({e['fastest_hf']})", "goal": goal,
                "value": e["speedup_vs_fastest_hf"], "met": e["speedup_vs_fastest_hf"] >= goal})
    if e["pass"] == "forward" and e["T"] == 1 and "speedup_vs_hf_eager" in e:
        out.append({"name": "5x vs eager at batch 1", "goal": 5.0,
                    "value": e["speedup_vs_hf_eager"], "met": e["speedup_vs_hf_eager"] >= 5.0})
    return out


def fmt_targets(e):
    return "; ".join(f"{t['name']}: {'met' if t['met'] else '**not met**'} ({t['value']:.2f}x)"
                     for t in e.get("targets", [])) or "—"


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        c = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt_ms(v):
    return "—" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}")


def fmt_ratio(v):
    return "—" if v is None else f"{v:.2f}"


def markdown(doc):
    c = doc["context"]
    out = [f"# Switchyard vs Hugging Face MoE blocks — {doc['date']}", "",
           f"Generated by `scripts/bench-compare` ({doc['command']}); the data is "
           f"`{doc['json_name']}`. Same machine, threads, float32 weights and tokens on both sides "
           "(generated once, fed to both). **Ratio = Switchyard time / HF time: below 1 "
           "Switchyard is faster.** Median of the repetitions after a warm-up.", "",
           f"- CPU: {c['cpu']} ({c['cpu_count']} logical CPUs), threads: {c['threads']}",
           f"- PyTorch {c['torch']}, transformers {c['transformers']}, Python {c['python']}",
           f"- Switchyard {c['switchyard_commit']}, BLAS: {c['blas']['library']}"
           f" (kernel {c['blas']['kernel'] or '?'}, CPU ISA {c['blas']['cpu_isa']}"
           f"{', GENERIC KERNELS' if c['blas']['generic_kernels'] else ''})",
           f"- Load average at start / end: {c['loadavg_start']} / {c['loadavg_end']}. {c['noise']}",
           f"- Outputs: max |Δ| relative to max |HF eager| per tensor (forward: y; "
           f"forward+backward: y, dx, router and expert weight gradients); agreement means "
           f"≤ {REL_TOL:g} and the same experts for every token.", ""]
    if len(doc.get("runs", [])) > 1:
        out += ["Assembled from several runs (`--merge`), each with its own load:", ""]
        out += [f"- `{r['command']}`: load {r['loadavg_start']} → {r['loadavg_end']}, "
                f"{r['wall_s']} s, {len(r['points'])} points" for r in doc["runs"]]
        out.append("")
    scaled = {e["shape"]: e["scaled"] for e in doc["entries"] if e.get("scaled")}
    for s, v in scaled.items():
        out.append(f"- **{s} is scaled down**: d_ff {v['d_ff'][0]} → {v['d_ff'][1]} "
                   f"({v['why']}); both sides run the scaled shape.")
    if scaled:
        out.append("")
    for p, title in (("forward", "Forward"), ("forward_backward", "Forward + backward")):
        rows = [e for e in doc["entries"] if e["pass"] == p]
        if not rows:
            continue
        out += [f"## {title}", "",
                "| shape (d, d_ff, E, k) | T | Switchyard ms | HF eager ms | HF batched_mm ms | "
                "HF grouped_mm ms | ratio vs eager | ratio vs batched_mm | ratio vs grouped_mm | "
                "max rel diff | agree | issue #14 target (speedup) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for e in rows:
            out.append("| " + " | ".join([
                f"{e['shape']} ({e['d']}, {e['d_ff']}, {e['E']}, {e['k']})", str(e["T"]),
                fmt_ms(e.get("switchyard_ms")), fmt_ms(e.get("hf_eager_ms")),
                fmt_ms(e.get("hf_batched_mm_ms")), fmt_ms(e.get("hf_grouped_mm_ms")),
                fmt_ratio(e.get("ratio_vs_hf_eager")), fmt_ratio(e.get("ratio_vs_hf_batched_mm")),
                fmt_ratio(e.get("ratio_vs_hf_grouped_mm")), f"{e['max_rel_diff']:.1e}",
                "yes" if e["agree"] else f"**no** ({e['routing_mismatch_tokens']} tokens routed differently)"
                if e["routing_mismatch_tokens"] else "**no**", fmt_targets(e)]) + " |")
        out.append("")
    notes = sorted({f"{e['shape']} T={e['T']} {k}: {v}"
                    for e in doc["entries"] for k, v in e.get("skipped", {}).items()})
    notes += [f"{p['shape']} T={p['T']}: {p['why']}" for p in doc.get("skipped_points", [])]
    if notes:
        out += ["## Not run", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Notes", "",
            "- DeepSeek-V2-Lite: the routed experts only (`DeepseekV2Moe` with its shared expert "
            "removed: gate + experts, as `DeepseekV2Moe.forward` runs them), greedy top-6, "
            "routed_scaling_factor 1.0; Switchyard `presets::deepseek_v2`.",
            "- Switch-Base-128: `SwitchTransformersSparseMLP` (eager only: its experts are a "
            "ModuleDict of `DenseActDense`, outside `@use_experts_implementation`), expert_capacity "
            "= the largest T (nothing dropped), ReLU experts; Switchyard `presets::qwen_moe(1, false)` "
            "with `activation::relu`, sorted_grouped dispatch.",
            "- Mixtral / Qwen3 / OLMoE: Switchyard `presets::qwen_moe(k, norm_topk_prob)`, SwiGLU, "
            "sorted_grouped dispatch, caller workspaces.",
            "- Forward+backward: PyTorch clears the gradients (`grad = None`) and allocates new "
            "ones; Switchyard zeroes its accumulating gradients inside the timed region. At small "
            "T that zeroing writes every expert's gradient (2.25 GiB for Switch-Base-128, 2.25 GiB "
            "Qwen3-30B-A3B) while PyTorch leaves an unchosen Switch expert's gradient unallocated: "
            "probably most of Switchyard's Switch T = 1 forward+backward (not profiled).",
            "- HF forward runs under `torch.inference_mode()`; batched_mm is skipped where its "
            "per-pair weight copies would not fit in memory.",
            "- HF eager's backward costs about (experts hit) × (expert weight bytes) whatever T: "
            "each `gate_up_proj[expert_idx]` / `down_proj[expert_idx]` of its loop is a "
            "`SelectBackward0`, which writes the slice's gradient into a zero tensor of the whole "
            "[E, ·, ·] parameter, and the autograd engine sums those full-size tensors.",
            "- A measurement whose warm-up run exceeds the time budget uses that run as its only "
            "sample (both sides); `*_reps_ms` in the JSON lists every sample.",
            f"- Points kept from earlier runs of the same date (`--merge`): "
            f"{c.get('points_kept_from_earlier_runs', 0)}.", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--driver", help="the switchyard_compare executable (required unless --render)")
    ap.add_argument("--quick", action="store_true", help="one small shape, few tokens, 1 rep")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    ap.add_argument("--tokens", default="", help="comma-separated token counts (default 1,16,256,4096)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="HF experts implementations")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-ms", type=float, default=4000.0,
                    help="stop repeating a measurement (after at least one) once this is spent")
    ap.add_argument("--max-weight-gib", type=float, default=2.5,
                    help="scale d_ff down (halving) until one copy of the expert weights fits")
    ap.add_argument("--max-batched-mm-gib", type=float, default=6.0)
    ap.add_argument("--max-gflop", type=float, default=200.0,
                    help="skip (shape, T) points whose expert GEMMs exceed this many GFLOP per "
                         "forward (0: no limit)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other points of an existing compare-DATE.json")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--data-dir", default=str(Path.home() / ".cache" / "switchyard-compare-data"))
    ap.add_argument("--keep-data", action="store_true", help="keep the weight/token files")
    ap.add_argument("--out-dir", default=str(REPO / "docs" / "benchmarks"))
    ap.add_argument("--date", default=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    ap.add_argument("--no-write", action="store_true", help="print, write no docs/benchmarks files")
    ap.add_argument("--render", metavar="JSON",
                    help="only rewrite the Markdown (and the targets) of an existing compare JSON")
    args = ap.parse_args()
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        for e in doc["entries"]:
            e["targets"] = targets(e)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        md = markdown(doc)
        path.with_suffix(".md").write_text(md + "\n")
        print(md)
        return
    if not args.driver:
        ap.error("--driver is required")
    args.impls = [s for s in args.impls.split(",") if s]
    args.max_weight_bytes = int(args.max_weight_gib * 2**30)
    args.max_batched_mm_bytes = int(args.max_batched_mm_gib * 2**30)

    shapes = dict(QUICK_SHAPE) if args.quick else dict(SHAPES)
    if args.shapes:
        want = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in want if s not in SHAPES and s not in QUICK_SHAPE]
        if unknown:
            raise SystemExit(f"unknown shape(s) {unknown}; known: {list(SHAPES) + list(QUICK_SHAPE)}")
        shapes = {s: (SHAPES.get(s) or QUICK_SHAPE[s]) for s in want}
    token_filter = [int(t) for t in args.tokens.split(",") if t.strip()] if args.tokens else None
    if args.quick:
        args.reps = min(args.reps, 2)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    driver = Path(args.driver).resolve()
    info = json.loads(subprocess.run([str(driver), "--info"], capture_output=True, text=True,
                                     check=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads))).stdout)
    data_root = Path(args.data_dir)
    load0 = os.getloadavg()
    log(f"bench-compare: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, BLAS {info['library']} ({info['kernel']}), load {load0[0]:.2f}")

    entries, skipped_points = [], []
    t_start = time.perf_counter()
    out = Path(args.out_dir)
    json_name = f"compare-{args.date}.json"
    previous, previous_skips, previous_runs = [], [], []
    if args.merge and (out / json_name).exists():
        old = json.loads((out / json_name).read_text())
        previous, previous_skips = old.get("entries", []), old.get("skipped_points", [])
        previous_runs = old.get("runs") or [{k: old["context"].get(k) for k in (
            "loadavg_start", "loadavg_end", "wall_s", "switchyard_commit")} | {
            "command": old.get("command"),
            "points": sorted({f"{e['shape']} T={e['T']}" for e in previous})}]

    def write(final):
        load1 = os.getloadavg()
        keys = {(e["shape"], e["T"], e["pass"]) for e in entries}
        kept = [e for e in previous if (e["shape"], e["T"], e["pass"]) not in keys]
        mine = {(p["shape"], p["T"]) for p in skipped_points} | {(k[0], k[1]) for k in keys}
        skips = [p for p in previous_skips if (p["shape"], p["T"]) not in mine] + skipped_points
        order = {n: i for i, n in enumerate(list(SHAPES) + list(QUICK_SHAPE))}
        rows = sorted(kept + entries, key=lambda e: (order.get(e["shape"], 99), e["T"], e["pass"]))
        doc = document(args, info, load0, load1, rows, skips,
                       time.perf_counter() - t_start, json_name)
        doc["context"]["points_kept_from_earlier_runs"] = len(kept)
        doc["runs"] = previous_runs + [{
            "command": doc["command"], "loadavg_start": doc["context"]["loadavg_start"],
            "loadavg_end": doc["context"]["loadavg_end"], "wall_s": doc["context"]["wall_s"],
            "switchyard_commit": doc["context"]["switchyard_commit"],
            "points": sorted({f"{e['shape']} T={e['T']}" for e in entries})}]
        md = markdown(doc)
        if final:
            print(md)
        if not args.no_write:
            out.mkdir(parents=True, exist_ok=True)
            (out / json_name).write_text(json.dumps(doc, indent=1) + "\n")
            (out / f"compare-{args.date}.md").write_text(md + "\n")
            log(f"wrote {out / json_name} and {out / f'compare-{args.date}.md'}")

    for name, spec in shapes.items():
        spec = scale_to_host(spec, args.max_weight_bytes)
        tokens = list(spec.get("tokens") or (QUICK_TOKENS if args.quick else TOKENS))
        if token_filter:
            tokens = [t for t in tokens if t in token_filter]
        for T in list(tokens):
            if args.max_gflop > 0 and expert_gflop(spec, T) > args.max_gflop:
                tokens.remove(T)
                skipped_points.append(
                    {"shape": name, "T": T, "why": f"{expert_gflop(spec, T):.3g} GFLOP per forward "
                     f"> --max-gflop {args.max_gflop:g}: minutes per pass per implementation on this host"})
                log(f"{name} T={T}: skipped ({skipped_points[-1]['why']})")
        if not tokens:
            continue
        log(f"{name} d={spec['d']} d_ff={spec['d_ff']} E={spec['E']} k={spec['k']} tokens={tokens}"
            + (f"  (scaled: d_ff {spec['scaled']['d_ff'][0]} -> {spec['scaled']['d_ff'][1]})" if spec.get("scaled") else ""))
        run_shape(name, spec, tokens, args, driver, data_root, entries)
        write(final=False)  # what is done so far survives an interrupted run
    write(final=True)
    if not all(e["agree"] for e in entries):
        log("bench-compare: some outputs do NOT agree within float32 tolerance (see the table)")


def document(args, info, load0, load1, entries, skipped_points, wall_s, json_name):
    for e in entries:
        e["targets"] = targets(e)
    return {
        "format": "switchyard-compare/1",
        "date": args.date,
        "json_name": json_name,
        "command": "scripts/bench-compare " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "scripts/bench-compare",
        "context": {
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "numpy": np.__version__,
            "switchyard_commit": git_commit(), "blas": info,
            "hf_grouped_mm_kernel": ("torch.nn.functional.grouped_mm"
                                     if hasattr(torch.nn.functional, "grouped_mm") else
                                     "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else
                                     "transformers' per-expert torch.mm loop (no grouped_mm in this torch)"),
            "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in load1],
            "noise": "Other jobs may share this machine (the load averages above): the times are "
                     "noisy; the ratios come from one run, the two sides measured back to back.",
            "warmup": args.warmup, "reps": args.reps, "budget_ms": args.budget_ms,
            "seed": args.seed, "rel_tol": REL_TOL, "max_gflop": args.max_gflop,
            "wall_s": round(wall_s, 1),
        },
        "entries": entries,
        "skipped_points": skipped_points,
    }


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes the seed corpus of fuzz/fuzz_layer.cpp into fuzz/corpus/ (deterministic).

One file per router x dispatch x dtype with valid, mid-sized settings (nothing dropped with
sorted_grouped and dense, some drops with padded_capacity), and a handful of inputs that
exercise the error paths (bad k, bad capacity fields, a short or misaligned workspace, wrong
shapes, NaN in x). The byte layout is `decode()` in fuzz_layer.cpp, field by field.
Usage: fuzz/make_corpus.py [OUTDIR]
"""
import hashlib
import os
import sys

FIELDS = ["router", "dispatch", "dtype", "gated", "E", "kinds", "d", "d_ff", "T", "k",
          "renormalize", "p", "max_k", "threshold", "training", "log_temperature", "mask",
          "knobs", "capacity_factor", "min_capacity", "capacity_multiple", "expert_capacity",
          "flags", "pads", "ws", "mistake", "x_scale", "coeff"]
# Fields decoded with range(lo, hi): the byte is the value minus lo.
OFFSET = {"E": 1, "d": 1, "d_ff": 1}
BASE = dict(router=0, dispatch=1, dtype=0, gated=1, E=4, kinds=0, d=8, d_ff=6, T=10, k=2,
            renormalize=1, p=0, max_k=0, threshold=0, training=1, log_temperature=0,
            mask=0xff, knobs=0, capacity_factor=0, min_capacity=0, capacity_multiple=0,
            expert_capacity=0, flags=0, pads=0, ws=0, mistake=0, x_scale=0, coeff=0)


def encode(cfg, seed):
    out = bytearray()
    for f in FIELDS:
        out.append((cfg[f] - OFFSET.get(f, 0)) & 0xff)
    out += seed.to_bytes(8, "big")
    return bytes(out)


def cases():
    n = 0
    for router in range(4):
        for dispatch in range(3):
            for dtype in range(3):
                n += 1
                yield dict(BASE, router=router, dispatch=dispatch, dtype=dtype,
                           gated=(n % 3 != 0) * 1, E=3 + n % 4, d=4 + n % 9, d_ff=3 + n % 7,
                           T=1 + n % 12, k=1 + n % 3, pads=n % 81, ws=(n * 5) % 16,
                           flags=(n % 2) * 8 | (n % 4 == 1) * 4, knobs=n % 3,
                           kinds=(1 if router == 0 and n % 2 else 0),
                           capacity_factor=n % 4), 1000 + n
    extra = [
        dict(k=9),                                   # k > E
        dict(router=1, p=4),                         # p = 0
        dict(router=2, threshold=4),                 # negative threshold
        dict(router=3, mask=0),                      # every DynMoE expert masked
        dict(dispatch=2, capacity_factor=6),         # capacity_factor = 1e30
        dict(dispatch=2, min_capacity=6),            # min_capacity = INT64_MAX
        dict(dispatch=2, capacity_multiple=6),       # capacity_multiple = 2^62
        dict(dispatch=2, expert_capacity=3),         # expert_capacity = 1: drops
        dict(dispatch=2, capacity_factor=7),         # capacity_factor = 0
        dict(ws=2 + 4 * 2),                          # workspace one byte short
        dict(ws=1 + 48 + 64),                        # misaligned workspace
        dict(mistake=10),                            # backward: x with a row too many
        dict(mistake=12),                            # y with a row too many
        dict(mistake=14),                            # router gradient of the wrong shape
        dict(flags=0x30),                            # NaN in x
        dict(flags=0xc0),                            # NaN in dy
        dict(T=0),                                   # no tokens
        dict(E=1, k=1, d=1, d_ff=1, T=1),            # smallest layer
    ]
    for i, e in enumerate(extra):
        yield dict(BASE, **e), 5000 + i


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(out, exist_ok=True)
    for cfg, seed in cases():
        data = encode(cfg, seed)
        name = hashlib.sha1(data).hexdigest()[:16]
        with open(os.path.join(out, "seed-" + name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""docs/scale-out.md's Ray Data recipe, runnable: every keyframe of KEYFRAMES (a JSONL of
KeyframeRecords, `frame_path` absolute or relative to the file) described by one engine per GPU
actor, the rows written to OUT as JSON lines (in no particular order: Ray Data's is its own).

    pip install "cinecut-engine[ray]"
    python ray_describe.py keyframes.jsonl scenes.jsonl --models /models --actors 8

On a cluster, `ray.init()` joins it (RAY_ADDRESS, or `ray start` on this node); `--local N` starts a
one-node Ray with N GPUs instead (what CI does, with the fake server and the nvidia-smi shim).
"""

import argparse
import json
import os
from pathlib import Path

import ray

from cinecut_engine.ray import Describer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("keyframes", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--models", type=Path, default=Path(os.environ.get("CINECUT_MODELS_DIR", "/models")))
    p.add_argument("--actors", type=int, default=1, help="engines at once: one GPU each")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--local", type=int, metavar="GPUS", help="start a one-node Ray with GPUS GPUs")
    a = p.parse_args()

    if a.local is not None:
        ray.init(num_gpus=a.local, num_cpus=2 * a.local + 2, include_dashboard=False)
    else:
        ray.init()
    folder = a.keyframes.resolve().parent
    rows = []
    for line in a.keyframes.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["frame_path"] = str(folder / record["frame_path"])
            rows.append(record)
    scenes = ray.data.from_items(rows).map_batches(
        Describer,
        fn_constructor_kwargs={
            "model_path": str(a.models / "ggml-model-q4_k.gguf"),
            "mmproj_path": str(a.models / "mmproj-model-f16.gguf"),
            "slots": a.slots,
        },
        num_gpus=1,
        concurrency=a.actors,
        batch_size=a.batch_size,
        batch_format="pandas",
    )
    with open(a.out, "w") as out:
        for row in scenes.iter_rows():
            out.write(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Every public name of cinecut_engine, used as CineCut's stages use them: `mypy --strict` checks
this file against the installed package in CI (the stubs and annotations are the package's
promise to typed callers). Run it with real models to see it work; CI only type-checks it."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cinecut_engine
from cinecut_engine import (
    GPU_LOCK,
    OPTIONS,
    SCENE_DESCRIPTION_SCHEMA,
    VRAM_MINIMUM_MIB,
    CineCutEngineError,
    GpuLock,
    InferenceError,
    LlavaEngine,
    RequestError,
    SceneDescription,
    SceneValidationError,
    StartError,
    TextEngine,
    VramError,
    assert_vram_available,
    check_vram_free_mib,
    gpu_lock,
    run_inference_stage,
    validate_scene_description,
    wait_for_vram,
)

ANCHORS: Dict[str, Any] = {
    "type": "object",
    "properties": {"begin_t": {"type": "number"}, "escalation_t": {"type": "number"}, "climax_t": {"type": "number"}},
    "required": ["begin_t", "escalation_t", "climax_t"],
    "additionalProperties": False,
}


@dataclasses.dataclass
class KeyframeRecord:
    timestamp_s: float
    frame_path: str
    source: str


def describe_stage(models: Path, records: List[KeyframeRecord]) -> List[Tuple[KeyframeRecord, Optional[SceneDescription]]]:
    free: int = check_vram_free_mib(0)
    assert_vram_available(0)
    print(f"{free} MiB free, {VRAM_MINIMUM_MIB} needed; the schema needs {SCENE_DESCRIPTION_SCHEMA['required']}")
    options: List[str] = OPTIONS
    print("options:", ", ".join(options))
    done: List[Tuple[int, int]] = []
    return run_inference_stage(
        records,
        models / "ggml-model-q4_k.gguf",
        models / "mmproj-model-f16.gguf",
        progress_callback=lambda d, t: done.append((d, t)),
        gpus=[0, 1],
        slots=4,
    )


def both_stages(models: Path, record: KeyframeRecord, subtitles: str) -> Optional[float]:
    with LlavaEngine(models / "ggml-model-q4_k.gguf", models / "mmproj-model-f16.gguf", port=0) as vision:
        scene: Optional[SceneDescription] = vision.describe_frame(record)
        many: List[Optional[SceneDescription]] = vision.describe_frames([record], concurrency=1)
        print(vision.base_url, vision.port, vision.pid, vision.pids, vision.gpus, vision.api_key, scene, many)
        try:
            strict: SceneDescription = vision.describe(record)
            print(strict.mood)
        except RequestError as e:
            kind: Optional[str] = e.kind
            print(kind, e.subject, e.status, e.exit_code, e.signal, e.detail)
        with vision.swap(TextEngine(models / "mistral-7b-instruct-v0.3.Q4_K_M.gguf", port=8090, ctx_size=8192)) as text:
            answer = text.complete(ANCHORS, subtitles, system="Find the anchors.", max_tokens=128, temperature=0.1)
            assert not vision.running and text.running
            if isinstance(answer, dict):
                climax = answer.get("climax_t")
                return float(climax) if isinstance(climax, (int, float)) else None
    return None


def errors(models: Path) -> None:
    try:
        wait_for_vram(min_free_mib=VRAM_MINIMUM_MIB, poll_interval_s=2.0, timeout_s=60.0, gpu=0)
        with TextEngine(models / "mistral.gguf"):
            pass
    except VramError as e:
        numbers: Tuple[Optional[int], Optional[int], Optional[int]] = (e.gpu, e.free_mib, e.required_mib)
        print(numbers)
    except StartError as e:
        print(e.exit_code, e.signal, e.output_tail, e.__cause__)
    except InferenceError as e:
        print(e.detail)
    except CineCutEngineError as e:
        print(e.detail)
    try:
        validate_scene_description({"visual_content": "a", "mood": "b", "action": "c", "setting": "d"})
    except SceneValidationError as e:
        print(e)


def conform() -> None:
    lock: GpuLock = gpu_lock(1)
    with GPU_LOCK:
        subprocess.run(["true"], check=True)
    if lock.acquire(blocking=True, timeout=5.0):
        lock.release()
    print(lock.gpu, lock.locked(), cinecut_engine.__all__)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    folder = Path(sys.argv[1])
    frame = KeyframeRecord(12.5, sys.argv[2], "scene-cut")
    describe_stage(folder, [frame])
    both_stages(folder, frame, "[12.3s] Who's there?")
    errors(folder)
    conform()

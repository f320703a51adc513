"""Ray Data: describe frames across a Ray cluster, one engine per actor on the GPU Ray gives it.

``pip install cinecut-engine[ray]``, then::

    import ray
    from cinecut_engine.ray import Describer

    frames = ray.data.read_json("keyframes.jsonl")          # rows with "frame_path"
    scenes = frames.map_batches(
        Describer,
        fn_constructor_kwargs={"model_path": "/models/ggml-model-q4_k.gguf",
                               "mmproj_path": "/models/mmproj-model-f16.gguf", "slots": 4},
        num_gpus=1,          # one GPU per actor: Ray sets CUDA_VISIBLE_DEVICES, the engine honours it
        concurrency=8,       # eight actors, so eight GPUs
        batch_size=64,
    )
    scenes.write_json("scenes/")

Each actor starts its engine (VRAM check, GPU lock, llama-server) in its constructor and stops it
when the actor ends; the server is the engine's child, so an actor killed outright takes its server
with it. A batch is described with the actor's slots busy. A frame that cannot be described becomes
a row with ``error`` set and ``scene`` None, never an exception that would fail the whole job.
Output rows: every input column, plus ``scene`` (the SceneDescription's four fields as a dict, or
None), ``error`` (None, or why, with the fix) and ``gpu`` (the nvidia-smi index of the GPU that
answered).
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional

from . import LlavaEngine, PathLike
from ._types import SceneDescription

__all__ = ["Describer", "scene_of"]


class Describer:
    """A callable class for ``Dataset.map_batches``: batches of rows with a ``frame_path`` column in,
    the same rows with ``scene``, ``error`` and ``gpu`` out. ``options`` are LlavaEngine's."""

    def __init__(
        self,
        model_path: PathLike,
        mmproj_path: PathLike,
        slots: int = 4,
        column: str = "frame_path",
        **options: Any,
    ) -> None:
        if "gpus" in options:
            raise ValueError(
                "Describer runs one engine per actor, on the GPU Ray gives it: leave out gpus= "
                "and ask Ray for the GPUs (map_batches(..., num_gpus=1, concurrency=N))"
            )
        self._engine: Optional[LlavaEngine] = None
        self._column = column
        self._slots = slots
        # The first GPU this process may see: the one Ray gave the actor (port 0: a free port).
        options.setdefault("port", 0)
        engine = LlavaEngine(model_path, mmproj_path, slots=slots, **options)
        engine.__enter__()
        self._engine = engine
        self._gpu = engine.gpus[0]

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, List[Any]]:
        engine = self._engine
        if engine is None:
            raise RuntimeError("this Describer was stopped")
        rows = {name: list(values) for name, values in batch.items()}
        paths = [str(p) for p in rows[self._column]]
        results, _, _ = engine._engine.describe_many(paths, self._slots, None)
        # Plain dicts and strings: Arrow stores them as columns, and Ray's writers write them.
        rows["scene"] = [
            dataclasses.asdict(r) if isinstance(r, SceneDescription) else None for r in results
        ]
        rows["error"] = [None if isinstance(r, SceneDescription) else str(r) for r in results]
        rows["gpu"] = [self._gpu] * len(paths)
        return rows

    def stop(self) -> None:
        """Stops the engine (server stopped, VRAM back, lock released); called when the actor ends."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.__exit__(None, None, None)

    def __del__(self) -> None:
        # A constructor that raised leaves no engine to stop.
        if getattr(self, "_engine", None) is not None:
            self.stop()


def scene_of(row: Dict[str, Any]) -> Optional[SceneDescription]:
    """A row's SceneDescription (None for an error row); ``scene`` may also be JSON text, as in
    rows this class wrote before it gave objects."""
    scene = row.get("scene")
    if not scene:
        return None
    fields = json.loads(scene) if isinstance(scene, str) else scene
    return SceneDescription(**{f.name: fields[f.name] for f in dataclasses.fields(SceneDescription)})

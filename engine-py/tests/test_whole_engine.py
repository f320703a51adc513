"""The whole engine from Python: the pool over several GPUs, the swap that keeps the GPU, errors a
caller can act on, and the misuses that used to hang or raise the wrong thing."""

import json
import logging
import os
import threading

import pytest

from conftest import KeyframeRecord, wait_gone

import cinecut_engine
from cinecut_engine import (
    GPU_LOCK,
    InferenceError,
    LlavaEngine,
    RequestError,
    StartError,
    TextEngine,
    VramError,
    run_inference_stage,
)

ANCHORS = {
    "type": "object",
    "properties": {"t": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["t"],
    "additionalProperties": False,
}


def uuid(index: int) -> str:
    """The shim's UUID of GPU `index` (tests/src/lib.rs's shim_uuid)."""
    return f"GPU-c1ec{index:04x}-5eed-4c1e-8a11-{index:012x}"


@pytest.fixture
def two_gpus(scene, monkeypatch):
    monkeypatch.setenv("NVSMI_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield scene
    assert cinecut_engine.gpu_lock(1).acquire(blocking=False), "GPU 1's lock is still held"
    cinecut_engine.gpu_lock(1).release()


def test_a_pool_shares_the_frames_and_a_dying_server_hands_its_frames_over(two_gpus, monkeypatch, caplog):
    scene = two_gpus
    records = [scene.frame(f"f{i}.png", 20 + i, 20) for i in range(24)]
    with LlavaEngine(scene.model, scene.mmproj, gpus=[0, 1], slots=2) as engine:
        assert sorted(engine.gpus) == [0, 1] and len(engine.pids) == 2
        scenes = engine.describe_frames(records)
        assert all(s is not None and f"{20 + i}x20" in s.visual_content for i, s in enumerate(scenes))
        # The batch's summary, as the CLI's --summary writes it: per GPU, adding up.
        summary = engine.last_summary
        assert summary is not None
        assert (summary["items"], summary["answered"], summary["failed"]) == (24, 24, 0)
        assert sorted(g["gpu"] for g in summary["gpus"]) == [0, 1]
        assert sum(g["answered"] for g in summary["gpus"]) == 24
        assert summary["tokens"]["generated"] > 0 and summary["latency_ms"]["max"] > 0
        # A single frame goes to whichever GPU has a free slot.
        assert engine.describe_frame(records[0]) == scenes[0]
    # GPU 0's server crashes on its third request: GPU 1 takes its frames, the death is logged.
    monkeypatch.setenv("FAKE_LLAMA_CRASH_AFTER", f"2@{uuid(0)}")
    monkeypatch.setenv("FAKE_LLAMA_LATENCY_MS", "10")
    with caplog.at_level(logging.WARNING, logger="cinecut_engine"):
        results = run_inference_stage(records, scene.model, scene.mmproj, gpus="all", slots=2, port=0)
    assert [r for r, _ in results] == records
    assert all(s is not None for _, s in results), results
    assert "GPU 0's server died (signal 6" in caplog.text and "the other GPUs took" in caplog.text
    for pid in scene.spawned_pids():
        wait_gone(pid)


def test_a_gpu_named_twice_is_refused_before_anything_starts(two_gpus):
    scene = two_gpus
    engine = LlavaEngine(scene.model, scene.mmproj, gpus=[0, uuid(0)])
    with pytest.raises(ValueError, match="gpus= names GPU 0 twice"):
        engine.__enter__()
    assert not engine.running and scene.spawned_pids() == []


def test_swap_keeps_the_gpu_and_leaves_the_vision_engine_stopped(scene):
    record = scene.frame("a.png")
    taken = []
    stop = threading.Event()

    def try_the_lock():
        while not stop.is_set():
            if GPU_LOCK.acquire(blocking=False):
                taken.append(True)
                GPU_LOCK.release()

    with LlavaEngine(scene.model, scene.mmproj, port=0) as vision:
        assert vision.describe_frame(record) is not None
        first = vision.pid
        poller = threading.Thread(target=try_the_lock)
        poller.start()
        try:
            with vision.swap(TextEngine(scene.model, port=0, ctx_size=8192)) as text:
                # The poller ran through the whole swap; it stops before the text engine does.
                stop.set()
                poller.join()
                assert text.running and not vision.running
                assert text.complete(ANCHORS, "[1.0s] Hello.") is not None
                assert GPU_LOCK.locked()
        finally:
            stop.set()
            poller.join()
        wait_gone(first)
    assert taken == [], "another holder got the GPU during the swap"
    assert not GPU_LOCK.locked()


def test_a_failed_swap_leaves_nothing_running_and_raises(scene):
    with LlavaEngine(scene.model, scene.mmproj, port=0) as vision:
        first = vision.pid
        broken = TextEngine(scene.model, port=0, server_args=["--no-such-flag"])
        with pytest.raises(StartError) as info:
            vision.swap(broken)
        assert not vision.running and not broken.running
        assert info.value.exit_code == 1 and "--no-such-flag" in info.value.output_tail
        wait_gone(first)
        assert not GPU_LOCK.locked()
    for pid in scene.spawned_pids():
        wait_gone(pid)


def test_errors_carry_what_failed_as_attributes(scene, monkeypatch):
    # A start that fails: its exit and output.
    monkeypatch.setenv("FAKE_LLAMA_EXIT_DURING_LOAD", "3")
    monkeypatch.setenv("FAKE_LLAMA_EXIT_MESSAGE", "CUDA error: out of memory")
    with pytest.raises(StartError) as start:
        with LlavaEngine(scene.model, scene.mmproj, port=0):
            pass
    assert isinstance(start.value, InferenceError)
    assert (start.value.exit_code, start.value.signal) == (3, None)
    assert "out of memory" in start.value.output_tail
    monkeypatch.delenv("FAKE_LLAMA_EXIT_DURING_LOAD")
    # A server that is not a program: the OS error is the cause.
    not_a_program = scene.root / "llama-server"
    not_a_program.write_text("#!/bin/sh\n")
    not_a_program.chmod(0o644)
    with pytest.raises(StartError) as spawn:
        with LlavaEngine(scene.model, scene.mmproj, port=0, server_bin=str(not_a_program)):
            pass
    assert isinstance(spawn.value.__cause__, PermissionError), repr(spawn.value.__cause__)
    # Too little VRAM: the numbers, and the keyword that fixes it.
    monkeypatch.setenv("NVSMI_GPUS", "500")
    with pytest.raises(VramError) as vram:
        with LlavaEngine(scene.model, scene.mmproj, port=0):
            pass
    assert (vram.value.gpu, vram.value.free_mib, vram.value.required_mib) == (0, 500, 6144)
    assert "min_vram_mib=" in vram.value.detail and "--min-vram" not in vram.value.detail
    monkeypatch.delenv("NVSMI_GPUS")
    # A request that fails: what failed, and how.
    monkeypatch.setenv("FAKE_LLAMA_RESPONSE", "not-json")
    record = scene.frame("a.png")
    with LlavaEngine(scene.model, scene.mmproj, port=0, retries=0) as engine:
        with pytest.raises(RequestError) as request:
            engine.describe(record)
    assert request.value.kind == "invalid_output"
    assert request.value.subject == record.frame_path
    monkeypatch.setenv("FAKE_LLAMA_RESPONSE", "http-500")
    with LlavaEngine(scene.model, scene.mmproj, port=0, retries=0) as engine:
        with pytest.raises(RequestError) as http:
            engine.describe(record)
    assert (http.value.kind, http.value.status) == ("http", 500)
    # A server that dies mid-request.
    monkeypatch.delenv("FAKE_LLAMA_RESPONSE")
    monkeypatch.setenv("FAKE_LLAMA_CRASH_AFTER", "0")
    with LlavaEngine(scene.model, scene.mmproj, port=0) as engine:
        with pytest.raises(RequestError) as died:
            engine.describe(record)
    assert (died.value.kind, died.value.signal) == ("server_died", 6)
    # Options in Python's words.
    with pytest.raises(ValueError, match="startup_timeout_s="):
        LlavaEngine(scene.model, scene.mmproj, startup_timeout_s=-1)
    with pytest.raises(ValueError, match="server_args="):
        LlavaEngine(scene.model, scene.mmproj, server_args=["--port", "9"])


def test_a_bad_port_and_a_lock_held_by_this_thread_raise_at_once(scene):
    for port in (-1, 65536):
        with pytest.raises(ValueError, match="port"):
            LlavaEngine(scene.model, scene.mmproj, port=port)
    with GPU_LOCK:
        with pytest.raises(RuntimeError, match="this thread holds GPU 0's lock"):
            with LlavaEngine(scene.model, scene.mmproj, port=0):
                pass
    assert scene.spawned_pids() == []
    # Another thread's hold is waited for, as before.
    started = threading.Event()

    def hold():
        with GPU_LOCK:
            started.set()
            threading.Event().wait(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait()
    with LlavaEngine(scene.model, scene.mmproj, port=0) as engine:
        assert engine.running
    holder.join()


def test_options_the_engine_cannot_take_are_named(scene):
    from cinecut_engine.ray import Describer

    # One engine per Ray actor, on the GPU Ray gives it: a pool inside an actor is refused.
    with pytest.raises(ValueError, match="leave out gpus="):
        Describer(scene.model, scene.mmproj, gpus=[0, 1])


def test_the_ray_describer_turns_a_batch_into_rows_of_scenes_and_errors(scene):
    from cinecut_engine import SceneDescription
    from cinecut_engine.ray import Describer, scene_of

    # Ray is not needed to call it: a batch is a dict of columns, as map_batches hands it.
    good = scene.frame("a.png").frame_path
    missing = str(scene.root / "missing.png")
    describer = Describer(scene.model, scene.mmproj, slots=2)
    try:
        rows = describer({"frame_path": [good, missing], "id": [1, 2]})
    finally:
        describer.stop()
    assert rows["id"] == [1, 2]
    assert rows["gpu"] == [0, 0]
    assert set(rows["scene"][0]) == {"visual_content", "mood", "action", "setting"}
    assert rows["error"][0] is None
    assert rows["scene"][1] is None and "missing.png" in rows["error"][1]
    # A row as Ray Data hands it back, and one read from a JSON file.
    first = {"scene": rows["scene"][0]}
    assert isinstance(scene_of(first), SceneDescription)
    assert scene_of({"scene": json.dumps(rows["scene"][0])}) == scene_of(first)
    assert scene_of({"scene": None}) is None

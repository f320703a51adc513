"""What crosses between Python and the engine, and what the boundary refuses: objects, not JSON text;
exceptions that are real classes with typed attributes; one timeout that stops what it times; every
capability of the CLI (slots="auto", servers_per_gpu); and the misuses a caller can make, each refused
with the option named instead of passing, hanging or stopping the engine under its user."""

import logging
import pickle
import threading
import time

import pytest

from conftest import LLAVA_7B_SHAPE, write_gguf

import cinecut_engine
from cinecut_engine import (
    GPU_LOCK,
    LlavaEngine,
    RequestError,
    SceneDescription,
    StartError,
    TextEngine,
    VramError,
    _engine,
)


def test_answers_and_summaries_cross_as_objects(scene):
    records = [scene.frame(f"o{i}.png", 20 + i, 20) for i in range(3)]
    with LlavaEngine(scene.model, scene.mmproj, port=0, slots=2) as engine:
        one = engine.describe(records[0])
        assert type(one) is SceneDescription and "20x20" in one.visual_content
        outcomes, deaths, summary = engine._engine.describe_many(
            [r.frame_path for r in records] + [str(scene.root / "missing.png")], None, None
        )
        assert [type(o) for o in outcomes] == [SceneDescription] * 3 + [RequestError]
        assert outcomes[3].kind == "bad_image" and outcomes[3].subject.endswith("missing.png")
        assert deaths == [] and isinstance(summary, dict) and summary["items"] == 4
        assert isinstance(summary["latency_ms"]["p50"], float)
    with TextEngine(scene.model, port=0) as text:
        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["n"], "additionalProperties": False}
        answer = text._engine.complete(schema, "pick", None, 16, 0.1, [], 10.0)
        assert isinstance(answer, dict) and 0 <= answer["n"] <= 9
        with pytest.raises(ValueError, match="not JSON"):
            text._engine.complete({"type": "object", "const": float("nan")}, "x", None, 16, 0.1, [], 10.0)


def test_exceptions_are_classes_with_typed_attributes_that_survive_pickling(scene, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_EXIT_DURING_LOAD", "3")
    with pytest.raises(StartError) as caught:
        with LlavaEngine(scene.model, scene.mmproj, port=0):
            pass
    error = caught.value
    assert (error.exit_code, error.signal) == (3, None) and isinstance(error.output_tail, str)
    assert error.detail == str(error) and "exited during startup" in error.detail
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is StartError and again.exit_code == 3 and again.detail == error.detail
    # Made by hand, as a caller's own code (or a test double) would: the same attributes.
    made = VramError("too little", gpu=1, free_mib=100, required_mib=6144)
    assert (made.gpu, made.free_mib, made.required_mib, made.detail) == (1, 100, 6144, "too little")
    assert RequestError("x").kind is None and isinstance(made, cinecut_engine.CineCutEngineError)


def test_a_timeout_stops_the_request_it_times(scene, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_LATENCY_MS", "5000")
    record = scene.frame("slow.png")
    with LlavaEngine(scene.model, scene.mmproj, port=0, retries=3) as engine:
        started = time.monotonic()
        with pytest.raises(RequestError) as caught:
            engine.describe(record, timeout_s=0.3)
        took = time.monotonic() - started
        assert caught.value.kind == "timeout" and took < 2.0, took
        # The server saw its client go: the request was abandoned, not left running (no retry).
        scene.wait_for_event("request_cancelled")
        starts = [e for e in scene.server_events() if e["event"] == "request_start"]
        assert len(starts) == 1


def test_slots_auto_and_several_servers_per_gpu_from_python(scene, monkeypatch):
    write_gguf(scene.model, LLAVA_7B_SHAPE)
    # 12000 MiB free: the slots that fit beside one copy of the weights (10 of 1024 MiB).
    monkeypatch.setenv("NVSMI_GPUS", "12000")
    with LlavaEngine(scene.model, scene.mmproj, port=0, slots="auto") as engine:
        assert engine.slots == 10 and len(engine.pids) == 1
    monkeypatch.setenv("NVSMI_GPUS", "79000")
    records = [scene.frame(f"s{i}.png", 24, 20 + i) for i in range(12)]
    results = cinecut_engine.run_inference_stage(
        records, scene.model, scene.mmproj, port=0, slots=6, servers_per_gpu=3
    )
    assert all(scene_ is not None for _, scene_ in results)
    spawned = [e for e in scene.server_events() if e["event"] == "spawned"]
    assert len(spawned) == 1 + 3
    # The GPU's six slots, split over its three servers.
    assert all(e["args"][e["args"].index("-np") + 1] == "2" for e in spawned[1:])


@pytest.mark.parametrize(
    "options, says",
    [
        ({"slots": 0}, "option slots: 0"),
        ({"slots": True}, "option slots: True"),
        ({"slots": "many"}, "option slots: \"many\" is neither"),
        ({"servers_per_gpu": -2}, "option servers_per_gpu: -2"),
        ({"gpu": 1, "gpus": [0]}, "gpu and gpus"),
        ({"vram_probe": "psychic"}, "option vram_probe"),
        ({"port": True}, "port is True"),
        ({"port": 70000}, "port is 70000"),
    ],
)
def test_bad_options_are_refused_naming_the_option(scene, options, says):
    with pytest.raises(ValueError, match=says):
        LlavaEngine(scene.model, scene.mmproj, **options)


def test_the_options_docstring_lists_every_option_the_engine_takes():
    documented = LlavaEngine.__doc__ or ""
    assert cinecut_engine.OPTIONS == list(_engine.OPTIONS)
    for option in cinecut_engine.OPTIONS:
        assert f"``{option}``" in documented, option


def test_misuse_of_a_running_engine_is_refused_and_leaves_it_serving(scene):
    record = scene.frame("m.png")
    engine = LlavaEngine(scene.model, scene.mmproj, port=0)
    with engine:
        # A second `with` on the running engine: refused, and its end cannot stop the first.
        with pytest.raises(RuntimeError, match="already in a `with` block"):
            with engine:
                pass
        assert engine.running and engine.describe(record) is not None
        with pytest.raises(ValueError, match="concurrency is -1"):
            engine.describe_frames([record], concurrency=-1)
        # Stopping the engine from its own progress callback: refused (it used to wait for ever).
        def stop_here(done: int, total: int) -> None:
            engine.__exit__(None, None, None)

        with pytest.raises(RuntimeError, match="progress_callback"):
            engine.describe_frames([record, record], progress_callback=stop_here)
        assert engine.running and engine.describe(record) is not None
    assert not engine.running


def test_a_failed_swap_check_leaves_the_running_engine_serving(scene):
    record = scene.frame("w.png")
    with LlavaEngine(scene.model, scene.mmproj, port=0) as vision:
        pid = vision.pid
        missing = TextEngine(scene.model, port=0, server_bin=str(scene.root / "no-llama-server"))
        with pytest.raises(StartError, match="llama-server not found"):
            vision.swap(missing)
        assert vision.running and vision.pid == pid and vision.describe(record) is not None


def test_every_gpu_leaves_out_the_one_this_thread_holds(scene, monkeypatch, caplog):
    monkeypatch.setenv("NVSMI_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GPU_LOCK:
        with caplog.at_level(logging.WARNING, logger="cinecut_engine"):
            with LlavaEngine(scene.model, scene.mmproj, gpus="all") as engine:
                assert engine.gpus == [1]
    assert "this thread holds its lock" in caplog.text
    assert cinecut_engine.gpu_lock(1).acquire(blocking=False)
    cinecut_engine.gpu_lock(1).release()

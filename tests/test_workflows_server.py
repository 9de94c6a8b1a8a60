"""The example workflows (example_workflows/*.json, UI format) run on a real ComfyUI server.

One ``main.py`` server for the module, with the pack installed and a tiny SD1.5-shaped
checkpoint. Each workflow is converted to the API format (devkit/workflow_convert.py,
widget order from /object_info), shrunk (tiny checkpoint, 64x64, few steps and prompts)
and queued; the test checks the images and the summaries the FIA nodes send to the UI.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from devkit import harness as H
from devkit import workflow_convert as WC

pytestmark = [pytest.mark.server]

WORKFLOWS_DIR = H.REPO_ROOT / "example_workflows"
EXAMPLES = ["FIA_forget_imagenette", "FIA_forget_artists", "FIA_remove_nudity", "FIA_before_after"]
TINY_CKPT = "fia_tiny_sd15.safetensors"
REAL_CKPT = "v1-5-pruned-emaonly.safetensors"
FIA_SMALL = dict(steps=4, saliency_steps=2, width=64, height=64, num_prompts=2, batch_size=2)


@pytest.fixture(scope="module")
def server(comfy, tiny_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("workflows_server")
    with H.ComfyServer(base, models={f"checkpoints/{TINY_CKPT}": tiny_checkpoint},
                       wait_for="/object_info/FIAFuseMasks") as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def load_example(name: str) -> dict:
    return json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())


def shrink(prompt: dict) -> dict:
    """The tiny checkpoint, 64x64, few steps and prompt pairs: seconds of CPU."""
    assert WC.set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=TINY_CKPT) == 1
    WC.set_inputs(prompt, "FIAForgetConcepts", **FIA_SMALL)
    WC.set_inputs(prompt, "FIAConceptSaliency", **FIA_SMALL)
    WC.set_inputs(prompt, "KSampler", steps=2)
    WC.set_inputs(prompt, "EmptyLatentImage", width=64, height=64, batch_size=1)
    return prompt


def node_of(prompt: dict, class_type: str) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] == class_type]


def concept_lines(text: str) -> list[str]:
    """The concept names of a FIAForgetConcepts text (the 'concept: r2' suffix removed)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            m = re.match(r"^(.+?)\s*:\s*[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?\s*$", line)
            out.append(m.group(1).strip() if m else line)
    return out


def check_summary(summary: dict, concepts: list[str], kind: str) -> None:
    assert summary["kind"] == kind
    assert summary["concepts"] == concepts
    assert 0.0 < summary["pruned_fraction"] < 0.5, summary
    assert summary["pruned"] > 0
    assert 0 < summary["layers_touched"] <= summary["layers"] == H.TINY_SD15_FFN2_COUNT
    assert summary["agnostic_kept"] >= 0


def mask_facts(summary: dict) -> dict:
    """A summary without what depends on the run (cache use, warnings)."""
    return {k: v for k, v in summary.items() if k not in ("cached", "warnings")}


def saved_images(server, entry: dict, node_id: str) -> list[np.ndarray]:
    images = entry["outputs"][node_id]["images"]
    assert images, f"node {node_id} saved no image"
    out = []
    for img in images:
        path = server.base_dir / img["type"] / img["subfolder"] / img["filename"]
        assert path.is_file(), path
        out.append(np.asarray(Image.open(path)))
    return out


# -- the example files ------------------------------------------------------------------

def test_examples_present_with_thumbnails():
    names = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    assert names == sorted(EXAMPLES)
    for name in EXAMPLES:
        assert (WORKFLOWS_DIR / f"{name}.jpg").is_file(), f"{name}.jpg thumbnail missing"
        assert Image.open(WORKFLOWS_DIR / f"{name}.jpg").format == "JPEG"
        wf = load_example(name)
        ckpts = [n for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple"]
        assert len(ckpts) == 1 and ckpts[0]["widgets_values"] == [REAL_CKPT]


def test_templates_served(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get(H.PACK_DIR_NAME, [])) == sorted(EXAMPLES), templates
    for name in EXAMPLES:
        assert server.get(f"/api/workflow_templates/{H.PACK_DIR_NAME}/{name}.json") == load_example(name)
        jpg = server.get(f"/api/workflow_templates/{H.PACK_DIR_NAME}/{name}.jpg", raw=True)
        assert jpg[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_use_only_known_nodes(object_info, name):
    wf = load_example(name)
    unknown = {n["type"] for n in wf["nodes"]} - set(object_info) - WC.FRONTEND_ONLY
    assert not unknown
    prompt = WC.convert(wf, object_info)  # raises on any widget-count mismatch
    assert {v["class_type"] for v in prompt.values()} >= {"CheckpointLoaderSimple", "KSampler", "SaveImage"}


# -- running them -----------------------------------------------------------------------

@pytest.mark.parametrize("name, concepts_expected, template, alpha", [
    ("FIA_forget_imagenette", ["tench", "English springer", "cassette player", "chain saw", "church",
                               "French horn", "garbage truck", "gas pump", "golf ball", "parachute"], "objects", 0.6),
    ("FIA_forget_artists", ["Van Gogh", "Pablo Picasso", "Claude Monet", "Salvador Dali", "Leonardo da Vinci"],
     "art_style", 0.8),
    ("FIA_remove_nudity", ["naked"], "explicit", 0.6),
])
def test_forget_workflow_runs(server, object_info, name, concepts_expected, template, alpha):
    prompt = shrink(WC.convert(load_example(name), object_info))
    [fc] = node_of(prompt, "FIAForgetConcepts")
    inputs = prompt[fc]["inputs"]
    assert concept_lines(inputs["concepts"]) == concepts_expected
    assert (inputs["template"], inputs["alpha"], inputs["r1"]) == (template, alpha, 0.05)
    entry = server.run(prompt, timeout=600)

    [summary] = entry["outputs"][fc]["fia_summary"]
    check_summary(summary, concepts_expected, "fused")
    if len(concepts_expected) == 1:  # tau_ca = max(2, ...) > 1: nothing is concept-agnostic
        assert summary["agnostic_kept"] == 0
    [info] = node_of(prompt, "FIAMaskInfo")
    # the same mask facts (the forget node's summary also says what came from the cache and its warnings)
    assert [mask_facts(s) for s in entry["outputs"][info]["fia_summary"]] == [mask_facts(summary)]
    [report] = entry["outputs"][info]["text"]
    assert all(c in report.splitlines()[0] for c in concepts_expected)
    [save] = node_of(prompt, "SaveImage")
    [image] = saved_images(server, entry, save)
    assert image.shape == (64, 64, 3)
    for mask_node in node_of(prompt, "FIASaveMask"):
        [saved] = entry["outputs"][mask_node]["fia_summary"]
        assert saved["concepts"] == concepts_expected
        assert (server.base_dir / "models" / "fia_masks" / saved["file"]).is_file()


def test_before_after_workflow_runs(server, object_info):
    prompt = shrink(WC.convert(load_example("FIA_before_after"), object_info))
    saliency_nodes = node_of(prompt, "FIAConceptSaliency")
    concepts = [prompt[k]["inputs"]["concept"] for k in saliency_nodes]
    assert concepts == ["golf ball", "parachute"]
    [fuse] = node_of(prompt, "FIAFuseMasks")
    assert sorted(k for k in prompt[fuse]["inputs"] if k.startswith("mask_")) == ["mask_1", "mask_2"]
    samplers = node_of(prompt, "KSampler")
    assert len({prompt[k]["inputs"]["seed"] for k in samplers}) == 1, "before/after must share the seed"
    entry = server.run(prompt, timeout=600)

    for k in saliency_nodes:
        [s] = entry["outputs"][k]["fia_summary"]
        assert s["text"].startswith(prompt[k]["inputs"]["concept"])
    for k in node_of(prompt, "FIABuildConceptMask"):
        [s] = entry["outputs"][k]["fia_summary"]
        assert s["kind"] == "concept" and len(s["concepts"]) == 1
        check_summary(s, s["concepts"], "concept")
    [fused] = entry["outputs"][fuse]["fia_summary"]
    check_summary(fused, concepts, "fused")
    by_title = {prompt[k]["_meta"]["title"]: k for k in node_of(prompt, "SaveImage")}
    [before] = saved_images(server, entry, by_title["Before"])
    [after] = saved_images(server, entry, by_title["After"])
    assert before.shape == after.shape == (64, 64, 3)
    assert not np.array_equal(before, after), "the erased model gave the same image as the original"


def _saliency(concept: str) -> dict:
    return {"class_type": "FIAConceptSaliency", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "concept": concept, "template": "objects", "r1": 0.05,
        "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "seed": 0, "mode": "fast", **FIA_SMALL}}


@pytest.mark.parametrize("linked", [("mask_1", "mask_2", "mask_3"), ("mask_1", "mask_3")])
def test_fuse_masks_accepts_frontend_added_inputs(server, linked):
    """mask_3 is not declared in INPUT_TYPES (the editor adds it): ComfyUI still validates,
    passes it through **kwargs and the fusion sees every linked mask, gaps allowed."""
    concepts = ["golf ball", "parachute", "church"][:len(linked)]
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT}}}
    fuse_inputs = {"alpha": 0.6, "fusion": "concept-agnostic"}
    for i, (slot, concept) in enumerate(zip(linked, concepts)):
        g[f"s{i}"] = _saliency(concept)
        g[f"m{i}"] = {"class_type": "FIABuildConceptMask", "inputs": {"saliency": [f"s{i}", 0], "r2": 0.03}}
        fuse_inputs[slot] = [f"m{i}", 0]
    g["fuse"] = {"class_type": "FIAFuseMasks", "inputs": fuse_inputs}
    g["info"] = {"class_type": "FIAMaskInfo", "inputs": {"mask": ["fuse", 0]}}
    entry = server.run(g, timeout=300)
    [summary] = entry["outputs"]["fuse"]["fia_summary"]
    check_summary(summary, concepts, "fused")
    assert f"'num_concepts': {len(concepts)}" in entry["outputs"]["info"]["text"][0]


# -- bad input through the server: what the user sees ---------------------------------------

def _forget_graph(**inputs) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT}},
        "fc": {"class_type": "FIAForgetConcepts", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "concepts": "golf ball", "template": "objects",
            "r1": 0.05, "r2": 0.03, "alpha": 0.6, "strength": 1.0, "fusion": "concept-agnostic", "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "seed": 0, "mode": "fast", **FIA_SMALL, **inputs}},
        "info": {"class_type": "FIAMaskInfo", "inputs": {"mask": ["fc", 1]}},
    }


def _execution_error(server, graph: dict, timeout: float = 120.0) -> dict:
    """The execution_error message of a prompt that must fail while running."""
    prompt_id = server.post_prompt(graph)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            status = entry.get("status") or {}
            assert status.get("status_str") == "error", f"the prompt did not fail: {status}"
            [error] = [m[1] for m in status["messages"] if m[0] == "execution_error"]
            return error
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} not finished after {timeout} s")


@pytest.mark.parametrize("inputs, name, fragment", [
    ({"r2": float("nan")}, "r2", "finite"),  # JSON NaN: ComfyUI's min/max checks let it through
    ({"cfg": float("nan")}, "cfg", "finite"),
    ({"concepts": "golf ball\ncross: abc"}, "concepts", "line 2 ('cross: abc')"),
    ({"concepts": "\u200b"}, "concepts", "is empty"),
    ({"template": "custom", "custom_template": "a {place}"}, "custom_template", "{concept}"),
])
def test_bad_inputs_name_node_and_input_with_a_short_type(server, inputs, name, fragment):
    error = _execution_error(server, _forget_graph(**inputs))
    assert error["node_id"] == "fc" and error["node_type"] == "FIAForgetConcepts"
    message = error["exception_message"]
    assert message.startswith(f"FIAForgetConcepts: input '{name}'") and fragment in message, message
    assert error["exception_type"] == "fia.FIAInputError", error["exception_type"]


def test_sampler_without_per_step_saliency_is_refused_before_running(server):
    status, _, body = server.request("POST", "/prompt", {"prompt": _forget_graph(sampler_name="dpm_adaptive")})
    assert status == 400, body[:2000]
    [error] = json.loads(body)["node_errors"]["fc"]["errors"]
    assert error["extra_info"]["input_name"] == "sampler_name"
    assert "dpm_adaptive" in error["details"]


def test_cache_use_and_warnings_reach_the_node(server):
    concepts = "garbage truck\nFrench horn"
    first = server.run(_forget_graph(concepts=concepts, seed=5), timeout=300)
    [s1] = first["outputs"]["fc"]["fia_summary"]
    assert s1["cached"] == [] and isinstance(s1["warnings"], list)
    again = server.run(_forget_graph(concepts=concepts, seed=5, r2=0.04), timeout=300)  # r2 only: no sampling
    [s2] = again["outputs"]["fc"]["fia_summary"]
    assert s2["cached"] == ["garbage truck", "French horn"]
    assert any("cache" in w and "garbage truck" in w for w in s2["warnings"])


# -- the token-count route of the concept warnings ----------------------------------------

def test_check_concepts_route(server):
    long_concept = " ".join(["golden"] * 80)
    r = server.post("/api/fia/check_concepts", {
        "concepts": ["golf ball", long_concept], "template": "objects", "base_prompts": ["a {place} at dusk"]})
    assert r["limit"] == 75
    short, long_ = r["concepts"]
    assert (short["concept"], short["tokens"], short["truncated"]) == ("golf ball", 2, False)
    assert 5 <= short["prompt_tokens"] < 15 and "golf ball" in short["longest_prompt"]
    assert long_["tokens"] == 80 and long_["prompt_tokens"] > 80 and long_["truncated"] is True
    [base] = r["base_prompts"]
    assert base["truncated"] is False and "{place}" not in base["longest_prompt"]
    # the route is also served without the /api prefix; bad bodies get HTTP 400 with a reason
    assert server.post("/fia/check_concepts", {"concepts": ["x"], "template": "art_style"})["concepts"][0]["prompt_tokens"] > 1
    status, _, body = server.request("POST", "/api/fia/check_concepts", {"concepts": "golf ball"})
    assert status == 400 and b"list of strings" in body

"""Never silently wrong, on the nodes (issue 11 items 2, 3, 5; issue 10 item 5): bad input
is refused naming the node and the input, error types are short, and every warning the pack
logs is on the node's summary too. A real, in-process ComfyUI 0.3.75 with tiny models.

Ground truths are planted by the tests (a saliency of zeros, two masks with the same
content, masks built on two checkpoints, damaged files) or come from ComfyUI's own code
(execution.full_type_name for the error type the user sees).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch

from devkit import harness as H

SMALL = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
             width=64, height=64, mode="fast", batch_size=2, num_prompts=4)
FORGET = dict(template="objects", r1=0.05, r2=0.05, alpha=0.6, strength=1.0, **SMALL)


@pytest.fixture(scope="session")
def pack(comfy):
    return H.load_pack()


@pytest.fixture
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


def result(out):
    return out["result"] if isinstance(out, dict) else out


def saliency_of(nodes, model, clip, concept="golf ball", **kw):
    return result(nodes["FIAConceptSaliency"].compute(model, clip, concept, "objects", 0.05, **{**SMALL, **kw}))[0]


def mask_of(nodes, model, clip, concept="golf ball", r2=0.05, **kw):
    return result(nodes["FIABuildConceptMask"].build(saliency_of(nodes, model, clip, concept, **kw), r2))[0]


def forget(nodes, model, clip, concepts, **kw):
    args = {**FORGET, **kw}
    return nodes["FIAForgetConcepts"].forget(model, clip, concepts, args.pop("template"), args.pop("r1"),
                                             args.pop("r2"), args.pop("alpha"), args.pop("strength"), **args)


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


def shown_type(error: BaseException) -> str:
    """The error type ComfyUI puts in its execution_error message."""
    import execution

    return execution.full_type_name(type(error))


def assert_user_error(info, node: str, name: str | None = None):
    """A ValueError whose message names the node (and the input), with a short type."""
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith(f"{node}: "), msg
    if name is not None:
        assert f"input '{name}'" in msg, msg
    shown = shown_type(info.value)
    assert "/" not in shown and "\\" not in shown and H.PACK_DIR_NAME not in shown, shown
    return msg


# -- concept text (issue 11 item 2) ---------------------------------------------------------

@pytest.mark.parametrize("line", ["cross: abc", "cross: -1", "cross: nan", "cross: 0,2", "cross: 0.9",
                                  "Star Wars: Episode IV", 'a "quoted" word'])
def test_bad_r2_suffix_is_refused_naming_the_line(comfy, nodes, tiny_sd15, tiny_clip, line):
    with pytest.raises(ValueError) as e:
        forget(nodes, tiny_sd15, tiny_clip, f"golf ball\n{line}")
    msg = assert_user_error(e, "FIAForgetConcepts", "concepts")
    assert f"line 2 ('{line}')" in msg
    assert hooks_left(tiny_sd15) == 0 and not tiny_sd15.patches


@pytest.mark.parametrize("text", ["\u200b", "\u200b\n \u2060 \n\ufeff"])
def test_invisible_only_lines_are_no_concept(comfy, nodes, tiny_sd15, tiny_clip, text):
    with pytest.raises(ValueError) as e:
        forget(nodes, tiny_sd15, tiny_clip, text)
    assert "'concepts' is empty" in assert_user_error(e, "FIAForgetConcepts", "concepts")


def test_duplicates_are_found_on_normalised_text(comfy, nodes, tiny_sd15, tiny_clip):
    with pytest.raises(ValueError) as e:  # NBSP + a double space + a zero-width space: the same concept
        forget(nodes, tiny_sd15, tiny_clip, "golf ball\nparachute\nGolf\u00a0 \u200bBall")
    msg = assert_user_error(e, "FIAForgetConcepts", "concepts")
    assert "line 3" in msg and "golf ball" in msg and "Golf Ball" in msg


def test_quoted_concept_may_end_in_a_number(comfy, nodes, tiny_sd15, tiny_clip):
    out = forget(nodes, tiny_sd15, tiny_clip, '"Area: 51": 0.03\n"Route: 66"\nparachute')
    fused = result(out)[1]
    assert fused.concepts == ("Area: 51", "Route: 66", "parachute")
    assert [s.params["r2"] for s in fused.sources] == [0.03, 0.05, 0.05]
    granular = mask_of(nodes, tiny_sd15, tiny_clip, "Area: 51", r2=0.03)
    for key in granular.layers:
        assert torch.equal(fused.sources[0].layers[key].indices, granular.layers[key].indices)


def test_concept_saliency_normalises_its_concept(comfy, nodes, tiny_sd15, tiny_clip):
    plain = saliency_of(nodes, tiny_sd15, tiny_clip, "chain saw", seed=41)
    out = nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, " chain\u200b\u00a0 saw\t", "objects", 0.05,
                                              **{**SMALL, "seed": 41})
    odd = result(out)[0]
    assert odd.concept == "chain saw"
    assert [p.concept_prompt for p in odd.prompts] == [p.concept_prompt for p in plain.prompts]
    assert out["ui"]["fia_summary"][0]["cached"] is True  # the same saliency, so the same cache entry


# -- inputs that cannot work (issue 11 item 3) -----------------------------------------------

def test_forget_concepts_has_custom_template_and_base_prompts(comfy, pack, nodes, tiny_sd15, tiny_clip):
    optional = pack.NODE_CLASS_MAPPINGS["FIAForgetConcepts"].INPUT_TYPES()["optional"]
    assert {"custom_template", "base_prompts"} <= set(optional)
    custom = dict(template="custom", custom_template="a {concept} on a {place}",
                  base_prompts="an empty {place}\na photo of a {place}")
    fused = result(forget(nodes, tiny_sd15, tiny_clip, "red cube", **custom))[1]
    sal = result(nodes["FIAConceptSaliency"].compute(
        tiny_sd15, tiny_clip, "red cube", "custom", 0.05, custom_template=custom["custom_template"],
        base_prompts=custom["base_prompts"], **SMALL))[0]
    assert all(p.concept_prompt.startswith("a red cube on a ") for p in sal.prompts)
    expected = result(nodes["FIABuildConceptMask"].build(sal, 0.05))[0]
    assert fused.stats()["total_pruned"] > 0
    for key in expected.layers:  # one concept: the fused mask prunes its concept mask
        assert torch.equal(fused.layers[key].indices, expected.layers[key].indices)
    with pytest.raises(ValueError) as e:
        forget(nodes, tiny_sd15, tiny_clip, "red cube", template="custom", custom_template="a {place}")
    assert_user_error(e, "FIAForgetConcepts", "custom_template")


@pytest.mark.parametrize("sampler", ["dpm_adaptive", "dpm_fast"])
def test_samplers_without_per_step_saliency_are_refused_by_name(comfy, pack, nodes, tiny_sd15, tiny_clip, sampler):
    for node in ("FIAConceptSaliency", "FIAForgetConcepts"):
        cls = pack.NODE_CLASS_MAPPINGS[node]
        assert sampler in cls.INPUT_TYPES()["required"]["sampler_name"][0]  # saved workflows still load
        verdict = cls.VALIDATE_INPUTS(sampler_name=sampler)  # ComfyUI refuses the prompt before it runs
        assert isinstance(verdict, str) and sampler in verdict
        assert cls.VALIDATE_INPUTS(sampler_name="euler") is True
        assert cls.VALIDATE_INPUTS(sampler_name="no_such_sampler") is not True
        assert cls.VALIDATE_INPUTS() is True  # a linked sampler is checked when the node runs
    with pytest.raises(ValueError) as e:
        nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "cat", "objects", 0.05,
                                            **{**SMALL, "sampler_name": sampler})
    assert sampler in assert_user_error(e, "FIAConceptSaliency", "sampler_name")
    with pytest.raises(ValueError) as e:
        forget(nodes, tiny_sd15, tiny_clip, "cat", sampler_name=sampler)
    assert sampler in assert_user_error(e, "FIAForgetConcepts", "sampler_name")
    assert hooks_left(tiny_sd15) == 0 and not tiny_sd15.patches


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["r1", "r2", "alpha", "strength", "cfg"])
def test_non_finite_forget_inputs_are_named(comfy, nodes, tiny_sd15, tiny_clip, name, value):
    with pytest.raises(ValueError) as e:
        forget(nodes, tiny_sd15, tiny_clip, "golf ball", **{name: value})
    assert "finite" in assert_user_error(e, "FIAForgetConcepts", name)
    assert hooks_left(tiny_sd15) == 0 and not tiny_sd15.patches


def test_non_finite_inputs_of_the_other_nodes_are_named(comfy, nodes, tiny_sd15, tiny_clip):
    nan = math.nan
    for name in ("r1", "cfg"):
        args = {**SMALL, "cfg": nan} if name == "cfg" else SMALL
        with pytest.raises(ValueError) as e:
            nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "cat", "objects", nan if name == "r1" else 0.05,
                                                **args)
        assert_user_error(e, "FIAConceptSaliency", name)
    mask = mask_of(nodes, tiny_sd15, tiny_clip)
    sal = saliency_of(nodes, tiny_sd15, tiny_clip)
    cases = [
        ("FIABuildConceptMask", "r2", lambda: nodes["FIABuildConceptMask"].build(sal, nan)),
        ("FIAFuseMasks", "alpha", lambda: nodes["FIAFuseMasks"].fuse(mask, nan)),
        ("FIAApplyMask", "strength", lambda: nodes["FIAApplyMask"].apply(tiny_sd15, mask, nan)),
        ("FIAApplyMask", "strength", lambda: nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.5)),
    ]
    for node, name, call in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert_user_error(e, node, name)
    assert not tiny_sd15.patches


def _pack_dir_save(pack):
    from pathlib import Path

    return Path(pack.nodes.mask_folder.save_dir())


@pytest.mark.parametrize("prefix, fragment", [
    ("bad\x00name", "control character"),
    ("x" * 300, "at most"),
    ("sub/" + "y" * 250, "at most"),
])
def test_save_mask_bad_prefix_is_the_packs_own_message(comfy, pack, nodes, tiny_sd15, tiny_clip, prefix, fragment):
    mask = mask_of(nodes, tiny_sd15, tiny_clip)
    before = set(_pack_dir_save(pack).rglob("*")) if _pack_dir_save(pack).exists() else set()
    with pytest.raises(ValueError) as e:
        nodes["FIASaveMask"].save(mask, prefix)
    assert fragment in assert_user_error(e, "FIASaveMask", "filename_prefix")
    after = set(_pack_dir_save(pack).rglob("*")) if _pack_dir_save(pack).exists() else set()
    assert not {p for p in after - before if p.is_file()}


def _write_file(pack, name: str, header: str | None, tensors=None):
    from safetensors.torch import save_file

    path = _pack_dir_save(pack) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"layer0": torch.zeros(1, dtype=torch.int32)}, str(path),
              metadata=None if header is None else {"fia_mask": header})
    return path


@pytest.mark.parametrize("case", ["nested", "not_json", "no_header", "garbage", "truncated", "missing"])
def test_load_mask_damaged_files_are_the_packs_own_message(comfy, pack, nodes, tiny_sd15, tiny_clip, case):
    name = f"damaged_{case}.safetensors"
    if case == "nested":  # a deeply nested JSON header: json raises RecursionError
        _write_file(pack, name, "[" * 200_000 + "]" * 200_000)
    elif case == "not_json":
        _write_file(pack, name, "{not json")
    elif case == "no_header":
        _write_file(pack, name, None)
    elif case == "garbage":
        (_pack_dir_save(pack) / name).write_bytes(b"\x00\xff" * 64)
    elif case == "truncated":
        mask = mask_of(nodes, tiny_sd15, tiny_clip)
        nodes["FIASaveMask"].save(mask, "to_truncate")
        [good] = sorted(_pack_dir_save(pack).glob("to_truncate_*.safetensors"))[-1:]
        data = good.read_bytes()
        (_pack_dir_save(pack) / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        nodes["FIALoadMask"].load(name)
    msg = assert_user_error(e, "FIALoadMask", "mask_name")
    assert name in msg
    assert "Traceback" not in msg and "RecursionError" not in shown_type(e.value)


# -- warnings on the node (issue 11 item 5, issue 10 item 5) ---------------------------------

def _warnings(out) -> list[str]:
    [summary] = out["ui"]["fia_summary"]
    assert isinstance(summary.get("warnings"), list)
    return summary["warnings"]


def _logged(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_apply_to_another_checkpoint_warns_on_the_node(comfy, nodes, tiny_sd15, tiny_clip, caplog):
    mask = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    other = H.tiny_sd15_model(seed=1)
    with caplog.at_level(logging.WARNING):
        out = nodes["FIAApplyMask"].apply(other, mask, 1.0)
    [warning] = [w for w in _warnings(out) if "checkpoint" in w]
    assert "another" in warning and "golf ball" in warning
    assert warning in _logged(caplog)
    assert out["ui"]["fia_summary"][0]["concepts"] == ["golf ball"]
    same = nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0)
    assert not [w for w in _warnings(same) if "checkpoint" in w]


def test_mask_that_prunes_nothing_says_so(comfy, pack, nodes, tiny_sd15, tiny_clip, caplog):
    sal = saliency_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    zero = dataclasses.replace(sal, columns={k: torch.zeros_like(v) for k, v in sal.columns.items()})
    with caplog.at_level(logging.WARNING):
        out = nodes["FIABuildConceptMask"].build(zero, 0.05)
    assert result(out)[0].stats()["total_pruned"] == 0  # the planted case
    warnings = _warnings(out)
    assert warnings and all(w in _logged(caplog) for w in warnings)
    ok = nodes["FIABuildConceptMask"].build(sal, 0.05)
    assert result(ok)[0].stats()["total_pruned"] > 0
    assert _warnings(ok) == pack.fia_core.mask_warnings(result(ok)[0])  # what fia_core says about it, nothing else
    # a fused mask that prunes nothing: three copies of one mask, all kept as concept-agnostic
    mask = result(ok)[0]
    copies = [dataclasses.replace(mask, concepts=(c,)) for c in ("golf ball", "tennis ball", "ping-pong ball")]
    fused_out = nodes["FIAFuseMasks"].fuse(copies[0], 0.6, mask_2=copies[1], mask_3=copies[2])
    assert result(fused_out)[0].stats()["total_pruned"] == 0
    fused_warnings = _warnings(fused_out)
    assert len(fused_warnings) >= 2 and any("identical" in w for w in fused_warnings)


def test_fuse_identical_masks_and_other_checkpoints_warn(comfy, nodes, tiny_sd15, tiny_clip, caplog):
    a = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    b = mask_of(nodes, tiny_sd15, tiny_clip, "parachute")
    clean = nodes["FIAFuseMasks"].fuse(a, 0.6, mask_2=b)
    assert not [w for w in _warnings(clean) if "identical" in w or "checkpoint" in w]
    twin = dataclasses.replace(a, concepts=("tennis ball",))
    with caplog.at_level(logging.WARNING):
        out = nodes["FIAFuseMasks"].fuse(a, 0.6, mask_2=b, mask_3=twin)
    [same] = [w for w in _warnings(out) if "identical" in w]
    assert "golf ball" in same and "tennis ball" in same and same in _logged(caplog)
    other = mask_of(nodes, H.tiny_sd15_model(seed=1), tiny_clip, "church")
    out = nodes["FIAFuseMasks"].fuse(a, 0.6, mask_2=other)
    assert [w for w in _warnings(out) if "checkpoint" in w]


def test_forget_concepts_says_which_concepts_came_from_the_cache(comfy, nodes, tiny_sd15, tiny_clip, caplog):
    forget(nodes, tiny_sd15, tiny_clip, "golf ball\ncassette player", seed=51)
    with caplog.at_level(logging.WARNING):
        out = forget(nodes, tiny_sd15, tiny_clip, "golf ball\ncassette player\nFrench horn", seed=51)
    [summary] = out["ui"]["fia_summary"]
    assert summary["cached"] == ["golf ball", "cassette player"]
    cache_lines = [w for w in summary["warnings"] if "cache" in w]
    assert any("golf ball" in w for w in cache_lines) and any("cassette player" in w for w in cache_lines)
    assert not any("French horn" in w for w in cache_lines)
    assert all(w in _logged(caplog) for w in summary["warnings"])


def test_saliency_node_says_it_used_the_cache(comfy, nodes, tiny_sd15, tiny_clip):
    first = nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "garbage truck", "objects", 0.05,
                                                **{**SMALL, "seed": 61})
    assert first["ui"]["fia_summary"][0]["cached"] is False and _warnings(first) == []
    again = nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "garbage truck", "objects", 0.05,
                                                **{**SMALL, "seed": 61})
    assert again["ui"]["fia_summary"][0]["cached"] is True
    assert any("cache" in w for w in _warnings(again))


def test_every_pack_warning_logged_during_a_run_is_on_the_node(comfy, pack, nodes, tiny_sd15, tiny_clip, caplog):
    """Whatever module of the pack logs a warning while a node runs, the node shows it."""
    mask = mask_of(nodes, tiny_sd15, tiny_clip)
    core_log = logging.getLogger(pack.fia_core.__name__ + ".planted")
    original = pack.nodes.nodes_apply.apply_mask

    def noisy(*a, **kw):
        core_log.warning("planted warning %d", 7)
        return original(*a, **kw)

    pack.nodes.nodes_apply.apply_mask = noisy
    try:
        out = nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0)
    finally:
        pack.nodes.nodes_apply.apply_mask = original
    assert "planted warning 7" in _warnings(out)
    assert "planted warning 7" not in _warnings(nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0))


# -- fusion: duplicates across inputs (issue 11 item 2, fia_core) ---------------------------

def test_fuse_refuses_the_same_concept_from_two_inputs(comfy, pack, nodes, tiny_sd15, tiny_clip):
    a = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    b = mask_of(nodes, tiny_sd15, tiny_clip, "Golf  Ball", seed=7)  # another node, another seed
    assert b.concepts == ("Golf Ball",)  # normalised by the saliency node
    with pytest.raises(ValueError) as e:
        nodes["FIAFuseMasks"].fuse(a, 0.6, mask_2=b)
    msg = assert_user_error(e, "FIAFuseMasks")
    assert "golf ball" in msg and "Golf Ball" in msg


# -- error types ---------------------------------------------------------------------------

def test_error_types_do_not_show_the_packs_path(comfy, pack):
    common = pack.nodes.common
    for error in (common.FIAError("x: y"), common.FIAInputError("FIAX", "r2", "is bad")):
        shown = shown_type(error)
        assert shown.startswith("fia.") and "/" not in shown, shown
    assert json.dumps(shown_type(common.FIAInputError("a", "b", "c"))) == '"fia.FIAInputError"'


def test_library_errors_reach_the_user_with_node_name_and_short_type(comfy, nodes, tiny_sd15, tiny_sdxl,
                                                                     tiny_sdxl_clip):
    xl_mask = mask_of(nodes, tiny_sdxl, tiny_sdxl_clip, "golf ball")
    with pytest.raises(ValueError) as e:  # comfy_adapter's MaskMismatchError, re-raised by the node
        nodes["FIAApplyMask"].apply(tiny_sd15, xl_mask, 1.0)
    assert "TinySDXL" in assert_user_error(e, "FIAApplyMask")
    with pytest.raises(ValueError) as e:  # fia_core's own ValueError
        nodes["FIAFuseMasks"].fuse(xl_mask, 0.6, mask_2=xl_mask)
    assert_user_error(e, "FIAFuseMasks")
    with pytest.raises(ValueError) as e:  # not a mask on a mask input
        nodes["FIAFuseMasks"].fuse(xl_mask, 0.6, mask_2="golf ball")
    assert_user_error(e, "FIAFuseMasks")

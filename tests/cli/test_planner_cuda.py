"""The planner's CUDA terms (adazeta/engine/plan/measure.py `cuda_terms`): buffers a CUDA run allocates that a
CPU measurement does not see, sized here from the model's config by hand (vocabulary x hidden
values x bytes), not from the code under test."""

from __future__ import annotations

import pytest
from conftest import build_method_on

from adazeta.cli import plan as planner
from adazeta.engine.plan import line, measure
from adazeta.engine.plan.measure import GIB, CudaTerm, Measurement
from adazeta.errors import ConfigError
from adazeta.zo.spsa import CHUNK

VOCAB, HIDDEN = 30522, 64  # conf/model/tiny-llama.yaml: the embedding (and the untied LM head) is the largest tensor
EMBEDDING = VOCAB * HIDDEN


def stepped(*overrides: str):
    """The method of tiny-llama with `overrides` after one training step on CPU (its buffers exist)."""
    method, objective, task = build_method_on(["model=tiny-llama", "model.device=cpu", *overrides])
    batch = objective.encode(task.load().train[:4], train=True)
    method.step(objective.batch_loss(method.model, batch), 1, 1)
    return method


def by_name(terms: list[CudaTerm]) -> dict[str, CudaTerm]:
    return {t.name.split(":")[0]: t for t in terms}


def test_mezo_on_cuda_needs_a_z_scratch_of_the_embedding_in_the_base_dtype():
    terms = by_name(measure.cuda_terms(stepped("method=mezo"), "bfloat16", kept=set()))
    assert list(terms) == ["z scratch"]
    assert terms["z scratch"].cuda_gib == EMBEDDING * 2 / GIB
    assert "model.embed_tokens.weight" in terms["z scratch"].name or "lm_head.weight" in terms["z scratch"].name
    # On CPU the embedding's z is drawn chunk by chunk into a buffer of 2 CHUNK values; the scratch
    # holds only the z of tensors under 2 CHUNK values, drawn whole (fp32 here).
    assert terms["z scratch"].cpu_gib <= (2 * CHUNK + 2 * CHUNK) * 4 / GIB


def test_in_forward_sparse_mezo_on_cuda_adds_a_perturbed_copy_and_bool_masks():
    terms = by_name(measure.cuda_terms(stepped("method=sparse_mezo"), "bfloat16", kept=set()))
    assert list(terms) == ["z scratch", "update mask", "perturbed copy", "forward masks"]
    assert terms["z scratch"].cuda_gib == EMBEDDING * 2 / GIB
    assert terms["perturbed copy"].cuda_gib == EMBEDDING * 2 / GIB  # the embedding module owns one weight
    assert terms["update mask"].cuda_gib == terms["forward masks"].cuda_gib == 2 * EMBEDDING / GIB  # 2 bools a value
    # At this width (under sparse.BLOCK_MIN values) the CPU copies the embedding whole too, in fp32:
    assert terms["perturbed copy"].cpu_gib == EMBEDDING * 4 / GIB
    assert terms["forward masks"].cpu_gib == 2 * EMBEDDING / GIB


def test_in_place_sparse_mezo_has_no_forward_buffers():
    terms = by_name(measure.cuda_terms(stepped("method=sparse_mezo", "method.sparse.in_forward=false"), "float32", kept=set()))
    assert list(terms) == ["z scratch", "update mask"]
    assert terms["z scratch"].cuda_gib == EMBEDDING * 4 / GIB


def test_fp32_parameters_of_a_bf16_run_count_four_bytes():
    """MeZO-LoRA: the LoRA weights stay float32 in a bf16 run. The largest is lora_A of q_proj,
    r x hidden = 8 x 64 values."""
    method = stepped("method=mezo_lora")
    kept = {id(t.param) for t in method.trainables}
    (term,) = measure.cuda_terms(method, "bfloat16", kept=kept)
    assert term.cuda_gib == 8 * HIDDEN * 4 / GIB
    (term,) = measure.cuda_terms(method, "bfloat16", kept=set())  # were they bf16: half
    assert term.cuda_gib == 8 * HIDDEN * 2 / GIB


def test_first_order_methods_have_no_cuda_terms():
    assert measure.cuda_terms(stepped("method=ft"), "bfloat16", kept=set()) == []


def test_prediction_adds_the_terms_beside_the_converted_line():
    """Measured in fp32 and converted to bf16 (ratio 1/2): the conversion halved what the CPU
    held of a buffer, so a term adds its CUDA size minus half the CPU one."""
    one, m = (Measurement(layers=n, dtype="float32", peak_gib=1.0 + n, inference_gib=2.0, weights_gib=2.0,
                          kept_gib=0.0, params=0, trainable_params=0, step_s=0.0,
                          cuda_terms=[{"name": "z scratch: x", "source": "zo/spsa.py", "cuda_gib": 0.25, "cpu_gib": 0.1}])
              for n in (1, 2))
    assert isinstance(m.cuda_terms[0], CudaTerm)  # as read back from a child's JSON
    p = planner.Plan(model="m", method="mezo", depth=32, dtype="bfloat16", measured_dtype="float32", device="cpu",
                     batch="b", fit_layers=[1, 2], measurements=[one, m], a=1.0, b=0.5, a_inf=1.0, b_inf=0.25,
                     target_device="cuda", cuda_terms=m.cuda_terms)
    assert p.added_gib == pytest.approx(0.25 - 0.05)
    assert p.peak_gib == pytest.approx(1.0 + 0.5 * 32 + 0.20)
    text = planner.report(p)
    assert "| z scratch: x | zo/spsa.py | 0.2500 | 0.1000 | +0.2000 |" in text
    assert "= line 17.00 + CUDA terms 0.20" in text and "reserves more" in text
    assert "| mezo | bfloat16 | cuda | 17.20 | 0.20 |" in planner.summary_table([p])


@pytest.mark.parametrize(("target", "device", "expected"), [
    ("auto", "auto", "cuda"), ("auto", "cpu", "cpu"), ("auto", "cuda:1", "cuda"), ("cuda", "cpu", "cuda"),
])
def test_target_device(target, device, expected):
    assert line.target_device_of(target, device) == expected


def test_bad_target_device_names_the_choices():
    with pytest.raises(ConfigError, match="'tpu' is not a device type; choose one of auto, cpu, cuda"):
        line.target_device_of("tpu", "cpu")
    with pytest.raises(ConfigError, match="set model.device=cpu"):
        line.target_device_of("cpu", "cuda:0")


@pytest.mark.slow  # the planner's child processes
def test_cuda_plan_measured_on_cpu_carries_the_terms_through_its_child_processes():
    """The real planner (two fresh processes) at hidden 256, where the embedding is drawn in
    chunks and perturbed in row blocks on CPU: the z scratch is all CUDA's."""
    p = planner.plan(["model=tiny-llama", "model.arch.hidden_size=256", "model.arch.intermediate_size=512",
                      "model.device=cpu", "model.dtype=bfloat16", "train.batch_size=2", "method=mezo"],
                     fit=(1, 2), seq_len=16, threads=1, jobs=1, target_device="cuda", log=lambda s: None)
    (term,) = p.cuda_terms
    assert term.cuda_gib == VOCAB * 256 * 2 / GIB
    assert p.peak_gib == pytest.approx(p.a + p.b * p.depth + term.cuda_gib - term.cpu_gib / 2)
    assert p.reserved is None  # measured on CPU: no allocator to read
    assert "z scratch" in planner.report(p)

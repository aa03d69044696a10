"""The memory planner (adazeta/engine/plan/, adazeta/cli/plan.py): the line fit, the dtype conversion, and a real plan of
a small Llama whose extrapolation is checked against a measured deeper run."""

from __future__ import annotations

import pytest

from adazeta.cli import plan as planner
from adazeta.engine.plan.line import fit_line
from adazeta.engine.plan.measure import Measurement
from adazeta.errors import ConfigError

# A small Llama whose weights are large enough for the resident set to measure them well (about
# 16 MiB of embeddings and 4 MiB per layer), still seconds per measurement.
SMALL_LLAMA = ["model=tiny-llama", "model.arch.hidden_size=256", "model.arch.intermediate_size=1024",
               "model.device=cpu", "train.batch_size=8"]


def measurement(layers: int, peak: float, kept: float = 0.0, dtype: str = "float32") -> Measurement:
    return Measurement(layers=layers, dtype=dtype, peak_gib=peak, inference_gib=peak, weights_gib=peak,
                       kept_gib=kept, params=0, trainable_params=0, step_s=0.0)


def test_fit_line_is_exact_on_linear_data():
    xs = [1, 2, 4, 8, 32]
    a, b = fit_line(xs, [0.75 + 0.3125 * x for x in xs])
    assert a == pytest.approx(0.75, abs=1e-12) and b == pytest.approx(0.3125, abs=1e-12)
    a, b = fit_line([1, 2], [2.0, 2.8])  # two points: through both
    assert a + b * 32 == pytest.approx(2.0 + 0.8 * 31)


def test_fit_line_needs_two_depths():
    with pytest.raises(ValueError, match="two different depths"):
        fit_line([2, 2], [1.0, 1.1])


def test_bf16_conversion_keeps_method_parameters_in_fp32():
    # 10 GiB measured in fp32, of which 1 GiB are adapters: 1 + 9 / 2 in bf16; inference halves.
    peak, inference = measurement(1, 10.0, kept=1.0).converted("bfloat16")
    assert peak == pytest.approx(5.5) and inference == pytest.approx(5.0)
    assert measurement(1, 10.0, kept=1.0).converted("float32") == (pytest.approx(10.0), pytest.approx(10.0))


def test_plan_reports_checks_against_the_line():
    plan = planner.Plan(model="m", method="adazeta", depth=32, dtype="float32", measured_dtype="float32",
                        device="cpu", batch="16 x 64", fit_layers=[1, 2],
                        measurements=[measurement(1, 2.0), measurement(2, 2.8), measurement(4, 4.5)],
                        a=1.2, b=0.8, a_inf=1.2, b_inf=0.8)
    (m, pred, err), = plan.checks()
    assert m.layers == 4 and pred == pytest.approx(4.4) and err == pytest.approx(-0.1 / 4.5)
    assert plan.peak_gib == pytest.approx(1.2 + 0.8 * 32)
    text = planner.report(plan)
    assert "| 4 |" in text and "-2.2%" in text and "Predicted peak of adazeta on m" in text


def test_fit_with_one_depth_is_a_config_error():
    with pytest.raises(ConfigError, match="--fit 1"):
        planner.plan(SMALL_LLAMA, fit=(1,))


@pytest.fixture(scope="module")
def small_llama_plan() -> planner.Plan:
    """adazeta-plan on a small Llama in bf16: fitted on 1 and 2 layers, measured at 4 too (three
    fresh processes, in fp32 since this CPU has no fast bf16). Hidden 512 and intermediate 2048
    make a layer 15 MiB: the resident set moves by up to about 1 MiB between fresh processes, so a
    4 MiB layer (SMALL_LLAMA's) can look lighter than its weights."""
    return planner.plan([*SMALL_LLAMA, "model.arch.hidden_size=512", "model.arch.intermediate_size=2048",
                         "model.dtype=bfloat16"], fit=(1, 2), check=(4,), seq_len=32, threads=1, jobs=3,
                        log=lambda s: None)


@pytest.mark.slow  # the planner measures runs in child processes
def test_plan_of_a_small_llama_predicts_a_measured_deeper_run(small_llama_plan):
    """The line through 1 and 2 layers must be within 10% of the measured 4-layer peak (the
    planner's goal), and above the bytes of the 4-layer model's weights."""
    p = small_llama_plan
    assert [m.layers for m in p.measurements] == [1, 2, 4]
    (m4, predicted, err), = p.checks()
    assert abs(err) < 0.10, planner.report(p)
    assert predicted > m4.weights_gib
    # Each layer adds at least its weights.
    one, two = p.measurements[0], p.measurements[1]
    assert two.peak_gib - one.peak_gib >= 0.9 * (two.weights_gib - one.weights_gib)
    assert p.depth == 2 and m4.tokens == [8, 31]
    assert "| **2** |" in planner.report(p)


@pytest.mark.slow  # the planner measures runs in child processes
def test_bf16_plan_on_cpu_is_measured_in_fp32_and_converted(small_llama_plan):
    p = small_llama_plan
    assert p.measured_dtype == "float32" and p.dtype == "bfloat16"
    assert all(m.dtype == "float32" for m in p.measurements)
    one, two = p.measurements[0], p.measurements[1]
    assert 0 < one.kept_gib < one.weights_gib / 100  # the TT adapters stay fp32; the base halves
    a, b = fit_line([1, 2], [one.kept_gib + (one.peak_gib - one.kept_gib) / 2,
                             two.kept_gib + (two.peak_gib - two.kept_gib) / 2])
    assert (p.a, p.b) == (pytest.approx(a), pytest.approx(b))


def test_cli_bad_override_is_one_clear_error():
    with pytest.raises(SystemExit, match="Could not find 'method/nope'"):
        planner.main(["model=tiny-llama", "method=nope"])
    with pytest.raises(SystemExit, match="--fit 1: the line needs two or more different depths"):
        planner.main(["--fit", "1", "model=tiny-llama"])


@pytest.mark.slow  # the planner measures runs in child processes
def test_plan_with_parallel_queries_measures_the_replicated_step():
    """zo.parallel_queries=true plans the batched step (the loss is the objective's replicable
    `batch_loss`): 2Q replicas of the batch's activations show in the peak."""
    common = [*SMALL_LLAMA, "schedule=constant", "schedule.q=8"]
    kwargs = dict(fit=(1, 2), seq_len=32, threads=1, jobs=2, log=lambda s: None)
    seq = planner.plan(common, **kwargs)
    par = planner.plan([*common, "zo.parallel_queries=true"], **kwargs)
    for s, p in zip(seq.measurements, par.measurements, strict=True):
        assert p.trainable_params == s.trainable_params
        # One hidden state of 16 replicas x 8 x 31 tokens x 256 floats is 3.9 MiB; the sequential
        # step never holds it. Half of it, to stay clear of the resident set's page-level noise:
        assert p.peak_gib - s.peak_gib > 16 * 8 * 31 * 256 * 4 / 2 / 1024**3, (s.peak_gib, p.peak_gib)

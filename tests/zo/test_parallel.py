"""Parallel queries (adazeta/zo/parallel.py): the 2Q perturbed forwards of a step as batched forwards
over replicas of the batch, each replica with its own perturbed trainable weights.

Checked against the sequential path on the same seeds: the projected gradients, the losses and the
parameters after whole steps, with and without chunking; and that the base model is never written.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_method_on
from task_files import copa_files

from adazeta.errors import ConfigError
from adazeta.objectives import Objective
from adazeta.tasks import Example
from adazeta.zo.estimators import Sequential
from adazeta.zo.parallel import ParallelQueries
from adazeta.zo.spsa import query_seed


def setup(method: str, model: str, *extra: str, parallel: bool = True, max_replicas=None, task: str = "sst2"):
    overrides = [
        f"task={task}", "task.num_train=16", "task.num_dev=8", f"method={method}", f"model={model}",
        f"zo.parallel_queries={str(parallel).lower()}",
        f"zo.max_replicas={'null' if max_replicas is None else max_replicas}", *extra,
    ]
    return build_method_on(overrides)


def sst2_batch(obj: Objective, task, n: int = 4) -> dict[str, torch.Tensor]:
    return obj.encode(task.load().train[:n], train=True)


def trainable_state(m) -> list[torch.Tensor]:
    return [t.param.detach().clone() for t in m.trainables]


# Each case: (method, model, extra overrides). A classification head (tiny-bert) is trainable too,
# so it must be per-replica as well; tiny-llama scores candidates with a causal LM, tiny-roberta
# reads label words at the mask position (masked LM).
CASES = [
    ("adazeta", "tiny-llama", []),
    ("adazeta", "tiny-bert", []),
    ("adazeta", "tiny-roberta", []),
    ("mezo_lora", "tiny-bert", []),
    ("mezo_lora", "tiny-llama", []),
]


@pytest.mark.parametrize(("method", "model", "extra"), CASES)
@pytest.mark.parametrize("max_replicas", [None, 4, 2])
def test_parallel_projected_grads_equal_sequential(method, model, extra, max_replicas):
    """Q = 3: 6 replicas in one chunk, in chunks of 4 + 2 (4 does not divide 6), and in pairs."""
    m, obj, task = setup(method, model, "method.eps=1e-2", *extra, max_replicas=max_replicas)
    loss_fn = obj.batch_loss(m.model, sst2_batch(obj, task))
    seeds = [query_seed(0, 5, q) for q in range(3)]
    assert isinstance(m.step.estimator, ParallelQueries)
    before = trainable_state(m)
    parallel = m.step.estimator(loss_fn, seeds)
    assert all(torch.equal(a, t.param) for a, t in zip(before, m.trainables, strict=True))
    sequential = Sequential(m.step.spsa)(loss_fn, seeds)
    assert parallel.shape == (3, 2) and parallel.dtype == torch.float64
    g_par, g_seq = parallel[:, 0], sequential[:, 0]
    assert g_seq.abs().min() > 1e-3, "the perturbation must change the loss for the test to mean anything"
    # g = (L+ - L-) / (2 eps): float32 losses differ by ~1e-7 between batched and one-by-one
    # matmuls, i.e. ~1e-5 in g at eps = 1e-2.
    torch.testing.assert_close(g_par, g_seq, rtol=1e-3, atol=5e-5)
    torch.testing.assert_close(parallel[:, 1], sequential[:, 1], rtol=1e-5, atol=1e-6)


def test_parallel_handles_an_lm_loss_on_multi_token_continuations(tmp_path):
    """COPA at train time: the LM loss on the gold continuation, several tokens per row."""
    copa_files(tmp_path)  # the build path loads the task's splits
    m, obj, task = setup("adazeta", "tiny-llama", "method.eps=1e-2", f"task.data_dir={tmp_path}", "task.num_train=1",
                         "task.num_dev=1", task="copa", max_replicas=4)
    examples = [
        Example({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                 "choice2": "He fell asleep.", "question": "cause"}, 0,
                candidates=("He dropped a hammer on his foot.", "He fell asleep.")),
        Example({"premise": "It started to rain.", "choice1": "The sun came out.",
                 "choice2": "We opened our umbrellas.", "question": "effect"}, 1,
                candidates=("The sun came out.", "We opened our umbrellas.")),
    ]
    for train in (True, False):  # False: cross-entropy over two multi-token candidates per example
        batch = obj.encode(examples, train=train)
        assert int(batch["cand_lens"].max()) > 2
        loss_fn = obj.batch_loss(m.model, batch)
        with torch.no_grad():
            single = obj.forward(m.model, batch)[0]
            replicated = obj.forward(m.model, obj.replicate(batch, 3))[0]
        torch.testing.assert_close(replicated, single.repeat(3), rtol=1e-5, atol=1e-6)
        seeds = [query_seed(1, 2, q) for q in range(3)]
        torch.testing.assert_close(
            m.step.estimator(loss_fn, seeds)[:, 0], Sequential(m.step.spsa)(loss_fn, seeds)[:, 0], rtol=1e-3, atol=5e-5
        )


@pytest.mark.parametrize(("method", "model"), [("adazeta", "tiny-bert"), ("mezo_lora", "tiny-llama")])
def test_parallel_training_steps_equal_sequential(method, model):
    """Three whole steps (Q = 3, weight decay on) in parallel and sequential mode from the same
    start: the same trainable parameters, within float tolerance, and the same step results."""
    runs = {}
    for parallel in (False, True):
        m, obj, task = setup(method, model, "method.lr=1e-2", "method.weight_decay=0.1", parallel=parallel, max_replicas=4)
        start = trainable_state(m)
        loss_fn = obj.batch_loss(m.model, sst2_batch(obj, task))
        results = [m.step(loss_fn, step, 3) for step in (1, 2, 3)]
        runs[parallel] = (trainable_state(m), results)
    (seq_params, seq_results), (par_params, par_results) = runs[False], runs[True]
    moved = max(float((a - b).abs().max()) for a, b in zip(seq_params, start, strict=True))
    assert moved > 1e-4, "the steps must move the parameters for the comparison to mean anything"
    # The g_q agree to float32 rounding of the losses over 2 eps (~1e-4 relative), so the
    # parameters agree to a small fraction of how far the steps moved them.
    differ = max(float((a - b).abs().max()) for a, b in zip(seq_params, par_params, strict=True))
    assert differ < 1e-3 * moved, (differ, moved)
    for a, b in zip(seq_results, par_results, strict=True):
        assert b.forward_passes == a.forward_passes == 6
        # abs: a few float32 ulps of a loss near 0.7 (6e-8 each) over 2 eps = 2e-3 is ~1e-4.
        assert b.grads == pytest.approx(a.grads, rel=1e-3, abs=2e-4)


@pytest.mark.parametrize(("method", "model"), [("adazeta", "tiny-llama"), ("mezo_lora", "tiny-bert")])
def test_parallel_step_leaves_the_base_model_untouched(method, model):
    m, obj, task = setup(method, model, "method.lr=1e-2")
    trainable = {id(t.param) for t in m.trainables}
    base = {n: p.detach().clone() for n, p in m.model.named_parameters() if id(p) not in trainable}
    buffers = {n: b.clone() for n, b in m.model.named_buffers()}
    start = trainable_state(m)
    m.step(obj.batch_loss(m.model, sst2_batch(obj, task)), 1, 4)
    for n, p in m.model.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, base[n]), f"{n}: a base weight was written"
    assert all(torch.equal(b, buffers[n]) for n, b in m.model.named_buffers())
    assert any(not torch.equal(a, t.param) for a, t in zip(start, m.trainables, strict=True)), "the update ran"
    # No module is left with a per-replica forward after the step.
    assert not [name for name, mod in m.model.named_modules() if "forward" in mod.__dict__]


def test_automatic_chunking_follows_the_memory_estimate(monkeypatch):
    """With zo.max_replicas=null the chunk is what half the free memory holds by the replica
    estimate (2.5 replicas' worth of free memory -> chunks of 1) and, on CPU, what the token cap
    allows; the gradients do not change."""
    import adazeta.zo.parallel as parallel

    m, obj, task = setup("adazeta", "tiny-bert", "method.eps=1e-2")
    loss_fn = obj.batch_loss(m.model, sst2_batch(obj, task))
    seeds = [query_seed(0, 1, q) for q in range(2)]
    reference = m.step.estimator(loss_fn, seeds)
    assert m.step.estimator.chunk_size(loss_fn, 4) == 4  # plenty of memory here
    calls = []
    inner = loss_fn.replicated
    monkeypatch.setattr(loss_fn, "replicated", lambda r: calls.append(r) or inner(r), raising=False)
    monkeypatch.setattr(parallel, "available_bytes", lambda device: int(2.5 * loss_fn.replica_bytes()))
    torch.testing.assert_close(m.step.estimator(loss_fn, seeds), reference, rtol=1e-4, atol=1e-5)
    assert calls == [1, 1, 1, 1]
    # On CPU a chunk also holds at most CPU_TOKENS tokens: room for 3 replicas -> two chunks,
    # of even sizes (2 + 2, not 3 + 1).
    monkeypatch.setattr(parallel, "available_bytes", lambda device: None)
    monkeypatch.setattr(parallel, "CPU_TOKENS", 3 * loss_fn.replica_tokens() + 1)
    calls.clear()
    torch.testing.assert_close(m.step.estimator(loss_fn, seeds), reference, rtol=1e-4, atol=1e-5)
    assert calls == [2, 2]


def test_parallel_needs_a_replicable_loss():
    m, obj, task = setup("adazeta", "tiny-bert")
    batch = sst2_batch(obj, task)
    with pytest.raises(TypeError, match="replicated"):
        m.step(lambda: obj.forward(m.model, batch)[0].mean(), 1, 1)


@pytest.mark.parametrize("method", ["mezo", "sparse_mezo"])
def test_full_weight_methods_reject_parallel_queries(method):
    with pytest.raises(ConfigError, match=r"method.trainable=(full|sparse).*tt_adapter.*lora"):
        setup(method, "tiny-bert")


def test_first_order_methods_reject_parallel_queries():
    with pytest.raises(ConfigError, match="zo.parallel_queries=true.*first-order"):
        setup("lora_fo", "tiny-bert")


def test_replicas_of_a_hooked_head_keep_accelerates_input_move():
    """Under device_map accelerate hooks the head, and its hook moves the input (from the final
    norm, maybe on another GPU) to the head's device. The replica forward must run inside that
    hook, not replace it. Stand-in without GPUs: a float64 body before a float32 head, whose hook
    casts its input as AlignDevicesHook moves it; bypassing the hook fails in baddbmm."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from adazeta.params import Trainable
    from adazeta.zo.spsa import SPSA

    class MoveInputs(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return tuple(a.to(module.weight.dtype) for a in args), kwargs

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.Linear(4, 2))
    add_hook_to_module(model[1], MoveInputs())
    hooked = model[1].forward
    x, y = torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randn(6, 2, generator=gen)

    class Loss:
        def __call__(self):
            return torch.nn.functional.mse_loss(model(x), y)

        def replicated(self, r):
            return ((model(x.repeat(r, 1)) - y.repeat(r, 1)) ** 2).reshape(r, -1).mean(1)

    spsa = SPSA([Trainable(n, p, decay=False) for n, p in model[1].named_parameters()], eps=1e-2)
    seeds = [query_seed(0, 1, q) for q in range(3)]
    expected = []
    with torch.no_grad():
        for seed in seeds:
            spsa.perturb(seed, +1.0)
            plus = Loss()().item()
            spsa.perturb(seed, -2.0)
            minus = Loss()().item()
            spsa.perturb(seed, +1.0)
            expected.append([(plus - minus) / (2 * spsa.eps), (plus + minus) / 2])
    got = ParallelQueries(model, spsa)(Loss(), seeds)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert model[1].forward is hooked and "_old_forward" in model[1].__dict__  # the hook is back as it was

"""Each method moves exactly its intended parameters; Sparse-MeZO's masks and in-forward
perturbation; the ZO update rules against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config

from adazeta.methods import build_method
from adazeta.models.load import load_model
from adazeta.objectives import Objective
from adazeta.params import Trainable
from adazeta.tasks import build_task
from adazeta.zo.sparse import thresholds
from adazeta.zo.spsa import SPSA, query_seed
from adazeta.zo.updates import RULES


def setup(method: str, model: str = "tiny-llama", *extra: str):
    overrides = ["task.num_train=16", "task.num_dev=8", f"method={method}", f"model={model}", *extra]
    cfg = compose_config(overrides, hydra_config=False)
    torch.manual_seed(0)
    task = build_task(cfg.task)
    splits = task.load()
    loaded = load_model(cfg.model, num_labels=task.num_labels)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    m = build_method(loaded.model, cfg.method, cfg.adapter, loaded.head, cfg.seed)
    obj = Objective(task, loaded.tokenizer, loaded.head, cfg.model.max_length)
    batch = obj.encode(splits.train[:4])
    return cfg, m, obj, batch, before


def changed_names(model, before: dict[str, torch.Tensor]) -> set[str]:
    """State entries that differ from `before` (names normalised for peft/adapter wrapping)."""
    out = set()
    for name, value in model.state_dict().items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        if key in before and not torch.equal(before[key], value):
            out.add(key)
    return out


@pytest.mark.parametrize("method", ["mezo", "sparse_mezo", "ft"])
def test_full_methods_move_weights_and_nothing_new(method):
    _, m, obj, batch, before = setup(method, "tiny-llama", "method.lr=1e-2")
    m.step(lambda: obj.forward(m.model, batch)[0].mean(), 1, 1)
    changed = changed_names(m.model, before)
    assert changed, "a step must move some weights"
    assert changed <= set(before)


@pytest.mark.parametrize("method", ["adazeta", "mezo_lora", "lora_fo"])
def test_adapter_methods_move_only_their_parameters(method):
    _, m, obj, batch, before = setup(method, "tiny-llama", "method.lr=1e-2")
    snapshot = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    m.step(lambda: obj.forward(m.model, batch)[0].mean(), 1, 1)
    trainable = {t.name for t in m.trainables}
    moved = {n for n, p in m.model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert moved and moved <= trainable
    assert not changed_names(m.model, before), "base weights must stay bit-identical"
    if "lora" in method:
        assert trainable == {n for n, _ in m.model.named_parameters() if "lora_" in n}
    else:
        assert all(".adapter." in n for n in trainable)


def test_mezo_lora_trainables_are_peft_lora_parameters():
    from peft import PeftModel

    _, m, *_ = setup("mezo_lora")
    assert isinstance(m.model, PeftModel)
    names = [t.name for t in m.trainables]
    assert names and all(("lora_A" in n or "lora_B" in n) and ("q_proj" in n or "v_proj" in n) for n in names)
    assert all(torch.count_nonzero(t.param) == 0 for t in m.trainables if "lora_B" in t.name)


def test_classification_head_is_trainable_for_encoders():
    _, m, *_ = setup("adazeta", "tiny-bert")
    assert any(t.name.startswith("classifier.") for t in m.trainables)


def test_sparse_mezo_never_moves_weights_above_threshold():
    _, m, obj, batch, before = setup("sparse_mezo", "tiny-llama", "method.lr=1e-1", "method.sparse.sparsity=0.5")
    h = m.step.mask.h
    params = [t.param.detach().clone() for t in m.trainables]
    for step in range(1, 4):
        m.step(lambda: obj.forward(m.model, batch)[0].mean(), step, 1)
    for i, t in enumerate(m.trainables):
        moved = t.param.detach() != params[i]
        assert moved.any(), t.name
        assert (params[i][moved].abs() <= h[i]).all(), f"{t.name}: a weight above its threshold moved"


def test_sparse_thresholds_keep_the_requested_fraction():
    w = torch.nn.Parameter(torch.randn(1000))
    (h,) = thresholds([Trainable("w", w, True)], sparsity=0.8)
    assert (w.abs() <= h).float().mean().item() == pytest.approx(0.2, abs=0.002)
    with pytest.raises(ValueError, match="sparsity"):
        thresholds([Trainable("w", w, True)], sparsity=1.0)


@pytest.mark.parametrize("mask", ["magnitude", "random"])
def test_in_forward_perturbation_equals_in_place(mask):
    _, m, obj, batch, before = setup("sparse_mezo", "tiny-llama", f"method.sparse.mask={mask}", "method.eps=1e-2")
    spsa = m.step.spsa
    loss_fn = lambda: obj.forward(m.model, batch)[0].mean()  # noqa: E731
    seed = query_seed(0, 1, 0)
    plus_f, minus_f = m.step.estimator.losses(loss_fn, seed)  # in forward (the configured default)
    assert not changed_names(m.model, before), "in-forward perturbation must not write weights"
    m.step.mask.store(spsa.trainables)
    plus_i, minus_i = spsa.losses(loss_fn, seed)  # in place, stored masks
    m.step.mask.release()
    torch.testing.assert_close(plus_f, plus_i, rtol=0, atol=1e-6)
    torch.testing.assert_close(minus_f, minus_i, rtol=0, atol=1e-6)
    assert abs(float(plus_f) - float(minus_f)) > 1e-6  # the perturbation did something


def test_fo_rejects_sparse():
    from adazeta.errors import ConfigError

    with pytest.raises(ConfigError, match="sparse"):
        setup("sparse_mezo", "tiny-llama", "method.optimizer=fo")


# -- update rules, against hand computations on a tiny parameter set ---------------------------


def tiny_spsa():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(3))
    return SPSA([Trainable("w", w, True), Trainable("b", b, False)], eps=1e-3), w, b


def g_hat(spsa, seeds, grads):
    return [sum(g * spsa.z(i, s).clone() for s, g in zip(seeds, grads, strict=True)) / len(seeds) for i in range(2)]


def test_sgd_and_sign_rules():
    spsa, w, b = tiny_spsa()
    seeds, grads = [11, 12], [0.5, -2.0]
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = g_hat(spsa, seeds, grads)
    RULES["sgd"](spsa, lr=0.1, weight_decay=0.01).apply(seeds, grads, None)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (gw + 0.01 * w0))
    torch.testing.assert_close(b.detach(), b0 - 0.1 * gb)  # no decay on biases
    spsa, w, b = tiny_spsa()
    sw, _ = g_hat(spsa, seeds, [1.0, -1.0])
    RULES["sign"](spsa, lr=0.1, weight_decay=0.0).apply(seeds, grads, None)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * sw)


def test_momentum_and_adam_rules():
    spsa, w, _ = tiny_spsa()
    w0 = w.detach().clone()
    rule = RULES["momentum"](spsa, lr=0.1, weight_decay=0.0, momentum=0.9)
    g1 = g_hat(spsa, [1], [1.0])[0]
    rule.apply([1], [1.0], None)
    g2 = g_hat(spsa, [2], [0.5])[0]
    rule.apply([2], [0.5], None)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g1 - 0.1 * (0.9 * g1 + g2))

    spsa, w, _ = tiny_spsa()
    rule = RULES["adam"](spsa, lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), adam_eps=1e-8)
    g = g_hat(spsa, [3], [2.0])[0]
    rule.apply([3], [2.0], None)
    # First Adam step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g / (g.abs() + 1e-8))


def test_conservative_keeps_the_best_of_three():
    spsa, w, b = tiny_spsa()
    w0 = w.detach().clone()
    target = w0 - 0.1 * g_hat(spsa, [5], [1.0])[0]  # where an sgd step would land
    loss_fn = lambda: ((w - target) ** 2).sum()  # noqa: E731  (minimised by the sgd step)
    extra = RULES["conservative"](spsa, lr=0.1, weight_decay=0.0).apply([5], [1.0], loss_fn)
    assert extra == 3
    torch.testing.assert_close(w.detach(), target)
    loss_fn = lambda: ((w - w0) ** 2).sum()  # noqa: E731  (theta itself is best)
    RULES["conservative"](spsa, lr=0.1, weight_decay=0.0).apply([5], [1.0], loss_fn)
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=1e-6)


def zo_bench_released_step(params, zs, projected_grad, loss, trainer, opt):
    """ZO-Bench's update, transcribed from its released code (ZO-Bench/ZO-LLM, zo-bench/trainer.py:
    the update loop of zo_step for trainer zo_sign_opt, zo_conserv_step's update_params and its
    choice), with the optimizer its sweeps get: the Hugging Face Trainer's AdamW."""

    def update_params(sign=1.0):
        for param, z in zip(params, zs, strict=True):
            if trainer == "zo_sign_opt":
                graddiff_times_z = np.sign(projected_grad) * z
            else:
                graddiff_times_z = projected_grad * z
            param.grad = sign * graddiff_times_z  # zo_step divides by args.q, 1 in the sweeps
            opt.step()  # steps the parameters whose grad is set: this one
            param.grad = None

    if trainer == "zo_sign_opt":
        update_params()
        return
    loss0 = loss()
    update_params()
    loss1 = loss()
    update_params(sign=-2.0)
    loss2 = loss()
    if loss1 > loss0:
        if loss0 < loss2:
            update_params()
    else:
        if loss1 < loss2:
            update_params(2.0)


@pytest.mark.parametrize("rule, trainer, where", [
    ("sign_adamw", "zo_sign_opt", None),
    ("conservative_adamw", "zo_conserv", "first step's point"),  # L1 < L0 and L1 < L2: back towards it
    ("conservative_adamw", "zo_conserv", "start"),  # L1 > L0 and L0 < L2: back towards theta
])
def test_zo_bench_released_rules_match_a_transcription_of_their_code(rule, trainer, where):
    """Three steps (Adam's moments carry over) of our rule and of the transcribed reference, on
    the same z and projected gradients, from the same weights."""
    spsa, w, b = tiny_spsa()
    ref = [w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)]
    opt = torch.optim.AdamW(ref, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ours = RULES[rule](spsa, lr=0.05, weight_decay=0.0, betas=(0.9, 0.999), adam_eps=1e-8)
    # The loss is least near where an sgd step from the start lands, or near the start itself.
    centre = w.detach().clone() - (0.05 * g_hat(spsa, [7], [1.0])[0] if where == "first step's point" else 0)
    loss = lambda p: float(((p - centre) ** 2).sum())  # noqa: E731
    for step, (seed, g) in enumerate([(7, 1.0), (8, -0.4), (9, 2.5)]):
        extra = ours.apply([seed], [g], lambda: torch.tensor(loss(w.detach())))
        with torch.no_grad():
            zs = [spsa.z(i, seed).clone() for i in range(2)]
            zo_bench_released_step(ref, zs, g, lambda: loss(ref[0].detach()), trainer, opt)
        torch.testing.assert_close(w.detach(), ref[0].detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
        torch.testing.assert_close(b.detach(), ref[1].detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")
        assert extra == (3 if rule == "conservative_adamw" else 0)
    assert not torch.equal(w.detach(), tiny_spsa()[1].detach())  # the weights moved


@pytest.mark.parametrize("block", [1024, 1 << 20])
def test_blocked_in_forward_perturbation_equals_in_place(monkeypatch, block):
    """Large Linear and Embedding weights are perturbed row block by row block inside their
    forward (adazeta/zo/sparse.py): the losses equal the in-place ones with stored masks, the z of
    each block is the slice of the tensor's whole z, and no weight is written. block=1024 cuts
    tiny-llama's 30522 x 64 embedding and LM head into 16-row blocks; 1 << 20 takes them whole."""
    import adazeta.zo.sparse as sparse

    monkeypatch.setattr(sparse, "BLOCK", block)
    _, m, obj, batch, before = setup("sparse_mezo", "tiny-llama", "method.eps=1e-2")
    spsa = m.step.spsa
    m.step.estimator.remove()  # the method's own hooks (default block_min: nothing blocked)
    in_forward = sparse.InForwardPerturbation(m.model, spsa, block_min=1 << 14)
    blocked = {type(mod).__name__ for mod in in_forward.blocked}
    assert blocked == {"Embedding", "Linear"}, blocked  # the embedding and the LM head
    loss_fn = lambda: obj.forward(m.model, batch)[0].mean()  # noqa: E731
    plain = loss_fn()
    seed = query_seed(0, 3, 1)
    plus_f, minus_f = in_forward.losses(loss_fn, seed)
    assert not changed_names(m.model, before), "the blocked forward must not write weights"
    assert torch.equal(loss_fn(), plain)  # outside a perturbation the forward is the plain one
    m.step.mask.store(spsa.trainables)
    plus_i, minus_i = spsa.losses(loss_fn, seed)
    m.step.mask.release()
    torch.testing.assert_close(plus_f, plus_i, rtol=0, atol=1e-6)
    torch.testing.assert_close(minus_f, minus_i, rtol=0, atol=1e-6)
    assert abs(float(plus_f) - float(minus_f)) > 1e-6
    in_forward.remove()
    assert all("forward" not in vars(mod) for mod in in_forward.blocked)


@pytest.mark.parametrize("workers", [1, 2])
def test_masked_update_in_chunks_equals_whole_draws(workers):
    """Sparse-MeZO's update runs in cache-sized chunks (the magnitude mask computed per chunk from
    the weights before the pass writes them), on one thread or dealt to two: the result equals
    masking whole-tensor draws."""
    from adazeta.zo.sparse import SparseMask
    from adazeta.zo.spsa import CHUNK, THREADED_MIN, tensor_seed

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3 * CHUNK + 21))
    big = torch.nn.Parameter(torch.randn(THREADED_MIN + 48))
    small = torch.nn.Parameter(torch.randn(100))
    trainables = [Trainable("w", w, True), Trainable("big", big, True), Trainable("small", small, False)]
    mask = SparseMask(trainables, "magnitude", sparsity=0.5, keep_ratio=1.0)
    spsa = SPSA(trainables, eps=1e-3, mask=mask, workers=workers)
    assert len(spsa.lanes) == workers
    assert spsa.bounds[0] is not None and spsa.bounds[2] is None  # w is drawn in chunks
    theta = [t.param.detach().clone() for t in trainables]
    seeds, coeffs = [11, 12], [0.5, -0.25]
    spsa.add_noise(seeds, coeffs, factor=0.9, decayed=[0.4, -0.3])
    for i, (t, p0) in enumerate(zip(trainables, theta, strict=True)):
        m = (p0.abs() <= mask.h[i])
        f, cs = (0.9, [0.4, -0.3]) if t.decay else (1.0, coeffs)
        expected = p0 * f
        for seed, c in zip(seeds, cs, strict=True):
            z = torch.empty_like(p0).normal_(generator=torch.Generator().manual_seed(tensor_seed(seed, i)))
            expected.add_(z * m, alpha=c)
        assert torch.equal(t.param.detach(), expected), t.name


@pytest.mark.parametrize("method", ["mezo", "mezo_lora"])
def test_causal_scoring_computes_only_the_kept_logits(method):
    """A causal LM scores candidates from the last few positions only (`logits_to_keep`) and
    without a key/value cache, also through peft's wrapper (whose own forward names neither)."""
    _, m, obj, batch, _ = setup(method, "tiny-llama")
    base = m.model.get_base_model() if hasattr(m.model, "get_base_model") else m.model
    seen = {}
    h1 = base.lm_head.register_forward_hook(lambda mod, args, out: seen.update(positions=args[0].shape[1]))
    h2 = base.model.register_forward_hook(lambda mod, args, out: seen.update(cache=out.past_key_values))
    try:
        obj.forward(m.model, batch)
    finally:
        h1.remove(), h2.remove()
    assert seen["positions"] == int(batch["cand_lens"].max()) < batch["input_ids"].shape[1]
    assert seen["cache"] is None

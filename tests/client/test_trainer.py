import copy

import numpy as np
import pytest
import torch

from prfl.client.trainer import LocalTrainer, TrainConfig, batch_schedule
from prfl.params import ParamLayout
from prfl.pruning.ranking import magnitude_ranking


def make_trainer(model, x, y, **cfg):
    layout = ParamLayout(model)
    return LocalTrainer(model, layout, x, y, TrainConfig(**cfg)), layout


def test_masked_training_keeps_zeros_outside_mask(tiny_cnn, digits_xy):
    x, y = digits_xy
    trainer, layout = make_trainer(tiny_cnn, x, y, lr=0.1, momentum=0.9, weight_decay=1e-3, local_steps=5)
    w0 = layout.flatten(tiny_cnn)
    ranking = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds())
    mask = ranking.mask(0.3)
    out = trainer.train(w0, np.arange(200), seed=1, mask=mask)
    pr = out.weights[: layout.num_prunable]
    assert torch.all(pr[~mask] == 0)
    # inside the mask the weights moved, and so did the (unpruned) biases
    assert not torch.equal(pr[mask], w0[: layout.num_prunable][mask])
    assert not torch.equal(out.weights[layout.num_prunable :], w0[layout.num_prunable :])
    assert out.steps == 5 and out.num_samples == 200


def test_one_client_with_all_data_equals_plain_sgd(tiny_cnn, digits_xy):
    x, y = digits_xy
    x, y = x[:300], y[:300]
    ref = copy.deepcopy(tiny_cnn)
    cfg = dict(lr=0.05, momentum=0.5, weight_decay=1e-4, batch_size=32, local_steps=12)
    trainer, layout = make_trainer(tiny_cnn, x, y, **cfg)
    w0 = layout.flatten(ref)
    out = trainer.train(w0, np.arange(300), seed=7)

    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5, weight_decay=1e-4)
    for pos in batch_schedule(300, TrainConfig(**cfg), seed=7):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ref(x[pos]), y[pos])
        loss.backward()
        opt.step()
    assert torch.allclose(out.weights, layout.flatten(ref), atol=1e-6, rtol=1e-5)


def test_training_is_deterministic_for_a_seed(tiny_cnn, digits_xy):
    x, y = digits_xy
    trainer, layout = make_trainer(tiny_cnn, x, y, lr=0.1)
    w0 = layout.flatten(tiny_cnn)
    a = trainer.train(w0, np.arange(100, 400), seed=3)
    b = trainer.train(w0, np.arange(100, 400), seed=3)
    c = trainer.train(w0, np.arange(100, 400), seed=4)
    assert torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)


def test_importance_is_last_step_squared_gradient_times_samples(tiny_cnn, digits_xy):
    x, y = digits_xy
    cfg = TrainConfig(lr=0.1, local_steps=3, batch_size=10)
    trainer, layout = make_trainer(tiny_cnn, x, y, lr=0.1, local_steps=3, batch_size=10)
    w0 = layout.flatten(tiny_cnn)
    mask = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds()).mask(0.5)
    idx = np.arange(50)
    out = trainer.train(w0, idx, seed=5, mask=mask, want_importance=True)
    # recompute: replay the first two steps, then take the gradient at the third
    ref = copy.deepcopy(tiny_cnn)
    rl = ParamLayout(ref)
    w = w0.clone()
    w[: layout.num_prunable] *= mask
    batches = batch_schedule(50, cfg, seed=5)
    fm = rl.full_mask(mask).float()
    for k, pos in enumerate(batches):
        rl.load(ref, w)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[idx[pos]]), y[idx[pos]]).backward()
        g = torch.cat([dict(ref.named_parameters())[e.name].grad.flatten() for e in rl.entries])
        if k == len(batches) - 1:
            expect = g[: layout.num_prunable].square() * 50
        w = w - 0.1 * g * fm
    assert torch.allclose(out.grad_sq, expect, rtol=1e-5, atol=1e-10)
    # pruned weights get an importance too (the gradient is taken before masking)
    assert out.grad_sq[~mask].sum() > 0


def test_evaluate_and_learning_beats_chance(tiny_cnn, digits_xy):
    x, y = digits_xy
    trainer, layout = make_trainer(tiny_cnn, x[:1400], y[:1400], lr=0.1, momentum=0.9, local_epochs=3, local_steps=None, batch_size=32)
    w0 = layout.flatten(tiny_cnn)
    loss0, acc0 = trainer.evaluate(w0, x[1400:], y[1400:])
    out = trainer.train(w0, np.arange(1400), seed=0)
    loss1, acc1 = trainer.evaluate(out.weights, x[1400:], y[1400:], batch_size=64)
    assert out.steps == 3 * 44
    assert loss1 < loss0
    assert acc1 > 0.8


def test_bce_loss_and_epoch_schedule():
    cfg = TrainConfig(local_steps=None, local_epochs=2, batch_size=4)
    batches = batch_schedule(10, cfg, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        assert sorted(np.concatenate(epoch).tolist()) == list(range(10))
    steps = batch_schedule(10, TrainConfig(local_steps=4, batch_size=4), seed=0)
    assert [len(b) for b in steps] == [4, 4, 4, 4]


@pytest.mark.parametrize(
    "bad, match",
    [({"lr": 0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"local_steps": None}, "local_steps or local_epochs"), ({"loss": "mse"}, "loss")],
)
def test_bad_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def _flat_reference(model, x, y, w0, idx, seed, cfg, mask=None, want_importance=False):
    """The SGD task on flat vectors: the backward pass accumulates into one zeroed gradient
    vector, then g <- g*m, g <- g + wd*w, b <- mu*b + g, w <- w - lr*b."""
    layout = ParamLayout(model)
    w = w0.clone()
    g = torch.zeros_like(w)
    buf = torch.zeros_like(w)
    npr = layout.num_prunable
    fmask = None if mask is None else mask.float()
    if fmask is not None:
        w[:npr] *= fmask
    layout.bind(model, w, g)
    batches = batch_schedule(len(idx), cfg, seed)
    grad_sq = None
    for k, pos in enumerate(batches):
        sel = torch.as_tensor(idx)[torch.from_numpy(pos)]
        g.zero_()
        torch.nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
        if want_importance and k == len(batches) - 1:
            grad_sq = g[:npr].square() * float(len(idx))
        if fmask is not None:
            g[:npr].mul_(fmask)
        if cfg.weight_decay:
            g.add_(w, alpha=cfg.weight_decay)
        step = g
        if cfg.momentum:
            buf.mul_(cfg.momentum).add_(g)
            step = buf
        w.add_(step, alpha=-cfg.lr)
    return w, grad_sq


@pytest.mark.parametrize("momentum, weight_decay, masked", [(0.0, 0.0, False), (0.0, 0.0, True), (0.9, 1e-3, True)])
def test_per_parameter_step_equals_the_flat_vector_step_bit_for_bit(tiny_cnn, digits_xy, momentum, weight_decay, masked):
    x, y = digits_xy
    cfg = TrainConfig(lr=0.1, momentum=momentum, weight_decay=weight_decay, local_steps=6, batch_size=16)
    ref_model = copy.deepcopy(tiny_cnn)
    trainer, layout = make_trainer(tiny_cnn, x, y, lr=0.1, momentum=momentum, weight_decay=weight_decay,
                                   local_steps=6, batch_size=16)
    w0 = layout.flatten(tiny_cnn)
    mask = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds()).mask(0.4) if masked else None
    idx = np.arange(40, 240)
    for _ in range(2):  # a second task reuses the trainer's buffers (momentum restarts at zero)
        out = trainer.train(w0, idx, seed=9, mask=mask, want_importance=True)
    expect_w, expect_sq = _flat_reference(ref_model, x, y, w0, idx, 9, cfg, mask, want_importance=True)
    assert torch.equal(out.weights, expect_w)
    assert torch.equal(out.grad_sq, expect_sq)
    assert not torch.equal(out.weights, w0)


def test_training_into_a_given_vector(tiny_cnn, digits_xy):
    x, y = digits_xy
    trainer, layout = make_trainer(tiny_cnn, x, y, lr=0.1, local_steps=4)
    w0 = layout.flatten(tiny_cnn)
    mask = magnitude_ranking(w0[: layout.num_prunable], layout.layer_bounds()).mask(0.5)
    idx = np.arange(100)
    fresh = trainer.train(w0, idx, seed=2, mask=mask)
    out = torch.full_like(w0, float("nan"))
    given = trainer.train(w0, idx, seed=2, mask=mask, out=out)
    assert given.weights is out and torch.equal(out, fresh.weights)
    inplace = w0.clone()  # the start weights may be the output vector itself
    assert torch.equal(trainer.train(inplace, idx, seed=2, mask=mask, out=inplace).weights, fresh.weights)
    # the trainer is done with a handed-over vector: evaluating afterwards leaves it alone
    kept = fresh.weights.clone()
    trainer.evaluate(w0, x[:50], y[:50])
    assert torch.equal(fresh.weights, kept) and torch.equal(out, kept)
    with pytest.raises(ValueError, match="flat vector"):
        trainer.train(w0, idx, seed=2, out=torch.empty(3))


def test_compiled_forward_falls_back_without_a_compiler(tiny_cnn, digits_xy, monkeypatch, caplog):
    x, y = digits_xy
    eager, layout = make_trainer(copy.deepcopy(tiny_cnn), x, y, lr=0.1, local_steps=3)
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "")
    with caplog.at_level("WARNING", logger="prfl.client.trainer"):
        fallback = LocalTrainer(tiny_cnn, layout, x, y, TrainConfig(lr=0.1, local_steps=3), compile=True)
    assert not fallback.forward.is_compiled
    assert "needs a C++ compiler" in caplog.text
    w0 = layout.flatten(tiny_cnn)
    assert torch.equal(fallback.train(w0, np.arange(60), seed=4).weights, eager.train(w0, np.arange(60), seed=4).weights)


def test_compiled_training_is_deterministic_and_agrees_with_eager(tiny_cnn, digits_xy):
    from prfl.client.trainer import cxx_compiler

    if cxx_compiler() is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (g++ or $CXX); the fallback is tested above")
    x, y = digits_xy
    eager, layout = make_trainer(copy.deepcopy(tiny_cnn), x, y, lr=0.1, local_steps=3)
    compiled = LocalTrainer(tiny_cnn, layout, x, y, TrainConfig(lr=0.1, local_steps=3), compile=True)
    w0 = layout.flatten(tiny_cnn)
    a = compiled.train(w0, np.arange(60), seed=4)
    assert compiled.forward.is_compiled  # it compiled, rather than fell back
    b = compiled.train(w0, np.arange(60), seed=4)
    ref = eager.train(w0, np.arange(60), seed=4)
    assert torch.equal(a.weights, b.weights)
    assert torch.allclose(a.weights, ref.weights, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.weights, w0)

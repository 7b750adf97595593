"""PyTorch Lightning with curvkit's curvature optimizers: the same trajectory as curvkit's own loop, and sharpness."""

from __future__ import annotations

import copy
import importlib
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.datasets import load_digits_tensors
from curvkit.hessian import HessianOperator, PreconditionedOperator, eigenvalues
from curvkit.optim import AdaHessian, Sophia

pl = pytest.importorskip("lightning.pytorch")  # installed by the test extra (setup.cfg), so CI runs these
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from curvkit.integrations.lightning import CurvatureModule, SharpnessCallback  # noqa: E402

BATCH, N, EPOCHS = 64, 192, 3  # 3 steps per epoch, 9 steps; float64 so that rounding stays far below tolerances


def _data(dtype=torch.float64):
    (X, y), _ = load_digits_tensors()
    return X[:N].to(dtype), y[:N]


def _batches(batch=BATCH, dtype=torch.float64):
    X, y = _data(dtype)
    return [(X[i:i + batch], y[i:i + batch]) for i in range(0, N, batch)]


def _loader(batch=BATCH, dtype=torch.float64):
    return DataLoader(TensorDataset(*_data(dtype)), batch_size=batch, shuffle=False)


def _mlp(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return net


class _Attention(nn.Module):
    """Digits as 8 tokens of 8 pixels through one attention layer (the fused CPU kernel has no double backward)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(64, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        q, k, v = self.qkv(x.view(-1, 8, 8)).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v).flatten(1))


class Classifier(CurvatureModule):
    def __init__(self, net, make_optimizer, scheduler=None):
        super().__init__()
        self.net, self.make_optimizer, self.scheduler = net, make_optimizer, scheduler
        self.losses, self.graph_steps, self.snapshots, self.modes = [], [], {}, []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.modes.append(self.training)
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.graph_steps.append(any(p.grad is not None and p.grad.requires_grad for p in self.parameters()))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        self.snapshots[self.trainer.global_step] = (copy.deepcopy(self.net.state_dict()), opt.preconditioner(),
                                                    opt.stability_threshold())

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


def _trainer(**kwargs):
    settings = dict(accelerator="cpu", devices=1, max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**settings, **kwargs})


def _fit(module, batch=BATCH, dtype=torch.float64, **kwargs):
    trainer = _trainer(**kwargs)
    trainer.fit(module, _loader(batch, dtype))
    return trainer


def _closure_loop(net, opt, batches, epochs=EPOCHS, scheduler=None):
    losses = []
    for _ in range(epochs):
        for x, y in batches:
            losses.append(opt.step(lambda: F.cross_entropy(net(x), y)))
            if scheduler is not None:
                scheduler.step()
    return torch.stack(losses)


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


OPTIMIZERS = {
    "AdaHessian": (lambda params: AdaHessian(params, lr=0.1, seed=0), 1),
    "AdaHessian-update_each=3": (lambda params: AdaHessian(params, lr=0.1, update_each=3, seed=0), 3),
    "Sophia-update_each=2": (lambda params: Sophia(params, lr=0.01, update_each=2, seed=0), 2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_matches_curvkits_closure_loop_and_keeps_the_graph_only_on_curvature_steps(name):
    make, update_each = OPTIMIZERS[name]
    module = Classifier(_mlp(), make)
    _fit(module)
    net = _mlp()
    expected = _closure_loop(net, make(net.parameters()), _batches())
    torch.testing.assert_close(torch.stack(module.losses), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(module.net), _flat(net), rtol=1e-10, atol=1e-12)
    assert expected[-1] < expected[0]
    assert module.graph_steps == [step % update_each == 0 for step in range(EPOCHS * N // BATCH)]


def test_manual_optimization_with_manual_backward_matches_the_closure_loop():
    make, update_each = OPTIMIZERS["AdaHessian-update_each=3"]

    class Manual(Classifier):
        def __init__(self, *args):
            super().__init__(*args)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
            self.losses.append(loss.detach())

    module = Manual(_mlp(), make)
    _fit(module)
    net = _mlp()
    expected = _closure_loop(net, make(net.parameters()), _batches())
    torch.testing.assert_close(torch.stack(module.losses), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(module.net), _flat(net), rtol=1e-10, atol=1e-12)
    assert module.graph_steps == [step % update_each == 0 for step in range(EPOCHS * N // BATCH)]


def test_a_learning_rate_scheduler_steps_as_in_the_closure_loop():
    make = OPTIMIZERS["AdaHessian"][0]
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731
    module = Classifier(_mlp(), make, scheduler=schedule)
    trainer = _fit(module)
    net = _mlp()
    opt = make(net.parameters())
    expected = _closure_loop(net, opt, _batches(), scheduler=schedule(opt))
    torch.testing.assert_close(torch.stack(module.losses), expected, rtol=1e-10, atol=1e-12)
    assert trainer.optimizers[0].param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 4


def test_accumulated_micro_batches_give_the_gradient_and_curvature_of_their_mean_loss():
    make = OPTIMIZERS["AdaHessian"][0]
    module = Classifier(_Attention(), make)
    _fit(module, batch=BATCH // 2, accumulate_grad_batches=2)
    net = _Attention()
    expected = _closure_loop(net, make(net.parameters()), _batches())  # one batch = two micro-batches
    micro = torch.stack(module.losses)
    torch.testing.assert_close((micro[0::2] + micro[1::2]) / 2, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(module.net), _flat(net), rtol=1e-10, atol=1e-12)
    assert module.graph_steps == [True] * (EPOCHS * N // BATCH)


def test_gradient_clipping_clips_the_gradient_the_step_uses():
    make, clip = OPTIMIZERS["AdaHessian-update_each=3"][0], 0.05
    module = Classifier(_mlp(), make)
    _fit(module, gradient_clip_val=clip)
    runs = {}
    for clipped in (True, False):
        net = _mlp()
        opt = make(net.parameters())
        for _ in range(EPOCHS):
            for x, y in _batches():
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward(create_graph=opt.next_step_needs_graph())
                if clipped:
                    assert torch.nn.utils.clip_grad_norm_(net.parameters(), clip) > clip  # clipping bites
                opt.step()
        runs[clipped] = _flat(net)
    torch.testing.assert_close(_flat(module.net), runs[True], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(runs[True], runs[False], rtol=1e-3, atol=1e-4)


def test_bf16_mixed_precision_follows_the_closure_loop_under_autocast():
    make = OPTIMIZERS["AdaHessian"][0]
    module = Classifier(_mlp(dtype=torch.float32), make)          # autocast lowers float32 operations
    _fit(module, dtype=torch.float32, precision="bf16-mixed")
    net = _mlp(dtype=torch.float32)
    opt, expected = make(net.parameters()), []
    for _ in range(EPOCHS):
        for x, y in _batches(dtype=torch.float32):
            def closure():
                with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as Lightning does
                    return F.cross_entropy(net(x), y)

            expected.append(opt.step(closure))
    expected = torch.stack(expected)
    torch.testing.assert_close(torch.stack(module.losses), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_flat(module.net), _flat(net), rtol=1e-6, atol=1e-7)
    assert expected[-1] < expected[0]


def test_fp16_with_a_gradient_scaler_is_refused():
    module = Classifier(_mlp(), OPTIMIZERS["AdaHessian"][0])
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        _fit(module, plugins=[plugin])


def test_resuming_from_a_checkpoint_continues_the_same_trajectory(tmp_path):
    make = OPTIMIZERS["AdaHessian-update_each=3"][0]
    whole = Classifier(_mlp(), make)
    _fit(whole, max_epochs=4)
    first = Classifier(_mlp(), make)
    trainer = _fit(first, max_epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    other_seed = lambda params: AdaHessian(params, lr=0.1, update_each=3, seed=99)  # noqa: E731 (state is loaded)
    resumed = Classifier(_mlp(seed=7), other_seed)
    _trainer(max_epochs=4).fit(resumed, _loader(), ckpt_path=tmp_path / "half.ckpt")
    assert torch.equal(_flat(resumed.net), _flat(whole.net))


def test_a_plain_lightning_module_with_a_curvature_optimizer_is_told_to_derive_from_curvature_module():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return AdaHessian(self.parameters(), seed=0)

    with pytest.raises(RuntimeError, match="CurvatureModule"):
        _fit(Plain())


def test_sophia_g_needs_manual_optimization_which_works():
    make = lambda params: Sophia(params, lr=0.01, estimator="gnb", update_each=2, seed=0)  # noqa: E731
    with pytest.raises(RuntimeError, match="logits"):
        _fit(Classifier(_mlp(), make))

    class Manual(Classifier):
        def __init__(self, *args):
            super().__init__(*args)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.optimizers().step(lambda: (F.cross_entropy(logits := self(x), y), logits))
            self.losses.append(loss)

    module = Manual(_mlp(), make)
    _fit(module)
    net = _mlp()
    opt = make(net.parameters())
    expected = [opt.step(lambda: (F.cross_entropy(logits := net(x), y), logits))
                for _ in range(EPOCHS) for x, y in _batches()]
    torch.testing.assert_close(torch.stack(module.losses), torch.stack(expected), rtol=1e-10, atol=1e-12)


def _logged(tmp_path):
    frame = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    return frame.dropna(subset=["sharpness"]).set_index("step")


def _top(net, batch, P=None):
    H = HessianOperator(net, F.cross_entropy, batch)
    return float(eigenvalues(H if P is None else PreconditionedOperator(H, P), k=1, tol=1e-10, seed=1).values[0])


def test_sharpness_callback_logs_the_top_eigenvalues_of_the_model_at_each_logged_step(tmp_path):
    make = OPTIMIZERS["AdaHessian"][0]
    batch = _batches()[0]
    callback = SharpnessCallback(F.cross_entropy, batch, every_n_steps=4, preconditioned=True, tol=1e-8)
    module = Classifier(_mlp(), make)
    _fit(module, logger=CSVLogger(tmp_path), callbacks=[callback])
    logged = _logged(tmp_path)
    assert list(logged.index) == [4, 8, 9]                    # every 4 steps, and the last (final model) one
    assert list(callback.history["step"]) == [4, 8, 9]
    for step, row in logged.iterrows():
        state, P, threshold = module.snapshots[step]
        net = _mlp(seed=3)
        net.load_state_dict(state)
        assert row["sharpness"] == pytest.approx(_top(net, batch), rel=1e-5)
        assert row["preconditioned_sharpness"] == pytest.approx(_top(net, batch, P), rel=1e-5)
        assert row["stability_threshold"] == pytest.approx(threshold)
    net = _mlp()                                              # measuring changed nothing in training
    torch.testing.assert_close(torch.stack(module.losses), _closure_loop(net, make(net.parameters()), _batches()),
                               rtol=1e-10, atol=1e-12)
    assert all(module.modes)


def test_sharpness_callback_without_preconditioning_logs_sharpness_only(tmp_path):
    callback = SharpnessCallback(F.cross_entropy, _batches()[0], every_n_steps=5)
    _fit(Classifier(_mlp(), OPTIMIZERS["AdaHessian"][0]), logger=CSVLogger(tmp_path), callbacks=[callback])
    logged = _logged(tmp_path)
    assert list(logged.index) == [5, 9]
    assert "preconditioned_sharpness" not in logged.columns and "stability_threshold" not in logged.columns


def test_sharpness_callback_refuses_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        SharpnessCallback(F.cross_entropy, _batches()[0], every_n_steps=0)
    with pytest.raises(ValueError, match="preconditioned"):
        SharpnessCallback(F.cross_entropy, _batches()[0], preconditioned="yes")


def test_without_lightning_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.delitem(sys.modules, "lightning.pytorch")
    monkeypatch.delitem(sys.modules, "curvkit.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'curvkit\[lightning\]'"):
        importlib.import_module("curvkit.integrations.lightning")

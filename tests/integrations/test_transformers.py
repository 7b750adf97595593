"""The Hugging Face Trainer with curvkit's curvature optimizers on a tiny BERT built from a config (no download)."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvkit.hessian import HessianOperator, PreconditionedOperator, eigenvalues
from curvkit.optim import AdaHessian, Sophia

transformers = pytest.importorskip("transformers")  # installed by the test extra (setup.cfg), so CI runs these
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback, TrainingArguments  # noqa: E402

from curvkit.integrations.transformers import CurvatureTrainer, SharpnessCallback  # noqa: E402

N, BATCH, EPOCHS = 48, 16, 2  # 3 steps per epoch, 6 steps, in float64


def _bert(seed=0):
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    with torch.random.fork_rng():  # transformers initialises from the global generator; keep it untouched
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    return model.double()


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (N, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 1] > 15).long()}


def _dataset():
    data = _data()
    return [{k: v[i] for k, v in data.items()} for i in range(N)]


def _batches(batch=BATCH):
    data = _data()
    return [{k: v[i:i + batch] for k, v in data.items()} for i in range(0, N, batch)]


def _loss(model, batch):
    return model(**batch).loss


class _Record(TrainerCallback):
    """What the optimizer sees before each step, and the model after it."""

    def __init__(self):
        self.graph_steps, self.snapshots, self.modes = [], {}, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.graph_steps.append(any(p.grad.requires_grad for p in model.parameters() if p.grad is not None))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = optimizer.optimizer
        self.snapshots[state.global_step] = (copy.deepcopy(model.state_dict()), opt.preconditioner(),
                                             opt.stability_threshold())
        self.modes.append(all(m.training for m in model.modules()))


def _train(model, opt, tmp_path, callbacks=(), trainer_class=CurvatureTrainer, scaler=None, trainer_kwargs=None,
           **kwargs):
    settings = dict(per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, max_grad_norm=0.0,
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    args = TrainingArguments(str(tmp_path / "out"), **{**settings, **kwargs})
    record = _Record()
    trainer = trainer_class(model=model, args=args, train_dataset=_dataset(), optimizers=(opt, _schedule(opt)),
                            callbacks=[*callbacks, record], **(trainer_kwargs or {}))
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    trainer.train()
    losses = torch.tensor([row["loss"] for row in trainer.state.log_history if "loss" in row])
    return trainer, record, losses


def _schedule(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _closure_loop(model, opt):
    model.train()  # as Trainer trains (dropout switched off, so both are deterministic)
    scheduler, losses = _schedule(opt), []
    for _ in range(EPOCHS):
        for batch in _batches():
            losses.append(opt.step(lambda: _loss(model, batch)))
            scheduler.step()
    return torch.stack(losses)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


OPTIMIZERS = {
    "AdaHessian": (lambda params: AdaHessian(params, lr=0.05, seed=0), 1),
    "Sophia-update_each=2": (lambda params: Sophia(params, lr=0.01, update_each=2, seed=0), 2),
}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_matches_curvkits_closure_loop_and_keeps_the_graph_only_on_curvature_steps(name, tmp_path):
    make, update_each = OPTIMIZERS[name]
    model = _no_dropout(_bert())
    _, record, losses = _train(model, make(model.parameters()), tmp_path)
    twin = _no_dropout(_bert())
    expected = _closure_loop(twin, make(twin.parameters()))
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-10, atol=1e-12)
    assert expected[-1] < expected[0]
    assert record.graph_steps == [step % update_each == 0 for step in range(EPOCHS * N // BATCH)]


def test_gradient_clipping_clips_the_gradient_the_step_uses(tmp_path):
    make, clip = OPTIMIZERS["AdaHessian"][0], 0.05
    model = _no_dropout(_bert())
    _, _, losses = _train(model, make(model.parameters()), tmp_path, max_grad_norm=clip)
    twin = _no_dropout(_bert())
    twin.train()
    opt, expected = make(twin.parameters()), []
    scheduler = _schedule(opt)
    for _ in range(EPOCHS):
        for batch in _batches():
            opt.zero_grad(set_to_none=True)
            with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernel has no double backward
                loss = _loss(twin, batch)
            loss.backward(create_graph=opt.next_step_needs_graph())
            assert torch.nn.utils.clip_grad_norm_(twin.parameters(), clip) > clip  # clipping bites
            opt.step()
            scheduler.step()
            expected.append(loss.detach())
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-10, atol=1e-12)


def test_accumulated_micro_batches_give_the_gradient_and_curvature_of_the_whole_batch(tmp_path):
    def mean_over_accumulated_batch(outputs, labels, num_items_in_batch):  # Trainer's way to normalise
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    make = OPTIMIZERS["AdaHessian"][0]
    model = _no_dropout(_bert())
    _, record, losses = _train(model, make(model.parameters()), tmp_path, per_device_train_batch_size=BATCH // 2,
                               gradient_accumulation_steps=2,
                               trainer_kwargs={"compute_loss_func": mean_over_accumulated_batch})
    twin = _no_dropout(_bert())
    expected = _closure_loop(twin, make(twin.parameters()))
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-10, atol=1e-12)
    assert record.graph_steps == [True] * (EPOCHS * N // BATCH)


def _top(model, batch, P=None):
    H = HessianOperator(model, None, batch, forward=_loss)
    return float(eigenvalues(H if P is None else PreconditionedOperator(H, P), k=1, tol=1e-10, seed=1).values[0])


def test_sharpness_callback_logs_the_top_eigenvalues_of_the_model_at_each_logged_step(tmp_path):
    model = _bert()                                   # with dropout: measured with it off, training keeps it
    batch = _batches()[0]
    callback = SharpnessCallback(None, batch, every_n_steps=4, preconditioned=True, forward=_loss, tol=1e-8)
    make = OPTIMIZERS["AdaHessian"][0]
    trainer, record, _ = _train(model, make(model.parameters()), tmp_path, callbacks=[callback])
    logged = [row for row in trainer.state.log_history if "sharpness" in row]
    assert [row["step"] for row in logged] == [4, 6]  # every 4 steps, and the last (final model) one
    assert list(callback.history["step"]) == [4, 6]
    for row in logged:
        state, P, threshold = record.snapshots[row["step"]]
        twin = _bert(seed=3)
        twin.load_state_dict(state)
        twin.eval()
        assert row["sharpness"] == pytest.approx(_top(twin, batch), rel=1e-5)
        assert row["preconditioned_sharpness"] == pytest.approx(_top(twin, batch, P), rel=1e-5)
        assert row["stability_threshold"] == pytest.approx(threshold)
    assert all(record.modes)                          # train mode restored after each measurement


def test_sharpness_callback_needs_the_curvature_trainer(tmp_path):
    model = _bert()
    callback = SharpnessCallback(None, _batches()[0], forward=_loss)
    with pytest.raises(RuntimeError, match="SharpnessCallback logs through .*CurvatureTrainer"):
        _train(model, AdaHessian(model.parameters(), seed=0), tmp_path, callbacks=[callback],
               trainer_class=transformers.Trainer)


def test_a_plain_trainer_with_a_curvature_optimizer_is_told_to_use_the_curvature_trainer(tmp_path):
    model = _bert()
    with pytest.raises(RuntimeError, match="CurvatureTrainer"):
        _train(model, AdaHessian(model.parameters(), seed=0), tmp_path, trainer_class=transformers.Trainer)


def test_fp16_with_a_gradient_scaler_is_refused(tmp_path):
    model = _bert()                                   # accelerate makes the scaler for fp16 on GPUs only
    with pytest.raises(RuntimeError, match="bf16"):
        _train(model, AdaHessian(model.parameters(), seed=0), tmp_path, scaler=torch.amp.GradScaler("cpu"))


def test_without_transformers_the_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "curvkit.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'curvkit\[transformers\]'"):
        importlib.import_module("curvkit.integrations.transformers")

"""IST / LISA layer selection: frozen layers hold nothing, probes find the layer that matters, stop/resume, Trainer."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from whatmatters.core.errors import InputError, ModelError
from whatmatters.tune import IST, LISA, training_bytes

peft = pytest.importorskip("peft")


def lora_bert(layers: int = 4):
    model = tiny_model("bert", layers=layers)
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return peft.get_peft_model(model, config)


def batch(seed: int, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 60, (n, 10), generator=g), "labels": torch.randint(0, 2, (n,), generator=g)}


def run(model, tuner, steps: int, start: int = 0) -> None:
    model.train()
    for i in range(start, start + steps):
        b = batch(i)
        loss = model(**b).loss
        loss.backward()
        tuner.step(loss, b)


@pytest.mark.parametrize("make", [lambda m, o: IST(m, optimizer=o, probe_every=2), lambda m, o: LISA(m, optimizer=o)])
def test_frozen_layers_hold_no_gradient_and_no_optimizer_state(make):
    model = lora_bert()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner = make(model, opt)
    model.train()
    for i in range(6):
        b = batch(i)
        model(**b).loss.backward()
        for j, group in enumerate(tuner.groups):
            for p in group.params:
                assert (p.grad is not None) == (j in tuner.active)
                assert p.requires_grad == (j in tuner.active)
        assert all(p.grad is not None for p in tuner.always)  # the classifier head trains at every step
        tuner.step(None, b)
        frozen = [p for j, g in enumerate(tuner.groups) if j not in tuner.active for p in g.params]
        assert all(p.grad is None and p not in opt.state for p in frozen)
    # the same loop with every LoRA layer trained holds more
    full = lora_bert()
    full_opt = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=1e-2)
    full.train()
    full(**batch(0)).loss.backward()
    full_opt.step()
    full_bytes = training_bytes(full, full_opt)
    assert tuner.peak["gradients"] < full_bytes["gradients"]
    assert tuner.peak["optimizer_state"] < full_bytes["optimizer_state"]
    tuner.close()


class Residual(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(x)


def test_ist_probes_find_the_layer_that_matters():
    """Only block 2 changes the output: suppressing it raises the loss, so IST ranks it first and trains it most."""
    torch.manual_seed(0)
    net = nn.Sequential(*[Residual(8) for _ in range(5)])
    with torch.no_grad():
        for i, block in enumerate(net):
            block.lin.weight.mul_(3.0 if i == 2 else 0.0)
            block.lin.bias.zero_()
    x = torch.randn(32, 8)
    y = net(x).detach()
    tuner = IST(net, layers=r"^\d+", probe_every=1, loss_fn=lambda m, b: ((m(b) - y) ** 2).mean())
    for _ in range(30):
        tuner.step(batch=x)
    imp = tuner.importance()
    assert imp.unit == "layer" and imp.names == ("0", "1", "2", "3", "4")
    assert imp.top(1)[0][0] == "2"
    draws = [tuner.choose() for _ in range(300)]
    assert sum(d == [2] for d in draws) / 300 > 0.4  # one of 5 layers trains per step: block 2 far above 20 %
    tuner.close()
    assert all(p.requires_grad for p in net.parameters())


def test_lisa_switches_layers_every_interval():
    model = lora_bert(layers=5)
    tuner = LISA(model, n_layers=2, interval=3)
    run(model, tuner, 9)
    chosen = [tuple(r["active"]) for r in tuner.history]
    assert all(len(c) == 2 for c in chosen)
    assert chosen[0] == chosen[1] == chosen[2] and chosen[3] == chosen[4] == chosen[5]
    assert len(set(chosen)) >= 2
    assert tuner.importance().values.sum().item() == pytest.approx(2.0)


def test_stop_and_resume_restores_scores_and_random_state():
    model = lora_bert()
    first = IST(model, probe_every=2, seed=3)
    run(model, first, 4)
    saved = first.state_dict()
    run(model, first, 4, start=4)
    first.close()
    resumed = IST(model, probe_every=2, seed=99)
    resumed.load_state_dict(saved)
    run(model, resumed, 4, start=4)
    assert [r["active"] for r in resumed.history] == [r["active"] for r in first.history]
    torch.testing.assert_close(resumed.scores(), first.scores())
    resumed.close()
    with pytest.raises(InputError, match="same method"):
        LISA(model).load_state_dict(saved)


def test_model_is_given_back_after_close_and_on_error():
    model = lora_bert()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"), IST(model) as tuner:
        assert [p.requires_grad for p in model.parameters()] != flags
        raise RuntimeError("boom")
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ModelError, match="closed"):
        tuner.step()


def test_bad_layer_choices_are_refused():
    model = lora_bert(layers=3)
    with pytest.raises(ModelError, match="matches none"):
        IST(model, layers=r"blocks\.\d+")
    with pytest.raises(InputError, match="n_layers"):
        LISA(model, n_layers=4)
    frozen = tiny_model("bert")
    frozen.requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable"):
        IST(frozen)
    with pytest.raises(InputError, match="loss_fn"):
        IST(model, probe_every=1).step(batch=(torch.zeros(1), torch.zeros(1)))


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=4, max_value=50))
def test_a_budget_above_the_layer_count_is_refused(n):
    with pytest.raises(InputError, match="trainable"):
        IST(nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)]), layers=r"^\d+", trainable=n)


def test_trainer_callback_runs_the_tuner():
    transformers = pytest.importorskip("transformers")

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            b = batch(i, n=1)
            return {"input_ids": b["input_ids"][0], "labels": b["labels"][0]}

    model = lora_bert()
    flags = [p.requires_grad for p in model.parameters()]
    tuner = IST(model, probe_every=2)
    args = transformers.TrainingArguments(
        output_dir="/tmp/wm-tune-trainer",
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
        learning_rate=1e-2,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[tuner.callback()])
    trainer.train()
    assert tuner.steps == 6 and tuner.closed
    assert (tuner.scores() != 0).any()  # probes ran on the captured training batches
    n_opt = sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    assert n_opt == sum(flags)  # every tuned layer is in the optimizer (LMFlow #726)
    state = trainer.optimizer.state
    last = tuner.history[-1]["active"]
    assert tuner.history[-1]["active"] == last
    assert all(p not in state for j, g in enumerate(tuner.groups) if j not in tuner.active for p in g.params)
    assert [p.requires_grad for p in model.parameters()] == flags

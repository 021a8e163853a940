"""The layer tuner: which layers train at each step, for a plain loop and for ``transformers.Trainer``.

A plain loop needs one line after ``loss.backward()``::

    tuner = IST(model, optimizer=opt)          # or LISA(...)
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        tuner.step(loss, batch)                # optimizer step, zero_grad, then the next layers
    tuner.close()                              # requires_grad and hooks as they were

A Trainer needs ``callbacks=[tuner.callback()]``. Frozen layers hold no gradient and no optimizer state: their
``requires_grad`` is off during backward, their ``.grad`` is dropped and their optimizer state is deleted when
they are frozen (it starts afresh when a layer is chosen again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from whatmatters.core.errors import InputError, ModelError
from whatmatters.core.importance import Importance
from whatmatters.tune.layers import group_layers
from whatmatters.tune.memory import base_optimizer, gradient_bytes, optimizer_state_bytes

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a dict batch with labels (Hugging Face models)."""
    if not isinstance(batch, dict):
        raise InputError(
            f"a probe needs the loss of a {type(batch).__name__} batch; pass loss_fn=lambda model, batch: ... "
            "(a scalar tensor) to the tuner"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise InputError("the model returned no loss for the probe batch; include labels or pass loss_fn=")
    return loss


class LayerTuner:
    """Base of IST and LISA: trains a chosen subset of the model's layers at each step.

    Args:
        model: a peft model or any torch module; its trainable parameters are the ones tuned.
        optimizer: the optimizer over those parameters; ``step`` runs it and prunes the state of frozen layers.
        layers: regex that finds the layer part of parameter names (default: ``layers.N``, ``layer.N``, ``h.N``,
            ``blocks.N``); trainable parameters outside every layer train at every step.
        seed: seed of the tuner's own random generator (saved by ``state_dict``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for probes (default: ``model(**batch).loss``).
        probe_data: an iterable of batches for probes (cycled); default: the batch given to ``step`` (in a
            Trainer: the last batch the model was trained on).
    """

    method = "layers"

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: Any = None,
        layers: str | None = None,
        seed: int = 0,
        loss_fn: LossFn | None = None,
        probe_data: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"a tuner needs a torch nn.Module, got {type(model).__name__}")
        self.model = model
        self.groups, self.always = group_layers(model, layers)
        self.names = [g.name for g in self.groups]
        self.pattern = layers
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss
        self._probe_data = probe_data
        self._probe_iter: Iterator[Any] | None = None
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self.generator = torch.Generator().manual_seed(int(seed))
        self.steps = 0
        self.history: list[dict[str, Any]] = []
        self.peak = {"gradients": 0, "optimizer_state": 0}
        self._handles: list[Any] = []
        self._last_batch: Any = None
        self.closed = False
        self.active: list[int] = []
        self._activate(self.choose())

    # ------------------------------------------------------------ what subclasses define
    def choose(self) -> list[int]:
        """Indices of the layers that train for the next step."""
        raise NotImplementedError

    def update(self, batch: Any) -> None:
        """Called after each step with the probe batch (IST probes here)."""

    def scores(self) -> torch.Tensor:
        """One score per layer, higher = more important."""
        raise NotImplementedError

    # ------------------------------------------------------------ the training step
    @property
    def n_layers(self) -> int:
        return len(self.groups)

    def step(self, loss: torch.Tensor | float | None = None, batch: Any = None) -> list[int]:
        """After ``loss.backward()``: optimizer step and ``zero_grad``, probes, then the next layers; returns them."""
        self._check_open()
        if self.optimizer is not None:
            self._measure_gradients()
            self.optimizer.step()
            self._measure_state()
            self.optimizer.zero_grad(set_to_none=True)
        return self.after_step(loss, batch)

    def after_step(self, loss: Any = None, batch: Any = None) -> list[int]:
        """The tuner's part of a step once the optimizer has stepped (what the Trainer callback calls)."""
        self.steps += 1
        record: dict[str, Any] = {"step": self.steps, "active": list(self.active)}
        if loss is not None:
            record["loss"] = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        probe = self._probe_batch(batch)
        if probe is not None:
            self.update(probe)
        record["scores"] = self.scores().tolist()
        self.history.append(record)
        self._activate(self.choose())
        return list(self.active)

    def _measure_gradients(self) -> None:
        """Before the optimizer step: the gradients held (their peak)."""
        self.peak["gradients"] = max(self.peak["gradients"], gradient_bytes(self.model))

    def _measure_state(self) -> None:
        """Right after the optimizer step: its state (its peak, before frozen layers' state is deleted)."""
        if self.optimizer is not None:
            self.peak["optimizer_state"] = max(self.peak["optimizer_state"], optimizer_state_bytes(self.optimizer))

    def _probe_batch(self, batch: Any) -> Any:
        if self._probe_data is None:
            return batch if batch is not None else self._last_batch
        for _ in range(2):
            if self._probe_iter is None:
                self._probe_iter = iter(self._probe_data)
            try:
                return next(self._probe_iter)
            except StopIteration:
                self._probe_iter = None
        raise InputError("probe_data yielded no batch; pass a non-empty iterable of batches")

    def _activate(self, chosen: list[int]) -> None:
        """Make exactly the ``chosen`` layers trainable; frozen ones lose their gradient and optimizer state."""
        chosen = sorted(int(i) for i in chosen)
        keep = set(chosen)
        state = base_optimizer(self.optimizer).state if self.optimizer is not None else None
        for i, group in enumerate(self.groups):
            on = i in keep
            for p in group.params:
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    if state is not None:
                        state.pop(p, None)
        self.active = chosen

    # ------------------------------------------------------------ results
    def importance(self) -> Importance:
        """The layer scores as an ``Importance`` (unit ``layer``, higher = more important)."""
        return Importance(
            values=self.scores().clone(),
            unit="layer",
            names=self.names,
            per_sample=False,
            method=self.method,
            params=self.params(),
            extra={"steps": self.steps},
        )

    def params(self) -> dict[str, Any]:
        return {"layers": self.pattern}

    def trainable_share(self) -> torch.Tensor:
        """Share of the recorded steps each layer was trained in."""
        counts = torch.zeros(self.n_layers)
        for record in self.history:
            counts[record["active"]] += 1
        return counts / max(len(self.history), 1)

    # ------------------------------------------------------------ stop / resume
    def state_dict(self) -> dict[str, Any]:
        """Steps, scores, the active layers, the history and the random generator's state."""
        return {
            "method": self.method,
            "names": list(self.names),
            "steps": self.steps,
            "active": list(self.active),
            "scores": self.scores().clone(),
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
            "peak": dict(self.peak),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the same method and layers)."""
        if state.get("method") != self.method or list(state.get("names", [])) != self.names:
            raise InputError(
                f"this state is from {state.get('method')!r} over {len(state.get('names', []))} layers; the tuner is "
                f"{self.method!r} over {self.n_layers} layers: load it into a tuner of the same method and model"
            )
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]
        self.peak = dict(state["peak"])
        self._load_scores(torch.as_tensor(state["scores"], dtype=torch.float32))
        self._activate(list(state["active"]))

    def _load_scores(self, scores: torch.Tensor) -> None:
        """Set the scores a state holds (methods with scores override)."""

    # ------------------------------------------------------------ Trainer and cleanup
    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` running this tuner inside ``Trainer.train()``.

        The Trainer builds its optimizer from the parameters that require grad when training starts, so every tuned
        layer is made trainable until then (a layer unfrozen later would otherwise never be optimized, LMFlow #726).
        """
        from whatmatters.tune.callback import tuner_callback

        self._check_open()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        return tuner_callback(self)

    def capture_batches(self, model: nn.Module) -> None:
        """Keep the last batch ``model`` is called with (keyword inputs), for probes inside a Trainer."""

        def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            if model.training and kwargs:
                self._last_batch = dict(kwargs)

        self._handles.append(model.register_forward_pre_hook(keep, with_kwargs=True))

    def close(self) -> None:
        """Give the model back as it was: every ``requires_grad`` flag restored, the tuner's hooks removed."""
        for p, flag in self._flags:
            p.requires_grad_(flag)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last_batch = None
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ModelError("this tuner was closed; create a new one (and load_state_dict to resume)")

    def __enter__(self) -> LayerTuner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.n_layers} layers, step {self.steps}, active {self.active})"

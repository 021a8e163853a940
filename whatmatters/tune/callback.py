"""A ``transformers.TrainerCallback`` that runs a layer tuner inside ``Trainer.train()``."""

from __future__ import annotations

from typing import Any


def tuner_callback(tuner: Any) -> Any:
    """The callback: the tuner starts at ``on_train_begin`` (with the Trainer's optimizer), measures gradients before
    each optimizer step, chooses the next layers at ``on_step_end`` and gives the model back at ``on_train_end``."""
    from transformers import TrainerCallback

    class LayerTunerCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw):
            tuner.optimizer = optimizer
            tuner.capture_batches(model if model is not None else tuner.model)
            tuner._activate(tuner.active)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
            tuner._measure_gradients()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any):
            tuner._measure_state()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
            tuner.after_step()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
            tuner.close()

    return LayerTunerCallback()

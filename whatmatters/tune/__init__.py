"""tune: importance during training.

* :class:`IST` / :class:`LISA` (``tuner.py``, ``ist.py``, ``lisa.py``): which layers train at each step, for a plain
  loop (``tuner.step(loss, batch)``) and ``transformers.Trainer`` (``callbacks=[tuner.callback()]``); frozen layers
  hold no gradient and no optimizer state (``memory.py`` measures both).
* ``ranks.py``: LoRA ranks from any layer ``Importance`` under a total budget (a ``LoraConfig.rank_pattern``).
"""

from whatmatters.tune.ist import IST
from whatmatters.tune.lisa import LISA
from whatmatters.tune.memory import training_bytes
from whatmatters.tune.ranks import allocate_ranks, lora_config, rank_pattern
from whatmatters.tune.tuner import LayerTuner

__all__ = ["IST", "LISA", "LayerTuner", "allocate_ranks", "lora_config", "rank_pattern", "training_bytes"]

"""tune: importance during training.

* :class:`IST` / :class:`LISA` (``tuner.py``, ``ist.py``, ``lisa.py``): which layers train at each step, for a plain
  loop (``tuner.step(loss, batch)``) and ``transformers.Trainer`` (``callbacks=[tuner.callback()]``); frozen layers
  hold no gradient and no optimizer state (``memory.py`` measures both).
* :class:`LIFT` (``lift.py``): only the principal weights train (top ``|W_r|`` entries, sparse values and optimizer
  state); :class:`PST` (``pst.py``): LoRA while pruning to a target sparsity with a low-rank learned importance
  (``sparse.py``: their shared base; both return a new model, ``merged()`` a plain one).
* ``ranks.py``: LoRA ranks from any layer ``Importance`` under a total budget (a ``LoraConfig.rank_pattern``).
"""

from whatmatters.tune.ist import IST
from whatmatters.tune.lift import LIFT, principal_magnitude
from whatmatters.tune.lisa import LISA
from whatmatters.tune.memory import training_bytes
from whatmatters.tune.pst import PST, cubic_sparsity
from whatmatters.tune.ranks import allocate_ranks, lora_config, rank_pattern
from whatmatters.tune.tuner import LayerTuner

__all__ = [
    "IST",
    "LIFT",
    "LISA",
    "PST",
    "LayerTuner",
    "allocate_ranks",
    "cubic_sparsity",
    "lora_config",
    "principal_magnitude",
    "rank_pattern",
    "training_bytes",
]

"""The tests' kit, written once and used by every test (OLMo-core's ``testing/`` package is the model).

- :func:`tiny_llama` / :data:`TINY_LLAMA`: the one tiny Llama (a module, or the inline ``model.config``
  of a run config), sizes overridden per test;
- :func:`run_distributed`: a function run on real gloo ranks in spawned processes, its return values
  back, a rank's failure raised with that rank's traceback; the ``on_two_ranks`` fixture shares one such
  launch between every check of the session marked ``@pytest.mark.on_two_ranks(fn)``;
- :mod:`tests.kit.zero`: the ZeRO-equivalence helpers (DeepSpeed config, full weights, partitions
  gathered into whole tensors, relative errors).

Whole ``cltk train`` runs on ranks go through the ``deepspeed`` launcher: :mod:`tests.multirank`
(``train_ranks``, ``train_killed`` for a run killed mid-stage).
"""

from tests.kit.distributed import run_distributed
from tests.kit.models import ODD_SIZES, TINY_LLAMA, model_sets, tiny_llama

__all__ = ["ODD_SIZES", "TINY_LLAMA", "model_sets", "run_distributed", "tiny_llama"]

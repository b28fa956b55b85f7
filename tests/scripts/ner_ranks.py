"""Several tiny continual NER runs in one 2-rank launch (run by tests/test_ner_multirank.py).

    deepspeed --num_gpus 2 tests/scripts/ner_ranks.py RUN1.yaml RUN2.yaml ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cltk.ner import load_ner_config, run_ner  # noqa: E402

for path in sys.argv[1:]:
    if not path.startswith("--local_rank"):
        run_ner(load_ner_config(path))

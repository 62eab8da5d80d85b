"""What every test shares: paths and data slices, tiny models, trainers, and ``memopt`` runners.

Tests import from here (``from helpers import quiet_trainer``); ``conftest.py`` holds only fixtures.
"""

from helpers.cli import (
    DDP_TWO_CPUS,
    NER,
    SST2,
    digest_args,
    fast_python,
    fit_overlay_on_ddp,
    memopt,
    memopt_command,
    read_digests,
    run_together,
    small_ner_args,
    subprocess_env,
    succeeded,
)
from helpers.models import TOKENIZER_FILES, copy_tokenizer, save_tiny_bert, tiny_bert_config
from helpers.paths import (
    CONLL_LABELS,
    EXAMPLE,
    PROJECT_ROOT,
    RECIPES,
    SHARED_DATA,
    head_of_conll,
    load_example,
    minilm_dir,
)
from helpers.trainers import Interrupt, fake_trainer, fit_tiny_ner, quiet_trainer

__all__ = [
    "CONLL_LABELS",
    "DDP_TWO_CPUS",
    "EXAMPLE",
    "NER",
    "PROJECT_ROOT",
    "RECIPES",
    "SHARED_DATA",
    "SST2",
    "TOKENIZER_FILES",
    "Interrupt",
    "copy_tokenizer",
    "digest_args",
    "fake_trainer",
    "fast_python",
    "fit_overlay_on_ddp",
    "fit_tiny_ner",
    "head_of_conll",
    "load_example",
    "memopt",
    "memopt_command",
    "minilm_dir",
    "quiet_trainer",
    "read_digests",
    "run_together",
    "save_tiny_bert",
    "small_ner_args",
    "subprocess_env",
    "succeeded",
    "tiny_bert_config",
]

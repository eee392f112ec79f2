"""The valid values of every enumerated option, in a module that imports nothing heavy.

The command line builds its choices and help texts from these tuples at start-up, before torch,
pytorch-metric-learning or scikit-learn are loaded; the modules that own each idea import them
from here (``models.ENCODERS``, ``train.VIEWS``, ``export.EXPORT_FORMATS``). Loss names are not
here: they come from the torch-free loss registry, ``nodulab.training.hparams``.
"""

from __future__ import annotations

ENCODERS = ("small-cnn", "resnet18")
VIEWS = ("both", "augment", "rerender")
"""View modes (``augment.VIEW_MODES``); ``both`` is the default for every loss."""
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("last", "best-val")
EXPORT_FORMATS = ("medmnist", "nifti", "png")
DEFAULT_EPOCHS = 30
"""Default epochs: on ``size-confound`` at 32 px, n = 2,000 every loss but ``triplet`` (whose
semi-hard loss is a mean over what it mines) ends with a flat training loss over its last 20% of
epochs (README: Training and evaluation, with the measured numbers)."""
MAX_EPOCHS = 10_000
"""Most epochs of one run (``[train] epochs``)."""
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 0.0
"""AdamW defaults (``hparams.OPTIMISER_PARAMS`` holds them with their tuning ranges)."""
MAX_N = 1_000_000
"""Largest sample count of one split (scenario ``n`` and ``--n``); ``scenarios.MAX_N`` is this."""
MAX_BATCH_SIZE = 65_536
"""Most samples of one batch (``--batch-size`` of ``train``, ``evaluate``, ``explain``; ``[train] batch_size``)."""
MAX_THREADS = 256
"""Most torch CPU threads of one run (``train --threads``, ``[train] threads``)."""
MAX_JOBS = 256
"""Most local worker processes of a study (``study --jobs``)."""
MAX_PER_CELL = 64
"""Most samples a gallery shows per (label, agrees) cell (``gallery --per-cell``)."""
MAX_SEED = 2**32 - 1
"""Largest training seed (``train --seed``): torch, numpy and scikit-learn all take it."""

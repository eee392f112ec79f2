"""The valid values of every enumerated option, in a module that imports nothing heavy.

The command line builds its choices and help texts from these tuples at start-up, before torch,
pytorch-metric-learning or scikit-learn are loaded; the modules that own each idea import them
from here (``models.ENCODERS``, ``train.VIEWS``, ``export.EXPORT_FORMATS``). ``LOSS_NAMES`` mirrors
the loss registry of ``nodulab.losses`` (a test keeps the two equal).
"""

from __future__ import annotations

ENCODERS = ("small-cnn", "resnet18")
VIEWS = ("augment", "rerender")
DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("last", "best-val")
EXPORT_FORMATS = ("medmnist", "nifti", "png")
MAX_N = 1_000_000
"""Largest sample count of one split (scenario ``n`` and ``--n``); ``scenarios.MAX_N`` is this."""
LOSS_NAMES = ("ce", "contrastive", "triplet", "supcon", "simclr", "ce+supcon", "ce+triplet")

"""The Python API a notebook user reaches for: ``import nodulab`` gives the verbs, lazily."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import nodulab


@pytest.mark.parametrize("name", sorted(nodulab._API))
def test_every_verb_is_a_documented_callable(name: str) -> None:
    value = getattr(nodulab, name)
    assert callable(value) and inspect.getdoc(value), name
    assert name in dir(nodulab) and name in nodulab.__all__


def test_importing_a_module_never_rebinds_a_verb() -> None:
    import nodulab.explanation.counterfactual  # noqa: F401
    import nodulab.synth.renderer
    import nodulab.training.loop  # noqa: F401

    assert nodulab.render is nodulab.synth.renderer.render
    for name in ("render", "train", "explain", "evaluate", "generate"):
        assert inspect.isfunction(getattr(nodulab, name)), name


def test_import_nodulab_loads_no_deep_learning_stack() -> None:
    heavy = "('torch', 'sklearn', 'matplotlib', 'pandas')"
    code = f"import sys, nodulab; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        nodulab.bogus  # noqa: B018

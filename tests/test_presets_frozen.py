"""The shipped presets render the same bytes as before the shape-realism factors (issue 10).

New factors (elongation, irregularity, graded spiculation, table-drawn rows) are opt-in: a
scenario that does not name them writes the same images, masks, factors.csv and dataset.json
(bar the version string) as nodulab did before them. The hashes were taken at commit 97c9d93.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from nodulab.data import generate
from nodulab.scenarios import load_scenario, resolve

FROZEN = {
    "attenuation-confound-2d": "86099f71466c7edfc09193a7f33fc6da86f28c90eb0626dc6772483b068dfabb",
    "attenuation-confound-3d": "d92ff5eb9d19d2c1498d11cc8afd8c4e1104f99a1a43bc41f5b83506756989b5",
    "clean-2d": "3d0d529f8d9f04c4a531bf50478c8e53c678fe477f4a2faa4d5e5e26a0cb3c95",
    "clean-3d": "8ba1db6edd0f02d01df82804ccfe0b0f619d78e771b6dd12a3d9547e2a7327d3",
    "paper-2d": "308c2a2cf6ef29dbdd756583d503005daefb738f7da420ddf0476dee0371f1e5",
    "paper-3d": "50b0b954df5b82777d3fef8133189e7ef0158292c82ab0eebc357a6cd808c034",
    "scanner-shift-2d": "2334218d73dd9297b718d21d58116129b00792aee1e0de481dad5fbc5f49af72",
    "scanner-shift-3d": "9658c42be2b63a5f0df0552aa5a165466d7fffdfaf572d6688828f507dd4964f",
    "size-confound-2d": "5dcd142da1f24676ad68b3e1a616533ddd1277eaa8e156916239decc1c796e96",
    "size-confound-3d": "589ea1f23789794b9cdeff4a0d6d568c0f287d9c613ff247d77cf54cb87ae721",
}


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "dataset.json":
            manifest = json.loads(data)
            manifest.pop("nodulab_version")
            data = json.dumps(manifest, sort_keys=True).encode()
        h.update(path.relative_to(root).as_posix().encode())
        h.update(data)
    return h.hexdigest()


@pytest.mark.parametrize("key", sorted(FROZEN))
def test_preset_bytes_unchanged(key: str, tmp_path: Path) -> None:
    name, dim = key.rsplit("-", 1)
    dim = int(dim[0])
    s = resolve(load_scenario(name), n=6, dim=dim, size=64 if dim == 2 else 32, pixel_mm=0.7 if dim == 2 else 1.4)
    assert digest(generate(s, tmp_path / "d", seed=3)) == FROZEN[key]

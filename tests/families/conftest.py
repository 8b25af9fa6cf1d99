"""Tiny random-weight Hugging Face models of eleven families, built once per session with
`save_pretrained` (tests/hf_families.py) and loaded through `workbench.load("hf:<folder>")`."""

from __future__ import annotations

import warnings

import pytest

from tests.hf_families import FAMILIES, build_family


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """{family: folder} for every family in FAMILIES."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf-families")
    return {f: build_family(f, root / f) for f in FAMILIES}


_BRIDGES: dict = {}


@pytest.fixture(params=FAMILIES)
def family(request, family_folders):
    """(family name, TransformerBridge), one per family; each bridge is loaded once per session."""
    import workbench

    name = request.param
    if name not in _BRIDGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BRIDGES[name] = workbench.load(f"hf:{family_folders[name]}", device="cpu")
    return name, _BRIDGES[name]

"""The import direction of docs/architecture.md, checked on the source: every import (module
level or inside a function) of every module in model/ and pipeline/ stays within what its
layer may use."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MODEL = ("model", "model.weights", "model.weights.official", "model.evaluation")
# layer -> the layers its modules may import (besides the standard library and third parties)
ALLOWED = {
    "pipeline": set(),  # pipeline/__init__.py: the layers' description, no code
    # model/: the paper's models and their training, over the weights helpers; never the
    # networks that measure models, never the pipeline
    "model": {"model", "model.weights"},
    # how weights are stored and found: nothing of the models (fileio stays torch-free) ...
    "model.weights": {"model.weights"},
    # ... but the official checkpoints' layout maps tensors onto the paper's models
    "model.weights.official": {"model", "model.weights"},
    # the networks that measure models: the weights helpers only
    "model.evaluation": {"model.weights", "model.evaluation"},
    "pipeline.core": {*MODEL, "pipeline.core"},
    "pipeline.formats": {*MODEL, "pipeline.core", "pipeline.formats"},
    "pipeline.stages": {*MODEL, "pipeline.core", "pipeline.formats"},  # never another stage
    "pipeline.tools": {*MODEL, "pipeline.core", "pipeline.formats", "pipeline.tools"},
    "pipeline.run": {*MODEL, "pipeline.core", "pipeline.formats", "pipeline.stages"},
    "pipeline.demo": {
        *MODEL,
        "pipeline.core",
        "pipeline.formats",
        "pipeline.tools",
        "pipeline.run",
        "pipeline.demo",
    },
    "pipeline.cli": {
        *MODEL,
        "pipeline.core",
        "pipeline.formats",
        "pipeline.stages",
        "pipeline.tools",
        "pipeline.run",
        "pipeline.demo",
    },
}


def layer_of(module: str) -> str | None:
    """'pipeline.stages.shard' -> 'pipeline.stages'; 'model.rqvae' -> 'model';
    'model.evaluation.inception' -> 'model.evaluation'."""
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if module == layer or module.startswith(layer + ".")), None)  # fmt: skip


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a project module in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.tools import analysis` imports pipeline.tools.analysis
            names = [f"{node.module}.{a.name}" for a in node.names]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in ("model", "pipeline")]
    return found


def modules() -> list[tuple[str, Path]]:
    files = sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
    out = []
    for path in files:
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def violations(name: str, path: Path) -> list[str]:
    own = layer_of(name)
    assert own is not None, f"{path} is in no layer: add its folder to ALLOWED and the docs"
    bad = []
    for line, imported in project_imports(path):
        target = layer_of(imported) or layer_of(imported.rsplit(".", 1)[0])
        if own == "pipeline.stages" and target == own:
            stage = imported.split(".")[:3]
            ok = stage == name.split(".")[:3]  # a stage imports itself only
        else:
            ok = target in ALLOWED[own]
        if not ok:
            bad.append(f"{path.name}:{line} ({own}) imports {imported} ({target})")
    return bad


@pytest.mark.parametrize("name,path", modules(), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_follow_the_layers(name, path):
    assert violations(name, path) == []


def test_the_checker_catches_wrong_imports(tmp_path):
    """A core module importing a stage, a stage importing another stage, and the model
    importing the pipeline are all caught; a stage importing core is not."""
    source = tmp_path / "module.py"
    source.write_text("import json\n\ndef f():\n    from pipeline.stages.shard import Progress\n")
    assert violations("pipeline.core.storage", source) == [
        "module.py:4 (pipeline.core) imports pipeline.stages.shard.Progress (pipeline.stages)"
    ]
    assert len(violations("pipeline.stages.encode", source)) == 1
    assert violations("pipeline.stages.shard", source) == []
    source.write_text("from pipeline.core import storage\n")
    assert len(violations("model.rqvae", source)) == 1
    assert violations("pipeline.stages.encode", source) == []


def test_the_checker_keeps_the_models_apart_from_what_measures_them(tmp_path):
    """model/'s folders: the paper's models may not import a measuring network; the weights
    helpers (but the official layout) may not import a model; a measuring network may not
    import a paper model; none of them may import the pipeline."""
    source = tmp_path / "module.py"
    source.write_text("from model.evaluation.inception import InceptionV3\n")
    assert violations("model.rqvae", source) == [
        "module.py:1 (model) imports model.evaluation.inception.InceptionV3 (model.evaluation)"
    ]
    assert violations("model.evaluation.metrics", source) == []
    source.write_text("from model.rqvae import RQVAE\n")
    assert len(violations("model.weights.serialization", source)) == 1
    assert len(violations("model.evaluation.classifier", source)) == 1
    assert violations("model.weights.official", source) == []
    source.write_text("from model.weights.serialization import Pretrained\n")
    assert violations("model.rqvae", source) == []
    assert violations("model.evaluation.classifier", source) == []
    source.write_text("import pipeline.core.storage\n")
    for name in ("model.training", "model.weights.hub", "model.weights.official",
                 "model.evaluation.inception"):  # fmt: skip
        assert len(violations(name, source)) == 1, name

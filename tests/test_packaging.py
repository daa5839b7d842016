"""pip install . gives an `lpd` command from the distribution lpd-netacct ("lpd" on PyPI
is another project); the wheel carries lpd.py and the LICENSE only (setuptools would
otherwise take filters/ for the package) and the build writes nothing into dist/; the
sdist carries dist/, filters/, LICENSE and tests/filter_expressions.txt beside it."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytestmark = pytest.mark.offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wheel_names(wheel):
    """The wheel's members, checked to be lpd.py and its own .dist-info only."""
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = {n.split("/", 1)[0] for n in names if ".dist-info/" in n}
    assert len(dist_info) == 1 and dist_info.pop().startswith("lpd_netacct-"), names
    assert sorted(n for n in names if ".dist-info/" not in n) == ["lpd.py"], names
    license_ = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(license_) == 1, names
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        assert zipfile.ZipFile(wheel).read(license_[0]) == f.read()
    return names


def test_wheel_contains_the_module_and_dist_is_untouched(tmp_path):
    before = sorted(os.listdir(os.path.join(ROOT, "dist")))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", 
                    "-q", "-w", str(tmp_path), ROOT], check=True, timeout=300)
    wheels = list(tmp_path.glob("lpd_netacct-*.whl"))
    assert len(wheels) == 1
    names = wheel_names(wheels[0])
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert b"lpd = lpd:main" in zipfile.ZipFile(wheels[0]).read(entry[0])
    assert sorted(os.listdir(os.path.join(ROOT, "dist"))) == before


def test_installed_command_runs(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", 
                    ROOT], check=True, timeout=300)
    out = subprocess.run([str(venv / "bin" / "lpd"), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("lpd ")
    bad = subprocess.run([str(venv / "bin" / "lpd"), "--no-such-flag"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 64


# What the sdist must carry beside lpd.py: the service files, the example rules and the
# expressions the filter compiler is checked against.
SDIST_EXTRAS = ([os.path.relpath(os.path.join(d, n), ROOT)
                 for d, _, names in os.walk(os.path.join(ROOT, "dist")) for n in names]
                + [f"filters/{n}" for n in os.listdir(os.path.join(ROOT, "filters"))]
                + ["tests/filter_expressions.txt"])


def build_sdist(tmp_path):
    """Build the sdist with `python -m build` (PEP 517, in an isolated environment with
    the setuptools pyproject.toml asks for) from a copy of the tree (the build writes
    lpd_netacct.egg-info next to pyproject.toml); returns the .tar.gz path."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "bench"))
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    sdists = list(out.glob("lpd_netacct-*.tar.gz"))
    assert len(sdists) == 1, r.stdout
    return sdists[0]


def test_sdist_ships_dist_filters_and_expressions(tmp_path):
    assert {"dist/lpd@.service", "dist/lpd-textfile.sh", "dist/README", "dist/grafana/lpd.json",
            "dist/prometheus/prometheus.yml", "dist/prometheus/lpd.rules.yml"} <= set(SDIST_EXTRAS)
    assert any(n.startswith("filters/") and n.endswith(".filters") for n in SDIST_EXTRAS)
    sdist = build_sdist(tmp_path)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}
        for name in SDIST_EXTRAS + ["lpd.py", "pyproject.toml", "README.md", "LICENSE"]:
            assert name in members, f"{name} missing from {sdist.name}: {sorted(members)}"
            with open(os.path.join(ROOT, name), "rb") as f:
                assert tar.extractfile(members[name]).read() == f.read(), name
        assert members["dist/lpd-textfile.sh"].mode & 0o111, "textfile script not executable"
        tar.extractall(tmp_path / "unpacked")
    # pip installs from an sdist by building a wheel from it: still lpd.py only.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path / "wheel"), str(tmp_path / "unpacked" / top)],
                   check=True, timeout=300)
    wheels = list((tmp_path / "wheel").glob("lpd_netacct-*.whl"))
    assert len(wheels) == 1
    wheel_names(wheels[0])

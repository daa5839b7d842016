"""pip install . gives an `lpd` command; the wheel carries lpd.py (setuptools would
otherwise take filters/ for the package) and the build writes nothing into dist/."""
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_the_module_and_dist_is_untouched(tmp_path):
    before = sorted(os.listdir(os.path.join(ROOT, "dist")))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", 
                    "-q", "-w", str(tmp_path), ROOT], check=True, timeout=300)
    wheels = list(tmp_path.glob("lpd-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "lpd.py" in names
    assert not any(n.startswith(("filters/", "tests/", "dist/")) for n in names), names
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

"""Makes the repository's lpd.py importable and the test helpers (harness, netns, packets,
libpcap_oracle) importable as top-level modules; the fixtures several modules share."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
# The repository's lpd.py first: never an installed copy.
for path in (HERE, ROOT):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "corpus", "pcaps")

import harness  # noqa: E402 (after the path above)

# A veth pair between two fresh namespaces for each test (netns.Pair); a module that
# shares one pair across its tests binds harness.veth_pair with scope="module" itself.
pair = pytest.fixture(harness.veth_pair, name="pair")


@pytest.fixture(params=["cbpf", "auto"])       # auto: ebpf where it can
def engine(request, monkeypatch):
    """Each test that uses it runs with --engine cbpf and with auto (ebpf where the kernel
    and the options allow it, as a user gets): every harness.Lpd() of the test gets that
    engine unless it names one itself. Modules take it for all their tests with
    pytestmark = pytest.mark.usefixtures("engine")."""
    monkeypatch.setenv(harness.ENGINE_VAR, request.param)
    return request.param


LEVELS = ("unit", "offline", "live", "docker")      # registered in pyproject.toml


def pytest_collection_modifyitems(config, items):
    """Every test has exactly one level (module pytestmark or its own mark), so that
    `-m "not live and not docker"` is exactly what runs without root."""
    wrong = []
    for item in items:
        levels = sorted({m.name for m in item.iter_markers() if m.name in LEVELS})
        if len(levels) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(levels) or 'no level'}")
    if wrong:
        raise pytest.UsageError("tests need exactly one of the marks " + "/".join(LEVELS)
                                + ":\n" + "\n".join(wrong))

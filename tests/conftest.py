"""Makes the repository's lpd.py importable and the test helpers (netns, packets,
libpcap_oracle) importable as top-level modules."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "tests")
# The repository's lpd.py first: never an installed copy.
for path in (HERE, ROOT):
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)

CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "corpus", "pcaps")

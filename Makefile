# lpd — see README.md. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
# strace, prometheus-node-exporter, busybox: tests/test_dist.py (the unit's system-call
# filter against a traced lpd; the textfile script's output read by node_exporter itself
# and rendered by busybox awk as on OpenWrt). docker.io, podman, curl: the container tests
# (tests/test_http_docker.py, test_http_podman.py) start engines of their own; nothing
# here starts the system's. tmux: tests/test_top.py drives `lpd top` in one. prometheus
# (with promtool): tests/test_dashboard.py runs every dashboard query and the rules on it.
DEBIAN_PACKAGES = libpcap0.8 tcpdump netsniff-ng tcpreplay ethtool iproute2 iputils-ping \
	netcat-openbsd systemd python3 python3-prometheus-client python3-pytest python3-hypothesis \
	prometheus libcap2-bin procps strace prometheus-node-exporter busybox docker.io podman curl \
	tmux
.PHONY: deps test check bench wheel clean

deps:            ## system and Python packages the tests and the benchmark need (root)
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES)
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[test]'

test:            ## the whole suite; needs root (network namespaces) and libpcap
	$(PYTHON) -m pytest -q tests

check: deps test

bench:           ## speed, cost and loss beside tcpdump and libpcap (root for the live part)
	@command -v trafgen >/dev/null && command -v tcpdump >/dev/null && \
		$(PYTHON) -c 'import prometheus_client, ctypes; ctypes.CDLL("libpcap.so.0.8")' 2>/dev/null \
		|| $(MAKE) deps
	$(PYTHON) tests/bench.py

wheel:           ## build output goes to build/, never to dist/ (our unit files live there)
	$(PYTHON) -m pip wheel --no-deps -w build/wheel .

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis bench/results

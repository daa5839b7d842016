# lpd — see README.md. `make check` is what CI runs (.ci/run).
PYTHON ?= python3
# The tests' Python: a virtual environment on $(PYTHON) that sees its packages
# (--system-site-packages: Debian's python3-prometheus-client, pytest, ...) and gets
# the rest of the test extras from pip, so nothing is ever pip-installed into the
# system's Python (PEP 668: Debian 12 refuses that).
VENV = build/venv
# strace, prometheus-node-exporter, busybox: tests/test_dist.py (the unit's system-call
# filter against a traced lpd; the textfile script's output read by node_exporter itself
# and rendered by busybox awk as on OpenWrt). docker.io, podman, curl: the container tests
# (tests/test_http_docker.py, test_http_podman.py) start engines of their own; nothing
# here starts the system's. tmux: tests/test_top.py drives `lpd top` in one. prometheus
# (with promtool): tests/test_dashboard.py runs every dashboard query and the rules on it.
# debootstrap, systemd-container, lintian, man-db: tests/test_deb.py builds the .deb,
# checks it with lintian and man, and boots a Debian 12 root with it in systemd-nspawn.
# python3-venv: $(VENV) on Debian's python3. tshark: pcapng captures in the tests, and
# the oracle of flow octets. nfdump (nfcapd), pmacct (nfacctd): tests/test_ipfix.py
# sends lpd's IPFIX to both collectors; softflowd beside lpd in make bench.
# dnsmasq-base (the binary, no service): tests/test_names_live.py's resolver.
# publicsuffix: the Public Suffix List --names-domains reads when it is there (the last
# two labels of a name otherwise); tests/test_names.py runs the list's test vectors on it.
# python3-hpack: the oracle of lpd's HPACK decoder (tests/test_hpack.py). python3-h2: HTTP/2
# byte streams the frame layer is fed (tests/test_h2.py). python3-grpcio: the gRPC server and
# client in the containers (host /usr mounted; tests/test_grpc_live.py). nginx-light (its
# `http2` in clear text), nghttp2-client (h2load): tests/test_http2_live.py.
DEBIAN_PACKAGES = libpcap0.8 tcpdump netsniff-ng tcpreplay ethtool iproute2 iputils-ping \
	netcat-openbsd systemd python3 python3-prometheus-client python3-pytest python3-hypothesis \
	python3-maxminddb python3-venv prometheus libcap2-bin procps strace \
	prometheus-node-exporter busybox docker.io podman curl tmux debootstrap systemd-container \
	lintian man-db tshark nfdump pmacct softflowd dnsmasq-base publicsuffix \
	python3-hpack python3-h2 python3-grpcio nginx-light nghttp2-client

# make install: lpd as $(PREFIX)/sbin/lpd on the system's /usr/bin/python3, its unit
# where systemd looks ($(PREFIX)/lib/systemd/system: /usr/local/lib/systemd/system for
# the default prefix, /usr/lib/systemd/system for /usr), the man page, the example rules
# and the other files of dist/ under $(PREFIX)/share/lpd. The configuration stays in
# /etc whatever the prefix: the unit reads /etc/default/lpd and /etc/lpd/.
PREFIX ?= /usr/local
DESTDIR ?=
SBINDIR = $(PREFIX)/sbin
UNITDIR = $(PREFIX)/lib/systemd/system
MAN8DIR = $(PREFIX)/share/man/man8
DATADIR = $(PREFIX)/share/lpd
DOCDIR = $(PREFIX)/share/doc/lpd

# make deb: build/deb/lpd_<version>_all.deb from `make install` into a staging root.
VERSION := $(shell sed -n 's/^__version__ = "\([^"]*\)".*/\1/p' lpd.py)
DEB_DIR ?= build/deb
DEB_ROOT = $(DEB_DIR)/root
DEB_MAINTAINER ?= lpd developers <lpd@example.invalid>

.PHONY: deps venv test check bench wheel install uninstall deb clean

deps:            ## system packages (root), then the tests' virtual environment
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES)
	$(MAKE) --no-print-directory venv

venv:            ## $(VENV) on $(PYTHON) with the test extras; remade from scratch
	$(PYTHON) -m venv --clear --system-site-packages $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

test:            ## the whole suite; needs root (network namespaces) and libpcap
	@[ -x $(VENV)/bin/python ] || $(MAKE) --no-print-directory venv
	$(VENV)/bin/python -m pytest -q tests

check: deps test

bench:           ## speed, cost and loss beside tcpdump, libpcap and softflowd (root: live part)
	@command -v trafgen >/dev/null && command -v tcpdump >/dev/null && \
		command -v nfcapd >/dev/null && command -v softflowd >/dev/null && \
		$(PYTHON) -c 'import prometheus_client, ctypes; ctypes.CDLL("libpcap.so.0.8")' 2>/dev/null \
		|| $(MAKE) deps
	$(PYTHON) tests/bench.py

wheel:           ## build output goes to build/, never to dist/ (our unit files live there)
	@[ -x $(VENV)/bin/python ] || $(MAKE) --no-print-directory venv
	$(VENV)/bin/python -m pip wheel --no-deps -w build/wheel .

install:         ## lpd, its unit, man page and examples under $(DESTDIR)$(PREFIX); /etc/lpd
	install -d -m 755 $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MAN8DIR) \
		$(DESTDIR)$(DATADIR)/filters $(DESTDIR)$(DATADIR)/grafana $(DESTDIR)$(DATADIR)/prometheus \
		$(DESTDIR)$(DOCDIR) $(DESTDIR)/etc/lpd $(DESTDIR)/etc/default
	{ echo '#!/usr/bin/python3'; sed '1{/^#!/d}' lpd.py; } > $(DESTDIR)$(SBINDIR)/lpd.tmp
	chmod 755 $(DESTDIR)$(SBINDIR)/lpd.tmp
	mv -f $(DESTDIR)$(SBINDIR)/lpd.tmp $(DESTDIR)$(SBINDIR)/lpd
	sed 's|^ExecStart=/usr/sbin/lpd |ExecStart=$(SBINDIR)/lpd |' dist/lpd@.service \
		> $(DESTDIR)$(UNITDIR)/lpd@.service
	chmod 644 $(DESTDIR)$(UNITDIR)/lpd@.service
	install -m 644 dist/lpd.8 $(DESTDIR)$(MAN8DIR)/lpd.8
	install -m 644 filters/*.filters $(DESTDIR)$(DATADIR)/filters/
	install -m 755 dist/lpd-textfile.sh $(DESTDIR)$(DATADIR)/
	install -m 644 dist/grafana/lpd.json $(DESTDIR)$(DATADIR)/grafana/
	install -m 644 dist/prometheus/*.yml $(DESTDIR)$(DATADIR)/prometheus/
	install -m 644 README.md $(DESTDIR)$(DOCDIR)/
	@# an existing /etc/default/lpd is the administrator's: never overwritten
	[ -e $(DESTDIR)/etc/default/lpd ] || install -m 644 dist/lpd.default $(DESTDIR)/etc/default/lpd
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

uninstall:       ## what `make install` put under $(PREFIX); /etc stays
	rm -f $(DESTDIR)$(SBINDIR)/lpd $(DESTDIR)$(UNITDIR)/lpd@.service $(DESTDIR)$(MAN8DIR)/lpd.8
	rm -rf $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

deb:             ## $(DEB_DIR)/lpd_$(VERSION)_all.deb: `make install` into a root, plus DEBIAN/
	@[ -n "$(VERSION)" ] || { echo "no __version__ in lpd.py" >&2; exit 1; }
	rm -rf $(DEB_DIR)
	$(MAKE) --no-print-directory install DESTDIR=$(abspath $(DEB_ROOT)) PREFIX=/usr
	gzip -9n $(DEB_ROOT)/usr/share/man/man8/lpd.8 $(DEB_ROOT)/usr/share/doc/lpd/README.md
	install -m 644 dist/debian/copyright $(DEB_ROOT)/usr/share/doc/lpd/copyright
	gzip -9n < dist/debian/changelog > $(DEB_ROOT)/usr/share/doc/lpd/changelog.gz
	chmod 644 $(DEB_ROOT)/usr/share/doc/lpd/changelog.gz
	install -d -m 755 $(DEB_ROOT)/DEBIAN
	install -m 755 dist/debian/postinst dist/debian/prerm dist/debian/postrm $(DEB_ROOT)/DEBIAN/
	cd $(DEB_ROOT) && find etc -type f | sed 's|^|/|' | LC_ALL=C sort > DEBIAN/conffiles
	cd $(DEB_ROOT) && find usr -type f | LC_ALL=C sort | xargs md5sum > DEBIAN/md5sums
	sed -e 's/@VERSION@/$(VERSION)/' -e 's/@MAINTAINER@/$(DEB_MAINTAINER)/' \
		-e "s/@INSTALLED_SIZE@/$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1)/" \
		dist/debian/control > $(DEB_ROOT)/DEBIAN/control
	chmod 644 $(DEB_ROOT)/DEBIAN/conffiles $(DEB_ROOT)/DEBIAN/md5sums $(DEB_ROOT)/DEBIAN/control
	@# the changelog's top entry is the package's version
	[ "$$(sed -n '1s/^lpd (\([^)]*\)).*/\1/p' dist/debian/changelog)" = "$(VERSION)" ] || \
		{ echo "dist/debian/changelog: no entry for $(VERSION) at the top" >&2; exit 1; }
	SOURCE_DATE_EPOCH=$$(date -d "$$(sed -n 's/^ -- .*>  //p' dist/debian/changelog | head -n 1)" +%s) \
		dpkg-deb --root-owner-group -Zxz --build $(DEB_ROOT) $(DEB_DIR)/lpd_$(VERSION)_all.deb

clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis bench/results

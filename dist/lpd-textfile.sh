#!/bin/sh
# lpd-textfile.sh SOCKET [OUTFILE.prom]
#
# node_exporter textfile output from lpd's (or bpfcountd's) rule socket, the
# same lines bpfcountd's dist/prometheus_txtfile.sh prints:
#   bpfcountd_packets{iface="eth0",<id>} <packets>
#   bpfcountd_bytes{iface="eth0",<id>} <bytes>
# with the id pasted inside the braces, so ids are written as label pairs
# (type="arp",subtype="request"). Unlike that script:
#   - with OUTFILE the file is replaced atomically (temporary file in the same
#     directory, then mv), so node_exporter never reads half a file; if the
#     socket cannot be read or the dump is malformed the old file is kept and
#     the exit status is non-zero;
#   - an id that node_exporter would not accept as labels becomes
#     rule="<id>" (quotes and backslashes escaped) instead of text that makes
#     node_exporter drop the whole file: an id without '=' (arp-req), and any
#     id that is not exactly name="value" pairs joined by ',' (type=arp,
#     a="1",a="2", iface="x" beside our own iface label, names starting with
#     "__", escapes other than \\ \" \n);
#   - the interface comes from lpd's /run/lpd/<iface>.sock as well as from
#     bpfcountd's /var/run/bpfcountd.<iface>.sock, dots in it included; set
#     IFACE= to override.
# lpd itself exports lpd_rule_packets_total/lpd_rule_bytes_total on its
# metrics port; this script is for boxes that already collect textfiles.
#
# Nothing installs this script: copy it, e.g.
#   install -m 0755 dist/lpd-textfile.sh /usr/local/bin/
# cron (/etc/cron.d/lpd-textfile):
#   * * * * * root /usr/local/bin/lpd-textfile.sh /run/lpd/eth0.sock /var/lib/prometheus/node-exporter/lpd-eth0.prom
#
# Needs sh, nc with -U (netcat-openbsd) and a POSIX awk (tested: mawk, busybox
# awk); NC= and AWK= choose others.
set -eu

usock_path=${1:?usage: lpd-textfile.sh SOCKET [OUTFILE.prom]}
out=${2:-}
NC=${NC:-nc}
AWK=${AWK:-awk}

if [ -z "${IFACE:-}" ]; then
	IFACE=$(basename "$usock_path" .sock)
	IFACE=${IFACE#bpfcountd.}
fi

stats=$("$NC" -U "$usock_path" </dev/null) || {
	echo "lpd-textfile.sh: cannot read $usock_path" >&2
	exit 1
}

# One awk for all lines. IFACE and the socket path go through the environment:
# awk -v would interpret backslashes in them.
render() {
	printf '%s\n' "$stats" | IFACE=$IFACE SRC=$usock_path LC_ALL=C "$AWK" '
	# s as the inside of a quoted label value.
	function esc(s,   r, i, c) {
		r = ""
		for (i = 1; i <= length(s); i++) {
			c = substr(s, i, 1)
			if (c == "\\") r = r "\\\\"
			else if (c == "\"") r = r "\\\""
			else if (c == "\n") r = r "\\n"
			else r = r c
		}
		return r
	}
	# 1 if s is name="value"[,name="value"...] as node_exporter parses it: valid
	# names, none twice, none "iface" (ours) or starting with "__" (reserved),
	# values with no escapes but \\ \" \n.
	function labellist(s,   name, c, seen) {
		split("", seen)
		for (;;) {
			if (!match(s, /^[a-zA-Z_][a-zA-Z0-9_]*="/)) return 0
			name = substr(s, 1, RLENGTH - 2)
			if (name == "iface" || substr(name, 1, 2) == "__" || (name in seen)) return 0
			seen[name] = 1
			s = substr(s, RLENGTH + 1)
			for (;;) {
				if (s == "") return 0
				c = substr(s, 1, 1)
				if (c == "\"") break
				if (c == "\\") {
					c = substr(s, 2, 1)
					if (c != "\\" && c != "\"" && c != "n") return 0
					s = substr(s, 3)
				} else {
					s = substr(s, 2)
				}
			}
			s = substr(s, 2)
			if (s == "") return 1
			if (substr(s, 1, 1) != ",") return 0
			s = substr(s, 2)
		}
	}
	function malformed(line) {
		printf "lpd-textfile.sh: malformed line from %s: %s\n", ENVIRON["SRC"], line | "cat 1>&2"
		close("cat 1>&2")
		exit 1
	}
	BEGIN { iface = esc(ENVIRON["IFACE"]) }
	$0 == "" { next }
	{
		# <id>:<bytes>:<packets>, split at the last two colons (a bpfcountd id
		# may contain one).
		if (!match($0, /:[0-9]+:[0-9]+$/) || RSTART == 1) malformed($0)
		id = substr($0, 1, RSTART - 1)
		split(substr($0, RSTART + 1), n, ":")
		l = labellist(id) ? id : "rule=\"" esc(id) "\""
		printf "bpfcountd_packets{iface=\"%s\",%s} %s\n", iface, l, n[2]
		printf "bpfcountd_bytes{iface=\"%s\",%s} %s\n", iface, l, n[1]
	}
	'
}

if [ -z "$out" ]; then
	render
	exit
fi

tmp=$(mktemp "$(dirname "$out")/.lpd-textfile.XXXXXX")
trap 'rm -f "$tmp"' EXIT
render >"$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT

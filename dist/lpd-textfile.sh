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
#   - an id that is not a label list (no '=') becomes rule="<id>" instead of
#     text node_exporter rejects;
#   - the interface comes from lpd's /run/lpd/<iface>.sock as well as from
#     bpfcountd's /var/run/bpfcountd.<iface>.sock, dots in it included; set
#     IFACE= to override.
# lpd itself exports lpd_rule_packets_total/lpd_rule_bytes_total on its
# metrics port; this script is for boxes that already collect textfiles.
#
# cron:  * * * * * root /usr/share/lpd/lpd-textfile.sh /run/lpd/eth0.sock /var/lib/prometheus/node-exporter/lpd-eth0.prom
set -eu

usock_path=${1:?usage: lpd-textfile.sh SOCKET [OUTFILE.prom]}
out=${2:-}
NC=${NC:-nc}

if [ -z "${IFACE:-}" ]; then
	IFACE=$(basename "$usock_path" .sock)
	IFACE=${IFACE#bpfcountd.}
fi

stats=$("$NC" -U "$usock_path" </dev/null) || {
	echo "lpd-textfile.sh: cannot read $usock_path" >&2
	exit 1
}

# Label text for one id: bpfcountd's label list as is, anything else as rule="id".
labels() {
	case $1 in
	*=*) printf '%s' "$1" ;;
	*) printf 'rule="%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')" ;;
	esac
}

malformed() {
	printf 'lpd-textfile.sh: malformed line from %s: %s\n' "$usock_path" "$1" >&2
	exit 1
}

render() {
	printf '%s\n' "$stats" | while IFS= read -r line; do
		[ -n "$line" ] || continue
		id=${line%:*:*}
		rest=${line#"$id":}
		bytes=${rest%:*}
		packets=${rest#*:}
		case $line in *:*:*) ;; *) malformed "$line" ;; esac
		case $bytes in '' | *[!0-9]*) malformed "$line" ;; esac
		case $packets in '' | *[!0-9]*) malformed "$line" ;; esac
		[ -n "$id" ] || malformed "$line"
		l=$(labels "$id")
		# printf, not echo: dash's echo would interpret backslashes in ids.
		printf 'bpfcountd_packets{iface="%s",%s} %s\n' "$IFACE" "$l" "$packets"
		printf 'bpfcountd_bytes{iface="%s",%s} %s\n' "$IFACE" "$l" "$bytes"
	done
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

#!/bin/bash
# The demo: a 3-host lab on this machine, a few containers placed across it,
# a command run in one, live, post-copy and cold migrations, an HA container
# failed over when its host loses power, and the fleet listed. The lab stays up afterwards. Any failed step stops the demo with a
# non-zero exit (CI runs it end to end: .ci/run). CORRAL_DEMO_LAB names the lab
# (default demo).
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=${CORRAL_DEMO_LAB:-demo}
CORRAL="$PWD/.venv/bin/corral"
# Make `corral` callable from anywhere for the rest of the session.
ln -sf "$CORRAL" /usr/local/bin/corral

step() {
    printf '\n\033[1m$ corral %s\033[0m\n' "$*"
    "$CORRAL" "$@" || { printf 'demo: step failed (exit %s): corral %s\n' "$?" "$*" >&2; exit 1; }
}

"$CORRAL" lab down --name "$LAB" >/dev/null 2>&1 || true
step lab up --nodes 3 --name "$LAB"
step node ls
step ct create web1 --template busybox --memory 128M --cpus 0.5 --start
step ct create web2 --template busybox --memory 128M --start
step ct create db1 --template busybox --memory 256M --node n3 --start
step ct ls
step ct exec web1 -- sh -c 'echo "hello from $(hostname) at $(ip -4 -o addr show eth0 | cut -d" " -f7)"'
web2_ip=$("$CORRAL" ct show web2 -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["network"]["ipv4_cidr"].split("/")[0])')
step ct exec web1 -- ping -c 1 -W 2 "$web2_ip"
step ct show db1
# Live migration: web1 keeps its processes, memory and address while it moves.
step ct exec web1 -- sh -c 'echo "init started $(cut -d" " -f22 /proc/1/stat) ticks after boot; pid of sleep: $(pidof sleep)"'
step ct migrate web1 --to n3 --live
step ct exec web1 -- sh -c 'echo "same processes on $(hostname), pid of sleep: $(pidof sleep)"'
# Post-copy: db1 resumes on n2 at once, its memory follows on demand from n3.
step ct migrate db1 --to n2 --live --postcopy
# Cold: stop, copy what changed since the passes made while it ran, start.
step ct migrate web2 --to n1
step ops ls
# Failover: an HA container on shared storage, the failover daemon watching; its host
# loses power. The controller counts the host dead once its lease (and a margin) ran out,
# the lab's fence command proves it off, then the daemon asks for the failover.
step ct create ha1 --template busybox --storage image --ha --node n2 --start
failoverd_log=$(mktemp /tmp/corral-demo-failoverd.XXXXXX.log)
"$PWD/.venv/bin/corral-failoverd" --config "$("$PWD/.venv/bin/python" -c 'import lab, sys; print(lab.lab_cli_config(sys.argv[1]))' "$LAB")" \
    >"$failoverd_log" 2>&1 &
failoverd_pid=$!
trap 'kill "$failoverd_pid" 2>/dev/null || true' EXIT
since=$("$CORRAL" events --no-follow -o json | python3 -c 'import json,sys; print(max([json.loads(l)["seq"] for l in sys.stdin if l.strip()] or [0]))')
sleep 2  # a heartbeat tells n2's agent that ha1 is HA
step lab kill n2 --name "$LAB"
for _ in $(seq 60); do  # at most 30 s
    "$CORRAL" ct show ha1 -o json | python3 -c 'import json,sys; c=json.load(sys.stdin); sys.exit(c["node"] == "n2" or c["state"] != "running")' && break
    sleep 0.5
done
step events --no-follow --since "$since"
step ct show ha1
"$CORRAL" ct show ha1 -o json | python3 -c 'import json,sys; c=json.load(sys.stdin); sys.exit(c["node"] == "n2" or c["state"] != "running")' \
    || { echo "demo: ha1 did not fail over (failoverd's log: $failoverd_log)" >&2; exit 1; }
step lab start n2 --wait --name "$LAB"
kill "$failoverd_pid" && wait "$failoverd_pid" 2>/dev/null || true
trap - EXIT
rm -f "$failoverd_log"
step ct ls
cat <<MSG

The lab is up: 3 hosts (network namespaces corral-$LAB-n1..n3), each with its
own corral-agent, and a controller. \`corral\` talks to it with no extra step,
e.g. \`corral ct ls\`, \`corral ct exec web1 -- ps\`, \`corral node show n1\`.
Take it down with: corral lab down --name $LAB
MSG

#!/bin/sh
# Inside a VM running Debian's kernel (test_ipip_vm.py boots it with virtme-ng): IPIP end to
# end. Builds the namespaces, has program.py apply Pipit's dataplane to the nodes, then pings
# and captures. Prints `RESULT key=value` lines for the host to check; shell and tcpdump do
# the rest because Python is slow under emulation (and so is every process start: hence one
# `ip -batch` per namespace).
#
#   pod vm-pa 10.244.1.2 - node vm-a 192.168.1.10/24 - to-a [vm-r] to-b - 192.168.2.10/24 node vm-b - pod vm-pb 10.244.2.2
#                                         (MTU 1400 between the nodes and the router)
#   pod vm-pc 10.245.1.2 - node vm-c 192.168.3.10/24 ------------------- 192.168.3.11/24 node vm-d - pod vm-pd 10.245.2.2
#
# The router knows no pod address: pods a and b can talk only through tunnels (pool
# 10.244.0.0/16, ipipMode Always); c and d share a subnet (pool 10.245.0.0/16, CrossSubnet).
# The addresses match test_ipip_vm.py's plan.
#
# usage: ipip_vm.sh PLAN.json PYTHON
set -u
PLAN=$1
PYTHON=$2
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=/tmp/pipit-vm
mkdir -p "$OUT"
uptime_now() { cut -d' ' -f1 /proc/uptime; }
START=$(uptime_now)
result() { echo "RESULT $1"; }
result "boot_seconds=$START"

modprobe ipip && result "modprobe=ok" || result "modprobe=failed"

ip -batch - <<EOF
netns add vm-r
netns add vm-a
netns add vm-b
netns add vm-c
netns add vm-d
netns add vm-pa
netns add vm-pb
netns add vm-pc
netns add vm-pd
netns add vm-x
EOF
for ns in vm-r vm-a vm-b vm-c vm-d; do ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1; done

# underlay: a and b behind the router on links of MTU 1400 (not the 1500 tunl0's default MTU
# of 1480 assumes), c and d on one link
ip -n vm-r -batch - <<EOF
link set lo up
link add to-a mtu 1400 type veth peer name eth0 mtu 1400 netns vm-a
link add to-b mtu 1400 type veth peer name eth0 mtu 1400 netns vm-b
addr add 192.168.1.1/24 dev to-a
addr add 192.168.2.1/24 dev to-b
link set to-a up
link set to-b up
EOF
ip -n vm-c link add eth0 type veth peer name eth0 netns vm-d

# Pods get Calico's veth shape, their MTU left at 1500: in the pod its /32 and a default route
# via 169.254.1.1 onlink; on the node 169.254.1.1/32 and a /32 route to the pod.
node() {  # node netns, address, gateway or "", pod netns, pod address
    ip -n "$1" -batch - <<EOF
link set lo up
addr add $2 dev eth0
link set eth0 up
link add $4 type veth peer name eth0 netns $4
addr add 169.254.1.1/32 dev $4
link set $4 up
route add $5/32 dev $4
${3:+route add default via $3}
EOF
    ip -n "$4" -batch - <<EOF
link set lo up
addr add $5/32 dev eth0
link set eth0 up
route add default via 169.254.1.1 dev eth0 onlink
EOF
}
node vm-a 192.168.1.10/24 192.168.1.1 vm-pa 10.244.1.2
node vm-b 192.168.2.10/24 192.168.2.1 vm-pb 10.244.2.2
node vm-c 192.168.3.10/24 "" vm-pc 10.245.1.2
node vm-d 192.168.3.11/24 "" vm-pd 10.245.2.2
result "setup_done_at=$(uptime_now)"

# Pipit's dataplane code programs the nodes (tunl0 and the routes), and takes tunl0 through an
# address change, release and retirement in vm-x.
PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$ROOT" "$PYTHON" "$ROOT/tests/vm/program.py" "$PLAN" \
    > "$OUT/program.out" 2>&1
result "program_exit=$?"
cat "$OUT/program.out"
POD_MTU=$(sed -n 's/^RESULT node=vm-a pod_mtu=\([0-9]*\).*/\1/p' "$OUT/program.out")

for ns in vm-a vm-c; do
    ip -n "$ns" route show proto 91 | while read -r line; do result "route_$ns=$line"; done
    result "tunl0_$ns=$(ip -n "$ns" -o -4 addr show dev tunl0 | awk '{print $4}')"
    result "tunl0_link_$ns=$(ip -n "$ns" -o link show tunl0 | grep -o '<[^>]*> mtu [0-9]*')"
done

capture() {  # netns, interface, name: tcpdump in the background, waits until it listens
    # (`ip netns exec` execs tcpdump, so $! is tcpdump itself)
    ip netns exec "$1" tcpdump -i "$2" -n -U --immediate-mode -Z root -w "$OUT/$3.pcap" \
        > "$OUT/$3.log" 2>&1 &
    echo $! > "$OUT/$3.pid"
    deadline=$(( $(date +%s) + 60 ))
    until grep -q "listening on" "$OUT/$3.log"; do
        [ "$(date +%s)" -lt "$deadline" ] || { result "capture_$3=did-not-start"; return 1; }
        sleep 0.1
    done
}
stop_capture() {  # SIGTERM (a background job ignores SIGINT): tcpdump flushes and exits
    pid=$(cat "$OUT/$1.pid")
    kill -TERM "$pid"
    deadline=$(( $(date +%s) + 30 ))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
count() {  # capture name, filter
    tcpdump -r "$OUT/$1.pcap" -n --count "$2" 2>/dev/null | awk '{print $1}'
}
wait_ping() {  # pod netns, address: 0 once a reply came, 1 after 60 s without one
    deadline=$(( $(date +%s) + 60 ))
    until ip netns exec "$1" ping -n -c 1 -W 3 "$2" > /dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
    done
}

# 1. IPIP Always between subnets: pod a -> pod b, seen on the router's link to a.
capture vm-r to-a always
wait_ping vm-pa 10.244.2.2 && result "ping_always=ok" || result "ping_always=failed"
ip netns exec vm-pa ping -n -c 3 -i 0.2 -W 3 10.244.2.2 > /dev/null 2>&1 \
    && result "ping3_always=ok" || result "ping3_always=failed"
# MTU: pods keep 1500 on their veth, so it is tunl0's MTU that stops a packet one byte over
# the published pod MTU (ICMP payload = MTU - 28 bytes of IPv4 and ICMP headers).
if [ -n "$POD_MTU" ]; then
    ip netns exec vm-pa ping -n -c 1 -W 3 -M do -s $((POD_MTU - 28)) 10.244.2.2 \
        > "$OUT/fits.txt" 2>&1
    result "mtu_fits=$?"
    ip netns exec vm-pa ping -n -c 1 -W 3 -M do -s $((POD_MTU - 27)) 10.244.2.2 \
        > "$OUT/too_big.txt" 2>&1
    result "mtu_too_big=$?"
    result "mtu_too_big_says=$(grep -o 'mtu *= *[0-9]*' "$OUT/too_big.txt" | head -1)"
fi
stop_capture always
result "always_ipip_packets=$(count always 'ip proto 4')"
result "always_ipip_full_size=$(count always 'ip proto 4 and ip[2:2] == 1400')"
result "always_bare_pod_packets=$(count always 'net 10.244.0.0/16')"
result "always_fragments=$(count always 'ip[6:2] & 0x3fff != 0')"
tcpdump -r "$OUT/always.pcap" -n 'ip proto 4' 2>/dev/null | head -2 | while read -r line; do
    result "always_sample=$line"
done

# 2. CrossSubnet inside one subnet: pod c -> pod d natively, seen on c's uplink.
capture vm-c eth0 cross
wait_ping vm-pc 10.245.2.2 && result "ping_cross=ok" || result "ping_cross=failed"
ip netns exec vm-pc ping -n -c 3 -i 0.2 -W 3 10.245.2.2 > /dev/null 2>&1 \
    && result "ping3_cross=ok" || result "ping3_cross=failed"
stop_capture cross
result "cross_ipip_packets=$(count cross 'ip proto 4')"
result "cross_pod_packets=$(count cross 'icmp and host 10.245.1.2 and host 10.245.2.2')"

result "in_vm_seconds=$(awk -v s="$START" '{printf "%.1f", $1 - s}' /proc/uptime)"
result "done=1"

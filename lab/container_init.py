"""Start one container of a lab pod, the way a container runtime does, then become its
process. The lab's kubelet (lab.kubelet) runs it as

    unshare --mount --propagation private -- python -m lab.container_init PLAN.json

inside the node's network namespace (hostNetwork pods), with the container's log as stdout
and stderr. In the new mount namespace it:

1. mounts a fresh writable layer over the image's root file system (overlayfs: the image
   stays as it is, a restarted container starts clean);
2. mounts /proc (with /proc/sys read-only, as for any unprivileged container), /sys read-only
   and the machine's /dev;
3. bind-mounts the pod's volumes (hostPath, emptyDir, Secret and ConfigMap files, made by the
   kubelet) at their mount paths, read-only where the pod spec says so;
4. makes the root read-only for readOnlyRootFilesystem, chroots into it;
5. keeps only the container's capabilities (Kubernetes' rule: the runtime's default set, less
   `drop`, plus `add`; `drop: [ALL]` starts from none) in the bounding set, sets
   no_new_privs for allowPrivilegeEscalation: false, takes runAsUser / runAsGroup;
6. executes the command with the container's environment.

The plan is JSON (lab.kubelet.ContainerPlan.to_json). Standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAPABILITIES = (  # linux/capability.h, by number
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {result.stderr.strip()}")


def bind(source: str, target: str, read_only: bool, recursive: bool = False) -> None:
    mount("--rbind" if recursive else "--bind", source, target)
    if read_only:
        mount("-o", "remount,bind,ro", target)


def mountpoint(merged: str, path: str, is_file: bool) -> str:
    """The place for a mount inside the container's root (made if missing)."""
    target = os.path.join(merged, path.lstrip("/"))
    if is_file:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)
    return target


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as last:
            return int(last.read())
    except (OSError, ValueError):
        return len(CAPABILITIES) - 1


def keep_capabilities(names: list[str] | None) -> None:
    """Drop every capability not in `names` from the bounding set (None: keep all). For uid
    0, what is left of the bounding set is what the executed program gets."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if names is None:
        return
    keep = {CAPABILITIES.index(name) for name in names}
    for number in range(last_capability() + 1):
        if number not in keep and libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"cannot drop capability {number}")


def main(plan_path: str) -> None:
    with open(plan_path) as source:
        plan = json.load(source)
    merged = os.path.join(plan["dir"], "merged")
    upper, work = os.path.join(plan["dir"], "upper"), os.path.join(plan["dir"], "work")
    for path in (merged, upper, work):
        os.makedirs(path, exist_ok=True)
    mount("-t", "overlay", "overlay", "-o",
          f"lowerdir={plan['rootfs']},upperdir={upper},workdir={work}", merged)
    proc = mountpoint(merged, "/proc", False)
    mount("-t", "proc", "proc", proc)
    if not plan.get("privileged"):
        bind(os.path.join(proc, "sys"), os.path.join(proc, "sys"), read_only=True)
    mount("-t", "sysfs", "-o", "ro", "sysfs", mountpoint(merged, "/sys", False))
    bind("/dev", mountpoint(merged, "/dev", False), read_only=False, recursive=True)
    for entry in plan["mounts"]:  # parents before children: sorted by the kubelet
        target = mountpoint(merged, entry["target"], entry["file"])
        bind(entry["source"], target, entry["readOnly"])
    with open(os.path.join(merged, "etc", "hosts"), "w") as hosts:
        hosts.write(f"127.0.0.1\tlocalhost\n{plan.get('hostIP', '127.0.1.1')}\t"
                    f"{plan.get('hostname', 'localhost')}\n")
    if plan.get("readOnlyRoot"):
        mount("-o", "remount,ro", merged)
    os.chroot(merged)
    os.chdir(plan.get("workingDir") or "/")
    keep_capabilities(plan.get("capabilities"))
    if plan.get("noNewPrivs"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if plan.get("gid") is not None:
        os.setgroups([])
        os.setgid(plan["gid"])
    if plan.get("uid") is not None:
        os.setuid(plan["uid"])
    argv = plan["argv"]
    try:
        os.execvpe(argv[0], argv, plan["env"])
    except OSError as error:
        print(f"container_init: cannot run {argv[0]}: {error.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except OSError as error:
        print(f"container_init: {error}", file=sys.stderr)
        sys.exit(128)

"""The Pod Security Standards' controls (kubernetes.io/docs/concepts/security/pod-security-standards)
that a pod of this chart could touch, per level; restricted includes baseline.

tests/workloads/test_sandbox_service.py holds the pods the operator renders to it too;
test_sandbox.py here shows it catches each control when broken once.
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
LEVELS = ("privileged", "baseline", "restricted")


def violations(pod: dict[str, Any], level: str) -> list[str]:
    """What keeps `pod` (a pod spec) out of a namespace enforcing `level`."""
    if level == "privileged":
        return []
    found = []
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    pod_context = pod.get("securityContext", {})
    found += [key for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"hostPath volume {volume['name']}")
        if level == "restricted" and not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} of type {sorted(kinds)}")
    for context in (pod_context, *(c.get("securityContext", {}) for c in containers)):
        profile = context.get("appArmorProfile")
        if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"appArmorProfile {profile['type']}")
    for container in containers:
        name, context = container["name"], container.get("securityContext", {})
        added = set(context.get("capabilities", {}).get("add", []))
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if added - BASELINE_CAPABILITIES:
            found.append(f"{name}: capabilities {sorted(added - BASELINE_CAPABILITIES)}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if level != "restricted":
            continue
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if added - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {sorted(added - {'NET_BIND_SERVICE'})}")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
    return found

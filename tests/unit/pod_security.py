"""Kubernetes Pod Security Standards, "restricted" profile (v1.30 rules), as a checker for pod
templates: one problem string per broken rule. Written from the published standard
(kubernetes.io/docs/concepts/security/pod-security-standards/), not from a validator's code."""

from __future__ import annotations

from typing import Any

ALLOWED_VOLUME_TYPES = frozenset({"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                  "persistentVolumeClaim", "projected", "secret"})
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})


def restricted_problems(pod_spec: dict[str, Any], where: str) -> list[str]:
    """Every rule of the restricted profile that `pod_spec` breaks."""
    problems = []
    pod_security = pod_spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{where}: {flag} is not allowed")
    for volume in pod_spec.get("volumes") or ():
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"{where}: volume {volume['name']} of type {sorted(kinds)} is not allowed")
    containers = list(pod_spec.get("containers") or ()) + list(pod_spec.get("initContainers") or ())
    for container in containers:
        problems += _container_problems(container, pod_security, f"{where}/{container.get('name')}")
    return problems


def _container_problems(container: dict[str, Any], pod: dict[str, Any], where: str) -> list[str]:
    own = container.get("securityContext") or {}
    problems = []

    def setting(name: str) -> Any:
        return own.get(name, pod.get(name))

    if own.get("privileged"):
        problems.append(f"{where}: privileged")
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if setting("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot must be true")
    if setting("runAsUser") == 0:
        problems.append(f"{where}: runAsUser must not be 0")
    seccomp = (own.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
    if seccomp not in ALLOWED_SECCOMP:
        problems.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost")
    capabilities = own.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or ()):
        problems.append(f"{where}: capabilities must drop ALL")
    if not set(capabilities.get("add") or ()) <= ALLOWED_ADDED_CAPABILITIES:
        problems.append(f"{where}: only NET_BIND_SERVICE may be added")
    for port in container.get("ports") or ():
        if port.get("hostPort"):
            problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems

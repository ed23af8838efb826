"""A JSON schema for the parts of KubeRay's `ray.io/v1` RayService that deploy/rayservice.yaml
uses, written from KubeRay's API types (rayservice_types.go / raycluster_types.go, v1.4-v1.5):
field names, types, enums and required fields. Objects we describe allow no other fields, so
a misspelled or misplaced field fails. Pod templates are checked as core/v1 PodTemplateSpecs
only for what the manifest sets."""

from __future__ import annotations

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_QUANTITY = {"type": ["string", "integer"]}
_RESOURCES = {"type": "object", "additionalProperties": False, "properties": {
    "requests": {"type": "object", "additionalProperties": _QUANTITY},
    "limits": {"type": "object", "additionalProperties": _QUANTITY}}}
_SECURITY = {"type": "object", "additionalProperties": False, "properties": {
    "runAsNonRoot": {"type": "boolean"}, "runAsUser": {"type": "integer"}, "runAsGroup": {"type": "integer"},
    "fsGroup": {"type": "integer"}, "allowPrivilegeEscalation": {"type": "boolean"},
    "privileged": {"type": "boolean"}, "readOnlyRootFilesystem": {"type": "boolean"},
    "capabilities": {"type": "object", "additionalProperties": False, "properties": {
        "add": {"type": "array", "items": {"type": "string"}}, "drop": {"type": "array", "items": {"type": "string"}}}},
    "seccompProfile": {"type": "object", "required": ["type"], "additionalProperties": False, "properties": {
        "type": {"enum": ["RuntimeDefault", "Localhost", "Unconfined"]}, "localhostProfile": {"type": "string"}}}}}
_ENV_VAR = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "value": {"type": "string"},
    "valueFrom": {"type": "object", "additionalProperties": False, "properties": {
        "secretKeyRef": {"type": "object", "required": ["key"], "additionalProperties": False, "properties": {
            "name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}}}}}
_CONTAINER = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "securityContext": _SECURITY,
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"], "additionalProperties": False,
                                         "properties": {"name": {"type": "string", "maxLength": 15},
                                                        "containerPort": _INT32, "protocol": {"type": "string"}}}},
    "env": {"type": "array", "items": _ENV_VAR}, "resources": _RESOURCES,
    "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"],
                                                "additionalProperties": False, "properties": {
                                                    "name": {"type": "string"}, "mountPath": {"type": "string"},
                                                    "readOnly": {"type": "boolean"}}}}}}
_POD_TEMPLATE = {"type": "object", "additionalProperties": False, "properties": {
    "metadata": {"type": "object", "additionalProperties": False, "properties": {
        "labels": _STRING_MAP, "annotations": _STRING_MAP}},
    "spec": {"type": "object", "required": ["containers"], "additionalProperties": False, "properties": {
        "securityContext": _SECURITY, "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "terminationGracePeriodSeconds": {"type": "integer"}}}}}
_HEAD = {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
    "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE, "serviceType": {"type": "string"},
    "enableIngress": {"type": "boolean"}}}
_WORKER = {"type": "object", "required": ["groupName", "template"], "additionalProperties": False, "properties": {
    "groupName": {"type": "string"}, "replicas": _INT32, "minReplicas": _INT32, "maxReplicas": _INT32,
    "idleTimeoutSeconds": _INT32, "numOfHosts": _INT32, "suspend": {"type": "boolean"},
    "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE}}
_AUTOSCALER = {"type": "object", "additionalProperties": False, "properties": {
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": _INT32,
    "resources": _RESOURCES, "securityContext": _SECURITY, "image": {"type": "string"},
    "imagePullPolicy": {"type": "string"}, "env": {"type": "array", "items": _ENV_VAR},
    "version": {"enum": ["v1", "v2"]}}}
RAYSERVICE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["rayClusterConfig"], "additionalProperties": False, "properties": {
            "serveConfigV2": {"type": "string"},
            "serviceUnhealthySecondThreshold": _INT32, "deploymentUnhealthySecondThreshold": _INT32,
            "excludeHeadPodFromServeSvc": {"type": "boolean"},
            "rayClusterConfig": {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                                 "properties": {
                                     "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                                     "autoscalerOptions": _AUTOSCALER, "headGroupSpec": _HEAD,
                                     "workerGroupSpecs": {"type": "array", "items": _WORKER},
                                     "suspend": {"type": "boolean"}}}}}}}
SERVICE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "Service"}, "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "ports"], "additionalProperties": False, "properties": {
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "selector": _STRING_MAP,
            "ports": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["port"], "additionalProperties": False, "properties": {
                    "name": {"type": "string"}, "port": _INT32, "targetPort": {"type": ["string", "integer"]},
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "appProtocol": {"type": "string"}}}}}}}}
# networking.k8s.io/v1 NetworkPolicy (Kubernetes' networking/v1 types), as far as the manifest uses it.
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STRING_MAP, "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False, "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
    "podSelector": _LABEL_SELECTOR, "namespaceSelector": _LABEL_SELECTOR,
    "ipBlock": {"type": "object", "required": ["cidr"], "additionalProperties": False, "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}}}
_POLICY_PORT = {"type": "object", "additionalProperties": False, "properties": {
    "port": {"type": ["string", "integer"]}, "endPort": _INT32, "protocol": {"enum": ["TCP", "UDP", "SCTP"]}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["podSelector"], "additionalProperties": False, "properties": {
            "podSelector": _LABEL_SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _POLICY_PORT}}}},
            "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "to": {"type": "array", "items": _PEER}, "ports": {"type": "array", "items": _POLICY_PORT}}}}}}}}

"""docker/kuberay/rayservice.yaml: a RayService KubeRay accepts and Ray Serve can deploy (checked, not run).

The Kubernetes side is checked against a JSON schema of the RayService fields the manifest uses (field names
and types as KubeRay's ray.io/v1 CRD defines them, unknown fields refused where a typo would be silently
ignored); the Serve side against Ray's own ``ServeDeploySchema``, and its ``args`` by building the application.
"""

from __future__ import annotations

import pytest
import yaml

from live_server import ROOT

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]'; make test does it)")
jsonschema = pytest.importorskip("jsonschema")  # a dependency of Ray
from ray.serve.schema import ServeDeploySchema  # noqa: E402

MANIFEST = ROOT / "docker" / "kuberay" / "rayservice.yaml"

QUANTITY = {"type": ["string", "integer"]}
STRING = {"type": "string"}
PORT = {"type": "object", "required": ["containerPort"], "additionalProperties": False,
        "properties": {"containerPort": {"type": "integer"}, "name": STRING, "protocol": STRING}}
CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "ports": {"type": "array", "items": PORT},
    "env": {"type": "array", "items": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}, "value": {"type": "string"}}}},
    "resources": {"type": "object", "additionalProperties": False, "properties": {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY}}}}}
POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"],
    "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}}}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # ray start flags, string values
RAY_SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["serveConfigV2", "rayClusterConfig"], "additionalProperties": False,
                 "properties": {
                     "serveConfigV2": {"type": "string"},
                     "upgradeStrategy": {"type": "object"},
                     "rayClusterConfig": {
                         "type": "object", "required": ["headGroupSpec"], "additionalProperties": False,
                         "properties": {
                             "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                             "autoscalerOptions": {"type": "object"},
                             "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                               "additionalProperties": False,
                                               "properties": {"rayStartParams": START_PARAMS,
                                                              "template": POD_TEMPLATE,
                                                              "serviceType": {"type": "string"}}},
                             "workerGroupSpecs": {"type": "array", "items": {
                                 "type": "object", "required": ["groupName", "rayStartParams", "template"],
                                 "additionalProperties": False,
                                 "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                                                "minReplicas": {"type": "integer"},
                                                "maxReplicas": {"type": "integer"},
                                                "rayStartParams": START_PARAMS, "template": POD_TEMPLATE}}}}}}}}}


def test_the_rayservice_manifest_passes_the_schemas_and_builds_the_application():
    manifest = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(manifest, RAY_SERVICE)
    cluster = manifest["spec"]["rayClusterConfig"]
    import ray
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "server.scaleout.run:app_builder" and app.route_prefix == "/"
    from server.scaleout.run import app_builder
    from ray import serve
    assert isinstance(app_builder(app.args), serve.Application)
    with pytest.raises(ValueError, match="not valid"):
        app_builder({**app.args, "max-replicaz": 2})

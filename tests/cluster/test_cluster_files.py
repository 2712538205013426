"""Every YAML file in cluster/ is checked against the schema of the tool that reads it.

- Ray cluster-launcher files (`ray up`): the JSON schema shipped in ray (`ray/autoscaler/ray-schema.json`,
  draft 7), then Ray's own `prepare_config` + `validate_config`, which merge the provider's defaults as
  `ray up` does.
- Kubernetes manifests (KubeRay RayCluster / RayJob / RayService, several documents per file): the `v1`
  openAPIV3Schema of the operator's CRDs in ../shared/schemas/kuberay/, made strict the way
  `kubectl --validate=strict` is (an unknown field is an error); the few core kinds we use next to them
  (PersistentVolumeClaim) against a small schema written here.
- The job runtime env (`ray job submit --runtime-env`, a RayJob's `runtimeEnvYAML`): only Ray's public
  runtime_env fields, each value checked by `ray.runtime_env.RuntimeEnv`.

A YAML file that fits none of these fails, so a new file cannot slip in unvalidated. The CEL rules of
the CRDs (`x-kubernetes-validations`) are not evaluated; everything else of the structural schema is.
"""

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED = REPO.parent / "shared"
KUBERAY_CRDS = SHARED / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
# The package the autoscaler on the head imports to start and stop nodes, per provider.
HEAD_SDK = {"aws": "boto3", "gcp": "google-api-python-client"}

_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_QUANTITY = {"anyOf": _INT_OR_STRING, "pattern": r"^[0-9.]+([eE][-+]?[0-9]+|[KMGTPE]i?|[munk])?$"}
# metav1.ObjectMeta as a manifest may write it (the root `metadata` of a CRD schema is a bare object).
OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "namespace": {"type": "string"}, "generateName": {"type": "string"},
        "labels": _STR_MAP, "annotations": _STR_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "uid": {"type": "string"}, "resourceVersion": {"type": "string"}, "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]}, "deletionTimestamp": {"type": "string"},
        "deletionGracePeriodSeconds": {"type": "integer"}, "managedFields": {"type": "array"},
        "selfLink": {"type": "string"},
    },
}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": _STR_MAP, "matchExpressions": {"type": "array", "items": {"type": "object"}}}}
_TYPED_REF = {"type": "object", "required": ["kind", "name"], "additionalProperties": False, "properties": {
    "apiGroup": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
    "namespace": {"type": "string"}}}
# core/v1 kinds that sit next to the KubeRay resources in our manifests, with the fields of their spec.
CORE_SCHEMAS = {
    ("v1", "PersistentVolumeClaim"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "v1"}, "kind": {"const": "PersistentVolumeClaim"},
            "metadata": OBJECT_META,
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "accessModes": {"type": "array", "items": {
                    "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}},
                "dataSource": _TYPED_REF, "dataSourceRef": _TYPED_REF,
                "resources": {"type": "object", "additionalProperties": False, "properties": {
                    "limits": {"type": "object", "additionalProperties": _QUANTITY},
                    "requests": {"type": "object", "additionalProperties": _QUANTITY}}},
                "selector": _LABEL_SELECTOR, "storageClassName": {"type": "string"},
                "volumeAttributesClassName": {"type": "string"},
                "volumeMode": {"enum": ["Filesystem", "Block"]}, "volumeName": {"type": "string"},
            }},
        },
    },
}


# ----------------------------------------------------------------------------------------- loading

def load_docs(path):
    """The YAML documents of a file, empty ones dropped."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def runtime_env_fields():
    from ray.runtime_env import RuntimeEnv
    return {f for f in RuntimeEnv.known_fields if not f.startswith("_")}


def classify(docs):
    """'launcher', 'kubernetes' or 'runtime_env'; None when the file is none of them."""
    if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        return "kubernetes"
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return None
    if "provider" in docs[0]:
        return "launcher"
    if set(docs[0]) & runtime_env_fields():
        return "runtime_env"
    return None


# ------------------------------------------------------------------------------------- validators

def _format(error):
    where = ".".join(str(p) for p in error.absolute_path) or "<root>"
    text = f"{where}: {error.message}"
    if error.context:       # anyOf / oneOf: say why each branch failed
        text += " [" + "; ".join(sorted({c.message for c in error.context})) + "]"
    return text


def schema_errors(validator, instance):
    return sorted(_format(e) for e in validator.iter_errors(instance))


@functools.lru_cache(maxsize=None)
def launcher_validator():
    import ray
    with open(Path(ray.__file__).parent / "autoscaler" / "ray-schema.json") as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def launcher_errors(config):
    """Errors of a cluster-launcher config: Ray's schema, then Ray's checks after merging defaults."""
    errors = schema_errors(launcher_validator(), config)
    if not errors:
        from ray.autoscaler._private.util import prepare_config, validate_config
        try:
            validate_config(prepare_config(copy.deepcopy(config)))
        except Exception as e:        # noqa: BLE001 - Ray raises ValueError, RuntimeError, ValidationError
            errors.append(f"ray validate_config: {type(e).__name__}: {e}")
    return errors


def runtime_env_errors(data, where="runtime_env"):
    """Errors of a runtime_env dict: unknown fields, then the value checks of RuntimeEnv."""
    from ray.runtime_env import RuntimeEnv
    if not isinstance(data, dict):
        return [f"{where}: not a mapping"]
    unknown = sorted(set(data) - runtime_env_fields())
    if unknown:
        return [f"{where}: unknown runtime_env field(s) {unknown}; known: {sorted(runtime_env_fields())}"]
    try:
        RuntimeEnv(**data)
    except (TypeError, ValueError) as e:
        return [f"{where}: {e}"]
    return []


def strict_k8s_schema(node):
    """An OpenAPI v3 structural schema turned into a strict JSON schema (like kubectl --validate=strict).

    Objects that list `properties` reject unknown fields unless `x-kubernetes-preserve-unknown-fields`;
    `x-kubernetes-int-or-string` accepts an int or a string; `nullable` adds null; an
    `x-kubernetes-embedded-resource` object also takes apiVersion, kind and metadata;
    `x-kubernetes-list-type: set` means unique items (`map` lists are checked by `_list_map_keys`).
    """
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in ("properties", "patternProperties", "definitions"):
        if isinstance(node.get(key), dict):
            out[key] = {name: strict_k8s_schema(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = strict_k8s_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if isinstance(node.get(key), list):
            out[key] = [strict_k8s_schema(sub) for sub in node[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", _INT_OR_STRING)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if out.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out.get("properties", {})}
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-type: map`: no two items share the same values of the key fields."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key))}")
            seen.add(key)


StrictK8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


@functools.lru_cache(maxsize=None)
def crd_validator(kind):
    path = KUBERAY_CRDS / CRD_FILES[kind]
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, path
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_k8s_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return StrictK8sValidator(schema)


def need_kuberay_schemas():
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (the shared/ folder next to the repository)")


def manifest_errors(doc):
    """Errors of one Kubernetes document: its CRD (ray.io kinds) or a core schema of this file."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind in CRD_FILES and str(api).startswith("ray.io/"):
        need_kuberay_schemas()
        errors = schema_errors(crd_validator(kind), doc)
        if kind == "RayJob" and isinstance(doc.get("spec", {}).get("runtimeEnvYAML"), str):
            errors += runtime_env_errors(yaml.safe_load(doc["spec"]["runtimeEnvYAML"]),
                                         "spec.runtimeEnvYAML")
        return errors
    if (api, kind) in CORE_SCHEMAS:
        return schema_errors(jsonschema.Draft7Validator(CORE_SCHEMAS[(api, kind)]), doc)
    return [f"no schema for apiVersion={api} kind={kind}: add one to CORE_SCHEMAS in {Path(__file__).name}"]


def file_errors(path):
    docs = load_docs(path)
    kind = classify(docs)
    if kind == "launcher":
        return launcher_errors(docs[0])
    if kind == "kubernetes":
        return [f"document {i} ({d.get('kind')}): {e}"
                for i, d in enumerate(docs) for e in manifest_errors(d)]
    if kind == "runtime_env":
        return runtime_env_errors(docs[0])
    return [f"{path.name} is neither a Ray cluster-launcher file, Kubernetes manifests nor a runtime env: "
            "teach this test to validate it"]


# ------------------------------------------------------------------------------------------ tests

def test_cluster_folder_has_yaml_files():
    names = {p.name for p in YAML_FILES}
    assert {"aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-gpu.yaml", "runtime_env.yaml"} <= names, names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_cluster_file_is_valid(path):
    errors = file_errors(path)
    assert not errors, f"{path.relative_to(REPO)}:\n  " + "\n  ".join(errors)


def test_unclassified_yaml_fails(tmp_path):
    stray = tmp_path / "notes.yaml"
    stray.write_text("owner: ml-platform\nreplicas: 3\n")
    assert classify(load_docs(stray)) is None
    assert "teach this test" in file_errors(stray)[0]


LAUNCHERS = [p for p in YAML_FILES if classify(load_docs(p)) == "launcher"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_head_installs_the_cloud_sdk(path):
    """The autoscaler on the head starts the workers through the cloud SDK: it must be installed there."""
    from ray.autoscaler._private.util import prepare_config
    (config,) = load_docs(path)
    sdk = HEAD_SDK[config["provider"]["type"]]
    head_commands = prepare_config(copy.deepcopy(config))["head_setup_commands"]
    assert any(re.search(rf"pip install .*{re.escape(sdk)}", c) for c in head_commands), (
        f"no head setup command installs {sdk}; the head runs: {head_commands}")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_setup_commands_are_idempotent(path):
    """`ray up` reruns every setup command on every call: appending to a file must be guarded."""
    (config,) = load_docs(path)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    for command in (c for k in keys for c in config.get(k) or []):
        if ">>" in command:
            assert re.search(r"grep -q\S* .*\|\|.*>>", command), f"unguarded append: {command}"


@pytest.mark.parametrize("path", [p for p in LAUNCHERS if load_docs(p)[0]["provider"]["type"] == "gcp"],
                         ids=lambda p: p.name)
def test_gcp_gpu_workers_declare_their_gpus(path):
    """Only the AWS provider detects a node type's CPUs and GPUs; on GCP they must be written down."""
    (config,) = load_docs(path)
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        node_config, resources = node_type["node_config"], node_type["resources"]
        gpus = sum(a.get("acceleratorCount", 0) for a in node_config.get("guestAccelerators", []))
        if re.match(r"(a2|a3|a4|g2|g4)-", node_config["machineType"]):     # GPUs come with the type
            gpus = max(gpus, 1)
        assert resources.get("CPU", 0) > 0, f"{name}: declare CPU"
        assert (resources.get("GPU", 0) > 0) == (gpus > 0), f"{name}: GPU resources {resources} vs machine"


def _kuberay_doc(kind):
    for path in YAML_FILES:
        for doc in load_docs(path):
            if isinstance(doc, dict) and doc.get("kind") == kind:
                return copy.deepcopy(doc)
    pytest.fail(f"no {kind} in cluster/")


def _set(doc, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    doc[last] = value


@pytest.mark.parametrize("kind,field", [
    ("RayCluster", "spec.headGroupSpec.bogusField"),
    ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.imagePullPolicyy"),
    ("RayJob", "spec.entrypointt"),
    ("PersistentVolumeClaim", "spec.storageClass"),
])
def test_unknown_manifest_field_is_rejected(kind, field):
    doc = _kuberay_doc(kind)
    _set(doc, field, "x")
    errors = manifest_errors(doc)
    name = field.rsplit(".", 1)[-1]
    assert any(f"'{name}' was unexpected" in e for e in errors), errors


def test_unknown_launcher_key_is_rejected():
    (config,) = load_docs(LAUNCHERS[0])
    config["bogus_top_level_key"] = 1
    config["available_node_types"][config["head_node_type"]]["min_wrokers"] = 0
    errors = launcher_errors(config)
    assert any("'bogus_top_level_key' was unexpected" in e for e in errors), errors
    assert any("'min_wrokers' was unexpected" in e for e in errors), errors


def test_unknown_runtime_env_field_is_rejected():
    errors = runtime_env_errors({"env_vars": {"A": "1"}, "exclude": ["/data/"]})
    assert errors and "'exclude'" in errors[0], errors
    assert runtime_env_errors({"env_vars": {"A": 1}}), "a non-string env var value must fail"


def test_int_or_string_quantities():
    doc = _kuberay_doc("RayCluster")
    limits = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["nvidia.com/gpu"] = 4                       # an int is as good as "4"
    assert manifest_errors(doc) == []
    limits["nvidia.com/gpu"] = [4]
    assert manifest_errors(doc), "a list is neither an int nor a string"


def test_kuberay_references_resolve():
    """The RayJob targets a RayCluster of cluster/, and every claimed volume is a PVC of cluster/."""
    docs = [d for p in YAML_FILES for d in load_docs(p) if classify(load_docs(p)) == "kubernetes"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        selector = doc.get("spec", {}).get("clusterSelector", {})
        if "ray.io/cluster" in selector:
            assert ("RayCluster", selector["ray.io/cluster"]) in names, selector
        for claim in re.findall(r"'claimName': '([^']+)'", str(doc)):
            assert ("PersistentVolumeClaim", claim) in names, claim

"""Schema checks: core kinds against Kubernetes' OpenAPI, custom kinds against the add-ons' real CRDs.

Both are strict about unknown fields. On a cluster the API server silently prunes a field that a CRD's
structural schema does not declare, so a misspelt field, or one from another release of the add-on
(TrainJob `podSpecOverrides` against a Trainer that has `runtimePatches`), is dropped without a word and
the workload runs without it. Offline the same field has to be an error.

CEL rules (`x-kubernetes-validations`) are not evaluated: they need a CEL interpreter and usually compare
against the old object, which offline validation does not have.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from llm_auction.deploy.problem import YAML_LOADER, Manifest, Problem, describe

KUBERNETES_VERSION = "1.32"

JsonSchema = dict[str, Any]

_JUNCTORS = ("allOf", "anyOf", "oneOf")


def structural_to_jsonschema(node: JsonSchema, closed: bool = True) -> JsonSchema:
    """Convert a node of a CRD's structural schema into JSON Schema that rejects unknown fields.

    An object that declares `properties` becomes `additionalProperties: false`, unless it opts out with
    `x-kubernetes-preserve-unknown-fields` (the API server keeps unknown fields exactly there).

    Args:
        node: a node of `openAPIV3Schema`, unchanged.
        closed: whether objects in this node are closed to undeclared fields; false inside `allOf`,
            `anyOf`, `oneOf` and `not`, whose subschemas only add constraints to the fields declared
            outside them.

    Returns:
        A new schema for `jsonschema`'s Draft 4 validator (OpenAPI 3.0 schemas use its semantics).
    """
    out = {key: value for key, value in node.items() if key != "description"}
    if "properties" in out:
        out["properties"] = {
            name: structural_to_jsonschema(sub, closed) for name, sub in out["properties"].items()
        }
    if isinstance(out.get("items"), dict):
        out["items"] = structural_to_jsonschema(out["items"], closed)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = structural_to_jsonschema(out["additionalProperties"], closed)
    for key in _JUNCTORS:
        if key in out:
            out[key] = [structural_to_jsonschema(sub, closed=False) for sub in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = structural_to_jsonschema(out["not"], closed=False)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserves = out.get("x-kubernetes-preserve-unknown-fields", False)
    if closed and "properties" in out and "additionalProperties" not in out and not preserves:
        out["additionalProperties"] = False
    return out


def crd_schema(crd: Manifest, version: str) -> JsonSchema | None:
    """The JSON Schema of one served version of a CRD, or None if that version is not served.

    `status` is dropped from the root's required fields: the controller writes it, a manifest never
    does (KFP's ScheduledWorkflow CRD lists it as required all the same).
    """
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version and entry.get("served", False):
            root = structural_to_jsonschema(entry["schema"]["openAPIV3Schema"])
            root["required"] = [field for field in root.get("required", []) if field != "status"]
            if not root["required"]:
                del root["required"]
            return root
    return None


@functools.cache
def load_crds(crd_dir: Path) -> dict[tuple[str, str], Manifest]:
    """Every CRD in `crd_dir`, indexed by (API group, kind); parsed once per process (they are large)."""
    index: dict[tuple[str, str], Manifest] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        with path.open(encoding="utf-8") as stream:
            for doc in yaml.load_all(stream, Loader=YAML_LOADER):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    index[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return index


@functools.cache
def _crd_validator(crd_dir: Path, group: str, version: str, kind: str) -> jsonschema.Draft4Validator | None:
    schema = crd_schema(load_crds(crd_dir)[(group, kind)], version)
    return None if schema is None else jsonschema.Draft4Validator(schema)


def _path(parts: Any) -> str:
    return ".".join(str(part) for part in parts) or "(root)"


def _check_custom(doc: Manifest, crd_dir: Path, group: str, version: str, kind: str) -> list[Problem]:
    validator = _crd_validator(crd_dir, group, version, kind)
    if validator is None:
        return [Problem(describe(doc), "schema", f"the {kind} CRD serves no version {version!r}")]
    errors = sorted(validator.iter_errors(doc), key=lambda error: _path(error.absolute_path))
    return [
        Problem(describe(doc), "schema", f"{_path(error.absolute_path)}: {error.message}") for error in errors
    ]


def _check_core(doc: Manifest) -> list[Problem]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        message = (
            f"no schema for {doc['apiVersion']} {doc['kind']}: neither a Kubernetes {KUBERNETES_VERSION} "
            "kind nor a kind of the CRDs in ../shared/crds"
        )
        return [Problem(describe(doc), "schema", message)]
    except kubernetes_validate.ValidationError as error:
        return [Problem(describe(doc), "schema", f"{_path(error.path)}: {error.message}")]
    return []


def check_schema(doc: Manifest, crd_dir: Path) -> list[Problem]:
    """Validate one object against the schema of its kind.

    Args:
        doc: a rendered object.
        crd_dir: the folder of CRDs that custom kinds are checked against.

    Returns:
        One problem per schema violation; each message starts with the path of the offending field.
    """
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [Problem(describe(doc), "schema", "apiVersion and kind must both be set")]
    group, _, version = api_version.rpartition("/")
    if (group, kind) in load_crds(crd_dir):
        return _check_custom(doc, crd_dir, group, version, kind)
    return _check_core(doc)

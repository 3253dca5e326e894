#!/usr/bin/env python3
"""Validates bakeoff's Kubernetes manifests offline, strictly, and says what it checked.

Every YAML document under the given paths (default: this directory, without crds/) is checked:

- core Kubernetes objects against the JSON schemas that kubernetes-validate (PyPI) ships, for
  each version in KUBERNETES_VERSIONS, in strict mode (a field the API does not define is an
  error); a kind without a schema is an error, never a skip;
- objects of the Argo Rollouts and Flagger CRDs (fixtures in crds/, see crds/README.md) against
  the CRD's openAPIV3Schema for their apiVersion, made strict the same way (unknown fields are
  errors unless the schema preserves them), their metadata against Kubernetes' ObjectMeta;
- kustomizations: only `resources` (so this script renders them as kustomize does), each
  resource present, and every manifest reachable from some kustomization;
- the probe's configuration in its ConfigMap parses as a YAML mapping.

Prints one line per object, or with --json a report (files, objects with their errors,
kustomizations with the objects they render, containers with image and arguments, the Argo
web metrics, the Rollouts' analysis steps and Flagger's webhooks) that tests/tests/deploy.rs
asserts on. Exit status 1 if anything failed.
"""

import argparse
import json
import os
import sys

import importlib_resources
import jsonschema
import kubernetes_validate
import referencing
import referencing.jsonschema
import yaml

# The oldest Kubernetes minor most managed offerings still run, and the newest this
# kubernetes-validate release ships schemas for.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]

HERE = os.path.dirname(os.path.abspath(__file__))
KUSTOMIZE_API = "kustomize.config.k8s.io/"
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"


def yaml_files(path, skip):
    if os.path.isfile(path):
        return [os.path.abspath(path)]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) not in skip)
        found += [os.path.abspath(os.path.join(root, f)) for f in sorted(files)
                  if f.endswith((".yaml", ".yml"))]
    return found


def load_documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def strict(schema):
    """A CRD schema where objects with named properties refuse other fields, as the API server's
    strict field validation does (x-kubernetes-preserve-unknown-fields keeps them open)."""
    if not isinstance(schema, dict):
        return schema
    s = dict(schema)
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    return s


def load_crds(crd_dir):
    """(apiVersion, kind) -> (strict schema, source file) for every served CRD version."""
    crds = {}
    for path in yaml_files(crd_dir, set()):
        for doc in load_documents(path):
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                if not v.get("served", True):
                    continue
                schema = strict(v["schema"]["openAPIV3Schema"])
                # Objects' metadata is checked against ObjectMeta instead of the CRDs' `object`.
                schema["properties"]["metadata"] = {
                    "$ref": DEFINITIONS_ID + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
                }
                crds[(spec["group"] + "/" + v["name"], spec["names"]["kind"])] = (schema, path)
    return crds


def definitions(version):
    ref = importlib_resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", "v%s-local-strict" % version, "_definitions.json")
    with importlib_resources.as_file(ref) as p, open(p) as f:
        return json.load(f)


def crd_errors(doc, schema, version):
    registry = referencing.Registry().with_resource(
        DEFINITIONS_ID, referencing.Resource.from_contents(definitions(version)))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return ["%s: %s" % (".".join(str(p) for p in e.absolute_path) or "(root)", e.message)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))]


def core_errors(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return ["%s: %s" % (".".join(str(p) for p in e.path) or "(root)", e.message)]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]


def object_id(doc):
    meta = doc.get("metadata") or {}
    return "%s/%s/%s" % (doc.get("kind"), meta.get("namespace", ""), meta.get("name"))


def kustomization(path, doc):
    """The errors of a kustomization and the files and directories it lists."""
    errors = ["%s: only `resources` is supported here" % k
              for k in doc if k not in ("apiVersion", "kind", "resources")]
    listed = []
    for r in doc.get("resources") or []:
        target = os.path.normpath(os.path.join(os.path.dirname(path), r))
        if os.path.isdir(target) and os.path.isfile(os.path.join(target, "kustomization.yaml")):
            listed.append(target)
        elif os.path.isfile(target):
            listed.append(target)
        else:
            errors.append("resources: %s is neither a file nor a kustomization directory" % r)
    return errors, listed


def render(path, kustomizations, docs_by_file, seen=()):
    """Object ids of a kustomization, as `kubectl kustomize` would list them."""
    out = []
    for target in kustomizations[path]:
        if os.path.isdir(target):
            sub = os.path.join(target, "kustomization.yaml")
            if sub in seen or sub not in kustomizations:
                continue
            out += render(sub, kustomizations, docs_by_file, seen + (path,))
        else:
            out += [object_id(d) for d in docs_by_file.get(target, [])]
    return out


def walk_containers(doc):
    spec = doc.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        yield c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=[HERE])
    ap.add_argument("--crds", default=os.path.join(HERE, "crds"))
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()

    crd_dir = os.path.abspath(args.crds)
    crds = load_crds(crd_dir)
    files = []
    for p in args.paths:
        files += yaml_files(p, {crd_dir})

    report = {
        "kubernetes_validate": kubernetes_validate.__version__,
        "kubernetes_versions": KUBERNETES_VERSIONS,
        "crds": sorted("%s %s" % k for k in crds),
        "files": [], "objects": [], "kustomizations": [], "containers": [],
        "web_metrics": [], "webhooks": [], "rollout_analyses": [], "errors": 0,
    }
    docs_by_file, kustomizations = {}, {}
    for path in files:
        try:
            docs = load_documents(path)
        except yaml.YAMLError as e:
            docs, parse_error = [], str(e)
        else:
            parse_error = None
        docs_by_file[path] = [d for d in docs if not str(d.get("apiVersion", "")).startswith(KUSTOMIZE_API)]
        report["files"].append({"path": path, "objects": len(docs)})
        if parse_error or not docs:
            report["objects"].append({"file": path, "kind": None, "name": None, "schema": None,
                                      "errors": [parse_error or "no YAML document"]})
        for doc in docs:
            api, kind = doc.get("apiVersion", ""), doc.get("kind")
            meta = doc.get("metadata") or {}
            entry = {"file": path, "apiVersion": api, "kind": kind, "name": meta.get("name"),
                     "namespace": meta.get("namespace")}
            if api.startswith(KUSTOMIZE_API) and kind == "Kustomization":
                errors, listed = kustomization(path, doc)
                kustomizations[path] = listed
                entry.update(schema="kustomization", errors=errors)
            elif (api, kind) in crds:
                schema, source = crds[(api, kind)]
                errors = []
                for v in KUBERNETES_VERSIONS:
                    errors += ["kubernetes %s: %s" % (v, e) for e in crd_errors(doc, schema, v)]
                entry.update(schema="crd " + os.path.relpath(source, crd_dir), errors=errors)
            else:
                errors = []
                for v in KUBERNETES_VERSIONS:
                    errors += ["kubernetes %s: %s" % (v, e) for e in core_errors(doc, v)]
                entry.update(schema="kubernetes", errors=errors)
            if kind == "ConfigMap":
                for key, value in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        try:
                            if not isinstance(yaml.safe_load(value), dict):
                                entry["errors"].append("data.%s: not a YAML mapping" % key)
                        except yaml.YAMLError as e:
                            entry["errors"].append("data.%s: %s" % (key, e))
            for c in walk_containers(doc):
                report["containers"].append({
                    "file": path, "object": object_id(doc), "name": c.get("name"),
                    "image": c.get("image"), "command": c.get("command") or [],
                    "args": c.get("args") or [],
                    "capabilities_add": ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [],
                    "run_as_user": (c.get("securityContext") or {}).get("runAsUser"),
                })
            if kind == "AnalysisTemplate":
                for m in (doc.get("spec") or {}).get("metrics") or []:
                    web = (m.get("provider") or {}).get("web")
                    if web:
                        report["web_metrics"].append({
                            "object": object_id(doc), "name": m.get("name"),
                            "url": web.get("url"), "headers": web.get("headers") or [],
                            "jsonPath": web.get("jsonPath"),
                            "successCondition": m.get("successCondition"),
                            "failureCondition": m.get("failureCondition"),
                            "args": (doc.get("spec") or {}).get("args") or [],
                        })
            if kind == "Rollout":
                canary = ((doc.get("spec") or {}).get("strategy") or {}).get("canary") or {}
                for step in canary.get("steps") or []:
                    if "analysis" in step:
                        a = step["analysis"]
                        report["rollout_analyses"].append({
                            "object": object_id(doc),
                            "templates": [t.get("templateName") for t in a.get("templates") or []],
                            "args": {x["name"]: x.get("value") for x in a.get("args") or []},
                        })
            if kind == "Canary":
                for w in ((doc.get("spec") or {}).get("analysis") or {}).get("webhooks") or []:
                    report["webhooks"].append({"object": object_id(doc), "name": w.get("name"),
                                               "type": w.get("type"), "url": w.get("url"),
                                               "metadata": w.get("metadata") or {}})
            report["objects"].append(entry)

    # Every manifest ships with some kustomization; each kustomization renders its objects.
    reachable = set()
    for path, listed in kustomizations.items():
        stack = list(listed)
        while stack:
            t = stack.pop()
            if os.path.isdir(t):
                sub = os.path.join(t, "kustomization.yaml")
                if sub not in reachable:
                    reachable.add(sub)
                    stack += kustomizations.get(sub, [])
            else:
                reachable.add(t)
        report["kustomizations"].append(
            {"path": path, "objects": render(path, kustomizations, docs_by_file)})
    for path in files:
        if path not in kustomizations and path not in reachable:
            report["objects"].append({"file": path, "kind": None, "name": None, "schema": None,
                                      "errors": ["listed by no kustomization.yaml"]})

    report["errors"] = sum(len(o["errors"]) for o in report["objects"])
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        for o in report["objects"]:
            status = "ok" if not o["errors"] else "FAIL"
            print("%-4s %s %s/%s (%s)" % (status, os.path.relpath(o["file"]), o["kind"], o["name"], o["schema"]))
            for e in o["errors"]:
                print("       " + e)
        print("%d objects in %d files, %d errors (Kubernetes %s, kubernetes-validate %s)" % (
            len(report["objects"]), len(files), report["errors"],
            ", ".join(KUBERNETES_VERSIONS), kubernetes_validate.__version__))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

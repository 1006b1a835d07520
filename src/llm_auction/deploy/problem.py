"""What a check reports (one problem, tied to the object it was found in) and how objects are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

Manifest = dict[str, Any]

# libyaml's loader where PyYAML has it: the CRDs are megabytes, about ten times slower to parse in Python.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Problem:
    """A reason a rendered object must not be applied.

    Attributes:
        resource: `Kind/name` of the object, so a reader can find it in the rendered overlay.
        check: which check failed: `render`, `schema`, `image`, `security`, `resources`, `secret`,
            `runtime` or `canary`.
        message: what is wrong, naming the offending field, container or value.
    """

    resource: str
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.resource}: [{self.check}] {self.message}"


def describe(doc: Manifest) -> str:
    """Name an object as `Kind/name`, tolerating the malformed objects the checks exist to catch."""
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return f"{doc.get('kind', '?')}/{metadata.get('name', '?')}"

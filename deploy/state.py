"""What a deployment created, so that `delete` removes exactly that and nothing else.

Two records agree: a JSON state file per deployment (the list to delete) and a tag on every
taggable resource (the proof before deleting: a resource whose tag does not name this deployment is
left alone, even if the state file lists it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TAG_KEY = "sagemaker-llm-serve:deployment"
STATE_DIR_ENV = "DEPLOY_STATE_DIR"
DEFAULT_STATE_DIR = Path.home() / ".sagemaker-llm-serve" / "deployments"


def state_dir(override: str | None = None) -> Path:
    """Where state files live: --state-dir, else $DEPLOY_STATE_DIR, else ~/.sagemaker-llm-serve/deployments."""
    return Path(override or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def tags_for(deployment: str, extra: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The tags a resource created for `deployment` carries: ours, then the user's (SageMaker / ECR shape)."""
    return [{"Key": TAG_KEY, "Value": deployment}, *({"Key": k, "Value": v} for k, v in (extra or {}).items())]


@dataclass
class Resource:
    """One created resource: its kind (model, endpoint-config, ...), name and kind-specific details."""

    kind: str
    name: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeploymentState:
    """The resources one deployment created, persisted as JSON after every change."""

    name: str
    region: str
    path: Path
    resources: list[Resource] = field(default_factory=list)

    @classmethod
    def load(cls, name: str, region: str, directory: Path) -> DeploymentState:
        """The saved state of `name`, or an empty one (nothing created yet)."""
        path = directory / f"{name}.{region}.json"
        if not path.exists():
            return cls(name=name, region=region, path=path)
        data = json.loads(path.read_text())
        return cls(name=name, region=region, path=path, resources=[Resource(**r) for r in data["resources"]])

    def save(self) -> None:
        """Write the state file atomically (a crash never leaves half a list)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        payload = {"name": self.name, "region": self.region, "resources": [asdict(r) for r in self.resources]}
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.path)

    def add(self, kind: str, name: str, **details: Any) -> None:
        """Record a resource right after creating it."""
        if not self.find(kind, name):
            self.resources.append(Resource(kind, name, details))
            self.save()

    def remove(self, kind: str, name: str) -> None:
        """Forget a resource right after deleting it."""
        self.resources = [r for r in self.resources if not (r.kind == kind and r.name == name)]
        self.save()

    def find(self, kind: str, name: str | None = None) -> list[Resource]:
        """Recorded resources of `kind` (and `name`, when given), oldest first."""
        return [r for r in self.resources if r.kind == kind and (name is None or r.name == name)]

    def forget_file(self) -> None:
        """Remove the state file once nothing is left to delete."""
        if not self.resources and self.path.exists():
            self.path.unlink()

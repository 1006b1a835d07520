"""Static checks of the Dockerfiles in `infra/images`, which hold where no Docker daemon runs.

The same rules as for manifests, one step earlier: base images pinned to a version (a moving base image
changes what was tested), the final stage running as a non-root user (the pods' runAsNonRoot needs a
numeric one), and no credential passed as a build argument or baked in as an environment variable (both
stay readable in the image's history).
"""

from __future__ import annotations

import re

from llm_auction.deploy.policies import image_problem

_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_ROOT_USERS = ("root", "0")


def instructions(text: str) -> list[tuple[str, str]]:
    """The (INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _arg_default(rest: str) -> tuple[str, str | None]:
    name, equals, default = rest.partition("=")
    return name.strip(), default.strip().strip('"') if equals else None


def _env_names(rest: str) -> list[str]:
    if "=" not in rest.split(" ", 1)[0]:
        return [rest.split(" ", 1)[0]]
    return [pair.split("=", 1)[0] for pair in rest.split() if "=" in pair]


def check_dockerfile(text: str) -> list[str]:
    """Check one Dockerfile.

    Args:
        text: the Dockerfile's content.

    Returns:
        One message per problem; empty when the Dockerfile follows the rules.
    """
    problems: list[str] = []
    args: dict[str, str | None] = {}
    stages: set[str] = set()
    final_user: str | None = None
    for keyword, rest in instructions(text):
        if keyword == "ARG":
            name, default = _arg_default(rest)
            args.setdefault(name, default)
            if _SECRET_NAME.search(name):
                problems.append(
                    f"ARG {name} looks like a credential: build arguments stay in the image history"
                )
        elif keyword == "ENV":
            problems += [
                f"ENV {name} looks like a credential baked into the image"
                for name in _env_names(rest)
                if _SECRET_NAME.search(name)
            ]
        elif keyword == "FROM":
            parts = rest.split()
            image = _VARIABLE.sub(lambda m: args.get(m.group(1) or m.group(2)) or "", parts[0])
            if image not in stages and (problem := image_problem(image)):
                problems.append(f"FROM {parts[0]}: base {problem}")
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            final_user = None
        elif keyword == "USER":
            final_user = rest.split(":", 1)[0]
    if final_user is None or final_user in _ROOT_USERS:
        problems.append("the final stage does not switch to a non-root USER")
    return problems

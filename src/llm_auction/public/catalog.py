"""The platform's exports: the ad catalog, user profiles, and auction-request files (public side).

A platform writes these from its own systems; in simulation the world writes them
(`llm-auction world export`). Production steps read nothing else about ads and users. Files in
one folder (`Settings.public_dir`):

    ads.parquet          ad_id, advertiser_id, text, category      (the creative and its category)
    advertisers.parquet  advertiser_id, name, category
    users.parquet        user_id, profile_text                      (what the user told the platform)
    held_out_requests.jsonl   auction requests kept for offline evaluation (never trained on)
    synthetic_requests.jsonl  auction requests IRPO may use as prompts besides the request log

Request files hold one `contracts.AuctionRequest` per line (JSON). Bids are the advertisers'
bids, as the platform receives them; nobody's private value is here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from llm_auction.config import describe_validation_error
from llm_auction.contracts import AuctionRequest, check_bid_cap
from llm_auction.errors import InputError

CATALOG_COLUMNS: dict[str, tuple[str, ...]] = {
    "ads": ("ad_id", "advertiser_id", "text", "category"),
    "advertisers": ("advertiser_id", "name", "category"),
    "users": ("user_id", "profile_text"),
}
HELD_OUT_FILE = "held_out_requests.jsonl"
SYNTHETIC_FILE = "synthetic_requests.jsonl"


class PublicDataError(InputError):
    """A platform export that is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Catalog:
    """Ads (with their advertisers) and user profiles, as the platform exports them."""

    ads: pd.DataFrame
    advertisers: pd.DataFrame
    users: pd.DataFrame

    def profiles(self) -> dict[str, str]:
        """user_id -> profile text h, the prompt's user part."""
        return dict(zip(self.users["user_id"], self.users["profile_text"]))

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, columns in CATALOG_COLUMNS.items():
            path = directory / f"{name}.parquet"
            getattr(self, name)[list(columns)].to_parquet(path, index=False)
            paths.append(path)
        return paths

    @classmethod
    def load(cls, directory: Path) -> Catalog:
        """Read and check the three tables; a missing file, column or id is an error naming it."""
        tables = {}
        for name, columns in CATALOG_COLUMNS.items():
            path = directory / f"{name}.parquet"
            if not path.is_file():
                raise PublicDataError(f"{path}: not found; export the platform's {name} there")
            try:
                frame = pd.read_parquet(path)
            except (OSError, ValueError) as exc:
                raise PublicDataError(f"{path}: not readable as parquet ({exc})") from None
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise PublicDataError(f"{path}: missing column {missing[0]!r} (needs {', '.join(columns)})")
            key = columns[0]
            if frame[key].isna().any() or frame[key].duplicated().any():
                raise PublicDataError(f"{path}: column {key!r} must be unique and never empty")
            tables[name] = frame[list(columns)].astype(str).reset_index(drop=True)
        return cls(**tables)


def write_requests(path: Path, requests: Sequence[AuctionRequest]) -> Path:
    """One auction request per line (JSON), the format `read_requests` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in requests))
    return path


def read_requests(path: Path, max_bid: float) -> list[AuctionRequest]:
    """Auction requests from a JSON-lines file; the first bad line stops with its line and field."""
    if not path.is_file():
        raise PublicDataError(f"requests file {path}: not found")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            request = AuctionRequest.model_validate(json.loads(line))
            check_bid_cap(request, max_bid)
        except json.JSONDecodeError as exc:
            raise PublicDataError(f"{where}: not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            raise PublicDataError(describe_validation_error(exc, where)) from None
        except ValueError as exc:
            raise PublicDataError(f"{where}: {exc}") from None
        requests.append(request)
    if not requests:
        raise PublicDataError(f"{path}: holds no requests")
    return requests

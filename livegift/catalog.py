"""The gift catalogue and the coin price lists, loaded from data files once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from livegift.errors import BadRequest, UnknownGift, UnknownPackage


@dataclass(frozen=True, slots=True)
class Gift:
    id: str
    name: str
    coins: int
    streakable: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "coins": self.coins,
            "streakable": self.streakable,
        }


@dataclass(frozen=True, slots=True)
class Package:
    id: str
    coins: int
    price: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "coins": self.coins, "price": self.price}


@dataclass(frozen=True, slots=True)
class PriceList:
    region: str
    currency: str
    packages: tuple[Package, ...]

    def package(self, package_id: str) -> Package:
        for package in self.packages:
            if package.id == package_id:
                return package
        raise UnknownPackage(f"no package {package_id!r} in region {self.region}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "currency": self.currency,
            "packages": [p.to_dict() for p in self.packages],
        }


def _load(name: str) -> Any:
    return json.loads(resources.files("livegift").joinpath("data", name).read_text("utf-8"))


@dataclass(frozen=True, slots=True)
class Catalog:
    gifts: dict[str, Gift]
    regions: dict[str, PriceList]

    def gift(self, gift_id: str) -> Gift:
        try:
            return self.gifts[gift_id]
        except KeyError:
            raise UnknownGift(f"no gift {gift_id!r}") from None

    def price_list(self, region: str) -> PriceList:
        try:
            return self.regions[region.upper()]
        except KeyError:
            known = ", ".join(sorted(self.regions))
            raise BadRequest(f"unknown region {region!r}; known regions: {known}") from None


@cache
def default_catalog() -> Catalog:
    gifts = {
        g["id"]: Gift(g["id"], g["name"], int(g["coins"]), bool(g["streakable"]))
        for g in _load("gifts.json")["gifts"]
    }
    regions = {
        region: PriceList(
            region,
            spec["currency"],
            tuple(Package(p["id"], int(p["coins"]), int(p["price"])) for p in spec["packages"]),
        )
        for region, spec in _load("packages.json")["regions"].items()
    }
    return Catalog(gifts, regions)

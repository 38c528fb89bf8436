"""The one registry of rank allocators: every allocator object, by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from svdzip.allocate.ara import ARA
from svdzip.allocate.base import Allocator
from svdzip.allocate.block_influence import BlockInfluence
from svdzip.allocate.drank import DRank
from svdzip.allocate.loss_aware import LossAware
from svdzip.allocate.speed_aware import SpeedAware
from svdzip.allocate.strs import STRS
from svdzip.allocate.svdllm_v2 import SVDLLMV2
from svdzip.allocate.uniform import Uniform

REGISTRY: Mapping[str, Allocator] = MappingProxyType(
    {a.name: a for a in (Uniform(), DRank(), SVDLLMV2(), LossAware(), ARA(), STRS(), SpeedAware(), BlockInfluence())})

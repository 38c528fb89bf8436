"""The one registry of methods: every factorisation and module method object, by name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from svdzip.methods.factorisations import ASVD, FWSVD, SVDLLM, FactorisationMethod, PlainSVD
from svdzip.methods.hybrid import Hybrid
from svdzip.methods.modegpt import MoDeGPT

REGISTRY: Mapping[str, FactorisationMethod] = MappingProxyType(
    {m.name: m for m in (PlainSVD(), SVDLLM(), ASVD(), FWSVD(), MoDeGPT(), Hybrid())})

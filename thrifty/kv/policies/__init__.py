"""KV eviction policies, by name. Each is one small file; `make_policy` builds one for a request."""

from __future__ import annotations

import dataclasses

from thrifty.errors import InvalidRequestError
from thrifty.kv.policies.base import KVPolicy, ScoreInputs
from thrifty.kv.policies.d2o import D2OPolicy
from thrifty.kv.policies.h2o import H2OPolicy
from thrifty.kv.policies.keyformer import KeyformerPolicy
from thrifty.kv.policies.knorm import KNormPolicy
from thrifty.kv.policies.mikv import MiKVPolicy
from thrifty.kv.policies.pyramidkv import PyramidKVPolicy
from thrifty.kv.policies.snapkv import SnapKVPolicy
from thrifty.kv.policies.streaming_llm import StreamingLLMPolicy
from thrifty.kv.policies.tova import TOVAPolicy

POLICIES: dict[str, type[KVPolicy]] = {cls.name: cls for cls in (
    StreamingLLMPolicy, H2OPolicy, SnapKVPolicy, TOVAPolicy, KNormPolicy, KeyformerPolicy, PyramidKVPolicy,
    D2OPolicy, MiKVPolicy)}

__all__ = ["POLICIES", "KVPolicy", "ScoreInputs", "make_policy", "policy_options"]


def policy_options(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(POLICIES[name]) if f.init]


def make_policy(name: str, options: dict[str, object] | None = None) -> KVPolicy:
    """A fresh policy instance (policies may hold per-sequence state such as a noise generator)."""
    if name not in POLICIES:
        raise InvalidRequestError(f"kv_policy {name!r} is unknown; use one of {', '.join(POLICIES)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(policy_options(name)))
    if unknown:
        allowed = ", ".join(policy_options(name)) or "none"
        raise InvalidRequestError(f"kv_policy_options {unknown} do not apply to {name}; its options: {allowed}")
    try:
        return POLICIES[name](**options)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"invalid kv_policy_options for {name}: {exc}") from exc

"""The one Explain pipeline: plan (pure, before any model runs) → extract → map → patched generation.

The service's ingress, the CLI, the experiments and batch jobs all run `Pipeline`; they differ only in
the `Backend` that reaches the models (Ray deployments, or models loaded in this process).
"""

from patchscope.explain.events import Event, Explanation, SiteFinished, SiteResult, SiteStarted, SiteToken
from patchscope.explain.limits import Limits
from patchscope.explain.local import LocalBackend, explain
from patchscope.explain.plan import ModelInfo, Plan, plan_activations, plan_explain
from patchscope.explain.request import ActivationsRequest, ExplainRequest, Site, TargetSpec
from patchscope.explain.run import Backend, GenerateRequest, Pipeline, RowEvent

__all__ = [
    "ActivationsRequest",
    "Backend",
    "Event",
    "ExplainRequest",
    "Explanation",
    "GenerateRequest",
    "Limits",
    "LocalBackend",
    "ModelInfo",
    "Pipeline",
    "Plan",
    "RowEvent",
    "Site",
    "SiteFinished",
    "SiteResult",
    "SiteStarted",
    "SiteToken",
    "TargetSpec",
    "explain",
    "plan_activations",
    "plan_explain",
]

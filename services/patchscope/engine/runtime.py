"""What a target keeps between calls, above the plain model record: prefix cache, lean forward, decoder.

`LoadedModel` says what was loaded; a `TargetRuntime` says how patched generation runs on it. Keeping the
two apart lets the readers of a model (extract, capture, the logit lens) take the record alone, and lets
one model serve as source and target without its record carrying generation state.

A model placed across devices by blocks (models/placement.py) runs transformers' forward and the eager
loop: the lean forward and the static decoders call the blocks' submodules directly, past the hooks that
move each block's inputs to its device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.engine.models.lean import LeanDecoder, resolve_forward
from patchscope.engine.models.loading import LoadedModel
from patchscope.engine.models.placement import placement_of
from patchscope.engine.options import DEFAULTS, EngineOptions
from patchscope.engine.prefix_cache import PrefixCache
from patchscope.engine.static_decode import StaticDecoder, static_decoder


@dataclass
class TargetRuntime:
    """A target model with the state its patched generation reuses across calls."""

    model: LoadedModel
    prefix_cache: PrefixCache = field(default_factory=PrefixCache)
    # Patched generation runs this forward instead of transformers' when set (models/lean.py).
    lean: LeanDecoder | None = field(default=None, repr=False)
    # Greedy, non-streaming generation decodes through compiled steps when set (static_decode.py).
    static_decoder: StaticDecoder | None = field(default=None, repr=False)

    @classmethod
    def build(cls, model: LoadedModel, options: EngineOptions = DEFAULTS) -> TargetRuntime:
        """The runtime `options` describe: `forward` picks the lean forward, `decode` the decode loop.

        `options.gemm` acted at load already (it changes the model's modules): pass the options the model
        was loaded with.
        """
        placement = placement_of(model)
        if placement is not None:
            if options.forward == "lean" or options.decode != "eager":
                raise ValueError(
                    f"forward {options.forward!r}, decode {options.decode!r}: {model.id} is placed across "
                    f"{placement.describe()}, which runs transformers' forward and the eager loop only"
                )
            return cls(model)
        lean = LeanDecoder(model.model) if resolve_forward(options.forward, model.model) == "lean" else None
        return cls(model, lean=lean, static_decoder=static_decoder(model, options.decode))

"""Plain prompts decoded in left-padded batches, for experiments with many different prompts.

Why apart from `common`: the engine batches only rows of one template, so each distinct plain prompt
decodes alone; this module holds the one path that batches them with the model's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchscope.engine.generation import stop_ids
from patchscope.engine.models import LoadedModel
from patchscope.engine.template import leading_special_ids
from patchscope.eval.common import chunks


@torch.inference_mode()
def batched_plain_texts(
    model: LoadedModel, prompts: Sequence[str], max_new_tokens: int, *, batch: int = 64
) -> list[str]:
    """`plain_texts` for many different prompts: left-padded batches of the model's own forward.

    The engine batches only rows of one template, so distinct plain prompts decode one by one, a forward
    per prompt per token; here they share each forward. Greedy, the same specials and stop tokens as the
    engine; padding changes the arithmetic, not the model, so texts agree up to float rounding (a test
    checks them against `plain_texts`).
    """
    lead = leading_special_ids(model.tokenizer)
    stops = torch.tensor(sorted(stop_ids(model)), device=model.device)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else int(stops[0])
    texts: list[str] = []
    for block in chunks(len(prompts), batch):
        encoded = [lead + model.tokenizer(prompts[i], add_special_tokens=False).input_ids for i in block]
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        generated = torch.empty(len(block), 0, dtype=torch.long, device=model.device)
        done = torch.zeros(len(block), dtype=torch.bool, device=model.device)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(dim=-1)
            done |= torch.isin(token, stops)
            generated = torch.cat([generated, torch.where(done, pad, token)[:, None]], dim=1)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        for row in generated.tolist():
            cut = next((k for k, t in enumerate(row) if t in stops.tolist() or t == pad), len(row))
            texts.append(model.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
